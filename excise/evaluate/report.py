"""A short rich table of one result record (what ``excise eval …`` prints)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

__all__ = ["summary_table"]


def summary_table(record: dict[str, Any]) -> Table:
    """Metric values, item count, judge (with its measured agreement) and where the numbers came from."""
    source = "cache" if record.get("from_cache") else f"{record['timing']['seconds']:.1f} s"
    title = f"{record['metric']} · {record['model']}" + (
        f" + {record['adapter']}" if record.get("adapter") else ""
    )
    table = Table(title=title, caption=f"{record['n_items']} items · {source}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in record["metrics"].items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    judge = record.get("judge")
    if judge:
        agreement = judge.get("agreement") or judge.get("accuracy")
        table.add_row("judge", f"{judge.get('name')}" + (f" (agreement {agreement})" if agreement else ""))
    return table
