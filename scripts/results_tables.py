"""The tables and plots of docs/RESULTS.md, read from the run folders of the results recipes.

    .venv/bin/python scripts/results_tables.py runs/ext-sub-truthfulness runs/ext-sub-detox runs/compose

Prints Markdown (paste into docs/RESULTS.md) and writes the plots to docs/img/. Everything
comes from the runs' result files: per-model numbers, paired bootstrap intervals (the sweep's
own :func:`excise.pipeline.sweep.paired_bootstrap` on the per-item scores, 1,000 resamples,
seed 0), the orthogonality diagnostics, and each stage's measured seconds. A run folder that
is absent or unfinished is skipped with a note, so the script also shows a run in progress.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from excise.pipeline.sweep import item_stat, lam_folder, paired_bootstrap, pairing_problem

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


class Run:
    """A run folder: result records by (model, evaluation), sweep points by (sweep, λ)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.stages = (_load(folder / "stages.json") or {}).get("stages", {})
        self.sweeps = {p.parent.name: _load(p) for p in sorted((folder / "sweeps").glob("*/sweep.json"))}

    def record(self, model: str, evaluation: str) -> dict[str, Any] | None:
        return _load(self.folder / "results" / model / f"{evaluation}.json")

    def point_record(self, sweep: str, lam: float, evaluation_file: str) -> dict[str, Any] | None:
        return _load(self.folder / "sweeps" / sweep / "results" / lam_folder(lam) / f"{evaluation_file}.json")

    def seconds(self) -> float:
        return sum(s.get("seconds") or 0.0 for s in self.stages.values())


def _value(record: dict[str, Any] | None, key: str) -> float | None:
    return None if record is None else record["metrics"].get(key)


def _ci(
    ref: dict[str, Any] | None, other: dict[str, Any] | None, metric: str, key: str, sign: int = 1
) -> str:
    """``Δ [lo, hi]`` of ``other − ref`` by paired bootstrap (``sign=-1``: of ``ref − other``), or ``–``."""
    if ref is None or other is None:
        return "–"
    a, b = item_stat(metric, key, ref), item_stat(metric, key, other)
    problem = pairing_problem(a, b)  # paired by item identity, never by position
    if problem is not None:
        print(f"note: no paired interval for {metric}:{key}: {problem}", file=sys.stderr)
        return "– (not paired)"
    lo_hi = paired_bootstrap(a, b, resamples=1000, confidence=0.95, seed=0)
    diff = sign * (other["metrics"][key] - ref["metrics"][key])
    if lo_hi is not None:
        lo_hi = tuple(sorted(sign * x for x in lo_hi))
    mark = "" if lo_hi is None or lo_hi[0] <= 0 <= lo_hi[1] else " *"
    return f"{diff:+.3f} [{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]{mark}" if lo_hi else f"{diff:+.3f}"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


# ----------------------------------------------------------------------------- truthfulness


