"""What every operator shares: the registry row, input checks and the per-module loop."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from excise.errors import AdapterError, ConfigError, ExciseWarning
from excise.pem.delta import Adapter, LowRankDelta, Module, RowDelta
from excise.pem.io import TRAINING_DATA, carried_training_data

__all__ = [
    "ModuleSink",
    "Operator",
    "apply_modulewise",
    "check_compatible",
    "check_finite",
    "rank_in_dense",
    "result_dtype",
]


@dataclass(frozen=True)
class Operator:
    """One registry row: the exact operator, its dense twin, and where it comes from.

    Attributes:
        name: registry key; also the file name and, with ``-`` for ``_``, the CLI verb.
        fn: the exact low-rank operator, ``fn(*adapters, **params) -> Adapter``.
        dense_fn: the dense reference twin with the same signature.
        paper: citation (arXiv id) or ``""`` for plain arithmetic.
        summary: one line for ``--help`` and the README.
    """

    name: str
    fn: Callable[..., Adapter]
    dense_fn: Callable[..., Adapter]
    paper: str
    summary: str


def check_finite(name: str, value: float) -> float:
    """Reject a non-finite weight such as ``--lam nan``.

    Raises:
        ConfigError: if ``value`` is NaN or infinite.
    """
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_compatible(adapters: Sequence[Adapter], *, allow_partial: bool) -> None:
    """Check that adapters can be combined module by module.

    A different ``base_model_name_or_path`` is only a warning (the same base is often
    stored under two names); what decides is the shapes.

    Raises:
        AdapterError: different PEFT types, different module shapes (different base
            models), or different target modules without ``allow_partial``.
    """
    first = adapters[0]
    for other in adapters[1:]:
        if other.peft_type != first.peft_type:
            raise AdapterError(
                f"cannot combine a {first.peft_type} adapter ({_where(first)}) "
                f"with a {other.peft_type} adapter ({_where(other)})"
            )
        base_a = first.config.get("base_model_name_or_path")
        base_b = other.config.get("base_model_name_or_path")
        named = f" (made for {base_a!r} and {base_b!r})" if base_a and base_b and base_a != base_b else ""
        shared = first.modules.keys() & other.modules.keys()
        for name in sorted(shared):
            sa, sb = _shape(first.modules[name]), _shape(other.modules[name])
            if sa != sb:
                raise AdapterError(
                    f"module {name} has shape {sa} in {_where(first)} but {sb} in "
                    f"{_where(other)}: the adapters were trained on different base models{named}"
                )
        if named:  # only now is it true that the shapes agree
            warnings.warn(
                f"adapters name different base models ({base_a!r} vs {base_b!r}); "
                "continuing because their shapes agree",
                ExciseWarning,
                stacklevel=3,
            )
        if not allow_partial and first.modules.keys() != other.modules.keys():
            only_a = sorted(first.modules.keys() - other.modules.keys())
            only_b = sorted(other.modules.keys() - first.modules.keys())
            example = (only_a or only_b)[0]
            raise AdapterError(
                f"target modules differ: {len(only_a)} only in {_where(first)}, "
                f"{len(only_b)} only in {_where(other)} (e.g. {example}); "
                "pass --allow-partial to combine the shared modules and keep the rest"
            )


ModuleSink = Callable[[str, Module], None]


def apply_modulewise(
    adapters: Sequence[Adapter],
    kernel: Callable[[list[Module | None]], Module | None],
    *,
    allow_partial: bool,
    operation: str,
    params: dict[str, Any],
    on_module: ModuleSink | None = None,
) -> Adapter:
    """Run ``kernel`` on each module name, passing ``None`` where an input lacks it.

    Modules for which the kernel returns ``None`` are left out of the result. With
    ``on_module``, each result module is handed to it as soon as it is computed (from
    a worker thread, in completion order) instead of being kept: the returned adapter
    then carries the config and provenance but no modules (``excise ops`` writes the
    file this way, overlapping writing with computing).
    """
    check_compatible(adapters, allow_partial=allow_partial)
    names: dict[str, None] = {}
    for adapter in adapters:
        names.update(dict.fromkeys(adapter.modules))

    def run(name: str) -> Module | None:
        out = kernel([a.modules.get(name) for a in adapters])
        if out is None or on_module is None:
            return out
        on_module(name, out)
        return None

    workers = _workers(len(names))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outputs = list(pool.map(run, names))
    else:
        outputs = [run(name) for name in names]
    modules = {name: out for name, out in zip(names, outputs, strict=True) if out is not None}
    source = {
        "operation": operation,
        "params": params,
        "allow_partial": allow_partial,
        "inputs": [a.source for a in adapters],
        # What the inputs were trained on, carried forward so `excise eval` can check a result.
        TRAINING_DATA: carried_training_data(a.source for a in adapters),
    }
    return Adapter(adapters[0].peft_type, adapters[0].config, modules, source, adapters[0].dtype)


def _workers(n_modules: int) -> int:
    """Modules run in parallel threads (numpy releases the GIL in its kernels) when BLAS
    is single-threaded, as the CLI sets it; otherwise BLAS's own threads would compete."""
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        return 1
    return max(1, min(n_modules, os.cpu_count() or 1, 8))


def result_dtype(adapter: Adapter) -> type:
    """dtype in which an operator builds the result's LoRA factors.

    The result is written in the first input's dtype (:func:`~excise.pem.io.save_adapter`).
    When that is float32 — or bfloat16, written through float32 — and the input's
    factors are held in float32 (as read from a file), the result's ``B`` is built in
    float32 directly, each entry rounded once from its float64 value exactly as the
    cast on writing would. Otherwise (float64 factors in memory, float16 files) it
    stays float64 until the write.
    """
    written_via_f32 = adapter.dtype in ("float32", "bfloat16")
    held_in_f32 = all(
        m.B.dtype == np.float32 for m in adapter.modules.values() if isinstance(m, LowRankDelta)
    )
    return np.float32 if written_via_f32 and held_in_f32 else np.float64


def rank_in_dense(W: np.ndarray, like: Module) -> Module:
    """Wrap a dense result as the published code does: a LoRA of rank ``in``, ``A = I``."""
    if isinstance(like, RowDelta):
        return RowDelta(W, like.shape)
    n_in = W.shape[1]
    return LowRankDelta(W, np.eye(n_in, dtype=W.dtype), 1.0)  # B (out, in), A (in, in)


def _shape(m: Module) -> tuple[int, ...]:
    return m.shape


def _where(adapter: Adapter) -> str:
    return str(adapter.source.get("path", "<in memory>"))
