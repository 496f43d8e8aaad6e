"""`excise train sku|ga|ga-mismatch|llmu|finetune|npo`: SKU acquisition and the unlearning baselines.

:data:`COMMANDS` lists them for the ``train`` group (:mod:`excise.commands.train` mounts
them). The six commands share their data, LoRA and optimisation flags (:data:`_SHARED`,
appended to each command's own signature by :func:`_with_shared_flags`); each adds its
method's weights. Flags are the fields of
:class:`excise.train.unlearning.UnlearnConfig` and its subclasses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from excise.commands import common as flags
from excise.commands.common import (
    GradientCheckpointingAuto,
    GroupByLength,
    Overwrite,
    done,
    module_names,
    report_padding,
)

__all__ = ["COMMANDS"]


def _opt(help: str, *names: str) -> Any:
    return typer.Option(*names, help=help)


# The flags every unlearning command takes, in --help order: (name, annotation, default).
_SHARED: list[tuple[str, Any, Any]] = [
    (
        "base",
        Annotated[str, _opt("Base MODEL θo: alias (smollm2-135m-instruct), folder, .gguf or hub id.")],
        ...,
    ),
    (
        "harmful",
        Annotated[
            str,
            _opt(
                "Harmful QA DATA: PKU-SafeRLHF pairs (prompt, response list; harmful = response[1]), raw "
                "PKU-SafeRLHF rows, or HH-RLHF (chosen, rejected); file or hub id."
            ),
        ],
        ...,
    ),
    ("out", Annotated[Path, _opt("Output folder: PEFT adapter (model folder with --full) + logs.")], ...),
    (
        "harmful_field",
        Annotated[list[str] | None, _opt("Map a role of --harmful to a column, NAME=COLUMN (repeatable).")],
        None,
    ),
    (
        "normal_field",
        Annotated[list[str] | None, _opt("Map a role of --normal to a column, NAME=COLUMN (repeatable).")],
        None,
    ),
    (
        "split",
        Annotated[
            str,
            _opt(
                "Side of the project-wide prompt split to train on: train (60%; judge and eval prompts stay "
                "held out), judge, eval, or all (every row: leaks evaluation prompts)."
            ),
        ],
        "train",
    ),
    (
        "template",
        Annotated[str, _opt("Prompt template: chat, alpaca, tulu, question-answer, plain.")],
        "chat",
    ),
    ("system", flags.System, None),
    ("limit", Annotated[int | None, _opt("Read only the first N rows of each data file.")], None),
    ("max_examples", Annotated[int | None, _opt("Use at most N examples per data stream.")], None),
    ("max_length", Annotated[int, _opt("Max tokens per row; longer responses are cut.")], 256),
    ("full", Annotated[bool, _opt("Train all weights instead of a LoRA (small models).", "--full")], False),
    ("lora_r", flags.LoraR, 8),
    ("lora_alpha", flags.LoraAlpha, 16.0),
    ("lora_dropout", flags.LoraDropout, 0.05),
    ("target_modules", flags.TargetModules, "q_proj,v_proj"),
    ("rslora", flags.Rslora, False),
    ("steps", Annotated[int, _opt("Optimizer steps.")], 100),
    ("batch_size", Annotated[int, _opt("Harmful prompts (and normal rows) per micro-batch.")], 2),
    ("grad_accum", flags.GradAccum, 1),
    ("lr", flags.Lr, 2e-4),
    ("schedule", flags.Schedule, "linear"),
    ("warmup_steps", flags.WarmupSteps, 0),
    ("weight_decay", flags.WeightDecay, 0.0),
    ("max_grad_norm", flags.MaxGradNorm, 1.0),
    ("seed", Annotated[int, _opt("Seeds the LoRA init, data order, random responses and dropout.")], 0),
    ("bf16", Annotated[bool, _opt("bfloat16 autocast (weights stay float32).", "--bf16")], False),
    ("group_by_length", GroupByLength, True),
    ("gradient_checkpointing", GradientCheckpointingAuto, None),
    ("save_every", flags.SaveEvery, None),
    ("resume", Annotated[bool, _opt("Continue from the newest checkpoint in OUT.", "--resume")], False),
    ("overwrite", Overwrite, False),
    ("progress", flags.Progress, True),
    ("threads", flags.Threads, None),
]

_NORMAL_HELP = (
    "Normal (prompt, answer) DATA, Alpaca style (instruction/input/output; file or hub id), or `safe` for "
    "the safe responses of --harmful."
)
_K_HELP = "Random responses of other prompts per harmful prompt (K)."

# Method flags several commands share.
_Normal = Annotated[str, _opt(_NORMAL_HELP)]
_GaWeight = Annotated[float, _opt("Weight of the GA term.")]
_MismatchWeight = Annotated[float, _opt("Weight of the CE on mismatched responses.")]
_K = Annotated[int, _opt(_K_HELP, "--k")]
_MismatchPool = Annotated[
    str | None,
    _opt(
        "Draw the mismatched responses from --normal's answers (normal, the default: LLMU's code) or "
        "from other harmful prompts (harmful, as SKU's random disassociation)."
    ),
]


def _with_shared_flags(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` as a command: its own flags, then the shared ones (required ones first)."""
    own = list(inspect.signature(fn, eval_str=True).parameters.values())[:-1]  # drop **shared
    shared = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d) for n, a, d in _SHARED
    ]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    required = [p for p in shared if p.default is ...]
    shared = [p.replace(default=inspect.Parameter.empty) if p.default is ... else p for p in shared]

    def command(**kwargs: Any) -> None:
        fn(**kwargs)

    params = [*[p.replace(default=inspect.Parameter.empty) for p in required], *own]
    params += [p for p in shared if p.name not in {r.name for r in required}]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = fn.__doc__
    command.__name__ = fn.__name__
    return command


