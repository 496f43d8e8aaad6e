"""Wall time of evaluations at the sizes the docs and recipes quote, on SmolLM2-135M-Instruct.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_times.py --threads 2 --sections perplexity

Each section loads the model once (the load is timed apart) and runs the real evaluation
(:func:`excise.evaluate.runner.run_eval`, no cache) at each size, printing seconds, the items or
windows scored, tokens per second and the machine's load average before and after, so a figure
taken on a busy machine says so. Sections:

- ``perplexity``: wikitext-2 raw test at the recipes' setting (a seeded subsample of 200 rows,
  window 256: 83 windows), the old recipe setting (the first 40 rows, window 512: 10 windows),
  and the whole test set at ``excise eval perplexity``'s defaults (window 1024, stride 512:
  305k tokens). ``--quick`` skips the whole set.

Results go to docs/EVALUATION.md ("Timing") and docs/BENCHMARKS.md by hand, with the date,
the thread count and the load.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODEL = "smollm2-135m-instruct"  # offline alias (DESIGN.md §5)
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki_test_raw.jsonl"


def _load() -> str:
    return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def bench_perplexity(subject, quick: bool) -> None:
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import run_eval

    sizes = [
        ("recipes: limit 200, window 256", {"limit": 200, "window": 256, "stride": 256}),
        ("old recipes: head 40, window 512", {"head": 40, "window": 512, "stride": 512}),
    ]
    if not quick:
        sizes.append(("whole test set, defaults (window 1024, stride 512)", {}))
    print(f"perplexity on {WIKITEXT.name}, {MODEL}")
    print(f"  {'setting':54}{'seconds':>9}{'windows':>9}{'tokens':>9}{'tok/s':>8}  load before → after")
    for label, settings in sizes:
        cfg = EvalConfig(model=MODEL, data=str(WIKITEXT), device="cpu", **settings)
        before = _load()
        clock = time.perf_counter()
        record = run_eval("perplexity", cfg, subject=subject, use_cache=False, progress=False)
        seconds = time.perf_counter() - clock
        tokens = (
            record["scored_tokens"]
            if "scored_tokens" in record
            else sum(it["scored_tokens"] for it in record["items"])
        )
        ppl = record["metrics"]["perplexity"]
        print(
            f"  {label:54}{seconds:9.1f}{len(record['items']):9d}{tokens:9d}{tokens / seconds:8.0f}"
            f"  {before} → {_load()}  (ppl {ppl:.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", default="perplexity", help="comma-separated: perplexity")
    parser.add_argument("--quick", action="store_true", help="skip the largest size of each section")
    args = parser.parse_args()
    import torch

    from excise.evaluate.subject import load_subject

    torch.set_num_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.threads} torch thread(s)")
    clock = time.perf_counter()
    subject = load_subject(MODEL, device="cpu")
    print(f"model load {time.perf_counter() - clock:.1f} s")
    sections = {"perplexity": bench_perplexity}
    for name in args.sections.split(","):
        if name not in sections:
            raise SystemExit(f"unknown section {name!r}; known: {', '.join(sections)}")
        sections[name](subject, args.quick)


if __name__ == "__main__":
    main()
