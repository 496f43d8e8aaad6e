"""Ext-Sub diagnostics per module (DESIGN.md §1): how much of θ− is "general"?

For each row ``i`` of a module, with ``cos_i = W1_i·W2_i / (|W1_i||W2_i|)``:

- ``cos``: the cosine between expert and anti-expert rows;
- ``general_share = |g_i|²/|W2_i|²``: share of the anti-expert that is general;
- ``overlap = cos(d_i, W1_i)``: overlap of the extracted deficiency with the expert;
- ``removed = |λ d_i|/|W2_i|``: how much of the anti-expert λ really subtracts.

All come from the Gram matrices (no dense delta). Honest note, derived in
:mod:`excise.pem.linalg`: since ``d_i = (b_i/2)(n2_i − n1_i)``, the last three are
functions of the cosine alone — ``general_share = (1 + cos)/2``,
``overlap = −sqrt((1 − cos)/2)``, ``removed = |λ|·sqrt((1 − cos)/2)`` — so the
cosine is the one number that describes a module; the others restate it in the
paper's terms. Rows where either delta is zero are counted apart and left out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from excise.pem.delta import Adapter
from excise.pem.linalg import row_dots, row_norms
from excise.pem.ops.base import check_compatible, check_finite

__all__ = ["diagnose", "format_summary", "plot_diagnostics"]

_LAYER = re.compile(r"\.(\d+)\.")
_STATS = ("cos", "general_share", "overlap", "removed")


def _row_stats(a: np.ndarray, b: np.ndarray, p: np.ndarray, lam: float) -> dict[str, np.ndarray]:
    active = (a > 0) & (b > 0)
    cos = np.clip(p[active] / (a[active] * b[active]), -1.0, 1.0)  # (active rows,)
    half_gap = np.sqrt((1.0 - cos) / 2.0)
    return {
        "cos": cos,
        "general_share": (1.0 + cos) / 2.0,
        "overlap": -half_gap,
        "removed": abs(lam) * half_gap,
    }


def _summary(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:  # JSON has no NaN: no active row gives null
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


def diagnose(
    expert: Adapter, anti_expert: Adapter, *, lam: float = 1.0, allow_partial: bool = False
) -> dict[str, Any]:
    """Per-module statistics of the Ext-Sub decomposition.

    Args:
        expert: the expert PEM θ+.
        anti_expert: the anti-expert PEM θ−.
        lam: λ used for the ``removed`` statistic.
        allow_partial: look only at shared modules when target modules differ.

    Returns:
        A JSON-ready dict: ``modules`` (one entry per shared module with ``layer``,
        ``kind``, ``rows``, ``zero_rows`` and mean/min/max of each statistic) and
        ``summary`` (the same statistics over all rows, and mean cosine per kind).

    Raises:
        ConfigError: λ not finite.
        AdapterError: incompatible adapters.
    """
    lam = check_finite("lam", lam)
    check_compatible([expert, anti_expert], allow_partial=allow_partial)
    modules, pooled = [], {key: [] for key in _STATS}
    for name in sorted(expert.modules.keys() & anti_expert.modules.keys(), key=_natural_key):
        m1, m2 = expert.modules[name], anti_expert.modules[name]
        a, b, p = row_norms(m1), row_norms(m2), row_dots(m1, m2)  # (rows,) each
        stats = _row_stats(a, b, p, lam)
        layer = _LAYER.search(name)
        entry: dict[str, Any] = {
            "name": name,
            "layer": int(layer.group(1)) if layer else None,
            "kind": name.rsplit(".", 1)[-1],
            "rows": int(a.size),
            "zero_rows": int(((a == 0) | (b == 0)).sum()),
        }
        for key, values in stats.items():
            entry[key] = _summary(values)
            pooled[key].append(values)
        modules.append(entry)
    kinds: dict[str, list[float]] = {}
    for entry in modules:
        if entry["cos"]["mean"] is not None:
            kinds.setdefault(entry["kind"], []).append(entry["cos"]["mean"])
    summary = {
        key: _summary(np.concatenate(values) if values else np.empty(0)) for key, values in pooled.items()
    }
    return {
        "expert": expert.source.get("path"),
        "anti_expert": anti_expert.source.get("path"),
        "lam": lam,
        "modules": modules,
        "summary": {**summary, "cos_mean_by_kind": {k: sum(v) / len(v) for k, v in kinds.items()}},
        "note": "general_share = (1+cos)/2, overlap = -sqrt((1-cos)/2), removed = |lam|*sqrt((1-cos)/2) "
        "row by row: the cosine determines the rest",
    }


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines: the pooled statistics, then the mean cosine per kind."""

    def fmt(stat: dict[str, float | None]) -> str:
        if stat["mean"] is None:
            return "n/a (no row with both deltas non-zero)"
        return f"mean {stat['mean']:+.4f}  [{stat['min']:+.4f}, {stat['max']:+.4f}]"

    s = report["summary"]
    lines = [f"{len(report['modules'])} shared modules, λ = {report['lam']}"]
    lines += [f"  {key:<14} {fmt(s[key])}" for key in _STATS]
    lines += [f"  cos mean, {kind:<12} {value:+.4f}" for kind, value in sorted(s["cos_mean_by_kind"].items())]
    return "\n".join(lines)


def plot_diagnostics(report: dict[str, Any], out: str | Path) -> Path:
    """Plot mean cosine, general share and removed norm per layer and module kind (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    titles = {
        "cos": "cos(W1_i, W2_i)",
        "general_share": "general share |g|²/|W2|²",
        "removed": "removed |λd|/|W2|",
    }
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for entry in report["modules"]:
        by_kind.setdefault(entry["kind"], []).append(entry)
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for kind, entries in sorted(by_kind.items()):
            xs = [e["layer"] if e["layer"] is not None else i for i, e in enumerate(entries)]
            ys = [np.nan if e[key]["mean"] is None else e[key]["mean"] for e in entries]
            ax.plot(xs, ys, marker="o", ms=3, label=kind)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Ext-Sub diagnostics (λ = {report['lam']})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
