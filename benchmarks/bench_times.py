"""Wall time and peak memory of the everyday commands, as the README and docs quote them (issue 26).

The one script behind every time and memory figure of README.md, docs/TRAINING.md,
docs/EVALUATION.md, docs/RESULTS.md and the recipes' ``Time:`` lines. Run it on an idle machine
and cite ``benchmarks/bench_times.py`` (with the date, the thread count and the load) beside each
figure taken from it. The docs' run, and its short version:

    .venv/bin/python benchmarks/bench_times.py --threads 2 --sections train,eval,perplexity,demo
    .venv/bin/python benchmarks/bench_times.py --threads 2 --sections train,eval,perplexity,demo --quick

(``--list`` prints the commands and which are done; ``--match TEXT`` keeps the measurements whose
label contains TEXT, e.g. with ``--redo`` to repeat one; ``--sections recipes`` reads the
committed runs and runs nothing.)

Each measurement runs the real CLI in a subprocess, ``/usr/bin/time -f '%e %M' python -m excise
...``, with ``--threads N`` and ``OMP_NUM_THREADS=N``, ``HF_HUB_OFFLINE=1``, no GPU
(``CUDA_VISIBLE_DEVICES=``) and a fresh, empty ``$EXCISE_CACHE`` (so no cached result is
served; ``--no-cache`` too where the command has it). Only the converted model and the judges'
sentence encoder are shared from the user's cache (prepared once at start-up, in no figure).
It records wall seconds, peak RSS, the exit code, the load average before and after, and what
the command records itself (a training's per-step seconds, an evaluation's item count and
``timing``, a recipe run's stage seconds). Sections, with the time each takes on 2 idle cores
(estimates from earlier, partly loaded runs; the figures themselves are this script's output):

- ``train`` (≈ 5 min): ``excise train sft`` at its CLI defaults on HaluEval QA
  (``--format paired-expert``, the README's command: batch 4, 512 tokens, LoRA r 8 on q/v) for
  10 steps: the mean step time without the first step and the minutes per 100 steps
  extrapolated from it; ``excise train sku`` at recipes/sku-harmful.yaml's settings (read from
  the recipe: batch 2, 256 tokens, LoRA r 8 q/v, bf16, K = 1) for 5 steps, with gradient
  checkpointing off (the recipe), on (the CLI default) and with K = 5.
- ``eval`` (≈ 10 min at the short sizes, ≈ 40-60 min more at the defaults): every metric of
  ``excise eval`` but ``truthfulqa-gen``, on the base model, at the docs' short size
  (``truthfulqa-mc``, ``halueval``, ``pairs``: ``--limit 20``; ``utility``, ``harmful-rate``:
  ``--limit 8``; ``toxicity``, ``repetition``: one batch, ``--limit 16 --max-new-tokens 64``;
  ``answer-nll`` ``--limit 50`` and ``refusal-logprob`` ``--limit 100``, the recipes' sizes),
  then, unless ``--quick``, at its default size (no ``--limit``; ``perplexity`` has its own
  section). Judge-free metrics are timed without an adapter: an adapter adds the reference pass.
- ``perplexity`` (≈ 2 min, ≈ 15 min more for the whole set): wikitext-2 raw test at the
  recipes' setting (a seeded subsample of 120 rows, window 256), at 200 rows (docs/EVALUATION.md's
  table), the old recipe setting (the first 40 rows, window 512) and, unless ``--quick``, the
  whole test set at the defaults (window 1024, stride 512).
- ``demo`` (≈ 13 min; runs only when named): ``excise run recipes/quickstart.yaml`` (what
  ``make demo`` runs) into a fresh run folder: wall, peak RSS and the stage seconds summed by
  kind (train / op / inspect / eval / sweep / report). The model conversion (≈ 40 s once on a
  fresh machine) is not in it.
- ``recipes`` (instant; runs only when named): no run; the stage seconds of each run folder
  (``--runs``, default the committed docs/results/*) summed by kind, as docs/RESULTS.md states
  recipe times.

The docs' run takes ≈ 1.5-2 h, ``--quick`` ≈ 30 min. Results go to ``--json`` (default
runs/bench_times.json), one entry per finished measurement, written atomically after each. A
rerun skips the measurements already there with the same command and exit code 0 (``--redo``:
run them again), so a run that was stopped goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"  # offline alias (DESIGN.md §5)
SECTIONS = ("train", "eval", "perplexity", "demo", "recipes")
DEFAULT_SECTIONS = "train,eval,perplexity"
SFT_STEPS = 10
SKU_STEPS = 5
SKU_RECIPE = REPO / "recipes" / "sku-harmful.yaml"
DEMO_RECIPE = REPO / "recipes" / "quickstart.yaml"
SHARED_CACHE = ("models", "encoders")  # conversions, not results: linked into each fresh cache
TMP = "{tmp}"  # stands for the measurement's temporary folder in a command

# Metric, its short size (the docs' quick variant, or the recipes' size) and what it always needs.
EVALS: list[tuple[str, list[str], list[str]]] = [
    ("truthfulqa-mc", ["--limit", "20"], []),
    ("halueval", ["--limit", "20"], []),
    ("utility", ["--limit", "8"], ["--reference", "{model}"]),  # without --adapter it needs one
    ("harmful-rate", ["--limit", "8"], []),
    ("toxicity", ["--limit", "16", "--max-new-tokens", "64"], []),
    ("repetition", ["--limit", "16", "--max-new-tokens", "64"], []),
    ("pairs", ["--limit", "20"], []),
    ("answer-nll", ["--limit", "50"], []),
    ("refusal-logprob", ["--limit", "100"], []),
]
PERPLEXITY: list[tuple[str, list[str], bool]] = [  # label, settings, short
    ("recipes: limit 120, window 256", ["--limit", "120", "--window", "256", "--stride", "256"], True),
    ("docs table: limit 200, window 256", ["--limit", "200", "--window", "256", "--stride", "256"], True),
    ("old recipes: head 40, window 512", ["--head", "40", "--window", "512", "--stride", "512"], True),
    ("whole test set, defaults (window 1024, stride 512)", [], False),
]


@dataclass(frozen=True)
class Measurement:
    """One command to time: ``excise ARGS`` (``{tmp}`` in an argument is its temporary folder)."""

    section: str
    label: str
    args: tuple[str, ...]
    parse: Callable[[Path], dict[str, Any]] = lambda _tmp: {}  # what the command recorded

    @property
    def command(self) -> str:
        return shlex.join(["excise", *self.args])


@dataclass
class Bench:
    """Where and how to measure, and the entries of the JSON file."""

    model: str = MODEL
    data: Path | None = None  # None: the project's default data folder
    threads: int = 2
    json_path: Path = REPO / "runs" / "bench_times.json"
    redo: bool = False
    entries: list[dict[str, Any]] = field(default_factory=list)
    default_data: bool = field(init=False, default=False)  # data is the project's default folder

    def __post_init__(self) -> None:
        from excise.pipeline.recipe import default_data_dir

        default = default_data_dir()
        self.data = Path(self.data or default or REPO.parent / "shared" / "data").resolve()
        self.default_data = default is not None and default.resolve() == self.data
        if self.json_path.is_file():
            self.entries = json.loads(self.json_path.read_text())["measurements"]

    def model_arg(self) -> str:
        return show(self.model) if Path(self.model).exists() else self.model


def show(path: str | Path) -> str:
    """A path as the docs write it: relative to the repository when it lies beside it."""
    path = Path(path).resolve()
    return os.path.relpath(path, REPO) if path.is_relative_to(REPO.parent) else str(path)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """CPU model, cores and bfloat16 instructions (``/proc/cpuinfo``)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?"
    )
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "bf16": [f for f in ("amx_bf16", "avx512_bf16") if f in flags],
    }


