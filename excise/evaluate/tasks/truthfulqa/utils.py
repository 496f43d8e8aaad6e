"""Helpers of the local lm-eval TruthfulQA MC tasks (loaded by lm-eval's ``!function``, not by excise).

``load_mc_task`` turns the TruthfulQA repo's ``mc_task.json`` (``{question, mc1_targets: {choice:
label}, mc2_targets: {...}}``) into the HF ``truthful_qa`` layout (``{choices: [...], labels: [...]}``,
choice order kept), so lm-eval's own prompt and metrics apply unchanged. ``process_results_mc2`` is
lm-eval's own function, re-exported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lm_eval.tasks.truthfulqa.utils import process_results_mc2

__all__ = ["DEFAULT_MC_TASK", "load_mc_task", "process_results_mc2"]

# excise/evaluate/tasks/truthfulqa/ → the repository's parent holds shared/data (DESIGN.md §5).
DEFAULT_MC_TASK = Path(__file__).resolve().parents[4].parent / "shared/data/truthfulqa/v1_817q/mc_task.json"


def _targets(targets: dict[str, Any]) -> dict[str, list]:
    if "choices" in targets and "labels" in targets:
        return {"choices": list(targets["choices"]), "labels": [int(x) for x in targets["labels"]]}
    return {"choices": list(targets), "labels": [int(x) for x in targets.values()]}


def load_mc_task(mc_task_path: str | None = None, **_: Any) -> Any:
    """A ``DatasetDict`` with one ``validation`` split from a local ``mc_task.json``.

    The file is ``mc_task_path`` (lm-eval ``--metadata``), else ``$EXCISE_TRUTHFULQA_MC``, else the
    817-question file of the shared data folder.
    """
    import datasets

    path = Path(mc_task_path or os.environ.get("EXCISE_TRUTHFULQA_MC") or DEFAULT_MC_TASK)
    rows = json.loads(path.read_text(encoding="utf-8"))
    docs = [
        {
            "question": row["question"],
            "mc1_targets": _targets(row["mc1_targets"]),
            "mc2_targets": _targets(row["mc2_targets"]),
        }
        for row in rows
    ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})
