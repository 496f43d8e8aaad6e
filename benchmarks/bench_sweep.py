"""A k-point λ sweep against k separate load + op + eval runs, side by side in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sweep.py --expert E --anti A --n 30 --run runs/bench

Both sides evaluate Ext-Sub of the same expert / anti-expert LoRAs on SmolLM2-135M-Instruct at the
same λ grid (k points, λ = 0 included) on a deficiency metric (TruthfulQA MC, first N questions)
and a utility metric (wikitext-2 perplexity, first R rows):

- separate: per λ, what a user does by hand — ``excise ops ext-sub`` (apply_operator, written to a
  folder), then ``excise eval truthfulqa-mc`` and ``excise eval perplexity`` on that folder (each
  loads the model: run_eval without cache);
- sweep: :func:`excise.pipeline.sweep.run_sweep` — one load, ``W0`` and ``D`` computed once, a λ
  step changes one LoRA scale.

Prints each side's wall time, the ratio, the target ratio ``sweep / (one load + k evals)`` (≤ 1.1;
"one load" and "k evals" are the separate side's measured mean load and summed eval times), and
the largest difference between the two sides' numbers. Without --expert/--anti, random LoRAs
(PEFT ``init_lora_weights=False``, r 8 on q_proj/v_proj) stand in: timing does not depend on
training. With --run the outputs stay in a run folder (report layout: results/expert = λ 0,
results/ext_sub = λ 1, sweeps/ext_sub). Results go to docs/BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

MODEL = "smollm2-135m-instruct"  # offline alias (DESIGN.md §5)


def random_adapters(folder: Path) -> tuple[Path, Path]:
    """Two random LoRAs on the real model (timing stand-ins)."""
    from peft import LoraConfig, get_peft_model

    from excise.models import load_model

    out = []
    for seed, name in [(1, "expert"), (2, "anti")]:
        torch.manual_seed(seed)
        model = get_peft_model(
            load_model(MODEL), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False)
        )  # fmt: skip
        for name_, p in model.named_parameters():
            if "lora_B" in name_:
                p.data.mul_(0.01)  # small deltas: a sane model, as after training
        model.save_pretrained(folder / name)
        out.append(folder / name)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expert", type=Path)
    parser.add_argument("--anti", type=Path)
    parser.add_argument("--lams", default="0,0.5,1,1.5,2", help="k λ values (0 is the reference)")
    parser.add_argument("--n", type=int, default=50, help="TruthfulQA questions")
    parser.add_argument("--rows", type=int, default=20, help="wikitext-2 rows for perplexity")
    parser.add_argument("--window", type=int, default=256, help="perplexity window = stride")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run", type=Path, help="keep the outputs in this run folder")
    parser.add_argument("--order", choices=["separate-first", "sweep-first", "abba"], default="abba")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import run_eval, write_result
    from excise.evaluate.subject import load_subject
    from excise.pem.apply import apply_operator
    from excise.pipeline.sweep import SweepConfig, run_sweep

    lams = [float(x) for x in args.lams.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    run = args.run or work / "run"
    expert, anti = (args.expert, args.anti) if args.expert else random_adapters(work)
    deficiency = {"limit": args.n}
    utility = {"limit": args.rows, "window": args.window, "stride": args.window}
    metrics = [("truthfulqa-mc", "mc2", deficiency), ("perplexity", "perplexity", utility)]

    load_subject(MODEL)  # warm-up: converted-model cache and page cache, for both sides alike
    print(f"threads {torch.get_num_threads()}, k = {len(lams)}, n = {args.n}, rows = {args.rows}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    def run_separate() -> tuple[float, dict, list, list, list]:
        clock = time.perf_counter()
        separate: dict[float, dict[str, dict]] = {}
        loads, evals, ops = [], [], []
        for lam in lams:
            t = time.perf_counter()
            op = apply_operator(
                "ext_sub", [expert, anti], work / f"op{lam:g}", params={"lam": lam}, overwrite=True
            )
            ops.append(time.perf_counter() - t)
            separate[lam] = {}
            for metric, _, settings in metrics:
                t = time.perf_counter()
                record = run_eval(metric, EvalConfig(model=MODEL, adapter=op, **settings), use_cache=False,
                                  progress=False)  # fmt: skip
                loads.append(record["timing"]["load_seconds"])
                # The eval is the whole call less the load (data reading and hashing included), as
                # the sweep's per-λ time is its whole run_eval calls.
                evals.append(time.perf_counter() - t - record["timing"]["load_seconds"])
                separate[lam][metric] = record
                method = {0.0: "expert", 1.0: "ext_sub"}.get(lam)
                if method is not None:
                    write_result(record, run / "results" / method / f"{metric}.json")
        return time.perf_counter() - clock, separate, loads, evals, ops

    def run_swept() -> tuple[float, Path]:
        clock = time.perf_counter()
        out = run_sweep(
            SweepConfig(
                model=MODEL,
                inputs=[expert, anti],
                lams=lams,
                deficiency={"metric": "truthfulqa-mc", "key": "mc2", "settings": deficiency},
                utility={"metric": "perplexity", "key": "perplexity", "settings": utility},
                out=run / "sweeps" / "ext_sub",
                overwrite=True,
                progress=False,
            )
        )
        return time.perf_counter() - clock, out

    # The machine is shared and its load drifts: run the sides in either order, or A B B A.
    # One small evaluation first absorbs one-time costs (kernels, allocator) for both sides.
    run_eval(
        "truthfulqa-mc", EvalConfig(model=MODEL, adapter=expert, limit=1), use_cache=False, progress=False
    )
    blocks = {"separate-first": "AB", "sweep-first": "BA", "abba": "ABBA"}[args.order]
    sep_times, sweep_times, references = [], [], []
    for block in blocks:
        if block == "A":
            t_separate, separate, loads, evals, ops = run_separate()
            sep_times.append(t_separate)
            references.append(sum(loads) / len(loads) + sum(evals))  # one load + k evals
        else:
            t_sweep, out = run_swept()
            sweep_times.append(t_sweep)
    t_separate, t_sweep = sum(sep_times) / len(sep_times), sum(sweep_times) / len(sweep_times)
    print(
        f"order: {blocks}; separate runs {' '.join(f'{t:.1f}' for t in sep_times)} s, "
        f"sweeps {' '.join(f'{t:.1f}' for t in sweep_times)} s; load average now {os.getloadavg()[0]:.1f}"
    )

    import json

    sweep = json.loads((out / "sweep.json").read_text())
    worst = 0.0
    for point in sweep["points"]:
        for metric, key, _ in metrics:
            swept = json.loads((out / point["results"][metric]).read_text())["metrics"][key]
            alone = separate[point["lam"]][metric]["metrics"][key]
            worst = max(worst, abs(swept - alone) / max(abs(alone), 1e-12))
    reference = sum(references) / len(references)
    timing = sweep["timing"]
    print("means over blocks; the component times are the last block's")
    print(f"separate: {t_separate:8.1f} s  ({len(lams)} ops {sum(ops):.1f} s, {len(loads)} loads "
          f"{sum(loads):.1f} s, evals {sum(evals):.1f} s)")  # fmt: skip
    print(f"sweep:    {t_sweep:8.1f} s  (W0 + D {timing['prepare_seconds']:.1f} s, one load "
          f"{timing['load_seconds']:.1f} s, evals {sum(timing['eval_seconds']):.1f} s)")  # fmt: skip
    print(f"speed-up separate / sweep: {t_separate / t_sweep:.2f}x")
    per_lam = [a + b for a, b in zip(evals[::2], evals[1::2], strict=True)]
    print("eval seconds per λ, separate: " + " ".join(f"{x:.1f}" for x in per_lam))
    print("eval seconds per λ, sweep:    " + " ".join(f"{x:.1f}" for x in timing["eval_seconds"]))
    ratio = t_sweep / reference
    print(f"sweep / (one load + k evals) = {t_sweep:.1f} / {reference:.1f} = {ratio:.3f} (target <= 1.1)")
    print(f"largest relative difference of a swept number from the separate run's: {worst:.2e}")
    print(f"chosen λ {sweep['chosen']['lam']}, knee λ {sweep['knee']['lam']}, Pareto {sweep['pareto']}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
