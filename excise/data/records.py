"""Read a dataset as a list of plain dicts, from a local file or a Hugging Face hub id.

A *data spec* is one string:

- a local file: ``.json`` (a JSON list, a dict of parallel lists, or JSON Lines — HaluEval
  keeps JSON Lines under a ``.json`` name), ``.jsonl``, or ``.csv`` (a UTF-8 BOM is
  dropped); or a local folder saved by ``datasets`` (``save_to_disk``);
- a hub id, optionally with a config and a split: ``org/name``, ``org/name:split``,
  ``org/name@config:split`` — loaded through ``datasets.load_dataset``.

Everything here raises :class:`~excise.errors.DataError` with one line naming the
problem (missing file, bad JSON with its line number, no rows), never a traceback.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from excise.errors import DataError, first_line

__all__ = ["load_records", "parse_hub_spec", "require_fields"]

_SUFFIXES = (".json", ".jsonl", ".csv")
# org/name[@config][:split]
_HUB_SPEC = re.compile(
    r"^(?P<id>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<config>[\w.-]+))?(?::(?P<split>[\w.\[\]%:-]+))?$"
)


def load_records(
    spec: str | Path, *, split: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Rows of a local file or a hub dataset, as dicts, in order.

    Args:
        spec: a local path or a hub spec (see the module docstring).
        split: hub split when the spec names none (default ``train``); ignored for files.
        limit: keep only the first ``limit`` rows.

    Raises:
        DataError: the file is missing or unreadable, holds no rows, or a row is not an object.
    """
    path = Path(spec)
    if path.exists() or path.suffix.lower() in _SUFFIXES or str(spec).startswith((".", "/", "~")):
        rows = _read_local(path.expanduser())
        where = str(path)
    else:
        rows, where = _read_hub(str(spec), split)
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be at least 1, got {limit}")
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{where} holds no rows")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{where}: row {i} is a {type(row).__name__}, expected an object with fields")
    return rows


def require_fields(rows: list[dict[str, Any]], fields: list[str] | tuple[str, ...], *, where: str) -> None:
    """Raise DataError naming the first row that lacks a field or has it empty."""
    for i, row in enumerate(rows, start=1):
        missing = [
            f for f in fields if row.get(f) is None or (isinstance(row[f], str) and not row[f].strip())
        ]
        if missing:
            have = ", ".join(sorted(row)) or "none"
            raise DataError(
                f"{where}: row {i} lacks field(s) {', '.join(missing)} (it has: {have}); "
                "map fields with --field NAME=COLUMN"
            )


def parse_hub_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``org/name@config:split`` → (id, config, split); raise DataError if it is not one."""
    match = _HUB_SPEC.match(spec)
    if match is None:
        raise DataError(
            f"{spec!r} is neither an existing file nor a hub dataset id (org/name[@config][:split])"
        )
    return match["id"], match["config"], match["split"]


def _read_local(path: Path) -> list[Any]:
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {first_line(err)}") from err
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".jsonl":
        return _json_lines(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{"):
            return _json_lines(text, path)  # JSON Lines under a .json name (HaluEval)
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if isinstance(data, dict):
        return _parallel_lists(data, path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, got a {type(data).__name__}")
    return data


def _json_lines(text: str, path: Path) -> list[Any]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    return rows


def _parallel_lists(data: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """``{"instructions": [...], "inputs": [...]}`` → one dict per index (one row if no lists)."""
    lists = {k: v for k, v in data.items() if isinstance(v, list)}
    if not lists:
        return [data]
    if any(lists.values()):  # an empty list beside full ones is an absent field (I-CoNa's inputs)
        lists = {k: v for k, v in lists.items() if v}
    lengths = {len(v) for v in lists.values()}
    if len(lengths) != 1:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in lists.items())
        raise DataError(f"{path}: an object of lists needs lists of one length, got {sizes}")
    n = lengths.pop()
    return [{k: v[i] for k, v in lists.items()} for i in range(n)]


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    try:
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a dataset folder saved by datasets ({first_line(err)})") from err
    if hasattr(dataset, "keys"):  # a DatasetDict: take train, else the only split
        splits = list(dataset.keys())
        dataset = dataset["train"] if "train" in splits else dataset[splits[0]]
    return dataset.to_list()


def _read_hub(spec: str, split: str | None) -> tuple[list[dict[str, Any]], str]:
    hub_id, config, spec_split = parse_hub_spec(spec)
    split = spec_split or split or "train"
    try:
        from datasets import load_dataset

        dataset = load_dataset(hub_id, config, split=split)
    except Exception as err:
        raise DataError(
            f"cannot load hub dataset {hub_id!r} (config {config}, split {split}): {first_line(err)}; "
            "pass a local .json/.jsonl/.csv file instead when offline"
        ) from err
    return dataset.to_list(), f"{hub_id}:{split}"
