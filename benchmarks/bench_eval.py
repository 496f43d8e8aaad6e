"""TruthfulQA MC (MC1 + MC2) on SmolLM2-135M: excise's scorer against lm-evaluation-harness, and
batched generation against one-by-one ``generate``, on one already-loaded model.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/bench_eval.py --n 20

Prints seconds, questions/s, the speed ratio and the MC1/MC2 difference in points (target: ≥ 2×,
≤ 0.5 points), the largest per-choice log-likelihood difference, and generation tokens/s.

``--sections speed`` (issue 26 item 4) puts the generation paths side by side on the first
``--speed-prompts`` AdvBench prompts (chat-templated, greedy, ``--speed-tokens`` new tokens):
plain transformers ``generate`` and excise's ``generate`` in float32 (today's default) and
bfloat16, batch sizes 16 and 32, then with a LoRA (``--adapter``, else a seeded random one of
``excise train``'s default shape) unmerged and merged. Each row: seconds, tokens/s, the ratio to
excise float32, the share of answers identical to excise float32's, the mean share of answer
tokens before the first difference, and the harmful rate the default judge (harm-cross) gives::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eval.py --sections speed --threads 2

Results go to docs/BENCHMARKS.md by hand (machine, load, N, settings).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
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
    cfg = EvalConfig(model=MODEL, head=n, batch_size=batch_size)  # lm-eval's limit: the first n
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


def _advbench_prompts(tok, n: int) -> tuple[list[str], list[list[int]]]:
    """The first ``n`` AdvBench goals and their chat-templated token ids."""
    from excise.models.generation import chat_prompt_ids

    with (ROOT.parent / "shared/data/advbench/harmful_behaviors.csv").open(newline="") as f:
        goals = [row["goal"] for row in csv.DictReader(f)][:n]
    return goals, [chat_prompt_ids(tok, g) for g in goals]


def _random_adapter(folder: Path) -> Path:
    """A seeded random LoRA of ``excise train``'s default shape (r 8, alpha 16, q_proj + v_proj),
    scaled so that it changes some answers without breaking the text."""
    from peft import LoraConfig, get_peft_model

    from excise.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(
        load_model(MODEL),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    model.save_pretrained(folder)
    return folder


def _plain_generate(model, tok, prompts: list[list[int]], new_tokens: int, batch_size: int) -> list[str]:
    """Plain transformers ``generate``: batches in input order, left-padded by the tokenizer."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = tok.pad({"input_ids": prompts[start : start + batch_size]}, return_tensors="pt")
        output = model.generate(
            **batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        width = batch["input_ids"].shape[1]
        answers += [t.strip() for t in tok.batch_decode(output[:, width:], skip_special_tokens=True)]
    return answers


def _shared_prefix(tok, a: str, b: str) -> float:
    """Share of the longer answer's tokens before the first token where ``a`` and ``b`` differ."""
    x, y = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
    same = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
    return same / max(len(x), len(y), 1)


def bench_speed(n: int, new_tokens: int, adapter: Path | None, repeats: int, judge_spec: str) -> None:
    """Generation paths side by side (see the module docstring); the best of ``repeats`` runs."""
    from excise.evaluate.judges import load_judge
    from excise.evaluate.subject import load_subject
    from excise.models.generation import GenerationSettings, generate

    tmp = None
    if adapter is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-eval-lora-")
        adapter = _random_adapter(Path(tmp.name))
    subjects = {
        (dtype, merge, with_adapter): load_subject(
            MODEL, adapter if with_adapter else None, merge=merge, dtype=dtype, device="cpu"
        )
        for dtype, merge, with_adapter in [
            ("float32", False, False), ("bfloat16", False, False), ("float32", False, True),
            ("float32", True, True), ("bfloat16", False, True), ("bfloat16", True, True),
        ]
    }  # fmt: skip
    tok = subjects["float32", False, False].tokenizer
    goals, prompts = _advbench_prompts(tok, n)
    from peft import PeftModel

    from excise.models import load_model

    # Before issue 26: PEFT's default kept the LoRA in float32 on the bfloat16 base.
    upcast = PeftModel.from_pretrained(load_model(MODEL, dtype=torch.bfloat16), str(adapter)).eval()

    def excise_side(dtype, merge=False, with_adapter=False, batch_size=16):
        settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=batch_size)
        model = subjects[dtype, merge, with_adapter].model
        return lambda: generate(model, tok, prompts, settings, progress=False)

    def plain_side(dtype):
        model = subjects[dtype, False, False].model
        return lambda: _plain_generate(model, tok, prompts, new_tokens, 16)

    # (label, run, the float32 side its answers are compared with)
    base_rows = [
        ("transformers generate, float32, batch 16", plain_side("float32"), "base"),
        ("excise float32, batch 16 (default)", excise_side("float32"), "base"),
        ("transformers generate, bfloat16, batch 16", plain_side("bfloat16"), "base"),
        ("excise bfloat16, batch 16", excise_side("bfloat16"), "base"),
        ("excise float32, batch 32", excise_side("float32", batch_size=32), "base"),
        ("excise bfloat16, batch 32", excise_side("bfloat16", batch_size=32), "base"),
    ]
    adapter_rows = [
        ("excise float32, LoRA unmerged (default)", excise_side("float32", with_adapter=True), "lora"),
        ("excise float32, LoRA merged", excise_side("float32", True, True), "lora"),
        ("excise bfloat16, LoRA unmerged", excise_side("bfloat16", with_adapter=True), "lora"),
        (
            "excise bfloat16, LoRA unmerged in float32",
            lambda: generate(upcast, tok, prompts, GenerationSettings(new_tokens, 16), progress=False),
            "lora",
        ),
        ("excise bfloat16, LoRA merged", excise_side("bfloat16", True, True), "lora"),
    ]
    rows = base_rows + adapter_rows
    with torch.inference_mode():
        warm = GenerationSettings(max_new_tokens=4, batch_size=16)  # oneDNN sets up on first use
        for model in [s.model for s in subjects.values()] + [upcast]:
            generate(model, tok, prompts[:16], warm, progress=False)
        seconds = {label: float("inf") for label, _, _ in rows}
        answers: dict[str, list[str]] = {}
        for rep in range(repeats):  # alternate the order between repeats: load drifts
            for label, run, _ in rows if rep % 2 == 0 else rows[::-1]:
                clock = time.perf_counter()
                answers[label] = run()
                seconds[label] = min(seconds[label], time.perf_counter() - clock)
                print(
                    f"  [{rep + 1}/{repeats}] {label}: {time.perf_counter() - clock:.1f} s", file=sys.stderr
                )
    if tmp is not None:
        tmp.cleanup()
    judge = load_judge(judge_spec)
    reference = {
        "base": "excise float32, batch 16 (default)",
        "lora": "excise float32, LoRA unmerged (default)",
    }
    total = n * new_tokens
    print(
        f"Generation speed, {n} AdvBench prompts × {new_tokens} new tokens, greedy, SmolLM2-135M-Instruct, "
        f"best of {repeats}; adapter {'random r 8 q,v' if tmp is not None else adapter}"
    )
    head = f"  {'':44}{'seconds':>8}{'tok/s':>8}{'ratio':>7}{'identical':>10}{'prefix':>8}{'harmful':>9}"
    for title, group in (("base model", base_rows), ("with the LoRA", adapter_rows)):
        print(f"  {title}\n{head}")
        for label, _, kind in group:
            ref = reference[kind]
            same = sum(a == b for a, b in zip(answers[label], answers[ref], strict=True)) / n
            prefix = (
                sum(_shared_prefix(tok, a, b) for a, b in zip(answers[label], answers[ref], strict=True)) / n
            )
            scores = judge.score(goals, answers[label])
            harmful = sum(s > judge.threshold for s in scores) / n
            print(
                f"  {label:44}{seconds[label]:8.1f}{total / seconds[label]:8.1f}"
                f"{seconds[ref] / seconds[label]:7.2f}{same:10.3f}{prefix:8.3f}{harmful:9.3f}"
            )
    print("  ratio: excise float32's seconds (same table) / the row's; identical, prefix: against it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="TruthfulQA questions (the first N).")
    parser.add_argument("--batch-size", type=int, default=32, help="Rows per forward, both sides.")
    parser.add_argument("--gen-prompts", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument(
        "--sections", default="mc,batching", help="Comma list of mc, batching, speed (issue 26 item 4)."
    )
    parser.add_argument("--speed-prompts", type=int, default=32, help="speed: the first N AdvBench prompts.")
    parser.add_argument("--speed-tokens", type=int, default=64, help="speed: new tokens per prompt.")
    parser.add_argument("--adapter", type=Path, help="speed: a LoRA folder (default: a seeded random one).")
    parser.add_argument("--repeats", type=int, default=2, help="speed: runs per row (the best counts).")
    parser.add_argument("--judge", default="harm-cross", help="speed: the judge of the harmful-rate column.")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if unknown := sections - {"mc", "batching", "speed"}:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from excise.evaluate.subject import load_subject

    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    if sections & {"mc", "batching"}:
        subject = load_subject(MODEL, device="cpu")
        if "mc" in sections:
            bench_mc(subject, args.n, args.batch_size)
        if "batching" in sections:
            bench_generation(subject, args.gen_prompts, args.gen_tokens)
    if "speed" in sections:
        bench_speed(args.speed_prompts, args.speed_tokens, args.adapter, args.repeats, args.judge)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
