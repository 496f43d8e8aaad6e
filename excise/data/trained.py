"""What a module was trained on: the record a trainer writes, and the prompts that record names.

Every trainer writes one record per data file it trained on into ``train_config.json``
(``config.training_data``): the file (absolute path, SHA-256 of its bytes), the loader format,
the field mapping, the row limit, the side of the project-wide prompt split with its fractions
and salt, and the cap on examples. ``excise ops`` copies its inputs' records into its result's
provenance, so the records reach through Ext-Sub, negation and composition.

:func:`trained_prompt_keys` recomputes from a record the normalised prompts
(:func:`~excise.data.splits.prompt_key` of :attr:`Example.split_key`) the module saw: the same
loader, the same split, the same cap. ``excise eval`` refuses to score an item whose prompt is
among them. The file must be unchanged (same SHA-256): a changed file could name other prompts.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from excise.data.examples import Example, load_harmful_qa, load_instructions, load_paired_qa, load_texts
from excise.data.splits import SPLIT_SALT, STANDARD_SPLITS, prompt_key, split_by_prompt
from excise.errors import DataError
from excise.provenance import TRAINING_DATA, recorded_training_data

__all__ = [
    "TRAINING_DATA",
    "file_sha256",
    "recorded_training_data",
    "trained_prompt_keys",
    "trained_templates",
    "training_data_record",
]


# Loader format → the examples whose prompts were trained on. Both sides of paired and harmful
# data share their prompts, so one side names them all.
_PROMPTS: dict[str, Callable[[str, dict[str, str], int | None], list[Example]]] = {
    "instruction": lambda spec, fields, limit: load_instructions(spec, fields=fields, limit=limit),
    "paired": lambda spec, fields, limit, **kw: load_paired_qa(spec, fields=fields, limit=limit, **kw)[0],
    "harmful": lambda spec, fields, limit: load_harmful_qa(spec, fields=fields, limit=limit)[0],
    "text": lambda spec, fields, limit: load_texts(spec, fields=fields, limit=limit),
}
_FAMILY = {"paired-expert": "paired", "paired-anti": "paired", "safe": "harmful"}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def training_data_record(
    spec: str,
    *,
    format: str,
    fields: Mapping[str, str],
    split: str,
    limit: int | None = None,
    max_examples: int | None = None,
    rows: list[int] | None = None,
    pairs: Mapping[str, Any] | None = None,
    template: str | None = None,
) -> dict[str, Any]:
    """The record of one training data file (see the module docstring).

    Args:
        spec: the data spec trained on (a local file is recorded by absolute path and digest).
        format: the loader format (``instruction``, ``paired-expert``, ``harmful``, ``text``…).
        fields: the role → column mapping given to the loader.
        split: the side of the project-wide prompt split trained on (``all``: every row).
        limit: rows read from the top of the file.
        max_examples: examples kept after the split.
        rows: for a trainer that picks its own rows (the demo's seeded shuffle): the 0-based
            rows of the file it trained on; ``split`` is then ``all`` and applies first.
        pairs: paired data's pair controls (``max_word_ratio``, ``strip_final_period`` of
            :func:`~excise.data.examples.load_paired_qa`), applied before the split.
        template: the prompt template the examples were rendered in (``excise eval`` warns
            when it scores a module in another; :func:`trained_templates`).
    """
    path = Path(spec).expanduser()
    local = path.is_file()
    return {
        "data": str(path.resolve()) if local else str(spec),
        "sha256": file_sha256(path) if local else None,
        "format": format,
        "fields": dict(fields),
        "limit": limit,
        "split": split,
        "fractions": dict(STANDARD_SPLITS),
        "salt": SPLIT_SALT,
        "max_examples": max_examples,
        **({"rows": sorted(rows)} if rows is not None else {}),
        **({"pairs": dict(pairs)} if pairs else {}),
        **({"template": template} if template else {}),
    }


def trained_templates(folders: Sequence[str | Path]) -> list[str]:
    """The prompt templates the modules in ``folders`` were trained in (their records, through
    operations too), each once, in order; empty when no record names one (older excise)."""
    found: list[str] = []
    for folder in folders:
        for record in recorded_training_data(folder):
            template = record.get("template")
            if isinstance(template, str) and template not in found:
                found.append(template)
    return found


def trained_prompt_keys(record: Mapping[str, Any]) -> set[str]:
    """The normalised prompts a training data record names (empty prompts of plain text left out).

    Raises:
        DataError: the recorded file is missing or changed since training, the format is
            unknown, or the data no longer loads.
    """
    spec = str(record["data"])
    digest = record.get("sha256")
    if digest is not None:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"training data {spec} is missing (moved or deleted since training)")
        if file_sha256(path) != digest:
            raise DataError(f"training data {spec} changed since training (SHA-256 no longer {digest[:12]}…)")
    # Not sort_keys: the order of "fractions" is the order of the split's buckets.
    return set(_prompt_keys(json.dumps(dict(record))))


# A record names its file's SHA-256, checked above on every call, so the prompts it trained
# on are computed once per process: `excise eval` checks before its plan line and again in
# the run, and `excise run` checks every evaluation of the same modules.
@functools.lru_cache(maxsize=32)
def _prompt_keys(record_json: str) -> frozenset[str]:
    record = json.loads(record_json)
    spec = str(record["data"])
    fmt = str(record.get("format"))
    loader = _PROMPTS.get(_FAMILY.get(fmt, fmt))
    if loader is None:
        raise DataError(f"training data {spec}: unknown format {fmt!r} in the record")
    pairs = dict(record.get("pairs") or {})
    examples = loader(spec, dict(record.get("fields") or {}), record.get("limit"), **pairs)
    side = str(record.get("split", "all"))
    if side != "all":
        fractions = record.get("fractions") or STANDARD_SPLITS
        salt = str(record.get("salt", SPLIT_SALT))
        examples = split_by_prompt(examples, lambda e: e.split_key, fractions, salt=salt).get(side, [])
    if record.get("max_examples"):
        examples = examples[: int(record["max_examples"])]
    if record.get("rows") is not None:
        rows = set(record["rows"])
        examples = [e for e in examples if e.row in rows]
    return frozenset(key for e in examples if (key := prompt_key(e.split_key)))
