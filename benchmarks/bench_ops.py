"""Ext-Sub on LLaMA-7B-shaped LoRA adapters: excise against the published algorithm.

Measures, side by side in one run (results in docs/BENCHMARKS.md):

- excise's exact low-rank Ext-Sub (``apply_operator("ext_sub", …)``: load, compute,
  save) and its compute alone, against the dense row-loop reference
  (``benchmarks/reference_ext_sub.py``, re-implemented from HITsz-TMG/Ext-Sub);
- excise against a plain safetensors load + save of the two inputs;
- the output size (excise's rank ``r1 + r2`` file vs the published rank-``in`` form);
- the relative error of excise's result against the reference, per module;
- the whole ``excise ops ext-sub`` process in the paper's setting (q,v, r=16,
  32 layers), against the published code's wall time, peak memory and output size,
  which the project measured earlier on this machine (constants below).

Commands::

    .venv/bin/python benchmarks/bench_ops.py                        # 8 layers (make bench)
    .venv/bin/python benchmarks/bench_ops.py --full --json runs/bench_ops.json
    .venv/bin/python benchmarks/bench_ops.py --skip-reference --profile runs/ops.prof
"""

from __future__ import annotations

from excise.runtime import configure_process

# The process settings of the `excise` CLI (excise/runtime.py), so the in-process
# timings below match what `excise ops` does. Must run before numpy loads.
configure_process()

import argparse
import cProfile
import datetime as dt
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from excise.pem.apply import apply_operator
from excise.pem.io import load_adapter, save_adapter, verified_digest
from excise.pem.ops import ext_sub

# ----------------------------------------------------------------------------- settings

HIDDEN, MLP = 4096, 11008  # LLaMA-7B
RANK, LORA_ALPHA = 16, 32  # scale 2
LAM = 1.0
MODULE_SHAPES = {  # module → (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}
PAPER_MODULES = ("self_attn.q_proj", "self_attn.v_proj")  # the paper's LoRA setting
PAPER_LAYERS = 32
RHO_RANGE = (0.2, 0.9)  # per-module correlation of anti-expert factors with the expert's

# The published ext_sub.py on two q,v r=16 32-layer adapters, measured earlier by the
# project on this machine (issue text); not measured by this script.
PUBLISHED = {"wall_s": 32.5, "peak_gb": 17.8, "output_gb": 8.6}

GB, MB = 1e9, 1e6  # decimal units throughout


# ----------------------------------------------------------------------------- inputs


def write_lora_pair(root: Path, layers: int, modules: tuple[str, ...], seed: int) -> tuple[Path, Path]:
    """Write a random expert / anti-expert pair of PEFT LoRA folders (fp32) under ``root``.

    ``B`` is non-zero (randn·0.01). The anti-expert's factors are ``ρ·expert + √(1−ρ²)·noise``
    with ``ρ`` drawn per module from ``RHO_RANGE``, so row cosines spread over about
    ``ρ²`` ∈ [0.04, 0.8] instead of all being ~0 as for independent random adapters.
    """
    rng = np.random.default_rng(seed)
    expert: dict[str, np.ndarray] = {}
    anti: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for module in modules:
            n_out, n_in = MODULE_SHAPES[module]
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            rho = rng.uniform(*RHO_RANGE)
            mix = np.sqrt(1.0 - rho**2)
            A1 = _randn(rng, (RANK, n_in), 1 / np.sqrt(n_in))  # (r, in)
            B1 = _randn(rng, (n_out, RANK), 0.01)  # (out, r)
            A2 = (rho * A1 + mix * _randn(rng, (RANK, n_in), 1 / np.sqrt(n_in))).astype(np.float32)  # (r, in)
            B2 = (rho * B1 + mix * _randn(rng, (n_out, RANK), 0.01)).astype(np.float32)  # (out, r)
            expert[f"{prefix}.lora_A.weight"], expert[f"{prefix}.lora_B.weight"] = A1, B1
            anti[f"{prefix}.lora_A.weight"], anti[f"{prefix}.lora_B.weight"] = A2, B2
    folders = []
    for name, tensors in (("expert", expert), ("anti_expert", anti)):
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(_peft_config(modules), indent=2) + "\n")
        folders.append(folder)
    return folders[0], folders[1]