# ----------------------------------------------------------------------------- running


def measure(bench: Bench, m: Measurement) -> dict[str, Any]:
    """Run ``m`` (or return its earlier successful entry) and record it in the JSON file."""
    done = [e for e in bench.entries if e["command"] == m.command]
    if done and done[-1]["exit_code"] == 0 and not bench.redo:
        print(f"  {m.label:62} {_line(done[-1])}  (done {done[-1]['date']})")
        return done[-1]
    with tempfile.TemporaryDirectory(prefix="bench_times-") as name:
        tmp = Path(name)
        env = os.environ | {
            "OMP_NUM_THREADS": str(bench.threads),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "EXCISE_CACHE": str(_fresh_cache(tmp / "cache")),
        }
        argv = [a.replace(TMP, name) for a in m.args]
        timing, log = tmp / "time.txt", tmp / "log.txt"
        before = load_average()
        with log.open("w") as out:
            code = subprocess.run(
                ["/usr/bin/time", "-f", "%e %M", "-o", str(timing), sys.executable, "-m", "excise", *argv],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False,
            ).returncode  # fmt: skip
        after = load_average()
        wall, rss_kb = timing.read_text().split()[-2:]
        entry = {
            "section": m.section,
            "label": m.label,
            "command": m.command,
            "exit_code": code,
            "wall_s": float(wall),
            "peak_rss_gb": round(int(rss_kb) / 1024**2, 3),
            "load_before": before,
            "load_after": after,
            "threads": bench.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "extras": _extras(m, tmp) if code == 0 else {},
        }
        if code != 0:
            entry["log_tail"] = log.read_text(errors="replace").splitlines()[-20:]
    bench.entries = [e for e in bench.entries if e["command"] != m.command] + [entry]
    from excise.evaluate.cache import write_atomic_json

    write_atomic_json(bench.json_path, {"measurements": bench.entries})
    print(f"  {m.label:62} {_line(entry)}")
    if code != 0:
        print("    " + "\n    ".join(entry["log_tail"]))
    return entry


