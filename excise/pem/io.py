"""PEFT adapter folders in and out — the only code that reads ``adapter_config.json``.

Reading folds ``lora_alpha``, rsLoRA, ``rank_pattern`` and ``alpha_pattern`` into
each module's scale exactly as PEFT's ``LoraLayer.update_layer`` does, so operators
see only :class:`~excise.pem.delta.LowRankDelta` / :class:`~excise.pem.delta.RowDelta`.
Weights are read with ``safe_open`` into numpy; a legacy ``adapter_model.bin`` only
with ``torch.load(weights_only=True)`` (never unpickling arbitrary objects). numpy has
no bfloat16, so bf16 files go through torch, imported only then.

Writing produces a folder that ``PeftModel.from_pretrained`` loads unchanged: every
module's scale is folded into ``B`` and its rank declared through ``rank_pattern`` /
``alpha_pattern`` (alpha = rank, so PEFT's scale is 1). The folder is filled beside
the target and renamed into place, so a failure never leaves a half-written output.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from safetensors import safe_open

from excise import __version__
from excise.errors import AdapterError, ConfigError, first_line
from excise.fsutil import recover_dir, replace_dir
from excise.pem.delta import Adapter, LowRankDelta, Module, RowDelta
from excise.pem.stream import NUMPY_DTYPES, SafetensorsWriter, header_entry_bound, read_header
from excise.provenance import (
    PROVENANCE_FILE,
    TRAINING_DATA,
    carried_training_data,
    recorded_training_data,
)

__all__ = [
    "ADAPTER_CONFIG",
    "DIGESTS",
    "PROVENANCE_FILE",
    "AdapterWriter",
    "atomic_output_dir",
    "carried_training_data",
    "check_digest",
    "check_finite_weights",
    "check_output_dir",
    "file_sha256",
    "load_adapter",
    "recorded_training_data",
    "save_adapter",
    "tensor_digest",
    "verified_digest",
]

ADAPTER_CONFIG = "adapter_config.json"
_SAFETENSORS = "adapter_model.safetensors"
_BIN = "adapter_model.bin"
_PREFIX = "base_model.model."
_SUPPORTED = ("LORA", "IA3", "PREFIX_TUNING")
# `<module>.lora_A.weight`, or `<module>.lora_A.<adapter name>.weight` as saved raw.
_LORA_KEY = re.compile(r"^(?P<name>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_IA3_KEY = re.compile(r"^(?P<name>.+)\.ia3_l(?:\.[^.]+)?$")


# ----------------------------------------------------------------------------- reading


def load_adapter(path: str | Path, *, checksum: bool = True, check_finite: bool = True) -> Adapter:
    """Read and validate a PEFT adapter folder (LoRA, (IA)³ or prefix tuning).

    Args:
        path: folder holding ``adapter_config.json`` and ``adapter_model.safetensors``
            (or a legacy ``adapter_model.bin``).
        checksum: record the weights file's SHA-256 in ``source["sha256"]``; without
            it the entry is ``None`` for the caller to fill (see :func:`file_sha256`).
        check_finite: reject NaN/Inf weights now; without it the caller must call
            :func:`check_finite_weights` before trusting a result (``excise ops`` does
            so beside the operator, in the background).

    Returns:
        The adapter, each module as its effective delta.

    Raises:
        AdapterError: missing folder or file, unreadable config or weights, an
            unsupported adapter type or tensor, ranks that disagree with the config,
            or NaN/Inf weights.
    """
    folder = Path(path)
    if not folder.exists():
        raise AdapterError(f"adapter folder not found: {folder}")
    if not folder.is_dir():
        raise AdapterError(f"{folder} is a file; expected a PEFT adapter folder")
    config = _read_config(folder)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in _SUPPORTED:
        raise AdapterError(
            f"{folder}: peft_type {config.get('peft_type')!r} is not supported "
            f"(supported: {', '.join(_SUPPORTED)})"
        )
    weights_file = _weights_file(folder)
    tensors, dtype = _read_tensors(weights_file)
    reader = {"LORA": _read_lora, "IA3": _read_ia3, "PREFIX_TUNING": _read_prefix}[peft_type]
    modules = reader(config, tensors, weights_file)
    if not modules:
        raise AdapterError(f"{weights_file}: holds no {peft_type} weights")
    source = {
        "path": str(folder.resolve()),
        "peft_type": peft_type,
        "weights": weights_file.name,
        "sha256": file_sha256(weights_file) if checksum else None,
        "dtype": dtype,
        TRAINING_DATA: recorded_training_data(folder),
    }
    adapter = Adapter(peft_type, config, modules, source, dtype)
    if check_finite:
        check_finite_weights(adapter)
    return adapter


def check_finite_weights(adapter: Adapter) -> None:
    """Reject an adapter with a NaN or infinite weight (one pass over the weights).

    Raises:
        AdapterError: naming the weights file and the first tensor that is not finite.
    """
    file = Path(adapter.source.get("path", ".")) / adapter.source.get("weights", "")
    for name, m in adapter.modules.items():
        keys = _tensor_names(adapter.peft_type, name)
        arrays = (m.A, m.B) if isinstance(m, LowRankDelta) else (m.rows,)
        for key, array in zip(keys, arrays, strict=True):
            if not _all_finite(array):
                raise AdapterError(f"{file}: tensor {key} contains NaN or Inf values")


def _all_finite(x: np.ndarray) -> bool:
    """Whether every entry is finite. One BLAS pass: ``x·x`` is finite unless an entry is
    NaN or ±Inf (which propagate) or the sum overflows, which the exact check then rules
    on. Half the time of ``np.isfinite(x).all()``, with no temporary."""
    flat = x.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is settled below
        fast = np.isfinite(np.dot(flat, flat))
    return bool(fast) or bool(np.isfinite(flat).all())


def _read_config(folder: Path) -> dict[str, Any]:
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG} (is this a PEFT adapter folder?)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: expected a JSON object")
    return config


def _weights_file(folder: Path) -> Path:
    """``adapter_model.safetensors``, else the legacy ``adapter_model.bin``."""
    for name in (_SAFETENSORS, _BIN):
        if (folder / name).is_file():
            return folder / name
    raise AdapterError(f"{folder}: no {_SAFETENSORS} or {_BIN}")


def _read_tensors(file: Path) -> tuple[dict[str, np.ndarray], str]:
    """The weights as numpy arrays (bf16 upcast to float32) and the file's dtype name."""
    if file.name == _BIN:
        return _read_bin(file)
    try:
        return _read_safetensors(file)
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{file}: corrupt or unreadable safetensors file ({first_line(e)})") from None


