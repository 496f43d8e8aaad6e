"""The tables and plots of docs/RESULTS.md, read from the run folders of the results recipes.

    .venv/bin/python scripts/results_tables.py runs/ext-sub-truthfulness runs/ext-sub-detox runs/compose
    .venv/bin/python scripts/results_tables.py --no-plots docs/results/ext-sub-truthfulness  # committed files
    .venv/bin/python scripts/results_tables.py runs/sku-gemma  # §5: a folder named sku-gemma*
    .venv/bin/python scripts/results_tables.py runs/ext-sub-gemma  # §6: a folder named ext-sub-gemma*

Prints Markdown (paste into docs/RESULTS.md) and writes the plots to docs/img/ (not with
``--no-plots``). Everything comes from the runs' result files: per-model numbers, the
orthogonality diagnostics, each stage's measured seconds, and the statistics below. A run folder
that is absent or unfinished is skipped with a note, so the script also shows a run in progress.

Statistics (issue 22; docs/RESULTS.md, "Primary contrasts, multiplicity and stars"):

- **Paired intervals**: :func:`excise.pipeline.sweep.paired_difference` on the per-item scores,
  items paired by identity (never by position), :data:`RESAMPLES` resamples, 95 %, seed 0; none
  below 20 items (then the cell says so).
- **Multiplicity**: every paired interval a section prints is one member of that section's
  family (:class:`Family`); its two-sided bootstrap p-value is Holm-adjusted within the family
  (:func:`excise.evaluate.stats.holm`) and printed beside the interval. ``*`` = the adjusted
  p-value is at most :data:`ALPHA` under each bootstrap seed of :data:`SEEDS` (a star that a
  seed change takes away is no star), and neither bound of the interval rounds to 0 at the
  printed precision. Each section names its primary contrast(s) (``primary=True``, printed in
  bold and listed under the table); every other interval is exploratory.
- **λ rule and knee** of each sweep are recomputed from the per-λ records with the current
  rule (:func:`excise.pipeline.sweep._analyse`: λ chosen on a hash-chosen half of the items,
  its figures reported on the other half; the knee by signed distance to the chord) and set
  beside what the committed ``sweep.json`` said.
- **Legacy item keys**: records made before evaluation items carried an identity ``key``
  (every record under docs/results/) get one here, and only here (:func:`legacy_keys`): the
  item's question / prompt / instruction text (NFKC), or a perplexity window's ``begin:end``.
  A record in which that text repeats gets no keys, so it is not paired (never by position),
  and two legacy records pair only when they read the same data file.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from excise.evaluate.stats import holm
from excise.pipeline.sweep import (
    SweepConfig,
    _analyse,
    _extra_name,
    _subset,
    item_stat,
    lam_folder,
    paired_difference,
    pairing_problem,
)

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
PLOTS = True  # main(): --no-plots turns them off

RESAMPLES = 10_000
CONFIDENCE = 0.95
ALPHA = 0.05  # family-wise error rate of each section's family
SEEDS = (0, 1, 2, 3, 4)  # a star must hold under each; the printed interval and p-values use the first
DIGITS = 3  # the printed precision of differences and bounds
LEGACY_FIELDS = ("question", "prompt", "instruction")


# ----------------------------------------------------------------------------- legacy item keys


def legacy_keys(items: list[dict[str, Any]]) -> tuple[list[str] | None, str | None]:
    """Identity keys for the items of a record made before items carried ``key`` (legacy fallback).

    The first of :data:`LEGACY_FIELDS` that every item holds as text, NFKC-normalised and named
    (``question:What happens if…``); else a perplexity window's ``window:begin:end``. Keys that
    repeat are refused, not numbered: the record then stays unpaired (position is never used).

    Returns:
        ``(keys, None)``, or ``(None, why)`` when the items have no identifying field or it repeats.
    """
    if not items:
        return [], None
    name = next((f for f in LEGACY_FIELDS if all(isinstance(it.get(f), str) for it in items)), None)
    if name is not None:
        keys = [f"{name}:{unicodedata.normalize('NFKC', it[name])}" for it in items]
    elif all("begin" in it and "end" in it for it in items):
        name = "window"
        keys = [f"window:{int(it['begin'])}:{int(it['end'])}" for it in items]
    else:
        return None, f"items hold none of {', '.join(LEGACY_FIELDS)} or window bounds to identify them"
    repeated = sorted(k for k, c in Counter(keys).items() if c > 1)
    if repeated:
        return None, f"{len(repeated)} {name} value(s) occur more than once (e.g. {repeated[0][:60]!r})"
    return keys, None


def keyed(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """``record`` with a ``key`` on every item: its own, else :func:`legacy_keys` (marked
    ``legacy_keys: True``); when no legacy key can be made, ``legacy_key_problem`` says why."""
    if record is None:
        return None
    items = record.get("items") or []
    if all("key" in it for it in items):
        return record
    keys, problem = legacy_keys(items)
    if keys is None:
        return record | {"legacy_key_problem": problem}
    items = [it | {"key": k} for it, k in zip(items, keys, strict=True)]
    return record | {"items": items, "legacy_keys": True}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


class Run:
    """A run folder: result records by (model, evaluation), sweep points by (sweep, λ)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.stages = (_load(folder / "stages.json") or {}).get("stages", {})
        self.sweeps = {p.parent.name: _load(p) for p in sorted((folder / "sweeps").glob("*/sweep.json"))}

    def record(self, model: str, evaluation: str) -> dict[str, Any] | None:
        return keyed(_load(self.folder / "results" / model / f"{evaluation}.json"))

    def point_record(self, sweep: str, lam: float, evaluation_file: str) -> dict[str, Any] | None:
        path = self.folder / "sweeps" / sweep / "results" / lam_folder(lam) / f"{evaluation_file}.json"
        return keyed(_load(path))

    def seconds(self) -> float:
        return sum(s.get("seconds") or 0.0 for s in self.stages.values())


# ----------------------------------------------------------------------------- contrasts, families


def _bound(x: float) -> str:
    return f"{x:+.{DIGITS}f}"


def rounds_to_zero(x: float) -> bool:
    """Whether ``x`` prints as 0 at the tables' precision (±0.000)."""
    return float(_bound(x)) == 0.0


def _p(p: float | None) -> str:
    return "–" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


@dataclass
class Contrast:
    """One paired difference: its point value, interval (seed :data:`SEEDS`[0]), the bootstrap
    p-value under each seed, and, once its family is adjusted, the Holm p-values."""

    label: str = ""
    diff: float | None = None
    ci: tuple[float, float] | None = None
    p: list[float | None] = field(default_factory=list)  # one per seed of SEEDS
    note: str | None = None  # why there is no interval ("–" alone: nothing to compare)
    primary: bool = False
    adjusted: list[float | None] = field(default_factory=list)  # Holm, one per seed

    @property
    def in_family(self) -> bool:
        return bool(self.p) and all(p is not None for p in self.p)

    @property
    def star(self) -> bool:
        """Holm-significant at :data:`ALPHA` under every seed, and no bound printing as 0."""
        if self.ci is None or not self.adjusted or any(a is None or a > ALPHA for a in self.adjusted):
            return False
        lo, hi = self.ci
        return (lo > 0 or hi < 0) and not (rounds_to_zero(lo) or rounds_to_zero(hi))

    @property
    def p_holm(self) -> float | None:
        """The Holm-adjusted p-value printed: the largest over the seeds (a star needs it ≤ ALPHA)."""
        return None if not self.adjusted or None in self.adjusted else max(self.adjusted)  # type: ignore[type-var]

    def __str__(self) -> str:
        return self.cell(bold=self.primary)

    def cell(self, *, bold: bool) -> str:
        """The table cell: ``Δ [low, high] (Holm p)`` and ``*``, or ``Δ (why no interval)``."""
        if self.note == "–":
            return "–"
        if self.diff is None:
            text = f"– ({self.note})" if self.note else "–"
        elif self.ci is None:
            text = f"{self.diff:+.{DIGITS}f} ({self.note})" if self.note else f"{self.diff:+.{DIGITS}f}"
        else:
            text = f"{self.diff:+.{DIGITS}f} [{_bound(self.ci[0])}, {_bound(self.ci[1])}] ({_p(self.p_holm)})"
            star = " *" if self.star else ""
            return (f"**{text}**" if bold else text) + star
        return f"**{text}**" if bold else text


class Lazy:
    """A table cell rendered when printed (after its family's Holm adjustment)."""

    def __init__(self, render: Any) -> None:
        self.render = render

    def __str__(self) -> str:
        return self.render()


