"""``excise run RECIPE``: the stages of a recipe, in order, each skipped when already done.

The pipeline only composes the project's parts: ``excise.train`` trainers, the PEM
operators (:func:`excise.pem.apply.apply_operator`), the evaluation runner
(:func:`excise.evaluate.runner.run_eval`), the λ sweep and the report. Layout of a run
folder (``out`` of the recipe)::

    recipe.yaml             the resolved recipe (overrides applied, ${data} substituted)
    command.txt             the command line of the latest run
    run.json                models (base / adapter / operation, with adapter folders),
                            evaluations (metric and one result file per model), sweep folders,
                            outputs (every output of the current plan: what the report shows)
    stages.json             the stage manifest: per stage its fingerprint, status, output
                            and the output's content digest
    adapters/NAME/          trained adapters (PEFT folders, loss_log.json, train_config.json)
    ops/NAME/               operation results (PEFT folders, excise.json provenance)
    diagnostics/NAME.json   `excise inspect` of each Ext-Sub operation's expert / anti-expert
    results/MODEL/EVAL.json evaluation records (per-item outputs kept)
    sweeps/NAME/            λ sweeps (excise.pipeline.sweep: sweep.json, results per λ)
    report/                 report.html, report.md, report.json (excise.pipeline.report)

**Skipping.** A stage's fingerprint is the SHA-256 of its settings and the content digest
of everything it reads (data files, upstream outputs, the base model's identity, the judge's
files); a setting naming a data file counts by the file's content, not its path. A stage
whose manifest entry is ``done`` with the same fingerprint, and whose output still has the
digest recorded, is skipped. **Resume.** Every output is written atomically (temp + rename),
so a killed stage leaves nothing half-written; a training stage killed after a checkpoint
(``save_every``) continues from it on the next run (the loop's exact resume). **Locking.**
One ``excise run`` at a time per run folder (an advisory lock); a folder holding other
files, or another recipe's run, is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from excise import __version__
from excise.errors import ConfigError
from excise.evaluate.config import DEFAULT_REFUSAL
from excise.pipeline.recipe import BASE, Recipe

__all__ = ["MANIFEST", "RUN_INFO", "Stage", "is_main_process", "plan", "run_recipe"]

MANIFEST = "stages.json"
RUN_INFO = "run.json"
RESOLVED = "recipe.yaml"
COMMAND = "command.txt"
_LOCK = ".excise-run.lock"
_CHECKPOINTS = "checkpoints"  # excise.train.loop.CHECKPOINTS

Log = Callable[[str], None]


@dataclass
class Stage:
    """One step of a run.

    Attributes:
        name: unique label (``train expert``, ``op ext_sub``, ``eval halueval/expert``…).
        output: what it writes (a folder or a file), inside the run folder.
        settings: everything besides ``inputs`` that decides the output (JSON-able).
        inputs: files or folders it reads, digested by content into the fingerprint.
        action: ``action(resume)`` writes ``output`` atomically; ``resume`` is True when an
            interrupted attempt with the same fingerprint left checkpoints to continue from.
        distributed: runs on every process under ``accelerate launch`` (training); others
            run on the main process only.
    """

    name: str
    output: Path
    settings: dict[str, Any]
    inputs: list[str]
    action: Callable[[bool], Any]
    distributed: bool = False


def run_recipe(
    recipe: Recipe,
    *,
    command: str | None = None,
    force: bool = False,
    log: Log | None = None,
    only: list[str] | None = None,
) -> Path:
    """Run every stage of ``recipe`` in order, skipping those already done.

    Args:
        recipe: a validated recipe (:func:`excise.pipeline.recipe.load_recipe`).
        command: the command line that started the run (recorded in ``run.json``).
        force: run every stage again even when up to date, reading no cached evaluation.
        log: where progress lines go (default: stderr).
        only: glob patterns (``fnmatch``) of the stage names to run; the other stages are
            neither run nor touched (their outputs stay as they are). A selected stage whose
            upstream output is missing fails as it would without ``only``.

    Returns:
        The report's path when the recipe writes one, else the run folder.

    Raises:
        ConfigError: the run folder holds other files or another recipe's run, or is in use.
        ExciseError: whatever a stage raises (the stages done so far stay done).
    """
    out = recipe.out
    main = is_main_process()
    log = (log or _stderr) if main else (lambda _line: None)
    if main:
        _check_run_folder(out, recipe)
    stages = plan(recipe, force=force)
    if only:
        unmatched = [p for p in only if not any(fnmatch.fnmatchcase(s.name, p) for s in stages)]
        if unmatched:
            raise ConfigError(
                f"--only {', '.join(map(repr, unmatched))} matches no stage; `excise run --check` lists them"
            )
    with _locked(out) if main else contextlib.nullcontext(), _terminate_as_exit():
        if main:
            _write_run_info(recipe, command, [s.output for s in stages])
        manifest = _read_manifest(out) if main else {}  # the main process decides for all
        result: Path = out / "report" / "report.html" if stages and stages[-1].name == "report" else out
        width = len(str(len(stages)))
        started = time.perf_counter()
        for i, stage in enumerate(stages, start=1):
            if not (main or stage.distributed):
                continue
            label = f"[{i:>{width}}/{len(stages)}] {stage.name}"
            if only and not any(fnmatch.fnmatchcase(stage.name, p) for p in only):
                log(f"{label}: not selected (--only), left as it is")
                continue
            fingerprint, decision = "", ""
            if main:
                fingerprint = _fingerprint(stage, recipe)
                decision = _decide(manifest.get(stage.name, {}), fingerprint, out / stage.output, force)
            if stage.distributed:  # every process skips, resumes or starts over as the main one does
                decision = _from_main(decision)
            if decision == "skip":
                log(f"{label}: up to date, skipped")
                continue
            log(f"{label} → {out / stage.output}")
            if main:
                manifest[stage.name] = {
                    "fingerprint": fingerprint,
                    "status": "started",
                    "output": str(stage.output),
                }
                _write_manifest(out, manifest)
            if stage.distributed:  # nobody starts before the main process has cleared the leftovers
                _wait_for_everyone()
            clock = time.perf_counter()
            stage.action(decision == "resume")
            if stage.distributed:
                _wait_for_everyone()
            if main:
                manifest[stage.name] = {
                    "fingerprint": fingerprint, "status": "done", "output": str(stage.output),
                    "output_digest": _digest(out / stage.output),
                    "seconds": round(time.perf_counter() - clock, 2),
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }  # fmt: skip
                _write_manifest(out, manifest)
        log(f"done in {time.perf_counter() - started:.0f} s: {out}")
        for name in recipe.sweeps:
            log(_sweep_line(name, out / "sweeps" / name / "sweep.json"))
        if result != out:
            log(f"report: {result}")
    return result


# ----------------------------------------------------------------------------- the plan


def plan(recipe: Recipe, *, force: bool = False) -> list[Stage]:
    """The stages of ``recipe`` in the order they run: train, operate, evaluate, sweep, report.

    ``force``: the evaluation and sweep stages bypass the evaluation cache (``excise run --force``)."""
    stages: list[Stage] = []
    for name, adapter in recipe.adapters.items():
        if adapter.config is None:
            continue  # an existing folder: nothing to do
        stages.append(_train_stage(recipe, name))
    for name, op in recipe.operations.items():
        inputs = [str(recipe.adapter_of(source)) for source in op.inputs]
        full = recipe.is_full(name)  # on full fine-tunes: θ_base + op(θ_k − θ_base), as `ops --base`
        action = _op_action(
            op.op, inputs, recipe.out / "ops" / name, op.params, base=recipe.base if full else None
        )
        stages.append(
            Stage(
                f"op {name}",
                Path("ops") / name,
                {"op": op.op, "params": op.params} | ({"full": True} if full else {}),
                inputs,
                action,
            )
        )
    for name, (expert, anti, lam) in _diagnosed_pairs(recipe).items():
        inputs = [str(recipe.adapter_of(expert)), str(recipe.adapter_of(anti))]
        output = Path("diagnostics") / f"{name}.json"
        stages.append(
            Stage(
                f"inspect {name}",
                output,
                {"lam": lam},
                inputs,
                _inspect_action(inputs, lam, recipe.out / output),
            )
        )
    from excise.evaluate.runner import NEEDS_BASE

    for name, evaluation in recipe.evaluations.items():
        split = _evaluation_split(recipe, evaluation)  # one split for every model: the same items
        template = _evaluation_template(recipe, evaluation)  # one template too: the trained one
        for model in evaluation.models:
            adapter = recipe.adapter_of(model)
            update: dict[str, Any] = {"adapter": adapter} | ({"split": split} if split else {})
            update |= {"template": template} if template else {}
            full = recipe.is_full(model)
            if full:  # a full fine-tune (or an operation on them) is a model folder, not an adapter
                update |= {"model": str(adapter), "adapter": None}
            no_adapter = adapter is None or full
            if no_adapter and evaluation.metric in NEEDS_BASE and evaluation.config.reference is None:
                update["reference"] = recipe.base  # the base model: its own reference, or the fine-tune's

            cfg = evaluation.config.model_copy(update=update)
            output = Path("results") / model / f"{name}.json"
            data = [cfg.data] if cfg.data else []
            # A model folder is an input, digested by content (not its path, as for an adapter).
            exclude = {"adapter", "model"} if full else {"adapter"}
            settings = {
                "metric": evaluation.metric,
                "settings": _stable(cfg.model_dump(mode="json", exclude=exclude)),
            } | _judge_settings([(evaluation.metric, cfg.judge)])
            stages.append(
                Stage(
                    f"eval {name}/{model}",
                    output,
                    settings,
                    [str(adapter)] * (adapter is not None) + data,
                    _eval_action(evaluation.metric, cfg, recipe.out / output, use_cache=not force),
                )
            )
    for name in recipe.sweeps:
        stages.append(_sweep_stage(recipe, name, use_cache=not force))
    reportable = [s.output for s in stages if s.output.parts[0] in ("results", "sweeps", "diagnostics")]
    if recipe.report and reportable:  # a recipe that only trains has nothing to report
        stages.append(_report_stage(recipe, [s.output for s in stages]))
    return stages


def _evaluation_split(recipe: Recipe, evaluation: Any) -> str | None:
    """The split every model of ``evaluation`` is scored on, decided once from all of them; None
    when the evaluation sets one, or when no module can change it (the metric's own data or
    split), so that each model's run resolves the same one by itself.

    A model trained on the evaluation's data file (an adapter's, a full fine-tune's or an
    operation's inputs', known from the recipe before anything is trained; an existing folder's
    records) puts every model, the base included, on the held-out ``eval`` side: a methods
    table then compares the same items (:func:`excise.evaluate.runner.resolve_split`).
    """
    from excise.evaluate.metrics import METRICS
    from excise.evaluate.runner import resolve_split
    from excise.pipeline.recipe import TRAINERS

    cfg, metric = evaluation.config, METRICS[evaluation.metric]
    spec = cfg.data or metric.default_data
    if cfg.split or metric.default_split != "eval" or spec == metric.default_data:
        return None
    folders, configs = _sources(recipe, evaluation.models)
    trained: list[str] = []
    for trainer, config in configs:  # not trained yet: the data its config names
        keys = TRAINERS[trainer].data_keys
        trained += [str(v) for k in keys if isinstance(v := getattr(config, k, None), str)]
    return resolve_split(metric, cfg, spec, folders, trained=trained)


def _evaluation_template(recipe: Recipe, evaluation: Any) -> str | None:
    """The template every model of ``evaluation`` is scored in when it names none (no ``template``,
    no ``chat``): the one all the modules they are built from were trained in (their configs, or
    an existing folder's records), where that is not the metric's default ``chat``. None for a
    metric reading raw text (perplexity) or with a raw format of its own (TruthfulQA's primers,
    the papers' setting), and when the modules differ (each run then warns)."""
    from excise.data.trained import trained_templates
    from excise.evaluate.runner import NO_TEMPLATE, RAW_DEFAULT

    cfg = evaluation.config
    if cfg.template or cfg.chat is not None or evaluation.metric in NO_TEMPLATE | set(RAW_DEFAULT):
        return None
    folders, configs = _sources(recipe, evaluation.models)
    found = set(trained_templates(folders))
    for _trainer, config in configs:
        template = getattr(config, "resolved_template", None) or getattr(config, "template", None)
        found |= {template} if isinstance(template, str) else set()
    return found.pop() if len(found) == 1 and found != {"chat"} else None


def _sources(recipe: Recipe, models: Any) -> tuple[list[Path], list[tuple[str, Any]]]:
    """What ``models`` are built from, through operations: the existing adapter folders, and
    ``(trainer, config)`` of the adapters the recipe trains."""
    folders: list[Path] = []
    configs: list[tuple[str, Any]] = []
    todo, seen = list(models), set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        if model in recipe.operations:
            todo += list(recipe.operations[model].inputs)
        elif model in recipe.adapters:
            adapter = recipe.adapters[model]
            if adapter.config is None:  # an existing folder: its records
                folders.append(Path(str(adapter.path)))
            else:
                configs.append((str(adapter.trainer), adapter.config))
    return folders, configs


def _train_stage(recipe: Recipe, name: str) -> Stage:
    from excise.pipeline.recipe import TRAINERS

    adapter = recipe.adapters[name]
    assert adapter.config is not None and adapter.trainer is not None
    trainer, config = TRAINERS[adapter.trainer], adapter.config
    data = [getattr(config, key) for key in trainer.data_keys if getattr(config, key, None)]

    def action(resume: bool) -> None:
        cfg = config.model_copy(update={"resume": resume, "overwrite": not resume})
        trainer.run(cfg, progress=True)

    settings = config.model_dump(mode="json", exclude={"resume", "overwrite", "out"})
    label, output = f"train {name} ({adapter.trainer})", Path("adapters") / name
    return Stage(
        label, output, {"trainer": adapter.trainer, "config": settings}, data, action, distributed=True
    )


def _op_action(
    op: str, inputs: list[str], out: Path, params: dict[str, Any], *, base: str | None = None
) -> Callable[[bool], Any]:
    """Apply ``op`` to adapter folders, or (``base`` given) to full fine-tunes of ``base``."""

    def action(_resume: bool) -> None:
        if base is not None:  # full fine-tunes: θ_base + op(θ_k − θ_base), streamed (excise ops --base)
            from excise.models import resolve_model
            from excise.pem.full import apply_full

            apply_full(op, Path(resolve_model(base)), inputs, out, params=params, overwrite=True)
            return
        from excise.pem.apply import apply_operator

        apply_operator(op, inputs, out, params=params, allow_partial=params.get("allow_partial", False),
                       overwrite=True)  # fmt: skip

    return action


def _diagnosed_pairs(recipe: Recipe) -> dict[str, tuple[str, str, float]]:
    """Name → (expert, anti-expert, λ) for each Ext-Sub operation (one per anti-expert of a composition)."""
    pairs = {}
    for name, op in recipe.operations.items():
        if recipe.is_full(name):
            continue  # `excise inspect` reads adapters
        if op.op == "ext_sub":
            pairs[name] = (op.inputs[0], op.inputs[1], op.params.get("lam", 1.0))
        elif op.op == "compose":
            lams = op.params.get("lams", [1.0])
            for i, anti in enumerate(op.inputs[1:]):
                pairs[f"{name}.{anti}"] = (op.inputs[0], anti, lams[i] if len(lams) > 1 else lams[0])
    return pairs


def _inspect_action(inputs: list[str], lam: float, out: Path) -> Callable[[bool], Any]:
    def action(_resume: bool) -> None:
        from excise.evaluate.cache import write_atomic_json
        from excise.pem.diagnostics import diagnose
        from excise.pem.io import load_adapter

        expert, anti = (load_adapter(p) for p in inputs)
        write_atomic_json(out, diagnose(expert, anti, lam=lam, allow_partial=True))

    return action


def _eval_action(metric: str, cfg: Any, out: Path, *, use_cache: bool) -> Callable[[bool], Any]:
    def action(_resume: bool) -> None:
        from excise.evaluate.runner import run_eval, write_result

        write_result(run_eval(metric, cfg, use_cache=use_cache), out)

    return action


def _judge_settings(evaluations: list[tuple[str, str | None]]) -> dict[str, Any]:
    """``{"judges": [...]}``: the identity by content (:func:`judge_identity`) of the judge each
    (metric, judge setting) uses, so a judge retrained into the same file reruns the stage;
    ``{}`` when none uses a judge (those fingerprints stay as they were)."""
    from excise.evaluate.judges.registry import judge_identity
    from excise.evaluate.metrics import METRICS

    specs = [judge or METRICS[metric].default_judge for metric, judge in evaluations]
    judges = [judge_identity(spec) for spec in specs if spec]
    return {"judges": judges} if judges else {}


def _sweep_stage(recipe: Recipe, name: str, *, use_cache: bool) -> Stage:
    sweep = recipe.sweeps[name]
    config = sweep.config.model_copy(update={"cache": use_cache and sweep.config.cache})

    def action(_resume: bool) -> None:
        from excise.pipeline.sweep import run_sweep

        run_sweep(config)

    exclude = {"inputs", "out", "overwrite", "progress", "cache"}
    settings = _stable(config.model_dump(mode="json", exclude=exclude))
    axes = [config.deficiency, config.utility, *config.extra]
    settings |= _judge_settings([(a.metric, a.settings.get("judge")) for a in axes])
    data = [a.settings.get("data") for a in (config.deficiency, config.utility) if a.settings.get("data")]
    inputs = [str(p) for p in config.inputs] + data
    return Stage(f"sweep {name}", Path("sweeps") / name, settings, inputs, action)


def _report_stage(recipe: Recipe, outputs: list[Path]) -> Stage:
    def action(_resume: bool) -> None:
        from excise.pipeline.report import write_report

        write_report(recipe.out, title=f"excise report: {recipe.name}")

    inputs = [str(recipe.out / o) for o in outputs] + [str(recipe.out / RESOLVED)]
    return Stage("report", Path("report"), {"report": 1}, inputs, action)


# ----------------------------------------------------------------------------- manifest


# Evaluation settings added after run folders existed, with their defaults: left out of a
# fingerprint while at the default, so a run made before they existed stays up to date.
_LATER_EVAL_DEFAULTS: dict[str, Any] = {
    "pair_max_word_ratio": None,
    "pair_strip_period": False,
    "template": None,
    "refusal": DEFAULT_REFUSAL,
    "tolerance_kind": None,  # a sweep setting
}


def _stable(settings: Any) -> Any:
    """``settings`` without the later evaluation options that still hold their defaults (nested too)."""
    if isinstance(settings, dict):
        return {
            k: _stable(v)
            for k, v in settings.items()
            if not (k in _LATER_EVAL_DEFAULTS and v == _LATER_EVAL_DEFAULTS[k])
        }
    if isinstance(settings, list):
        return [_stable(v) for v in settings]
    return settings


def _fingerprint(stage: Stage, recipe: Recipe) -> str:
    from excise.evaluate.subject import model_identity

    digests = [_digest(Path(path).expanduser()) for path in stage.inputs]
    # A setting naming an input (a data file) counts by the input's content, not its path.
    pairs = list(zip(stage.inputs, digests, strict=True))
    by_content = {path: f"<input {i}>" for i, (path, d) in enumerate(pairs) if d}
    payload = {
        "stage": stage.name,
        "settings": _replace_strings(stage.settings, by_content),
        "model": model_identity(recipe.base),
        # By content and position, not path: a run folder or data folder moved elsewhere stays up to date.
        "inputs": [d or path for path, d in pairs],
        "excise": __version__,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _replace_strings(value: Any, replace: dict[str, str]) -> Any:
    """``value`` with every string that is a key of ``replace`` replaced (nested dicts and lists)."""
    if isinstance(value, dict):
        return {k: _replace_strings(v, replace) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_strings(v, replace) for v in value]
    return replace.get(value, value) if isinstance(value, str) else value


def _digest(path: Path) -> str | None:
    """Content digest of a file, or of a folder's files (names and bytes; checkpoints excluded);
    None when it does not exist (a hub id or a missing output)."""
    from excise.evaluate.subject import file_digest

    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for file in sorted(
        p for p in path.rglob("*") if p.is_file() and _CHECKPOINTS not in p.relative_to(path).parts
    ):
        h.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\0".encode())
    return h.hexdigest()


def _decide(entry: dict[str, Any], fingerprint: str, output: Path, force: bool) -> str:
    """``skip`` (up to date), ``resume`` (an attempt with these very inputs was cut short after a
    checkpoint: continue from it) or ``run``; a stage to run has its leftovers removed first."""
    if not force and _up_to_date(entry, fingerprint, output):
        return "skip"
    _remove_leftovers(output)
    cut_short = entry.get("status") == "started" and entry.get("fingerprint") == fingerprint
    return "resume" if not force and cut_short and _has_checkpoints(output) else "run"


def _up_to_date(entry: dict[str, Any], fingerprint: str, output: Path) -> bool:
    return (
        entry.get("status") == "done"
        and entry.get("fingerprint") == fingerprint
        and output.exists()
        and _digest(output) == entry.get("output_digest")
    )


def _sweep_line(name: str, path: Path) -> str:
    """One line: the λ a sweep chose, with its deficiency and utility against λ = 0."""
    try:
        sweep = json.loads(path.read_text())
        chosen, points = sweep["chosen"], sweep["points"]
        at, zero = points[chosen["index"]], points[0]
        d, u = sweep["deficiency"], sweep["utility"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return f"sweep {name}: no result in {path}"
    knee = sweep.get("knee", {}).get("lam")
    return (
        f"sweep {name}: chosen λ = {chosen['lam']:g} — {d['metric']}:{d['key']} "
        f"{_num(at['deficiency']['value'])} (λ = 0: {_num(zero['deficiency']['value'])}), "
        f"{u['metric']}:{u['key']} {_num(at['utility']['value'])} (λ = 0: {_num(zero['utility']['value'])})"
        + (f"; knee λ = {knee:g}" if knee is not None else "")
    )


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _remove_leftovers(output: Path) -> None:
    """Delete the temporary siblings a killed attempt left beside ``output`` (``.NAME.tmp-…``,
    ``.NAME.….tmp``): the lock makes this run their only possible owner.

    A replacement cut short is finished first (:func:`excise.fsutil.recover_dir`): its complete
    ``.NAME.new-…`` or moved-aside ``.NAME.old-…`` output becomes ``output`` again, never deleted.
    """
    from excise.fsutil import recover_dir

    if not output.parent.is_dir():
        return
    recover_dir(output)
    for p in output.parent.glob(f".{output.name}.*"):
        if "tmp" not in p.name[len(output.name) + 2 :]:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _has_checkpoints(output: Path) -> bool:
    return output.is_dir() and [p.name for p in output.iterdir()] == [_CHECKPOINTS]


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / MANIFEST).read_text())["stages"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_manifest(out: Path, stages: dict[str, Any]) -> None:
    from excise.evaluate.cache import write_atomic_json

    write_atomic_json(out / MANIFEST, {"stages": stages})


def _write_run_info(recipe: Recipe, command: str | None, outputs: list[Path]) -> None:
    from excise.evaluate.cache import write_atomic_json

    out = recipe.out
    header = f"Resolved from {recipe.source}" + (f"; command: {command}" if command else "")
    # Every line of the header a comment: an override holding a newline stays out of the YAML.
    header = "".join(f"# {line}\n" for line in header.splitlines())
    _write_text_atomic(out / RESOLVED, header + recipe.to_yaml())
    if command:
        _write_text_atomic(out / COMMAND, command + "\n")
    models: dict[str, Any] = {BASE: {"kind": "base", "adapter": None}}
    for name, adapter in recipe.adapters.items():
        models[name] = {
            "kind": "full" if recipe.is_full(name) else "adapter",  # full: a model folder, no adapter
            "trainer": adapter.trainer,
            "adapter": str(recipe.adapter_of(name)),
        }
    for name, op in recipe.operations.items():
        models[name] = {"kind": "operation", "op": op.op, "inputs": list(op.inputs), "params": op.params,
                        "adapter": str(recipe.adapter_of(name))}  # fmt: skip
    evaluations = {
        name: {"metric": e.metric, "results": {m: f"results/{m}/{name}.json" for m in e.models}}
        for name, e in recipe.evaluations.items()
    }
    sweeps = {
        name: {"folder": f"sweeps/{name}", "operation": s.operation} for name, s in recipe.sweeps.items()
    }
    info = {
        "name": recipe.name, "description": recipe.description, "base": recipe.base,
        "command": command, "recipe": str(recipe.source), "resolved_recipe": RESOLVED,
        "data_dir": str(recipe.data_dir) if recipe.data_dir else None,
        "models": models, "evaluations": evaluations, "sweeps": sweeps,
        # The current plan's outputs: the report shows these and lists any other as outdated.
        "outputs": [o.as_posix() for o in outputs],
        "excise_version": __version__,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    write_atomic_json(out / RUN_INFO, info)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the folder


def _check_run_folder(out: Path, recipe: Recipe) -> None:
    """Refuse a file, a folder of other files, or another recipe's run, before writing anything."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run folder {out} is a file; set another `out` (e.g. out=runs/{recipe.name})")
    if not out.is_dir() or not [p for p in out.iterdir() if p.name != _LOCK]:
        return
    info = out / RUN_INFO
    if not (out / MANIFEST).is_file() and not info.is_file():
        raise ConfigError(
            f"run folder {out} is not empty and holds no excise run (no {MANIFEST}); "
            f"set another `out` (e.g. out=runs/{recipe.name}) or empty it"
        )
    try:
        previous = json.loads(info.read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous is not None and previous != recipe.name:
        raise ConfigError(
            f"run folder {out} holds a run of recipe {previous!r}, not {recipe.name!r}; "
            f"set another `out` (e.g. out=runs/{recipe.name})"
        )


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an advisory lock on the run folder (one ``excise run`` at a time)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        out.mkdir(parents=True, exist_ok=True)
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / _LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"run folder {out} is in use by another `excise run` ({holder}); wait for it to finish "
                "or set another `out`"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's stop) unwinds like Ctrl-C: temporary outputs are removed."""

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def is_main_process() -> bool:
    """False only in the non-first processes of an ``accelerate launch`` / ``torchrun`` run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    return _state().is_main_process


def _from_main(value: Any) -> Any:
    """The main process's ``value`` on every process (itself outside a multi-process run)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return value
    _state()  # joins the process group, as the trainers do
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _wait_for_everyone() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _state().wait_for_everyone()


def _state() -> Any:
    """accelerate's process state, joined as the trainers join it (``cpu=True`` without CUDA)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
