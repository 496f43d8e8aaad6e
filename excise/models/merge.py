"""Fold a PEFT adapter into its base model and save a standalone checkpoint.

``W ← W + s·B·A`` for every adapted layer (PEFT's ``merge_and_unload``); the result
loads with plain ``AutoModelForCausalLM.from_pretrained`` and needs no PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from excise.errors import AdapterError, ConfigError
from excise.models.adapter_fit import check_adapter_fits, loading_error_line, require_adapter_folder
from excise.models.loading import load_model, load_tokenizer

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
            kept in ``excise_merge.json`` so ``excise eval`` can check the merged model too.

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
            "training_data": list(training_data or []),
        }
        (tmp / "excise_merge.json").write_text(json.dumps(provenance, indent=2) + "\n")
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is moved aside first, then deleted."""
    if not dst.exists():
        os.rename(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / dst.name)
    try:
        os.rename(src, dst)
    except OSError:
        os.rename(old / dst.name, dst)  # put the old content back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
