"""Training memory and speed: our SFT step against TRL's SFTTrainer, and SKU's step against our SFT.

    .venv/bin/python benchmarks/bench_train.py --variants ours,trl,ours+gc,trl+gc,sft+gc,sku+gc
    .venv/bin/python benchmarks/bench_train.py --steps 3 --json runs/bench_train.json   # every variant

Every variant runs in a fresh subprocess (so its peak RSS is its own), on the same model
(``smollm2-135m-instruct``, fp32, LoRA r 8 / alpha 16 on q/v, dropout 0), AdamW at lr 1e-4,
the same torch threads. ``+gc`` means activation checkpointing (``--gradient-checkpointing``;
TRL: ``gradient_checkpointing=True``); our losses always run the head in chunks.

Against TRL (``pip install -e .[bench]``), same rows, batch and steps:

- ``ours``: ``excise train sft`` (:func:`excise.train.sft.run`, the real loop) on Alpaca-GPT4
  demo rows that fill ``--max-length`` exactly (``--template``, default chat; the response cut to fit), so
  every micro-batch is ``batch × max_length`` real tokens with no padding, whatever the order;
- ``trl``: ``trl.SFTTrainer`` (``SFTConfig``: no packing, completion-only loss) on the very
  same token ids, given pre-tokenized (``input_ids`` + ``completion_mask``) with its own
  defaults otherwise (it also logs entropy and token accuracy, as a TRL user gets).

SKU against SFT (the micro-batch of :class:`excise.train.unlearning.UnlearningData`: B harmful
PKU-SafeRLHF pairs, the same B prompts each with K responses of other prompts (B·K rows) and
B Alpaca rows, every row at most ``--max-length`` tokens), the variants differing only in
the loss:

- ``sft``: plain SFT — cross-entropy on the responses of all three sub-batches (no KL);
- ``sku``: ``excise train sku``'s step — 0.5·L_GD + L_RD + L_PD, the reference ``p_θo`` from
  the same PEFT model under ``disable_adapter()`` (one copy of the weights);
- ``two-copies``: the same SKU loss with ``p_θo`` from a second full model loaded beside
  the trained one — the reference code's design (franciscoliu/SKU loads
  ``pretrained_model`` next to ``model``).

The commands at their defaults (issue 26: SKU's default peak ≤ 1.15× SFT's), each the real
``run()`` of its command with every setting at the CLI's default but the step count:

- ``default-sft``: ``excise train sft --data ALPACA`` (``--normal``'s file; batch 4, ≤ 512 tokens);
- ``default-sku``: ``excise train sku --harmful PKU --normal ALPACA`` (batch 2: 2 harmful, 2×5
  mismatched and 2 normal rows of ≤ 256 tokens; activation checkpointing on by default);
- ``default-sku-no-gc``: the same with ``--no-gradient-checkpointing`` (the earlier default).

    .venv/bin/python benchmarks/bench_train.py --steps 5 --variants default-sft,default-sku,default-sku-no-gc

Reported: the process's peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``: weights,
activations, optimizer state and the Python runtime, the whole process as a user sees it),
its resident memory just before the first step (every weight read in by then: see
:func:`_paged_in`) and the growth over it, the growth per token of a step (MiB per real
token), tokens/s (real tokens over the step's wall time) and tokens per CPU second (over
the process's CPU time, ``time.process_time``: far less sensitive than wall time to other
jobs on a shared machine), on steps after the first (the first one warms up allocators;
CPU time is taken between the starts of consecutive steps, so the last step is not counted:
run 3 steps or more).

One torch thread by default: on this shared 2-core VM, with other work running, a forward
pass of SmolLM2 took 8 s with 2 threads and 2 s with 1 (OpenMP threads spin-wait for a
core another process holds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SKU_VARIANTS = ("sft", "sku", "two-copies")
TRL_VARIANTS = ("ours", "trl")
DEFAULT_VARIANTS = ("default-sft", "default-sku", "default-sku-no-gc")
VARIANTS = tuple(v + gc for v in TRL_VARIANTS + SKU_VARIANTS for gc in ("", "+gc")) + DEFAULT_VARIANTS


def _rss_mb() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _paged_in(model: Any) -> Any:
    """``model`` with every weight resident: transformers maps safetensors files, so weights
    are otherwise read in (≈ 0.5 GiB for SmolLM2 in fp32) during the first step and would
    count as that step's growth."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.detach().sum()
    return model


