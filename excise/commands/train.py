"""`excise train`: expert / anti-expert SFT, SKU harmful-knowledge acquisition, unlearning baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from excise.commands import common as flags
from excise.commands import unlearn
from excise.commands.common import (
    GradientCheckpointing,
    GroupByLength,
    Overwrite,
    done,
    module_names,
    report_padding,
)

app = typer.Typer(
    help="Train adapters: expert / anti-expert SFT, SKU harmful-knowledge acquisition, unlearning baselines.",
    no_args_is_help=True,
)

_FORMAT_HELP = (
    "Loader and side: instruction (instruction/input/output), paired-expert / paired-anti (HaluEval "
    "question with right_answer / hallucinated_answer), harmful / safe (PKU-SafeRLHF response[1] / "
    "response[0], HH-RLHF rejected / chosen), text (plain text)."
)


@app.command("sft")
def sft(
    base: Annotated[
        str, typer.Option(help="Base MODEL: alias (smollm2-135m-instruct), folder, .gguf or hub id.")
    ],
    data: Annotated[str, typer.Option(help="DATA: .json/.jsonl/.csv file, dataset folder or hub id.")],
    out: Annotated[Path, typer.Option(help="Output adapter folder (written atomically).")],
    format: Annotated[str, typer.Option("--format", help=_FORMAT_HELP)] = "instruction",
    field: Annotated[
        list[str] | None,
        typer.Option(help="Map a role to a column, NAME=COLUMN (repeatable), e.g. prompt=question, input=."),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(
            help="Prompt template: chat, alpaca, tulu, question-answer, plain. \\[default: chat; text: plain]"
        ),
    ] = None,
    system: flags.System = None,
    split: Annotated[
        str, typer.Option(help="Prompt-hash split side to train on: train (60%), judge, eval, or all.")
    ] = "train",
    limit: Annotated[int | None, typer.Option(help="Read only the first N rows.")] = None,
    max_examples: Annotated[int | None, typer.Option(help="Train on at most N examples.")] = None,
    pair_max_word_ratio: Annotated[
        float | None,
        typer.Option(help="Paired formats: keep pairs whose longer answer has ≤ R × the shorter's words."),
    ] = None,
    pair_strip_period: Annotated[
        bool,
        typer.Option("--pair-strip-period", help="Paired formats: drop a final period from both answers."),
    ] = False,
    max_length: Annotated[int, typer.Option(help="Max tokens per example; longer responses are cut.")] = 512,
    full: Annotated[bool, typer.Option("--full", help="Train all weights instead of a LoRA.")] = False,
    lora_r: flags.LoraR = 8,
    lora_alpha: flags.LoraAlpha = 16.0,
    lora_dropout: flags.LoraDropout = 0.05,
    target_modules: flags.TargetModules = "q_proj,v_proj",
    rslora: flags.Rslora = False,
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps. \\[default: 100 unless --epochs]")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data, instead of --steps.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch (per process).")] = 4,
    grad_accum: flags.GradAccum = 1,
    lr: flags.Lr = 2e-4,
    schedule: flags.Schedule = "linear",
    warmup_steps: flags.WarmupSteps = 0,
    weight_decay: flags.WeightDecay = 0.0,
    max_grad_norm: flags.MaxGradNorm = 1.0,
    seed: Annotated[int, typer.Option(help="Seeds the LoRA init, data order and dropout.")] = 0,
    bf16: Annotated[
        bool,
        typer.Option(
            "--bf16",
            help="bfloat16 autocast (weights stay float32). GPUs: only where supported. CPUs: works "
            "everywhere, but without bf16 instructions (AVX512-BF16, AMX) it is much slower than float32.",
        ),
    ] = False,
    group_by_length: GroupByLength = True,
    packing: Annotated[
        bool,
        typer.Option(
            "--packing",
            help="Pack several examples into each row of --max-length tokens (--batch-size rows per "
            "micro-batch): no padding; each example attends only to itself on models whose mask "
            "transformers builds from position ids (Llama, Qwen, Mistral, SmolLM2…).",
        ),
    ] = False,
    gradient_checkpointing: GradientCheckpointing = False,
    eval_data: Annotated[
        str | None,
        typer.Option(
            help="Validation DATA (same --format and --field as --data): val_loss in loss_log.json."
        ),
    ] = None,
    eval_every: Annotated[
        int, typer.Option(help="Steps between validation losses (and after the last).")
    ] = 25,
    eval_limit: Annotated[int, typer.Option(help="Validation examples used (the first N).")] = 100,
    save_every: flags.SaveEvery = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in OUT (none: start).")
    ] = False,
    overwrite: Overwrite = False,
    progress: flags.Progress = True,
    threads: flags.Threads = None,
) -> None:
    """Fine-tune a LoRA (expert or anti-expert) on (prompt, response) data; the loss covers responses only.

    Writes a PEFT adapter, loss_log.json and train_config.json into OUT. Several processes:
    accelerate launch --num_processes N -m excise train sft ...
    """
    from excise.data import parse_field_mapping
    from excise.runtime import set_threads
    from excise.train.sft import SftConfig, run

    set_threads(threads)
    if not progress:
        flags.hide_library_bars()  # also the model-loading bars

    cfg = SftConfig(
        base=base, data=data, out=out, format=format, fields=parse_field_mapping(field or []),
        template=template, system=system, split=split, limit=limit, max_examples=max_examples,
        pair_max_word_ratio=pair_max_word_ratio, pair_strip_period=pair_strip_period,
        max_length=max_length, full=full, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, target_modules=module_names(target_modules),
        rslora=rslora, steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        schedule=schedule, warmup_steps=warmup_steps, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm or None, seed=seed, bf16=bf16, save_every=save_every,
        gradient_checkpointing=gradient_checkpointing, group_by_length=group_by_length, packing=packing,
        eval_data=eval_data, eval_every=eval_every, eval_limit=eval_limit,
        resume=resume, overwrite=overwrite,
    )  # fmt: skip
    report = run(cfg, progress=progress)
    from accelerate import PartialState

    if PartialState().is_main_process:
        report_padding(report)
        done(report.out)


# SKU and the unlearning baselines (excise/commands/unlearn.py).
for _name, _command in unlearn.COMMANDS.items():
    app.command(_name)(_command)
