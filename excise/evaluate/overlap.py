"""No evaluation on training prompts: count the items whose prompt trained the evaluated model.

The adapter (and a model folder given as ``--base``) carries the records of the data it was
trained on: its own ``train_config.json``, or, for a result of ``excise ops``, its inputs'
records carried in ``excise.json`` (:func:`excise.data.recorded_training_data`). From each
record :func:`excise.data.trained_prompt_keys` recomputes the trained prompts (same loader,
split side, salt and cap), and every evaluation item's prompt is looked up among them. Any hit
is an error naming the count and both files, unless ``--allow-overlap``; then it is a warning,
kept in the result. A record that cannot be checked (file moved or changed, an older excise
that recorded nothing) is refused the same way: an unknown overlap is not a zero one.

A module that carries no record at all (a PEFT adapter from elsewhere, a model folder copied
without its JSON, a model given by hub id or GGUF file and evaluated on its own) cannot be
checked either; it is not an error, but the result says ``training_overlap: "unchecked"`` with
the reasons (:func:`unchecked_reasons`), never an empty list that reads as "checked, nothing
found". The base model under an adapter is the adapter's starting point: its records are
checked where it carries some, and it is not called unchecked where it carries none.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from excise.data import prompt_key, recorded_training_data, trained_prompt_keys
from excise.errors import DataError, ExciseWarning, first_line

__all__ = ["UNCHECKED", "check_overlap", "module_folders", "overlap_summary", "unchecked_reasons"]

UNCHECKED = "unchecked"  # the value of a result's ``training_overlap`` when a module could not be checked


def module_folders(model: str, adapter: Path | None) -> list[Path]:
    """The folders whose training data an evaluation must not overlap: the adapter, and the
    model itself when it is a local folder (a full fine-tune or an ``excise ops --base`` result)."""
    from excise.models import resolve_model

    folders = [Path(adapter)] if adapter is not None else []
    source = Path(resolve_model(model))
    if source.is_dir():
        folders.append(source)
    return folders


def unchecked_reasons(
    model: str, adapter: Path | None, prompt_field: str | None, modules: Sequence[Path] = ()
) -> list[str]:
    """Why an evaluation's items cannot all be checked against the training data; empty when they can.

    Args:
        model: the model spec (``--base``).
        adapter: the adapter folder, if any.
        prompt_field: the metric's prompt field (None: prompt-less data, never checked).
        modules: more module folders the evaluated weights were built from (a sweep's inputs).

    Returns:
        One line per reason: prompt-less data, or each module without any training record (the
        adapter and ``modules``; the model itself only when it is evaluated without them).
    """
    from excise.models import resolve_model

    if prompt_field is None:
        return ["the data has no prompts to compare with training data"]
    reasons = []
    fine_tunes = ([Path(adapter)] if adapter is not None else []) + [Path(m) for m in modules]
    for folder in fine_tunes:
        if not recorded_training_data(folder):
            reasons.append(f"{folder} records no training data (made elsewhere, or copied without its JSON)")
    if not fine_tunes:
        source = Path(resolve_model(model))
        if not source.is_dir() or not recorded_training_data(source):
            reasons.append(f"the model {model} records no training data")
    return reasons


def overlap_summary(record: dict[str, Any]) -> str:
    """One line on a result's training data check: ``checked: 2 module × file, 0 items overlap``,
    ``unchecked (reasons)``, or ``not recorded`` for results made before the check was recorded."""
    overlap = record.get("training_overlap")
    if overlap == UNCHECKED:
        reasons = record.get("training_overlap_unchecked") or []
        return UNCHECKED + (f" ({'; '.join(reasons)})" if reasons else "")
    if not isinstance(overlap, list) or not overlap:
        return "not recorded"
    counts = [c.get("overlap") for c in overlap if isinstance(c, dict)]
    overlapping = sum(c for c in counts if isinstance(c, int))
    return f"checked: {len(counts)} module × file, {overlapping} item(s) overlap"


def check_overlap(
    items: list[dict[str, Any]],
    prompt_field: str | None,
    folders: list[Path],
    *,
    data: str,
    allow: bool,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Check ``items`` against the training data of each module in ``folders``.

    Args:
        items: the evaluation items (canonical field names).
        prompt_field: the field holding an item's prompt (None: prompt-less data, not checked).
        folders: module folders (:func:`module_folders`).
        data: the evaluation data spec, for messages.
        allow: warn instead of raising.

    Returns:
        ``(checks, warnings)``: one entry per (module, training file) with the overlap count
        (None when it could not be counted), and the warnings issued.

    Raises:
        DataError: an overlap, or training data that cannot be checked, without ``allow``.
    """
    checks: list[dict[str, Any]] = []
    problems: list[str] = []
    if prompt_field is None:
        return checks, problems
    keys = [prompt_key(str(it[prompt_field])) for it in items]
    for folder in folders:
        for record in recorded_training_data(folder):
            spec = record.get("data")
            entry = {"module": str(folder), "data": spec, "split": record.get("split"), "overlap": None}
            checks.append(entry)
            if spec is None:
                where = record.get("train_config") or record.get("provenance") or folder
                problems.append(
                    f"{where} does not record what {folder} was trained on (an older excise): cannot check "
                    "that the evaluation items are unseen; retrain it, or pass --allow-overlap"
                )
                continue
            try:
                trained = trained_prompt_keys(record)
            except DataError as err:
                problems.append(
                    f"cannot check the {len(items)} items of {data} against what {folder} was trained on: "
                    f"{first_line(err)}; restore that file, or pass --allow-overlap"
                )
                continue
            entry["overlap"] = n = sum(key in trained for key in keys)
            if n:
                problems.append(
                    f"{n} of the {len(items)} evaluation items of {data} have a prompt that {folder} was "
                    f"trained on ({spec}, split {record.get('split')!r}); evaluate on unseen prompts "
                    "(--split eval, other data), or pass --allow-overlap"
                )
    if problems and not allow:
        raise DataError(problems[0])
    for problem in problems:
        warnings.warn(problem, ExciseWarning, stacklevel=2)
    return checks, problems
