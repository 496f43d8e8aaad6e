"""The operators on full fine-tunes, streamed: ``θ = θ_base + op(θ_1 − θ_base, …, θ_K − θ_base)``.

Ext-Sub (arXiv 2308.08090, DESIGN.md §1) and the other registry operators act on the
*task vectors* ``τ_k = θ_k − θ_base`` of full fine-tunes exactly as they act on LoRA
deltas: each tensor's task vector is wrapped as a :class:`~excise.pem.delta.RowDelta`
and handed to the operator's own per-module kernel (``_ext_sub_module``, …). Rows are
what DESIGN.md §1 projects, output neurons, as on the LoRA path (``B·A`` is
``(out, in)`` whatever the layer stores): a linear weight's rows; the columns of a
GPT-2-style ``Conv1D`` weight, stored ``(in, out)``; each expert's output rows of a fused
3-D MoE tensor, ``(experts, out, in)`` or, for the models that store it transposed,
``(experts, in, out)``; a 1-D tensor as one row; any other tensor (convolution kernels)
as ``(shape[0], -1)``. SKU's knowledge negation ``θo − λ(θh − θo)`` (arXiv 2402.10058,
DESIGN.md §2) is ``negate`` here.

Nothing holds a whole model: tensors are read by name through a name → shard index
with ``safe_open`` (a ``.bin`` shard only through ``torch.load(weights_only=True)``),
one shard open per model, in row blocks, and the result is written shard by shard in
the base's layout. Every operator is row-local, so a block of rows gives the same
result as the whole tensor; peak memory is one output shard plus a few blocks. Each
tensor is written in the widest dtype among the inputs' (a bf16 base and fp32
fine-tunes give fp32: the base's bf16 would round small edits away), or in the
requested one, with a warning saying which share of the changed weights it loses.

The kernels compute on numpy float64 blocks, like every operator; torch is imported
only when this runs, because full models are mostly bf16 (which numpy lacks) and
legacy ``.bin`` shards need ``torch.load``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open

from excise import __version__
from excise.errors import ConfigError, ExciseWarning, ModelLoadError, first_line
from excise.pem.delta import Module, RowDelta
from excise.pem.io import (
    PROVENANCE_FILE,
    TRAINING_DATA,
    atomic_output_dir,
    carried_training_data,
    check_output_dir,
    file_sha256,
    recorded_training_data,
)
from excise.pem.ops.add import _add_module
from excise.pem.ops.base import check_finite
from excise.pem.ops.compose import _compose_module, _lams
from excise.pem.ops.ext_sub import _ext_sub_module
from excise.pem.ops.scale import _scale_module

if TYPE_CHECKING:
    import torch

__all__ = ["apply_full"]

# Rows per block are chosen so that one float64 block stays near 32 MiB.
_BLOCK_ELEMENTS = 1 << 22
_ST_INDEX, _ST_SINGLE = "model.safetensors.index.json", "model.safetensors"
_BIN_INDEX, _BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
# Files of a model folder that are not copied into the output: weights in any format
# (they would contradict the result), indexes, and documents about another model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_NOT_COPIED = (PROVENANCE_FILE, "README.md")
# The dtypes computed on (safetensors code → torch name). Other floating dtypes (float8…)
# are refused; integer and bool buffers are copied from the base.
_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_DTYPE_ALIASES = {
    "fp64": "float64",
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "half": "float16",
}
# dtype → the dtypes whose every value it holds exactly.
_HOLDS = {
    "float64": {"float64", "float32", "float16", "bfloat16"},
    "float32": {"float32", "float16", "bfloat16"},
    "float16": {"float16"},
    "bfloat16": {"bfloat16"},
}
_REQUIRED = object()

# Weights stored (in, out), i.e. transposed against nn.Linear: transformers' `Conv1D`
# (transformers 5.24: GPT-2, OpenAI GPT, ImageGPT, Decision Transformer, CLVP's MLP).
# model_type → the modules that are Conv1D.
_GPT2_CONV1D = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
_CONV1D_MODULES = {
    "gpt2": _GPT2_CONV1D,
    "openai-gpt": _GPT2_CONV1D,
    "imagegpt": _GPT2_CONV1D,
    "decision_transformer": _GPT2_CONV1D,
    "clvp": frozenset({"c_fc", "c_proj"}),
    "clvp_decoder": frozenset({"c_fc", "c_proj"}),
}
# Fused MoE expert tensors: 3-D, one (out, in) matrix per expert, as transformers'
# `use_experts_implementation` stores them, except the models it marks `is_transposed`
# (and Llama 4, whose experts multiply `x @ W`): (experts, in, out).
_EXPERTS = re.compile(r"(^|\.)experts\.|(^|\.)(input|output)_linear\.weight$")
_TRANSPOSED_EXPERTS = {"gpt_oss", "aria", "aria_text", "openai_privacy_filter", "llama4", "llama4_text"}


# ----------------------------------------------------------------------------- operations


def _number(name: str) -> Callable[[Any, int], float]:
    def check(value: Any, n_models: int) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return check_finite(name, value)

    return check


def _lams_param(value: Any, n_models: int) -> list[float]:
    values = [value] if isinstance(value, int | float) else value
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(f"lams must be a number or a list of numbers, got {value!r}")
    return _lams(list(values), n_models - 1)


def _flag(value: Any, n_models: int) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"sequential must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class _FullOperation:
    """How one registry operator runs on full fine-tunes.

    Attributes:
        roles: what each fine-tuned model is, in order; with ``variadic`` the last
            role repeats (compose's anti-experts).
        variadic: accept any number of models ≥ ``len(roles)``.
        params: parameter name → (default or ``_REQUIRED``, check(value, n_models)).
        kernel: the operator's per-module kernel on the task vectors' rows.
    """

    roles: tuple[str, ...]
    variadic: bool
    params: dict[str, tuple[Any, Callable[[Any, int], Any]]]
    kernel: Callable[[list[RowDelta], dict[str, Any]], Module | None]


# name → kernel adapter; the names and defaults are those of excise.pem.ops.OPERATORS.
_OPERATIONS: dict[str, _FullOperation] = {
    "ext_sub": _FullOperation(
        ("expert", "anti-expert"),
        False,
        {"lam": (1.0, _number("lam"))},
        lambda t, p: _ext_sub_module(t[0], t[1], p["lam"]),
    ),
    "compose": _FullOperation(
        ("expert", "anti-expert"),
        True,
        {"lams": (1.0, _lams_param), "sequential": (False, _flag)},
        lambda t, p: _compose_module(t, p["lams"], p["sequential"]),
    ),
    "subtract": _FullOperation(
        ("a", "b"),
        False,
        {"lam": (1.0, _number("lam"))},
        lambda t, p: _add_module(t[0], t[1], -p["lam"]),
    ),
    "add": _FullOperation(
        ("a", "b"),
        False,
        {"weight": (1.0, _number("weight"))},
        lambda t, p: _add_module(t[0], t[1], p["weight"]),
    ),
    "scale": _FullOperation(
        ("fine-tune",),
        False,
        {"weight": (_REQUIRED, _number("weight"))},
        lambda t, p: _scale_module(t[0], p["weight"]),
    ),
    "negate": _FullOperation(
        ("fine-tune",),
        False,
        {"lam": (1.0, _number("lam"))},
        lambda t, p: _scale_module(t[0], -p["lam"]),  # SKU: θo − λ(θh − θo)
    ),
}


def _resolve(operation: str, n_models: int, params: dict[str, Any]) -> tuple[str, _FullOperation, dict]:
    name = operation.replace("-", "_")
    spec = _OPERATIONS.get(name)
    if spec is None:
        raise ConfigError(f"unknown operator {operation!r}; choose one of {', '.join(_OPERATIONS)}")
    n_roles = len(spec.roles)
    if n_models < n_roles or (n_models > n_roles and not spec.variadic):
        need = f"at least {n_roles}" if spec.variadic else str(n_roles)
        roles = ", ".join(spec.roles) + (", …" if spec.variadic else "")
        raise ConfigError(
            f"{name} needs {need} fine-tuned model(s) besides the base ({roles}), got {n_models}"
        )
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ConfigError(f"{name} takes {', '.join(spec.params)}; unknown parameter(s) {', '.join(unknown)}")
    resolved = {}
    for key, (default, check) in spec.params.items():
        if key not in params and default is _REQUIRED:
            raise ConfigError(f"{name} needs the parameter {key}")
        resolved[key] = check(params.get(key, default), n_models)
    return name, spec, resolved


def _role(spec: _FullOperation, i: int, n_models: int) -> str:
    if spec.variadic and i >= len(spec.roles) - 1 and n_models > len(spec.roles):
        return f"{spec.roles[-1]} {i - len(spec.roles) + 2}"
    return spec.roles[i]


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str | None  # torch dtype name computed on; None: a buffer copied from the base as is


@dataclass(frozen=True)
class _Layout:
    """Where a tensor's rows (output neurons) lie: ``groups × rows`` rows of ``dim`` values.

    ``groups`` is the number of experts of a fused MoE tensor (else 1); ``transposed``
    says the file stores each group as ``(dim, rows)`` (``Conv1D``, transposed experts).
    """

    groups: int
    rows: int
    dim: int
    transposed: bool = False
    whole: bool = False  # 0-D / 1-D: read whole, one row

    def index(self, group: int, start: int, stop: int) -> tuple[slice, ...]:
        """The slice of the stored tensor that holds rows ``start:stop`` of ``group``."""
        rows = slice(start, stop)
        lead = (slice(group, group + 1),) if self.groups > 1 else ()
        return (*lead, slice(None), rows) if self.transposed else (*lead, rows)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (stored shape) as ``(groups, rows, dim)``; a view, so writes reach ``t``."""
        if self.whole or not (self.transposed or self.groups > 1):
            return t.view(self.groups, self.rows, self.dim)
        if self.groups > 1:
            return t.transpose(1, 2) if self.transposed else t  # (experts, out, in)
        return t.t().unsqueeze(0)  # (1, out, in)


def _layout(name: str, shape: tuple[int, ...], model_type: str | None, base: Path) -> _Layout:
    """How tensor ``name`` of a ``model_type`` model splits into output rows."""
    if len(shape) < 2:
        return _Layout(1, 1, math.prod(shape), whole=True)
    module, _, leaf = name.rpartition(".")
    if (
        len(shape) == 2
        and leaf == "weight"
        and module.rpartition(".")[2] in _CONV1D_MODULES.get(model_type, ())
    ):
        return _Layout(1, shape[1], shape[0], transposed=True)  # Conv1D: (in, out)
    if len(shape) == 3 and _EXPERTS.search(name):
        if model_type is None:
            raise ModelLoadError(
                f"tensor {name} {shape} looks like fused MoE experts, but the base {base} has no config.json "
                "model_type to tell (experts, out, in) from (experts, in, out); add the base's config.json"
            )
        if model_type in _TRANSPOSED_EXPERTS:
            return _Layout(shape[0], shape[2], shape[1], transposed=True)
        return _Layout(shape[0], shape[1], shape[2])
    return _Layout(1, shape[0], math.prod(shape[1:]))  # linear (out, in); conv (out, in, *kernel)


def _model_type(folder: Path) -> str | None:
    """``model_type`` from a model folder's ``config.json`` (None without one)."""
    try:
        value = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class _Weights:
    """A model folder's tensors, read lazily by name; at most one shard open at a time."""

    def __init__(self, folder: Path, role: str) -> None:
        self.folder, self.role = folder, role
        if not folder.exists():
            raise ModelLoadError(f"{role} model folder not found: {folder}")
        if not folder.is_dir():
            raise ModelLoadError(f"{role} model {folder} is a file; expected a folder from save_pretrained")
        self.fingerprint, shards = self._layout()
        self.tensors: dict[str, _TensorInfo] = {}
        for shard, names in shards.items():
            header = self._header(shard)
            for name in header if names is None else names:
                if name not in header:
                    raise ModelLoadError(
                        f"{self.fingerprint}: lists tensor {name} in {shard.name}, which lacks it "
                        "(incomplete download? fetch the model again)"
                    )
                self.tensors[name] = header[name]
        self.shards = list(shards)
        self._open: tuple[Path, Any] | None = None

    def _layout(self) -> tuple[Path, dict[Path, list[str] | None]]:
        """The file to fingerprint, and each shard with the names it holds (None: all)."""
        for index_name, single in ((_ST_INDEX, _ST_SINGLE), (_BIN_INDEX, _BIN_SINGLE)):
            if (self.folder / index_name).is_file():
                return self.folder / index_name, self._read_index(self.folder / index_name)
            if (self.folder / single).is_file():
                return self.folder / single, {self.folder / single: None}
        adapter = (self.folder / "adapter_config.json").is_file()
        hint = " (a PEFT adapter: run the operator on adapters, without --base)" if adapter else ""
        raise ModelLoadError(
            f"{self.role} model {self.folder}: no {_ST_SINGLE}, {_ST_INDEX}, {_BIN_SINGLE} or {_BIN_INDEX}"
            f"{hint}; save the full model with save_pretrained"
        )

    def _read_index(self, index: Path) -> dict[Path, list[str] | None]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ModelLoadError(
                f"{index}: not a valid shard index (needs a weight_map: name → file)"
            ) from None
        shards: dict[Path, list[str] | None] = {}
        for name, file in sorted(weight_map.items(), key=lambda kv: (kv[1], kv[0])):
            shard = self.folder / file
            if shard not in shards:
                if not shard.is_file():
                    raise ModelLoadError(f"{index}: shard {file} is missing (incomplete download? fetch it)")
                shards[shard] = []
            shards[shard].append(name)  # type: ignore[union-attr]
        return shards

    def _header(self, shard: Path) -> dict[str, _TensorInfo]:
        """Names, shapes and dtypes of one shard, without reading its data."""
        if shard.suffix == ".safetensors":
            with self._reading(shard):
                f = safe_open(str(shard), framework="pt")
                slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (no __iter__)
                infos = {}
                for name, s in slices.items():
                    code = s.get_dtype()
                    dtype = _FLOAT_DTYPES.get(code, code)
                    floating = code.startswith(("F", "BF", "C"))
                    infos[name] = _TensorInfo(
                        shard, tuple(s.get_shape()), _compute_dtype(shard, name, dtype, floating)
                    )
                return infos
        infos = {}
        for name, t in self._load_bin(shard).items():
            dtype, floating = str(t.dtype).removeprefix("torch."), t.is_floating_point() or t.is_complex()
            infos[name] = _TensorInfo(shard, tuple(t.shape), _compute_dtype(shard, name, dtype, floating))
        return infos

    def _load_bin(self, shard: Path) -> dict[str, torch.Tensor]:
        import torch

        with self._reading(shard):
            try:  # mmap keeps the shard on disk; files saved before torch 1.6 cannot be mapped
                state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(shard, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelLoadError(f"{shard}: expected a flat dict of tensors")
        return state

    @contextmanager
    def _reading(self, shard: Path, name: str | None = None) -> Iterator[None]:
        """Turn any failure to read a shard into a one-line :class:`ModelLoadError`."""
        try:
            yield
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors, zip and pickle each raise their own types
            what = f"tensor {name} of " if name else ""
            raise ModelLoadError(
                f"cannot read {what}the {self.role} model file {shard}, corrupt or unreadable "
                f"({first_line(e)}): fetch it again"
            ) from None

    def _handle(self, shard: Path) -> Any:
        if self._open is None or self._open[0] != shard:
            self._open = None  # drop the previous shard (and its mapping) before opening the next
            if shard.suffix == ".safetensors":
                with self._reading(shard):
                    self._open = (shard, safe_open(str(shard), framework="pt"))
            else:
                self._open = (shard, self._load_bin(shard))
        return self._open[1]

    def rows(self, name: str, layout: _Layout, group: int, start: int, stop: int) -> np.ndarray:
        """Output rows ``start:stop`` of ``group`` of tensor ``name``, ``(stop - start, dim)`` float64."""
        import torch

        info = self.tensors[name]
        handle = self._handle(info.file)
        with self._reading(info.file, name):
            if layout.whole:
                t = handle[name] if isinstance(handle, dict) else handle.get_tensor(name)
            else:
                index = layout.index(group, start, stop)
                t = handle[name][index] if isinstance(handle, dict) else handle.get_slice(name)[index]
            if layout.transposed:
                t = t.transpose(-1, -2)  # (…, rows, dim)
            # A fresh float64 copy: the kernels then never touch a mapped file.
            t64 = t.to(torch.float64, copy=True).reshape(-1, layout.dim)  # (stop - start, dim)
        rows = t64.numpy()
        if not np.isfinite(rows).all():
            raise ModelLoadError(f"{info.file}: tensor {name} of the {self.role} contains NaN or Inf values")
        return rows

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` in its own dtype."""
        info = self.tensors[name]
        handle = self._handle(info.file)
        with self._reading(info.file, name):
            return handle[name].clone() if isinstance(handle, dict) else handle.get_tensor(name)

    def release(self) -> None:
        self._open = None

    def provenance(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "path": str(self.folder.resolve()),
            "hashed": self.fingerprint.name,
            "sha256": file_sha256(self.fingerprint),
            TRAINING_DATA: recorded_training_data(self.folder),
        }


def _compute_dtype(shard: Path, name: str, dtype: str, floating: bool) -> str | None:
    """``dtype`` if excise computes on it; None for integer buffers, copied as they are."""
    if dtype in _FLOAT_DTYPES.values():
        return dtype
    if floating:
        raise ModelLoadError(
            f"{shard}: tensor {name} is {dtype}, not bf16/fp16/fp32/fp64 (a quantised checkpoint?); "
            "dequantise the model first"
        )
    return None


def _integer_buffer(base: _Weights, models: list[_Weights], name: str) -> torch.Tensor:
    """An integer tensor, copied from the base; refused where it holds quantised weights.

    int64 buffers (step counters, position ids) may differ after fine-tuning and are kept
    from the base. A narrower integer tensor that differs (MXFP4 blocks, GPTQ ``qweight``,
    bitsandbytes ``uint8``) is a quantised weight: copying the base's would silently drop
    the fine-tune's edit, so it is refused.
    """
    import torch

    value = base.tensor(name)
    if value.dtype in (torch.int64, torch.bool):
        return value
    for m in models:
        if name in m.tensors and not torch.equal(m.tensor(name), value):
            raise ModelLoadError(
                f"tensor {name} ({str(value.dtype).removeprefix('torch.')}) differs between the base "
                f"{base.folder} and the {m.role} {m.folder}: a quantised weight excise cannot edit exactly; "
                "dequantise the models (e.g. save them in bf16 or fp32) and run again"
            )
    return value


def _check_compatible(base: _Weights, models: list[_Weights]) -> None:
    """Same tensors, same shapes: checked on the headers, before any data is read."""
    for m in models:
        for name, info in base.tensors.items():
            if info.dtype is None:
                continue  # integer buffers are copied from the base
            other = m.tensors.get(name)
            if other is None:
                raise ModelLoadError(
                    f"tensor {name} of the base {base.folder} is missing from the {m.role} {m.folder}: "
                    "use the base it was fine-tuned from (same architecture, same tied embeddings)"
                )
            if other.dtype is None:
                raise ModelLoadError(f"{other.file}: tensor {name} is not floating point as in the base")
            if other.shape != info.shape:
                raise ModelLoadError(
                    f"tensor {name} has shape {info.shape} in the base {base.folder} but {other.shape} "
                    f"in the {m.role} {m.folder}: it is a fine-tune of another base model"
                )
        extra = sorted(m.tensors.keys() - base.tensors.keys())
        if extra:
            raise ModelLoadError(
                f"the {m.role} {m.folder} has {len(extra)} tensor(s) that the base {base.folder} lacks "
                f"(e.g. {extra[0]}): use the base it was fine-tuned from (an untied lm_head shows up here)"
            )


# ----------------------------------------------------------------------------- computing


@dataclass
class _Rounding:
    """Changed weights, and those a narrower output dtype rounds back to the base's value."""

    changed: int = 0
    lost: int = 0
    tensors: int = 0  # tensors with a loss


def _check_dtype(dtype: str | None) -> str | None:
    """A floating dtype name (``float32``, ``bf16``…) in torch's spelling.

    Raises:
        ConfigError: anything else.
    """
    if dtype is None:
        return None
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in _HOLDS:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(_HOLDS)}")
    return name


def _widest(dtypes: Sequence[str]) -> str:
    """The narrowest dtype that holds every value of each of ``dtypes`` (bf16 + fp16 → fp32)."""
    return next(d for d in ("bfloat16", "float16", "float32", "float64") if set(dtypes) <= _HOLDS[d])


def _combine_tensor(
    name: str,
    base: _Weights,
    models: list[_Weights],
    spec: _FullOperation,
    params: dict[str, Any],
    *,
    layout: _Layout | None,
    dtype: str | None,
    rounding: _Rounding,
) -> torch.Tensor:
    """One tensor of the result, ``θ_base + op(τ_1, …, τ_K)``.

    Written in ``dtype``, else in the widest of the inputs' dtypes. With ``dtype``,
    counts in ``rounding`` the weights the operation changed and those the cast rounds
    back to the base's value (possible only where ``dtype`` is narrower than an input).
    """
    import torch

    info = base.tensors[name]
    if info.dtype is None:
        return _integer_buffer(base, models, name)
    if layout is None or math.prod(info.shape) == 0:
        return base.tensor(name)  # nothing to compute
    widest = _widest([info.dtype, *(m.tensors[name].dtype for m in models)])
    out_dtype = dtype or widest
    narrowed = widest not in _HOLDS[out_dtype]  # only then can an edit round away
    out = torch.empty(info.shape, dtype=getattr(torch, out_dtype))
    out_rows = layout.view(out)  # (groups, rows, dim)
    step = max(1, _BLOCK_ELEMENTS // layout.dim)
    lost_before = rounding.lost
    for group in range(layout.groups):
        for start in range(0, layout.rows, step):
            stop = min(layout.rows, start + step)
            theta0 = base.rows(name, layout, group, start, stop)  # (block, dim)
            taus = []
            for m in models:
                tau = m.rows(name, layout, group, start, stop)  # (block, dim)
                tau -= theta0
                taus.append(RowDelta(tau, tau.shape))
            delta = spec.kernel(taus, params)
            assert isinstance(delta, RowDelta), "kernels return dense rows for dense inputs"
            exact = theta0 + delta.rows  # (block, dim)
            block = torch.from_numpy(exact).to(out.dtype)  # (block, dim)
            if not torch.isfinite(block).all():
                raise ConfigError(
                    f"tensor {name}: the result overflows {out_dtype}; "
                    "use a smaller weight or a wider --dtype"
                )
            if dtype is not None:  # a requested dtype: measure what it loses
                changed = exact != theta0
                rounding.changed += int(changed.sum())
                if narrowed:
                    kept = torch.from_numpy(theta0).to(out.dtype).double().numpy()  # the base, as written
                    rounding.lost += int((changed & (block.double().numpy() == kept)).sum())
            out_rows[group, start:stop] = block
    rounding.tensors += rounding.lost > lost_before
    return out


def _warn_rounding(rounding: _Rounding, dtype: str) -> None:
    if rounding.lost:
        warnings.warn(
            f"writing in {dtype} rounds {rounding.lost} of {rounding.changed} changed weights "
            f"({rounding.lost / rounding.changed:.2%}, in {rounding.tensors} tensor(s)) back to the base's "
            "values; the inputs hold them: drop --dtype to write in the inputs' widest dtype",
            ExciseWarning,
            stacklevel=3,
        )


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [_ST_SINGLE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _copy_side_files(sources: list[Path], tmp: Path) -> None:
    """Config, tokenizer, chat template…: the base's, overlaid with the first fine-tune's."""
    for folder in sources:
        for f in sorted(folder.iterdir()):
            if (
                f.is_file()
                and not f.name.startswith(".")
                and not f.name.endswith((*_WEIGHT_SUFFIXES, ".index.json"))
                and f.name not in _NOT_COPIED
            ):
                shutil.copyfile(f, tmp / f.name)


def apply_full(
    operation: str,
    base: str | Path,
    models: Sequence[str | Path],
    out: str | Path,
    *,
    params: dict[str, Any] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Apply a registry operator to full fine-tunes: ``θ_base + op(θ_1 − θ_base, …)``.

    Streams tensor by tensor in row blocks; holds one output shard plus a few blocks.

    Args:
        operation: ``ext_sub`` (models: expert, anti-expert; params ``lam``),
            ``compose`` (expert, anti-experts…; ``lams``, ``sequential``), ``subtract``
            (a, b; ``lam``), ``add`` (a, b; ``weight``), ``scale`` (one; ``weight``) or
            ``negate`` (one; ``lam``: SKU's ``θo − λ(θh − θo)``). ``-`` may stand for ``_``.
        base: folder of the base model θ_base: ``model.safetensors``, a sharded
            ``model.safetensors.index.json``, or the ``pytorch_model.bin`` equivalents.
        models: folders of the fine-tuned models, same architecture as ``base``.
        out: output folder: the result in the base's shard layout (safetensors), the
            base's config and tokenizer files overlaid with the first model's, and
            ``excise.json`` provenance. Written atomically.
        params: the operator's parameters; missing ones take the registry defaults.
        dtype: the dtype of every floating tensor written (``float32``, ``bfloat16``,
            ``float16``, ``float64``; ``fp32``, ``bf16``… accepted). Default: per tensor,
            the narrowest dtype that holds every input's (bf16 base + fp32 fine-tunes
            → fp32). A ``dtype`` that rounds changed weights back to the base's values
            warns with their share (:class:`~excise.errors.ExciseWarning`).
        overwrite: replace a non-empty ``out``.
        progress: show a progress bar over tensors.

    Returns:
        ``out``.

    Raises:
        ConfigError: unknown operator or dtype, wrong number of models, bad or
            non-finite parameter, ``out`` not empty (without ``overwrite``) or one of
            the inputs, a result that overflows the output dtype.
        ModelLoadError: a folder or weights file missing, corrupt or unreadable; a
            tensor missing, extra or of another shape in a fine-tune; NaN/Inf weights;
            a fused MoE tensor in a base without ``config.json``.
    """
    name, spec, params = _resolve(operation, len(models), dict(params or {}))
    dtype = _check_dtype(dtype)
    out = check_output_dir(out, overwrite=overwrite)
    inputs = [Path(base), *(Path(m) for m in models)]
    if any(out.resolve() == p.resolve() for p in inputs):
        raise ConfigError(f"output {out} is one of the input models; write the result elsewhere")
    theta0 = _Weights(inputs[0], "base")
    thetas = [_Weights(p, _role(spec, i, len(models))) for i, p in enumerate(inputs[1:])]
    _check_compatible(theta0, thetas)
    model_type = _model_type(inputs[0])
    layouts = {n: _layout(n, i.shape, model_type, inputs[0]) for n, i in theta0.tensors.items() if i.dtype}

    # Not at module level: `excise ops` on adapters never pays for torch or tqdm.
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    sources = [m.provenance() for m in thetas]  # hashes each fine-tune once
    base_source = theta0.provenance()
    provenance = {
        "excise_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "operation": name,
        "mode": "full",
        "params": params,
        "dtype": dtype or "widest input",
        "base": base_source,
        "inputs": sources,
        # θ_base's own records too: every θ_k is θ_base plus its fine-tuning, so a base that was
        # itself fine-tuned (or merged) on some prompts passes them on to the result.
        TRAINING_DATA: carried_training_data([base_source, *sources]),
    }
    metadata = {"format": "pt", "excise": json.dumps(provenance)}
    weight_map: dict[str, str] = {}
    total_size = 0
    rounding = _Rounding()
    with (
        atomic_output_dir(out, overwrite=overwrite) as tmp,
        tqdm(total=len(theta0.tensors), desc=name, unit="tensor", disable=not progress) as bar,
    ):
        for shard, out_name in zip(theta0.shards, _shard_names(len(theta0.shards)), strict=True):
            result = {}
            for tensor_name in (n for n, info in theta0.tensors.items() if info.file == shard):
                result[tensor_name] = _combine_tensor(
                    tensor_name,
                    theta0,
                    thetas,
                    spec,
                    params,
                    layout=layouts.get(tensor_name),  # None for integer buffers
                    dtype=dtype,
                    rounding=rounding,
                )
                bar.update()
            save_file(result, str(tmp / out_name), metadata=metadata)
            weight_map.update(dict.fromkeys(result, out_name))
            total_size += sum(t.numel() * t.element_size() for t in result.values())
            del result  # one output shard in memory at a time
            for w in (theta0, *thetas):
                w.release()
        if len(theta0.shards) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / _ST_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _copy_side_files(inputs[:2], tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    if dtype is not None:
        _warn_rounding(rounding, dtype)
    return out
