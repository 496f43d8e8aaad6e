"""Recipes: one YAML file that names every stage of a job, validated before anything runs.

A recipe names the base model, the adapters to train (each a trainer of ``excise train``
with its data and settings, or an existing adapter folder), the operations on them (the
PEM registry: ``ext_sub``, ``subtract``, ``negate``, ``compose``…), the evaluations (the
metric registry of ``excise eval``), the λ sweep and the report. Every section's keys are
the fields of the config its CLI verb builds (:class:`~excise.train.sft.SftConfig`,
:class:`~excise.train.sku.SkuConfig`, :class:`~excise.train.baselines.BaselineConfig`,
:class:`~excise.evaluate.config.EvalConfig`), so a recipe block also runs alone as
``excise train sft --data … --format …``.

:func:`load_recipe` reads the file, applies command-line overrides (``train.steps=50``,
dotted paths, values read as YAML), substitutes ``${data}`` (the data folder), and checks
everything — unknown keys (with the nearest known one), missing files, names that refer to
nothing, impossible combinations — collecting **every** problem before it raises one
:class:`RecipeError` with one line per problem. Nothing is written by loading.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError

from excise.errors import ConfigError, ExciseError
from excise.hub import parse_hub_id, resolve_adapter
from excise.train.baselines import BASELINES

__all__ = [
    "DATA_DIR_ENV",
    "TRAINERS",
    "AdapterStage",
    "EvaluationStage",
    "OperationStage",
    "Recipe",
    "RecipeError",
    "SweepStage",
    "Trainer",
    "apply_overrides",
    "default_data_dir",
    "load_recipe",
]

DATA_DIR_ENV = "EXCISE_DATA_DIR"
BASE = "base"  # the name of the unmodified base model among the evaluated models
# Keys the pipeline sets itself in a trainer's config (where it writes, how it restarts).
_PIPELINE_KEYS = ("base", "out", "resume", "overwrite")
_EVAL_PIPELINE_KEYS = ("model", "adapter")
# Data-valued keys of the trainer and evaluation configs: a local path here must exist.
_DATA_KEYS = ("data", "harmful", "normal", "reference")
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
# A recipe name (adapter, operation, evaluation, sweep) is a folder or file name below the run
# folder: no path separator, no `..`, no leading dot or hyphen.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_NAMED_SECTIONS = ("adapters", "operations", "evaluations", "sweeps")


class RecipeError(ConfigError):
    """A recipe has problems; ``problems`` holds one line per problem (all of them)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ----------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class Trainer:
    """A registry row: the ``method`` value of an adapter block, its config class and module.

    Attributes:
        name: the recipe value (``sft``, ``sku``, ``ga``…), as the ``excise train`` verb.
        module: the module whose ``run(cfg, progress=...)`` trains it.
        config: the name of its config class in that module.
        data_keys: the config fields that name data.
    """

    name: str
    module: str
    config: str
    data_keys: tuple[str, ...]

    def config_class(self) -> type[BaseModel]:
        import importlib

        return getattr(importlib.import_module(self.module), self.config)

    def run(self, cfg: BaseModel, *, progress: bool = True) -> Any:
        import importlib

        return importlib.import_module(self.module).run(cfg, progress=progress)


TRAINERS: dict[str, Trainer] = {
    row.name: row
    for row in [
        Trainer("sft", "excise.train.sft", "SftConfig", ("data",)),
        Trainer("sku", "excise.train.sku", "SkuConfig", ("harmful", "normal")),
        *(Trainer(b, "excise.train.baselines", "BaselineConfig", ("harmful", "normal")) for b in BASELINES),
    ]
}


# ----------------------------------------------------------------------------- sections


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Top(_Strict):
    """The top level of a recipe (sections are checked one by one afterwards)."""

    name: str = Field(description="Short name of the job (report title).")
    description: str = Field("", description="What the recipe shows.")
    base: str = Field(description="Base model: alias, local folder, .gguf file or hub id.")
    out: Path = Field(description="Run folder: every stage writes below it.")
    data_dir: Path | None = Field(None, description="What ${data} stands for (default: ../shared/data).")
    train: dict[str, Any] = Field(default_factory=dict, description="Settings shared by every adapter.")
    adapters: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Adapters, in order.")
    operations: dict[str, dict[str, Any]] = Field(default_factory=dict, description="PEM operations.")
    eval: dict[str, Any] = Field(default_factory=dict, description="Settings shared by every evaluation.")
    evaluations: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Metrics to run.")
    sweeps: dict[str, dict[str, Any]] = Field(default_factory=dict, description="λ sweeps of operations.")
    report: bool = Field(True, description="Write report.json / .md / .html at the end.")


