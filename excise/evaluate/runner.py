"""Run one metric end to end: data → (cache) → model → metric → a result record.

Reads like a recipe (STYLE.md rule 6): resolve the metric, load and map the data, take the
held-out split and the limit, look the result up in the cache, load judge and model, run,
record everything that made the number, store it in the cache.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from excise import __version__
from excise.data import assign_split, load_records, prompt_key, recorded_training_data
from excise.errors import ConfigError, DataError, first_line
from excise.evaluate.cache import cache_key, read_cached, strict_json, write_atomic_json, write_cached
from excise.evaluate.config import EvalConfig
from excise.evaluate.metrics import METRICS
from excise.evaluate.metrics.base import EvalContext, Metric, NotCachedError, judge_record
from excise.evaluate.overlap import UNCHECKED, check_overlap, module_folders, unchecked_reasons
from excise.evaluate.parallel import from_main, is_main
from excise.evaluate.stats import item_stderrs
from excise.evaluate.subject import Subject, adapter_identity, file_digest, load_subject, model_identity
from excise.models import load_tokenizer

__all__ = [
    "JUDGED",
    "NEEDS_BASE",
    "NO_TEMPLATE",
    "check_result_path",
    "check_settings",
    "item_key",
    "judge_saved",
    "load_items",
    "load_metric_judge",
    "plan",
    "resolve_split",
    "run_eval",
    "run_many",
    "scored_template",
    "subsample_items",
    "template_mismatch",
    "write_result",
]

_log = logging.getLogger(__name__)

# Metrics that compare against the base model's own answers: the adapter must stay switchable.
# The likelihood metrics take their differences against it (the reference by default).
NEEDS_BASE = {"utility", "pairs", "answer-nll", "refusal-logprob"}


def run_eval(
    name: str,
    cfg: EvalConfig,
    *,
    judge: Any = None,
    use_cache: bool = True,
    progress: bool = True,
    subject: Subject | None = None,
    answers: list[str] | None = None,
    modules: list[Path] | None = None,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``cfg.model`` (+ ``cfg.adapter``) on metric ``name`` and return the result record.

    Args:
        name: a key of :data:`~excise.evaluate.metrics.METRICS` (``truthfulqa-mc``, ``toxicity``…).
        cfg: the settings.
        judge: a ready judge object (overrides ``cfg.judge``); for tests and library use.
        use_cache: read and write ``$EXCISE_CACHE/eval``.
        progress: show progress bars.
        subject: the model already loaded (:func:`load_subject` of ``cfg``, unmerged), to share
            one load between metrics (:func:`run_many`); or a model built in memory (the λ sweep
            changes one in place), which its caller names by ``identity`` (or evaluates with
            ``use_cache=False``).
        modules: adapter folders ``subject`` was built from (a sweep's inputs): their training
            data is checked against the items too, as ``cfg.adapter``'s is.
        answers: saved answers to judge instead of generating (``excise eval judge``): only the
            tokenizer is loaded.
        identity: what an in-memory ``subject`` is beyond ``cfg`` (a sweep point: the digests
            of its ``W0`` and ``D`` and its λ). The result is cached under the usual key plus
            this; generations are then not cached (their key knows only model and adapter).

    Returns:
        The record: ``metrics`` (each a finite number, or ``None`` with its reason in
        ``null_reasons``), ``stderr`` (standard error of each metric, None where it has no
        spread), ``items`` (per-item outputs), ``data_summary`` (rows read and kept, split,
        columns read and ignored), provenance (model, adapter, data, limit, seed, judge,
        settings, version), ``training_overlap`` (each module × training file checked, with
        its overlap count; or ``"unchecked"`` when a module carries no training record, with the
        reasons in ``training_overlap_unchecked`` and the checks that could be made in
        ``training_overlap_checks``) and ``warnings`` (overlaps let through by ``allow_overlap``),
        plus ``from_cache``. Each per-item output carries ``key``, the item's identity
        (:func:`item_key`), so two records are paired item by item, never by position.

    Raises:
        ConfigError, DataError, ModelLoadError, AdapterError: bad settings, data, model or adapter;
            DataError also for items whose prompt the model was trained on (or whose training
            data cannot be checked) without ``allow_overlap``.
    """
    metric = _metric(name)
    if subject is None:  # a given subject is the caller's to vouch for
        check_settings(metric, cfg)
    spec = cfg.data or metric.default_data
    modules = [Path(m) for m in modules or []]
    items, data_summary = _load_items(metric, cfg, spec, modules)
    # Never silently score what the model was trained on (checked on every run, cached or not).
    folders = module_folders(cfg.model, cfg.adapter) + modules
    checks, overlap_warnings = check_overlap(
        items, metric.prompt_field, folders, data=spec, allow=cfg.allow_overlap
    )
    if (mismatch := template_mismatch(metric, cfg, folders)) is not None and is_main():
        _log.warning("%s", mismatch)
        overlap_warnings = [*overlap_warnings, mismatch]
    overlap = _overlap_fields(metric, cfg, modules, checks, overlap_warnings)
    judge_spec = (cfg.judge or metric.default_judge) if _uses_judge(metric, cfg) else None
    payload = _payload(metric, cfg, spec, data_summary["split"], judge_spec if judge is None else judge)
    if answers is not None:
        payload["answers_sha256"] = cache_key({"answers": answers})
    if identity is not None:
        payload["subject"] = identity
    key = cache_key(payload)
    # The main process's look-up: in a data-parallel run every process computes, or none does.
    if use_cache and (hit := from_main(lambda: read_cached(key))) is not None:
        hit = _keyed(metric, _strict_record(hit), items)  # entries of older versions too
        return hit | overlap | {"from_cache": True}

    if judge is None:
        judge = load_metric_judge(name, cfg)
    merged = bool(cfg.merge and cfg.adapter is not None and metric.name not in NEEDS_BASE)
    outcome = None
    clock = time.perf_counter()
    load_seconds = 0.0
    if subject is None and (answers is not None or (use_cache and metric.name in JUDGED)):
        # Saved answers, or maybe cached generations (another judge): the tokenizer may be enough.
        bare = Subject(None, load_tokenizer(cfg.model, padding_side="left"), cfg.model, cfg.adapter, merged)
        ctx = EvalContext(
            cfg, bare, items, judge=judge, progress=progress, use_cache=use_cache, saved_answers=answers,
            cached_only=answers is None,
        )  # fmt: skip
        try:
            outcome = metric.run(ctx)
        except NotCachedError:
            clock = time.perf_counter()
    if outcome is None:
        if subject is None:
            subject = load_subject(
                cfg.model, cfg.adapter, merge=merged, dtype=cfg.dtype, device=cfg.device
            )  # fmt: skip
        load_seconds = time.perf_counter() - clock
        ctx = EvalContext(
            cfg, subject, items, judge=judge, progress=progress, use_cache=use_cache and identity is None,
            saved_answers=answers,
        )  # fmt: skip
        clock = time.perf_counter()
        outcome = metric.run(ctx)
    record = {
        "metric": metric.name,
        "metrics": outcome.metrics,
        "null_reasons": outcome.null_reasons,
        "stderr": item_stderrs(outcome.metrics, outcome.items) | outcome.stderr,
        "judge": judge_record(judge) if judge is not None else None,
        "model": cfg.model,
        "adapter": str(cfg.adapter) if cfg.adapter else None,
        "data": spec,
        "columns": data_summary["columns"],
        "n_items": len(items),
        "split": data_summary["split"],
        "data_summary": data_summary,
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
    record = _keyed(metric, _strict_record(record), items)
    if use_cache and is_main():
        write_cached(key, record)
    return record | overlap | {"from_cache": False}


# Metrics whose prompts have no template: raw text (perplexity).
NO_TEMPLATE = frozenset({"perplexity"})
# Metrics whose default is a raw format of their own, not the chat template.
RAW_DEFAULT = {"truthfulqa-mc": "lm-eval's raw 6-shot primer", "truthfulqa-gen": "the raw QA primer"}


def check_settings(metric: Metric, cfg: EvalConfig) -> None:
    """Refuse settings a metric cannot honour, before anything loads: an unknown ``--template``, a
    template for a metric that reads raw text, and the metric's own checks.

    Raises:
        ConfigError: as above.
    """
    from excise.data.formatting import TEMPLATES

    if cfg.template is not None:
        if metric.name in NO_TEMPLATE:
            raise ConfigError(f"{metric.name} scores raw text; --template does not apply to it")
        if cfg.template not in TEMPLATES:
            raise ConfigError(
                f"--template {cfg.template!r} is not a template; choose one of: {', '.join(TEMPLATES)}"
            )
    if metric.check is not None:
        metric.check(cfg)


def scored_template(metric: Metric, cfg: EvalConfig) -> str:
    """What a run renders its prompts in: the template's name, or the raw format's description."""
    if metric.name in NO_TEMPLATE:
        return "raw text"
    if cfg.template:
        return cfg.template
    if metric.name in RAW_DEFAULT:
        return "chat" if cfg.chat else RAW_DEFAULT[metric.name]
    return "raw text" if cfg.chat is False else "chat"


def template_mismatch(metric: Metric, cfg: EvalConfig, folders: Sequence[Path]) -> str | None:
    """A warning when the modules scored were trained in a template other than the one this run
    renders its prompts in (both named); None when they match or no record names a template."""
    from excise.data.trained import trained_templates

    if metric.name in NO_TEMPLATE or (metric.name in RAW_DEFAULT and not cfg.template and not cfg.chat):
        return None  # raw text, or the benchmark's own primer (the papers' protocol, chosen on purpose)
    trained = trained_templates(folders)
    scored = scored_template(metric, cfg)
    if not trained or scored in trained:
        return None
    hint = "" if len(trained) > 1 else f"; pass --template {trained[0]} to score in it"
    return (
        f"{metric.name}: the model was trained in template {' / '.join(map(repr, trained))} but is scored in "
        f"{scored!r}{hint}"
    )


def _overlap_fields(
    metric: Metric,
    cfg: EvalConfig,
    modules: list[Path],
    checks: list[dict[str, Any]],
    overlap_warnings: list[str],
) -> dict[str, Any]:
    """The record's training data check: the checks, or ``"unchecked"`` with the reasons."""
    reasons = unchecked_reasons(cfg.model, cfg.adapter, metric.prompt_field, modules)
    reasons += [f"{c['module']}: {c['data']} could not be read back" for c in checks if c["overlap"] is None]
    if not reasons:
        return {"training_overlap": checks, "warnings": overlap_warnings}
    return {
        "training_overlap": UNCHECKED,
        "training_overlap_unchecked": reasons,
        "training_overlap_checks": checks,
        "warnings": overlap_warnings,
    }


def subsample_items(
    items: list[dict[str, Any]], *, limit: int | None, head: int | None, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``limit``: the ``limit`` items with the smallest ``sha256(f"{seed}:{item_key}")``, kept in
    file order (a seeded subsample, the same for every model: it depends on the items only);
    ``head``: the first ``head`` items. Returns the items and how they were chosen (None: all).

    A prefix of a file is rarely a fair sample (wikitext-2's first 40 rows are one article);
    the hash order is, and it is reproducible from the record (``rows``: the kept positions).
    """
    import hashlib

    if head is not None:
        return items[:head], {"rule": "head: the first rows", "n": head}
    if limit is None or limit >= len(items):
        return items, None
    rank = [hashlib.sha256(f"{seed}:{item_key(it)}".encode()).hexdigest() for it in items]
    rows = sorted(sorted(range(len(items)), key=lambda i: (rank[i], i))[:limit])
    rule = "seeded subsample: the rows with the smallest sha256(seed:item key), in file order"
    return [items[i] for i in rows], {"rule": rule, "seed": seed, "n": limit, "rows": rows}


def item_key(item: dict[str, Any]) -> str:
    """An evaluation item's identity: the SHA-256 (first 16 hex digits) of its fields (canonical
    names: the prompt or question with its answers, choices, labels…) as sorted JSON.

    The same row of the same data gets the same key in every record, whatever the model, the
    order or the limit, so paired statistics pair records item by item
    (:func:`excise.pipeline.sweep.paired_bootstrap`) and can tell when two records scored
    different items.
    """
    import hashlib

    text = json.dumps(item, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _keyed(metric: Metric, record: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """``record`` with each per-item output's ``key``: the metric's own (perplexity windows),
    else that of the input item it scores, where the metric returns one output per item."""
    outputs = record.get("items") or []
    if len(outputs) != len(items) or all("key" in out for out in outputs):
        return record
    pairs = zip(outputs, items, strict=True)
    keyed = [out if "key" in out else out | {"key": item_key(it)} for out, it in pairs]
    return record | {"items": keyed}


def load_metric_judge(name: str, cfg: EvalConfig) -> Any:
    """The judge metric ``name`` uses under ``cfg`` (``--judge`` or its default), loaded; None
    when it uses none. Load it once to evaluate several models with it."""
    metric = _metric(name)
    if not _uses_judge(metric, cfg):
        return None
    from excise.evaluate.judges import load_judge

    return load_judge(cfg.judge or metric.default_judge, **cfg.judge_options)


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


def run_many(
    names: list[str], cfg: EvalConfig, *, use_cache: bool = True, progress: bool = True
) -> list[dict[str, Any]]:
    """Evaluate several metrics on one model load (unmerged, so every metric can use it).

    Data, split and limit errors of every metric are reported before the model loads.

    Returns:
        One record per name, as :func:`run_eval` returns it.
    """
    metrics = [_metric(name) for name in names]
    known = {f for m in metrics for f in {**m.fields, **m.optional_fields}}
    unknown = sorted(set(cfg.fields) - known)
    if unknown:
        raise ConfigError(f"no metric of {', '.join(names)} reads field(s) {', '.join(unknown)}")
    configs = []
    for metric in metrics:  # each metric takes the --field mappings it reads
        accepted = {**metric.fields, **metric.optional_fields}
        own = cfg.model_copy(update={"fields": {k: v for k, v in cfg.fields.items() if k in accepted}})
        _load_items(metric, own, own.data or metric.default_data)  # data errors before the load
        configs.append(own)
    subject = None
    records = []
    for name, own in zip(names, configs, strict=True):
        if subject is None and not (use_cache and _cached(name, own)):
            subject = load_subject(cfg.model, cfg.adapter, dtype=cfg.dtype, device=cfg.device)
        records.append(run_eval(name, own, use_cache=use_cache, progress=progress, subject=subject))
    return records


# Metrics whose answers a judge scores: `excise eval judge` re-scores their saved generations.
JUDGED = ("toxicity", "harmful-rate", "truthfulqa-gen")
_PROMPT_KEYS = ("prompt", "instruction", "question")


def judge_saved(
    generations: Path,
    judge: str | None,
    judge_options: list[str],
    *,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the answers saved in a result file with another judge, loading only the tokenizer.

    The prompts are rebuilt from the record's own data and settings and must match the saved ones
    (a record made when ``limit`` kept the first rows is read with ``head``: :func:`_saved_settings`).

    Raises:
        DataError: the file is not a result of a judged metric, or its data changed since.
    """
    from excise.evaluate.judges import parse_options

    path = Path(generations)
    try:
        saved = json.loads(path.read_text())
        name, settings, items = saved["metric"], dict(saved["settings"]), saved["items"]
    except FileNotFoundError as err:
        raise DataError(f"--generations {path} not found") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"--generations {path} is not an excise eval result file ({first_line(err)})"
        ) from err
    if name not in JUDGED:
        raise DataError(
            f"--generations {path} holds {name!r} results; judged metrics are: {', '.join(JUDGED)}"
        )
    answers = [it.get("response", it.get("answer")) for it in items]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"--generations {path}: its items hold no saved answers")
    settings |= {"judge": judge, "judge_options": parse_options(judge_options), "split": saved.get("split")}
    cfg, legacy = _saved_settings(name, settings, _prompts(items))
    record = run_eval(name, cfg, use_cache=use_cache, progress=progress, answers=answers)
    if _prompts(record["items"]) != _prompts(items):
        raise DataError(
            f"--generations {path}: the prompts of {settings['data'] or 'the default data'} differ from the "
            "saved ones (the data changed since); regenerate with excise eval " + name
        )
    return record | {"generations_from": str(path)} | ({"legacy_limit_as_head": True} if legacy else {})


