"""The model under evaluation: a base model, optionally with a PEFT adapter, and its identity.

The base is loaded once (:func:`excise.models.load_model`); ``--adapter`` wraps it with
``PeftModel.from_pretrained``. ``merge=True`` folds a LoRA into the weights
(``merge_and_unload``): the forward pass then costs what the base costs, at the price of
losing the adapter-off view (metrics that need the base model's answers keep it unmerged).
``dtype="bfloat16"`` is the fast path for generation (docs/EVALUATION.md, "Faster generation").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from excise.data import file_sha256 as file_digest  # SHA-256 of a file's bytes
from excise.errors import AdapterError, ModelLoadError, first_line
from excise.models import load_model, load_tokenizer, resolve_model
from excise.models.adapter_fit import check_adapter_fits, loading_error_line, require_adapter_folder

__all__ = ["Subject", "adapter_identity", "file_digest", "load_subject", "model_identity", "pick_device"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class Subject:
    """A loaded model (PEFT-wrapped when it has an unmerged adapter) and its tokenizer."""

    model: Any
    tokenizer: Any
    spec: str
    adapter: Path | None
    merged: bool

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def base_only(self) -> Iterator[Any]:
        """The base model with the adapter switched off (PEFT's ``disable_adapter``)."""
        if self.adapter is None:
            yield self.model
            return
        if self.merged:
            raise AdapterError(
                "the adapter was merged into the weights; the base model is gone (drop --merge)"
            )
        with self.model.disable_adapter():
            yield self.model


def pick_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"unknown device {device!r}: {first_line(err)}") from err


def load_subject(
    model: str,
    adapter: Path | None = None,
    *,
    merge: bool = False,
    dtype: str = "float32",
    device: str = "auto",
) -> Subject:
    """Load the base model (and adapter) in eval mode, with a left-padding tokenizer.

    Raises:
        ModelLoadError: the base model cannot be loaded.
        AdapterError: the adapter folder is missing or does not fit the base model.
    """
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if adapter is not None:
        check_adapter_fits(model, adapter)  # before the slow load, naming the module that differs
    base = load_model(model, dtype=torch_dtype, device=pick_device(device))
    tokenizer = load_tokenizer(model, padding_side="left")
    if adapter is None:
        return Subject(base, tokenizer, model, None, merged=False)
    adapter = Path(adapter)
    from peft import PeftModel

    # PEFT keeps a LoRA in float32 on a bfloat16 base by default (autocast_adapter_dtype), so each
    # adapted layer casts to float32 and back: unmerged, that made bfloat16 generation slower than
    # float32 (benchmarks/bench_eval.py --sections speed). Unmerged, the LoRA takes the base's
    # dtype; to be merged, it stays float32, so that W + s·B·A is summed before one rounding.
    try:
        wrapped = PeftModel.from_pretrained(
            base, str(adapter), autocast_adapter_dtype=merge or torch_dtype == torch.float32
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise AdapterError(f"cannot apply adapter {adapter} to {model}: {loading_error_line(err)}") from err
    wrapped.eval()
    if merge:
        return Subject(wrapped.merge_and_unload().eval(), tokenizer, model, adapter, merged=True)
    return Subject(wrapped, tokenizer, model, adapter, merged=False)


def model_identity(spec: str) -> dict[str, Any]:
    """What identifies a model without loading it: its resolved source, the hash of its
    ``config.json`` and the size and mtime of each weight file (weights are large; a changed
    file changes its mtime). A hub id that is not local is identified by its name."""
    source = resolve_model(spec)
    folder = Path(source)
    if not folder.is_dir():
        return {"spec": spec, "source": source}
    files = {
        p.name: [p.stat().st_size, int(p.stat().st_mtime)]
        for p in sorted(folder.iterdir())
        if p.suffix in _WEIGHT_SUFFIXES
    }
    config = folder / "config.json"
    return {
        "spec": spec,
        "source": str(folder.resolve()),
        "config_sha256": file_digest(config) if config.is_file() else None,
        "weights": files,
    }


def adapter_identity(adapter: Path | None) -> dict[str, Any] | None:
    """Path and SHA-256 of each file of an adapter folder (config and weights)."""
    if adapter is None:
        return None
    adapter = require_adapter_folder(adapter)
    files = {p.name: file_digest(p) for p in sorted(adapter.iterdir()) if p.is_file()}
    return {"path": str(adapter.resolve()), "sha256": files}
