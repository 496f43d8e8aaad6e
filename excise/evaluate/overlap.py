"""No evaluation on training prompts: count the items whose prompt trained the evaluated model.

The adapter (and a model folder given as ``--base``) carries the records of the data it was
trained on: its own ``train_config.json``, or, for a result of ``excise ops``, its inputs'
records carried in ``excise.json`` (:func:`excise.data.recorded_training_data`). From each
record :func:`excise.data.trained_prompt_keys` recomputes the trained prompts (same loader,
split side, salt and cap), and every evaluation item's prompt is looked up among them. Any hit
is an error naming the count and both files, unless ``--allow-overlap``; then it is a warning,
kept in the result. A record that cannot be checked (file moved or changed, an older excise
that recorded nothing) is refused the same way: an unknown overlap is not a zero one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from excise.data import prompt_key, recorded_training_data, trained_prompt_keys
from excise.errors import DataError, ExciseWarning, first_line

__all__ = ["check_overlap", "module_folders"]


def module_folders(model: str, adapter: Path | None) -> list[Path]:
    """The folders whose training data an evaluation must not overlap: the adapter, and the
    model itself when it is a local folder (a full fine-tune or an ``excise ops --base`` result)."""
    from excise.models import resolve_model

    folders = [Path(adapter)] if adapter is not None else []
    source = Path(resolve_model(model))
    if source.is_dir():
        folders.append(source)
    return folders


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