def _randn(rng: np.random.Generator, shape: tuple[int, int], std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _peft_config(modules: tuple[str, ...]) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic/llama-7b-shape",
        "r": RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.05,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(m.split(".")[-1] for m in modules),
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def _weights(folder: Path) -> Path:
    return folder / "adapter_model.safetensors"


# ----------------------------------------------------------------------------- timing


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def time_load_save(inputs: list[Path], scratch: Path, repeats: int) -> list[float]:
    """Seconds for ``load_file`` + ``save_file`` of every input, one per repeat."""
    times = []
    for rep in range(repeats):
        dst = scratch / f"load_save_{rep}"
        dst.mkdir()

        def run(dst: Path = dst) -> None:
            for k, folder in enumerate(inputs):
                save_file(
                    load_file(str(_weights(folder))), str(dst / f"{k}.safetensors"), metadata={"format": "pt"}
                )

        times.append(_timed(run)[0])
        shutil.rmtree(dst)
    return times


def time_ours(expert: Path, anti: Path, scratch: Path, repeats: int) -> tuple[dict[str, list[float]], Path]:
    """excise end to end (``apply_operator``) and its load / compute / save parts.

    Returns the times per repeat and the folder of the last end-to-end output (kept).
    """
    times: dict[str, list[float]] = defaultdict(list)
    out = scratch / "ours"
    for rep in range(repeats):
        out = scratch / f"ours_{rep}"
        t, _ = _timed(lambda out=out: apply_operator("ext_sub", [expert, anti], out, params={"lam": LAM}))
        times["end_to_end"].append(t)
        out_sha = scratch / f"ours_sha256_{rep}"
        t, _ = _timed(
            lambda out=out_sha: apply_operator(
                "ext_sub", [expert, anti], out, params={"lam": LAM}, digest="sha256"
            )
        )
        times["end_to_end_sha256"].append(t)
        shutil.rmtree(out_sha)
        t, (e, a) = _timed(
            lambda: tuple(load_adapter(f, checksum=False, check_finite=False) for f in (expert, anti))
        )
        times["load"].append(t)
        t, _ = _timed(lambda: [verified_digest(_weights(f)) for f in (expert, anti)])
        times["checksums"].append(t)
        t, result = _timed(lambda e=e, a=a: ext_sub(e, a, lam=LAM))
        times["compute"].append(t)
        parts = scratch / f"ours_parts_{rep}"
        t, _ = _timed(lambda result=result, parts=parts: save_adapter(result, parts))
        times["save"].append(t)
        shutil.rmtree(parts)
        del e, a, result
        if rep < repeats - 1:
            shutil.rmtree(out)
    return dict(times), out


def profile_ours(expert: Path, anti: Path, scratch: Path, stats_file: Path) -> str:
    """cProfile one ``apply_operator`` run; writes ``stats_file`` and returns the top entries."""
    profiler = cProfile.Profile()
    out = scratch / "ours_profiled"
    profiler.runcall(apply_operator, "ext_sub", [expert, anti], out, params={"lam": LAM})
    shutil.rmtree(out)
    stats_file.parent.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(str(stats_file))
    lines = []
    for key in ("cumulative", "tottime"):
        stream = _Capture()
        pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(18)
        lines.append(f"--- sorted by {key}\n{stream.text}")
    return "\n".join(lines)


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s


# ----------------------------------------------------------------------------- reference and accuracy


def _exact_ext_sub(W1: np.ndarray, W2: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """DESIGN.md §1 in float64, vectorised (independent of excise's engine); also the row cosines."""
    n1 = W1 / np.linalg.norm(W1, axis=1, keepdims=True)  # (out, in)
    n2 = W2 / np.linalg.norm(W2, axis=1, keepdims=True)  # (out, in)
    cos = np.einsum("ij,ij->i", n1, n2)  # (out,)
    c = n1
    c += n2  # n1 is not used again
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    g = np.einsum("ij,ij->i", W2, c)[:, None] * c  # (out, in)
    return W1 - lam * (W2 - g), cos


def _rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def run_reference(expert: Path, anti: Path, ours_out: Path) -> dict[str, Any]:
    """Time the reference row loop module by module and compare each result with excise's."""
    import torch
    from reference_ext_sub import load_lora, module_name, published_output_bytes, reference_ext_sub
    from tqdm import tqdm

    load_s, ((w1, s1), (w2, s2)) = _timed(lambda: (load_lora(expert), load_lora(anti)))
    assert s1 == s2, "the comparison assumes equal LoRA scales (as the published code does)"
    ours = load_adapter(ours_out).modules
    per_kind: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, float] = defaultdict(float)
    err_ours_ref, err_ours_exact, err_ref_exact, cos_means = [], [], [], []
    n_modules = sum(".lora_B." in k for k in w1)
    bar = tqdm(reference_ext_sub(w1, w2, scale=s1, lam=LAM), total=n_modules, desc="reference", unit="module")
    for m in bar:
        name = module_name(m.key)
        per_kind[name.split(".")[-1]].append(m.total_s)
        for phase in ("densify_s", "normalise_s", "row_loop_s", "combine_s"):
            phases[phase] += getattr(m, phase)
        # --- not timed: accuracy
        key_A = m.key.replace(".lora_B.", ".lora_A.")
        W1 = s1 * (w1[m.key].numpy().astype(np.float64) @ w1[key_A].numpy().astype(np.float64))  # (out, in)
        W2 = s2 * (w2[m.key].numpy().astype(np.float64) @ w2[key_A].numpy().astype(np.float64))  # (out, in)
        exact, cos = _exact_ext_sub(W1, W2, LAM)  # (out, in), (out,)
        del W1, W2
        ref = m.W.numpy().astype(np.float64)  # (out, in)
        mine = ours[name].dense(np.float64)  # (out, in)
        err_ours_ref.append(_rel_err(mine, ref))
        err_ours_exact.append(_rel_err(mine, exact))
        err_ref_exact.append(_rel_err(ref, exact))
        cos_means.append(float(cos.mean()))
        bar.set_postfix(err=f"{max(err_ours_ref):.1e}")
        del exact, ref, mine, m
    compute_s = sum(phases.values())
    return {
        "torch_threads": torch.get_num_threads(),
        "modules": n_modules,
        "load_s": load_s,
        "compute_s": compute_s,
        "total_s": load_s + compute_s,
        "phases_s": dict(phases),
        "per_module_mean_s": {kind: statistics.mean(v) for kind, v in per_kind.items()},
        "output_bytes": published_output_bytes(w1),
        "rel_err_ours_vs_reference_max": max(err_ours_ref),
        "rel_err_ours_vs_exact_max": max(err_ours_exact),
        "rel_err_reference_vs_exact_max": max(err_ref_exact),
        "row_cos_module_mean": {
            "min": min(cos_means),
            "mean": statistics.mean(cos_means),
            "max": max(cos_means),
        },
    }


# ----------------------------------------------------------------------------- whole process


def run_process(root: Path, runs: int, seed: int) -> dict[str, Any]:
    """``excise ops ext-sub`` as a subprocess under ``/usr/bin/time`` in the paper's setting."""
    expert, anti = write_lora_pair(root / "paper", PAPER_LAYERS, PAPER_MODULES, seed + 1)
    excise_bin = Path(sys.executable).parent / "excise"
    # As a user would run it: the CLI pins OpenBLAS itself; do not pass ours down.
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    walls, rss = [], []
    out = root / "paper" / "out"
    for rep in range(runs):
        out = root / "paper" / f"out_{rep}"
        cmd = ["/usr/bin/time", "-f", "%e %M", str(excise_bin), "ops", "ext-sub", "--expert", str(expert),
               "--anti-expert", str(anti), "--lam", str(LAM), "--out", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"excise ops ext-sub failed ({proc.returncode}):\n{proc.stderr}")
        wall, max_kib = proc.stderr.strip().splitlines()[-1].split()
        walls.append(float(wall))
        rss.append(int(max_kib) * 1024 / GB)
        if rep < runs - 1:
            shutil.rmtree(out)
    return {
        "input_mb": [_weights(f).stat().st_size / MB for f in (expert, anti)],
        "output_gb": _weights(out).stat().st_size / GB,
        "wall_s": walls,
        "wall_s_median": statistics.median(walls),
        "peak_gb": rss,
        "peak_gb_max": max(rss),
        "command": "excise ops ext-sub --expert E --anti-expert A --lam 1 --out O",
    }


# ----------------------------------------------------------------------------- report


def _targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def add(name: str, value: float | None, op: str, target: float) -> None:
        passed = None if value is None else (value >= target if op == ">=" else value <= target)
        rows.append({"target": name, "value": value, "op": op, "bound": target, "passed": passed})

    ours, sizes, ref, proc = r["ours"], r["sizes"], r.get("reference"), r.get("process")
    add("reference total / excise end-to-end", ref and ref["total_s"] / ours["end_to_end_s"], ">=", 200)
    add("excise output file / one input file", sizes["ours_over_one_input"], "<=", 2.0)
    add("max relative error vs reference", ref and ref["rel_err_ours_vs_reference_max"], "<=", 1e-5)
    add("excise end-to-end / safetensors load+save", ours["end_to_end_s"] / r["load_save_s"], "<=", 3.0)
    speedup = proc and PUBLISHED["wall_s"] / proc["wall_s_median"]
    add("published 32.5 s / excise process wall", speedup, ">=", 10)
    add("excise process peak memory (GB)", proc and proc["peak_gb_max"], "<=", 0.45)
    return rows


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}" if abs(x) < 10 else f"{x:,.1f}"
    return f"{x:.2e}"