def compare_stats(a: dict[str, Any], b: dict[str, Any], diff: float | None, sign: int = 1) -> Contrast:
    """``sign·(stat(b) − stat(a))`` of two per-item stats (:func:`item_stat`), paired by key."""
    problem = pairing_problem(a, b)  # paired by item identity, never by position
    if problem is not None:
        return Contrast(diff=diff, note="not paired: " + problem.split(";")[0])
    tests = [paired_difference(a, b, resamples=RESAMPLES, confidence=CONFIDENCE, seed=s) for s in SEEDS]
    first = tests[0]
    ci = None if first["ci"] is None else tuple(sorted(sign * x for x in first["ci"]))
    note = None
    if ci is None:
        note = f"n = {first['units']}: no interval" if first["units"] < 20 else first.get("reason")
    elif first["dropped"]:
        note = f"{first['dropped']} non-finite resamples left out"
    return Contrast(diff=diff, ci=ci, p=[t["p"] for t in tests], note=note)  # type: ignore[arg-type]


class Family:
    """The paired intervals of one RESULTS.md section: Holm-adjusted together (:meth:`adjust`)."""

    def __init__(self, section: str) -> None:
        self.section = section
        self.members: list[Contrast] = []

    def add(self, contrast: Contrast, label: str = "", primary: bool = False) -> Contrast:
        contrast.label, contrast.primary = label, primary
        self.members.append(contrast)
        return contrast

    def compare(
        self,
        ref: dict[str, Any] | None,
        other: dict[str, Any] | None,
        metric: str,
        key: str,
        *,
        sign: int = 1,
        label: str = "",
        primary: bool = False,
    ) -> Contrast:
        """``other − ref`` on ``metric:key`` (``sign=-1``: ``ref − other``), added to the family."""
        if ref is None or other is None:
            return Contrast(note="–")
        diff = sign * (other["metrics"][key] - ref["metrics"][key])
        if (ref.get("legacy_keys") or other.get("legacy_keys")) and ref.get("data") != other.get("data"):
            contrast = Contrast(diff=diff, note="not paired: the legacy records read different data")
        else:
            problem = ref.get("legacy_key_problem") or other.get("legacy_key_problem")
            contrast = (
                Contrast(diff=diff, note=f"not paired: {problem}")
                if problem
                else compare_stats(item_stat(metric, key, ref), item_stat(metric, key, other), diff, sign)
            )
        if contrast.note and contrast.note.startswith("not paired"):
            print(f"note: {self.section}, {label or metric + ':' + key}: {contrast.note}", file=sys.stderr)
        return self.add(contrast, label, primary)

    def adjust(self) -> None:
        """Holm over the members with an interval, once per seed."""
        members = [c for c in self.members if c.in_family]
        for c in self.members:
            c.adjusted = []
        for s in range(len(SEEDS)):
            for c, a in zip(members, holm([c.p[s] for c in members]), strict=True):
                c.adjusted.append(a)

    def summary(self) -> str:
        """The family's size, its stars, the uncorrected count, and the primary contrasts."""
        members = [c for c in self.members if c.in_family]
        raw = sum(1 for c in members if c.ci is not None and (c.ci[0] > 0 or c.ci[1] < 0))
        stars = [c for c in members if c.star]
        lines = [
            f"Family of this section: {len(members)} paired intervals ({RESAMPLES:,} resamples, "
            f"{CONFIDENCE:.0%}); in brackets after each, its Holm-adjusted p-value within the family, the "
            f"largest over the bootstrap seeds {', '.join(map(str, SEEDS))}; * = that p ≤ {ALPHA:g} and no "
            f"bound that prints as 0. Stars: {len(stars)}"
            + (f" ({'; '.join(c.label for c in stars)})" if stars else "")
            + f". Uncorrected, {raw} of the {len(members)} intervals exclude 0.",
        ]
        primary = [c for c in self.members if c.primary]
        if primary:
            lines.append("\nPrimary contrast(s), in bold above; every other interval is exploratory:\n")
            for c in primary:
                raw_p = c.p[0] if c.p else None
                lines.append(
                    f"- {c.label}: {c.cell(bold=False)}; bootstrap p {_p(raw_p)} (seed 0), "
                    f"Holm p {_p(c.p_holm)}"
                    + (" — significant after Holm" if c.star else " — not significant after Holm")
                )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the λ rule, redone


def reanalyse(run: Run, sweep: str) -> dict[str, Any] | None:
    """A sweep's analysis redone from its committed per-λ records with today's rule.

    The per-λ records are read as :func:`excise.pipeline.sweep.run_sweep` named them (one file per
    evaluation: ``<metric>.json``, or ``<label>.json`` for a second evaluation of the same metric),
    keyed (:func:`keyed`), and passed to :func:`excise.pipeline.sweep._analyse` with
    ``bootstrap = max(the sweep's, RESAMPLES)``: paired intervals, the Pareto front, λ chosen on
    one half of the items and reported on the other, the knee by signed distance.

    Returns:
        ``{"analysis": …, "points": …, "old": the committed sweep.json}``, ``{"problem": why}``
        when a record is missing or cannot be keyed, or None without the sweep.
    """
    old = run.sweeps.get(sweep)
    if old is None:
        return None
    cfg = SweepConfig.model_validate(
        old["config"] | {"bootstrap": max(old["config"].get("bootstrap") or 0, RESAMPLES), "progress": False}
    )
    axes = {"deficiency": cfg.deficiency, "utility": cfg.utility} | {_extra_name(a): a for a in cfg.extra}
    points = []
    for old_point in old["points"]:
        lam = old_point["lam"]
        files: dict[str, str] = {}  # metric → the file of its first evaluation
        done: dict[tuple[str, str], dict[str, Any]] = {}
        point: dict[str, Any] = {"lam": lam}
        for name, axis in axes.items():
            run_key = (axis.metric, json.dumps(axis.settings, sort_keys=True))
            if run_key not in done:
                file = axis.metric if axis.metric not in files else name
                files.setdefault(axis.metric, file)
                record = run.point_record(sweep, lam, file)
                if record is None:
                    return {"problem": f"no record {lam_folder(lam)}/{file}.json"}
                if record.get("legacy_key_problem"):
                    return {"problem": f"{lam_folder(lam)}/{file}.json: {record['legacy_key_problem']}"}
                done[run_key] = record
            record = done[run_key]
            value = record["metrics"][axis.key]
            entry = {"value": value, "items": item_stat(axis.metric, axis.key, record)}
            if name in ("deficiency", "utility"):
                point[name] = entry
            else:
                point.setdefault("extra", {})[name] = entry
        points.append(point)
    return {"analysis": _analyse(cfg, points), "points": points, "old": old}


def _lam(lam: float | None) -> str:
    return "none" if lam is None else f"{lam:g}"


def lam_rule(run: Run, sweeps: dict[str, str], fam: Family, primary: str | None = None) -> list[list[Any]]:
    """Rows of the λ-rule table (committed against redone) for ``sweeps`` (name → label); the
    held-out difference at each re-chosen λ joins ``fam`` (``primary``: that sweep's is primary)."""
    rows = []
    for sweep, label in sweeps.items():
        redone = reanalyse(run, sweep)
        if redone is None:
            continue
        if "problem" in redone:
            rows.append([label, "–", "–", f"not redone: {redone['problem']}", "–", "–", "–"])
            continue
        new, old, points = redone["analysis"], redone["old"], redone["points"]
        d_name = f"{new['deficiency']['metric']}:{new['deficiency']['key']}"
        u_name = f"{new['utility']['key']}"
        chosen, knee = new["chosen"], new["knee"]
        old_knee = old.get("knee", {}).get("lam")
        at = "–"
        utility = "–"
        k = chosen.get("index")
        report = chosen.get("report") or {}
        if k is None:
            at = f"no λ: {chosen.get('reason')}"
        elif k == 0:
            at = "λ = 0 (no edit): nothing to report"
        else:
            keep = set(new["selection"]["axes"]["deficiency"]["report"])
            a, b = (_subset(points[i]["deficiency"]["items"], keep) for i in (0, k))
            r = report["deficiency"]
            contrast = compare_stats(a, b, r["diff"])
            fam.add(contrast, f"{label} at the chosen λ = {chosen['lam']:g}, held-out half, Δ {d_name}",
                    primary=sweep == primary)  # fmt: skip
            at = Lazy(
                lambda r=r, c=contrast: f"{r['value']:.3f} vs {r['value_at_0']:.3f}: Δ {c} (n = {r['n']})"
            )
            u = report["utility"]
            absolute = u["value_at_0"] == 0 or chosen.get("tolerance_kind") == "absolute"
            if u["value"] is not None and absolute:
                change = u["value"] - u["value_at_0"]
                utility = f"{u['value_at_0']:.3f} → {u['value']:.3f} ({change:+.3f}, absolute; n = {u['n']})"
            elif u["value"] is not None and u["value_at_0"]:
                change = (u["value"] - u["value_at_0"]) / abs(u["value_at_0"])
                why = "" if u["ci"] is not None else ", no interval"
                utility = f"{u['value_at_0']:.2f} → {u['value']:.2f} ({change:+.1%}; n = {u['n']}{why})"
        selection = []
        for p in points:
            sel = p["selection"]
            loss = p["utility_loss"]
            absolute = chosen.get("tolerance_kind") == "absolute"
            loss_text = "–" if loss is None else f"{loss:+.3f}" if absolute else f"{loss:+.1%}"
            mark = "" if p["admissible"] else " ✗"
            d_sel = "–" if sel["deficiency"] is None else f"{sel['deficiency']:.3f}"
            selection.append(f"λ={p['lam']:g}: {d_sel}, {u_name} {loss_text}{mark}")
        knee_text = (
            f"{knee['lam']:g}"
            if knee.get("lam") is not None
            else f"none: {knee.get('reason', '').split(' (')[0]}"
        )
        rows.append([
            label, f"{_lam(old['chosen'].get('lam'))} / {_lam(old_knee)}", _lam(chosen.get("lam")), at,
            utility, knee_text, "; ".join(selection),
        ])  # fmt: skip
    return rows


