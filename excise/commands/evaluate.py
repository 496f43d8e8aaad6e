"""`excise eval`: truthfulness, hallucination, toxicity, harmful rate, utility, perplexity.

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

app = typer.Typer(
    help="Evaluate a base model (optionally with an adapter): truthfulness, hallucination, toxicity, "
    "harmful rate, utility, perplexity.",
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
        Annotated[bool, typer.Option("--merge", help="Merge the LoRA into the weights (faster).")],
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
    _opt("limit", Annotated[int | None, typer.Option(help="Evaluate the first N items only.")], None),
    _opt(
        "split",
        Annotated[
            str | None,
            typer.Option(
                help="`eval` (the held-out side of the prompt split no trainer uses) or `all`; default per "
                "metric (`eval` for halueval, harmful-rate, utility)."
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
    _opt("dtype", Annotated[str, typer.Option(help="`float32` or `bfloat16`.")], "float32"),
    _opt("device", Annotated[str, typer.Option(help="`auto` (CUDA if present), `cpu`, `cuda`…")], "auto"),
    _opt(
        "no_cache",
        Annotated[bool, typer.Option("--no-cache", help="Recompute even if a cached result exists.")],
        False,
    ),
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
_GENERATION = [
    _opt("max_new_tokens", Annotated[int, typer.Option(help="Generation length limit.")], 128),
    _opt(
        "chat",
        Annotated[
            bool | None, typer.Option("--chat/--no-chat", help="Use the chat template; default per metric.")
        ],
        None,
    ),
    _opt(
        "system", Annotated[str | None, typer.Option(help="System prompt for chat-templated prompts.")], None
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
    "truthfulqa-mc": _SCORING,
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
        _opt("system", Annotated[str | None, typer.Option(help="Replace HaluEval's system prompt.")], None),
        *_SCORING,
    ],
    "toxicity": _GENERATION + _judge("toxicity-probe"),
    "repetition": _GENERATION,
    "harmful-rate": _GENERATION + _judge("harm-probe"),
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
    "perplexity": [
        _opt("window", Annotated[int, typer.Option(help="Tokens per window.")], 1024),
        _opt("stride", Annotated[int, typer.Option(help="Tokens each window advances by.")], 512),
    ],
}


def _run(name: str, **flags: Any) -> None:
    from rich.console import Console

    from excise.errors import ConfigError
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.judges import parse_options
    from excise.evaluate.report import summary_table
    from excise.evaluate.runner import run_eval, write_result
    from excise.hub import resolve_adapter

    fields = {}
    for item in flags.pop("field"):
        key, sep, column = item.partition("=")
        if not sep or not key.strip() or not column.strip():
            raise ConfigError(f"--field {item!r} is not NAME=COLUMN (e.g. question=Question)")
        fields[key.strip()] = column.strip()
    out, no_cache = flags.pop("out"), flags.pop("no_cache")
    if flags["adapter"] is not None:
        flags["adapter"] = resolve_adapter(flags["adapter"])
    judge_options = parse_options(flags.pop("judge_option", []))
    cfg = EvalConfig(
        model=flags.pop("base"),
        fields=fields,
        judge_options=judge_options,
        **flags,
    )
    record = run_eval(name, cfg, use_cache=not no_cache)
    path = write_result(record, out)
    Console(stderr=True).print(summary_table(record))
    typer.echo(f"wrote {path}")


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
}

for _name, _summary in _COMMANDS.items():
    app.command(_name)(_make_command(_name, _summary))
