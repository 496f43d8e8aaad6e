"""TruthfulQA MC (MC1 + MC2) on SmolLM2-135M: excise's scorer against lm-evaluation-harness, and
batched generation against one-by-one ``generate``, on one already-loaded model.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/bench_eval.py --n 20

Prints seconds, questions/s, the speed ratio and the MC1/MC2 difference in points (target: ≥ 2×,
≤ 0.5 points), the largest per-choice log-likelihood difference, and generation tokens/s.
Results go to docs/BENCHMARKS.md by hand (machine, load, N, settings).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"  # offline alias (DESIGN.md §5)


def bench_mc(subject, n: int, batch_size: int) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from excise.evaluate.config import EvalConfig
    from excise.evaluate.metrics import METRICS
    from excise.evaluate.metrics.base import EvalContext
    from excise.evaluate.metrics.truthfulqa_mc import LM_EVAL_TASKS
    from excise.evaluate.runner import load_items

    metric = METRICS["truthfulqa-mc"]
    cfg = EvalConfig(model=MODEL, limit=n, batch_size=batch_size)
    items = load_items(metric, cfg, metric.default_data)
    clock = time.perf_counter()
    ours = metric.run(EvalContext(cfg, subject, items, progress=False))
    t_ours = time.perf_counter() - clock

    lm = HFLM(pretrained=subject.model, tokenizer=subject.tokenizer, batch_size=batch_size)
    tasks = TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False)
    clock = time.perf_counter()
    res = simple_evaluate(
        model=lm,
        tasks=["excise_truthfulqa_mc1", "excise_truthfulqa_mc2"],
        task_manager=tasks,
        limit=n,
        log_samples=True,
        verbosity="ERROR",
    )
    t_lm = time.perf_counter() - clock
    lm_mc1 = float(res["results"]["excise_truthfulqa_mc1"]["acc,none"])
    lm_mc2 = float(res["results"]["excise_truthfulqa_mc2"]["acc,none"])
    max_diff = 0.0
    for task, key in (("excise_truthfulqa_mc1", "mc1_logliks"), ("excise_truthfulqa_mc2", "mc2_logliks")):
        for sample in res["samples"][task]:
            theirs = [r[0] for r in sample["filtered_resps"]]
            mine = ours.items[sample["doc_id"]][key]
            max_diff = max(max_diff, *(abs(a - b) for a, b in zip(theirs, mine, strict=True)))
    print(f"TruthfulQA MC, {n} questions, batch size {batch_size}, {ours.extra['scored_pairs']} unique pairs")
    print(f"  {'':14}{'seconds':>9}{'q/s':>8}{'MC1':>8}{'MC2':>9}")
    print(
        f"  {'excise':14}{t_ours:9.1f}{n / t_ours:8.2f}{ours.metrics['mc1']:8.4f}{ours.metrics['mc2']:9.5f}"
    )
    print(f"  {'lm-eval':14}{t_lm:9.1f}{n / t_lm:8.2f}{lm_mc1:8.4f}{lm_mc2:9.5f}")
    d1, d2 = 100 * abs(ours.metrics["mc1"] - lm_mc1), 100 * abs(ours.metrics["mc2"] - lm_mc2)
    print(f"  speed-up {t_lm / t_ours:.2f}x; MC1 diff {d1:.3f} points, MC2 diff {d2:.4f} points")
    print(f"  max |Δ loglik| per choice {max_diff:.2e}")


def bench_generation(subject, n: int, new_tokens: int) -> None:
    from excise.data import load_records
    from excise.models.generation import GenerationSettings, chat_prompt_ids, generate

    tok = subject.tokenizer
    rows = load_records(str(ROOT.parent / "shared/data/alpaca_gpt4/alpaca_en_demo.json"), limit=n)
    prompts = [chat_prompt_ids(tok, r["instruction"]) for r in rows]
    # Both sides generate exactly `new_tokens` tokens per prompt (EOS suppressed until then).
    subject.model.generation_config.min_new_tokens = new_tokens
    settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=n)
    clock = time.perf_counter()
    with torch.inference_mode():
        generate(subject.model, tok, prompts, settings, progress=False)
    t_batched = time.perf_counter() - clock
    clock = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            subject.model.generate(
                input_ids=torch.tensor([p]),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
    t_single = time.perf_counter() - clock
    total = n * new_tokens
    print(f"Generation, {n} prompts × {new_tokens} new tokens (greedy, KV cache)")
    print(f"  batched (left-padded, one batch)  {t_batched:7.1f} s  {total / t_batched:7.1f} tok/s")
    print(f"  one by one (HF generate)          {t_single:7.1f} s  {total / t_single:7.1f} tok/s")
    print(f"  speed-up {t_single / t_batched:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="TruthfulQA questions (the first N).")
    parser.add_argument("--batch-size", type=int, default=32, help="Rows per forward, both sides.")
    parser.add_argument("--gen-prompts", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from excise.evaluate.subject import load_subject

    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    subject = load_subject(MODEL, device="cpu")
    bench_mc(subject, args.n, args.batch_size)
    bench_generation(subject, args.gen_prompts, args.gen_tokens)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