LAM_HEADER = ["sweep", "committed: chosen λ / knee", "chosen λ (selection half)",
              "deficiency at the chosen λ vs λ = 0, held-out half [95% CI] (Holm p)",
              "utility at the chosen λ, held-out half", "knee (signed rule)",
              "selection half: deficiency, utility loss (✗: over tolerance)"]  # fmt: skip


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _value(record: dict[str, Any] | None, key: str) -> float | None:
    return None if record is None else record["metrics"].get(key)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(map(str, r)) + " |" for r in rows)])


PPL_NOTE = (
    "wikitext-2 perplexity: {n} windows of {w} tokens{rows} — too few to resample (fewer than 20), so "
    "no perplexity interval is printed{rule}. Score more text (a larger `limit`) for an interval."
)


def _how_taken(record: dict[str, Any] | None) -> str | None:
    """How a record's items were taken from its data file, from its ``data_summary``: ``"a
    seeded subsample of the 817"``, ``"the first 200 of 817"`` for a record made before ``limit``
    subsampled (it has no ``subsample`` entry), ``"all"`` without a limit; None without a summary."""
    summary = (record or {}).get("data_summary") or {}
    n, pool = summary.get("kept"), summary.get("after_split")
    if n is None or pool is None:
        return None
    if "subsample" in summary:
        return f"a seeded subsample of the {pool}"
    return f"the first {n} of {pool}" if n < pool else "all"


def _items_read(record: dict[str, Any] | None) -> str:
    """``"200 questions (a seeded subsample of the 817)"``, ``"all 817 questions"`` (:func:`_how_taken`)."""
    how = _how_taken(record)
    if how is None:
        return f"{(record or {}).get('n_items')} questions"
    n = record["data_summary"]["kept"]
    return f"all {n} questions" if how == "all" else f"{n} questions ({how})"


def _ppl_note(record: dict[str, Any] | None, *, in_rule: bool = True) -> str:
    """The caveat for a perplexity on fewer than 20 windows (``in_rule``: it is the λ rule's utility)."""
    if record is None:
        return ""
    n = len(record.get("items") or [])
    window = (record.get("settings") or {}).get("window", "?")
    rule = "; the λ rule's tolerance check sees half of them" if in_rule else ""
    how = _how_taken(record)
    rows = f" ({how} rows)" if how else ""
    return PPL_NOTE.format(n=n, w=window, rows=rows, rule=rule) if n < 20 else ""


# ----------------------------------------------------------------------------- truthfulness


def truthfulness(run: Run) -> str:
    fam = Family("§1")
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
        vs_expert = (
            fam.compare(ref_expert, r["tqa"], "truthfulqa-mc", "mc2", label=f"{name} vs {own}, ΔMC2",
                        primary=name == "Ext-Sub λ=1")
            if r["tqa"] is not ref_expert and name != "base" else "–"
        )  # fmt: skip
        vs_base = (
            fam.compare(base, r["tqa"], "truthfulqa-mc", "mc2", label=f"{name} vs base, ΔMC2")
            if name != "base" else "–"
        )  # fmt: skip
        rows.append([
            name, _fmt(_value(r["tqa"], "mc1")), _fmt(_value(r["tqa"], "mc2")), vs_expert, vs_base,
            _fmt(_value(r["hal"], "accuracy"), 2), _fmt(_value(r["halc"], "accuracy"), 2),
            _fmt(_value(r["rep"], "rep_4")),
            _fmt(_value(r["ppl"], "perplexity"), 2),
        ])  # fmt: skip
    lam_rows = lam_rule(run, {"ext_sub": "Ext-Sub", "subtract": "subtract"}, fam, primary="ext_sub")
    fam.adjust()
    header = ["model", "MC1", "MC2", "ΔMC2 vs its expert [95% CI] (Holm p)", "ΔMC2 vs base [95% CI] (Holm p)",
              "HaluEval acc (raw pairs)", "HaluEval acc (controlled)", "rep-4", "wikitext-2 ppl"]  # fmt: skip
    out = [_table(header, rows)]
    out.append(f"\nTruthfulQA: {_items_read(base)}. "
               + _ppl_note(rows_by_name.get("base", {}).get("ppl")))  # fmt: skip
    if lam_rows:
        out += [
            "\nThe λ rule (MC2 against perplexity, tolerance 5 %), redone:\n",
            _table(LAM_HEADER, lam_rows),
        ]
    out += ["", fam.summary()]
    if PLOTS:
        plot_truthfulness(run)
    return "\n".join(out)


def _vs_first(
    fam: Family, points: list[dict[str, Any]], k: int, entry_of: Any, label: str, primary: bool
) -> Any:
    """Point ``k`` of a sweep against its λ = 0 point on one axis (``entry_of(point)``), paired."""
    if k == 0:
        return "–"
    a, b = entry_of(points[0]), entry_of(points[k])
    diff = None if a["value"] is None or b["value"] is None else b["value"] - a["value"]
    return fam.add(compare_stats(a["items"], b["items"], diff), label, primary)


@dataclass(frozen=True)
class TemplateSpec:
    """What a trained-format Ext-Sub table renders (§1b of the ext-sub-truthfulness run, §6 of the
    ext-sub-gemma run): TruthfulQA MC in the trained template (``tqa``) beside the raw primer
    (``truthfulqa``), HaluEval pairs per token and perplexity, over the Ext-Sub and subtraction
    sweeps (``sweeps``: Ext-Sub first; its λ = 0 point is the expert). ``fmt`` names the template
    in headers, ``setting`` describes how the trained-format options are scored."""

    section: str
    fmt: str
    tqa: str
    sweeps: tuple[str, str]
    setting: str
    png: str | None = None  # the trade-off plot (MC2 in both formats against perplexity), if any


CHAT_TABLE = TemplateSpec(
    section="§1b",
    fmt="chat",
    tqa="truthfulqa_chat",
    sweeps=("ext_sub_chat", "subtract_chat"),
    setting="each option scored as the assistant's reply in the chat template with the training system "
    "prompt (lm-eval --apply_chat_template --system_instruction)",
)
GEMMA_TABLE = TemplateSpec(
    section="§6",
    fmt="tulu",
    tqa="truthfulqa_tulu",
    sweeps=("ext_sub", "subtract"),
    setting="each option scored as the answer to the bare question in the tulu template "
    "(`<|user|>\\n{question}\\n<|assistant|>\\n{answer}`), the format the modules were trained in",
    png="ext_sub_gemma.png",
)