def render(r: dict[str, Any]) -> str:
    """The results as Markdown tables (pasted into docs/BENCHMARKS.md)."""
    ours, sizes, ref, proc = r["ours"], r["sizes"], r.get("reference"), r.get("process")
    m = r["setup"]
    lines = [
        f"Setup: {m['layers']} layers × {len(MODULE_SHAPES)} modules (q,k,v,o,gate,up,down), "
        f"hidden {HIDDEN}, "
        f"MLP {MLP}, r={RANK}, fp32, λ={LAM}; {m['date']}; {m['cpus']} CPUs; load average "
        f"{m['load_before']} before, {m['load_after']} after; OPENBLAS_NUM_THREADS={m['openblas_threads']}"
        + (f", torch threads {ref['torch_threads']} (reference)" if ref else ""),
        "",
        "| measurement | value |",
        "| --- | ---: |",
        f"| input file, each (MB) | {_fmt(sizes['input_mb'])} |",
        f"| safetensors load+save of both inputs (s, median of {m['repeats']}) | {_fmt(r['load_save_s'])} |",
        f"| excise end-to-end: load, Ext-Sub, save (s, median) | {_fmt(ours['end_to_end_s'])} |",
        f"| … the same with `--sha256` input digests (s, median) | {_fmt(ours['end_to_end_sha256_s'])} |",
        f"| … load both (s) / compute (s) / save (s), run one after the other | {_fmt(ours['load_s'])} / "
        f"{_fmt(ours['compute_s'])} / {_fmt(ours['save_s'])} |",
        f"| … NaN/Inf check + xxh3-128 digest of both inputs, one pass each (s; beside the compute) | "
        f"{_fmt(ours['checksums_s'])} |",
        f"| excise output file (MB) | {_fmt(sizes['ours_mb'])} |",
        f"| excise output / one input / both inputs | {sizes['ours_over_one_input']:.5f} / "
        f"{sizes['ours_over_both_inputs']:.5f} |",
    ]
    if ref:
        ph = ref["phases_s"]
        e2e, compute, out_bytes = ours["end_to_end_s"], ours["compute_s"], sizes["ours_bytes"]
        per = ", ".join(f"{k} {v:.3g}" for k, v in sorted(ref["per_module_mean_s"].items()))
        lines += [
            f"| reference total: load + {ref['modules']} modules (s, one run) | {_fmt(ref['total_s'])} |",
            f"| … load / densify / normalise / row loop / combine (s) | {_fmt(ref['load_s'])} / "
            f"{_fmt(ph['densify_s'])} / {_fmt(ph['normalise_s'])} / {_fmt(ph['row_loop_s'])} / "
            f"{_fmt(ph['combine_s'])} |",
            f"| reference mean per module (s) | {per} |",
            f"| reference output, rank-`in` form (GB, from shapes) | {_fmt(ref['output_bytes'] / GB)} |",
            f"| speed-up: reference total / excise end-to-end | {_fmt(ref['total_s'] / e2e)}× |",
            f"| speed-up: reference compute / excise compute | {_fmt(ref['compute_s'] / compute)}× |",
            f"| size: reference output / excise output | {_fmt(ref['output_bytes'] / out_bytes)}× |",
            f"| max rel. error, excise vs reference (fp32) | {_fmt(ref['rel_err_ours_vs_reference_max'])} |",
            f"| max rel. error vs exact float64: excise / reference | "
            f"{_fmt(ref['rel_err_ours_vs_exact_max'])} / {_fmt(ref['rel_err_reference_vs_exact_max'])} |",
            f"| mean row cosine per module: min / mean / max | {ref['row_cos_module_mean']['min']:.3f} / "
            f"{ref['row_cos_module_mean']['mean']:.3f} / {ref['row_cos_module_mean']['max']:.3f} |",
        ]
    if proc:
        lines += [
            f"| paper setting (q,v, r={RANK}, {PAPER_LAYERS} layers): input files (MB) | "
            f"{' / '.join(_fmt(x) for x in proc['input_mb'])} |",
            f"| `excise ops ext-sub` wall (s, median of {len(proc['wall_s'])}; runs) | "
            f"{_fmt(proc['wall_s_median'])} ({', '.join(f'{w:.2f}' for w in proc['wall_s'])}) |",
            f"| `excise ops ext-sub` peak RSS (GB, max) | {_fmt(proc['peak_gb_max'])} |",
            f"| `excise ops ext-sub` output (GB) | {proc['output_gb']:.4f} |",
            f"| vs published 32.5 s / 17.8 GB / 8.6 GB: faster / less memory / smaller | "
            f"{_fmt(PUBLISHED['wall_s'] / proc['wall_s_median'])}× / "
            f"{_fmt(PUBLISHED['peak_gb'] / proc['peak_gb_max'])}× / "
            f"{_fmt(PUBLISHED['output_gb'] / proc['output_gb'])}× |",
        ]
    lines += ["", "| target | measured | bound | met |", "| --- | ---: | ---: | :---: |"]
    for t in r["targets"]:
        met = "not run" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['op']} {_fmt(t['bound'])} | {met} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="LLaMA-7B layers to generate (default 8).")
    parser.add_argument("--full", action="store_true", help="All 32 layers (overrides --layers).")
    parser.add_argument("--skip-reference", action="store_true", help="Skip the dense row-loop reference.")
    parser.add_argument("--skip-process", action="store_true", help="Skip the paper-setting process run.")
    parser.add_argument("--repeats", type=int, default=3, help="Repeats of the fast timings (median taken).")
    parser.add_argument("--process-runs", type=int, default=3, help="Runs of `excise ops ext-sub` (median).")
    parser.add_argument("--json", type=Path, help="Write all results here.")
    parser.add_argument("--profile", type=Path, help="cProfile one excise run; write the stats here.")
    parser.add_argument("--tmp", type=Path, help="Folder for the temporary adapters (default: system temp).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layers = PAPER_LAYERS if args.full else args.layers

    setup = {
        "layers": layers,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "repeats": args.repeats,
        "load_before": _load(),
    }
    print(f"bench_ops: {layers} layers, load average {setup['load_before']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="excise-bench-", dir=args.tmp) as tmp:
        root = Path(tmp)
        modules = tuple(MODULE_SHAPES)
        gen_s, (expert, anti) = _timed(lambda: write_lora_pair(root / "inputs", layers, modules, args.seed))
        print(f"generated inputs in {gen_s:.1f} s", flush=True)
        scratch = root / "scratch"
        scratch.mkdir()

        load_save = time_load_save([expert, anti], scratch, args.repeats)
        print(f"load+save: {', '.join(f'{t:.3f}' for t in load_save)} s", flush=True)
        ours_times, ours_out = time_ours(expert, anti, scratch, args.repeats)
        print(f"excise end-to-end: {', '.join(f'{t:.3f}' for t in ours_times['end_to_end'])} s", flush=True)
        sha_runs = ", ".join(f"{t:.3f}" for t in ours_times["end_to_end_sha256"])
        print(f"… with --sha256: {sha_runs} s", flush=True)
        in_bytes = _weights(expert).stat().st_size
        ours_bytes = _weights(ours_out).stat().st_size
        results: dict[str, Any] = {
            "setup": setup,
            "load_save_s": statistics.median(load_save),
            "load_save_runs_s": load_save,
            "ours": {f"{k}_s": statistics.median(v) for k, v in ours_times.items()} | {"runs_s": ours_times},
            "sizes": {
                "input_bytes": in_bytes,
                "input_mb": in_bytes / MB,
                "ours_bytes": ours_bytes,
                "ours_mb": ours_bytes / MB,
                "ours_over_one_input": ours_bytes / in_bytes,
                "ours_over_both_inputs": ours_bytes / (in_bytes + _weights(anti).stat().st_size),
            },
        }
        if args.profile:
            results["profile"] = profile_ours(expert, anti, scratch, args.profile)
        if not args.skip_process:
            results["process"] = run_process(root, args.process_runs, args.seed)
            print(f"process: {results['process']['wall_s']} s", flush=True)
        if not args.skip_reference:
            results["reference"] = run_reference(expert, anti, ours_out)
    setup["load_after"] = _load()
    results["targets"] = _targets(results)
    results["markdown"] = render(results)
    print()
    print(results["markdown"])
    if "profile" in results:
        print(f"\ncProfile of one excise end-to-end run ({args.profile}):\n{results['profile']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(t["passed"] is not False for t in results["targets"]) else 1


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
