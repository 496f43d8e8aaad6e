"""Complete a small real run folder and render its report (how docs/img/demo_report.png was made).

    # 1. expert / anti-expert LoRAs on HaluEval QA (right vs hallucinated answers), 40 steps each
    excise train sft --base smollm2-135m-instruct --data ../shared/data/halueval/qa_data.json \
        --format paired-expert --out E --steps 40 --batch-size 4 --max-length 128 --lr 1e-3
    excise train sft ... --format paired-anti --out A ...
    # 2. the sweep benchmark keeps results/expert (λ 0), results/ext_sub (λ 1), sweeps/ext_sub
    python benchmarks/bench_sweep.py --expert E --anti A --n 30 --run RUN
    # 3. this script: base model and direct subtraction on the same evaluations, toxicity
    #    generations judged by the shipped toxicity probe, `excise inspect` diagnostics, report
    python scripts/demo_report_run.py RUN --expert E --anti A --n 30
    scripts/render_report.sh RUN/report/report.html docs/img/demo_report.png

The recipe pipeline (`excise run recipes/quickstart.yaml`) makes the same kind of folder in one
command; this script exists because the picture was made before it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--expert", type=Path, required=True)
    parser.add_argument("--anti", type=Path, required=True)
    parser.add_argument("--n", type=int, default=30, help="TruthfulQA questions (as the benchmark)")
    parser.add_argument("--rows", type=int, default=20, help="wikitext-2 rows (as the benchmark)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--generations", type=int, default=3, help="toxic instructions answered per method")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import run_eval, write_result
    from excise.pem.apply import apply_operator
    from excise.pem.diagnostics import diagnose
    from excise.pem.io import load_adapter
    from excise.pipeline.report import write_report

    run = args.run
    adapters = run / "adapters"
    if not (adapters / "ext_sub").exists():
        apply_operator("ext_sub", [args.expert, args.anti], adapters / "ext_sub", params={"lam": 1.0})
    if not (adapters / "subtract").exists():
        apply_operator("subtract", [args.expert, args.anti], adapters / "subtract", params={"lam": 1.0})
    methods = {
        "base": None,
        "expert": args.expert,
        "subtract": adapters / "subtract",
        "ext_sub": adapters / "ext_sub",
    }
    evals = {
        "truthfulqa-mc": {"limit": args.n},
        "perplexity": {"limit": args.rows, "window": args.window, "stride": args.window},
        "toxicity": {"limit": args.generations, "max_new_tokens": 48},
    }
    for method, adapter in methods.items():
        for metric, settings in evals.items():
            out = run / "results" / method / f"{metric}.json"
            if out.exists():
                continue
            print(f"{method} {metric}", file=sys.stderr)
            record = run_eval(metric, EvalConfig(model=MODEL, adapter=adapter, **settings), progress=False)
            write_result(record, out)
    (run / "diagnostics").mkdir(parents=True, exist_ok=True)
    report = diagnose(load_adapter(args.expert), load_adapter(args.anti))
    (run / "diagnostics" / "ext_sub.json").write_text(json.dumps(report, indent=2) + "\n")
    (run / "command.txt").write_text(
        f"python benchmarks/bench_sweep.py --expert {args.expert} --anti {args.anti} --n {args.n} "
        f"--rows {args.rows} --window {args.window} --run {run} && python scripts/demo_report_run.py {run} "
        f"--expert {args.expert} --anti {args.anti} --n {args.n}\n"
    )
    title = "excise demo: Ext-Sub on SmolLM2-135M (HaluEval expert / anti-expert)"
    print(f"wrote {write_report(run, title=title)}")


if __name__ == "__main__":
    main()