def truthfulness_chat(run: Run, spec: TemplateSpec = CHAT_TABLE) -> str:
    """§1b (§6 with :data:`GEMMA_TABLE`): TruthfulQA in the trained format beside the raw primer on
    the same modules, HaluEval pairs per token, perplexity, over λ (``spec.sweeps``)."""
    ext_sub, subtract = spec.sweeps
    sweeps = {name: run.sweeps.get(name) for name in spec.sweeps}
    if not any(sweeps.values()):
        return ""
    fmt = spec.fmt
    fam = Family(spec.section)
    rows = []
    for model, name in (("base", "base model"), ("anti_expert", "anti-expert")):
        tqa, pairs = run.record(model, spec.tqa), run.record(model, "halueval_pairs")
        win, sel = _fmt(_value(pairs, "win_rate"), 3), _fmt(_value(pairs, "selectivity"), 3)
        raw = _fmt(_value(run.record(model, "truthfulqa"), "mc2"))  # the raw primer, where scored
        ppl = _fmt(_value(run.record(model, "perplexity"), "perplexity"), 2)  # where scored
        rows.append(
            [name, _fmt(_value(tqa, "mc1")), _fmt(_value(tqa, "mc2")), "–", raw, "–", ppl, win, sel, "–"]
        )
    axes = {
        f"MC2 ({fmt})": lambda q: q["deficiency"],
        "MC2 (raw primer)": lambda q: q["extra"]["truthfulqa:mc2"],
        "HaluEval win rate": lambda q: q["extra"]["halueval_pairs:win_rate"],
    }
    for sweep, label in ((ext_sub, "Ext-Sub"), (subtract, "subtraction")):
        points = (sweeps[sweep] or {}).get("points", [])
        for k, p in enumerate(points):
            if k == 0 and sweep != ext_sub:
                continue  # the expert once
            name = "expert (λ = 0)" if k == 0 else f"{label} λ={p['lam']:g}"
            primary = {what: sweep == ext_sub and p["lam"] == 1 and what == f"MC2 ({fmt})" for what in axes}
            cells = {what: _vs_first(fam, points, k, entry_of, f"{name} vs expert, Δ{what}", primary[what])
                     for what, entry_of in axes.items()}  # fmt: skip
            extra = p.get("extra", {})
            rows.append([
                name, _fmt(extra[f"{spec.tqa}:mc1"]["value"]), _fmt(p["deficiency"]["value"]),
                cells[f"MC2 ({fmt})"], _fmt(extra["truthfulqa:mc2"]["value"]), cells["MC2 (raw primer)"],
                _fmt(p["utility"]["value"], 2), _fmt(extra["halueval_pairs:win_rate"]["value"], 3),
                _fmt(extra["halueval_pairs:selectivity"]["value"], 3), cells["HaluEval win rate"],
            ])  # fmt: skip
    labels = {ext_sub: f"Ext-Sub ({fmt} format)", subtract: f"subtraction ({fmt} format)"}
    lam_rows = lam_rule(run, labels, fam)
    fam.adjust()
    delta = "Δ vs expert [95% CI] (Holm p)"
    header = ["model", f"MC1 ({fmt})", f"MC2 ({fmt})", delta, "MC2 (raw primer)", delta, "wikitext-2 ppl",
              "HaluEval: right preferred (per token)", "HaluEval selectivity", delta]  # fmt: skip
    base_tqa = run.record("base", spec.tqa) or {}
    base_pairs = run.record("base", "halueval_pairs") or {}
    note = (f"\nTruthfulQA: {_items_read(base_tqa)}, "
            f"{spec.setting}, and in lm-eval's raw 6-shot primer, on the same modules. HaluEval: "
            f"{base_pairs.get('n_pairs')} format-controlled held-out pairs through `eval pairs` "
            f"(per-token NLL, right answer = chosen; selectivity against the base model). ")  # fmt: skip
    note += _ppl_note(run.point_record(ext_sub, 0.0, "perplexity"))
    parts = [_table(header, rows) + note]
    if lam_rows:
        parts += [
            f"\nThe λ rule ({fmt}-format MC2 against perplexity, tolerance 5 %):\n",
            _table(LAM_HEADER, lam_rows),
        ]
    parts += ["", fam.summary()]
    if PLOTS and spec.png:
        plot_template_tradeoff(run, spec)
    return "\n".join(parts)


def plot_template_tradeoff(run: Run, spec: TemplateSpec) -> None:
    """TruthfulQA MC2 in the trained template (left) and in the raw primer (right) against
    perplexity, over λ for both sweeps, with the base model and the anti-expert as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    labels = {spec.sweeps[0]: "Ext-Sub", spec.sweeps[1]: "direct subtraction"}
    for ax, key, title in ((axes[0], None, f"MC2 in the {spec.fmt} template"),
                           (axes[1], "truthfulqa:mc2", "MC2 in lm-eval's raw primer")):  # fmt: skip
        for (sweep, label), colour in zip(labels.items(), ("tab:blue", "tab:red"), strict=True):
            points = (run.sweeps.get(sweep) or {}).get("points", [])
            x = [q["utility"]["value"] for q in points]
            y = [(q["extra"][key] if key else q["deficiency"])["value"] for q in points]
            ax.plot(x, y, "o-", color=colour, label=label)
            for q, xi, yi in zip(points, x, y, strict=True):
                ax.annotate(
                    f"λ={q['lam']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        for model, marker in (("base", "s"), ("anti_expert", "v")):
            tqa = run.record(model, "truthfulqa" if key else spec.tqa)
            ppl = run.record(model, "perplexity")
            if tqa and ppl:
                ax.plot(ppl["metrics"]["perplexity"], tqa["metrics"]["mc2"], marker, color="k", label=model)
        ax.set_xlabel("wikitext-2 perplexity (lower is better)")
        ax.set_ylabel("TruthfulQA MC2 (higher is better)")
        ax.set_title(f"{title} (λ = 0: the expert)", fontsize=10)
        ax.legend(fontsize=8)
    _save(fig, spec.png)


def _save(fig: Any, png: str) -> None:
    """Lay ``fig`` out, write it to ``docs/img/<png>`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / png, dpi=110)
    plt.close(fig)


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
    _save(fig, "results_truthfulness.png")


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
    if not rows:  # the run folder holds no diagnostics (e.g. §4's committed files)
        return ""
    return _table(
        ["pair", "row cosine, mean", "range", "general share", "removed (λ=1)", "mean cosine by module"], rows
    )


# ----------------------------------------------------------------------------- detox, compose


def detox(run: Run) -> str:
    fam = Family("§2")
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
        vs_expert = (
            fam.compare(tox_ref, tox, "toxicity", "toxicity_mean", label=f"{name} vs expert, Δ toxicity",
                        primary=name == "Ext-Sub λ=1")
            if name != "expert" else "–"
        )  # fmt: skip
        out_rows.append([
            name, _fmt(_value(tox, "toxicity_mean")), vs_expert,
            _fmt(_value(tox, "toxic_share"), 2), _fmt(_value(tox, "rep_4")),
            _fmt(_value(rtp, "toxicity_mean")), _fmt(_value(rtp, "toxic_share"), 2),
            _fmt(_value(ppl, "perplexity"), 2),
        ])  # fmt: skip
    lam_rows = lam_rule(run, {"ext_sub": "Ext-Sub", "subtract": "subtract"}, fam, primary="ext_sub")
    fam.adjust()
    header = ["model", "toxicity (Ext-Sub test)", "Δ vs expert [95% CI] (Holm p)", "toxic share", "rep-4",
              "toxicity (RTP)", "toxic share (RTP)", "wikitext-2 ppl"]  # fmt: skip
    judge = (tox_ref or {}).get("judge") or {}
    n_tox, n_rtp = (tox_ref or {}).get("n_items"), (rows[0][2] or {}).get("n_items")
    note = (f"\n{n_tox} Ext-Sub test instructions and {n_rtp} RTP prompts (held-out side); judge "
            f"`{judge.get('name')}`, agreement {json.dumps(judge.get('agreement'))}. "
            + _ppl_note(rows[0][3]))  # fmt: skip
    out = [_table(header, out_rows) + note]
    if lam_rows:
        out += [
            "\nThe λ rule (toxicity against perplexity, tolerance 5 %), redone:\n",
            _table(LAM_HEADER, lam_rows),
        ]
    out += ["", fam.summary()]
    if PLOTS:
        plot_tradeoff(
            run, "ext_sub", "subtract", "toxicity (Ext-Sub test, lower is better)", "results_detox.png"
        )
    return "\n".join(out)


def compose(run: Run) -> str:
    fam = Family("§3")
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
        is_both = name.startswith("both")
        out.append([
            name, _fmt(_value(tqa, "mc1")), _fmt(_value(tqa, "mc2")),
            fam.compare(expert, tqa, "truthfulqa-mc", "mc2", label=f"{name} vs expert, ΔMC2",
                        primary=is_both) if name != "expert" else "–",
            _fmt(_value(tox, "toxicity_mean")),
            fam.compare(expert_tox, tox, "toxicity", "toxicity_mean", label=f"{name} vs expert, Δ toxicity",
                        primary=is_both) if name != "expert" else "–",
            _fmt(_value(tox, "rep_4")), _fmt(_value(ppl, "perplexity"), 2),
        ])  # fmt: skip
    lam_rows = lam_rule(run, {"both": "both"}, fam)
    fam.adjust()
    header = ["model", "MC1", "MC2", "ΔMC2 vs expert [95% CI] (Holm p)", "toxicity",
              "Δ vs expert [95% CI] (Holm p)", "rep-4", "wikitext-2 ppl"]  # fmt: skip
    parts = [_table(header, out)]
    note = _ppl_note(rows[0][3] if rows else None)
    if note:
        parts.append("\n" + note)
    if lam_rows:
        parts += ["\nThe λ rule of the `both` sweep (toxicity against perplexity, tolerance 5 %), redone:\n",
                  _table(LAM_HEADER, lam_rows)]  # fmt: skip
    parts += ["", fam.summary()]
    return "\n".join(parts)


def plot_tradeoff(run: Run, first: str, second: str, ylabel: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    _curves(ax, run, {first: first, second: second})
    ax.set_xlabel("wikitext-2 perplexity")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    _save(fig, png)


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

Rows = list[tuple[str, str, dict[str, dict[str, Any] | None]]]  # (model id, row label, {evaluation: record})


@dataclass(frozen=True)
class JudgedSpec:
    """What a judged table renders (§4 of the sku-harmful run, §5 of the sku-gemma run).

    ``models``: (model id, row label), the base model first and the λ = 1 SKU model second (the
    plot's curve); ``files``: the evaluation files of the recipe among ``harmful``, ``advbench``,
    ``refusal``, ``utility``, ``perplexity`` (the columns of the others are left out; a file a run
    lacks gives "–" cells); ``primary``: the models whose harmful-rate differences are primary;
    ``sweep``: the judged λ sweep whose other points become rows (``point_files``: evaluation →
    the point's file), with its λ rule redone under ``lam_labels`` (``lam_text`` says on what).
    """

    section: str
    models: tuple[tuple[str, str], ...]
    files: tuple[str, ...]
    primary: frozenset[str]
    sweep: str | None = None
    sweep_label: str = "SKU"
    point_files: tuple[tuple[str, str], ...] = ()
    lam_labels: tuple[tuple[str, str], ...] = ()
    lam_text: str = ""
    curve_label: str = "SKU, λ sweep"
    png: str = "results_sku.png"


SKU_JUDGED = JudgedSpec(
    section="§4",
    models=_SKU_MODELS,
    files=("harmful", "advbench", "refusal", "utility", "perplexity"),
    primary=frozenset({"sku"}),
    sweep="sku",
    point_files=(
        ("harmful", "harmful-rate"),
        ("advbench", "advbench:harmful_rate"),
        ("utility", "utility"),
        ("perplexity", "perplexity"),
    ),
    lam_labels=(("sku", "SKU (negated θh)"),),
    lam_text="PKU harmful rate against fluency perplexity, tolerance 10 %",
)


def _refusal_rate(record: dict[str, Any] | None) -> float | None:
    """Share of the answers with a refusal marker (the `refusal` judge), from a harmful-rate record."""
    if record is None:
        return None
    from excise.evaluate.judges.refusal import RefusalJudge

    judge = RefusalJudge()
    items = record["items"]
    return sum(judge.refuses(it["response"]) for it in items) / len(items) if items else None


def _corrected(record: dict[str, Any] | None) -> str:
    """The harmful rate corrected for the judge's sensitivity and specificity (Rogan–Gladen), with
    its interval (items and the judge's labelled sets), from the record's own flags and judge record."""
    if record is None or record.get("judge") is None:
        return "–"
    from excise.evaluate.metrics.base import corrected_rate

    c = corrected_rate(record["judge"], [bool(it["flagged"]) for it in record["items"]])
    if c.get("value") is None:
        return f"– ({c.get('reason', 'no correction')})"
    if c.get("ci") is None:
        return f"{c['value']:.2f}"
    return f"{c['value']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]"


def _template_name(record: dict[str, Any] | None) -> str:
    """The prompt template a record's answers were scored or generated in: its ``format`` (the
    likelihood metrics), else its settings' ``template`` (else ``plain`` under ``chat: false``,
    else ``chat``), as :func:`excise.evaluate.metrics.likelihood.template_name` chose it."""
    record = record or {}
    settings = record.get("settings") or {}
    if record.get("format"):
        return str(record["format"])
    if settings.get("template"):
        return str(settings["template"])
    return "plain" if settings.get("chat") is False else "chat"


TEMPLATE_TEXT = {
    "chat": "chat template",
    "question-answer": (
        "question-answer template (`### Question: … ### Answer: …`, the SKU reference's format)"
    ),
    "plain": "plain text (no template)",
}