def truthfulness(run: Run) -> str:
    rows_by_name: dict[str, dict[str, dict[str, Any] | None]] = {}

    def add(name: str, tqa, hal, ppl, rep, model: str | None = None) -> None:
        controlled = run.record(model, "halueval_controlled") if model else None
        rows_by_name[name] = {"tqa": tqa, "hal": hal, "halc": controlled, "ppl": ppl, "rep": rep}

    for model in ("base", "anti_expert"):
        add(model, run.record(model, "truthfulqa"), run.record(model, "halueval"),
            run.record(model, "perplexity"), run.record(model, "repetition"), model)  # fmt: skip
    for sweep, label in (("ext_sub", "Ext-Sub"), ("subtract", "subtract")):
        s = run.sweeps.get(sweep)
        for p in (s or {}).get("points", []):
            lam = p["lam"]
            name = "expert" if lam == 0 else f"{label} λ={lam:g}"
            if lam == 0 and "expert" in rows_by_name:
                continue
            hal_model = {0.0: "expert", 1.0: sweep}.get(lam)
            hal = run.record(hal_model, "halueval") if hal_model else None
            files = ("truthfulqa-mc", "perplexity", "repetition")
            tqa, ppl, rep = (run.point_record(sweep, lam, f) for f in files)
            add(name, tqa, hal, ppl, rep, hal_model)
    variants = (
        ("expert_knowledge", "expert, with passage"),
        ("anti_expert_knowledge", "anti-expert, with passage"),
        ("ext_sub_knowledge", "Ext-Sub λ=1, with passage"),
    )
    for model, name in variants:
        add(name, run.record(model, "truthfulqa"), run.record(model, "halueval"), None, None, model)
    base = rows_by_name.get("base", {}).get("tqa")
    rows = []
    for name, r in rows_by_name.items():
        own = "expert, with passage" if "passage" in name else "expert"
        ref_expert = rows_by_name.get(own, {}).get("tqa")
        rows.append([
            name, _fmt(_value(r["tqa"], "mc1")), _fmt(_value(r["tqa"], "mc2")),
            _ci(ref_expert, r["tqa"], "truthfulqa-mc", "mc2") if r["tqa"] is not ref_expert and name != "base"
            else "–",
            _ci(base, r["tqa"], "truthfulqa-mc", "mc2") if name != "base" else "–",
            _fmt(_value(r["hal"], "accuracy"), 2), _fmt(_value(r["halc"], "accuracy"), 2),
            _fmt(_value(r["rep"], "rep_4")),
            _fmt(_value(r["ppl"], "perplexity"), 2),
        ])  # fmt: skip
    header = ["model", "MC1", "MC2", "ΔMC2 vs its expert [95% CI]", "ΔMC2 vs base [95% CI]",
              "HaluEval acc (raw pairs)", "HaluEval acc (controlled)", "rep-4", "wikitext-2 ppl"]  # fmt: skip
    out = [_table(header, rows)]
    n = (base or {}).get("n_items")
    out.append(f"\nTruthfulQA: {n} questions (the first {n} of 817); * = interval excludes 0.")
    plot_truthfulness(run)
    return "\n".join(out)


def _curves(ax, run: Run, labels: dict[str, str]) -> list[tuple[str, str]]:
    """Each sweep's (utility, deficiency) points as a line with λ marks; the (sweep, colour) drawn."""
    drawn = []
    for (sweep, label), colour in zip(labels.items(), ("tab:blue", "tab:red"), strict=False):
        if sweep not in run.sweeps:
            continue
        pts = run.sweeps[sweep]["points"]
        x = [p["utility"]["value"] for p in pts]
        y = [p["deficiency"]["value"] for p in pts]
        ax.plot(x, y, "o-", color=colour, label=label)
        for p, xi, yi in zip(pts, x, y, strict=True):
            ax.annotate(f"λ={p['lam']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        drawn.append((sweep, colour))
    return drawn


def plot_truthfulness(run: Run) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for sweep, colour in _curves(ax, run, {"ext_sub": "Ext-Sub", "subtract": "direct subtraction"}):
        pts = run.sweeps[sweep]["points"]
        rep = [p.get("extra", {}).get("repetition:rep_4", {}).get("value") for p in pts]
        bx.plot([p["lam"] for p in pts], rep, "o-", color=colour)
    for model, marker in (("base", "s"), ("anti_expert", "v")):
        t, ppl = run.record(model, "truthfulqa"), run.record(model, "perplexity")
        if t and ppl:
            ax.plot(ppl["metrics"]["perplexity"], t["metrics"]["mc2"], marker, color="k", label=model)
    ax.set_xlabel("wikitext-2 perplexity (lower is better)")
    ax.set_ylabel("TruthfulQA MC2 (higher is better)")
    ax.set_title("MC2 against perplexity over λ (λ = 0: the expert)")
    ax.legend(fontsize=8)
    bx.set_xlabel("λ")
    bx.set_ylabel("4-gram repetition of answers")
    bx.set_title("degeneration over λ")
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "results_truthfulness.png", dpi=110)
    plt.close(fig)


def diagnostics(run: Run, names: list[tuple[str, str]]) -> str:
    rows = []
    for name, what in names:
        d = _load(run.folder / "diagnostics" / f"{name}.json")
        if d is None:
            continue
        s = d["summary"]
        kinds = ", ".join(f"{k.removesuffix('_proj')} {v:+.2f}" for k, v in s["cos_mean_by_kind"].items())
        rows.append([what, f"{s['cos']['mean']:+.3f}", f"{s['cos']['min']:+.2f} … {s['cos']['max']:+.2f}",
                     f"{s['general_share']['mean']:.3f}", f"{s['removed']['mean']:.3f}", kinds])  # fmt: skip
    return _table(
        ["pair", "row cosine, mean", "range", "general share", "removed (λ=1)", "mean cosine by module"], rows
    )


