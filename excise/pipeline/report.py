"""Reports of a run folder: ``report.json``, ``report.md`` and a self-contained ``report.html``.

The report shows whatever results the run folder holds, side by side: every method's
evaluations (base, expert, anti-expert, direct subtraction, Ext-Sub, SKU, baselines), each
number with its n and a paired 95 % bootstrap interval against the base model (and, for an
operation, against its expert: the operation's first input), each
λ sweep's trade-off (plot with the Pareto front, the chosen λ and the knee marked; table
with paired bootstrap intervals), the per-layer diagnostics plot of ``excise inspect``,
sample generations before and after, every judge with its measured agreement, and the
exact command and resolved recipe that reproduce the run. The HTML needs no network: CSS
is inline and plots are PNGs inlined as base64 ``data:`` URIs (matplotlib, Agg).

Run folder layout (what :func:`write_report` reads; every part is optional)::

    RUN/command.txt                       the exact command line that made the run
    RUN/recipe.yaml                       the resolved recipe
    RUN/results/<method>/<eval>.json      evaluation records (`excise eval --out`,
                                          excise.evaluate.runner.write_result); <method>
                                          names the model variant (base, expert,
                                          anti_expert, subtract, ext_sub, compose, sku,
                                          negate, finetune, ga, ga_mismatch, llmu, or a
                                          recipe's model name), <eval> the metric or a
                                          recipe's evaluation name (the table's column)
    RUN/sweeps/<name>/sweep.json          λ sweeps (excise.pipeline.sweep.run_sweep's folder)
    RUN/diagnostics/<name>.json           `excise inspect --json` reports
    RUN/run.json                          a recipe run's current plan (``outputs``)

**Current plan only.** In a folder made by ``excise run``, ``run.json`` lists the outputs of
the recipe as it was last run; results, sweeps, diagnostics, adapters and operations left
there by an earlier version of the recipe (a model or evaluation dropped or renamed) are
not reported as results: they are listed under "Outdated outputs" (``outdated`` in
``report.json``) and left in place for the user to delete. A folder without ``run.json``
(results written by ``excise eval --out``) is reported whole.

Output (replaced atomically on every call)::

    RUN/report/report.json  report.md  report.html  plots/*.png
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

__all__ = [
    "INTERVAL_CONFIDENCE",
    "INTERVAL_RESAMPLES",
    "INTERVAL_SEED",
    "METHOD_ORDER",
    "band",
    "collect",
    "compare_cell",
    "metric_range",
    "operation_experts",
    "plot_sweep",
    "write_report",
]

# Methods in this order first (the papers' tables), any other after them by name.
METHOD_ORDER = [
    "base",
    "expert",
    "anti_expert",
    "subtract",
    "ext_sub",
    "compose",
    "sku",
    "negate",
    "finetune",
    "ga",
    "ga_mismatch",
    "llmu",
    "npo",
]
# Item fields holding a prompt and the model's answer to it, in order of preference.
_PROMPT_FIELDS = ("prompt", "instruction", "question")
_ANSWER_FIELDS = ("response", "answer")


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN and ±inf become None (the JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _method_key(name: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(name), "") if name in METHOD_ORDER else (len(METHOD_ORDER), name)


def _read_json(path: Path) -> dict[str, Any]:
    from excise.errors import ConfigError

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}; remove it or rerun the stage that wrote it") from err


def collect(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, read from ``run_dir`` (layout in the module docstring).

    Returns:
        ``{"methods", "records", "sweeps", "diagnostics", "judges", "generations", "command",
        "recipe", "outdated", "intervals"}`` — ``records[method][metric]`` are the full result
        records; ``intervals[method]["metric:key"]`` each number's n and its paired intervals
        against the base model (``vs_base``) and an operation's expert (``vs_expert``), as
        :func:`compare_cell` returns them.

    Raises:
        ConfigError: ``run_dir`` is not a folder, or a result file is not JSON.
    """
    from excise.errors import ConfigError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist")
    planned = _planned(run_dir)

    def current(output: Path) -> bool:
        return planned is None or output.relative_to(run_dir).as_posix() in planned

    records: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted((run_dir / "results").glob("*/*.json")):
        if current(path):
            records.setdefault(path.parent.name, {})[path.stem] = _read_json(path)
    records = dict(sorted(records.items(), key=lambda kv: _method_key(kv[0])))
    sweeps = {
        p.parent.name: _read_json(p)
        for p in sorted((run_dir / "sweeps").glob("*/sweep.json"))
        if current(p.parent)
    }
    diagnostics = {
        p.stem: _read_json(p) for p in sorted((run_dir / "diagnostics").glob("*.json")) if current(p)
    }
    methods = {
        method: {metric: _numbers(rec.get("metrics", {})) for metric, rec in by_metric.items()}
        for method, by_metric in records.items()
    }
    command = run_dir / "command.txt"
    recipe = run_dir / "recipe.yaml"
    data = {
        "run_dir": str(run_dir.resolve()),
        "methods": methods,
        "records": records,
        "sweeps": sweeps,
        "diagnostics": diagnostics,
        "judges": _judges(records, sweeps, run_dir),
        "generations": _generations(records),
        "command": command.read_text().strip() if command.is_file() else None,
        "recipe": recipe.read_text() if recipe.is_file() else None,
        "outdated": _outdated(run_dir, planned),
    }
    data["intervals"] = _intervals(data)
    return data