def _saved_settings(name: str, settings: dict[str, Any], prompts: list[Any]) -> tuple[EvalConfig, bool]:
    """The settings that rebuild a saved record's items, and whether they needed the legacy reading.

    A record made before issue 22 made ``limit`` a seeded subsample kept the first ``limit``
    rows: when the saved prompts are not the subsample but are exactly the first rows (``head``),
    those are used (only on an exact match of every prompt; otherwise the caller refuses).
    """
    cfg = EvalConfig(**settings)
    if not settings.get("limit") or settings.get("head") is not None:
        return cfg, False
    metric = _metric(name)
    spec = cfg.data or metric.default_data
    if _prompts(_load_items(metric, cfg, spec)[0]) == prompts:
        return cfg, False
    head = EvalConfig(**(settings | {"head": settings["limit"], "limit": None}))
    if _prompts(_load_items(metric, head, spec)[0]) == prompts:
        return head, True
    return cfg, False


def _prompts(items: list[dict[str, Any]]) -> list[Any]:
    return [next((it[k] for k in _PROMPT_KEYS if k in it), None) for it in items]


def plan(name: str, cfg: EvalConfig, *, use_cache: bool = True) -> str:
    """One line saying what a run will do (metric, items, split, batch size) before the model loads.

    Raises:
        ConfigError, DataError: as :func:`run_eval` would, only sooner.
    """
    from excise.evaluate.report import data_line

    metric = _metric(name)
    check_settings(metric, cfg)
    spec = cfg.data or metric.default_data
    items, summary = _load_items(metric, cfg, spec)
    if not cfg.allow_overlap:  # an overlap is refused before the plan (allowed ones warn in run_eval)
        check_overlap(
            items, metric.prompt_field, module_folders(cfg.model, cfg.adapter), data=spec, allow=False
        )
    cached = " (cached: no model needed)" if use_cache and _cached(name, cfg) else ""
    return (
        f"plan: {metric.name} on {len(items)} items; {data_line(summary)}; batch size {cfg.batch_size}"
        f"{cached}; the progress bar estimates the time left from its first batch"
    )


