"""Peak memory and tokens/s of one SKU training step against plain SFT and the two-copy reference design.

    .venv/bin/python benchmarks/bench_train.py                      # SmolLM2-135M, 2 steps per variant
    .venv/bin/python benchmarks/bench_train.py --steps 3 --json runs/bench_train.json

Every variant runs in a fresh subprocess (so its peak RSS is its own), on the same model
(``smollm2-135m-instruct``, fp32, LoRA r 8 on q/v), the same data and the very same
micro-batches: micro-batch ``i`` of :class:`excise.train.unlearning.UnlearningData` with
B harmful PKU-SafeRLHF pairs (``train`` split), the same B prompts each with K responses of
other prompts (B·K rows) and B Alpaca rows, every row at most ``--max-length`` tokens.
The variants differ only in the loss of that micro-batch:

- ``sft``: plain SFT — cross-entropy on the responses of all three sub-batches (no KL);
- ``sku``: ``excise train sku``'s step — 0.5·L_GD + L_RD + L_PD, the reference ``p_θo`` from
  the same PEFT model under ``disable_adapter()`` (one copy of the weights);
- ``two-copies``: the same SKU loss with ``p_θo`` from a second full model loaded beside
  the trained one — the reference code's design (franciscoliu/SKU loads
  ``pretrained_model`` next to ``model``).

Each step is forward + backward + AdamW. Reported: the process's peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, so weights, activations, optimizer state
and the Python runtime, the whole process as a user sees it), its resident memory after
setup (before the first step) and the step's own growth; tokens/s is the tokens of the
micro-batch (the sum of its attention masks) over the step's wall time, on steps after
the first (the first one warms up allocators).

One torch thread by default: on this shared 2-core VM, with other work running, a forward
pass of SmolLM2 took 8 s with 2 threads and 2 s with 1 (OpenMP threads spin-wait for a
core another process holds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VARIANTS = ("sft", "sku", "two-copies")


def _rss_mb() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> dict:
    """One variant, in this process: setup, then ``args.steps`` steps; returns the measurements."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from excise.models import load_model, load_tokenizer
    from excise.train.lora import attach_lora
    from excise.train.losses import frozen_model_reference, sequence_nll
    from excise.train.sku import SkuConfig, sku_terms
    from excise.train.unlearning import Term, prepare_data

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SkuConfig(
        base=args.model, harmful=args.harmful, normal=args.normal, out=Path("unused"), k=args.k,
        batch_size=args.batch_size, max_length=args.max_length, lora_dropout=0.0,
    )  # fmt: skip
    tokenizer = load_tokenizer(cfg.base)
    streams = ["harmful", "mismatch", "normal"]
    data = prepare_data(cfg, tokenizer, streams)
    model = attach_lora(load_model(cfg.base), cfg.lora_settings())
    model.train()

    reference = None
    if args.variant == "sft":
        ce = lambda m, b, _ref: sequence_nll(m, b)  # noqa: E731
        terms = [Term(s, s, ce, 1.0) for s in streams]
    else:
        terms = sku_terms(cfg)
        if args.variant == "two-copies":
            reference = frozen_model_reference(load_model(cfg.base).requires_grad_(False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rss_setup = _rss_mb()

    seconds, tokens = [], []
    for step in range(args.steps):
        batch = data.micro_batch(step, streams)
        t0 = time.perf_counter()
        loss = sum(t.weight * t.loss(model, batch[t.stream], reference) for t in terms)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        tokens.append(sum(int(batch[s]["attention_mask"].sum()) for s in streams))
    timed = slice(1, None) if args.steps > 1 else slice(None)
    return {
        "variant": args.variant,
        "peak_rss_mb": round(_peak_mb(), 1),
        "rss_after_setup_mb": round(rss_setup, 1),
        "step_growth_mb": round(_peak_mb() - rss_setup, 1),
        "tokens_per_step": tokens,
        "rows_per_step": {s: int(data.micro_batch(0, streams)[s]["input_ids"].shape[0]) for s in streams},
        "seconds_per_step": [round(s, 3) for s in seconds],
        "tokens_per_s": round(sum(tokens[timed]) / sum(seconds[timed]), 1),
        "torch_threads": torch.get_num_threads(),
    }


def _ratio(result: dict, sft: dict | None, key: str) -> str:
    return f"{result[key] / sft[key]:.3f}" if sft else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--harmful", default=str(SHARED / "pku_saferlhf/pku_saferlhf_test_safe_unsafe_pairs.json")
    )
    parser.add_argument("--normal", default=str(SHARED / "alpaca_gpt4/alpaca_en_demo.json"))
    parser.add_argument("--batch-size", type=int, default=4, help="harmful prompts and normal rows per step")
    parser.add_argument("--k", type=int, default=5, help="responses of other prompts per harmful prompt")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant (the first is not timed)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return

    load_before = os.getloadavg()
    results = {}
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k in ("model", "harmful", "normal", "batch_size", "k", "max_length", "steps", "threads")
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant}: {results[variant]}", file=sys.stderr)
    load_after = os.getloadavg()

    sft = results.get("sft")
    print(
        f"\nSmolLM2-135M ({args.model}), LoRA r 8 q/v, fp32; micro-batch: {args.batch_size} harmful + "
        f"{args.batch_size}×{args.k} mismatched + {args.batch_size} normal rows, ≤ {args.max_length} tokens; "
        f"{args.steps} steps per variant"
    )
    loads = f"load average {load_before} before, {load_after} after"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}; {loads}")
    print("| variant | peak RSS (MiB) | × sft | RSS after setup | step growth | × sft | tokens/s | × sft |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        keys = ("peak_rss_mb", "step_growth_mb", "tokens_per_s")
        peak, growth, speed = (_ratio(r, sft, key) for key in keys)
        print(
            f"| {name} | {r['peak_rss_mb']:.0f} | {peak} | {r['rss_after_setup_mb']:.0f} | "
            f"{r['step_growth_mb']:.0f} | {growth} | {r['tokens_per_s']:.1f} | {speed} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": {k: str(v) for k, v in vars(args).items()}, "load": [load_before, load_after]}
        args.json.write_text(json.dumps(payload | {"results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