def _read_safetensors(file: Path) -> tuple[dict[str, np.ndarray], str]:
    with safe_open(str(file), framework="np") as f:  # parses and validates the header
        keys = list(f.keys())
        if not keys:
            raise AdapterError(f"{file}: holds no tensors")
        if any(f.get_slice(k).get_dtype() == "BF16" for k in keys):
            return _read_safetensors_bf16(file), "bfloat16"
        mapped = _map_tensors(file)
        tensors = {k: mapped[k] for k in keys} if mapped is not None else None
        if tensors is None:  # a dtype numpy cannot view, or a file that cannot be mapped
            tensors = {k: f.get_tensor(k) for k in keys}
    return tensors, str(tensors[keys[0]].dtype)


def _map_tensors(file: Path) -> dict[str, np.ndarray] | None:
    """The tensors as views of a private (copy-on-write) memory map of ``file``.

    Called after ``safe_open`` has validated the header and offsets. The arrays read
    the page cache directly instead of copying it, which is what loading costs most
    of (both inputs of a 7B LoRA Ext-Sub: 31 ms copying vs ~1 ms mapping); writes to
    them, should any code make one, stay private and never reach the file.
    Returns ``None`` when a dtype has no numpy view or the file cannot be mapped.
    """
    try:
        with file.open("rb") as f:
            view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        start, entries = read_header(view)
    except (OSError, ValueError):
        return None
    tensors = {}
    for key, info in entries.items():
        dtype = NUMPY_DTYPES.get(info["dtype"])
        if dtype is None:
            return None
        begin, end = info["data_offsets"]
        count = (end - begin) // np.dtype(dtype).itemsize
        try:
            array = np.frombuffer(view, dtype=dtype, count=count, offset=start + begin)
        except ValueError:  # e.g. an empty tensor at the very end of the file
            return None
        tensors[key] = array.reshape(info["shape"])
    return tensors