def worker(args: argparse.Namespace) -> dict:
    """One variant, in this process; returns the measurements."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    name, checkpointing = args.variant.removesuffix("+gc"), args.variant.endswith("+gc")
    if name in DEFAULT_VARIANTS:
        result = _default_command(args, name)
    elif name == "ours":
        result = _ours(args, checkpointing)
    elif name == "trl":
        result = _trl(args, checkpointing)
    else:
        result = _sku_step(args, name, checkpointing)
    timed = slice(1, None) if len(result["seconds_per_step"]) > 1 else slice(None)
    tokens, seconds = result["tokens_per_step"][timed], result["seconds_per_step"][timed]
    cpu = result["cpu_seconds_per_step"]
    cpu_timed = slice(1, None) if len(cpu) > 1 else slice(None)
    growth = _peak_mb() - result["rss_after_setup_mb"]
    return {
        "variant": args.variant,
        **result,
        "peak_rss_mb": round(_peak_mb(), 1),
        "step_growth_mb": round(growth, 1),
        "mib_per_token": round(growth / max(result["tokens_per_step"]), 3),
        "tokens_per_s": round(sum(tokens) / sum(seconds), 1),
        "tokens_per_cpu_s": round(
            sum(result["tokens_per_step"][: len(cpu)][cpu_timed]) / sum(cpu[cpu_timed]), 1
        ),
        "torch_threads": torch.get_num_threads(),
    }


def _full_length_rows(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The tokenizer and the Alpaca rows whose encoding fills ``max_length`` exactly (response cut)."""
    from excise.data import encode, load_instructions
    from excise.errors import DataError
    from excise.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    rows = []
    for example in load_instructions(args.normal):
        try:
            encoded = encode(tokenizer, example, args.template, max_length=args.max_length)
        except DataError:
            continue
        if len(encoded) == args.max_length:
            rows.append((example, encoded))
    needed = args.batch_size * args.steps
    if len(rows) < needed:
        raise SystemExit(f"only {len(rows)} rows fill {args.max_length} tokens; {needed} needed")
    return tokenizer, rows[:needed]


def _ours(args: argparse.Namespace, checkpointing: bool) -> dict:
    """``excise train sft`` on the full-length rows; RSS sampled when the first micro-batch is made."""
    import tempfile

    import excise.train.sft as sft

    _, rows = _full_length_rows(args)
    setup: list[float] = []
    calls: list[float] = []  # process CPU time at each micro-batch request: one per step
    made, load = sft.sft_micro_batches, sft.load_model
    sft.load_model = lambda *a, **k: _paged_in(load(*a, **k))

    def sampled(*a: Any, **k: Any) -> Any:
        micro_batch, per_epoch = made(*a, **k)

        def first_sampled(i: int) -> Any:
            if not setup:
                setup.append(_rss_mb())
            calls.append(time.process_time())
            return micro_batch(i)

        return first_sampled, per_epoch

    sft.sft_micro_batches = sampled
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        data.write_text(
            "".join(
                json.dumps({"instruction": e.prompt, "input": e.input or "", "output": e.response}) + "\n"
                for e, _ in rows
            )
        )
        cfg = sft.SftConfig(
            base=args.model, data=str(data), out=Path(tmp) / "out", split="all", steps=args.steps,
            batch_size=args.batch_size, max_length=args.max_length, lr=1e-4, lora_dropout=0.0,
            schedule="constant", gradient_checkpointing=checkpointing, template=args.template,
        )  # fmt: skip
        report = sft.run(cfg, progress=False)
    return {
        "rss_after_setup_mb": round(setup[0], 1),
        "tokens_per_step": [int(r["tokens"]) for r in report.log],
        "seconds_per_step": [round(r["seconds"], 3) for r in report.log],
        "cpu_seconds_per_step": [round(b - a, 3) for a, b in itertools.pairwise(calls)],  # not the last step
        "loss_per_step": [round(r["loss"], 4) for r in report.log],
    }


