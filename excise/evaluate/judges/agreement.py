"""A judge's confusion counts at its operating threshold: what correcting a judged rate needs.

:func:`excise.evaluate.stats.corrected_rate_interval` corrects a flagged share for the judge's
sensitivity and specificity, and its interval needs the counts behind them (how many labelled
unsafe and safe items they were measured on). Agreement records written since carry them
(:func:`confusion_fields`: ``sensitivity``, ``specificity``, ``n_positive``, ``n_negative``,
``true_positives``, ``true_negatives``). The shipped weights' records predate that and hold
only ``accuracy``, ``n``, ``positive_rate`` and ``flagged_rate`` (4 decimals); their counts
follow from those exactly (:func:`counts_from_rates`), so the weight files — whose content is
the judge's identity in every cache key — are never rewritten for it.

Figures measured later beside a weights file (``judge-check --store``: the held-out responses
without a refusal marker, ``content_only``, and HH-RLHF's held-out pairs, ``hh_pairs``) live in a
sidecar, ``<weights stem>.agreement.json`` (:func:`write_sidecar`), which the judges' ``describe()``
merges into ``agreement`` (:func:`with_sidecar`) when it names the weights' SHA-256. The sidecar
is not part of :func:`~excise.evaluate.judges.registry.judge_identity`: it changes no score, so
cached scores and pipeline stages that used the judge stay valid.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "HELDOUT_THRESHOLD",
    "SIDECAR_KEYS",
    "confusion_fields",
    "counts_from_rates",
    "operating_counts",
    "read_sidecar",
    "sidecar_path",
    "with_sidecar",
    "write_sidecar",
]

# The rule ``heldout_agreement`` measures at (``score > 0.5``); its records before 2026-12 do not
# say so, and a record without a ``threshold`` is read as measured here.
HELDOUT_THRESHOLD = 0.5
_INTEGER_TOLERANCE = 0.05


def confusion_fields(flagged: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Sensitivity and specificity (4 decimals; None without an item of the class) with their counts.

    Args:
        flagged: ``(N,)`` the judge's verdicts at its threshold.
        labels: ``(N,)`` 0/1 labels (1 = unsafe / toxic).
    """
    flagged, positive = np.asarray(flagged, dtype=bool), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    tp, tn = int((flagged & positive).sum()), int((~flagged & ~positive).sum())
    return {
        "sensitivity": round(tp / n_pos, 4) if n_pos else None,
        "specificity": round(tn / n_neg, 4) if n_neg else None,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "true_positives": tp,
        "true_negatives": tn,
    }


def counts_from_rates(
    n: int, accuracy: float, positive_rate: float, flagged_rate: float
) -> dict[str, int] | None:
    """The confusion counts behind an agreement record that stores only rates, or None.

    With ``n`` labelled items, accuracy ``a``, labelled-positive share ``π`` and flagged share
    ``f``, all measured at the same threshold: ``TP + TN = a·n``, ``TP + FN = π·n`` and
    ``TP + FP = f·n`` give ``TP = (a + f + π − 1)·n/2``, ``FN = π·n − TP``, ``FP = f·n − TP``,
    ``TN = n − TP − FN − FP``. The stored figures are rounded to 4 decimals, so the counts come
    out within ``≈ 7.5e-5·n`` of integers; they are accepted only when each is within ±0.05 of
    a non-negative integer, ``n < 10,000`` (so that a 4-decimal share pins down one count of
    ``n``), and the integer counts reproduce the three stored figures when rounded to 4
    decimals again. Then the counts are exact: the only ones consistent with the record.

    Returns:
        ``{"true_positives", "false_negatives", "false_positives", "true_negatives"}``, or None
        when the figures do not determine integer counts (then no correction is made).
    """
    if not (isinstance(n, int) and 0 < n < 10_000):
        return None
    tp = (accuracy + flagged_rate + positive_rate - 1.0) * n / 2.0
    fn = positive_rate * n - tp
    fp = flagged_rate * n - tp
    tn = n - tp - fn - fp
    raw = {"true_positives": tp, "false_negatives": fn, "false_positives": fp, "true_negatives": tn}
    if any(abs(v - round(v)) > _INTEGER_TOLERANCE or round(v) < 0 for v in raw.values()):
        return None
    counts = {k: round(v) for k, v in raw.items()}
    tp_, fn_, fp_, tn_ = counts.values()
    again = ((tp_ + tn_) / n, (tp_ + fn_) / n, (tp_ + fp_) / n)
    stored = (accuracy, positive_rate, flagged_rate)
    if sum(counts.values()) != n or any(
        not math.isclose(round(x, 4), s, abs_tol=1e-9) for x, s in zip(again, stored, strict=True)
    ):
        return None
    return counts