class _OperationSpec(_Strict):
    op: str = Field(description="Operator registry name: ext_sub, compose, subtract, add, scale, negate.")
    inputs: list[str] = Field(min_length=1, description="Adapter or operation names, in argument order.")
    lam: FiniteFloat | None = None
    lams: list[FiniteFloat] | None = None
    weight: FiniteFloat | None = None
    sequential: bool | None = None
    allow_partial: bool = False


# The sweep fields the pipeline fills from the named operation and the run folder.
_SWEEP_FROM_PIPELINE = ("model", "operation", "inputs", "weights", "allow_partial", "out", "overwrite")
_SWEEP_MODEL_KEYS = ("dtype", "device")  # sweep-level settings, taken from the evaluations by default


# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class AdapterStage:
    """Train one adapter (``trainer`` + ``config``), or use an existing one (``path``)."""

    name: str
    trainer: str | None
    config: BaseModel | None
    path: str | None


@dataclass(frozen=True)
class OperationStage:
    """Apply operator ``op`` to the named adapters / operations with ``params``."""

    name: str
    op: str
    inputs: tuple[str, ...]
    params: dict[str, Any]


@dataclass(frozen=True)
class EvaluationStage:
    """Run ``metric`` with ``config`` (model = the recipe's base) on each of ``models``."""

    name: str
    metric: str
    config: BaseModel
    models: tuple[str, ...]