# The folders of a run whose entries are stage outputs (excise.pipeline.run's layout).
_OUTPUT_GLOBS = ("adapters/*", "ops/*", "diagnostics/*.json", "results/*/*.json", "sweeps/*")


def _planned(run_dir: Path) -> set[str] | None:
    """The outputs of the run's current plan (``run.json``'s ``outputs``, written by ``excise run``
    from the resolved recipe), or None for a folder without one (everything is current)."""
    try:
        outputs = json.loads((run_dir / "run.json").read_text())["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {str(o) for o in outputs} if isinstance(outputs, list) else None


def _outdated(run_dir: Path, planned: set[str] | None) -> list[str]:
    """Outputs of an earlier plan still in the run folder (a model or evaluation the recipe no
    longer has): not reported, listed so they cannot pass for current results."""
    if planned is None:
        return []
    found = {p.relative_to(run_dir).as_posix() for g in _OUTPUT_GLOBS for p in run_dir.glob(g)}
    return sorted(p for p in found if p not in planned and not Path(p).name.startswith("."))


def _numbers(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _judges(records: dict[str, Any], sweeps: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Each judge used anywhere in the run once, with its measured agreement (or None)."""
    found: dict[str, dict[str, Any]] = {}
    recs = [rec for by_metric in records.values() for rec in by_metric.values()]
    for name in sweeps:
        recs += [_read_json(p) for p in sorted((run_dir / "sweeps" / name / "results").glob("*/*.json"))[:2]]
    for rec in recs:
        judge = rec.get("judge")
        if isinstance(judge, dict) and judge.get("name"):
            entry = found.setdefault(judge["name"], {"name": judge["name"], "metrics": []})
            entry["agreement"] = judge.get("agreement")
            entry["threshold"] = judge.get("threshold")
            if rec.get("metric") not in entry["metrics"]:
                entry["metrics"].append(rec.get("metric"))
    return list(found.values())


def _pick(item: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    return next((str(item[f]) for f in fields if item.get(f) is not None), None)


def _generations(records: dict[str, Any], *, samples: int = 3) -> list[dict[str, Any]]:
    """For each generation metric, the first ``samples`` prompts and every method's answer to them."""
    out = []
    metrics = {m for by_metric in records.values() for m in by_metric}
    for metric in sorted(metrics):
        answers: dict[str, dict[str, str]] = {}  # prompt → method → answer
        order: list[str] = []
        for method, by_metric in records.items():
            for item in by_metric.get(metric, {}).get("items", []):
                prompt, answer = _pick(item, _PROMPT_FIELDS), _pick(item, _ANSWER_FIELDS)
                if prompt is None or answer is None:
                    continue
                if prompt not in answers:
                    answers[prompt] = {}
                    order.append(prompt)
                answers[prompt][method] = answer
        for prompt in order[:samples]:
            out.append({"metric": metric, "prompt": prompt, "answers": answers[prompt]})
    return out


# ----------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# The range a number can take, for clipping interval bands: shares, rates and mean scores in
# [0, 1]; a perplexity is exp of a non-negative NLL, so ≥ 1; an NLL ≥ 0. Other keys: unbounded.
_UNIT_INTERVAL = {
    "accuracy", "accuracy_right", "accuracy_hallucinated", "mc1", "mc2", "truthful_rate",
    "toxic_share", "toxicity_mean", "judge_flagged_rate", "harmful_rate", "mean_score",
    "rep_1", "rep_2", "rep_3", "rep_4", "diversity", "similarity", "empty_answers",
    "win_rate", "win_rate_sum",
}  # fmt: skip
_NLL_KEYS = ("nll_per_token", "nll", "nll_sum", "nll_chosen", "nll_rejected")
_NLL_KEYS += ("nll_chosen_sum", "nll_rejected_sum")
_AT_LEAST = {"perplexity": 1.0, "fluency_ppl": 1.0, "fluency_ppl_mean": 1.0} | dict.fromkeys(_NLL_KEYS, 0.0)


def metric_range(key: str) -> tuple[float, float]:
    """``(low, high)`` that the result ``key`` can take (±inf where unbounded)."""
    if key in _UNIT_INTERVAL:
        return 0.0, 1.0
    return _AT_LEAST.get(key, -math.inf), math.inf


def band(
    ref: float, cis: list[list[float] | tuple[float, float]], key: str
) -> tuple[list[float], list[float]]:
    """A sweep plot's interval band: λ = 0's value plus each point's paired interval of the
    difference, clipped to the range the number can take (:func:`metric_range`).

    Returns:
        ``(lows, highs)``, one per interval.
    """
    low, high = metric_range(key)
    lows = [min(max(ref + c[0], low), high) for c in cis]
    highs = [max(min(ref + c[1], high), low) for c in cis]
    return lows, highs


def plot_sweep(sweep: dict[str, Any], out: Path) -> Path:
    """Trade-off plot of one sweep (PNG): deficiency against utility with λ labels, the Pareto
    front, the chosen λ and the knee; beside it both metrics against λ with paired intervals."""
    plt = _plt()
    points = sweep["points"]
    dname = f"{sweep['deficiency']['metric']}:{sweep['deficiency']['key']}"
    uname = f"{sweep['utility']['metric']}:{sweep['utility']['key']}"
    lams = [p["lam"] for p in points]
    d = [math.nan if p["deficiency"]["value"] is None else p["deficiency"]["value"] for p in points]
    u = [math.nan if p["utility"]["value"] is None else p["utility"]["value"] for p in points]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    ax.scatter(u, d, c="#4878a8", zorder=3)
    for lam, x, y in zip(lams, u, d, strict=True):
        ax.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = sorted((u[i], d[i]) for i, p in enumerate(points) if p["pareto"])
    if front:
        ax.plot(*zip(*front, strict=True), color="#4878a8", lw=1, ls="--", label="Pareto front")
    marks = [("chosen", "*", "#d62728", 300), ("knee", "D", "#2ca02c", 110)]
    for key, marker, color, size in marks:
        lam = sweep[key]["lam"]
        if lam is not None:
            i = lams.index(lam)
            ax.scatter([u[i]], [d[i]], marker=marker, s=size, c=color, zorder=4, label=f"{key} λ={lam:g}")
    ax.set_xlabel(
        uname + (" (higher is better)" if sweep["utility"]["higher_is_better"] else " (lower is better)")
    )
    ax.set_ylabel(
        dname + (" (higher is better)" if sweep["deficiency"]["higher_is_better"] else " (lower is better)")
    )
    ax.set_title("trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    order = sorted(range(len(lams)), key=lambda i: lams[i])
    xs = [lams[i] for i in order]
    twin = bx.twinx()
    for axis, values, name, color, target in [
        ("deficiency", d, dname, "#d62728", bx),
        ("utility", u, uname, "#4878a8", twin),
    ]:
        target.plot(xs, [values[i] for i in order], marker="o", color=color, label=name)
        ref = points[0][axis]["value"]
        cis = [points[i][axis]["ci"] for i in order]
        if ref is not None and all(ci is not None for ci in cis):  # λ = 0 value + paired interval of Δ
            target.fill_between(xs, *band(ref, cis, sweep[axis]["key"]), color=color, alpha=0.15)
        target.set_ylabel(name, color=color)
    if sweep["chosen"]["lam"] is not None:
        bx.axvline(sweep["chosen"]["lam"], color="#d62728", ls=":", label="chosen λ")
    bx.set_xlabel("λ")
    bx.set_title(f"against λ (bands: {sweep.get('confidence', 0.95):.0%} paired bootstrap vs λ = 0)")
    bx.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- rendering


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def _lam(x: float | None) -> str:
    return "n/a" if x is None else f"{x:g}"


def _ci(entry: dict[str, Any]) -> str:
    ci = entry.get("ci")
    return "" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _agreement(judge: dict[str, Any]) -> str:
    agreement = judge.get("agreement")
    if not isinstance(agreement, dict) or agreement.get("accuracy") is None:
        return "agreement not measured"
    text = f"accuracy {agreement['accuracy']:.3f} on n={agreement.get('n', '?')}"
    if agreement.get("auc") is not None:
        text += f", AUC {agreement['auc']:.3f}"
    from excise.evaluate.judges.agreement import operating_counts

    c, _ = operating_counts(judge)  # the sensitivity and specificity the *_corrected rates use
    if c is not None:
        text += (
            f", sensitivity {c['sensitivity']:.3f} ({c['true_positives']}/{c['n_positive']}), "
            f"specificity {c['specificity']:.3f} ({c['true_negatives']}/{c['n_negative']})"
        )
    if agreement.get("data"):
        text += f" ({agreement['data']})"
    return text


def _item_rows(records: dict[str, Any], names: list[str]) -> list[list[str]]:
    """Per metric, the items each method was scored on (count and split) and its training data
    check: ``unchecked`` where a module carries no training record, never a blank that reads as
    a clean check."""
    from excise.evaluate.overlap import UNCHECKED

    def overlap(rec: dict[str, Any] | None) -> str:
        if rec is None:
            return ""
        value = rec.get("training_overlap")
        if value == UNCHECKED:
            return UNCHECKED
        if not isinstance(value, list) or not value:
            return "not recorded"
        counts = [c.get("overlap") for c in value if isinstance(c, dict)]
        return f"checked, {sum(c for c in counts if isinstance(c, int))} overlap"

    rows = []
    for metric in sorted({m for n in names for m in records.get(n, {})}):
        recs = [records.get(n, {}).get(metric) for n in names]
        items = [f"{r.get('n_items')} ({r.get('split')})" if r else "" for r in recs]
        rows += [[f"{metric}: items (split)", *items], [f"{metric}: training overlap", *map(overlap, recs)]]
    return rows


# ----------------------------------------------------------------------------- intervals

# The methods table's intervals, as the sweeps compute theirs (excise.pipeline.sweep): a paired
# percentile bootstrap of the difference, items paired by identity, none below 20 items.
INTERVAL_RESAMPLES = 10_000
INTERVAL_CONFIDENCE = 0.95
INTERVAL_SEED = 0
# Operators whose first input is the expert the operation edits (negate has none: SKU negates
# the harmful module itself, so it is compared with the base model only).
_EXPERT_FIRST = ("ext_sub", "subtract", "compose")


def operation_experts(recipe: str | None, methods: list[str]) -> dict[str, str]:
    """Each operation of the run that edits an expert → that expert's model name.

    From the resolved recipe's ``operations`` (``op`` in ext_sub / subtract / compose: the
    first of ``inputs``); a folder without a recipe (``excise eval --out``) pairs the methods
    named ``ext_sub``, ``subtract`` and ``compose`` with ``expert`` when it was scored.

    Args:
        recipe: the resolved recipe's YAML text, or None.
        methods: the model names with results.

    Returns:
        ``{operation: expert}``, only for operations with results.
    """
    import yaml

    try:
        operations = (yaml.safe_load(recipe) or {}).get("operations") if recipe else None
    except (yaml.YAMLError, AttributeError):
        operations = None
    if not isinstance(operations, dict):
        return {m: "expert" for m in methods if m in _EXPERT_FIRST and "expert" in methods}
    out = {}
    for name, op in operations.items():
        inputs = op.get("inputs") if isinstance(op, dict) else None
        if name in methods and op.get("op") in _EXPERT_FIRST and isinstance(inputs, list) and inputs:
            out[str(name)] = str(inputs[0])
    return out


def _stat(record: dict[str, Any] | None, metric: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """The record's per-item stat of ``key`` (excise.pipeline.sweep.item_stat), or None and why not."""
    from excise.errors import ConfigError
    from excise.pipeline.sweep import item_stat

    if record is None:
        return None, "not scored"
    if not isinstance(record.get("items"), list):
        return None, "no per-item scores in the record"
    try:
        return item_stat(record.get("metric") or metric, key, record), None
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        return None, str(err)


def compare_cell(
    ref: dict[str, Any] | None,
    other: dict[str, Any] | None,
    metric: str,
    key: str,
    *,
    resamples: int = INTERVAL_RESAMPLES,
    confidence: float = INTERVAL_CONFIDENCE,
    seed: int = INTERVAL_SEED,
) -> dict[str, Any]:
    """``other − ref`` for one number of two result records, with a paired bootstrap interval.

    Items are paired by identity (:func:`excise.pipeline.sweep.paired_difference`): two records
    that scored different items, or items without keys, are not compared.

    Args:
        ref, other: result records (``results/<method>/<eval>.json``), or None when not scored.
        metric, key: which number (``halueval``, ``accuracy``).

    Returns:
        ``{"diff", "ci": [low, high] | None, "p", "n", "reason"}``: ``n`` the paired items
        (perplexity: windows); ``reason`` (None when there is an interval) says why there is
        none: not scored, no per-item scores, different items, fewer than 20 items.
    """
    from excise.pipeline.sweep import _aggregate, paired_difference, pairing_problem

    out: dict[str, Any] = {"diff": None, "ci": None, "p": None, "n": None, "reason": None}
    a, why_a = _stat(ref, metric, key)
    b, why_b = _stat(other, metric, key)
    if a is None or b is None:
        return out | {"reason": f"reference: {why_a}" if a is None else str(why_b)}
    out["n"] = len(b["num"])
    problem = pairing_problem(a, b)
    if problem is not None:
        return out | {"reason": problem}
    test = paired_difference(a, b, resamples=resamples, confidence=confidence, seed=seed)
    va, vb = _aggregate(a), _aggregate(b)
    diff = vb - va
    return out | {
        "diff": diff if math.isfinite(diff) else None,
        "ci": test["ci"],
        "p": test["p"],
        "reason": test.get("reason") if test["ci"] is None else None,
    }


def _intervals(data: dict[str, Any]) -> dict[str, Any]:
    """``{method: {"metric:key": {"n", "vs_base", "vs_expert"?}}}`` for every cell of the methods table."""
    records = data.get("records", {})
    names = list(data["methods"])
    experts = operation_experts(data.get("recipe"), names)
    out: dict[str, Any] = {}
    for method in names:
        for metric, keys in data["methods"][method].items():
            rec = records.get(method, {}).get(metric)
            for key in keys:
                stat, _ = _stat(rec, metric, key)
                cell: dict[str, Any] = {"n": None if stat is None else len(stat["num"])}
                if method != "base":
                    cell["vs_base"] = compare_cell(records.get("base", {}).get(metric), rec, metric, key)
                if method in experts:
                    expert = experts[method]
                    ref = records.get(expert, {}).get(metric)
                    cell["vs_expert"] = {"expert": expert} | compare_cell(ref, rec, metric, key)
                out.setdefault(method, {})[f"{metric}:{key}"] = cell
    return out


def _short_reason(reason: str) -> str:
    """The table's few words for why a cell has no interval (report.json keeps the whole reason)."""
    from excise.evaluate.stats import MIN_RESAMPLING_UNITS

    if reason.startswith("reference: "):
        return "reference " + _short_reason(reason.removeprefix("reference: "))
    for start, short in [
        ("not scored", "not scored"),
        ("they scored different items", "different items"),
        ("their items carry no identity keys", "items without keys"),
        ("no resample gave a finite", "no finite resample"),
        ("no resamples", "no resamples"),
    ]:
        if reason.startswith(start):
            return short
    if "item(s); an interval needs" in reason:
        return f"n = {reason.split(' ', 1)[0]} < {MIN_RESAMPLING_UNITS}"
    return "no per-item scores"


def _diff_cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return ""
    prefix = f"vs {c['expert']}: " if c.get("expert") not in (None, "expert") else ""
    if c["ci"] is None:
        return f"{prefix}– ({_short_reason(c['reason'] or '')})"
    return f"{prefix}{c['diff']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]"


def _methods_rows(data: dict[str, Any], names: list[str], columns: list[tuple[str, str]]) -> list[list[str]]:
    """Per number: its values, n, and the paired intervals against the base model and the expert."""
    cells = data["intervals"] if "intervals" in data else _intervals(data)
    any_expert = any("vs_expert" in c for by in cells.values() for c in by.values())
    ci = f"{INTERVAL_CONFIDENCE:.0%} CI"
    rows = []
    for m, k in columns:
        got = [cells.get(n, {}).get(f"{m}:{k}") for n in names]
        rows.append([f"{m}:{k}", *[_fmt(data["methods"][n].get(m, {}).get(k)) for n in names]])
        rows.append([f"{m}:{k} n", *["" if c is None else _fmt(c["n"]) for c in got]])
        base = [
            "" if c is None else "reference" if n == "base" else _diff_cell(c.get("vs_base"))
            for n, c in zip(names, got, strict=True)
        ]
        rows.append([f"{m}:{k} Δ vs base [{ci}]", *base])
        if any_expert:
            rows.append([f"{m}:{k} Δ vs expert [{ci}]", *["" if c is None else _diff_cell(c.get("vs_expert"))
                                                         for c in got]])  # fmt: skip
    return rows


def _interval_note() -> str:
    from excise.evaluate.stats import MIN_RESAMPLING_UNITS

    return (
        f"n: items scored (perplexity: windows). Δ: the method's number minus the base model's (for an "
        f"operation also minus its expert's, the operation's first input), with a "
        f"{INTERVAL_CONFIDENCE:.0%} paired percentile bootstrap interval ({INTERVAL_RESAMPLES:,} "
        f"resamples, seed {INTERVAL_SEED}): the same items, paired by identity, are resampled together "
        f"for both models. – marks a cell with no interval, with the reason: the models scored different "
        f"items, or fewer than {MIN_RESAMPLING_UNITS} items. Uncorrected for multiplicity: exploratory."
    )


def _tables(data: dict[str, Any]) -> dict[str, Any]:
    """Every table of the report as (header, rows) of strings, shared by Markdown and HTML."""
    columns = sorted(
        {(metric, key) for by in data["methods"].values() for metric, ks in by.items() for key in ks}
    )
    # One column per method (side by side), one row per number: methods are few, numbers many.
    names = list(data["methods"])
    methods = (
        ["result", *names],
        _methods_rows(data, names, columns) + _item_rows(data.get("records", {}), names),
    )
    sweeps = {}
    for name, s in data["sweeps"].items():
        dname = f"{s['deficiency']['metric']}:{s['deficiency']['key']}"
        uname = f"{s['utility']['metric']}:{s['utility']['key']}"
        rows = []
        for p in s["points"]:
            marks = [m for m, on in [("Pareto", p["pareto"]), ("over tolerance", not p["admissible"]),
                                     ("CHOSEN", p["lam"] == s["chosen"]["lam"]),
                                     ("knee", p["lam"] == s["knee"]["lam"])] if on]  # fmt: skip
            extra = [x for e in p.get("extra", {}).values() for x in (_fmt(e["value"]), _ci(e))]
            rows.append([_lam(p["lam"]), _fmt(p["deficiency"]["value"]), _ci(p["deficiency"]),
                         _fmt(p["utility"]["value"]), _ci(p["utility"]), *extra, _fmt(p.get("utility_loss")),
                         ", ".join(marks)])  # fmt: skip
        extra_names = [x for e in s.get("extra", {}) for x in (e, "Δ vs λ=0 (CI)")]
        header = ["λ", dname, "Δ vs λ=0 (CI)", uname, "Δ vs λ=0 (CI)", *extra_names, "utility loss", ""]
        sweeps[name] = (header, rows)
    return {"methods": methods, "sweeps": sweeps}


def _md_text(x: str) -> str:
    """Text safe in Markdown: no raw HTML, one line."""
    return x.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(x: str) -> str:
        return _md_text(x).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: Path, alt: str) -> str:
    b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f3f5f8}td:not(:first-child){font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}
.note{color:#555;font-size:.9em}.chosen{color:#b00;font-weight:600}
"""


def write_report(
    run_dir: Path, *, out: Path | None = None, title: str | None = None, samples: int = 3
) -> Path:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``plots/`` for a run folder.

    Args:
        run_dir: the run folder (layout in the module docstring).
        out: report folder; default ``run_dir/report``. Replaced atomically.
        title: heading; default the run folder's name.
        samples: prompts shown per generation metric.

    Returns:
        The path of ``report.html``.

    Raises:
        ConfigError: ``run_dir`` missing, a result file that is not JSON, or nothing to report.
    """
    from datetime import datetime, timezone

    from excise.errors import ConfigError
    from excise.evaluate.cache import write_atomic_json
    from excise.pem.diagnostics import plot_diagnostics
    from excise.pem.io import atomic_output_dir

    run_dir = Path(run_dir)
    data = collect(run_dir)
    data["generations"] = _generations(data["records"], samples=samples)
    if not (data["methods"] or data["sweeps"] or data["diagnostics"]):
        raise ConfigError(f"{run_dir} holds no results/, sweeps/ or diagnostics/ to report on")
    out = Path(out) if out is not None else run_dir / "report"
    title = title or f"excise report: {run_dir.resolve().name}"
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tables = _tables(data)
    with atomic_output_dir(out, overwrite=True) as tmp:
        plots: dict[str, Path] = {}
        for name, sweep in data["sweeps"].items():
            plots[f"sweep:{name}"] = plot_sweep(sweep, tmp / "plots" / f"sweep_{name}.png")
        for name, diag in data["diagnostics"].items():
            plots[f"diagnostics:{name}"] = plot_diagnostics(diag, tmp / "plots" / f"diagnostics_{name}.png")
        summary = _clean(
            {
                "title": title,
                "created": created,
                "run_dir": data["run_dir"],
                "methods": data["methods"],
                "intervals": data["intervals"],
                "interval_settings": {
                    "resamples": INTERVAL_RESAMPLES,
                    "confidence": INTERVAL_CONFIDENCE,
                    "seed": INTERVAL_SEED,
                },
                "sweeps": {name: _sweep_summary(s) for name, s in data["sweeps"].items()},
                "diagnostics": {name: d["summary"] for name, d in data["diagnostics"].items()},
                "judges": data["judges"],
                "generations": data["generations"],
                "command": data["command"],
                "recipe": data["recipe"],
                "outdated": data["outdated"],
                "plots": {k: str(p.relative_to(tmp)) for k, p in plots.items()},
            }
        )
        write_atomic_json(tmp / "report.json", summary)
        (tmp / "report.md").write_text(_markdown(data, tables, plots, tmp, title, created))
        (tmp / "report.html").write_text(_html(data, tables, plots, title, created))
    return out / "report.html"


def _sweep_summary(s: dict[str, Any]) -> dict[str, Any]:
    """A sweep without its per-item scores: the table, front, chosen λ and knee."""
    points = [
        {k: p[k] for k in ("lam", "pareto", "admissible", "utility_loss")}
        | {axis: {k: p[axis][k] for k in ("value", "diff", "ci")} for axis in ("deficiency", "utility")}
        | {"extra": {n: {k: e[k] for k in ("value", "diff", "ci")} for n, e in p.get("extra", {}).items()}}
        for p in s["points"]
    ]
    keys = ("deficiency", "utility", "extra", "pareto", "chosen", "knee", "confidence", "bootstrap")
    selection = {k: v for k, v in (s.get("selection") or {}).items() if k != "axes"}
    return {k: s.get(k) for k in keys} | {"points": points, "selection": selection}


def _held_out_line(s: dict[str, Any]) -> list[str]:
    """The figures at the chosen λ on the items that did not choose it (issue 22: no winner's curse)."""
    report = (s["chosen"] or {}).get("report")
    if not report:
        return []
    names = {"deficiency": f"{s['deficiency']['metric']}:{s['deficiency']['key']}",
             "utility": f"{s['utility']['metric']}:{s['utility']['key']}"}  # fmt: skip
    parts = []
    for name, r in report.items():
        diff = "n/a" if r["diff"] is None else f"{r['diff']:+.4f}"
        interval = f" [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]" if r.get("ci") else ""
        parts.append(
            f"{names.get(name, name)} {_fmt(r['value'])} (Δ vs λ = 0 {diff}{interval}; n = {r['n']})"
        )
    where = "the items that did not choose it" if (s.get("selection") or {}).get("held_out") else "all items"
    return [f"At the chosen λ, on {where}: " + "; ".join(parts) + "."]


def _sweep_lines(s: dict[str, Any]) -> list[str]:
    chosen, knee = s["chosen"], s["knee"]
    return [
        f"Chosen λ = {_lam(chosen['lam'])}: {chosen['rule']}.",
        *_held_out_line(s),
        f"Knee λ = {_lam(knee['lam'])}" + (f" ({knee['reason']})." if knee.get("reason") else "."),
        f"Pareto front: λ ∈ {{{', '.join(f'{x:g}' for x in s['pareto'])}}}.",
        f"Intervals: {s.get('confidence', 0.95):.0%} paired bootstrap ({s.get('bootstrap')} resamples) "
        "of the difference against λ = 0, the same items at every λ.",
    ]


def _generation_rows(g: dict[str, Any]) -> list[list[str]]:
    return [
        [method, answer[:500] + ("…" if len(answer) > 500 else "")] for method, answer in g["answers"].items()
    ]


def _judge_line(j: dict[str, Any]) -> str:
    return f"{j['name']} (used by {', '.join(str(m) for m in j['metrics'])}): {_agreement(j)}"


_OUTDATED_NOTE = (
    "Left in the run folder by an earlier version of the recipe (a model, evaluation, operation "
    "or sweep it no longer has): not shown above. Delete them, or restore the recipe entries."
)


def _markdown(
    data: dict[str, Any], tables: dict[str, Any], plots: dict[str, Path], tmp: Path, title: str, created: str
) -> str:
    from excise.pem.diagnostics import format_summary

    md = [f"# {title}", "", f"Run folder `{data['run_dir']}`, report made {created}.", ""]
    if data["methods"]:
        md += ["## Methods side by side", "", _md_table(*tables["methods"]), "", _interval_note(), ""]
    for name, s in data["sweeps"].items():
        md += [f"## λ sweep `{name}` ({s['config']['operation']})", ""]
        md += [f"![trade-off of {name}]({plots[f'sweep:{name}'].relative_to(tmp)})", ""]
        md += [_md_table(*tables["sweeps"][name]), "", *[f"- {line}" for line in _sweep_lines(s)], ""]
    for name, diag in data["diagnostics"].items():
        md += [f"## Per-layer diagnostics `{name}`", ""]
        md += [f"![diagnostics of {name}]({plots[f'diagnostics:{name}'].relative_to(tmp)})", ""]
        md += ["```", format_summary(diag), "```", ""]
    if data["generations"]:
        md += ["## Sample generations", ""]
        for g in data["generations"]:
            md += [
                f"**{g['metric']}** — {_md_text(g['prompt'][:300])}",
                "",
                _md_table(["method", "answer"], _generation_rows(g)),
                "",
            ]
    md += ["## Judges", ""]
    md += [f"- {_judge_line(j)}" for j in data["judges"]] or ["- none used"]
    if data["outdated"]:
        md += ["", "## Outdated outputs", "", _OUTDATED_NOTE, ""]
        md += [f"- `{_md_text(p)}`" for p in data["outdated"]]
    md += ["", "## Reproduce", ""]
    md += ["```", data["command"] or "(no command.txt in the run folder)", "```", ""]
    if data["recipe"]:
        md += ["Resolved recipe:", "", "```yaml", data["recipe"].rstrip(), "```", ""]
    return "\n".join(md)


def _html(
    data: dict[str, Any], tables: dict[str, Any], plots: dict[str, Path], title: str, created: str
) -> str:
    from excise.pem.diagnostics import format_summary

    e = html.escape
    body = [
        f"<h1>{e(title)}</h1>",
        f'<p class="note">Run folder <code>{e(data["run_dir"])}</code>, report made {e(created)}.</p>',
    ]
    if data["methods"]:
        body += ['<h2 id="methods">Methods side by side</h2>', _html_table(*tables["methods"])]
        body += [f'<p class="note">{e(_interval_note())}</p>']
    for name, s in data["sweeps"].items():
        body += [f'<h2 id="sweep-{e(name)}">λ sweep {e(name)} ({e(s["config"]["operation"])})</h2>']
        body += [_img(plots[f"sweep:{name}"], f"trade-off of {name}"), _html_table(*tables["sweeps"][name])]
        lines = _sweep_lines(s)
        body += [
            f'<p class="chosen">{e(lines[0])}</p>',
            "<ul>" + "".join(f"<li>{e(x)}</li>" for x in lines[1:]) + "</ul>",
        ]
    for name, diag in data["diagnostics"].items():
        body += [f'<h2 id="diagnostics-{e(name)}">Per-layer diagnostics {e(name)}</h2>']
        body += [
            _img(plots[f"diagnostics:{name}"], f"diagnostics of {name}"),
            f"<pre>{e(format_summary(diag))}</pre>",
        ]
    if data["generations"]:
        body += ['<h2 id="generations">Sample generations</h2>']
        for g in data["generations"]:
            body += [
                f"<p><b>{e(g['metric'])}</b> — {e(g['prompt'][:300])}</p>",
                _html_table(["method", "answer"], _generation_rows(g)),
            ]
    body += [
        '<h2 id="judges">Judges</h2>',
        "<ul>"
        + ("".join(f"<li>{e(_judge_line(j))}</li>" for j in data["judges"]) or "<li>none used</li>")
        + "</ul>",
    ]
    if data["outdated"]:
        body += ['<h2 id="outdated">Outdated outputs</h2>', f'<p class="note">{e(_OUTDATED_NOTE)}</p>']
        body += ["<ul>" + "".join(f"<li><code>{e(p)}</code></li>" for p in data["outdated"]) + "</ul>"]
    body += [
        '<h2 id="reproduce">Reproduce</h2>',
        f"<pre>{e(data['command'] or '(no command.txt in the run folder)')}</pre>",
    ]
    if data["recipe"]:
        body += ["<p>Resolved recipe:</p>", f"<pre>{e(data['recipe'])}</pre>"]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