def _extras(m: Measurement, tmp: Path) -> dict[str, Any]:
    """What the command recorded; a file it did not write is noted, the timing kept."""
    try:
        return m.parse(tmp)
    except (OSError, KeyError, ValueError, IndexError, TypeError) as err:
        return {"parse_error": f"{type(err).__name__}: {err}"}


def _fresh_cache(folder: Path) -> Path:
    """An empty ``$EXCISE_CACHE`` whose model conversions are the user's (links, not results)."""
    from excise.models.loading import cache_root

    folder.mkdir()
    for name in SHARED_CACHE:
        (cache_root() / name).mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(cache_root() / name, target_is_directory=True)
    return folder


def _line(entry: dict[str, Any]) -> str:
    """Wall, peak RSS, the section's own figure, and the load."""
    load = f"load {' '.join(f'{v:.1f}' for v in entry['load_before'])} → {entry['load_after'][0]:.1f}"
    return f"{entry['wall_s']:8.1f} s {entry['peak_rss_gb']:6.2f} GB  {_own(entry)}  [{load}]"


def _own(entry: dict[str, Any]) -> str:
    """What the command recorded, in a few words (per-step time, items, tokens, stage minutes)."""
    x = entry["extras"]
    if entry["exit_code"] != 0:
        return f"FAILED (exit {entry['exit_code']})"
    if "parse_error" in x:
        return f"outputs not read: {x['parse_error']}"
    if "mean_step_s" in x:
        return (
            f"{x['mean_step_s']:.2f} s/step after the first ({x['first_step_s']:.1f} s): "
            f"≈ {x['min_per_100_steps']:.1f} min per 100 steps (extrapolated)"
        )
    if "scored_tokens" in x:
        return (
            f"{x['n_scored']} windows, {x['scored_tokens']} tokens, {x['tokens_per_s']:.0f} tok/s, "
            f"ppl {x['metrics']['perplexity']:.2f}"
        )
    if "n_items" in x:
        return f"{x['n_items']} items, {x['seconds']:.0f} s scoring + {x['load_seconds']:.0f} s load"
    if "stage_seconds" in x:
        return kinds_line(x["stage_seconds"])
    return ""