def _trl(args: argparse.Namespace, checkpointing: bool) -> dict:
    """TRL's SFTTrainer on the same token ids (pre-tokenized, completion-only loss)."""
    import tempfile
    import time

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from excise.models import load_model

    tokenizer, rows = _full_length_rows(args)
    dataset = Dataset.from_list(
        [
            {
                "input_ids": e.prompt_ids + e.response_ids,
                "completion_mask": [0] * len(e.prompt_ids) + [1] * len(e.response_ids),
            }
            for _, e in rows
        ]
    )
    measured: dict[str, list[float]] = {"seconds": [], "cpu": [], "setup": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            measured["setup"].append(_rss_mb())

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            measured["seconds"].append(time.perf_counter() - self.t0)
            measured["cpu"].append(time.process_time() - self.c0)

    torch.manual_seed(0)
    model = _paged_in(load_model(args.model))
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=1e-4, lr_scheduler_type="constant", max_length=args.max_length, packing=False,
            completion_only_loss=True, gradient_checkpointing=checkpointing, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
            seed=0, bf16=False,
        )  # fmt: skip
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
            callbacks=[Timer()],
        )  # fmt: skip
        trainer.train()
        losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    return {
        "rss_after_setup_mb": round(measured["setup"][0], 1),
        "tokens_per_step": [args.batch_size * args.max_length] * len(measured["seconds"]),
        "seconds_per_step": [round(t, 3) for t in measured["seconds"]],
        "cpu_seconds_per_step": [round(t, 3) for t in measured["cpu"][:-1]],  # as ours: all but the last
        "loss_per_step": losses,
    }


