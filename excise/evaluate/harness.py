"""A bridge to EleutherAI's lm-evaluation-harness: MMLU, GSM8K, BBH and anything it knows.

The model is loaded our way (:func:`excise.models.load_model`, so aliases such as
``smollm2-135m-instruct`` work; an adapter through PEFT), wrapped in lm-eval's ``HFLM``, and
run with ``lm_eval.simple_evaluate``. Scores are lm-eval's own — same prompts, same metrics
— so they compare with published harness numbers for the same task version.

Offline, point a task at local files with a task YAML in a folder passed as
``include_path`` (``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}``); see
docs/JUDGES.md for MMLU / GSM8K / BBH recipes. A task whose dataset must come from the hub
fails with one line saying so.
"""

from __future__ import annotations

import difflib
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from excise.errors import AdapterError, ConfigError, DataError, first_line
from excise.evaluate.cache import strict_json, write_atomic_json
from excise.models import load_model, load_tokenizer
from excise.models.adapter_fit import check_adapter_fits, loading_error_line, require_adapter_folder

__all__ = ["HarnessRun", "run_harness", "write_results"]

# Exceptions raised while fetching a task's dataset, by the module that defines them.
_DATASET_ERROR_MODULES = ("datasets", "huggingface_hub", "requests", "urllib3", "httpx", "fsspec")


class HarnessRun(dict):
    """The results JSON: lm-eval's ``results`` / ``versions`` / ``n-shot`` / ``configs`` plus ours."""


def run_harness(
    base: str,
    tasks: Sequence[str],
    *,
    adapter: str | Path | None = None,
    include_path: Sequence[str | Path] = (),
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    apply_chat_template: bool = False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    log_samples: bool = False,
) -> HarnessRun:
    """Evaluate ``base`` (plus ``adapter``) on lm-eval ``tasks``.

    Args:
        base: model spec (alias, folder, ``.gguf`` file or hub id).
        tasks: lm-eval task or group names (``mmlu``, ``gsm8k``, ``bbh``, a local task's name…).
        adapter: a PEFT adapter folder to load on top of ``base``.
        include_path: folders of extra task YAMLs (e.g. local copies of hub datasets).
        limit: examples per task (an int), or a fraction of each task (a float < 1).
        num_fewshot: few-shot examples (default: each task's own).
        batch_size: lm-eval batch size.
        seed: seeds lm-eval's python, numpy, torch and few-shot sampling.
        apply_chat_template: format requests with the tokenizer's chat template.
        device: where to run the model.
        dtype: model parameter dtype.
        log_samples: keep lm-eval's per-example records in the result.

    Returns:
        lm-eval's results (``results``, ``versions``, ``n-shot``, ``configs``, ``higher_is_better``,
        optionally ``samples``) with ``excise``: model, adapter, tasks, limit, seed, versions.

    Raises:
        ConfigError: unknown task, bad limit / batch size. AdapterError: unloadable adapter.
        DataError: a task's dataset cannot be fetched (hub unreachable) — use a local task file.
        ModelLoadError: the base model cannot be loaded.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ConfigError("no tasks given; pass e.g. --tasks mmlu,gsm8k")
    if limit is not None and not limit > 0:
        raise ConfigError(f"limit must be positive, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    for folder in include_path:
        if not Path(folder).is_dir():
            raise ConfigError(f"include path {folder} is not a folder of task YAML files")
    task_manager = _task_manager(TaskManager, tasks, [str(p) for p in include_path])

    started = time.time()
    if adapter is not None:
        check_adapter_fits(base, Path(adapter))  # before the slow load
    model = load_model(base, dtype=dtype, device=device)
    tokenizer = load_tokenizer(base)
    if adapter is not None:
        model = _with_adapter(model, Path(adapter))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            log_samples=log_samples,
            apply_chat_template=apply_chat_template,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
    except Exception as err:
        if _is_dataset_error(err):
            raise DataError(
                f"lm-eval could not load a dataset for {', '.join(tasks)} ({first_line(err)}); offline, "
                "point the task at local files with --include-path (see docs/JUDGES.md)"
            ) from err
        raise
    run = HarnessRun({k: v for k, v in results.items() if k in _KEEP or (log_samples and k == "samples")})
    run["excise"] = {
        "model": base,
        "adapter": None if adapter is None else str(adapter),
        "tasks": list(tasks),
        "include_path": [str(p) for p in include_path],
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "seed": seed,
        "apply_chat_template": apply_chat_template,
        "dtype": str(dtype).removeprefix("torch."),
        "lm_eval_version": lm_eval.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "seconds": round(time.time() - started, 1),
    }
    return run


_KEEP = (
    "results",
    "groups",
    "group_subtasks",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
    "configs",
)


def write_results(run: dict[str, Any], out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the results JSON atomically (temp file beside ``out``, then rename).

    Raises:
        ConfigError: ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    plain = json.loads(json.dumps(run, default=_json_default))  # numpy scalars, functions → JSON values
    clean = strict_json(plain)
    if clean != plain:  # a NaN never equals itself: lm-eval reported a number that is not finite
        clean.setdefault("excise", {})["null_reason"] = (
            "numbers lm-eval reported as NaN or infinite (e.g. the stderr of a single sample) are null"
        )
    return write_atomic_json(out, clean)


def _json_default(value: Any) -> Any:
    """lm-eval configs hold functions and numpy scalars: keep what reads back, name the rest."""
    if hasattr(value, "item"):
        return value.item()
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return repr(value)


def _task_manager(cls: Any, tasks: Sequence[str], include_path: list[str]) -> Any:
    """A TaskManager that knows every task asked for, or ConfigError naming the first unknown one.

    Indexing lm-eval's thousands of built-in task files takes tens of seconds on a small CPU, so
    when the local folders alone define every task asked for, only they are indexed.
    """
    if include_path:
        local = cls(include_path=include_path, include_defaults=False, verbosity="ERROR")
        if all(task in set(local.all_tasks) for task in tasks):
            return local
    task_manager = cls(include_path=include_path or None, verbosity="ERROR")
    _check_tasks(tasks, task_manager)
    return task_manager


def _check_tasks(tasks: Sequence[str], task_manager: Any) -> None:
    known = set(task_manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"lm-eval knows no task {task!r}{hint}; for a local task pass its folder with --include-path"
            )


def _with_adapter(model: Any, adapter: Path) -> Any:
    from peft import PeftModel

    require_adapter_folder(adapter)
    try:
        return PeftModel.from_pretrained(model, str(adapter)).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise AdapterError(
            f"cannot load adapter {adapter} on this base model: {loading_error_line(err)}"
        ) from err


def _is_dataset_error(err: BaseException) -> bool:
    """Whether ``err`` (or its cause) comes from fetching a dataset: hub, network, offline mode."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        module = type(err).__module__.split(".")[0]
        if module in _DATASET_ERROR_MODULES or isinstance(err, ConnectionError):
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False
