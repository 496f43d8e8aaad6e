"""A short rich table of one result record (what ``excise eval …`` prints)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

__all__ = ["data_line", "summary_table"]

_SHOWN_COLUMNS = 6


def summary_table(record: dict[str, Any]) -> Table:
    """Metric values ± standard error, the data used (split, rows kept of rows read, columns ignored),
    judge (with its measured agreement), the training data check (or ``unchecked``, with why) and
    where the numbers came from."""
    source = "from cache" if record.get("from_cache") else f"{record['timing']['seconds']:.1f} s"
    title = f"{record['metric']} · {record['model']}" + (
        f" + {record['adapter']}" if record.get("adapter") else ""
    )
    caption = f"{record['n_items']} items · {source}"
    if record.get("data_summary"):
        caption = f"{data_line(record['data_summary'])} · {source}"
    table = Table(title=title, caption=caption, min_width=60)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("± stderr", justify="right")
    stderr = record.get("stderr") or {}
    reasons = record.get("null_reasons") or {}
    for name, value in record["metrics"].items():
        se = stderr.get(name)
        if value is None:
            table.add_row(name, f"null: {reasons.get(name, 'no value')}", "")
        else:
            table.add_row(name, _number(value), "" if se is None else _number(se))
    judge = record.get("judge")
    if judge:
        table.add_row("judge", f"{judge.get('name')}{_agreement(judge)}", "")
    if "training_overlap" in record:  # "unchecked" is shown, never left to read as a clean check
        from excise.evaluate.overlap import overlap_summary

        table.add_row("training overlap", overlap_summary(record), "")
    return table


def data_line(summary: dict[str, Any]) -> str:
    """``split eval: 72 of 320 rows kept; ignored column(s): ContextString (19 rows)``."""
    text = f"split {summary['split']}: {summary['kept']} of {summary['rows_read']} rows kept"
    dropped = summary["rows_read"] - summary["after_split"]
    reasons = []
    if dropped:
        reasons.append(f"{dropped} outside the {summary['split']} split")
    duplicates = summary.get("duplicates_dropped", 0)
    if duplicates:
        reasons.append(f"{duplicates} duplicate prompts")
    beyond = summary["after_split"] - duplicates - summary["kept"]
    if beyond > 0:
        how = "--head" if (summary.get("subsample") or {}).get("rule", "").startswith("head") else "--limit"
        reasons.append(f"{beyond} left out by {how}" if how == "--limit" else f"{beyond} beyond --head")
    if reasons:
        text += f" ({', '.join(reasons)})"
    ignored = summary.get("ignored_columns") or {}
    if ignored:
        shown = [f"{col} ({n} rows)" for col, n in list(ignored.items())[:_SHOWN_COLUMNS]]
        more = len(ignored) - _SHOWN_COLUMNS
        text += "; ignored column(s): " + ", ".join(shown) + (f" and {more} more" if more > 0 else "")
    return text


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _agreement(judge: dict[str, Any]) -> str:
    """`` (accuracy 0.91 on n=200)`` from ``describe()``'s agreement record, or nothing."""
    agreement = judge.get("agreement")
    if isinstance(agreement, dict) and agreement.get("accuracy") is not None:
        return f" (accuracy {agreement['accuracy']:.3f} on n={agreement.get('n', '?')})"
    return ""