def _shared_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Shared flags → :class:`UnlearnConfig` fields."""
    from excise.data import parse_field_mapping
    from excise.runtime import set_threads

    set_threads(kwargs["threads"])
    if not kwargs["progress"]:
        flags.hide_library_bars()
    dropped = ("harmful_field", "normal_field", "progress", "threads")
    cfg = {k: v for k, v in kwargs.items() if k not in dropped}
    cfg["harmful_fields"] = parse_field_mapping(kwargs["harmful_field"] or [])
    cfg["normal_fields"] = parse_field_mapping(kwargs["normal_field"] or [])
    cfg["target_modules"] = module_names(kwargs["target_modules"])
    cfg["max_grad_norm"] = kwargs["max_grad_norm"] or None
    return cfg


def _finish(report: Any) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        report_padding(report)
        done(report.out)


def sku(
    normal: _Normal,
    eps_gd: Annotated[float, _opt("ε1: weight of guided distortion L_GD (CE on harmful responses).")] = 0.5,
    eps_rd: Annotated[
        float, _opt("ε2: weight of random disassociation L_RD (CE on K other responses).")
    ] = 1.0,
    eps_pd: Annotated[float, _opt("ε3: weight of preservation divergence L_PD = −KL(p_θo ‖ p_θh).")] = 1.0,
    k: _K = 5,
    **shared: Any,
) -> None:
    """SKU stage 1: train the harmful module θh on ε1·L_GD + ε2·L_RD + ε3·L_PD (arXiv 2402.10058).

    Then negate it: excise ops negate --adapter OUT --lam λ --out NEGATED (with --full:
    excise ops negate --base BASE --adapter OUT --lam λ --out NEGATED). Writes the adapter,
    loss_log.json (gd, rd, pd per step) and train_config.json into OUT.
    """
    from excise.train.sku import SkuConfig, run

    cfg = SkuConfig(normal=normal, eps_gd=eps_gd, eps_rd=eps_rd, eps_pd=eps_pd, k=k, **_shared_config(shared))
    _finish(run(cfg, progress=shared["progress"]))


def _baseline(method: str, shared: dict[str, Any], **own: Any) -> None:
    from excise.train.baselines import BaselineConfig, run

    cfg = BaselineConfig(method=method, **own, **_shared_config(shared))
    _finish(run(cfg, progress=shared["progress"]))


def ga(**shared: Any) -> None:
    """Gradient ascent on harmful responses: minimise −NLL (logged as nll, which rises)."""
    _baseline("ga", shared)


def ga_mismatch(
    ga_weight: _GaWeight = 0.5,
    mismatch_weight: _MismatchWeight = 1.0,
    k: _K = 5,
    mismatch_pool: _MismatchPool = None,
    normal: Annotated[str | None, _opt(_NORMAL_HELP + " Needed unless --mismatch-pool harmful.")] = None,
    **shared: Any,
) -> None:
    """GA + random mismatch: w_ga·(−NLL harmful) + w_mm·CE(K responses of other prompts)."""
    _baseline(
        "ga_mismatch",
        shared,
        ga_weight=ga_weight,
        mismatch_weight=mismatch_weight,
        k=k,
        mismatch_pool=mismatch_pool,
        normal=normal,
    )


def llmu(
    normal: _Normal,
    ga_weight: _GaWeight = 0.5,
    mismatch_weight: _MismatchWeight = 1.0,
    kl_weight: Annotated[float, _opt("Weight of KL(p_θo ‖ p_θ) on normal data (minimised).")] = 1.0,
    k: _K = 5,
    mismatch_pool: _MismatchPool = None,
    **shared: Any,
) -> None:
    """LLMU: GA + random mismatch + KL to the original model on normal data (arXiv 2310.10683)."""
    _baseline(
        "llmu",
        shared,
        normal=normal,
        ga_weight=ga_weight,
        mismatch_weight=mismatch_weight,
        kl_weight=kl_weight,
        k=k,
        mismatch_pool=mismatch_pool,
    )


def finetune(**shared: Any) -> None:
    """Fine-tune on the safe responses to the harmful prompts (SFT baseline)."""
    _baseline("finetune", shared)


def npo(
    npo_beta: Annotated[float, _opt("NPO's inverse temperature β (> 0).")] = 0.1,
    retain_weight: Annotated[
        float, _opt("Weight of the NLL of the --normal answers: 0 is NPO, > 0 NPO + RT.")
    ] = 0.0,
    normal: Annotated[str | None, _opt(_NORMAL_HELP + " Needed with --retain-weight > 0.")] = None,
    **shared: Any,
) -> None:
    """NPO: −(2/β)·E log σ(−β·log(πθ/πref)) on the harmful answers (arXiv 2404.05868).

    The reference πref is the model with the adapter disabled (a frozen copy with --full).
    """
    _baseline("npo", shared, npo_beta=npo_beta, retain_weight=retain_weight, normal=normal)


# `excise train VERB`, in --help order.
COMMANDS: dict[str, Callable[..., None]] = {
    "sku": _with_shared_flags(sku),
    "ga": _with_shared_flags(ga),
    "ga-mismatch": _with_shared_flags(ga_mismatch),
    "llmu": _with_shared_flags(llmu),
    "finetune": _with_shared_flags(finetune),
    "npo": _with_shared_flags(npo),
}