# ----------------------------------------------------------------------------- detox, compose


def detox(run: Run) -> str:
    rows = []
    tox_ref = None
    for model, name in (("base", "base"), ("anti_expert", "anti-expert")):
        rows.append(
            (name, run.record(model, "toxicity"), run.record(model, "rtp"), run.record(model, "perplexity"))
        )
    for sweep, label in (("ext_sub", "Ext-Sub"), ("subtract", "subtract")):
        for p in (run.sweeps.get(sweep) or {}).get("points", []):
            lam = p["lam"]
            if lam == 0 and sweep == "subtract":
                continue
            name = "expert" if lam == 0 else f"{label} λ={lam:g}"
            tox = run.point_record(sweep, lam, "toxicity")
            rtp = run.point_record(sweep, lam, "rtp:toxicity_mean")
            rows.append((name, tox, rtp, run.point_record(sweep, lam, "perplexity")))
            if lam == 0:
                tox_ref = tox
    out_rows = []
    for name, tox, rtp, ppl in rows:
        out_rows.append([
            name, _fmt(_value(tox, "toxicity_mean")),
            _ci(tox_ref, tox, "toxicity", "toxicity_mean") if name != "expert" else "–",
            _fmt(_value(tox, "toxic_share"), 2), _fmt(_value(tox, "rep_4")),
            _fmt(_value(rtp, "toxicity_mean")), _fmt(_value(rtp, "toxic_share"), 2),
            _fmt(_value(ppl, "perplexity"), 2),
        ])  # fmt: skip
    header = ["model", "toxicity (Ext-Sub test)", "Δ vs expert [95% CI]", "toxic share", "rep-4",
              "toxicity (RTP)", "toxic share (RTP)", "wikitext-2 ppl"]  # fmt: skip
    judge = (tox_ref or {}).get("judge") or {}
    n_tox, n_rtp = (tox_ref or {}).get("n_items"), (rows[0][2] or {}).get("n_items")
    note = (f"\n{n_tox} Ext-Sub test instructions and {n_rtp} RTP prompts (held-out side); judge "
            f"`{judge.get('name')}`, agreement {json.dumps(judge.get('agreement'))}.")  # fmt: skip
    plot_tradeoff(run, "ext_sub", "subtract", "toxicity (Ext-Sub test, lower is better)", "results_detox.png")
    return _table(header, out_rows) + note


def compose(run: Run) -> str:
    rows = []
    for model, name in (("no_untruth", "Ext-Sub: untruthful only"), ("no_toxic", "Ext-Sub: toxic only")):
        rows.append((name, run.record(model, "truthfulqa"), run.record(model, "toxicity"),
                     run.record(model, "perplexity")))  # fmt: skip
    for p in (run.sweeps.get("both") or {}).get("points", []):
        lam = p["lam"]
        files = [run.point_record("both", lam, f) for f in ("truthfulqa-mc", "toxicity", "perplexity")]
        if lam == 0:
            rows.insert(0, ("expert", *files))
        else:
            rows.append((f"both, λ={lam:g} each", *files))
    expert = rows[0][1] if rows and rows[0][0] == "expert" else None
    expert_tox = rows[0][2] if rows and rows[0][0] == "expert" else None
    out = []
    for name, tqa, tox, ppl in rows:
        out.append([
            name, _fmt(_value(tqa, "mc1")), _fmt(_value(tqa, "mc2")),
            _ci(expert, tqa, "truthfulqa-mc", "mc2") if name != "expert" else "–",
            _fmt(_value(tox, "toxicity_mean")),
            _ci(expert_tox, tox, "toxicity", "toxicity_mean") if name != "expert" else "–",
            _fmt(_value(tox, "rep_4")), _fmt(_value(ppl, "perplexity"), 2),
        ])  # fmt: skip
    header = ["model", "MC1", "MC2", "ΔMC2 vs expert [95% CI]", "toxicity", "Δ vs expert [95% CI]",
              "rep-4", "wikitext-2 ppl"]  # fmt: skip
    return _table(header, out)


