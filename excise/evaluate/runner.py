"""Run one metric end to end: data → (cache) → model → metric → a result record.

Reads like a recipe (STYLE.md rule 6): resolve the metric, load and map the data, take the
held-out split and the limit, look the result up in the cache, load judge and model, run,
record everything that made the number, store it in the cache.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from excise import __version__
from excise.data import assign_split, load_records, prompt_key
from excise.errors import ConfigError, DataError
from excise.evaluate.cache import cache_key, read_cached, strict_json, write_atomic_json, write_cached
from excise.evaluate.config import EvalConfig
from excise.evaluate.metrics import METRICS
from excise.evaluate.metrics.base import EvalContext, Metric, judge_record
from excise.evaluate.overlap import check_overlap, module_folders
from excise.evaluate.subject import Subject, adapter_identity, file_digest, load_subject, model_identity

__all__ = ["NEEDS_BASE", "load_items", "load_metric_judge", "run_eval", "write_result"]

# Metrics that compare against the base model's own answers: the adapter must stay switchable.
NEEDS_BASE = {"utility"}


def run_eval(
    name: str,
    cfg: EvalConfig,
    *,
    judge: Any = None,
    use_cache: bool = True,
    progress: bool = True,
    subject: Subject | None = None,
    modules: list[Path] | None = None,
) -> dict[str, Any]:
    """Evaluate ``cfg.model`` (+ ``cfg.adapter``) on metric ``name`` and return the result record.

    Args:
        name: a key of :data:`~excise.evaluate.metrics.METRICS` (``truthfulqa-mc``, ``toxicity``…).
        cfg: the settings.
        judge: a ready judge object (overrides ``cfg.judge``); for tests and library use.
        use_cache: read and write ``$EXCISE_CACHE/eval``.
        progress: show progress bars.
        subject: an already loaded model to evaluate instead of loading ``cfg.model`` +
            ``cfg.adapter`` (the λ sweep changes one in place). The cache is then not used:
            its key names files, not a model in memory.
        modules: adapter folders ``subject`` was built from (a sweep's inputs): their training
            data is checked against the items too, as ``cfg.adapter``'s is.

    Returns:
        The record: ``metrics`` (each a finite number, or ``None`` with its reason in
        ``null_reasons``), ``items`` (per-item outputs), provenance (model, adapter, data, limit,
        seed, judge, settings, version), ``training_overlap`` (each module × training file
        checked, with its overlap count) and ``warnings`` (overlaps let through by
        ``allow_overlap``), plus ``from_cache``.

    Raises:
        ConfigError, DataError, ModelLoadError, AdapterError: bad settings, data, model or adapter;
            DataError also for items whose prompt the model was trained on (or whose training
            data cannot be checked) without ``allow_overlap``.
    """
    metric = _metric(name)
    if metric.check is not None and subject is None:  # a given subject is the caller's to vouch for
        metric.check(cfg)
    spec = cfg.data or metric.default_data
    items, columns = _load_items(metric, cfg, spec)
    # Never silently score what the model was trained on (checked on every run, cached or not).
    folders = module_folders(cfg.model, cfg.adapter) + [Path(m) for m in modules or []]
    checks, overlap_warnings = check_overlap(
        items, metric.prompt_field, folders, data=spec, allow=cfg.allow_overlap
    )
    overlap = {"training_overlap": checks, "warnings": overlap_warnings}
    judge_spec = (cfg.judge or metric.default_judge) if _uses_judge(metric, cfg) else None
    payload = {
        "metric": metric.name,
        "model": model_identity(cfg.model),
        "adapter": adapter_identity(cfg.adapter),
        "reference": model_identity(cfg.reference) if cfg.reference else None,
        "data": _data_identity(spec),
        "settings": cfg.settings(),
        "judge": judge_spec if judge is None else judge_record(judge),
        "excise": __version__,
    }
    key = cache_key(payload)
    use_cache = use_cache and subject is None
    if use_cache and (hit := read_cached(key)) is not None:
        return _strict_record(hit) | overlap | {"from_cache": True}  # entries of older versions too

    if judge is None:
        judge = load_metric_judge(name, cfg)
    clock = time.perf_counter()
    if subject is None:
        subject = load_subject(
            cfg.model,
            cfg.adapter,
            merge=cfg.merge and metric.name not in NEEDS_BASE,
            dtype=cfg.dtype,
            device=cfg.device,
        )
    load_seconds = time.perf_counter() - clock
    ctx = EvalContext(cfg, subject, items, judge=judge, progress=progress)
    clock = time.perf_counter()
    outcome = metric.run(ctx)
    record = {
        "metric": metric.name,
        "metrics": outcome.metrics,
        "null_reasons": outcome.null_reasons,
        "judge": judge_record(judge) if judge is not None else None,
        "model": cfg.model,
        "adapter": str(cfg.adapter) if cfg.adapter else None,
        "data": spec,
        "columns": columns,
        "n_items": len(items),
        "split": cfg.split or metric.default_split,
        "limit": cfg.limit,
        "seed": cfg.seed,
        "settings": cfg.settings(),
        "provenance": payload | {"cache_key": key},
        "timing": {"load_seconds": load_seconds, "seconds": time.perf_counter() - clock},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "excise_version": __version__,
        **outcome.extra,
        "items": outcome.items,
    }
    record = _strict_record(record)
    if use_cache:
        write_cached(key, record)
    return record | overlap | {"from_cache": False}


def load_metric_judge(name: str, cfg: EvalConfig) -> Any:
    """The judge metric ``name`` uses under ``cfg`` (``--judge`` or its default), loaded; None
    when it uses none. Load it once to evaluate several models with it."""
    metric = _metric(name)
    if not _uses_judge(metric, cfg):
        return None
    from excise.evaluate.judges import load_judge

    return load_judge(cfg.judge or metric.default_judge, **cfg.judge_options)


def write_result(record: dict[str, Any], out: Path) -> Path:
    """Write a result record as strict JSON (no NaN), atomically (temp file beside ``out``, then rename)."""
    return write_atomic_json(Path(out), record)


def _strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record as strict JSON: every metric a finite number or ``None`` with its reason in
    ``null_reasons``, and any other NaN or infinity (in per-item outputs) ``None``."""
    metrics, reasons = {}, dict(record.get("null_reasons") or {})
    for name, value in record["metrics"].items():
        finite = value is not None and math.isfinite(value)
        metrics[name] = float(value) if finite else None
        if not finite:
            reasons.setdefault(name, f"not a finite number ({value})")
    return strict_json(record | {"metrics": metrics, "null_reasons": reasons})


def load_items(metric: Metric, cfg: EvalConfig, spec: str) -> list[dict[str, Any]]:
    """The metric's items from ``spec``: fields mapped to canonical names, split, de-duplicated, limited.

    A field the user did not map (``--field``) is read from its default column or, when the data
    lacks that, from the first of the metric's :attr:`~Metric.aliases` the data has (any case).

    Raises:
        ConfigError: ``--field`` names a field the metric does not use.
        DataError: the data is missing or empty, a row lacks a required field (the message names
            the row's own columns), or nothing is left after the split.
    """
    return _load_items(metric, cfg, spec)[0]


def _load_items(metric: Metric, cfg: EvalConfig, spec: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """:func:`load_items`, and the column each field was read from."""
    accepted = {**metric.fields, **metric.optional_fields}
    unknown = sorted(set(cfg.fields) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{metric.name} has no field(s) {', '.join(unknown)}; it reads: {', '.join(accepted)}"
        )
    rows = load_records(spec)
    where = str(spec)
    columns = {name: _column(metric, cfg, name, rows[0]) for name in accepted}
    _require_columns(rows, metric, cfg, columns, where=where)
    items = [{name: row.get(col) for name, col in columns.items()} for row in rows]
    split = cfg.split or metric.default_split
    if split == "eval":
        items = [it for it in items if assign_split(str(it[metric.prompt_field])) == "eval"]
    if metric.dedupe:
        seen: set[str] = set()
        unique = []
        for it in items:
            k = prompt_key(str(it[metric.prompt_field]))
            if k not in seen:
                seen.add(k)
                unique.append(it)
        items = unique
    if not items:
        raise DataError(f"{where}: no items left after the {split!r} split; pass --split all or other data")
    return (items[: cfg.limit] if cfg.limit else items), columns


def _candidates(metric: Metric, cfg: EvalConfig, name: str) -> tuple[str, ...]:
    """The columns field ``name`` may come from: the one mapped, else its default and aliases."""
    if name in cfg.fields:
        return (cfg.fields[name],)
    default = {**metric.fields, **metric.optional_fields}[name]
    return (default, *metric.aliases.get(name, ()))


def _column(metric: Metric, cfg: EvalConfig, name: str, first: dict[str, Any]) -> str:
    """The column of field ``name``: the first candidate the first row has (exact, then any case)."""
    candidates = _candidates(metric, cfg, name)
    lower = {str(col).lower(): col for col in first}
    for col in candidates:
        if col in first:
            return col
        if col.lower() in lower:
            return lower[col.lower()]
    return candidates[0]


def _require_columns(
    rows: list[dict[str, Any]], metric: Metric, cfg: EvalConfig, columns: dict[str, str], *, where: str
) -> None:
    """DataError naming the first row that lacks a required field, and the columns that row has."""
    for i, row in enumerate(rows, start=1):
        missing = [name for name in metric.fields if _empty(row.get(columns[name]), metric.allow_empty)]
        if missing:
            wanted = []
            for name in missing:
                tried = _candidates(metric, cfg, name)
                if tried == (name,):
                    wanted.append(name)
                elif len(tried) == 1:
                    wanted.append(f"{name} (column {tried[0]})")
                else:
                    wanted.append(f"{name} (any of columns {'/'.join(tried)})")
            have = ", ".join(map(str, row)) or "none"
            raise DataError(
                f"{where}: row {i} lacks field(s) {', '.join(wanted)} (it has: {have}); "
                "map fields with --field NAME=COLUMN"
            )


def _empty(value: Any, allow_empty: bool) -> bool:
    return value is None or (not allow_empty and isinstance(value, str) and not value.strip())


def _metric(name: str) -> Metric:
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; choose one of: {', '.join(METRICS)}")
    return METRICS[name]


def _uses_judge(metric: Metric, cfg: EvalConfig) -> bool:
    return metric.default_judge is not None or cfg.judge is not None


def _data_identity(spec: str) -> dict[str, Any]:
    path = Path(spec).expanduser()
    if path.is_file():
        return {"spec": spec, "sha256": file_digest(path)}
    return {"spec": spec}
