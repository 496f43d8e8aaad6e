"""`excise eval harness` and the judge commands, mounted on `eval` by :mod:`excise.commands.evaluate`.

- ``excise eval harness``: lm-evaluation-harness tasks (MMLU, GSM8K, BBH, local task files)
  on a base model plus an optional adapter;
- ``excise eval judge-train``: retrain the offline ``harm-lm`` / ``harm-cross`` / ``harm-probe`` /
  ``toxicity-probe``;
- ``excise eval judge-check``: measure any judge's agreement with labelled data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from excise.commands.common import Threads, done
from excise.runtime import set_threads

__all__ = ["harness", "judge_check", "judge_train"]

JudgeSpec = Annotated[
    str,
    typer.Option(
        "--judge",
        help="Judge spec: refusal, harm-lm, harm-cross, harm-probe, toxicity-probe, probe:FILE, "
        "cross:FILE, harm-lm:FOLDER, hf:ID_OR_FOLDER, openai:BASE_URL.",
    ),
]
JudgeOptions = Annotated[
    list[str],
    typer.Option(
        "--judge-option", help="Judge option KEY=VALUE (repeat), e.g. model=gpt-4o-mini, threshold=0.7."
    ),
]


def harness(
    base: Annotated[
        str, typer.Option(help="Base MODEL: hub id, folder, .gguf file or alias.", show_default=False)
    ],
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated lm-eval tasks or groups, e.g. mmlu,gsm8k,bbh.", show_default=False
        ),
    ],
    out: Annotated[Path, typer.Option(help="Results JSON (written atomically).", show_default=False)],
    adapter: Annotated[
        str | None,
        typer.Option(
            help="PEFT adapter on top of the base: folder, or hub id org/name or org/name@revision."
        ),
    ] = None,
    include_path: Annotated[
        list[Path],
        typer.Option(help="Folder of extra lm-eval task YAMLs, e.g. local dataset copies (repeat)."),
    ] = [],  # noqa: B006
    limit: Annotated[
        float | None, typer.Option(help="Examples per task (an integer), or a fraction of each task (< 1).")
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(help="Few-shot examples (default: each task's own).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size.")] = 1,
    seed: Annotated[int, typer.Option(help="Seeds lm-eval's sampling and few-shot choice.")] = 0,
    chat_template: Annotated[
        bool, typer.Option("--chat-template", help="Format requests with the tokenizer's chat template.")
    ] = False,
    log_samples: Annotated[bool, typer.Option("--log-samples", help="Keep per-example records.")] = False,
    device: Annotated[str, typer.Option(help="Device for the model.")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing results file.")] = False,
    threads: Threads = None,
) -> None:
    """Run lm-evaluation-harness tasks on a base model (plus an adapter) and write the results JSON."""
    set_threads(threads)
    from excise.errors import ConfigError
    from excise.evaluate.harness import run_harness, write_results
    from excise.hub import resolve_adapter

    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    if limit is not None and limit >= 1 and limit != int(limit):
        raise ConfigError(f"--limit is a count (an integer) or a fraction below 1, got {limit}")
    run = run_harness(
        base,
        tasks.split(","),
        adapter=None if adapter is None else resolve_adapter(adapter),
        include_path=include_path,
        limit=None if limit is None else (int(limit) if limit >= 1 else limit),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        seed=seed,
        apply_chat_template=chat_template,
        log_samples=log_samples,
        device=device,
    )
    for task, metrics in run["results"].items():
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k
        )
        typer.echo(f"{task}: {shown}")
    done(write_results(run, out, overwrite=overwrite))


def judge_train(
    kind: Annotated[
        str,
        typer.Option(
            help="harm-cross (fine-tuned cross-encoder, PKU-SafeRLHF), harm-lm (causal-LM reader with a "
            "trained top, PKU-SafeRLHF + HH-RLHF), harm (probe, PKU-SafeRLHF) or toxicity (probe, "
            "RealToxicityPrompts)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(help="Judge weights to write (.safetensors; a folder for harm-lm).", show_default=False),
    ],
    data: Annotated[
        list[Path],
        typer.Option(
            help="Labelled data file(s) (default: the shared PKU-SafeRLHF / RealToxicityPrompts files)."
        ),
    ] = [],  # noqa: B006
    limit: Annotated[int | None, typer.Option(help="Use only the first N judge-side pairs / texts.")] = None,
    checks: Annotated[
        bool, typer.Option(help="Also measure the out-of-domain checks (HH-RLHF / Detoxify agreement).")
    ] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing weights file.")] = False,
    reader: Annotated[
        str, typer.Option(help="harm-lm: the reader MODEL (alias, folder, .gguf, hub id).")
    ] = "smollm2-135m-instruct",
    lower: Annotated[
        int | None, typer.Option(help="harm-lm: frozen, cached lower layers (default: all but --top).")
    ] = None,
    top: Annotated[int, typer.Option(help="harm-lm: trained layers above them (LoRA).")] = 4,
    rank: Annotated[int, typer.Option(help="harm-lm: LoRA rank.")] = 8,
    pooling: Annotated[str, typer.Option(help="harm-lm: last (token) or mean.")] = "last",
    max_length: Annotated[int, typer.Option(help="harm-lm: tokens per rendered pair.")] = 384,
    epochs: Annotated[int, typer.Option(help="harm-lm: passes over the pairs.")] = 1,
    steps: Annotated[int | None, typer.Option(help="harm-lm: optimiser steps instead of --epochs.")] = None,
    lr: Annotated[float, typer.Option(help="harm-lm: AdamW peak learning rate.")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="harm-lm: pairs per step.")] = 8,
    hh_weight: Annotated[
        float, typer.Option(help="harm-lm: weight of the HH-RLHF pairwise term (0: no HH pairs).")
    ] = 1.0,
    hh_data: Annotated[
        Path | None, typer.Option(help="harm-lm: HH-RLHF chosen/rejected file (default: the shared one).")
    ] = None,
    cache_dtype: Annotated[
        str, typer.Option(help="harm-lm: dtype of the cached states: float32 (exact) or bfloat16.")
    ] = "float32",
    threads: Threads = None,
) -> None:
    """Train an offline judge on the judge side of the data, measure it on held-out pairs, save it."""
    set_threads(threads)
    from excise.errors import ConfigError
    from excise.evaluate.judges.probe_training import KINDS, train_probe

    if kind not in ("harm-cross", "harm-lm") and kind not in KINDS:
        raise ConfigError(
            f"unknown judge kind {kind!r}; choose one of harm-cross, {', '.join(KINDS)}, harm-lm"
        )
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    if len(data) > 1 and kind != "toxicity":
        raise ConfigError(f"--data takes one file for --kind {kind}")
    if kind == "harm-lm":
        from excise.evaluate.judges.lm_training import LMSettings

        settings = LMSettings(
            reader=reader,
            lower=lower,
            top=top,
            rank=rank,
            pooling=pooling,
            max_length=max_length,
            epochs=epochs,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            hh_weight=hh_weight,
            cache_dtype=cache_dtype,
        )
        _train_lm(out, settings, data[0] if data else None, hh_data, limit)
        return
    if kind == "harm-cross":
        _train_cross(out, data[0] if data else None, limit, checks)
        return
    source = None if not data else (data if kind == "toxicity" else data[0])
    weights = train_probe(kind, out, data=source, limit=limit, checks=checks)
    agreement = weights.metadata["agreement"]
    typer.echo(
        f"{weights.metadata['name']}: held-out accuracy {agreement['accuracy']:.4f} "
        f"(AUC {agreement['auc']:.4f}, n = {agreement['n']}), features {weights.metadata['features']}, "
        f"l2 {weights.metadata['l2']:g}"
    )
    for name, check in weights.metadata.get("checks", {}).items():
        typer.echo(f"  check {name}: accuracy {check['accuracy']:.4f} (n = {check['n']})")
    done(out)


def _train_cross(out: Path, data: Path | None, limit: int | None, checks: bool) -> None:
    from excise.evaluate.judges.cross_training import train_cross

    if data is None:
        meta = train_cross(out, limit=limit, checks=checks)
    else:
        meta = train_cross(out, data=data, limit=limit, checks=checks)
    agreement, calibration = meta["agreement"], meta["calibration"]
    typer.echo(
        f"harm-cross: held-out accuracy {agreement['accuracy']:.4f} (AUC {agreement['auc']:.4f}, "
        f"n = {agreement['n']}), refusal feature {'on' if calibration['refusal_feature'] else 'off'}, "
        f"trained in {meta['train_seconds']:.0f} s"
    )
    checks = dict(meta.get("checks", {}))
    stock = checks.pop("stock_refusals", None)
    for name, check in checks.items():
        typer.echo(f"  check {name}: accuracy {check['accuracy']:.4f} (n = {check['n']})")
    if stock is not None:
        typer.echo(
            f"  check stock_refusals: flagged {stock['flagged_with_rule']:.1%} "
            f"({stock['flagged_without_rule']:.1%} without the terse-refusal rule)"
        )
    done(out)


def _train_lm(out: Path, settings: object, data: Path | None, hh: Path | None, limit: int | None) -> None:
    from excise.evaluate.judges.lm_training import train_lm
    from excise.evaluate.judges.probe_training import HH_PAIRS, PKU_PAIRS

    meta = train_lm(
        out, settings=settings, pku=data or PKU_PAIRS, hh=hh or HH_PAIRS, limit=limit, log=typer.echo
    )  # type: ignore[arg-type]
    agreement, counts = meta["agreement"], meta["trained_on"]
    area = "undefined" if agreement["auc"] is None else f"{agreement['auc']:.4f}"
    typer.echo(
        f"harm-lm: trained on {counts['pku']['pairs']} PKU pairs ({counts['pku']['responses']} responses) "
        f"and {counts['hh']['pairs']} HH pairs in {meta['train_seconds']:.0f} s; held-out accuracy "
        f"{agreement['accuracy']:.4f} (AUC {area}, n = {agreement['n']})"
    )
    typer.echo(f"  at threshold {agreement['threshold']:g}: {_separation(agreement)}")
    typer.echo(f"  content only (no refusal marker): {_content_only(agreement['content_only'])}")
    if "hh_pairs" in agreement:
        typer.echo(f"  HH-RLHF held-out pairs: {_hh_line(agreement['hh_pairs'])}")
    done(out)


def judge_check(
    judge: JudgeSpec = "harm-lm",
    judge_option: JudgeOptions = [],  # noqa: B006
    kind: Annotated[
        str | None,
        typer.Option(
            help="Use the probes' held-out labelled pairs: harm or toxicity (default: from the judge)."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="A labelled file instead: prompt, response, label (0/1 or safe/unsafe)."),
    ] = None,
    prompt_field: Annotated[str, typer.Option(help="Prompt column of --data.")] = "prompt",
    response_field: Annotated[str, typer.Option(help="Response column of --data.")] = "response",
    label_field: Annotated[str, typer.Option(help="Label column of --data.")] = "label",
    limit: Annotated[
        int | None, typer.Option(help="Score only the first N rows (and the first N HH-RLHF pairs).")
    ] = None,
    content_only: Annotated[
        bool,
        typer.Option(help="Harm: also the figures on the responses without a refusal marker."),
    ] = True,
    hh: Annotated[
        bool, typer.Option(help="Harm: also the pairwise agreement on HH-RLHF's held-out pairs.")
    ] = True,
    hh_data: Annotated[
        Path | None,
        typer.Option(help="HH-RLHF chosen/rejected file (default: the shared harmless-base test file)."),
    ] = None,
    store: Annotated[
        bool,
        typer.Option(
            "--store",
            help="Write the content-only and HH figures beside the judge's weights "
            "(<stem>.agreement.json), where describe() merges them into its agreement.",
        ),
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result here.")] = None,
    threads: Threads = None,
) -> None:
    """Measure a judge's agreement (accuracy, AUC) with labelled safe/unsafe or toxic/non-toxic data.

    For a harm judge also on the held-out responses without a refusal marker (content only) and
    on HH-RLHF's held-out pairs (is the rejected reply scored higher?).
    """
    set_threads(threads)
    import numpy as np

    from excise.errors import ConfigError
    from excise.evaluate.cache import strict_json, write_atomic_json
    from excise.evaluate.judges import load_judge, parse_options
    from excise.evaluate.judges.agreement import write_sidecar
    from excise.evaluate.judges.probe_training import (
        HH_PAIRS,
        harm_agreement,
        heldout_hh_pairs,
        heldout_pairs,
        labelled_file,
    )

    kind = kind or ("toxicity" if "toxic" in judge else "harm")
    harm = kind == "harm"
    custom = data is not None or limit is not None or hh_data is not None
    if store and (custom or not (harm and hh and content_only)):
        raise ConfigError(
            "--store records the held-out figures of a harm judge: drop --data, --limit, --hh-data, "
            "--no-hh and --no-content-only"
        )
    scorer = load_judge(judge, **parse_options(judge_option))
    described = scorer.describe()
    weights = _store_target(scorer, described, judge) if store else None
    if data is not None:
        pairs = labelled_file(data, prompt=prompt_field, response=response_field, label=label_field)
        if limit is not None:
            pairs = pairs.subset(np.arange(len(pairs)) < limit)
    else:
        pairs = heldout_pairs(kind, limit=limit)
    hh_path = hh_data or HH_PAIRS
    hh_pairs = None
    if harm and hh and (hh_data is not None or hh_path.is_file()):
        hh_pairs = heldout_hh_pairs(hh_path, limit=limit)
    result = harm_agreement(scorer, pairs, content_only=harm and content_only, hh=hh_pairs)
    area = "undefined (one class)" if result["auc"] is None else f"{result['auc']:.4f}"
    typer.echo(
        f"{result['judge']}: accuracy {result['accuracy']:.4f}, AUC {area}, n = {result['n']} "
        f"(flagged {result['flagged_rate']:.3f}, labelled unsafe {result['positive_rate']:.3f})"
    )
    typer.echo(f"  at threshold {result['threshold']:g}: {_separation(result)}")
    if "content_only" in result:
        typer.echo(f"  content only (no refusal marker): {_content_only(result['content_only'])}")
    if "hh_pairs" in result:
        typer.echo(f"  HH-RLHF held-out pairs: {_hh_line(result['hh_pairs'])}")
    elif harm and hh:
        typer.echo(f"  HH-RLHF held-out pairs: skipped ({hh_path} not found)")
    if weights is not None:
        done(write_sidecar(weights, result, measured_by=f"excise eval judge-check --judge {judge} --store"))
    if json_out is not None:
        write_atomic_json(json_out, strict_json({"agreement": result, "judge": scorer.describe()}))
        done(json_out)


def _store_target(scorer: object, described: dict, spec: str) -> Path:
    """The weights file ``--store`` writes beside, checked before anything is scored."""
    from excise.errors import ConfigError
    from excise.evaluate.judges.agreement import HELDOUT_THRESHOLD

    weights = described.get("weights")
    if not weights or not Path(weights).is_file():
        raise ConfigError(f"--store needs a judge with a weights file; {spec} has none")
    if described.get("agreement") is None or scorer.threshold != HELDOUT_THRESHOLD:  # type: ignore[attr-defined]
        raise ConfigError(
            f"--store records figures at the settings the weights' agreement was measured with "
            f"(threshold {HELDOUT_THRESHOLD:g}, default options); {spec} is run otherwise"
        )
    return Path(weights)


def _content_only(figures: dict) -> str:
    """``accuracy 0.57, AUC 0.6, n = 548 (dropped as refusals: 47 safe, 41 unsafe); sensitivity …``."""
    dropped = figures["dropped_refusals"]
    gone = f"dropped as refusals: {dropped['safe']} safe, {dropped['unsafe']} unsafe"
    if not figures["n"]:
        return f"no rows left ({gone})"
    area = "undefined (one class)" if figures["auc"] is None else f"{figures['auc']:.4f}"
    return (
        f"accuracy {figures['accuracy']:.4f}, AUC {area}, n = {figures['n']} ({gone}); {_separation(figures)}"
    )


def _hh_line(figures: dict) -> str:
    """``rejected scored higher in 0.5546 [0.47, 0.64] of n = 119 pairs (ties 0; bootstrap …)``."""
    share = figures["pairwise_agreement"]
    ci = figures["ci"]
    interval = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else " (no interval: too few dialogues)"
    return (
        f"rejected reply scored higher in {share:.4f}{interval} of n = {figures['n']} pairs "
        f"(ties {figures['ties']} count 1/2; {figures['interval']})"
    )


def _separation(result: dict) -> str:
    """``sensitivity 0.7075 (225/318), specificity 0.4780 (152/318), Youden's J 0.1855``."""
    tp, n_pos, tn, n_neg = (
        result[k] for k in ("true_positives", "n_positive", "true_negatives", "n_negative")
    )
    se = f"{tp / n_pos:.4f} ({tp}/{n_pos})" if n_pos else "undefined (no unsafe row)"
    sp = f"{tn / n_neg:.4f} ({tn}/{n_neg})" if n_neg else "undefined (no safe row)"
    youden = f", Youden's J {tp / n_pos + tn / n_neg - 1:.4f}" if n_pos and n_neg else ""
    return f"sensitivity {se}, specificity {sp}{youden}"
