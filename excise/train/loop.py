"""The training loop every trainer shares: SFT, SKU acquisition, unlearning baselines.

Contract (what a recipe passes to :func:`train`):

- ``model``: any ``torch.nn.Module`` whose trainable parameters (``requires_grad``) are what
  is trained and checkpointed: a PEFT model (only the adapter trains) or a full model.
- ``micro_batch(i) -> batch``: the ``i``-th *global* micro-batch, a **deterministic function
  of ``i``** (use per-epoch permutations seeded by ``(seed, epoch)``, never a shared
  iterator). The batch is opaque to the loop — a dict of tensors, or a dict of such dicts
  (SKU: harmful, random-mismatched, normal) — the loop only moves its tensors to the device.
  At optimizer step ``s`` with ``G`` accumulation steps and ``W`` processes, process ``p``
  reads micro-batches ``i = s·G·W + g·W + p`` for ``g < G``: the processes split the data,
  and one process with ``G·W`` accumulation steps sees exactly the same micro-batches.
- ``loss_fn(model, batch) -> (loss, terms)``: the scalar to minimise for one micro-batch and
  named floats to log (SKU: each of its three losses; GA: the NLL it raises). The step's
  gradient is the mean over its ``G·W`` micro-batches (accumulated, then all-reduced).
- ``save(model, folder)``: writes the final result into ``folder`` (``model.save_pretrained``).

What the loop guarantees:

- **Exact resume.** Before each micro-batch torch's global RNG is reseeded from
  ``(settings.seed, i)``, so dropout masks depend on the micro-batch index only, not on
  the process or on what ran before. A checkpoint (``out/checkpoints/step-N``: trainable
  weights, optimizer, scheduler, RNG states, the loss log) plus the deterministic
  ``micro_batch`` make ``resume=True`` give the same weights as an uninterrupted run; it
  refuses a checkpoint made with other settings.
- **Atomic output.** Checkpoints are written to a temp folder and renamed; the final folder
  (``save``'s files, ``loss_log.json``, ``train_config.json``) is built beside ``out`` and
  renamed onto it, so ``out`` never holds half a result. A non-empty ``out`` is refused
  unless ``overwrite`` (or ``resume`` with checkpoints of an unfinished run).
- **Logs.** A progress bar shows the running loss and the logged terms; ``loss_log.json``
  has one record per step: ``step``, ``lr``, ``loss``, each term, ``tokens`` (the sum of
  every ``attention_mask`` in the step's batches, all processes), ``padding`` (the share of
  the step's batch slots, rows × columns, that were padding) and ``seconds``;
  ``train_config.json`` has the run's ``padding_share``.
- **Devices and processes** through accelerate: the model goes to the accelerator's
  device and is wrapped for data parallelism under ``accelerate launch`` (the configs in
  ``configs/accelerate/``: DDP and FSDP v1, both run on CPU processes too; DeepSpeed ZeRO-2,
  untested here; checkpoints refused under FSDP and DeepSpeed); only the main process writes. bf16 is autocast
  (weights stay float32).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from excise.errors import ConfigError
from excise.pem.io import atomic_output_dir

__all__ = [
    "SCHEDULES",
    "TrainReport",
    "TrainSettings",
    "check_output",
    "new_accelerator",
    "resolve_base_once",
    "sharded_launch",
    "train",
]

SCHEDULES = ("constant", "linear", "cosine")
_HF_SCHEDULE = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
CHECKPOINTS = "checkpoints"
LOSS_LOG = "loss_log.json"
TRAIN_CONFIG = "train_config.json"
# Settings a resumed run may change: they do not touch the weights.
_FREE_ON_RESUME = ("save_every", "keep_checkpoints", "log_every")

LossFn = Callable[[Any, Any], tuple[torch.Tensor, Mapping[str, float]]]


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings (AdamW).

    Attributes:
        steps: optimizer steps; or None and ``epochs``.
        epochs: passes over the data (needs ``micro_batches_per_epoch`` in :func:`train`).
        batch_size: examples per micro-batch per process (read by the recipe's ``micro_batch``).
        grad_accum: micro-batches accumulated per optimizer step, per process.
        lr: peak learning rate.
        schedule: ``constant``, ``linear`` (decay to 0) or ``cosine``, after ``warmup_steps``
            of linear warm-up from 0.
        warmup_steps: warm-up steps.
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: clip the gradient's global norm to this (None: no clipping).
        seed: seeds the data order (through the recipe) and every micro-batch's dropout.
        bf16: bfloat16 autocast for forward and backward (weights and optimizer stay float32).
        save_every: write a checkpoint every this many steps (None: none).
        keep_checkpoints: newest checkpoints kept on disk.
        log_every: refresh the progress bar every this many steps (the log keeps every step).
    """

    steps: int | None = 100
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    bf16: bool = False
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 1

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("give either steps or epochs, not both nor neither (epochs: pass steps=None)")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_steps and weight_decay must not be negative")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be positive (or None), got {self.max_grad_norm}")
        if self.save_every is not None and self.save_every < 1:
            raise ConfigError(f"save_every must be at least 1, got {self.save_every}")

    def total_steps(self, micro_batches_per_epoch: int | None, num_processes: int = 1) -> int:
        """Optimizer steps to run: ``steps``, or ``epochs`` worth of global micro-batches."""
        if self.steps is not None:
            return self.steps
        if not micro_batches_per_epoch:
            raise ConfigError("training by epochs needs the number of micro-batches per epoch")
        per_step = self.grad_accum * num_processes
        return max(1, math.ceil(self.epochs * micro_batches_per_epoch / per_step))