# ----------------------------------------------------------------------------- what each command recorded


def train_extras(tmp: Path) -> dict[str, Any]:
    """Per-step seconds from ``loss_log.json`` (mean without the first step) and ``train_config.json``."""
    from excise.train.loop import LOSS_LOG, TRAIN_CONFIG

    out = tmp / "out"
    seconds = [r["seconds"] for r in json.loads((out / LOSS_LOG).read_text())]
    rest = seconds[1:] or seconds
    mean = sum(rest) / len(rest)
    config = json.loads((out / TRAIN_CONFIG).read_text())
    return {
        "step_seconds": seconds,
        "first_step_s": seconds[0],
        "mean_step_s": mean,
        "min_per_100_steps": mean * 100 / 60,  # extrapolated from a short run
        "train_seconds": config.get("seconds"),
        "peak_rss_mb": config.get("peak_rss_mb"),
        "padding_share": config.get("padding_share"),
    }


def eval_extras(tmp: Path) -> dict[str, Any]:
    """Item count, the runner's ``timing`` and the metrics of the result JSON (tokens for perplexity)."""
    record = json.loads((tmp / "result.json").read_text())
    extras = {
        "n_items": record["n_items"],  # rows read; perplexity scores them in windows
        "n_scored": len(record["items"]),
        "load_seconds": record["timing"]["load_seconds"],
        "seconds": record["timing"]["seconds"],
        "metrics": record["metrics"],
    }
    if record["metric"] == "perplexity":
        tokens = record.get("scored_tokens") or sum(it["scored_tokens"] for it in record["items"])
        extras |= {"scored_tokens": tokens, "tokens_per_s": tokens / max(record["timing"]["seconds"], 1e-9)}
    return extras


def stage_seconds(folder: Path) -> dict[str, float]:
    """A run folder's ``stages.json`` seconds summed by stage kind (``train``, ``op``, ``eval``…)."""
    from excise.pipeline.run import MANIFEST

    by_kind: dict[str, float] = {}
    for name, stage in json.loads((folder / MANIFEST).read_text())["stages"].items():
        kind = name.split()[0]
        by_kind[kind] = by_kind.get(kind, 0.0) + (stage.get("seconds") or 0.0)
    return by_kind


def kinds_line(by_kind: dict[str, float]) -> str:
    """``stage time T min (train a min, op b min, …)``: docs/RESULTS.md's wording."""
    parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in by_kind.items())
    return f"stage time {sum(by_kind.values()) / 60:.1f} min ({parts})"


def demo_extras(tmp: Path) -> dict[str, Any]:
    return {"stage_seconds": stage_seconds(tmp / "out")}


# ----------------------------------------------------------------------------- the sections


def sft_measurement(bench: Bench, steps: int = SFT_STEPS) -> Measurement:
    """``excise train sft`` as the README shows it (CLI defaults), ``steps`` steps."""
    data = show(bench.data / "halueval" / "qa_data.json")
    args = ["train", "sft", "--base", bench.model_arg(), "--data", data]
    args += ["--format", "paired-expert", "--out", f"{TMP}/out", "--steps", str(steps)]
    args += ["--threads", str(bench.threads), "--no-progress"]
    label = f"train sft, CLI defaults, {steps} steps"
    return Measurement("train", label, tuple(args), train_extras)