def _sku_step(args: argparse.Namespace, variant: str, checkpointing: bool) -> dict:
    """One SKU micro-batch per step, the loss of ``variant`` (sft, sku, two-copies)."""
    import torch

    from excise.models import load_model, load_tokenizer
    from excise.train.lora import attach_lora, enable_activation_checkpointing
    from excise.train.losses import frozen_model_reference, sequence_nll
    from excise.train.sku import SkuConfig, sku_terms
    from excise.train.unlearning import Term, prepare_data

    torch.manual_seed(0)
    cfg = SkuConfig(
        base=args.model, harmful=args.harmful, normal=args.normal, out=Path("unused"), k=args.k,
        batch_size=args.batch_size, max_length=args.max_length, lora_dropout=0.0,
    )  # fmt: skip
    tokenizer = load_tokenizer(cfg.base)
    streams = ["harmful", "mismatch", "normal"]
    data = prepare_data(cfg, tokenizer, streams)
    model = attach_lora(_paged_in(load_model(cfg.base)), cfg.lora_settings())
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()

    reference = None
    if variant == "sft":
        ce = lambda m, b, _ref: sequence_nll(m, b)  # noqa: E731
        terms = [Term(s, s, ce, 1.0) for s in streams]
    else:
        terms = sku_terms(cfg)
        if variant == "two-copies":
            reference = frozen_model_reference(_paged_in(load_model(cfg.base)).requires_grad_(False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rss_setup = _rss_mb()

    seconds, cpu, tokens = [], [], []
    for step in range(args.steps):
        batch = data.micro_batch(step, streams)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = sum(t.weight * t.loss(model, batch[t.stream], reference) for t in terms)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        tokens.append(sum(int(batch[s]["attention_mask"].sum()) for s in streams))
    return {
        "rss_after_setup_mb": round(rss_setup, 1),
        "tokens_per_step": tokens,
        "rows_per_step": {s: int(data.micro_batch(0, streams)[s]["input_ids"].shape[0]) for s in streams},
        "seconds_per_step": [round(s, 3) for s in seconds],
        "cpu_seconds_per_step": [round(c, 3) for c in cpu],
    }


def _default_command(args: argparse.Namespace, variant: str) -> dict:
    """``excise train sft`` or ``sku`` at the CLI's defaults, ``--steps`` steps, progress off."""
    import tempfile

    import excise.train.sft as sft
    import excise.train.unlearning as unlearning
    from excise.train.sku import SkuConfig
    from excise.train.sku import run as run_sku

    setup: list[float] = []
    calls: list[float] = []  # process CPU time at each micro-batch request: one per step
    module = sft if variant == "default-sft" else unlearning
    train, load = module.train, module.load_model
    module.load_model = lambda *a, **k: _paged_in(load(*a, **k))

    def sampled_train(model: Any, micro_batch: Any, *a: Any, **k: Any) -> Any:
        def first_sampled(i: int) -> Any:
            if not setup:
                setup.append(_rss_mb())
            calls.append(time.process_time())
            return micro_batch(i)

        return train(model, first_sampled, *a, **k)

    module.train = sampled_train
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        if variant == "default-sft":
            report = sft.run(
                sft.SftConfig(base=args.model, data=args.normal, out=out, steps=args.steps), progress=False
            )
        else:
            cfg = SkuConfig(
                base=args.model, harmful=args.harmful, normal=args.normal, out=out, steps=args.steps,
                gradient_checkpointing=False if variant.endswith("-no-gc") else None,
            )  # fmt: skip
            report = run_sku(cfg, progress=False)
        recorded = json.loads((out / "train_config.json").read_text())["config"]
    return {
        "rss_after_setup_mb": round(setup[0], 1),
        "gradient_checkpointing": recorded["gradient_checkpointing"],
        "batch_size": recorded["batch_size"],
        "max_length": recorded["max_length"],
        "tokens_per_step": [int(r["tokens"]) for r in report.log],
        "seconds_per_step": [round(r["seconds"], 3) for r in report.log],
        "cpu_seconds_per_step": [round(b - a, 3) for a, b in itertools.pairwise(calls)],  # not the last step
    }


# Each variant's yardstick: ours against TRL, SKU (and the two-copy design) against our SFT, the
# commands at their defaults against default SFT.
_BASELINE = {"ours": "trl", "sku": "sft", "two-copies": "sft"}
_BASELINE |= {"default-sku": "default-sft", "default-sku-no-gc": "default-sft"}


def _baseline_of(variant: str) -> str | None:
    if variant in DEFAULT_VARIANTS:
        return _BASELINE.get(variant)
    name, gc = variant.removesuffix("+gc"), "+gc" if variant.endswith("+gc") else ""
    return _BASELINE[name] + gc if name in _BASELINE else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--template", default="chat", help="prompt template of the SFT rows (a base model: question-answer)"
    )
    parser.add_argument(
        "--harmful", default=str(SHARED / "pku_saferlhf/pku_saferlhf_test_safe_unsafe_pairs.json")
    )
    parser.add_argument("--normal", default=str(SHARED / "alpaca_gpt4/alpaca_en_demo.json"))
    parser.add_argument("--rows", type=int, default=8, help="rows per step against TRL (each max-length)")
    parser.add_argument("--batch-size", type=int, default=4, help="SKU step: harmful prompts and normal rows")
    parser.add_argument("--k", type=int, default=5, help="responses of other prompts per harmful prompt")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant (the first is not timed)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.variant:
        if args.variant.removesuffix("+gc") in TRL_VARIANTS:
            args.batch_size = args.rows
        print(json.dumps(worker(args)))
        return
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = {}
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k
            in (
                "model",
                "template",
                "harmful",
                "normal",
                "rows",
                "batch_size",
                "k",
                "max_length",
                "steps",
                "threads",
            )
        ]
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant}: {results[variant]}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    print(
        f"\n{args.model}, LoRA r 8 / alpha 16 on q/v, fp32, {args.steps} steps per variant, "
        f"started {started}. Against TRL: {args.rows} rows × {args.max_length} tokens per step. SKU step: "
        f"{args.batch_size} harmful + {args.batch_size}×{args.k} mismatched + {args.batch_size} normal rows, "
        f"≤ {args.max_length} tokens."
    )
    loads = f"load average {load_before} before, {load_after} after"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}; {loads}")
    print(
        "| variant | peak RSS (MiB) | RSS before step 1 | growth (MiB) | MiB / token | tokens/s "
        "| tokens / CPU s | against | peak × | tokens/s × | tokens / CPU s × |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for name, r in results.items():
        base = results.get(_baseline_of(name) or "")
        ratios = (
            f"{_baseline_of(name)} | {r['peak_rss_mb'] / base['peak_rss_mb']:.3f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.3f} | "
            f"{r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.3f}"
            if base
            else "– | – | – | –"
        )
        print(
            f"| {name} | {r['peak_rss_mb']:.0f} | {r['rss_after_setup_mb']:.0f} | "
            f"{r['step_growth_mb']:.0f} | {r['mib_per_token']:.3f} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_cpu_s']:.1f} | {ratios} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": {k: str(v) for k, v in vars(args).items()}, "load": [load_before, load_after]}
        args.json.write_text(json.dumps(payload | {"results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
