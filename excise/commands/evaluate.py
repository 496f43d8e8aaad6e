"""`excise eval`: truthfulness, hallucination, toxicity, harmful rate, utility, perplexity, likelihoods.

One command per metric of ``excise.evaluate.metrics.METRICS`` (DESIGN.md §3). Each takes the
shared options (model, adapter, data, limit, batch size, output, cache) plus the ones its metric
uses (generation, judge, reference model, window); the flags are the fields of
:class:`excise.evaluate.config.EvalConfig`. Heavy imports stay inside the command body.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from excise.commands import judge as judge_commands
from excise.commands.common import OverwriteResult, Progress, Threads, done, hide_library_bars
from excise.evaluate.config import DEFAULT_REFUSAL

app = typer.Typer(
    help="Evaluate a base model (optionally with an adapter): truthfulness, hallucination, toxicity, "
    "harmful rate, utility, perplexity.",
    epilog="Data-parallel, same result file as one process: "
    "accelerate launch --num_processes N -m excise eval METRIC ... (docs/EVALUATION.md).",
    no_args_is_help=True,
)

_P = inspect.Parameter


def _opt(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return _P(name, _P.KEYWORD_ONLY, annotation=annotation, default=default)


_COMMON = [
    _opt(
        "base",
        Annotated[str, typer.Option("--base", help="Base MODEL: alias, .gguf, folder or hub id.")],
        ...,
    ),
    _opt("out", Annotated[Path, typer.Option("--out", help="Result JSON file (written atomically).")], ...),
    _opt(
        "adapter",
        Annotated[
            str | None,
            typer.Option(
                help="PEFT adapter on the base model: folder, or hub id org/name or org/name@revision."
            ),
        ],
        None,
    ),
    _opt(
        "merge",
        Annotated[
            bool,
            typer.Option(
                "--merge",
                help="Merge the LoRA into the weights (for LoRAs on many layers; r 8 on q/v saves nothing).",
            ),
        ],
        False,
    ),
    _opt(
        "data",
        Annotated[str | None, typer.Option(help="Data file or hub id; default: the metric's own.")],
        None,
    ),
    _opt(
        "field",
        Annotated[list[str], typer.Option("--field", help="Map a field: NAME=COLUMN (repeatable).")],
        [],
    ),
    _opt(
        "limit",
        Annotated[
            int | None,
            typer.Option(
                help="Evaluate N items: a seeded subsample (smallest hash of seed and item, in file "
                "order), the same for every model."
            ),
        ],
        None,
    ),
    _opt("head", Annotated[int | None, typer.Option(help="Evaluate the first N items instead.")], None),
    _opt(
        "split",
        Annotated[
            str | None,
            typer.Option(
                help="`eval` (held-out prompt side) or `all`. Default: `eval` for the metric's own data and "
                "for a file the adapter was trained on (its train_config.json), else `all`.",
                show_default=False,
            ),
        ],
        None,
    ),
    _opt(
        "allow_overlap",
        Annotated[
            bool,
            typer.Option(
                "--allow-overlap",
                help="Evaluate items whose prompt the adapter (or an excise ops input) was trained on, "
                "or whose training data cannot be checked: a warning kept in the result, not an error.",
            ),
        ],
        False,
    ),
    _opt("seed", Annotated[int, typer.Option(help="Seed (recorded; greedy decoding does not use it).")], 0),
    _opt("batch_size", Annotated[int, typer.Option(help="Rows per forward pass.")], 16),
    _opt(
        "dtype",
        Annotated[
            str,
            typer.Option(
                help="`float32` (default: exact) or `bfloat16`: generation ≈ 2× faster on GPUs and on CPUs "
                "with AVX512-BF16/AMX (slower without); greedy answers differ (docs/EVALUATION.md, "
                "Faster generation)."
            ),
        ],
        "float32",
    ),
    _opt("device", Annotated[str, typer.Option(help="`auto` (CUDA if present), `cpu`, `cuda`…")], "auto"),
    _opt(
        "no_cache",
        Annotated[
            bool,
            typer.Option("--no-cache", help="Recompute (and regenerate) even if a cached result exists."),
        ],
        False,
    ),
    _opt("overwrite", OverwriteResult, False),
    _opt("threads", Threads, None),
    _opt("progress", Progress, True),
]
_SCORING = [
    _opt(
        "share_prefix",
        Annotated[
            bool, typer.Option(help="Compute the prompt prefix common to all rows once (same numbers).")
        ],
        True,
    ),
]


def _template(default: str) -> inspect.Parameter:
    return _opt(
        "template",
        Annotated[
            str | None,
            typer.Option(
                help="Template prompts are rendered in, as training renders them: chat, alpaca, tulu, "
                f"question-answer, plain (default: {default}); give the one the adapter was trained in."
            ),
        ],
        None,
    )


_GENERATION = [
    _opt("max_new_tokens", Annotated[int, typer.Option(help="Generation length limit.")], 128),
    _opt(
        "chat",
        Annotated[
            bool | None, typer.Option("--chat/--no-chat", help="Use the chat template; default per metric.")
        ],
        None,
    ),
    _template("the metric's own: chat, or raw with --no-chat"),
    _opt(
        "system", Annotated[str | None, typer.Option(help="System prompt for chat-templated prompts.")], None
    ),
]


_LIKELIHOOD = [
    _opt(
        "chat",
        Annotated[
            bool | None,
            typer.Option(
                "--chat/--no-chat", help="Score in the chat template (default) or, --no-chat, plain."
            ),
        ],
        None,
    ),
    _template("chat, plain with --no-chat"),
    _opt("system", Annotated[str | None, typer.Option(help="System prompt (as at training).")], None),
    _opt(
        "reference",
        Annotated[
            str | None,
            typer.Option(
                help="MODEL the differences are taken against (default: the base, adapter off; none without "
                "an adapter)."
            ),
        ],
        None,
    ),
    *_SCORING,
]
_PAIR_FIELDS = [
    _opt(
        f"{name}_field",
        Annotated[str | None, typer.Option(help=f"Column of the {what} (same as --field {name}=COLUMN).")],
        None,
    )
    for name, what in (
        ("prompt", "prompt"),
        ("chosen", "preferred answer"),
        ("rejected", "dispreferred answer"),
    )
]


# halueval and pairs: the format controls training applies to a pair (excise.data.examples.controlled_pair).
_PAIR_CONTROLS = [
    _opt(
        "pair_max_word_ratio",
        Annotated[
            float | None,
            typer.Option(help="Keep pairs whose longer answer has ≤ R × the shorter's words."),
        ],
        None,
    ),
    _opt(
        "pair_strip_period",
        Annotated[bool, typer.Option("--pair-strip-period", help="Drop a final period from both.")],
        False,
    ),
]


def _judge(default: str | None) -> list[inspect.Parameter]:
    what = f"default: {default}" if default else "default: none"
    return [
        _opt(
            "judge",
            Annotated[str | None, typer.Option(help=f"Judge spec ({what}); see docs/JUDGES.md.")],
            None,
        ),
        _opt(
            "judge_option",
            Annotated[list[str], typer.Option("--judge-option", help="Judge option KEY=VALUE (repeatable).")],
            [],
        ),
    ]


_EXTRA: dict[str, list[inspect.Parameter]] = {
    "truthfulqa-mc": [
        _opt(
            "chat",
            Annotated[
                bool | None,
                typer.Option(
                    "--chat/--no-chat",
                    help="Score each choice as the assistant's reply in the chat template "
                    "(lm-eval --apply_chat_template); default: lm-eval's raw 6-shot primer.",
                ),
            ],
            None,
        ),
        _template(
            "lm-eval's raw 6-shot primer; any other scores each choice as the answer to the bare question"
        ),
        _opt(
            "system",
            Annotated[
                str | None, typer.Option(help="System prompt with --chat (lm-eval --system_instruction).")
            ],
            None,
        ),
        *_SCORING,
    ],
    "truthfulqa-gen": _GENERATION + _judge(None),
    "halueval": [
        _opt(
            "protocol",
            Annotated[str, typer.Option(help="`judge` (HaluEval Yes/No) or `loss` (Ext-Sub answer loss).")],
            "judge",
        ),
        _opt(
            "chat",
            Annotated[
                bool | None, typer.Option("--chat/--no-chat", help="Use the chat template (default: yes).")
            ],
            None,
        ),
        _template("chat, raw with --no-chat"),
        _opt("system", Annotated[str | None, typer.Option(help="Replace HaluEval's system prompt.")], None),
        *_PAIR_CONTROLS,
        *_SCORING,
    ],
    "toxicity": _GENERATION + _judge("toxicity-probe"),
    "repetition": _GENERATION,
    "harmful-rate": _GENERATION + _judge("harm-lm"),
    "utility": [
        *_GENERATION,
        _opt(
            "reference",
            Annotated[
                str | None,
                typer.Option(
                    help="Original MODEL: fluency is measured under it (default: the base, adapter off); "
                    "required without --adapter, then also what similarity compares with."
                ),
            ],
            None,
        ),
        *_SCORING,
    ],
    "pairs": [
        *_LIKELIHOOD,
        *_PAIR_FIELDS,
        *_PAIR_CONTROLS,
    ],
    "answer-nll": _LIKELIHOOD,
    "refusal-logprob": [
        *_LIKELIHOOD,
        _opt(
            "refusal",
            Annotated[str, typer.Option(help="The refusal sentence whose log-probability is read.")],
            DEFAULT_REFUSAL,
        ),
    ],
    "perplexity": [
        _opt("window", Annotated[int, typer.Option(help="Tokens per window.")], 1024),
        _opt("stride", Annotated[int, typer.Option(help="Tokens each window advances by.")], 512),
    ],
}


def _config(flags: dict[str, Any]) -> Any:
    """The :class:`EvalConfig` of the remaining flags (``--field`` and ``--judge-option`` parsed)."""
    from excise.errors import ConfigError
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.judges import parse_options
    from excise.hub import resolve_adapter

    fields = {}
    for name in ("prompt", "chosen", "rejected"):  # `pairs`: --prompt-field etc. are --field NAME=COLUMN
        column = flags.pop(f"{name}_field", None)
        if column is not None:
            flags.setdefault("field", []).append(f"{name}={column}")
    for item in flags.pop("field", []):
        key, sep, column = item.partition("=")
        if not sep or not key.strip() or not column.strip():
            raise ConfigError(f"--field {item!r} is not NAME=COLUMN (e.g. question=Question)")
        fields[key.strip()] = column.strip()
    if flags.get("adapter") is not None:
        flags["adapter"] = resolve_adapter(flags["adapter"])
    judge_options = parse_options(flags.pop("judge_option", []))
    return EvalConfig(model=flags.pop("base"), fields=fields, judge_options=judge_options, **flags)


def _show(record: dict[str, Any], path: Path) -> None:
    from rich.console import Console

    from excise.evaluate.report import summary_table

    Console(stderr=True).print(summary_table(record))
    done(path)


def _run(name: str, **flags: Any) -> None:
    from excise.evaluate.parallel import is_main, processes
    from excise.evaluate.runner import check_result_path, plan, run_eval, write_result
    from excise.runtime import set_threads

    out, no_cache, overwrite = flags.pop("out"), flags.pop("no_cache"), flags.pop("overwrite")
    set_threads(flags.pop("threads"))
    check_result_path(out, overwrite=overwrite)  # before anything loads
    progress = flags.pop("progress")
    if not progress:
        hide_library_bars()
    cfg = _config(flags)
    # Under `accelerate launch` the processes share the items; the first one reports and writes.
    with processes():
        _models_once(cfg.model, cfg.reference)
        line = plan(name, cfg, use_cache=not no_cache)
        if is_main():
            typer.echo(line, err=True)
        record = run_eval(name, cfg, use_cache=not no_cache, progress=progress)
        if is_main():
            _show(record, write_result(record, out, overwrite=overwrite))


def _models_once(*specs: str | None) -> None:
    """Resolve the models on the first process before the others (under ``accelerate launch``), so
    that one converted into the cache on first use (a GGUF alias) is converted once."""
    from excise.evaluate.parallel import main_first
    from excise.models import resolve_model

    with main_first():
        for spec in specs:
            if spec:
                resolve_model(spec)


def _make_command(name: str, summary: str) -> Any:
    params = _COMMON + _EXTRA[name]

    def command(**flags: Any) -> None:
        _run(name, **flags)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = summary
    command.__name__ = name.replace("-", "_")
    return command


# The registry's names and summaries, written out so `excise --help` imports no torch.
_COMMANDS = {
    "truthfulqa-mc": "TruthfulQA MC1/MC2 by choice log-likelihood, same prompt and rule as lm-eval.",
    "truthfulqa-gen": "TruthfulQA generation, judged by lm-eval's BLEU/ROUGE reference rule (or --judge).",
    "halueval": "HaluEval QA: accuracy judging right vs hallucinated answers (Yes/No by log-likelihood).",
    "toxicity": "Toxicity of answers to Ext-Sub's toxic instructions: mean judge score and share > 0.8.",
    "repetition": "1..4-gram repetition of generated answers (mean over generations, as Ext-Sub).",
    "harmful-rate": "Share of answers to held-out harmful prompts that a judge flags (SKU).",
    "utility": "Diversity, fluency (perplexity under the original model), similarity to its answers (SKU).",
    "perplexity": "Sliding-window perplexity on normal text (wikitext-2 raw test by default).",
    "pairs": "Chosen vs rejected answer likelihood, win rate; forget, retain, selectivity vs a reference.",
    "answer-nll": "NLL of held-out normal answers (Alpaca) and its change vs a reference: general retain.",
    "refusal-logprob": "Log-probability of a fixed refusal sentence per prompt, vs a reference (judge-free).",
}

for _name, _summary in _COMMANDS.items():
    app.command(_name)(_make_command(_name, _summary))


# `excise eval multi`: the flags of every metric but the per-metric ones (judge) and --merge (utility
# needs the adapter switchable). --data and --field, when given, apply to every metric.
_MULTI_SKIP = {"out", "merge", "judge", "judge_option"}


def _multi_params() -> list[inspect.Parameter]:
    seen: dict[str, inspect.Parameter] = {}
    for p in _COMMON + [p for extra in _EXTRA.values() for p in extra]:
        if p.name not in _MULTI_SKIP and p.name not in seen:
            seen[p.name] = p
    metrics = _opt(
        "metrics",
        Annotated[
            str,
            typer.Option(
                help=f"Comma-separated metrics, e.g. truthfulqa-mc,perplexity ({', '.join(_COMMANDS)})."
            ),
        ],
        ...,
    )
    out_dir = _opt(
        "out_dir",
        Annotated[
            Path, typer.Option("--out-dir", help="Folder for one result file per metric (METRIC.json).")
        ],
        ...,
    )
    return [seen.pop("base"), metrics, out_dir, *seen.values()]


def multi(**flags: Any) -> None:
    """Several metrics on one model load, each with its own judge (and data, unless --data)."""
    from excise.errors import ConfigError
    from excise.evaluate.parallel import is_main, processes
    from excise.evaluate.runner import check_result_path, run_many, write_result
    from excise.runtime import set_threads

    names = [n.strip() for n in flags.pop("metrics").split(",") if n.strip()]
    unknown = [n for n in names if n not in _COMMANDS]
    if not names or unknown:
        raise ConfigError(
            f"--metrics: unknown {', '.join(unknown) or '(none given)'}; choose from: {', '.join(_COMMANDS)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"--metrics names a metric twice: {', '.join(names)}")
    out_dir, no_cache, overwrite = flags.pop("out_dir"), flags.pop("no_cache"), flags.pop("overwrite")
    set_threads(flags.pop("threads"))
    progress = flags.pop("progress")
    if not progress:
        hide_library_bars()
    paths = {name: out_dir / f"{name}.json" for name in names}
    for path in paths.values():
        check_result_path(path, overwrite=overwrite)
    cfg = _config(flags)
    with processes():
        _models_once(cfg.model, cfg.reference)
        records = run_many(names, cfg, use_cache=not no_cache, progress=progress)
        if not is_main():
            return
    for name, record in zip(names, records, strict=True):
        _show(record, write_result(record, paths[name], overwrite=overwrite))


multi.__signature__ = inspect.Signature(_multi_params())  # type: ignore[attr-defined]
app.command("multi")(multi)


def judge(
    generations: Annotated[
        Path,
        typer.Option(
            help="A result file of toxicity, harmful-rate or truthfulqa-gen: its answers are judged again.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Result JSON file (written atomically).", show_default=False)],
    judge: Annotated[
        str | None,
        typer.Option("--judge", help="Judge spec (default: the metric's own); see docs/JUDGES.md."),
    ] = None,
    judge_option: Annotated[
        list[str], typer.Option("--judge-option", help="Judge option KEY=VALUE (repeatable).")
    ] = [],  # noqa: B006
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute even if cached.")] = False,
    overwrite: OverwriteResult = False,
    threads: Threads = None,
    progress: Progress = True,
) -> None:
    """Score saved answers with another judge, without loading the model (only its tokenizer)."""
    from excise.evaluate.parallel import is_main, processes
    from excise.evaluate.runner import check_result_path, judge_saved, write_result
    from excise.runtime import set_threads

    set_threads(threads)
    check_result_path(out, overwrite=overwrite)
    with processes():
        _models_once(_saved_model(generations))
        record = judge_saved(generations, judge, judge_option, use_cache=not no_cache, progress=progress)
        if is_main():
            _show(record, write_result(record, out, overwrite=overwrite))


app.command("judge")(judge)
# lm-evaluation-harness and the judges' own training and checks (excise/commands/judge.py).
app.command("harness")(judge_commands.harness)
app.command("judge-train")(judge_commands.judge_train)
app.command("judge-check")(judge_commands.judge_check)


def _saved_model(generations: Path) -> str | None:
    """The model a result file names, or None (``judge_saved`` reports a bad file)."""
    import json

    try:
        return json.loads(Path(generations).read_text())["settings"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