@dataclass(frozen=True)
class SweepStage:
    """Sweep the λ of the recipe's operation ``operation``: ``config`` is the full
    :class:`~excise.pipeline.sweep.SweepConfig` (inputs and output folder filled in)."""

    name: str
    operation: str
    config: BaseModel


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: what each stage runs, and the resolved text to write beside it."""

    name: str
    description: str
    base: str
    out: Path
    data_dir: Path | None
    adapters: dict[str, AdapterStage]
    operations: dict[str, OperationStage]
    evaluations: dict[str, EvaluationStage]
    sweeps: dict[str, SweepStage]
    report: bool
    source: Path
    resolved: dict[str, Any] = field(repr=False)

    @property
    def models(self) -> tuple[str, ...]:
        """Every model a recipe can evaluate: the base, each adapter, each operation's result."""
        return (BASE, *self.adapters, *self.operations)

    def adapter_of(self, model: str) -> Path | None:
        """The adapter folder of one of :attr:`models` (None for the base model); for a full
        fine-tune (:meth:`is_full`) the model folder."""
        return _adapter_folder(self.out, self.adapters, model)

    def is_full(self, model: str) -> bool:
        """Whether one of :attr:`models` is a full fine-tune (``full: true``, or an operation on
        full fine-tunes): a model folder, evaluated as ``model=`` that folder with no adapter."""
        return model in _full_models(self.adapters, self.operations)

    def to_yaml(self) -> str:
        """The resolved recipe (overrides applied, ``${data}`` substituted) as YAML."""
        return yaml.safe_dump(self.resolved, sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- loading


def default_data_dir() -> Path | None:
    """``$EXCISE_DATA_DIR``, else the first ``../shared/data`` beside the working folder or the
    repository that exists, else None."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    repo = Path(__file__).resolve().parents[2]
    for root in (Path.cwd(), repo):
        candidate = root.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def load_recipe(
    path: str | Path, overrides: Sequence[str] = (), *, data_dir: str | Path | None = None
) -> Recipe:
    """Read, override, substitute and validate a recipe.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings; values are read as YAML (``50``, ``[0, 1]``).
        data_dir: what ``${data}`` stands for; default the recipe's ``data_dir``, else
            :func:`default_data_dir`.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: every problem found, one line each.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise RecipeError([f"{where}: no such recipe file"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise RecipeError([f"{where}:{line}: not valid YAML ({problem})"]) from None
    if not isinstance(raw, dict):
        raise RecipeError([f"{where}: a recipe is a mapping of sections (name, base, out, adapters…)"])
    raw, problems = apply_overrides(raw, overrides)
    if problems:
        raise RecipeError([f"{where}: {p}" for p in problems])

    chosen = data_dir if data_dir is not None else raw.get("data_dir")
    folder = Path(str(chosen)).expanduser() if chosen not in (None, "") else default_data_dir()
    if folder is not None:
        raw["data_dir"] = str(folder)
    resolved, problems = _substitute(raw, {"data": None if folder is None else str(folder)}, ())
    resolved = _expand_home(resolved)
    checker = _Checker(where, {tuple(o.partition("=")[0].strip().split(".")) for o in overrides})
    for loc, message in problems:
        checker.add(loc, message)
    recipe = checker.check(resolved, path)
    if checker.problems:
        raise RecipeError(checker.problems)
    assert recipe is not None
    return recipe


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """``raw`` with each ``dotted.key=value`` set (values read as YAML); and the problems.

    Intermediate mappings are created as needed; setting below a value that is not a
    mapping is a problem. Unknown keys are left for validation to report.
    """
    import copy

    result = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            problems.append(f"override {item!r} is not KEY=VALUE with a dotted KEY (e.g. train.steps=50)")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                problems.append(f"override {item!r}: {where} is a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    return result, problems


# Path-valued keys (at any depth) whose leading `~` is the user's home, as on the command line.
_PATH_KEYS = frozenset({*_DATA_KEYS, "out", "data_dir", "path"})


def _expand_home(value: Any, key: Any = None) -> Any:
    """``value`` with ``~`` / ``~user`` expanded in the strings of :data:`_PATH_KEYS` (nested too)."""
    if isinstance(value, dict):
        return {k: _expand_home(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_home(v, key) for v in value]
    if key in _PATH_KEYS and isinstance(value, str) and value.startswith("~"):
        return str(Path(value).expanduser())
    return value


def _substitute(value: Any, variables: Mapping[str, str | None], loc: tuple) -> tuple[Any, list]:
    """``value`` with ``${name}`` replaced in every string; and the (loc, message) problems."""
    problems: list[tuple[tuple, str]] = []
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k], sub = _substitute(v, variables, (*loc, k))
            problems += sub
        return out, problems
    if isinstance(value, list):
        items = []
        for i, v in enumerate(value):
            item, sub = _substitute(v, variables, (*loc, i))
            items.append(item)
            problems += sub
        return items, problems
    if not isinstance(value, str):
        return value, problems

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in variables:
            known = ", ".join("${" + v + "}" for v in variables)
            problems.append((loc, f"unknown variable ${{{name}}} (known: {known})"))
            return match.group(0)
        if variables[name] is None:
            problems.append(
                (loc, f"${{{name}}} has no value: no data folder found; set data_dir in the recipe, "
                 f"pass --data-dir DIR or set {DATA_DIR_ENV}")
            )  # fmt: skip
            return match.group(0)
        return str(variables[name])

    return _VARIABLE.sub(replace, value), problems


# ----------------------------------------------------------------------------- checking


class _Checker:
    """Collects one line per problem while the sections are checked one by one."""

    def __init__(self, where: str, overridden: set[tuple[str, ...]]) -> None:
        self.where = where
        self.overridden = overridden
        self.problems: list[str] = []

    def add(self, loc: Sequence[Any], message: str) -> None:
        path = ".".join(str(p) for p in loc)
        origin = " (from a command-line override)" if self._overridden(loc) else ""
        line = f"{self.where}: {path + ': ' if path else ''}{message}{origin}"
        if line not in self.problems:  # a shared default is reported once, not per user
            self.problems.append(line)

    def _overridden(self, loc: Sequence[Any]) -> bool:
        key = tuple(str(p) for p in loc)
        return any(key[: len(o)] == o or o[: len(key)] == key for o in self.overridden if key)

    def validate(
        self,
        cls: type[BaseModel],
        data: Mapping[str, Any],
        loc: tuple,
        *,
        defaults: tuple[str, Mapping[str, Any]] | None = None,
        **fixed: Any,
    ) -> Any:
        """``cls(**fixed, **data)``, or None with each of pydantic's errors added as a line.

        ``defaults`` names the shared section (``train``, ``eval``) some of ``data`` came from:
        a bad value there is reported at that section, once."""
        try:
            return cls(**fixed, **data)
        except ValidationError as err:
            for e in err.errors():
                where = tuple(e["loc"])
                if where and where[0] in fixed and where[0] not in data:
                    continue  # a value the pipeline set; reported where the user wrote it
                if defaults is not None and where and where[0] in defaults[1]:
                    self.add((defaults[0], *where), _message(e, cls))
                    continue
                self.add((*loc, *where), _message(e, cls))
            return None
        except ConfigError as err:  # a dataclass-style check inside a config
            self.add(loc, str(err))
            return None

    def _name_ok(self, name: Any, loc: tuple) -> bool:
        """Whether ``name`` is a valid recipe name (:data:`NAME_PATTERN`); a problem line if not."""
        if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
            return True
        kind = "" if isinstance(name, str) else f" (a YAML {type(name).__name__}; quote it)"
        rule = "letters, digits, `_`, `.` and `-`, starting with a letter, digit or `_`"
        self.add(loc, f"{name!r} is not a valid name{kind}: use {rule} (names become folders and files "
                 "in the run folder)")  # fmt: skip
        return False

    def unknown_keys(self, keys: Iterable[str], known: Iterable[str], loc: tuple, what: str) -> None:
        known = list(known)
        for key in keys:
            if key not in known:
                hint = _suggest(key, known) or f"; {what} takes: {', '.join(known)}"
                self.add((*loc, key), f"unknown key{hint}")

    # -------------------------------------------------------------------- the sections

    def check(self, raw: dict[str, Any], source: Path) -> Recipe | None:
        named = {k: raw[k] for k in _NAMED_SECTIONS if isinstance(raw.get(k), dict)}
        for key, section in named.items():  # a bad name is one problem; its entry is still checked
            for name in section:
                self._name_ok(name, (key, name))
            named[key] = {str(name): spec for name, spec in section.items()}  # a YAML number: as text
        top = self.validate(_Top, raw | named, ())
        sections = {
            k: (raw | named).get(k)
            for k in ("train", "adapters", "operations", "eval", "evaluations", "sweeps")
        }
        sections = {k: v if isinstance(v, dict) else {} for k, v in sections.items()}
        base = raw.get("base") if isinstance(raw.get("base"), str) else "base-model"
        out = Path(str(raw.get("out", "out")))

        adapters = self._adapters(sections["adapters"], sections["train"], base, out)
        operations = self._operations(sections["operations"], adapters, set(sections["adapters"]))
        full = self._full_operations(operations, _full_models(adapters, operations), base)
        for name, spec in sections["sweeps"].items():
            op_name = spec.get("operation") if isinstance(spec, dict) else None
            if isinstance(op_name, str) and op_name in full:
                self.add(("sweeps", name, "operation"), f"{op_name!r} operates on full fine-tunes; a λ sweep "
                         "swaps one LoRA scale, so it sweeps operations on adapters only")  # fmt: skip
        models = (BASE, *sections["adapters"], *sections["operations"])  # declared, valid or not
        evaluations = self._evaluations(sections["evaluations"], sections["eval"], base, models)
        declared = set(sections["operations"]), set(sections["evaluations"])
        sweeps = self._sweeps(sections["sweeps"], operations, evaluations, adapters, base, out, declared)
        if top is None or self.problems:
            return None
        return Recipe(
            name=top.name, description=top.description, base=top.base, out=top.out,
            data_dir=top.data_dir, adapters=adapters, operations=operations,
            evaluations=evaluations, sweeps=sweeps, report=top.report, source=source, resolved=raw,
        )  # fmt: skip

    def _adapters(
        self, section: dict[str, Any], train: dict[str, Any], base: str, out: Path
    ) -> dict[str, AdapterStage]:
        classes = {name: row.config_class() for name, row in TRAINERS.items()}
        # `train` holds defaults for every adapter whose trainer takes the key (epochs: sft only).
        known = sorted(set().union(*(c.model_fields for c in classes.values())) - {*_PIPELINE_KEYS, "method"})
        self.unknown_keys(train, known, ("train",), "`train` (defaults for the adapters)")
        train = {k: v for k, v in train.items() if k in known}
        methods = {spec.get("method") for spec in section.values() if isinstance(spec, dict)}
        taken = set().union(*(classes[m].model_fields for m in methods if m in classes))
        trainers = ", ".join(sorted(str(m) for m in methods if m in classes)) or "none"
        for key in train:
            if key not in taken:
                self.add(
                    ("train", key), f"no adapter of this recipe takes {key!r} (its trainers: {trainers})"
                )
        for key in ("data", "harmful", "normal"):
            self._data_exists(train.get(key), ("train", key))
        stages = {}
        for name, spec in section.items():
            loc, before = ("adapters", name), len(self.problems)
            if not isinstance(spec, dict):
                self.add(loc, "an adapter is a mapping: `method: sft` and its settings, or `path: FOLDER`")
                continue
            if name == BASE:
                self.add(loc, f"{BASE!r} names the base model; call the adapter something else")
            if "path" in spec:
                self._existing_adapter(name, spec, loc, stages)
                continue
            method = spec.get("method")
            if method not in TRAINERS:
                known = list(TRAINERS)
                hint = _suggest(str(method), known) if method is not None else ""
                self.add((*loc, "method"), f"{'unknown trainer ' + repr(method) if method else 'missing'}"
                         f"{hint}; choose one of: {', '.join(known)} (or give `path: FOLDER`)")  # fmt: skip
                continue
            trainer, cls = TRAINERS[method], classes[method]
            own = {k: v for k, v in spec.items() if k != "method"}
            for key in _PIPELINE_KEYS:
                if key in own:
                    self.add((*loc, key), "set by `excise run` (the recipe's base, its run folder, resume)")
                    own.pop(key)
            fixed: dict[str, Any] = {"base": base, "out": out / "adapters" / name}
            if "method" in cls.model_fields:
                fixed["method"] = method
            defaults = {k: v for k, v in train.items() if k in cls.model_fields}
            if {"steps", "epochs"} & set(own):  # an adapter's own run length replaces the default one
                defaults = {k: v for k, v in defaults.items() if k not in ("steps", "epochs")}
            settings = defaults | own
            unknown = [k for k in settings if k not in cls.model_fields]
            self.unknown_keys(unknown, [k for k in cls.model_fields if k not in _PIPELINE_KEYS],
                              loc, f"method {method}")  # fmt: skip
            inherited = {k: v for k, v in defaults.items() if k not in own}
            config = self.validate(
                cls,
                {k: v for k, v in settings.items() if k not in unknown},
                loc,
                defaults=("train", inherited),
                **fixed,
            )
            for key in trainer.data_keys:
                self._data_exists(own.get(key), (*loc, key))  # `train`'s own were checked above
            if config is not None and len(self.problems) == before:
                stages[name] = AdapterStage(name, method, config, None)
        return stages

    def _full_operations(self, operations: dict[str, OperationStage], full: set[str], base: str) -> set[str]:
        """``full``, after checking each operation on full fine-tunes: all its inputs full, its
        parameters those of the full-model path (:func:`excise.pem.full.apply_full`), and a
        base model that path can read (a local folder, ``.gguf`` file or alias, not a hub id)."""
        from excise.models.loading import ALIASES

        local_base = base in ALIASES or Path(base).expanduser().exists()
        for name, stage in operations.items():
            kinds = [source in full for source in stage.inputs]
            if not any(kinds):
                continue
            loc = ("operations", name)
            if not all(kinds):
                i = kinds.index(False)
                self.add((*loc, "inputs", i), f"{stage.inputs[i]!r} is an adapter and "
                         f"{stage.inputs[kinds.index(True)]!r} a full fine-tune (full: true); an operation "
                         "takes adapters only or full fine-tunes only")  # fmt: skip
            if "allow_partial" in stage.params:
                self.add((*loc, "allow_partial"), "full fine-tunes hold every tensor of the base; "
                         "allow_partial applies to adapters")  # fmt: skip
            if not local_base:
                self.add((*loc, "inputs"), f"operations on full fine-tunes read the base model's weights "
                         f"file by file: base {base!r} must be a local folder, a .gguf file or an alias, "
                         "not a hub id (download it first)")  # fmt: skip
        return full

    def _existing_adapter(self, name: str, spec: dict, loc: tuple, stages: dict) -> None:
        extra = [k for k in spec if k != "path"]
        if extra:
            self.add((*loc, extra[0]), "an adapter given by `path` takes no other key (drop it, or train "
                     "it with `method:`)")  # fmt: skip
            return
        path = spec["path"]
        if not isinstance(path, str) or not path:
            self.add((*loc, "path"), "must be an adapter folder")
            return
        folder = Path(path).expanduser()
        if not folder.exists() and parse_hub_id(path) is not None:
            try:  # a hub id: fetched once into huggingface_hub's cache, as everywhere else
                folder = resolve_adapter(path)
            except ExciseError as err:
                self.add((*loc, "path"), str(err))
                return
        if not (folder / "adapter_config.json").is_file():
            self.add((*loc, "path"), f"{path} is not a PEFT adapter folder (no adapter_config.json)")
            return
        stages[name] = AdapterStage(name, None, None, str(folder))

    def _operations(
        self, section: dict[str, Any], adapters: dict[str, AdapterStage], declared: set[str]
    ) -> dict[str, OperationStage]:
        from excise.pem.ops.registry import OPERATORS

        stages: dict[str, OperationStage] = {}
        defined = set(declared)  # adapters with problems of their own are not reported again here
        for name, spec in section.items():
            loc = ("operations", name)
            if not isinstance(spec, dict):
                self.add(loc, "an operation is a mapping: op, inputs and its parameters")
                continue
            if name == BASE or name in adapters:
                self.add(loc, f"the name {name!r} is taken (the base model or an adapter)")
            op = self.validate(_OperationSpec, spec, loc)
            if op is None:
                defined.add(name)
                continue
            if op.op.replace("-", "_") not in OPERATORS:
                known = list(OPERATORS)
                self.add((*loc, "op"), f"unknown operator {op.op!r}{_suggest(op.op, known)}; choose one of: "
                         f"{', '.join(known)}")  # fmt: skip
                defined.add(name)
                continue
            key = op.op.replace("-", "_")
            params = op.model_dump(exclude={"op", "inputs"}, exclude_none=True)
            if not op.allow_partial:
                params.pop("allow_partial")
            accepted, n_inputs, variadic = _signature(OPERATORS[key].fn)
            for param in params:
                if param not in accepted:
                    self.add(
                        (*loc, param), f"operator {key} takes no {param!r}; it takes: {', '.join(accepted)}"
                    )
            if len(op.inputs) < n_inputs or (len(op.inputs) > n_inputs and not variadic):
                want = f"at least {n_inputs}" if variadic else str(n_inputs)
                hint = (
                    " (several anti-experts: op compose)" if key == "ext_sub" and len(op.inputs) > 2 else ""
                )
                self.add((*loc, "inputs"), f"operator {key} takes {want} inputs, got {len(op.inputs)}{hint}")
            if key == "compose" and op.lams is not None and len(op.lams) not in (1, len(op.inputs) - 1):
                self.add((*loc, "lams"), f"give one λ, or one per anti-expert ({len(op.inputs) - 1}), "
                         f"got {len(op.lams)}")  # fmt: skip
            for i, source_name in enumerate(op.inputs):
                if source_name == name:
                    self.add((*loc, "inputs", i), "an operation cannot take its own result")
                elif source_name not in defined:
                    later = " (operations run in order: define it above)" if source_name in section else ""
                    known = sorted(defined)
                    self.add((*loc, "inputs", i), f"{source_name!r} is no adapter or earlier operation"
                             f"{later}{_suggest(source_name, known)}")  # fmt: skip
            defined.add(name)
            stages[name] = OperationStage(name, key, tuple(op.inputs), params)
        return stages

    def _evaluations(
        self, section: dict[str, Any], defaults: dict[str, Any], base: str, models: tuple[str, ...]
    ) -> dict[str, EvaluationStage]:
        from excise.evaluate.config import EvalConfig
        from excise.evaluate.metrics import METRICS

        shared = [k for k in EvalConfig.model_fields if k not in (*_EVAL_PIPELINE_KEYS, "fields")]
        self.unknown_keys(defaults, shared, ("eval",), "`eval` (settings every evaluation shares)")
        defaults = {k: v for k, v in defaults.items() if k in shared}
        stages = {}
        for name, spec in section.items():
            loc, before = ("evaluations", name), len(self.problems)
            if not isinstance(spec, dict):
                self.add(loc, "an evaluation is a mapping: metric and its settings")
                continue
            metric = spec.get("metric")
            if metric not in METRICS:
                known = list(METRICS)
                hint = _suggest(str(metric), known) if metric is not None else ""
                what = f"unknown metric {metric!r}" if metric is not None else "missing"
                self.add((*loc, "metric"), f"{what}{hint}; choose one of: {', '.join(known)}")
                continue
            chosen = spec.get("models", list(models))
            if not isinstance(chosen, list) or not all(isinstance(m, str) for m in chosen):
                self.add((*loc, "models"), "must be a list of model names")
                chosen = []
            for i, m in enumerate(chosen):
                if m not in models:
                    hint = _suggest(m, list(models))
                    self.add(
                        (*loc, "models", i),
                        f"{m!r} is no model of this recipe{hint}; known: {', '.join(models)}",
                    )
            own = {k: v for k, v in spec.items() if k not in ("metric", "models")}
            for key in _EVAL_PIPELINE_KEYS:
                if key in own:
                    self.add((*loc, key), "set by `excise run` (the recipe's base and each model's adapter)")
                    own.pop(key)
            known_fields = [k for k in EvalConfig.model_fields if k not in _EVAL_PIPELINE_KEYS]
            unknown = [k for k in own if k not in EvalConfig.model_fields]
            self.unknown_keys(unknown, ["metric", "models", *known_fields], loc, "an evaluation")
            inherited = {k: v for k, v in defaults.items() if k not in own}
            config = self.validate(
                EvalConfig,
                defaults | {k: v for k, v in own.items() if k not in unknown},
                loc,
                defaults=("eval", inherited),
                model=base,
            )
            for key in ("data", "reference"):
                self._data_exists(own.get(key), (*loc, key))
            if config is not None and len(self.problems) == before:
                stages[name] = EvaluationStage(name, metric, config, tuple(chosen))
        return stages

    def _sweeps(
        self,
        section: dict[str, Any],
        operations: dict[str, OperationStage],
        evaluations: dict[str, EvaluationStage],
        adapters: dict[str, AdapterStage],
        base: str,
        out: Path,
        declared: tuple[set[str], set[str]],
    ) -> dict[str, SweepStage]:
        from excise.pipeline.sweep import SweepConfig

        stages = {}
        for name, spec in section.items():
            loc, before = ("sweeps", name), len(self.problems)
            if not isinstance(spec, dict):
                self.add(loc, "a sweep is a mapping: operation, lams, deficiency, utility")
                continue
            own = dict(spec)
            for key in _SWEEP_FROM_PIPELINE:
                if key != "operation" and key in own:
                    self.add((*loc, key), "set by `excise run` from the named operation and the run folder")
                    own.pop(key)
            op_name = own.pop("operation", None)
            op = operations.get(op_name) if isinstance(op_name, str) else None
            if op is None and op_name in declared[0]:
                continue  # the operation has problems of its own
            if op is None:
                what = "missing" if op_name is None else f"{op_name!r} is no operation of this recipe"
                self.add((*loc, "operation"), f"{what}{_suggest(str(op_name), list(operations))}; "
                         f"known: {', '.join(operations) or 'none'}")  # fmt: skip
                continue
            fixed: dict[str, Any] = {
                "model": base, "operation": op.op,
                "inputs": [_adapter_folder(out, adapters, source) for source in op.inputs],
                "allow_partial": op.params.get("allow_partial", False),
                "out": out / "sweeps" / name, "overwrite": True,
            }  # fmt: skip
            if op.params.get("sequential"):
                self.add((*loc, "operation"), f"{op_name!r} composes sequentially, which is not linear in λ; "
                         "sweep a parallel composition")  # fmt: skip
            if op.op == "compose" and op.params.get("lams") is not None:
                lams = op.params["lams"]
                fixed["weights"] = lams * (len(op.inputs) - 1) if len(lams) == 1 else lams
            for axis in ("deficiency", "utility"):
                if isinstance(own.get(axis), dict) and "evaluation" in own[axis]:
                    evaluation = evaluations.get(own[axis]["evaluation"])
                    for key in _SWEEP_MODEL_KEYS:  # the sweep loads one model for both axes
                        if evaluation is not None:
                            own.setdefault(key, getattr(evaluation.config, key))
                    own[axis] = self._axis(own[axis], evaluations, declared[1], (*loc, axis))
            if isinstance(own.get("extra"), list):
                own["extra"] = [
                    {"label": f"{x['evaluation']}:{x.get('key')}"}  # the user's own label wins
                    | self._axis(x, evaluations, declared[1], (*loc, "extra", i))
                    if isinstance(x, dict) and "evaluation" in x
                    else x
                    for i, x in enumerate(own["extra"])
                ]
            if op.op not in SweepConfig.model_fields["operation"].annotation.__args__:
                self.add((*loc, "operation"), f"operation {op_name!r} ({op.op}) cannot be swept "
                         "(ext_sub, subtract, negate and compose can)")  # fmt: skip
                continue
            config = self.validate(SweepConfig, own, loc, **fixed)
            if config is not None and len(self.problems) == before:
                stages[name] = SweepStage(name, op_name, config)
        return stages

    def _axis(
        self, spec: dict[str, Any], evaluations: dict[str, EvaluationStage], declared: set[str], loc: tuple
    ) -> dict[str, Any]:
        """``{evaluation: NAME, key: K}`` → the sweep metric of that evaluation (its metric and
        settings). An unknown or invalid evaluation is reported (once) and replaced by a stand-in,
        so that the sweep's other settings are still checked."""
        name = spec["evaluation"]
        evaluation = evaluations.get(name)
        if evaluation is None:
            if name not in declared:
                self.add((*loc, "evaluation"), f"{name!r} is no evaluation of this recipe"
                         f"{_suggest(str(name), list(declared))}")  # fmt: skip
            return {"metric": "perplexity", "key": "perplexity"}
        settings = evaluation.config.model_dump(exclude={"model", "adapter", *_SWEEP_MODEL_KEYS})
        return {"metric": evaluation.metric, "settings": settings} | {
            k: v for k, v in spec.items() if k != "evaluation"
        }

    def _data_exists(self, value: Any, loc: tuple) -> None:
        """A value that looks like a local file (a data suffix, or a path prefix) must exist."""
        if not isinstance(value, str) or value == "safe" or "${" in value:
            return  # `safe`: the harmful data's safe side; `${`: reported as a variable already
        looks_local = value.endswith(_DATA_SUFFIXES) or value.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(value).expanduser().exists():
            self.add(loc, f"no such file {value}")


def _full_models(adapters: Mapping[str, AdapterStage], operations: Mapping[str, OperationStage]) -> set[str]:
    """The models that are full fine-tunes: adapters trained with ``full: true``, and operations
    whose first input is one (operations run in order, so an input is known before its user)."""
    full = {n for n, a in adapters.items() if a.config is not None and getattr(a.config, "full", False)}
    for name, op in operations.items():
        if op.inputs and op.inputs[0] in full:
            full.add(name)
    return full


def _adapter_folder(out: Path, adapters: Mapping[str, AdapterStage], model: str) -> Path | None:
    if model == BASE:
        return None
    if model in adapters:
        path = adapters[model].path
        return Path(path) if path else out / "adapters" / model
    return out / "ops" / model


def _signature(fn: Any) -> tuple[list[str], int, bool]:
    """An operator's keyword parameters, its number of adapter inputs, and whether more may follow."""
    params = inspect.signature(fn).parameters.values()
    keywords = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "on_module"]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in params)
    return keywords, len(positional) + (1 if variadic else 0), variadic


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _message(error: Mapping[str, Any], cls: type[BaseModel]) -> str:
    """One line for one pydantic error; unknown keys name the nearest known one."""
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        known = [k for k in cls.model_fields if k not in _PIPELINE_KEYS]
        return f"unknown key{_suggest(key, known)}"
    if error["type"] == "missing":
        return "missing (required)"
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    if isinstance(value, float) and not math.isfinite(value):
        shown = f" (got {value})"
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{message}{shown}".replace("\n", " ")
