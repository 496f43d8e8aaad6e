"""Result cache: a repeated evaluation with the same inputs is read back instead of recomputed.

Generations are cached on their own, under ``$EXCISE_CACHE/generations``, keyed by what makes
them (model, adapter, prompts, generation settings) and not by the judge: switching ``--judge``
re-scores saved answers, and the base model's answers (``utility``) are made once for all adapters.

A result is keyed by the SHA-256 of (metric, model identity, adapter file hashes, data file hash,
every setting, the judge by content — its spec and the digest of its files,
:func:`~excise.evaluate.judges.registry.judge_identity` — excise version) and stored as ``<key>.json`` under
``$EXCISE_CACHE/eval`` (default ``~/.cache/excise/eval``). Writes are atomic (temp file + rename),
so a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from excise.models import cache_root

__all__ = [
    "cache_dir",
    "cache_key",
    "read_cached",
    "read_generations",
    "strict_json",
    "write_atomic_json",
    "write_cached",
    "write_generations",
]


def cache_dir() -> Path:
    """``$EXCISE_CACHE/eval`` (default ``~/.cache/excise/eval``)."""
    return cache_root() / "eval"


def generations_dir() -> Path:
    """``$EXCISE_CACHE/generations``: answers keyed by (model, adapter, prompts, generation settings)."""
    return cache_root() / "generations"


def read_generations(key: str) -> list[str] | None:
    """Cached answers for ``key``, or None (a corrupt entry counts as absent)."""
    try:
        answers = json.loads((generations_dir() / f"{key}.json").read_text())["answers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return answers if isinstance(answers, list) and all(isinstance(a, str) for a in answers) else None


def write_generations(key: str, payload: dict[str, Any], answers: list[str]) -> Path:
    """Store ``answers`` under ``key`` with the ``payload`` that made the key (for inspection)."""
    return write_atomic_json(generations_dir() / f"{key}.json", {"key": payload, "answers": answers})


def cache_key(payload: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``payload``."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_cached(key: str) -> dict[str, Any] | None:
    """The cached result for ``key``, or None (a corrupt entry counts as absent)."""
    path = cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_cached(key: str, result: dict[str, Any]) -> Path:
    """Store ``result`` under ``key``; returns the entry's path."""
    return write_atomic_json(cache_dir() / f"{key}.json", result)


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (in nested dicts, lists, tuples) replaced by ``None``.

    Strict JSON readers reject ``NaN``; a number that is not one is written as ``null``.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_atomic_json(path: Path, obj: Any, *, default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``obj`` as indented, strict JSON to ``path`` through a temp file beside it and a rename.

    ``default`` converts what JSON cannot hold, as in :func:`json.dump`. NaN and infinities are
    refused (``ValueError``), never written: pass the object through :func:`strict_json` first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, allow_nan=False, default=default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