@dataclass
class TrainReport:
    """What :func:`train` did.

    Attributes:
        out: the final folder.
        steps: optimizer steps in total (resumed ones included).
        resumed_from: the checkpoint step it resumed from, or None.
        log: one record per step (see the module docstring).
        seconds: wall time of this call.
        peak_rss_mb: the process's peak resident memory (MiB).
        padding_share: share of all batch slots (rows × columns) of the run that were padding.
        sharding: under FSDP, the weight values (all, and trainable) process 0 held and all
            processes together (``weights_main``, ``weights_total``, ``trainable_…``); else None.
    """

    out: Path
    steps: int
    resumed_from: int | None
    log: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    padding_share: float = 0.0
    sharding: dict[str, Any] | None = None


def train(
    model: Any,
    micro_batch: Callable[[int], Any],
    loss_fn: LossFn,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    save: Callable[[Any, Path], None],
    resume: bool = False,
    overwrite: bool = False,
    micro_batches_per_epoch: int | None = None,
    config: Mapping[str, Any] | None = None,
    accelerator: Any = None,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[int, Any], Mapping[str, float]] | None = None,
) -> TrainReport:
    """Train ``model`` and write the result to ``out_dir`` (see the module docstring).

    Args:
        model: the module to train (its ``requires_grad`` parameters train).
        micro_batch: global micro-batch index → batch (deterministic).
        loss_fn: ``(model, batch) -> (loss, terms)``.
        settings: optimisation settings.
        out_dir: final folder; checkpoints go to ``out_dir/checkpoints`` meanwhile.
        save: writes the trained model into a folder.
        resume: continue from the newest checkpoint in ``out_dir`` (none: start afresh).
        overwrite: replace a non-empty ``out_dir``.
        micro_batches_per_epoch: global micro-batches in one pass over the data (for ``epochs``).
        config: the recipe's own settings, written to ``train_config.json`` and checked on resume.
        accelerator: an ``accelerate.Accelerator``; a new one if None.
        progress: show a progress bar (main process only).
        desc: the progress bar's label.
        on_step: called after each optimizer step with ``(step, model)`` (1-based step, the
            unwrapped model); the values it returns join that step's log record (e.g. a
            validation loss, :func:`excise.train.sft.validation_hook`).

    Returns:
        A :class:`TrainReport`.

    Raises:
        ConfigError: bad settings, a non-empty ``out_dir``, no trainable parameter, or a
            checkpoint made with other settings.
    """
    started = time.perf_counter()
    accelerator = accelerator or new_accelerator()
    if settings.bf16 and accelerator.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16 support; train without --bf16")
    out = Path(out_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    total = settings.total_steps(micro_batches_per_epoch, world)
    fingerprint = _fingerprint(settings, config, world, total)
    checkpoint = _prepare_out_dir(out, resume=resume, overwrite=overwrite)
    kind = _sharding(accelerator)
    if kind and (settings.save_every or checkpoint is not None):
        raise ConfigError(
            f"checkpoints (--save-every, --resume) are not supported under {kind}: each process holds "
            "only a shard; drop --save-every or launch with configs/accelerate/ddp.yaml"
        )
    accelerator.wait_for_everyone()  # every process has checked before the main one writes
    if overwrite and checkpoint is None and out.is_dir() and accelerator.is_main_process:
        shutil.rmtree(out)  # asked to replace it: stale checkpoints must not mix with this run's
    accelerator.wait_for_everyone()

    if kind == "DeepSpeed":
        # Not run here (no GPU, no DeepSpeed): the engine takes the optimizer with the model,
        # divides the loss by its accumulation steps and steps (clipping included) at the
        # boundary accelerate marks; our own AdamW and scheduler keep the arithmetic.
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameter")
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds |= {
            "train_micro_batch_size_per_gpu": settings.batch_size,
            "gradient_accumulation_steps": settings.grad_accum,
            "gradient_clipping": settings.max_grad_norm or 0.0,
        }
        model, optimizer = accelerator.prepare(model, optimizer)
        raw = accelerator.unwrap_model(model)
    else:
        if kind == "FSDP":
            if accelerator.device.type == "cpu":
                _broadcast_weights(model)
            # The losses run the LM head on hidden states after the model's forward (in chunks);
            # FSDP holds the root's weights (embeddings, head) whole only inside its forward, so
            # the whole loss becomes that forward.
            model, loss_fn = _LossForward(model, loss_fn), _call_loss_forward
        model = accelerator.prepare_model(model)
        raw = accelerator.unwrap_model(model)
        raw = raw.model if isinstance(raw, _LossForward) else raw
        params = [p for p in raw.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameter")
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = _scheduler(optimizer, settings, total)
    sharding = _shard_sizes(accelerator, raw) if kind == "FSDP" else None

    log: list[dict[str, float]] = []
    start_step = 0
    if checkpoint is not None:
        start_step, log = _load_checkpoint(checkpoint, raw, optimizer, scheduler, fingerprint)
        if start_step > total:
            raise ConfigError(f"checkpoint {checkpoint} is past the {total} steps of this run")

    bar = tqdm(
        total=total,
        initial=start_step,
        desc=desc,
        unit="step",
        disable=not (progress and accelerator.is_main_process),
    )
    if not bar.disable:
        bar.write(_plan(settings, total, start_step, world, config), file=sys.stderr)
    running: float | None = None
    for step in range(start_step, total):
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        model.train()
        loss_sum, terms_sum, tokens, slots = torch.zeros((), device=accelerator.device), {}, 0, 0
        for g in range(settings.grad_accum):
            index = (step * settings.grad_accum + g) * world + rank
            torch.manual_seed(_micro_seed(settings.seed, index))  # dropout depends on `index` only
            batch = _to_device(micro_batch(index), accelerator.device)
            read, held = _count_tokens(batch)
            tokens, slots = tokens + read, slots + held
            last = g == settings.grad_accum - 1
            with contextlib.ExitStack() as stack:
                if not last:
                    stack.enter_context(accelerator.no_sync(model))  # all-reduce once per step
                with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                    loss, terms = loss_fn(model, batch)
                if kind == "DeepSpeed":
                    accelerator.gradient_state._set_sync_gradients(last)  # the engine steps at the boundary
                    accelerator.backward(loss)  # the engine divides by its accumulation steps
                else:
                    accelerator.backward(loss / settings.grad_accum)
            loss_sum += loss.detach().float()
            for name, value in terms.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + float(value)
        if settings.max_grad_norm is not None:
            _clip_grad_norm(accelerator, kind, params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        record = _step_record(
            accelerator,
            step + 1,
            lr,
            loss_sum,
            terms_sum,
            tokens,
            slots,
            settings.grad_accum,
            time.perf_counter() - t0,
        )
        if on_step is not None:
            record |= {k: float(v) for k, v in on_step(step + 1, raw).items()}
        log.append(record)
        if step == start_step and not bar.disable and total > step + 1:
            bar.write(_estimate(record["seconds"], total - step - 1), file=sys.stderr)
        running = record["loss"] if running is None else 0.9 * running + 0.1 * record["loss"]
        bar.update(1)
        if (step + 1) % settings.log_every == 0 or step + 1 == total:
            shown = {
                k: v for k, v in record.items() if k not in ("step", "tokens", "padding", "seconds", "lr")
            }
            bar.set_postfix({"running": f"{running:.4f}", **{k: f"{v:.4f}" for k, v in shown.items()}})
        if settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < total:
            if accelerator.is_main_process:
                _save_checkpoint(out, step + 1, raw, optimizer, scheduler, log, fingerprint, settings)
            accelerator.wait_for_everyone()
    bar.close()

    report = TrainReport(
        out=out,
        steps=total,
        resumed_from=start_step or None,
        log=log,
        seconds=round(time.perf_counter() - started, 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        padding_share=_padding_share(log),
        sharding=sharding,
    )
    with _whole_weights(accelerator, model, kind):  # every process enters: gathering is collective
        if accelerator.is_main_process:
            with _plain_module_names(raw) if kind == "FSDP" else contextlib.nullcontext():
                _write_final(out, raw, save, report, fingerprint)
        accelerator.wait_for_everyone()
    return report


# ----------------------------------------------------------------------------- helpers


def _sharding(accelerator: Any) -> str | None:
    """``FSDP`` or ``DeepSpeed`` when the launch shards training state across processes, else None."""
    from accelerate.utils import DistributedType

    kind = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}.get(
        accelerator.distributed_type
    )
    if kind == "FSDP" and accelerator.is_fsdp2:
        raise ConfigError(
            "FSDP version 2 is not supported yet: launch with configs/accelerate/fsdp.yaml (version 1)"
        )
    return kind


def _clip_grad_norm(accelerator: Any, kind: str | None, params: list[torch.Tensor], max_norm: float) -> None:
    """Clip the global gradient norm of ``params`` to ``max_norm``, whatever holds the gradients."""
    if kind == "DeepSpeed":
        return  # the engine clips (gradient_clipping in its config)
    if kind != "FSDP":
        accelerator.clip_grad_norm_(params, max_norm)
        return
    # Each process holds a shard of every gradient (accelerate clips through FSDP only when every
    # parameter trains): the global norm is the root of the all-reduced sum of the shards' squares.
    grads = [p.grad for p in params if p.grad is not None]
    local = sum((g.detach().float().pow(2).sum() for g in grads), torch.zeros((), device=accelerator.device))
    total = accelerator.reduce(local, reduction="sum").sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
    for g in grads:
        g.mul_(scale.to(g.dtype))


class _LossForward(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module's forward, for FSDP to wrap as its root unit."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self._no_split_modules = _no_split_modules(model)  # accelerate's per-layer wrap policy reads it

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


def _call_loss_forward(model: Any, batch: Any) -> Any:
    return model(batch)


def _no_split_modules(model: torch.nn.Module) -> list[str] | None:
    """The decoder-layer class names transformers lists for ``model`` (through PEFT wrappers)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return list(names)
    return None


def _broadcast_weights(model: torch.nn.Module) -> None:
    """Process 0's parameters and buffers copied to every process (FSDP's ``sync_module_states``,
    which torch runs on GPUs only)."""
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


@contextlib.contextmanager
def _plain_module_names(model: torch.nn.Module) -> Any:
    """``model.named_modules()`` without FSDP's ``_fsdp_wrapped_module`` name parts, meanwhile.

    FSDP's state dict has plain keys, but PEFT picks a LoRA's entries by its module names, from
    which it strips only a leading ``_fsdp_wrapped_module.``: with a unit per decoder layer
    nothing matched and the saved adapter was empty.
    """
    wrapped = model.named_modules

    def named_modules(*args: Any, **kwargs: Any) -> Any:
        for name, module in wrapped(*args, **kwargs):
            yield name.replace("._fsdp_wrapped_module", "").removeprefix("_fsdp_wrapped_module."), module

    model.named_modules = named_modules  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.named_modules


def _shard_sizes(accelerator: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Weight values (frozen and trainable) this process holds, and all processes together: FSDP
    gives each process a slice of every layer's flattened weights."""
    counts = torch.tensor(
        [float(sum(p.numel() for p in model.parameters())),
         float(sum(p.numel() for p in model.parameters() if p.requires_grad))],
        device=accelerator.device,
    )  # fmt: skip
    totals = accelerator.reduce(counts.clone(), reduction="sum")
    return {
        "kind": "FSDP", "weights_main": int(counts[0]), "weights_total": int(totals[0]),
        "trainable_main": int(counts[1]), "trainable_total": int(totals[1]),
    }  # fmt: skip


def _whole_weights(accelerator: Any, model: Any, kind: str | None) -> Any:
    """A context in which the model's parameters are whole on every process (FSDP gathers them)."""
    if kind != "FSDP":
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(model, writeback=False)


def new_accelerator() -> Any:
    """An ``accelerate.Accelerator`` for this launch: joins CPU-only processes too (see below),
    and runs an FSDP launch config on them (:func:`_cpu_fsdp_accelerator`)."""
    from accelerate import Accelerator

    cpu = _multi_process_cpu()
    if cpu and sharded_launch() == "FSDP":
        return _cpu_fsdp_accelerator()
    return Accelerator(cpu=cpu)


def sharded_launch() -> str | None:
    """``FSDP`` or ``DeepSpeed`` when ``accelerate launch`` runs an FSDP or DeepSpeed config (the
    flags it sets in the environment), else None; readable before any accelerator exists."""
    for kind in ("FSDP", "DeepSpeed"):
        if os.environ.get(f"ACCELERATE_USE_{kind.upper()}", "false").lower() == "true":
            return kind
    return None


def _cpu_fsdp_accelerator() -> Any:
    """FSDP (v1) over CPU processes (gloo): what ``configs/accelerate/fsdp.yaml`` asks for.

    accelerate wraps in FSDP only on accelerator devices (on CPU processes it would fall back to
    plain data parallelism, and its plugin refuses ``sync_module_states`` without a GPU), while
    torch's FSDP shards over gloo on CPUs as well. So the plugin is built from the launch config
    without ``sync_module_states`` (torch's FSDP broadcasts module states from GPUs only; the
    loop broadcasts process 0's weights itself, :func:`_broadcast_weights`) and the launch is
    promoted to FSDP: the model is then wrapped, sharded and gathered exactly as on GPUs.
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin(sync_module_states=False)  # version 2: refused by _sharding
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.device = torch.device("cpu")  # not cpu:0, which torch's FSDP takes for another device
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does
    return accelerator


def _plan(
    settings: TrainSettings, total: int, start: int, world: int, config: Mapping[str, Any] | None
) -> str:
    """One line before training: steps, examples per step, data size, checkpoints, whether
    activations are recomputed (gradient checkpointing)."""
    per_step = settings.batch_size * settings.grad_accum * world
    text = f"plan: {total - start} steps" + (f" (resuming after {start})" if start else "")
    text += f", {per_step} examples each ({settings.batch_size} x {settings.grad_accum} accumulated"
    text += f" x {world} processes)" if world > 1 else ")"
    n = (config or {}).get("n_examples")
    if isinstance(n, int) and n:
        text += f", from {n} examples ({total * per_step / n:.2g} epochs)"
    if settings.save_every and settings.save_every < total:
        text += f"; a checkpoint every {settings.save_every} steps (--resume continues)"
    checkpointing = (config or {}).get("gradient_checkpointing")
    if isinstance(checkpointing, bool):
        text += f"; gradient checkpointing {'on' if checkpointing else 'off'}"
    return text


def _estimate(seconds: float, steps_left: int) -> str:
    """``first step: 5.2 s; about 8.6 min for the 99 steps left``."""
    left = seconds * steps_left
    when = (
        f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f} s"
    )
    return f"first step: {seconds:.1f} s; about {when} for the {steps_left} steps left"


def resolve_base_once(spec: str) -> None:
    """Under several processes, the main one resolves the base first (a GGUF alias is converted
    into the cache once, not by every process at the same time); a no-op for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from accelerate import PartialState

    from excise.models import resolve_model

    with PartialState(cpu=_multi_process_cpu()).main_process_first():
        resolve_model(spec)


def _multi_process_cpu() -> bool:
    """Launched as several processes (``torchrun``, ``accelerate launch``) on a machine without CUDA.

    accelerate then needs ``cpu=True`` to join the processes (gloo); without it each process
    would train alone on the whole data.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _micro_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63 - 1)


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere in nested dicts / lists / tuples moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _count_tokens(batch: Any) -> tuple[int, int]:
    """``(tokens, slots)`` of a (nested) batch: the sum and the size of every ``attention_mask``."""
    if isinstance(batch, Mapping):
        tokens = slots = 0
        for key, value in batch.items():
            if key == "attention_mask" and isinstance(value, torch.Tensor):
                read, held = int(value.sum()), value.numel()
            else:
                read, held = _count_tokens(value)
            tokens, slots = tokens + read, slots + held
        return tokens, slots
    if isinstance(batch, (list, tuple)):
        counts = [_count_tokens(v) for v in batch]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    return 0, 0


def _padding_share(log: list[dict[str, float]]) -> float:
    """Padding slots over all slots of the logged steps (each record's ``padding`` weighted by its slots)."""
    slots = sum(r["tokens"] / (1 - r["padding"]) for r in log if r.get("padding", 1) < 1)
    return round(1 - sum(r["tokens"] for r in log) / slots, 4) if slots else 0.0


def _step_record(
    accelerator: Any,
    step: int,
    lr: float,
    loss_sum: torch.Tensor,
    terms_sum: dict[str, float],
    tokens: int,
    slots: int,
    grad_accum: int,
    seconds: float,
) -> dict[str, float]:
    """One loss-log record; means over the step's micro-batches on all processes."""
    names = sorted(terms_sum)
    values = (
        torch.tensor(
            [float(loss_sum), *(terms_sum[n] for n in names)], dtype=torch.float64, device=accelerator.device
        )
        / grad_accum
    )
    counts = torch.tensor([tokens, slots], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
        counts = accelerator.reduce(counts, reduction="sum")
    means = values.tolist()
    record: dict[str, float] = {"step": step, "lr": lr, "loss": means[0]}
    record |= dict(zip(names, means[1:], strict=True))
    read, held = counts.tolist()
    padding = round(1 - read / held, 6) if held else 0.0
    record |= {"tokens": int(read), "padding": padding, "seconds": round(seconds, 4)}
    return record


def _scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings, total: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(
        _HF_SCHEDULE[settings.schedule],
        optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=total,
    )


def _fingerprint(
    settings: TrainSettings, config: Mapping[str, Any] | None, world: int, total: int
) -> dict[str, Any]:
    """Everything a resumed run must share with the one that made the checkpoint."""
    shared = {k: v for k, v in asdict(settings).items() if k not in _FREE_ON_RESUME}
    payload = {"settings": shared, "config": dict(config or {}), "processes": world, "total_steps": total}
    return json.loads(json.dumps(payload, default=str))


def check_output(out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an occupied ``out`` (or a resume with nothing to resume) before anything is loaded.

    Raises:
        ConfigError: as :func:`train` would, only sooner.
    """
    _prepare_out_dir(Path(out), resume=resume, overwrite=overwrite)


def _prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Check ``out``; return the checkpoint to resume from, if any. Removes ``out`` on overwrite."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is a file")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pass one of them")
    if resume:
        if [e for e in entries if e != CHECKPOINTS]:
            raise ConfigError(
                f"{out} holds a finished run or other files, not only {CHECKPOINTS}/; "
                "nothing to resume (pass --overwrite instead of --resume to train again)"
            )
        return _latest_checkpoint(out)
    if entries and not overwrite:
        hint = " (an unfinished run: pass --resume to continue it)" if entries == [CHECKPOINTS] else ""
        raise ConfigError(
            f"output folder {out} exists and is not empty{hint}; pass --overwrite to replace it"
        )
    return None


def _latest_checkpoint(out: Path) -> Path | None:
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = [(int(p.name.split("-")[1]), p) for p in folder.glob("step-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


def _save_checkpoint(
    out: Path,
    step: int,
    raw: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    log: list[dict[str, float]],
    fingerprint: dict[str, Any],
    settings: TrainSettings,
) -> Path:
    """Write ``out/checkpoints/step-N`` atomically and drop all but the newest ``keep_checkpoints``."""
    from safetensors.torch import save_file

    folder = out / CHECKPOINTS
    target = folder / f"step-{step}"
    with atomic_output_dir(target, overwrite=True) as tmp:
        weights = {n: p.detach().cpu().contiguous() for n, p in raw.named_parameters() if p.requires_grad}
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "state.pt",
        )
        state = {
            "step": step,
            "fingerprint": fingerprint,
            "python_rng": _jsonable(random.getstate()),
            "log": log,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
    done = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("step-*"))
    for _, old in done[: -settings.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _load_checkpoint(
    folder: Path, raw: Any, optimizer: torch.optim.Optimizer, scheduler: Any, fingerprint: dict[str, Any]
) -> tuple[int, list[dict[str, float]]]:
    """Restore weights, optimizer, scheduler and RNG states; return (step, log so far)."""
    from safetensors.torch import load_file

    state = json.loads((folder / "trainer_state.json").read_text())
    if state["fingerprint"] != fingerprint:
        diff = _diff(state["fingerprint"], fingerprint)
        raise ConfigError(
            f"checkpoint {folder} was made with other settings ({diff}); "
            "resume with the same settings, or pass --overwrite to start again"
        )
    weights = load_file(folder / "trainable.safetensors")
    named = {n: p for n, p in raw.named_parameters() if p.requires_grad}
    if set(weights) != set(named):
        raise ConfigError(f"checkpoint {folder} does not hold this model's trainable parameters")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(weights[name])
    blob = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    random.setstate(_tupled(state["python_rng"]))
    return int(state["step"]), list(state["log"])


def _write_final(
    out: Path, raw: Any, save: Callable[[Any, Path], None], report: TrainReport, fp: dict
) -> None:
    """Build the final folder beside ``out``, then swap it in (checkpoints are dropped)."""
    with atomic_output_dir(out, overwrite=True) as tmp:
        save(raw, tmp)
        (tmp / LOSS_LOG).write_text(json.dumps(report.log, indent=1) + "\n")
        summary = {
            **fp,
            "steps": report.steps,
            "resumed_from": report.resumed_from,
            "seconds": report.seconds,
            "peak_rss_mb": report.peak_rss_mb,
            "padding_share": report.padding_share,
        }
        if report.sharding:
            summary["sharding"] = report.sharding
        (tmp / TRAIN_CONFIG).write_text(json.dumps(summary, indent=2) + "\n")


def _diff(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _diff(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} then, {new!r} now"


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