def _cached(name: str, cfg: EvalConfig) -> bool:
    """Whether ``run_eval(name, cfg)`` would be read from the cache (no model needed)."""
    metric = _metric(name)
    spec = cfg.data or metric.default_data
    _, summary = _load_items(metric, cfg, spec)
    judge_spec = (cfg.judge or metric.default_judge) if _uses_judge(metric, cfg) else None
    return read_cached(cache_key(_payload(metric, cfg, spec, summary["split"], judge_spec))) is not None


def write_result(record: dict[str, Any], out: Path, *, overwrite: bool = True) -> Path:
    """Write a result record as strict JSON (no NaN), atomically (temp file beside ``out``, then rename).

    Raises:
        ConfigError: ``out`` exists and ``overwrite`` is False.
    """
    check_result_path(out, overwrite=overwrite)
    return write_atomic_json(Path(out), record)


def check_result_path(out: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing result file unless asked (as ``ops`` and ``train`` do)."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a result file path such as {out / 'result.json'}")
    if out.exists() and not overwrite:
        raise ConfigError(f"result file {out} exists; pass --overwrite to replace it")


def resolve_split(
    metric: Metric,
    cfg: EvalConfig,
    spec: str,
    modules: Sequence[Path] = (),
    *,
    trained: Iterable[str] = (),
) -> str:
    """The split a run uses: ``--split`` if given; else ``eval`` only where the data may have been
    trained on (the metric's own default data, or a file named in the training records of the
    adapter, the model folder or ``modules``); any other file is used whole (``all``).

    One evaluation of several models decides its split once, from all of them, and passes it to
    each as ``cfg.split`` (``excise run``: :func:`excise.pipeline.run.plan`), so every model is
    scored on the same items.

    Args:
        metric: the metric.
        cfg: the settings (``split``, ``model``, ``adapter``).
        spec: the data spec.
        modules: more module folders whose records count (a sweep's inputs, the other models
            of one evaluation).
        trained: data specs known to train one of those models though no folder records them
            yet (a recipe's adapters before they are trained).
    """
    if cfg.split:
        return cfg.split
    if metric.default_split != "eval" or spec == metric.default_data:
        return metric.default_split
    folders = module_folders(cfg.model, cfg.adapter) + [Path(m) for m in modules]
    return "eval" if _trained_on(folders, spec, trained) else "all"