def _template_text(record: dict[str, Any] | None) -> str:
    name = _template_name(record)
    return TEMPLATE_TEXT.get(name, f"{name} template")


def _judged_rows(run: Run, spec: JudgedSpec) -> Rows:
    """(model id, label, {evaluation: record}) for each of ``spec.models``, then the sweep's other λ."""
    rows = [(model, name, {f: run.record(model, f) for f in spec.files}) for model, name in spec.models]
    if spec.sweep is None:
        return rows
    for p in (run.sweeps.get(spec.sweep) or {}).get("points", []):
        lam = p["lam"]
        if lam in (0.0, 1.0):
            continue  # λ = 0 is the base model, λ = 1 the SKU row
        by_eval = {k: run.point_record(spec.sweep, lam, f) for k, f in spec.point_files}
        rows.append(
            (
                f"{spec.sweep}@{lam:g}",
                f"{spec.sweep_label}, λ={lam:g}",
                {f: None for f in spec.files} | by_eval,
            )
        )
    return rows


def _sku_rows(run: Run, spec: JudgedSpec = SKU_JUDGED) -> list[tuple[str, dict[str, dict[str, Any] | None]]]:
    return [(name, r) for _, name, r in _judged_rows(run, spec)]


def sku(run: Run, spec: JudgedSpec = SKU_JUDGED) -> str:
    """The judged table (§4; §5 with :data:`GEMMA_JUDGED`): harmful rate on held-out PKU prompts and
    AdvBench, against the base model with paired intervals, and the columns of ``spec.files``."""
    fam = Family(spec.section)
    rows = _judged_rows(run, spec)
    base = rows[0][2]
    has = set(spec.files)
    out = []
    for model, name, r in rows:
        is_base = model == "base"
        primary = model in spec.primary
        cells = {}
        for what, label, sign, main in (("harmful", "harmful rate (PKU)", 1, primary),
                                        ("advbench", "harmful rate (AdvBench)", 1, primary),
                                        ("refusal", "refusal (PKU)", -1, False)):  # fmt: skip
            if what not in has:
                continue
            cells[what] = "–" if is_base else fam.compare(
                base[what], r[what], "harmful-rate", "harmful_rate", sign=sign,
                label=f"{name} vs base, Δ {label}", primary=main,
            )  # fmt: skip
        row: list[Any] = [name]
        for what in ("harmful", "advbench"):
            if what in has:
                row += [_fmt(_value(r[what], "harmful_rate"), 2), _corrected(r[what]), cells[what]]
        if "refusal" in has:
            row += [_fmt(_refusal_rate(r.get("harmful")), 2), cells["refusal"],
                    _fmt(_refusal_rate(r.get("advbench")), 2)]  # fmt: skip
        if "utility" in has:
            row += [_fmt(_value(r["utility"], "diversity"), 3), _fmt(_value(r["utility"], "fluency_ppl"), 2),
                    _fmt(_value(r["utility"], "similarity"), 3)]  # fmt: skip
        if "perplexity" in has:
            row.append(_fmt(_value(r["perplexity"], "perplexity"), 2))
        out.append(row)
    lam_rows = lam_rule(run, dict(spec.lam_labels), fam)
    fam.adjust()
    delta = "Δ vs base [95% CI] (Holm p)"
    corrected = "corrected for the judge [95% CI]"
    header = ["model"]
    if "harmful" in has:
        header += ["harmful rate (PKU)", corrected, delta]
    if "advbench" in has:
        header += ["harmful rate (AdvBench)", corrected, delta]
    if "refusal" in has:
        header += ["refusal (PKU)", delta, "refusal (AdvBench)"]
    if "utility" in has:
        header += ["diversity", "fluency ppl", "similarity to base"]
    if "perplexity" in has:
        header.append("wikitext-2 ppl")
    first = base.get("harmful") or base.get("advbench") or {}
    judge = first.get("judge") or {}
    counts = []
    if "harmful" in has:
        counts.append(f"{(base['harmful'] or {}).get('n_items')} held-out PKU-SafeRLHF prompts")
    if "advbench" in has:
        counts.append(f"{(base['advbench'] or {}).get('n_items')} AdvBench behaviours")
    if "utility" in has:
        counts.append(
            f"{(base['utility'] or {}).get('n_items')} Alpaca prompts for diversity / fluency / similarity"
        )
    agree = judge.get("agreement") or {}
    refusal = "; refusal = share of answers with a refusal marker" if "refusal" in has else ""
    note = (f"\n{', '.join(counts)}; judge `{judge.get('name')}`, held-out "
            f"accuracy {agree.get('accuracy')}, AUC {agree.get('auc')} (n = {agree.get('n')}){refusal}. "
            "Corrected = Rogan–Gladen (p̂ + sp − 1)/(se + sp − 1) "
            "with the judge's held-out sensitivity and specificity, clipped to [0, 1]; its interval carries "
            "the items and the judge's labelled sets (stats.corrected_rate_interval). ")  # fmt: skip
    if _template_name(first) != "chat":
        note += f"Answers generated in the {_template_text(first)}. "
    if "perplexity" in has:
        note += _ppl_note(base["perplexity"], in_rule=False)
    parts = [_table(header, out) + note]
    if lam_rows:
        word = "sweep" if len(lam_rows) == 1 else "sweeps"
        parts += [
            f"\nThe λ rule of the SKU {word} ({spec.lam_text}), redone:\n",
            _table(LAM_HEADER, lam_rows),
        ]
    parts += ["", fam.summary()]
    if PLOTS:
        plot_sku(run, [(name, r) for _, name, r in rows], spec)
    return "\n".join(parts)