def operating_counts(described: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The judge's confusion counts at its operating threshold, from its ``describe()`` record.

    Read from the agreement record's counts when it has them (``true_positives``,
    ``n_positive``, ``true_negatives``, ``n_negative``), else derived from its rates
    (:func:`counts_from_rates`). None, and why, when the judge has no measured agreement
    (``hf:``/``openai:`` judges, the refusal heuristic, a cross-encoder run with another
    terse-refusal rule), when the agreement was measured at another threshold than the judge
    now applies, or when the record does not determine the counts.

    Args:
        described: ``judge.describe()`` (or :func:`~excise.evaluate.metrics.base.judge_record`),
            holding ``threshold`` and ``agreement``.

    Returns:
        ``({"true_positives", "n_positive", "true_negatives", "n_negative", "sensitivity",
        "specificity", "threshold", "source"}, None)`` or ``(None, reason)``.
    """
    name = described.get("name", "the judge")
    agreement = described.get("agreement")
    if not isinstance(agreement, dict) or agreement.get("n") in (None, 0):
        note = described.get("agreement_note")
        return None, note or (
            f"judge {name} has no measured agreement with labelled data, "
            "so its sensitivity and specificity are unknown"
        )
    measured_at = float(agreement.get("threshold", HELDOUT_THRESHOLD))
    threshold = described.get("threshold")
    if threshold is None or not math.isclose(float(threshold), measured_at):
        return None, (
            f"judge {name}'s agreement was measured at threshold {measured_at:g}; "
            f"it now flags above {threshold}, where its sensitivity and specificity are unknown"
        )
    keys = ("true_positives", "n_positive", "true_negatives", "n_negative")
    if all(isinstance(agreement.get(k), int) for k in keys):
        tp, n_pos, tn, n_neg = (agreement[k] for k in keys)
        source = "counts recorded with the agreement"
    else:
        rates = [agreement.get(k) for k in ("accuracy", "positive_rate", "flagged_rate")]
        numbers = all(isinstance(r, int | float) and not isinstance(r, bool) for r in rates)
        derived = counts_from_rates(agreement["n"], *rates) if numbers else None
        if derived is None:
            return None, (
                f"judge {name}'s agreement record does not determine its confusion counts "
                "(no counts recorded, and accuracy, positive_rate and flagged_rate do not fix them)"
            )
        tp, tn = derived["true_positives"], derived["true_negatives"]
        n_pos, n_neg = tp + derived["false_negatives"], tn + derived["false_positives"]
        source = "derived from the recorded accuracy, positive_rate and flagged_rate (exact)"
    if not (0 <= tp <= n_pos and 0 <= tn <= n_neg):
        return None, f"judge {name}'s agreement record holds impossible counts ({tp}/{n_pos}, {tn}/{n_neg})"
    if n_pos == 0 or n_neg == 0:
        return None, f"judge {name}'s labelled data hold one class only: no sensitivity or specificity"
    return {
        "true_positives": tp,
        "n_positive": n_pos,
        "true_negatives": tn,
        "n_negative": n_neg,
        "sensitivity": tp / n_pos,
        "specificity": tn / n_neg,
        "threshold": measured_at,
        "source": source,
    }, None


# What a sidecar adds to a judge's agreement record (docs/JUDGES.md §1.8).
SIDECAR_KEYS = ("content_only", "hh_pairs")


def sidecar_path(weights: str | Path) -> Path:
    """``harm_cross.safetensors`` → ``harm_cross.agreement.json`` beside it."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}.agreement.json")


@lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    from excise.data import file_sha256

    return file_sha256(Path(path))


def _weights_digest(weights: Path) -> str:
    stat = weights.stat()
    return _digest(str(weights.resolve()), stat.st_size, stat.st_mtime_ns)


def read_sidecar(weights: str | Path) -> dict[str, Any]:
    """The sidecar's :data:`SIDECAR_KEYS` figures for ``weights``; ``{}`` when there is no sidecar,
    it is unreadable, or it was measured on other weights (its ``weights_sha256`` differs)."""
    weights, path = Path(weights), sidecar_path(weights)
    if not (path.is_file() and weights.is_file()):
        return {}
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or stored.get("weights_sha256") != _weights_digest(weights):
        return {}
    return {k: stored[k] for k in SIDECAR_KEYS if isinstance(stored.get(k), dict)}


def with_sidecar(agreement: dict[str, Any] | None, weights: str | Path) -> dict[str, Any] | None:
    """``agreement`` (the record in the weights' metadata) with the sidecar's figures merged in
    (:func:`read_sidecar`); None stays None (no measured agreement for this judge's settings)."""
    if agreement is None:
        return None
    return {**agreement, **read_sidecar(weights)}


def write_sidecar(weights: str | Path, figures: dict[str, Any], *, measured_by: str) -> Path:
    """Write ``figures``' :data:`SIDECAR_KEYS` beside ``weights`` (atomically), with the weights'
    SHA-256 (what :func:`read_sidecar` checks) and how they were measured; returns the path.

    ``excise eval judge-check --store`` calls it with :func:`~.probe_training.harm_agreement`'s result.
    """
    weights = Path(weights)
    missing = [k for k in SIDECAR_KEYS if not isinstance(figures.get(k), dict)]
    if missing:
        raise ValueError(f"sidecar figures lack {', '.join(missing)}")
    record = {
        "weights": weights.name,
        "weights_sha256": _weights_digest(weights),
        "measured_by": measured_by,
        **{k: figures[k] for k in SIDECAR_KEYS},
    }
    path = sidecar_path(weights)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
