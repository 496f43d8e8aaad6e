"""The training data records a module folder carries: one reader for every package.

A trainer writes its records in ``train_config.json`` (``config.training_data``); ``excise
ops`` copies its inputs' records into the result's ``excise.json`` and ``excise merge`` into
``excise_merge.json``, so the records reach through chains of operations. ``excise.pem``
copies them and ``excise.data`` / ``excise.evaluate`` check evaluation items against them;
neither may import the other (STYLE.md rule 1), so this stdlib-only module, like
``excise/errors.py``, serves both. Records are JSON, copied and never interpreted here
(``excise.data.trained`` says what a record holds).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "MERGE_PROVENANCE",
    "PROVENANCE_FILE",
    "TRAINING_DATA",
    "TRAIN_CONFIG",
    "carried_training_data",
    "recorded_training_data",
]

PROVENANCE_FILE = "excise.json"  # excise ops writes it beside its result
TRAIN_CONFIG = "train_config.json"  # excise.train writes it beside what it trained
TRAINING_DATA = "training_data"  # the key of the records, in train_config.json and excise.json
MERGE_PROVENANCE = "excise_merge.json"  # excise merge keeps its adapter's records there


def recorded_training_data(folder: str | Path) -> list[dict[str, Any]]:
    """The training data records of a module folder, each once, in order.

    Those its trainer wrote (``train_config.json``, ``config.training_data``) and, for a result
    of ``excise ops`` or ``excise merge``, those its ``excise.json`` or ``excise_merge.json``
    carries from its inputs. Such a file without records (an older excise) yields ``{"data":
    None, "train_config" or "provenance": path}``: the data is unknown, not absent.
    """
    folder = Path(folder)
    records: list[Any] = []
    trained = folder / TRAIN_CONFIG
    if trained.is_file():
        config = _json_object(trained).get("config")
        found = config.get(TRAINING_DATA) if isinstance(config, dict) else None
        unrecorded = {"data": None, "train_config": str(trained.resolve())}
        records += found if isinstance(found, list) else [unrecorded]
    for provenance in (folder / PROVENANCE_FILE, folder / MERGE_PROVENANCE):
        if provenance.is_file():
            carried = _json_object(provenance).get(TRAINING_DATA)
            unknown = {"data": None, "provenance": str(provenance.resolve())}
            records += carried if isinstance(carried, list) else [unknown]
    return carried_training_data([{TRAINING_DATA: records}])


def carried_training_data(sources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training data records of several inputs' provenance, each once, in order."""
    seen: dict[str, dict[str, Any]] = {}
    for source in sources:
        for record in source.get(TRAINING_DATA) or []:
            if isinstance(record, dict):
                seen.setdefault(json.dumps(record, sort_keys=True), record)
    return list(seen.values())


def _json_object(file: Path) -> dict[str, Any]:
    """A JSON file's object; an unreadable or non-object file reads as empty (it records nothing)."""
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