def plot_tradeoff(run: Run, first: str, second: str, ylabel: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    _curves(ax, run, {first: first, second: second})
    ax.set_xlabel("wikitext-2 perplexity")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- SKU

_SKU_MODELS = (
    ("base", "base model"),
    ("sku", "SKU (θo − θh), λ=1"),
    ("sku_no_gd", "SKU without L_GD"),
    ("sku_no_rd", "SKU without L_RD"),
    ("sku_no_pd", "SKU without L_PD"),
    ("ga", "GA"),
    ("ga_mismatch", "GA + mismatch"),
    ("llmu", "LLMU"),
    ("finetune", "fine-tune on safe"),
    ("task_vector_negated", "task vector (SFT on harmful, negated)"),
    ("harmful", "θh itself (SKU's module, not negated)"),
    ("task_vector", "SFT on harmful itself (not negated)"),
)


def _refusal_rate(record: dict[str, Any] | None) -> float | None:
    """Share of the answers with a refusal marker (the `refusal` judge), from a harmful-rate record."""
    if record is None:
        return None
    from excise.evaluate.judges.refusal import RefusalJudge

    judge = RefusalJudge()
    items = record["items"]
    return sum(judge.refuses(it["response"]) for it in items) / len(items) if items else None


def _sku_rows(run: Run) -> list[tuple[str, dict[str, dict[str, Any] | None]]]:
    rows = []
    for model, name in _SKU_MODELS:
        files = ("harmful", "advbench", "refusal", "utility", "perplexity")
        rows.append((name, {f: run.record(model, f) for f in files}))
    sweep = run.sweeps.get("sku") or {}
    for p in sweep.get("points", []):
        if p["lam"] in (0.0, 1.0):
            continue  # λ = 0 is the base model, λ = 1 the `sku` row
        files = {"harmful": "harmful-rate", "advbench": "advbench:harmful_rate", "utility": "utility",
                 "perplexity": "perplexity"}  # fmt: skip
        by_eval = {k: run.point_record("sku", p["lam"], f) for k, f in files.items()}
        rows.append((f"SKU, λ={p['lam']:g}", by_eval | {"refusal": None}))
    return rows


def sku(run: Run) -> str:
    rows = _sku_rows(run)
    base = rows[0][1]
    out = []
    for name, r in rows:
        is_base = name == "base model"
        out.append([
            name, _fmt(_value(r["harmful"], "harmful_rate"), 2),
            "–" if is_base else _ci(base["harmful"], r["harmful"], "harmful-rate", "harmful_rate"),
            _fmt(_value(r["advbench"], "harmful_rate"), 2),
            "–" if is_base else _ci(base["advbench"], r["advbench"], "harmful-rate", "harmful_rate"),
            _fmt(_refusal_rate(r["harmful"]), 2),
            "–" if is_base else _ci(base["refusal"], r["refusal"], "harmful-rate", "harmful_rate", sign=-1),
            _fmt(_refusal_rate(r["advbench"]), 2),
            _fmt(_value(r["utility"], "diversity"), 3), _fmt(_value(r["utility"], "fluency_ppl"), 2),
            _fmt(_value(r["utility"], "similarity"), 3), _fmt(_value(r["perplexity"], "perplexity"), 2),
        ])  # fmt: skip
    header = ["model", "harmful rate (PKU)", "Δ vs base [95% CI]", "harmful rate (AdvBench)",
              "Δ vs base [95% CI]", "refusal (PKU)", "Δ vs base [95% CI]", "refusal (AdvBench)", "diversity",
              "fluency ppl", "similarity to base", "wikitext-2 ppl"]  # fmt: skip
    judge = (base["harmful"] or {}).get("judge") or {}
    n_pku, n_adv = (base["harmful"] or {}).get("n_items"), (base["advbench"] or {}).get("n_items")
    n_util = (base["utility"] or {}).get("n_items")
    agree = judge.get("agreement") or {}
    note = (f"\n{n_pku} held-out PKU-SafeRLHF prompts, {n_adv} AdvBench behaviours, {n_util} Alpaca "
            f"prompts for diversity / fluency / similarity; judge `{judge.get('name')}`, held-out "
            f"accuracy {agree.get('accuracy')}, AUC {agree.get('auc')} (n = {agree.get('n')}); refusal = "
            "share of answers with a refusal marker; * = interval excludes 0.")  # fmt: skip
    plot_sku(run, rows)
    return _table(header, out) + note


def plot_sku(run: Run, rows: list[tuple[str, dict[str, dict[str, Any] | None]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    curve = [(0.0, rows[0][1]), (1.0, rows[1][1])]
    curve += [(float(name.split("=")[1]), r) for name, r in rows if name.startswith("SKU, λ=")]
    curve.sort(key=lambda t: t[0])
    for ax, key, title in zip(axes, ("harmful", "advbench"), ("PKU-SafeRLHF (held out)", "AdvBench"),
                              strict=True):  # fmt: skip
        pts = [(lam, _value(r["perplexity"], "perplexity"), _value(r[key], "harmful_rate"))
               for lam, r in curve]  # fmt: skip
        pts = [p for p in pts if p[1] is not None and p[2] is not None]
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", color="tab:blue", label="SKU, λ sweep")
        for lam, x, y in pts:
            label = "base (λ=0)" if lam == 0 else f"λ={lam:g}"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        markers = iter("^v<>sDPXph*")
        for name, r in rows[2:]:
            x, y = _value(r["perplexity"], "perplexity"), _value(r[key], "harmful_rate")
            if name.startswith("SKU, λ=") or x is None or y is None:
                continue
            grey = name.startswith("SKU without")
            ax.plot(x, y, next(markers), color="tab:gray" if grey else None, label=name, markersize=7)
        ax.set_xlabel("wikitext-2 perplexity (lower is better)")
        ax.set_ylabel("harmful rate (lower is better)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "results_sku.png", dpi=110)
    plt.close(fig)


def sku_samples(run: Run, n: int = 4, width: int = 220) -> str:
    """Answers of the base model and of SKU (λ=1) to the same held-out PKU prompts: the first ``n``
    the judge flagged for the base model, then the first two the base refused and SKU did not."""
    base, neg = run.record("base", "harmful"), run.record("sku", "harmful")
    if base is None or neg is None:
        return ""
    from excise.evaluate.judges.refusal import RefusalJudge

    judge = RefusalJudge()
    after = {it["prompt"]: it for it in neg["items"]}
    pairs = [(it, after[it["prompt"]]) for it in base["items"] if it["prompt"] in after]

    def short(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width] + " …"

    def listing(chosen: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
        lines = []
        for b, a in chosen:
            lines += [f"- **Prompt:** {short(b['prompt'])}",
                      f"  - base (score {b['score']:.2f}): {short(b['response'])}",
                      f"  - SKU λ=1 (score {a['score']:.2f}): {short(a['response'])}"]  # fmt: skip
        return lines

    flagged = [(b, a) for b, a in pairs if b["flagged"]][:n]
    lost = [(b, a) for b, a in pairs if judge.refuses(b["response"]) and not judge.refuses(a["response"])][:2]
    heading = "Where the refusals went (the first held-out prompts the base refused and SKU λ=1 did not):"
    return "\n".join([*listing(flagged), "", heading, "", *listing(lost)])


def timing(run: Run) -> str:
    by_kind: dict[str, float] = {}
    for name, s in run.stages.items():
        kind = name.split()[0]
        by_kind[kind] = by_kind.get(kind, 0.0) + (s.get("seconds") or 0.0)
    parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in by_kind.items())
    return f"stage time {run.seconds() / 60:.1f} min ({parts})"


def main(folders: list[str]) -> None:
    for folder in map(Path, folders):
        run = Run(folder)
        if not run.stages:
            print(f"\n## {folder}: no finished stage yet\n")
            continue
        print(f"\n## {folder.name} — {timing(run)}\n")
        if folder.name.startswith("ext-sub-truthfulness"):
            print(truthfulness(run))
            print()
            print(diagnostics(run, [("ext_sub", "expert vs anti-expert (both seed 0)"),
                                    ("ext_sub_knowledge", "expert vs anti-expert, with passage"),
                                    ("seeds", "expert seed 0 vs expert seed 1 (same data)")]))  # fmt: skip
        elif folder.name.startswith("ext-sub-detox"):
            print(detox(run))
            print()
            print(diagnostics(run, [("ext_sub", "safe expert vs unsafe anti-expert")]))
        elif folder.name.startswith("sku-harmful"):
            print(sku(run))
            print()
            print(sku_samples(run))
        elif folder.name.startswith("compose"):
            print(compose(run))
            print()
            print(diagnostics(run, [("no_untruth", "expert vs untruthful"), ("no_toxic", "expert vs toxic")]))


if __name__ == "__main__":
    main(sys.argv[1:])
