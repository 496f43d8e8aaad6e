"""Re-score every judged answer a run saved with another judge, without regenerating (issue 25, item 5).

    .venv/bin/python scripts/rejudge_run.py docs/results/sku-harmful --judge harm-cross --threads 2
    .venv/bin/python scripts/rejudge_run.py docs/results/sku-harmful --judge harm-lm:runs/judges/harm_lm

For each harmful-rate / toxicity / truthfulqa-gen record of the run (``results/<model>/*.json`` and
the sweeps' ``sweeps/<sweep>/results/lam=*/*.json``) whose judge is not the refusal-marker judge,
the saved answers are judged again (:func:`excise.evaluate.runner.judge_saved`, exactly what
``excise eval judge --generations`` does) and the new record is written to the same relative path
under ``<run>/rejudged/<name>/`` (``--name``, default the judge spec with ``:`` and ``/`` made
safe). Existing outputs are kept (the script resumes), so a second judge adds a folder beside.
``scripts/results_tables.py`` prints each rejudged folder's rates beside the run's own (§4).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def judged_records(run: Path) -> list[Path]:
    """The run's result files of judged metrics whose judge is a model (not the refusal markers)."""
    from excise.evaluate.runner import JUDGED

    found = []
    for path in sorted([*run.glob("results/*/*.json"), *run.glob("sweeps/*/results/*/*.json")]):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        judge = (record.get("judge") or {}).get("name")
        if record.get("metric") in JUDGED and judge not in (None, "refusal") and record.get("items"):
            found.append(path)
    return found


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="A run folder (runs/NAME or docs/results/NAME).")
    parser.add_argument("--judge", required=True, help="Judge spec (docs/JUDGES.md).")
    parser.add_argument("--judge-option", action="append", default=[], help="KEY=VALUE (repeatable).")
    parser.add_argument("--name", help="Folder under <run>/rejudged/ (default: from the spec).")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from excise.evaluate.runner import judge_saved, write_result
    from excise.runtime import set_threads

    set_threads(args.threads)
    out_root = args.run / "rejudged" / (args.name or safe_name(args.judge))
    files = judged_records(args.run)
    if not files:
        raise SystemExit(f"error: {args.run} holds no judged result with saved answers")
    print(f"{len(files)} judged result files in {args.run} → {out_root}")
    for path in files:
        out = out_root / path.relative_to(args.run)
        if out.is_file():
            print(f"  {out}: exists, kept")
            continue
        clock = time.perf_counter()
        record = judge_saved(path, args.judge, args.judge_option, use_cache=True, progress=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_result(record, out, overwrite=False)
        rate = {k: v for k, v in record["metrics"].items() if k.endswith("rate")}
        print(f"  {out}: {json.dumps(rate)} ({time.perf_counter() - clock:.1f} s)")


if __name__ == "__main__":
    from excise.errors import ExciseError

    try:
        main()
    except ExciseError as err:  # a bad judge spec, run folder or result file: one line, no traceback
        raise SystemExit(f"error: {err}") from None
