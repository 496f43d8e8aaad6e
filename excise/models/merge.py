"""Fold a PEFT adapter into its base model and save a standalone checkpoint.

``W ← W + s·B·A`` for every adapted layer (PEFT's ``merge_and_unload``); the result
loads with plain ``AutoModelForCausalLM.from_pretrained`` and needs no PEFT.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from excise.errors import AdapterError, ConfigError
from excise.fsutil import recover_dir, replace_dir
from excise.models.adapter_fit import check_adapter_fits, loading_error_line, require_adapter_folder
from excise.models.loading import load_model, load_tokenizer, resolve_model
from excise.provenance import TRAINING_DATA, carried_training_data, recorded_training_data

__all__ = ["merge_adapter"]


def merge_adapter(
    base: str,
    adapter: Path,
    out: Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    training_data: list[dict[str, Any]] | None = None,
) -> Path:
    """Merge ``adapter`` into ``base`` and save model (safetensors) and tokenizer to ``out``.

    The checkpoint is written into a temporary folder beside ``out`` and renamed on
    success, so ``out`` is either absent, the old content, or the complete new model.

    Args:
        base: the base model spec (alias, ``.gguf`` file, local folder or hub id) the
            adapter was trained on.
        adapter: a PEFT adapter folder (``adapter_config.json`` + weights).
        out: the folder to write.
        overwrite: replace ``out`` if it already exists and is not empty.
        dtype: dtype the base is loaded and the merged model saved in.
        training_data: the adapter's training data records (``excise.data.recorded_training_data``),
            kept in ``excise_merge.json`` so ``excise eval`` can check the merged model too. The
            base's own records (a local base folder that was itself fine-tuned, merged or
            operated on) are added to them: the merged model was trained on both.

    Returns:
        ``out``.

    Raises:
        AdapterError: the adapter folder or its ``adapter_config.json`` is missing, or
            the adapter does not fit the base model.
        ConfigError: ``out`` exists and is not empty and ``overwrite`` is false, or is
            a file.
        ModelLoadError: the base model or tokenizer cannot be loaded.
    """
    adapter, out = require_adapter_folder(adapter), Path(out)
    recover_dir(out)  # a replacement a kill cut short is finished first
    if out.is_file():
        raise ConfigError(f"output {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out} is not empty; pass overwrite=True to replace it")

    check_adapter_fits(base, adapter)  # before loading, naming the module whose shapes differ
    from peft import PeftModel  # after the cheap checks: importing peft takes seconds

    model = load_model(base, dtype=dtype)
    tokenizer = load_tokenizer(base)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except (ValueError, KeyError, RuntimeError) as err:
        # Wrong target modules (ValueError) or shape mismatch (RuntimeError) mean the
        # adapter was trained on another architecture: a user error, not a bug.
        raise AdapterError(
            f"adapter {adapter} does not fit base {base!r}: {loading_error_line(err)}"
        ) from err
    merged = peft_model.merge_and_unload()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the result should read like any folder
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "base": base,
            "adapter": str(adapter.resolve()),
            "dtype": str(dtype),
            "training_data": carried_training_data(
                [{TRAINING_DATA: list(training_data or [])}, {TRAINING_DATA: _base_records(base)}]
            ),
        }
        (tmp / "excise_merge.json").write_text(json.dumps(provenance, indent=2) + "\n")
        replace_dir(tmp, out)  # the old output is moved aside, not deleted, until this one is in place
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _base_records(base: str) -> list[dict[str, Any]]:
    """The training data records a local base folder carries (none for a hub id or GGUF file)."""
    source = Path(resolve_model(base))
    return recorded_training_data(source) if source.is_dir() else []
