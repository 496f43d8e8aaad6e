"""Run one metric end to end: data → (cache) → model → metric → a result record.

Reads like a recipe (STYLE.md rule 6): resolve the metric, load and map the data, take the
held-out split and the limit, look the result up in the cache, load judge and model, run,
record everything that made the number, store it in the cache.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from excise import __version__
from excise.data import assign_split, load_records, prompt_key, require_fields
from excise.errors import ConfigError, DataError
from excise.evaluate.cache import cache_key, read_cached, write_atomic_json, write_cached
from excise.evaluate.config import EvalConfig
from excise.evaluate.metrics import METRICS
from excise.evaluate.metrics.base import EvalContext, Metric, judge_record
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

    Returns:
        The record: ``metrics``, ``items`` (per-item outputs) and provenance (model, adapter,
        data, limit, seed, judge, settings, version), plus ``from_cache``.

    Raises:
        ConfigError, DataError, ModelLoadError, AdapterError: bad settings, data, model or adapter.
    """
    metric = _metric(name)
    spec = cfg.data or metric.default_data
    items = load_items(metric, cfg, spec)
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
        return hit | {"from_cache": True}

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
        "judge": judge_record(judge) if judge is not None else None,
        "model": cfg.model,
        "adapter": str(cfg.adapter) if cfg.adapter else None,
        "data": spec,
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
    if use_cache:
        write_cached(key, record)
    return record | {"from_cache": False}


def load_metric_judge(name: str, cfg: EvalConfig) -> Any:
    """The judge metric ``name`` uses under ``cfg`` (``--judge`` or its default), loaded; None
    when it uses none. Load it once to evaluate several models with it."""
    metric = _metric(name)
    if not _uses_judge(metric, cfg):
        return None
    from excise.evaluate.judges import load_judge

    return load_judge(cfg.judge or metric.default_judge, **cfg.judge_options)


def write_result(record: dict[str, Any], out: Path) -> Path:
    """Write a result record as JSON, atomically (temp file beside ``out``, then rename)."""
    return write_atomic_json(Path(out), record)


def load_items(metric: Metric, cfg: EvalConfig, spec: str) -> list[dict[str, Any]]:
    """The metric's items from ``spec``: fields mapped to canonical names, split, de-duplicated, limited.

    Raises:
        ConfigError: ``--field`` names a field the metric does not use.
        DataError: the data is missing or empty, a row lacks a required field, or nothing is
            left after the split.
    """
    accepted = {**metric.fields, **metric.optional_fields}
    unknown = sorted(set(cfg.fields) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{metric.name} has no field(s) {', '.join(unknown)}; it reads: {', '.join(accepted)}"
        )
    columns = {**accepted, **cfg.fields}
    rows = load_records(spec)
    where = str(spec)
    items = [{name: row.get(col) for name, col in columns.items()} for row in rows]
    try:
        if metric.allow_empty:
            _require_present(items, list(metric.fields), where=where)
        else:
            require_fields(items, list(metric.fields), where=where)
    except DataError as err:  # name the source columns, not our canonical names
        mapping = ", ".join(f"{k}={v}" for k, v in columns.items() if k in metric.fields)
        raise DataError(f"{err} (reading columns {mapping})") from err
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
    return items[: cfg.limit] if cfg.limit else items


def _require_present(items: list[dict[str, Any]], fields: list[str], *, where: str) -> None:
    for i, item in enumerate(items, start=1):
        missing = [f for f in fields if item.get(f) is None]
        if missing:
            raise DataError(
                f"{where}: row {i} lacks field(s) {', '.join(missing)}; map fields with --field NAME=COLUMN"
            )


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
