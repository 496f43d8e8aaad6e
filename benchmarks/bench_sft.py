"""Seconds per step and peak memory of `excise train sft`, fp32 vs bf16 vs a full-logits loss.

    .venv/bin/python benchmarks/bench_sft.py                  # SmolLM2-135M, HaluEval, 6 steps each
    .venv/bin/python benchmarks/bench_sft.py --steps 8 --json runs/bench_sft.json

Every variant runs in a fresh subprocess (so its peak RSS is its own) through the real
recipe (:func:`excise.train.sft.run`: HaluEval QA ``train`` split, chat template with the
knowledge paragraph, ``--max-length``, LoRA r 8 on q/v, AdamW), on the very same
micro-batches. The variants:

- ``fp32``: the recipe as shipped — left padding, the LM head run only over the response
  columns (``logits_to_keep``, ``excise.train.nll``);
- ``bf16``: the same under ``--bf16`` (bfloat16 autocast, float32 weights);
- ``full-logits``: the same loop and batches, the loss computed the usual Hugging Face
  way (``model(..., labels=labels)``: logits over every position, as Ext-Sub's and SKU's
  reference trainers do), to show what ``logits_to_keep`` saves.

Reported: median seconds per optimizer step over the steps after the first (which warms up
allocators), tokens per second (the sum of the step's attention masks over its time), and
the process's peak resident memory (``ru_maxrss``: weights, activations, optimizer state
and the Python runtime). One torch thread by default, as on a shared 2-core VM more
threads spin-wait for cores other processes hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "halueval" / "qa_data.json"
VARIANTS = ("fp32", "bf16", "full-logits")


def child(args: argparse.Namespace) -> None:
    """Run one variant and print one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import excise.train.sft as sft
    from excise.train.sft import SftConfig, run

    if args.variant == "full-logits":

        def hf_loss(model, batch):  # the usual way: every position through the LM head
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                labels=batch["labels"],
                use_cache=False,
            )
            return out.loss

        # Swap the recipe's loss for this variant only (run() looks it up at call time).
        sft.response_nll = hf_loss

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SftConfig(
            base=args.model, data=str(args.data), out=Path(tmp) / "adapter", format="paired-expert",
            steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
            bf16=args.variant == "bf16", lora_dropout=0.0, seed=0,
        )  # fmt: skip
        report = run(cfg, progress=False)
    later = report.log[1:] or report.log
    seconds = statistics.median(r["seconds"] for r in later)
    tokens = statistics.median(r["tokens"] for r in later)
    print(
        json.dumps(
            {
                "variant": args.variant,
                "s_per_step": round(seconds, 3),
                "tokens_per_step": tokens,
                "tokens_per_s": round(tokens / seconds, 1),
                "losses": [round(r["loss"], 4) for r in report.log],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
    }
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model,
               "--data", str(args.data), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)

    base = next((r for r in results if r["variant"] == "fp32"), results[0])
    load = os.getloadavg()[0]
    print(f"SmolLM2 SFT step, batch {args.batch_size}, max length {args.max_length}, "
          f"{args.threads} thread(s), {platform.machine()}, load average {load:.1f}")  # fmt: skip
    print(f"{'variant':<12} {'s/step':>8} {'× fp32':>8} {'tokens/s':>9} {'peak RSS MiB':>13}")
    for r in results:
        ratio = r["s_per_step"] / base["s_per_step"]
        line = f"{r['variant']:<12} {r['s_per_step']:>8.3f} {ratio:>8.2f} {r['tokens_per_s']:>9.1f}"
        print(f"{line} {r['peak_rss_mb']:>13.0f}")
    gaps = {r["variant"]: round(abs(r["losses"][0] - base["losses"][0]), 5) for r in results}
    print(f"first-step loss, |variant - fp32|: {gaps} (same batches, same initial adapter)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": vars(args) | {"data": str(args.data)}, "results": results}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
