"""A short rich table of one result record (what ``excise eval …`` prints)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

__all__ = ["summary_table"]


def summary_table(record: dict[str, Any]) -> Table:
    """Metric values, item count, judge (with its measured agreement) and where the numbers came from."""
    source = "from cache" if record.get("from_cache") else f"{record['timing']['seconds']:.1f} s"
    title = f"{record['metric']} · {record['model']}" + (
        f" + {record['adapter']}" if record.get("adapter") else ""
    )
    table = Table(title=title, caption=f"{record['n_items']} items · {source}", min_width=60)
    table.add_column("metric")
    table.add_column("value", justify="right")
    reasons = record.get("null_reasons") or {}
    for name, value in record["metrics"].items():
        if value is None:
            table.add_row(name, f"null: {reasons.get(name, 'no value')}")
        else:
            table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    judge = record.get("judge")
    if judge:
        table.add_row("judge", f"{judge.get('name')}{_agreement(judge)}")
    return table


def _agreement(judge: dict[str, Any]) -> str:
    """`` (accuracy 0.91 on n=200)`` from ``describe()``'s agreement record, or nothing."""
    agreement = judge.get("agreement")
    if isinstance(agreement, dict) and agreement.get("accuracy") is not None:
        return f" (accuracy {agreement['accuracy']:.3f} on n={agreement.get('n', '?')})"
    return ""