def sku_measurements(bench: Bench, steps: int = SKU_STEPS) -> list[Measurement]:
    """``excise train sku`` at recipes/sku-harmful.yaml's settings: checkpointing off, on, and K = 5."""
    from excise.pipeline.recipe import TRAINERS, load_recipe

    recipe = load_recipe(SKU_RECIPE, data_dir=bench.data).resolved
    settings = recipe["train"] | {k: v for k, v in recipe["adapters"]["harmful"].items() if k != "method"}
    settings |= {k: show(settings[k]) for k in TRAINERS["sku"].data_keys if Path(settings[k]).exists()}
    settings["steps"] = steps
    cli_default = {k: v for k, v in settings.items() if k != "gradient_checkpointing"}
    paper_k = settings | {"k": 5, "gradient_checkpointing": False}
    gc = {True: "on", False: "off"}.get(settings.get("gradient_checkpointing"), "CLI default")
    variants = [
        (f"train sku, recipe (checkpointing {gc}), {steps} steps", settings),
        (f"train sku, recipe + checkpointing on (CLI default), {steps} steps", cli_default),
        (f"train sku, recipe with K = 5 (checkpointing off), {steps} steps", paper_k),
    ]
    return [
        Measurement("train", label, ("train", "sku", "--base", bench.model_arg(), *flags(chosen),
                                     "--out", f"{TMP}/out", "--threads", str(bench.threads), "--no-progress"),
                    train_extras)
        for label, chosen in variants
    ]  # fmt: skip


def flags(settings: dict[str, Any]) -> list[str]:
    """Recipe keys as ``excise train`` flags (the keys are the flags): lists comma-joined, False left out."""
    out: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if key == "gradient_checkpointing" and value is False:
            out.append("--no-gradient-checkpointing")
        elif value is True:
            out.append(flag)
        elif value not in (False, None):
            out += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def eval_measurement(bench: Bench, metric: str, settings: list[str], label: str, section: str) -> Measurement:
    """``excise eval METRIC`` on the base model with ``settings``; its own data (under ``bench.data``)."""
    from excise.evaluate.metrics import METRICS
    from excise.evaluate.metrics.base import SHARED_DATA

    row = METRICS[metric]
    data: list[str] = []
    if not bench.default_data:  # the same file under another root; --split as for the metric's own data
        relative = Path(row.default_data).relative_to(SHARED_DATA)
        data = ["--data", show(bench.data / relative), "--split", row.default_split]
    args = ["eval", metric, "--base", bench.model_arg(), *data, *settings, "--out", f"{TMP}/result.json"]
    args += ["--no-cache", "--no-progress", "--threads", str(bench.threads)]
    args = [a.replace("{model}", bench.model_arg()) for a in args]
    return Measurement(section, label, tuple(args), eval_extras)


def eval_measurements(bench: Bench, quick: bool) -> list[Measurement]:
    """Every metric at its short size, then (unless ``quick``) at its default size."""
    short = [
        eval_measurement(bench, metric, [*size, *always], f"{metric} {' '.join(size)}", "eval")
        for metric, size, always in EVALS
    ]
    whole = [
        eval_measurement(bench, metric, always, f"{metric}, default size", "eval")
        for metric, _, always in EVALS
    ]
    return short if quick else short + whole


def perplexity_measurements(bench: Bench, quick: bool) -> list[Measurement]:
    return [
        eval_measurement(bench, "perplexity", settings, label, "perplexity")
        for label, settings, short in PERPLEXITY
        if short or not quick
    ]


def demo_measurements(bench: Bench, quick: bool) -> list[Measurement]:
    """``excise run recipes/quickstart.yaml`` (``make demo``) into a fresh run folder."""
    args = ["run", show(DEMO_RECIPE), f"out={TMP}/out"]
    if bench.model != MODEL:
        args.append(f"base={bench.model_arg()}")
    if not bench.default_data:
        args += ["--data-dir", show(bench.data)]
    return [
        Measurement(
            "demo",
            "demo: excise run recipes/quickstart.yaml",
            (*args, "--threads", str(bench.threads)),
            demo_extras,
        )
    ]