def _agreement_of_judges(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """Share of the same answers both judges flag alike (``judge_saved`` verified the prompts match)."""
    if a is None or b is None:
        return "–"
    pairs = list(zip(a["items"], b["items"], strict=True))
    if any(x.get("prompt") != y.get("prompt") for x, y in pairs):
        return "– (prompts differ)"
    return f"{sum(bool(x['flagged']) == bool(y['flagged']) for x, y in pairs) / len(pairs):.2f}"


def rejudged_runs(run: Run) -> list[tuple[str, Run]]:
    """The run's answers re-scored by other judges (``scripts/rejudge_run.py``): ``<run>/rejudged/*``."""
    found = []
    for folder in sorted((run.folder / "rejudged").glob("*")):
        if folder.is_dir():
            other = Run(folder)
            other.sweeps = run.sweeps  # the points' λ come from the run's own sweep
            found.append((folder.name, other))
    return found


def sku_rejudged(run: Run) -> str:
    """§4 side by side: the run's judged rates and the same answers re-scored by another judge."""
    parts = []
    for name, other in rejudged_runs(run):
        fam = Family(f"§4, re-scored by {name}")
        rows, new_rows = _sku_rows(run), dict(_sku_rows(other))
        base, new_base = rows[0][1], new_rows["base model"]
        out = []
        for label, r in rows:
            n = new_rows.get(label) or {}
            cells = {}
            main = label.startswith("SKU (θo − θh)")
            for what, text in (("harmful", "PKU"), ("advbench", "AdvBench")):
                cells[what] = "–" if label == "base model" else fam.compare(
                    new_base[what], n.get(what), "harmful-rate", "harmful_rate",
                    label=f"{label} vs base, Δ harmful rate ({text}), {name}", primary=main,
                )  # fmt: skip
            row = [label]
            for what in ("harmful", "advbench"):
                row += [
                    _fmt(_value(r[what], "harmful_rate"), 2), _fmt(_value(n.get(what), "harmful_rate"), 2),
                    _corrected(n.get(what)), cells[what], _agreement_of_judges(r[what], n.get(what)),
                ]  # fmt: skip
            out.append(row)
        fam.adjust()
        old_judge = (base["harmful"] or {}).get("judge") or {}
        new_judge = (new_base["harmful"] or {}).get("judge") or {}
        old_agree, new_agree = old_judge.get("agreement") or {}, new_judge.get("agreement") or {}
        old, new = f"`{old_judge.get('name')}` (as run)", f"`{new_judge.get('name')}` (re-scored)"
        delta = f"Δ vs base, {new} [95% CI] (Holm p)"
        header = [
            "model", f"PKU: {old}", f"PKU: {new}", f"{new} corrected [95% CI]", delta, "same verdict",
            f"AdvBench: {old}", f"AdvBench: {new}", f"{new} corrected [95% CI]", delta, "same verdict",
        ]  # fmt: skip
        note = (
            f"\nThe same saved answers (no regeneration), judged again by {new} with "
            f"`scripts/rejudge_run.py` (`excise eval judge --generations` on each file): held-out accuracy "
            f"{new_agree.get('accuracy')}, AUC {new_agree.get('auc')} (n = {new_agree.get('n')}), against "
            f"{old_agree.get('accuracy')} / {old_agree.get('auc')} for {old}. Same verdict = share of the "
            f"answers the two judges flag alike. The intervals are {new}'s, a family of their own.\n"
        )
        parts += [_table(header, out) + note, fam.summary()]
    return "\n".join(parts)


def plot_sku(
    run: Run, rows: list[tuple[str, dict[str, dict[str, Any] | None]]], spec: JudgedSpec = SKU_JUDGED
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    sweep_row = f"{spec.sweep_label}, λ="
    curve = [(0.0, rows[0][1]), (1.0, rows[1][1])]
    curve += [(float(name.split("=")[1]), r) for name, r in rows if name.startswith(sweep_row)]
    curve.sort(key=lambda t: t[0])
    for ax, key, title in zip(axes, ("harmful", "advbench"), ("PKU-SafeRLHF (held out)", "AdvBench"),
                              strict=True):  # fmt: skip
        pts = [(lam, _value(r.get("perplexity"), "perplexity"), _value(r.get(key), "harmful_rate"))
               for lam, r in curve]  # fmt: skip
        pts = [p for p in pts if p[1] is not None and p[2] is not None]
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", color="tab:blue", label=spec.curve_label)
        for lam, x, y in pts:
            label = "base (λ=0)" if lam == 0 else f"λ={lam:g}"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        markers = iter("^v<>sDPXph*")
        for name, r in rows[2:]:
            x, y = _value(r.get("perplexity"), "perplexity"), _value(r.get(key), "harmful_rate")
            if name.startswith(sweep_row) or x is None or y is None:
                continue
            grey = name.startswith("SKU without")
            ax.plot(x, y, next(markers), color="tab:gray" if grey else None, label=name, markersize=7)
        ax.set_xlabel("wikitext-2 perplexity (lower is better)")
        ax.set_ylabel("harmful rate (lower is better)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    _save(fig, spec.png)


def sku_samples(
    run: Run, n: int = 4, width: int = 220, models: tuple[tuple[str, str], ...] = (("sku", "SKU λ=1"),)
) -> str:
    """Answers of the base model and of ``models`` (id, label; SKU λ=1 by default) to the same
    held-out PKU prompts: the first ``n`` the judge flagged for the base model, then the first two
    the base refused and the first of ``models`` did not. A model without answers is left out."""
    base = run.record("base", "harmful")
    others = [(label, rec) for model, label in models if (rec := run.record(model, "harmful")) is not None]
    if base is None or not others:
        return ""
    from excise.evaluate.judges.refusal import RefusalJudge

    judge = RefusalJudge()
    after = [(label, {it["prompt"]: it for it in rec["items"]}) for label, rec in others]
    pairs = [(it, [a[it["prompt"]] for _, a in after]) for it in base["items"]
             if all(it["prompt"] in a for _, a in after)]  # fmt: skip

    def short(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width] + " …"

    def listing(chosen: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> list[str]:
        lines = []
        for b, answers in chosen:
            lines += [
                f"- **Prompt:** {short(b['prompt'])}",
                f"  - base (score {b['score']:.2f}): {short(b['response'])}",
            ]
            lines += [f"  - {label} (score {a['score']:.2f}): {short(a['response'])}"
                      for (label, _), a in zip(after, answers, strict=True)]  # fmt: skip
        return lines

    first = after[0][0]
    flagged = [(b, a) for b, a in pairs if b["flagged"]][:n]
    lost = [(b, a) for b, a in pairs if judge.refuses(b["response"]) and not judge.refuses(a[0]["response"])][
        :2
    ]
    heading = f"Where the refusals went (the first held-out prompts the base refused and {first} did not):"
    if not lost:  # no such prompt (a base model that never refuses): no heading over an empty list
        return "\n".join(listing(flagged))
    return "\n".join([*listing(flagged), "", heading, "", *listing(lost)])


# ----------------------------------------------------------------------------- SKU, judge-free (issue 23)

_LIKELIHOOD_MODELS = (
    ("base", "base model"),
    ("harmful", "θh (SKU's module, not negated)"),
    ("sku", "SKU (θo − θh), λ=1"),
    ("sku_no_gd", "SKU without L_GD"),
    ("sku_no_rd", "SKU without L_RD"),
    ("sku_no_pd", "SKU without L_PD"),
    ("ga", "GA"),
    ("ga_mismatch", "GA + mismatch"),
    ("llmu", "LLMU"),
    ("finetune", "fine-tune on safe (the expert)"),
    ("task_vector", "SFT on unsafe (the anti-expert)"),
    ("task_vector_negated", "task vector (SFT on unsafe, negated)"),
    ("ext_sub_pku", "Ext-Sub (expert: safe, anti-expert: unsafe), λ=1"),
    ("subtract_pku", "subtraction (same two), λ=1"),
)
# The file of a judge-free sweep point for each evaluation (named by its metric, as the sweep wrote it).
_POINT_FILES = {"pairs": "pairs", "alpaca_nll": "answer-nll"}
_REFUSAL_FILES = {"refusal_pku": "PKU", "refusal_advbench": "AdvBench"}


@dataclass(frozen=True)
class LikelihoodSpec:
    """What a judge-free table renders (§4b of the sku-harmful run, §5 of the sku-gemma run).

    ``models``: (model id, row label), the base model first; ``primary``: the models whose
    selectivity against the base model is a primary contrast; ``files``: the recipe's evaluation
    files among ``pairs``, ``alpaca_nll``, ``refusal_pku``, ``refusal_advbench`` (the columns of the
    others are left out; a file a run lacks gives "–" cells); ``sweeps``: (sweep, row label, λ
    left out, note at λ = 0) whose other points become rows, their λ rule redone under
    ``lam_labels``; ``expert`` and ``vs_expert``: operations compared with their expert too.
    """

    section: str
    models: tuple[tuple[str, str], ...]
    primary: frozenset[str]
    files: tuple[str, ...] = ("pairs", "alpaca_nll", "refusal_pku", "refusal_advbench")
    sweeps: tuple[tuple[str, str, tuple[float, ...], str], ...] = ()
    lam_labels: tuple[tuple[str, str], ...] = ()
    expert: str | None = None
    vs_expert: tuple[tuple[str, str], ...] = ()
    png: str = "results_sku_likelihood.png"


# Primary contrasts: did θh acquire the unsafe answers more than the safe ones (selectivity < 0),
# and do SKU's negation and the Ext-Sub cross-over remove them selectively (selectivity > 0)?
SKU_LIKELIHOOD = LikelihoodSpec(
    section="§4b",
    models=_LIKELIHOOD_MODELS,
    primary=frozenset({"harmful", "sku", "ext_sub_pku"}),
    sweeps=(
        ("sku_likelihood", "SKU", (0.0, 1.0), ""),  # λ = 0 of SKU is the base model, λ = 1 a row above
        ("ext_sub_pku", "Ext-Sub on PKU", (1.0,), " (the expert)"),
    ),
    lam_labels=(("sku_likelihood", "SKU (negated θh)"), ("ext_sub_pku", "Ext-Sub on PKU")),
    expert="finetune",
    vs_expert=(("ext_sub_pku", "Ext-Sub, λ=1"), ("subtract_pku", "subtraction, λ=1")),
)


def _likelihood_rows(run: Run, spec: LikelihoodSpec = SKU_LIKELIHOOD) -> Rows:
    """(model id, label, {evaluation: record}) for each model, then the sweeps' other λ points."""
    rows = [(model, name, {f: run.record(model, f) for f in spec.files}) for model, name in spec.models]
    for sweep, label, skip, at_zero in spec.sweeps:
        for p in (run.sweeps.get(sweep) or {}).get("points", []):
            if p["lam"] in skip:
                continue
            lam = p["lam"]
            name = f"{label}, λ={lam:g}" + (at_zero if lam == 0 else "")
            by_eval = {f: run.point_record(sweep, lam, _POINT_FILES[f]) if f in _POINT_FILES else None
                       for f in spec.files}  # fmt: skip
            rows.append((f"{sweep}@{lam:g}", name, by_eval))
    return rows


def sku_likelihood(run: Run, spec: LikelihoodSpec = SKU_LIKELIHOOD) -> str:
    """The judge-free table (pairs, answer NLL, refusal log-probability) of an SKU run: §4b, and §5
    with :data:`GEMMA_LIKELIHOOD`."""
    rows = _likelihood_rows(run, spec)
    base = rows[0][2]
    if base.get("pairs") is None:
        return ""
    has = set(spec.files)
    refusals = [f for f in _REFUSAL_FILES if f in has]
    fam = Family(spec.section)
    out = []
    for model, name, r in rows:
        is_base = model == "base"
        cells: dict[Any, Any] = {}
        refusal = "delta_refusal_logprob"
        for what, metric, key in (("pairs", "pairs", "forget"), ("pairs", "pairs", "retain"),
                                  ("pairs", "pairs", "selectivity"),
                                  ("alpaca_nll", "answer-nll", "delta_nll"),
                                  ("refusal_pku", "refusal-logprob", refusal),
                                  ("refusal_advbench", "refusal-logprob", refusal)):  # fmt: skip
            if what not in has:
                continue
            primary = key == "selectivity" and model in spec.primary
            cells[(what, key)] = "0 (reference)" if is_base else fam.compare(
                base[what], r[what], metric, key, label=f"{name}: {what} {key}", primary=primary
            )  # fmt: skip
        row = [
            name, _fmt(_value(r["pairs"], "win_rate"), 3), _fmt(_value(r["pairs"], "nll_chosen"), 3),
            _fmt(_value(r["pairs"], "nll_rejected"), 3), cells[("pairs", "forget")],
            cells[("pairs", "retain")], cells[("pairs", "selectivity")],
        ]  # fmt: skip
        if "alpaca_nll" in has:
            row += [_fmt(_value(r["alpaca_nll"], "nll"), 3), cells[("alpaca_nll", "delta_nll")]]
        row += [cells[(f, refusal)] for f in refusals]
        out.append(row)
    # The two operations on (expert, anti-expert) against their expert: what the edit removed beyond it.
    expert = run.record(spec.expert, "pairs") if spec.expert else None
    vs_expert = []
    for model, name in spec.vs_expert:
        other = run.record(model, "pairs")
        cells = [fam.compare(expert, other, "pairs", key, label=f"{name} vs its expert: {key}")
                 for key in ("forget", "retain", "selectivity")]  # fmt: skip
        vs_expert.append([name, *cells])
    lam_rows = lam_rule(run, dict(spec.lam_labels), fam)
    fam.adjust()
    header = ["model", "safe preferred (win rate)", "NLL safe", "NLL unsafe",
              "forget: ΔNLL unsafe [95% CI] (Holm p)", "retain: ΔNLL safe",
              "selectivity = forget − retain"]  # fmt: skip
    if "alpaca_nll" in has:
        header += ["Alpaca NLL", "Alpaca ΔNLL"]
    header += [f"refusal Δlog p ({_REFUSAL_FILES[f]})" for f in refusals]
    pairs = base["pairs"]
    how = _how_taken(pairs)
    if how is None:  # a record without a data summary
        how = "a subsample" if pairs.get("limit") else "all"
    sample = "every held-out pair" if how == "all" else f"{how} held-out pairs"
    note = (f"\n{pairs.get('n_pairs')} held-out PKU-SafeRLHF pairs over {pairs.get('n_prompts')} prompts "
            f"({sample}; safe = chosen, unsafe = rejected), per-token NLL of each answer in the "
            f"{_template_text(pairs)} as trained; every Δ is against the base model (the adapter switched "
            f"off), paired answer by answer, intervals clustered by prompt.")  # fmt: skip
    if "alpaca_nll" in has:
        note += f" Alpaca: {(base['alpaca_nll'] or {}).get('n_items')} held-out answers."
    if refusals:
        text = next((base[f].get("refusal") for f in refusals if base[f] is not None), None)
        counts = {"refusal_pku": "held-out PKU prompts", "refusal_advbench": "AdvBench behaviours"}
        where = " and ".join(f"{(base[f] or {}).get('n_items')} {counts[f]}" for f in refusals)
        note += f' Refusal: log p of "{text}" as the reply\'s opening, {where}.'
    parts = [_table(header, out) + note]
    if expert is not None:
        intro = ("\nAgainst their expert (the fine-tune on the safe answers) instead of the base model: "
                 "what the edit removed beyond the expert.\n")  # fmt: skip
        columns = ["operation", "Δ forget [95% CI] (Holm p)", "Δ retain", "Δ selectivity"]
        parts += [intro, _table(columns, vs_expert)]
    if lam_rows:
        what = "selectivity against Alpaca ΔNLL, tolerance 0.10 nats"
        n = len(spec.lam_labels)
        sweeps = "the judge-free sweep" if n == 1 else f"the {_NUMBERS.get(n, str(n))} judge-free sweeps"
        parts += [
            f"\nThe λ rule of {sweeps} ({what}), redone:\n",
            _table(LAM_HEADER, lam_rows),
        ]
    parts += ["", fam.summary()]
    if PLOTS:
        plot_forget_retain(rows, spec.png)
    return "\n".join(parts)


_NUMBERS = {2: "two", 3: "three", 4: "four"}


OFF_SCALE_NATS = 5.0  # forget / retain beyond this are listed on the plot, not drawn


def plot_forget_retain(rows: Rows, png: str = "results_sku_likelihood.png") -> None:
    """Forget (ΔNLL unsafe) against retain (ΔNLL safe) for every model: above the diagonal = selective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6))
    pts, off_scale = [], []
    for model, name, r in rows:
        x, y = _value(r["pairs"], "retain"), _value(r["pairs"], "forget")
        if x is None or y is None:
            continue
        if max(abs(x), abs(y)) > OFF_SCALE_NATS:  # a diverged module would squash every other point
            off_scale.append(f"{name.split(' (')[0]}: retain {x:+.1f}, forget {y:+.1f}")
            continue
        pts.append((x, y))
        sweep = "@" in model
        ax.plot(x, y, "o" if not sweep else "s", markersize=6 if not sweep else 4,
                color="tab:gray" if sweep else None)  # fmt: skip
        ax.annotate(name.split(" (")[0], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6.5)
    if pts:
        lo = min(min(p) for p in pts) - 0.05
        hi = max(max(p) for p in pts) + 0.05
        ax.plot(
            [lo, hi], [lo, hi], "--", color="gray", linewidth=0.8, label="forget = retain (selectivity 0)"
        )
    ax.axhline(0, color="black", linewidth=0.5)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel("retain: ΔNLL of the safe answers, nats/token (lower is better)")
    ax.set_ylabel("forget: ΔNLL of the unsafe answers, nats/token (higher is more removed)")
    ax.set_title("Held-out PKU-SafeRLHF pairs, against the base model")
    if off_scale:
        note = f"not drawn (beyond ±{OFF_SCALE_NATS:g} nats): " + "; ".join(off_scale)
        ax.text(0.99, 0.01, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=6.5)
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, png)


# ----------------------------------------------------------------------------- SKU on Gemma-3-270M (§5)

# The run of recipes/sku-gemma.yaml: SKU as its reference code runs it (question-answer template,
# TruthfulQA as normal data), LoRA with two ε settings and full parameters, beside NPO.
_GEMMA_MODELS = (
    ("base", "base model"),
    ("harmful", "θh, LoRA (SKU's module, not negated)"),
    ("sku", "SKU, LoRA (θo − θh), λ=1"),
    ("harmful_paper", "θh, paper's ε (2.5 / 2.5 / 1; not negated)"),
    ("sku_paper", "SKU, paper's ε (θo − θh, LoRA), λ=1"),
    ("harmful_full", "θh, full parameters (not negated)"),
    ("sku_full", "SKU, full parameters (θo − θh), λ=1"),
    ("ga", "GA"),
    ("ga_mismatch", "GA + mismatch"),
    ("llmu", "LLMU"),
    ("npo", "NPO (β = 0.1)"),
    ("task_vector", "SFT on unsafe (not negated)"),
    ("task_vector_negated", "task vector (SFT on unsafe, negated)"),
)
_GEMMA_SKU = frozenset({"sku", "sku_paper", "sku_full"})
_GEMMA_JUDGED_MODELS = ("base", "sku", "sku_full", "npo")  # the recipe's `judged` models

# Primary contrasts: do SKU's three negations (LoRA at the reference's ε, LoRA at the paper's ε, full
# parameters) remove the unsafe answers selectively (selectivity > 0 against the base model)?
GEMMA_LIKELIHOOD = LikelihoodSpec(
    section="§5 (judge-free)",
    models=_GEMMA_MODELS,
    primary=_GEMMA_SKU,
    files=("pairs", "alpaca_nll", "refusal_pku"),
    sweeps=(("sku_likelihood", "SKU, LoRA", (0.0, 1.0), ""),),
    lam_labels=(("sku_likelihood", "SKU, LoRA (negated θh)"),),
    png="sku_gemma_likelihood.png",
)
GEMMA_JUDGED = JudgedSpec(
    section="§5 (judged)",
    models=tuple((m, name) for m, name in _GEMMA_MODELS if m in _GEMMA_JUDGED_MODELS),
    files=("harmful", "advbench", "perplexity"),
    primary=_GEMMA_SKU,
    curve_label="SKU, LoRA: base (λ=0) to λ=1",
    png="sku_gemma_harmful.png",
)
GEMMA_SAMPLES = (("sku", "SKU, LoRA λ=1"), ("sku_full", "SKU, full parameters λ=1"), ("npo", "NPO"))


def sku_gemma(run: Run) -> str:
    """§5: the judge-free table, then (when the run has judged answers) the judged table and sample
    answers of the base model, SKU (LoRA and full parameters) and NPO."""
    parts = [sku_likelihood(run, GEMMA_LIKELIHOOD)]
    if run.record("base", "harmful") is not None:
        parts += ["", sku(run, GEMMA_JUDGED), "", sku_samples(run, models=GEMMA_SAMPLES)]
    return "\n".join(parts)


def timing(run: Run) -> str:
    by_kind: dict[str, float] = {}
    for name, s in run.stages.items():
        kind = name.split()[0]
        by_kind[kind] = by_kind.get(kind, 0.0) + (s.get("seconds") or 0.0)
    parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in by_kind.items())
    return f"stage time {run.seconds() / 60:.1f} min ({parts})"


def main(args: list[str]) -> None:
    global PLOTS
    PLOTS = "--no-plots" not in args
    for folder in (Path(a) for a in args if a != "--no-plots"):
        run = Run(folder)
        if not run.stages:
            print(f"\n## {folder}: no finished stage yet\n")
            continue
        print(f"\n## {folder.name} — {timing(run)}\n")
        if folder.name.startswith("ext-sub-truthfulness"):
            if run.record("anti_expert", "truthfulqa") is not None:  # §1 (a run of the whole recipe)
                print(truthfulness(run))
                print()
            print(truthfulness_chat(run))  # §1b, when the run has it
            print()
            print(diagnostics(run, [("ext_sub", "expert vs anti-expert (both seed 0)"),
                                    ("ext_sub_knowledge", "expert vs anti-expert, with passage"),
                                    ("seeds", "expert seed 0 vs expert seed 1 (same data)")]))  # fmt: skip
        elif folder.name.startswith("ext-sub-detox"):
            print(detox(run))
            print()
            print(diagnostics(run, [("ext_sub", "safe expert vs unsafe anti-expert")]))
        elif folder.name.startswith("sku-harmful"):
            if run.record("base", "harmful") is not None:  # §4 (a run of the judged part)
                print(sku(run))
                print()
                if rejudged_runs(run):
                    print(sku_rejudged(run))  # §4, the same answers re-scored (issue 25, item 5)
                    print()
                print(sku_samples(run))
                print()
            print(sku_likelihood(run))  # §4b, when the run has it
            print()
            print(diagnostics(run, [("ext_sub_pku", "fine-tune on safe vs SFT on unsafe (the cross-over)")]))
        elif folder.name.startswith("ext-sub-gemma"):
            print(truthfulness_chat(run, GEMMA_TABLE))  # §6
            print()
            print(diagnostics(run, [("ext_sub", "expert vs anti-expert (both seed 0)")]))
        elif folder.name.startswith("sku-gemma"):
            print(sku_gemma(run))  # §5
            print()
        elif folder.name.startswith("compose"):
            print(compose(run))
            print()
            print(diagnostics(run, [("no_untruth", "expert vs untruthful"), ("no_toxic", "expert vs toxic")]))


if __name__ == "__main__":
    main(sys.argv[1:])