def _trained_on(folders: list[Path], spec: str, trained: Iterable[str] = ()) -> bool:
    """Whether the recorded training data of any module in ``folders`` (a ``train_config.json``,
    or the records an ``excise ops`` result or a merged model carries), or a spec of ``trained``,
    names the file ``spec``."""
    path = Path(spec).expanduser()
    if not path.is_file():
        return False
    wanted = str(path.resolve())
    named = {str(Path(t).expanduser().resolve()) for t in trained if Path(t).expanduser().is_file()}
    return wanted in named or any(
        record.get("data") == wanted for folder in folders for record in recorded_training_data(folder)
    )


def load_items(metric: Metric, cfg: EvalConfig, spec: str) -> list[dict[str, Any]]:
    """The metric's items from ``spec``: fields mapped to canonical names, split, de-duplicated, limited.

    A field the user did not map (``--field``) is read from its default column or, when the data
    lacks that, from the first of the metric's :attr:`~Metric.aliases` the data has (any case).

    Raises:
        ConfigError: ``--field`` names a field the metric does not use.
        DataError: the data is missing or empty, a row lacks a required field, or nothing is
            left after the split.
    """
    return _load_items(metric, cfg, spec)[0]


def _load_items(
    metric: Metric, cfg: EvalConfig, spec: str, modules: Sequence[Path] = ()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`load_items` and a summary: rows read, split, rows kept, the column each field
    was read from, columns ignored. ``modules``: more module folders the split considers
    (:func:`resolve_split`).

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
    rows = load_records(spec)
    where = str(spec)
    rows, notes = metric.read(rows, cfg, where) if metric.read is not None else (rows, {})
    columns = {name: _column(metric, cfg, name, rows[0]) for name in accepted}
    _require_columns(rows, metric, cfg, columns, where=where)
    items = [{name: _cell(row, col) for name, col in columns.items()} for row in rows]
    n_read = len(items)
    items = _pair_controls(metric, cfg, items)
    n_paired = len(items)
    used = {col.split(".")[0] for col in columns.values()}
    ignored: dict[str, int] = {}
    for row in rows:
        for col, value in row.items():
            if col not in used and value not in (None, "", [], {}):
                ignored[col] = ignored.get(col, 0) + 1
    split = resolve_split(metric, cfg, spec, modules)
    if split == "eval":
        items = [it for it in items if assign_split(str(it[metric.prompt_field])) == "eval"]
    n_split = len(items)
    if metric.dedupe:
        seen: set[str] = set()
        unique: list[dict[str, Any]] = []
        for it in items:
            k = prompt_key(str(it[metric.prompt_field]))
            if k not in seen:
                seen.add(k)
                unique.append(it)
        items = unique
    if not items:
        raise DataError(f"{where}: no items left after the {split!r} split; pass --split all or other data")
    n_before_limit = len(items)
    items, subsample = subsample_items(items, limit=cfg.limit, head=cfg.head, seed=cfg.seed)
    summary = {
        "split": split,
        "rows_read": n_read,
        **({"after_pair_controls": n_paired} if n_paired != n_read else {}),
        "after_split": n_split,
        "duplicates_dropped": n_split - len(unique) if metric.dedupe else 0,
        "kept": len(items),
        **({"subsample": subsample} if subsample and len(items) < n_before_limit else {}),
        "columns": columns,
        "ignored_columns": ignored,
        **notes,
    }
    return items, summary


# Metrics scoring two answers of one question, and their answer fields (pair controls apply).
_PAIRED_ANSWERS = {"halueval": ("right_answer", "hallucinated_answer"), "pairs": ("chosen", "rejected")}


def _pair_controls(metric: Metric, cfg: EvalConfig, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items with ``cfg``'s pair controls applied (as training applies them: excise.data.examples)."""
    if cfg.pair_max_word_ratio is None and not cfg.pair_strip_period:
        return items
    fields = _PAIRED_ANSWERS.get(metric.name)
    if fields is None:
        raise ConfigError(
            f"pair_max_word_ratio / pair_strip_period apply to {', '.join(_PAIRED_ANSWERS)} only"
        )
    from excise.data.examples import controlled_pair

    kept = []
    for it in items:
        pair = controlled_pair(str(it[fields[0]]), str(it[fields[1]]), max_word_ratio=cfg.pair_max_word_ratio,
                               strip_final_period=cfg.pair_strip_period)  # fmt: skip
        if pair is not None:
            kept.append(it | dict(zip(fields, pair, strict=True)))
    return kept


def _cell(row: dict[str, Any], column: str) -> Any:
    """``row[column]``; a dotted column not in the row reads a nested value (RTP's ``prompt.text``)."""
    if column in row or "." not in column:
        return row.get(column)
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


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
        if col in first or _cell(first, col) is not None:
            return col
        if col.lower() in lower:
            return lower[col.lower()]
    return candidates[0]


def _require_columns(
    rows: list[dict[str, Any]], metric: Metric, cfg: EvalConfig, columns: dict[str, str], *, where: str
) -> None:
    """DataError naming the first row that lacks a required field, and the columns that row has."""
    for i, row in enumerate(rows, start=1):
        missing = [name for name in metric.fields if _empty(_cell(row, columns[name]), metric.allow_empty)]
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


def _payload(metric: Metric, cfg: EvalConfig, spec: str, split: str, judge: Any) -> dict[str, Any]:
    """What a result depends on: its cache key is the hash of this."""
    return {
        "metric": metric.name,
        "model": model_identity(cfg.model),
        "adapter": adapter_identity(cfg.adapter),
        "reference": model_identity(cfg.reference) if cfg.reference else None,
        "data": _data_identity(spec),
        "settings": cfg.settings(),
        "split": split,
        "judge": _judge_identity(judge),
        "excise": __version__,
    }


def _judge_identity(judge: Any) -> dict[str, Any] | None:
    """A judge by content: a spec's files by digest (:func:`judge_identity`); a judge object's
    ``describe()`` record, with the digest of the weights file it names."""
    if judge is None:
        return None
    if isinstance(judge, str):
        from excise.evaluate.judges.registry import judge_identity

        return judge_identity(judge)
    record = judge_record(judge)
    weights = Path(str(record.get("weights") or ""))
    return record | ({"weights_sha256": file_digest(weights)} if weights.is_file() else {})


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