def print_recipes(runs: list[Path]) -> None:
    """Each run folder's stage seconds by kind, as docs/RESULTS.md states recipe times."""
    from excise.pipeline.run import MANIFEST

    print("recipes: stage seconds from stages.json, summed by kind")
    for folder in runs:
        if (folder / MANIFEST).is_file():
            print(f"  {show(folder):42} {kinds_line(stage_seconds(folder))}")


def plan(bench: Bench, sections: list[str], quick: bool) -> list[Measurement]:
    """The measurements of ``sections``, in order."""
    out: list[Measurement] = []
    for name in sections:
        if name == "train":
            out += [sft_measurement(bench), *sku_measurements(bench)]
        elif name == "eval":
            out += eval_measurements(bench, quick)
        elif name == "perplexity":
            out += perplexity_measurements(bench, quick)
        elif name == "demo":
            out += demo_measurements(bench, quick)
    return out


def warm_up(bench: Bench, sections: list[str]) -> None:
    """Convert the model and unzip the judges' encoder once, into the shared cache, timed apart."""
    from excise.evaluate.judges.encoder import encoder_dir
    from excise.models.loading import resolve_model

    clock = time.perf_counter()
    resolve_model(bench.model)
    if "eval" in sections:
        encoder_dir()
    print(f"model ready (converted once, not in any figure): {time.perf_counter() - clock:.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sections", default=DEFAULT_SECTIONS, help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--quick", action="store_true", help="the small sizes only")
    parser.add_argument("--json", type=Path, default=REPO / "runs" / "bench_times.json")
    parser.add_argument("--redo", action="store_true", help="run measurements already in --json again")
    parser.add_argument("--model", default=MODEL, help="model spec (a tiny folder to test the plumbing)")
    parser.add_argument("--data-root", type=Path, default=None, help="data folder (default ../shared/data)")
    parser.add_argument("--list", action="store_true", help="print the commands and whether each is done")
    parser.add_argument("--match", help="only the measurements whose label contains this text")
    parser.add_argument(
        "--runs", type=Path, nargs="*", help="run folders for `recipes` (default docs/results/*)"
    )
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if not Path("/usr/bin/time").is_file():
        raise SystemExit("needs /usr/bin/time (apt-get install time)")
    bench = Bench(
        model=args.model, data=args.data_root, threads=args.threads, json_path=args.json, redo=args.redo
    )
    cpu = machine()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.threads} thread(s), {cpu['cpu']}, "
        f"{cpu['cores']} cores, bf16 instructions: {', '.join(cpu['bf16']) or 'none'}; "
        f"load {' '.join(map(str, load_average()))}"
    )
    print(f"model {bench.model}, data {show(bench.data)}, results {show(bench.json_path)}")
    if "recipes" in sections:
        print_recipes(args.runs or sorted(p for p in (REPO / "docs" / "results").iterdir() if p.is_dir()))
    todo = [m for m in plan(bench, sections, args.quick) if args.match is None or args.match in m.label]
    if args.list:
        done = {e["command"] for e in bench.entries if e["exit_code"] == 0}
        for m in todo:
            print(f"{'done' if m.command in done else 'todo'}  {m.section:11}{m.label}\n      {m.command}")
        return
    if not todo:
        return
    warm_up(bench, sections)
    entries = []
    for section in dict.fromkeys(m.section for m in todo):
        print(f"{section}:")
        entries += [measure(bench, m) for m in todo if m.section == section]
    print(f"\n{'section':11}{'measurement':62}{'wall s':>9}{'peak GB':>9}  load before → after  figure")
    for e in entries:
        print(
            f"{e['section']:11}{e['label']:62}{e['wall_s']:9.1f}{e['peak_rss_gb']:9.2f}"
            f"  {e['load_before'][0]:4.1f} → {e['load_after'][0]:4.1f}          {_own(e)}"
        )


if __name__ == "__main__":
    main()
