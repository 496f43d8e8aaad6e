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

__all__ = ["Operator", "apply_modulewise", "check_compatible", "check_finite", "rank_in_dense"]


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
        if base_a and base_b and base_a != base_b:
            warnings.warn(
                f"adapters name different base models ({base_a!r} vs {base_b!r}); "
                "continuing because their shapes agree",
                ExciseWarning,
                stacklevel=3,
            )
        shared = first.modules.keys() & other.modules.keys()
        for name in sorted(shared):
            sa, sb = _shape(first.modules[name]), _shape(other.modules[name])
            if sa != sb:
                raise AdapterError(
                    f"module {name} has shape {sa} in {_where(first)} but {sb} in "
                    f"{_where(other)}: the adapters were trained on different base models"
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


def apply_modulewise(
    adapters: Sequence[Adapter],
    kernel: Callable[[list[Module | None]], Module | None],
    *,
    allow_partial: bool,
    operation: str,
    params: dict[str, Any],
) -> Adapter:
    """Run ``kernel`` on each module name, passing ``None`` where an input lacks it.

    Modules for which the kernel returns ``None`` are left out of the result.
    """
    check_compatible(adapters, allow_partial=allow_partial)
    names: dict[str, None] = {}
    for adapter in adapters:
        names.update(dict.fromkeys(adapter.modules))
    inputs = [[a.modules.get(name) for a in adapters] for name in names]
    workers = _workers(len(inputs))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outputs = list(pool.map(kernel, inputs))
    else:
        outputs = [kernel(ms) for ms in inputs]
    modules = {name: out for name, out in zip(names, outputs, strict=True) if out is not None}
    source = {
        "operation": operation,
        "params": params,
        "allow_partial": allow_partial,
        "inputs": [a.source for a in adapters],
    }
    return Adapter(adapters[0].peft_type, adapters[0].config, modules, source, adapters[0].dtype)


def _workers(n_modules: int) -> int:
    """Modules run in parallel threads (numpy releases the GIL in its kernels) when BLAS
    is single-threaded, as the CLI sets it; otherwise BLAS's own threads would compete."""
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        return 1
    return max(1, min(n_modules, os.cpu_count() or 1, 8))


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