def _read_safetensors_bf16(file: Path) -> dict[str, np.ndarray]:
    import torch  # numpy has no bfloat16

    with safe_open(str(file), framework="pt") as f:
        return {k: _to_numpy(f.get_tensor(k), torch) for k in f.keys()}  # noqa: SIM118


def _read_bin(file: Path) -> tuple[dict[str, np.ndarray], str]:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or weights_only refusals
        raise AdapterError(f"{file}: unreadable or unsafe .bin file ({first_line(e)})") from None
    if (
        not state
        or not isinstance(state, dict)
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise AdapterError(f"{file}: expected a non-empty flat dict of tensors")
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    return {k: _to_numpy(v, torch) for k, v in state.items()}, dtype


def _to_numpy(t, torch) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _pattern_value(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``k`` with ``(.*\\.)?(k)$`` matching."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _lora_scale(config: dict[str, Any], name: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


# `init_lora_weights` values (PEFT 0.21.2, `LoraLayer.update_layer`) whose adapter is a
# plain delta s·BA on the unchanged base: the default (True), False, Gaussian, EVA and
# orthogonal init leave the base weights alone, and MiCA starts from A = 0, so B0·A0 = 0.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _check_init(config: dict[str, Any], file: Path) -> None:
    """Refuse a LoRA whose delta is not ``s·BA`` on the unchanged base.

    PiSSA (``pissa``, ``pissa_niter_<n>``), CorDA, OLoRA and LoRA-GA train on the base
    minus their initial ``s·B0A0``, so the adapter's delta on the real base is
    ``s·(BA − B0A0)``; PEFT reapplies the subtraction on load (from a fresh SVD for
    PiSSA/OLoRA; LoRA-GA's is lost), and a result that kept the init name would have it
    reapplied at the result's rank. LoftQ replaces the base weights by a quantised copy.
    """
    value = config.get("init_lora_weights", True)
    where = file.parent / ADAPTER_CONFIG
    name = value.lower() if isinstance(value, str) else None
    if value is True or value is False or name in _PLAIN_INITS:
        return
    if name == "loftq":
        raise AdapterError(
            f"{where}: init_lora_weights='loftq': PEFT swaps the base weights for a quantised copy when "
            "it loads this adapter, so it is no delta on the base; save the LoftQ base model, mark the "
            "adapter init_lora_weights=true as PEFT's LoftQ example does, and operate with that base"
        )
    if isinstance(value, str) and (value.startswith(("pissa", "corda")) or name in ("olora", "lora_ga")):
        raise AdapterError(
            f"{where}: init_lora_weights={value!r}: PEFT changes the base weights for this adapter, so its "
            "delta is s·(BA − B0A0), not s·BA; convert it to a plain LoRA with PEFT's "
            "save_pretrained(out, path_initial_model_for_weight_conversion=<the initial adapter's folder>) "
            "and use that"
        )
    raise AdapterError(
        f"{where}: init_lora_weights={value!r} is not a value PEFT 0.21 reads as a plain LoRA "
        f"(excise accepts {', '.join(map(repr, _PLAIN_INITS))}); convert the adapter with PEFT's "
        "path_initial_model_for_weight_conversion or set the value that matches how it was trained"
    )


def _read_lora(config: dict[str, Any], tensors: dict[str, np.ndarray], file: Path) -> dict[str, LowRankDelta]:
    if config.get("use_dora"):
        raise AdapterError(f"{file}: DoRA adapters (use_dora) are not supported")
    _check_init(config, file)
    if config.get("target_parameters"):
        # PEFT's ParamWrapper: on a fused (experts, …) tensor lora_A is (r·experts, in) and
        # lora_B (out, r·experts), one rank-r block per expert, so B·A is no delta of it.
        raise AdapterError(
            f"{file.parent / ADAPTER_CONFIG}: target_parameters {config['target_parameters']} (LoRA on "
            "parameters, e.g. fused MoE experts, whose rank is split per expert) is not supported; "
            "target modules (target_modules) instead, or merge the adapter and use --base"
        )
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key.removeprefix(_PREFIX))
        if match is None:
            raise AdapterError(
                f"{file}: tensor {key} is not supported (only LoRA on linear layers; "
                "DoRA, embedding LoRA, LoRA bias and modules_to_save are not)"
            )
        factors.setdefault(match["name"], {})[match["which"]] = tensor
    modules: dict[str, LowRankDelta] = {}
    for name, pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "B" not in pair else "lora_A"
            raise AdapterError(f"{file}: module {name} has no {missing} weight")
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise AdapterError(
                f"{file}: module {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                "which do not form B @ A"
            )
        rank = int(_pattern_value(config.get("rank_pattern"), name, config.get("r", 8)))
        if rank != A.shape[0]:
            raise AdapterError(
                f"{file}: module {name} has rank {A.shape[0]} but {ADAPTER_CONFIG} says r={rank}"
            )
        modules[name] = LowRankDelta(B, A, _lora_scale(config, name, rank))
    return modules


def _read_ia3(config: dict[str, Any], tensors: dict[str, np.ndarray], file: Path) -> dict[str, RowDelta]:
    modules: dict[str, RowDelta] = {}
    for key, tensor in tensors.items():
        match = _IA3_KEY.match(key.removeprefix(_PREFIX))
        if match is None:
            raise AdapterError(f"{file}: tensor {key} is not an (IA)³ vector (ia3_l)")
        # The operators act on l − 1, one vector per module (DESIGN.md §1).
        delta = tensor.astype(np.float64) - 1.0
        modules[match["name"]] = RowDelta(delta.reshape(1, -1), tuple(tensor.shape))
    return modules


def _read_prefix(config: dict[str, Any], tensors: dict[str, np.ndarray], file: Path) -> dict[str, RowDelta]:
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"{file}: expected one tensor prompt_embeddings, found {sorted(tensors)}")
    emb = tensors["prompt_embeddings"]
    try:
        tokens, layers, heads, dim = (
            int(config["num_virtual_tokens"]),
            int(config["num_layers"]),
            int(config["num_attention_heads"]),
            int(config["token_dim"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{file.parent / ADAPTER_CONFIG}: prefix-tuning config lacks {e}") from None
    if dim % heads or emb.shape != (tokens, layers * 2 * dim):
        raise AdapterError(
            f"{file}: prompt_embeddings has shape {tuple(emb.shape)}, expected "
            f"({tokens}, {layers * 2 * dim}) with token_dim divisible by num_attention_heads"
        )
    # One row per (virtual token, layer, key/value, head) vector, as the published code.
    rows = emb.reshape(-1, dim // heads)  # (tokens · layers · 2 · heads, head_dim)
    return {"prompt_embeddings": RowDelta(rows, tuple(emb.shape))}


# Digests for the provenance record of `excise ops` (see verified_digest).
DIGESTS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def file_sha256(file: str | Path) -> str:
    """SHA-256 of a file, hashed straight from a memory map (no copy; hashlib releases
    the GIL meanwhile)."""
    return _file_digest(Path(file), "sha256")


def _file_digest(file: Path, algorithm: str) -> str:
    digest = DIGESTS[algorithm]()
    with file.open("rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                digest.update(view)
    return digest.hexdigest()


def check_digest(algorithm: str) -> str:
    """``algorithm`` if it names one of :data:`DIGESTS`.

    Raises:
        ConfigError: an unknown algorithm.
    """
    if algorithm not in DIGESTS:
        raise ConfigError(f"unknown digest {algorithm!r}; choose one of {', '.join(DIGESTS)}")
    return algorithm


def verified_digest(file: str | Path, algorithm: str = "xxh3_128", *, adapter: Adapter | None = None) -> str:
    """Digest of a weights file (``xxh3_128`` or ``sha256``, hex), checking in the same
    pass that its weights are finite.

    For a safetensors file each tensor's bytes are hashed and then checked while they
    are still in cache — one pass over the file instead of two. Any other file is
    checked through its adapter — ``adapter`` when the caller has it loaded (read with
    ``check_finite=False``), else loaded here — and hashed separately. xxh3-128 runs at
    memory speed (~12 GB/s here, SHA-256 ~1.2 GB/s) and identifies a file as surely
    against accidental change; neither protects an unsigned record against tampering,
    since whoever can change the file can change the record.

    Raises:
        AdapterError: a floating-point tensor holds NaN or ±Inf.
        ConfigError: an unknown algorithm.
    """
    check_digest(algorithm)
    file = Path(file)
    if file.suffix != ".safetensors" or file.stat().st_size < 8:
        if adapter is None:
            load_adapter(file.parent, checksum=False)  # checks the weights
        else:
            check_finite_weights(adapter)
        return _file_digest(file, algorithm)
    with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        start, entries = read_header(view)
        ordered = sorted((*info["data_offsets"], key, info["dtype"]) for key, info in entries.items())
        digest = DIGESTS[algorithm]()
        with memoryview(view) as data:
            position = 0
            for begin, end, key, code in ordered:
                begin, end = start + begin, start + end
                digest.update(data[position:begin])  # header (and any gap)
                digest.update(data[begin:end])
                position = end
                if not _bytes_finite(data[begin:end], code):
                    raise AdapterError(f"{file}: tensor {key} contains NaN or Inf values")
            digest.update(data[position:])
    return digest.hexdigest()


def tensor_digest(file: str | Path, algorithm: str = "sha256") -> str:
    """Digest of a safetensors file's tensors alone (``sha256`` or ``xxh3_128``, hex).

    Each tensor's name, dtype code, shape and bytes, in name order, read from a memory map:
    not the header's ``__metadata__`` (a written adapter's carries its creation time and
    the operation that made it) nor where the tensors lie in the file, so two files that
    hold the same tensors have one digest, and a tensor that changes by one bit, dtype or
    shape changes it.

    Raises:
        ConfigError: an unknown algorithm.
        AdapterError: not a safetensors file ``safe_open`` can read.
    """
    check_digest(algorithm)
    file = Path(file)
    try:
        with safe_open(str(file), framework="numpy"):  # validates the header and the offsets
            pass
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"{file}: not a readable safetensors file ({first_line(exc)})") from exc
    digest = DIGESTS[algorithm]()
    with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        start, entries = read_header(view)
        with memoryview(view) as data:
            for name in sorted(entries):
                info = entries[name]
                begin, end = (start + offset for offset in info["data_offsets"])
                digest.update(json.dumps([name, info["dtype"], info["shape"], end - begin]).encode())
                digest.update(data[begin:end])
    return digest.hexdigest()


def _bytes_finite(raw: memoryview, code: str) -> bool:
    """Whether a tensor's little-endian bytes hold only finite values (non-floats: True)."""
    if code == "BF16":  # all exponent bits set: ±Inf or NaN
        bits = np.frombuffer(raw, dtype="<u2")
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    if not code.startswith("F"):
        return True
    return _all_finite(np.frombuffer(raw, dtype=NUMPY_DTYPES[code]))


# ----------------------------------------------------------------------------- writing


def check_output_dir(out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an existing, non-empty output folder unless ``overwrite``; call before work.

    Raises:
        ConfigError: the path is a file, or a non-empty folder and not ``overwrite``.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"output {out} exists and is a file")
        if any(out.iterdir()) and not overwrite:
            raise ConfigError(f"output folder {out} exists and is not empty (pass --overwrite to replace it)")
    return out


class atomic_output_dir:  # noqa: N801 (used as a context manager, reads like a function)
    """Context manager: yields a temp folder beside ``out``, renamed to ``out`` on success.

    On any exception the temp folder is removed and ``out`` is left as it was. An existing
    ``out`` is moved aside before the new one takes its place (:func:`excise.fsutil.replace_dir`),
    so a kill at any instant leaves the old or the new output complete; a swap a kill cut
    short is finished first (:func:`excise.fsutil.recover_dir`).
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False) -> None:
        recover_dir(out)
        self.out = check_output_dir(out, overwrite=overwrite)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        replace_dir(self.tmp, self.out)


def save_adapter(
    adapter: Adapter, out: str | Path, *, overwrite: bool = False, dtype: str | None = None
) -> Path:
    """Write an adapter as a PEFT folder that ``PeftModel.from_pretrained`` loads.

    Args:
        adapter: the adapter to write (float64 modules are cast here, module by module).
        out: target folder; created atomically.
        overwrite: replace a non-empty ``out``.
        dtype: weight dtype name (``float32``, ``float16``, ``bfloat16``…); defaults to
            the dtype of the first input adapter.

    Returns:
        ``out``.

    Raises:
        ConfigError: ``out`` exists and is not empty, and not ``overwrite``.
    """
    with AdapterWriter(
        out,
        adapter.peft_type,
        adapter.modules,
        dtype=dtype or adapter.dtype,
        overwrite=overwrite,
        metadata_bytes=2 * (len(json.dumps(adapter.source)) + 512),  # JSON-in-JSON escapes
    ) as writer:
        for name, module in adapter.modules.items():
            writer.write_module(name, module)
        writer.finish(adapter.config, adapter.source)
    return Path(out)


class AdapterWriter:
    """Write a PEFT folder module by module, from any number of threads, atomically.

    :func:`save_adapter` writes a finished adapter through it; ``excise ops`` hands it
    each module the moment an operator has computed it (``on_module``), so writing
    overlaps computing and the result is never held whole. The folder appears at
    ``out`` only after :meth:`finish` and a clean exit from the ``with`` block.

    Args:
        out: target folder.
        peft_type: ``"LORA"``, ``"IA3"`` or ``"PREFIX_TUNING"``.
        module_names: every module that may be written (bounds the header).
        dtype: weight dtype name of the file.
        overwrite: replace a non-empty ``out``.
        metadata_bytes: a bound on the provenance record's JSON size (a larger one
            costs one rewrite of the file, not an error).
    """

    def __init__(
        self,
        out: str | Path,
        peft_type: str,
        module_names: Iterable[str],
        *,
        dtype: str,
        overwrite: bool = False,
        metadata_bytes: int = 16_384,
    ) -> None:
        self.out, self.peft_type, self.dtype = Path(out), peft_type, dtype
        self._atomic = atomic_output_dir(out, overwrite=overwrite)
        ndim = 2 if peft_type == "LORA" else 4
        self._header_bytes = metadata_bytes + sum(
            header_entry_bound(key, ndim) for name in module_names for key in _tensor_names(peft_type, name)
        )
        self._shapes: dict[str, tuple[int, ...]] = {}  # module → shape of its delta (rank for LoRA)
        self._lock = threading.Lock()
        self._finished = False

    def __enter__(self) -> AdapterWriter:
        self.folder = self._atomic.__enter__()
        self._tensors = SafetensorsWriter(self.folder / _SAFETENSORS, self._header_bytes)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:
            self._tensors.__exit__(exc_type or RuntimeError, exc, tb)
            self._atomic.__exit__(exc_type or RuntimeError, exc, tb)  # removes the temp folder
            if exc_type is None:
                raise RuntimeError(f"AdapterWriter for {self.out}: finish() was not called; nothing written")
            return
        self._atomic.__exit__(exc_type, exc, tb)

    def write_module(self, name: str, module: Module) -> None:
        """Cast and write one module's tensors (thread-safe)."""
        if self.peft_type == "LORA":
            assert isinstance(module, LowRankDelta)
            module = module.folded()  # scale into B, so PEFT's scale must be exactly 1
            shape: tuple[int, ...] = (module.rank,)
        else:
            assert isinstance(module, RowDelta)
            shape = module.shape
        for key, array in _module_tensors(self.peft_type, name, module):
            data, code = _cast(array, self.dtype)
            self._tensors.add(key, data, dtype_code=code)
        with self._lock:
            self._shapes[name] = shape

    def finish(self, config: dict[str, Any], source: dict[str, Any]) -> None:
        """Write the header (with the provenance record), the config and ``excise.json``."""
        provenance = {
            "excise_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **source,
        }
        self._tensors.close({"format": "pt", "excise": json.dumps(provenance)})
        self._finished = True
        written = dict(sorted(self._shapes.items()))
        result_config = _result_config(self.peft_type, config, written)
        (self.folder / ADAPTER_CONFIG).write_text(json.dumps(result_config, indent=2, sort_keys=True) + "\n")
        (self.folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


def _tensor_names(peft_type: str, name: str) -> tuple[str, ...]:
    if peft_type == "LORA":
        return (f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight")
    if peft_type == "IA3":
        return (f"{_PREFIX}{name}.ia3_l",)
    return ("prompt_embeddings",)


def _module_tensors(peft_type: str, name: str, m: Module) -> list[tuple[str, np.ndarray]]:
    """The file's tensors for one module, under their PEFT names."""
    keys = _tensor_names(peft_type, name)
    if isinstance(m, LowRankDelta):
        return [(keys[0], m.A), (keys[1], m.B)]  # (r, in), (out, r)
    if peft_type == "IA3":
        return [(keys[0], m.tensor() + 1.0)]  # the operators act on l − 1
    return [(keys[0], m.tensor())]


def _cast(array: np.ndarray, dtype: str) -> tuple[np.ndarray, str | None]:
    """``array`` in the file's dtype, and the safetensors code when numpy has no such type."""
    if dtype != "bfloat16":
        target = np.dtype(dtype)
        return (array if array.dtype == target else array.astype(target)), None
    return _bfloat16_bits(np.asarray(array, dtype=np.float32)), "BF16"


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (``uint16``), rounding to nearest even as torch does."""
    bits = np.ascontiguousarray(x).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(x), np.uint32(0x7FC0), rounded).astype(np.uint16)


# The settings of the init methods, reset with init_lora_weights (PEFT's defaults).
_INIT_CONFIGS: dict[str, Any] = {
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
}


def _result_config(
    peft_type: str, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> dict[str, Any]:
    """The result's ``adapter_config.json``: the input's, made to describe what was written."""
    result = dict(config)
    result["inference_mode"] = True
    if peft_type == "LORA":
        ranks = {name: shape[0] for name, shape in shapes.items()}
        default = Counter(ranks.values()).most_common(1)[0][0] if ranks else int(config.get("r", 8))
        pattern = {name: r for name, r in ranks.items() if r != default}
        result.update(
            r=default,
            lora_alpha=default,  # alpha = r ⇒ scale 1; the real scale lives in B
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            use_rslora=False,
            use_dora=False,
            target_modules=sorted(ranks),  # exact names: the modules of the result, no more
            layers_to_transform=None,
            layers_pattern=None,
            exclude_modules=None,
            modules_to_save=None,
            # A plain LoRA: PEFT must not rerun a PiSSA/OLoRA/… init on the base at load
            # time (the inputs were checked to be plain deltas, see _check_init).
            init_lora_weights=True,
        )
        for key, default in _INIT_CONFIGS.items():
            if key in result:
                result[key] = default
    elif peft_type == "IA3":
        result.update(
            target_modules=sorted(shapes),
            # PEFT stores a feed-forward vector as (1, in), any other as (out, 1).
            feedforward_modules=sorted(n for n, s in shapes.items() if s[0] == 1 and len(s) == 2),
            modules_to_save=None,
        )
    return result
