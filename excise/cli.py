"""The ``excise`` command: flags → one library call → where the output went.

Heavy imports live inside the commands so ``excise --help`` and ``excise ops`` start
small (``ops`` never imports transformers). User errors (:class:`ExciseError`) print
one line to stderr and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from excise.runtime import configure_process

# One BLAS thread and a malloc that keeps freed blocks (see excise/runtime.py): the
# operators are 2–10× faster so. Must run before numpy is imported.
configure_process()

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from excise.commands import data as data_commands
from excise.commands import evaluate as eval_commands
from excise.commands import judge as _judge_commands  # noqa: F401 - registers on `eval`
from excise.commands import train as train_commands
from excise.commands import unlearn as _unlearn_commands  # noqa: F401 - registers on `train`
from excise.commands.common import Overwrite, Threads, done
from excise.errors import ExciseError

app = typer.Typer(
    help="Remove a deficiency from an LLM by exact arithmetic on parameter-efficient modules.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
ops_app = typer.Typer(
    help="Exact, rank-additive operators on PEFT adapters (LoRA, (IA)³, prefix).", no_args_is_help=True
)
app.add_typer(ops_app, name="ops")
app.add_typer(train_commands.app, name="train")
app.add_typer(eval_commands.app, name="eval")
app.add_typer(data_commands.app, name="data")

Dir = Annotated[Path, typer.Option(help="PEFT adapter folder.", show_default=False)]
Out = Annotated[Path, typer.Option("--out", help="Output folder (written atomically).", show_default=False)]
Dense = Annotated[
    bool, typer.Option("--dense", help="Dense reference path (rank-`in` output, slow; for parity).")
]
Partial = Annotated[
    bool,
    typer.Option("--allow-partial", help="Combine adapters whose target modules differ (shared ones only)."),
]
Base = Annotated[
    str | None,
    typer.Option(
        "--base",
        help="Base MODEL (hub id, folder or `smollm2-135m-instruct`): the inputs are then full fine-tuned "
        "models, processed shard by shard.",
        show_default=False,
    ),
]


Sha256 = Annotated[
    bool,
    typer.Option(
        "--sha256",
        help="Identify the input adapters in the provenance record by SHA-256 (what sha256sum and "
        "the Hugging Face hub show; ~10x slower to compute) instead of xxh3-128. Full models "
        "(--base) are always recorded by the SHA-256 of their index or single shard.",
    ),
]


def _run_op(
    name: str,
    inputs: list[Path],
    out: Path,
    params: dict,
    *,
    dense: bool,
    partial: bool,
    overwrite: bool,
    base: str | None,
    sha256: bool = False,
) -> None:
    if base is not None:
        if dense:
            raise typer.BadParameter("--dense applies to adapters, not to full models (--base)")
        from excise.models import resolve_model
        from excise.pem.full import apply_full

        done(apply_full(name, Path(resolve_model(base)), inputs, out, params=params, overwrite=overwrite))
        return
    from excise.pem.apply import apply_operator

    done(
        apply_operator(
            name,
            inputs,
            out,
            params=params,
            dense=dense,
            allow_partial=partial,
            overwrite=overwrite,
            digest="sha256" if sha256 else "xxh3_128",
        )
    )


@ops_app.command("ext-sub")
def ops_ext_sub(
    expert: Dir,
    anti_expert: Annotated[
        list[Path], typer.Option(help="Anti-expert adapter folder; repeat to remove several deficiencies.")
    ],
    out: Out,
    lam: Annotated[
        list[float], typer.Option(help="Subtraction weight λ: one for all, or one per anti-expert.")
    ] = [1.0],  # noqa: B006
    sequential: Annotated[bool, typer.Option(help="With several anti-experts: one after the other.")] = False,
    dense: Dense = False,
    allow_partial: Partial = False,
    overwrite: Overwrite = False,
    base: Base = None,
    sha256: Sha256 = False,
) -> None:
    """Ext-Sub: expert minus the deficiency extracted from the anti-expert(s), exactly (rank r1 + r2)."""
    if len(anti_expert) == 1 and not sequential:
        if len(lam) != 1:
            raise typer.BadParameter(f"one anti-expert takes one --lam, got {len(lam)}")
        params: dict = {"lam": lam[0]}
        name = "ext_sub"
    else:
        params, name = {"lams": lam, "sequential": sequential}, "compose"
    _run_op(
        name,
        [expert, *anti_expert],
        out,
        params,
        dense=dense,
        partial=allow_partial,
        overwrite=overwrite,
        base=base,
        sha256=sha256,
    )


@ops_app.command("subtract")
def ops_subtract(
    a: Dir,
    b: Dir,
    out: Out,
    lam: Annotated[float, typer.Option(help="Subtraction weight λ.")] = 1.0,
    dense: Dense = False,
    allow_partial: Partial = False,
    overwrite: Overwrite = False,
    base: Base = None,
    sha256: Sha256 = False,
) -> None:
    """Direct subtraction a − λ·b (the Ext-Sub paper's baseline)."""
    _run_op(
        "subtract",
        [a, b],
        out,
        {"lam": lam},
        dense=dense,
        partial=allow_partial,
        overwrite=overwrite,
        base=base,
        sha256=sha256,
    )


@ops_app.command("add")
def ops_add(
    a: Dir,
    b: Dir,
    out: Out,
    weight: Annotated[float, typer.Option(help="Weight of b.")] = 1.0,
    dense: Dense = False,
    allow_partial: Partial = False,
    overwrite: Overwrite = False,
    base: Base = None,
    sha256: Sha256 = False,
) -> None:
    """Addition a + weight·b."""
    _run_op(
        "add",
        [a, b],
        out,
        {"weight": weight},
        dense=dense,
        partial=allow_partial,
        overwrite=overwrite,
        base=base,
        sha256=sha256,
    )


@ops_app.command("negate")
def ops_negate(
    adapter: Dir,
    out: Out,
    lam: Annotated[float, typer.Option(help="Negation strength λ: the result is −λ·adapter.")] = 1.0,
    dense: Dense = False,
    overwrite: Overwrite = False,
    base: Base = None,
    sha256: Sha256 = False,
) -> None:
    """Knowledge negation −λ·θ (SKU stage 2; the task-vector baseline)."""
    _run_op(
        "negate",
        [adapter],
        out,
        {"lam": lam},
        dense=dense,
        partial=False,
        overwrite=overwrite,
        base=base,
        sha256=sha256,
    )


@ops_app.command("scale")
def ops_scale(
    adapter: Dir,
    out: Out,
    weight: Annotated[float, typer.Option(help="Factor.", show_default=False)],
    dense: Dense = False,
    overwrite: Overwrite = False,
    sha256: Sha256 = False,
) -> None:
    """Scaling weight·θ (rank unchanged)."""
    _run_op(
        "scale",
        [adapter],
        out,
        {"weight": weight},
        dense=dense,
        partial=False,
        overwrite=overwrite,
        base=None,
        sha256=sha256,
    )


@app.command("inspect")
def inspect(
    expert: Dir,
    anti_expert: Dir,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG plot per layer here.")] = None,
    lam: Annotated[float, typer.Option(help="λ for the `removed` statistic.")] = 1.0,
    allow_partial: Partial = False,
) -> None:
    """Per-module diagnostics: cos(W1_i, W2_i), general share, deficiency overlap, removed norm."""
    from excise.pem.diagnostics import diagnose, format_summary, plot_diagnostics
    from excise.pem.io import load_adapter

    report = diagnose(load_adapter(expert), load_adapter(anti_expert), lam=lam, allow_partial=allow_partial)
    typer.echo(format_summary(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        done(json_out)
    if plot is not None:
        done(plot_diagnostics(report, plot))


@app.command("merge")
def merge(
    base: Annotated[
        str, typer.Option(help="Base MODEL: hub id, folder or `smollm2-135m-instruct`.", show_default=False)
    ],
    adapter: Dir,
    out: Out,
    overwrite: Overwrite = False,
    threads: Threads = None,
) -> None:
    """Merge an adapter into its base model and save a plain transformers model."""
    from excise.models.merge import merge_adapter
    from excise.runtime import set_threads

    set_threads(threads)
    done(merge_adapter(base, adapter, out, overwrite=overwrite))


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Folder for adapters and the report.")] = Path("runs/demo"),
    model: Annotated[
        str, typer.Option(help="Base MODEL (needs a chat template): hub id, folder or alias.")
    ] = "smollm2-135m-instruct",
    data: Annotated[
        Path | None,
        typer.Option(help="HaluEval QA file (JSON Lines). Default: ../shared/data/halueval/qa_data.json."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Training steps per adapter.")] = 30,
    lam: Annotated[float, typer.Option(help="Ext-Sub λ.")] = 1.0,
    n_eval: Annotated[int, typer.Option(help="Held-out questions to score.")] = 40,
    seed: Annotated[int, typer.Option(help="Seeds the split, LoRA init and data order.")] = 0,
    bf16: Annotated[bool, typer.Option("--bf16", help="Train under bfloat16 autocast.")] = False,
    overwrite: Overwrite = False,
    threads: Threads = None,
) -> None:
    """Train an expert and an anti-expert LoRA on HaluEval QA, apply Ext-Sub, score and generate."""
    from excise.pipeline.demo import run_demo
    from excise.runtime import set_threads

    set_threads(threads)
    done(
        run_demo(
            out,
            model=model,
            data=data,
            steps=steps,
            lam=lam,
            n_eval=n_eval,
            n_generate=min(3, n_eval),
            seed=seed,
            bf16=bf16,
            overwrite=overwrite,
        )
    )


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _show_warnings() -> None:
    """Ours as one line each; the libraries' deprecation chatter not at all."""
    import os

    from excise.errors import ExciseWarning

    # transformers logs its deprecations (e.g. of `past_key_values` tuples) through its own
    # logger, not `warnings`; errors still show. Set before transformers is first imported.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.showwarning = _warning_line
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("always", category=ExciseWarning)


# Config fields whose flag has another name.
_FLAG_OF_FIELD = {"model": "base", "fields": "field", "judge_options": "judge-option"}


def _validation_message(err: Any) -> str:
    """A pydantic ``ValidationError`` as one line naming each flag, the value and the valid choices."""
    parts = []
    for e in err.errors(include_url=False):
        loc = [str(x) for x in e.get("loc", ())]
        flag = f"--{_FLAG_OF_FIELD.get(loc[0], loc[0].replace('_', '-'))}" if loc else ""
        flag += "".join(f"[{x}]" for x in loc[1:])
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if e.get("type") == "literal_error":
            expected = str(e.get("ctx", {}).get("expected", "")).replace("'", "").replace(" or ", ", ")
            msg = f"{e.get('input')!r} is not one of: {expected}"
        elif e.get("type") == "extra_forbidden":
            msg = "is not a known setting"
        parts.append(f"{flag}: {msg}" if flag else msg)
    return "; ".join(parts)


def _usage_message(err: typer.TyperException) -> str:
    """A click usage error as one line, with where to find the valid choices."""
    text = " ".join(err.format_message().split()).rstrip(".")
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        text += f" (see '{ctx.command_path} --help')"
    return text


def _resume_hint(argv: list[str]) -> str | None:
    """The command that continues an interrupted ``excise train`` run, if it left a checkpoint."""
    if len(argv) < 2 or argv[0] != "train":
        return None
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"]
    values += [a.removeprefix("--out=") for a in argv if a.startswith("--out=")]
    if not values or not any((Path(values[-1]) / "checkpoints").glob("step-*")):
        return None
    import shlex

    kept = [a for a in argv if a not in ("--overwrite", "--resume")]
    return shlex.join(["excise", *kept, "--resume"])


def main() -> None:
    """Run the app; user errors (ours, pydantic's, click's) become one ``error:`` line and exit 2."""
    _show_warnings()
    argv = sys.argv[1:]
    try:
        code = app(args=argv, prog_name="excise", standalone_mode=False)
    except typer.TyperException as e:  # click's usage errors (typer vendors click)
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.format_message())
            sys.exit(0)
        print(f"error: {_usage_message(e)}", file=sys.stderr)
        sys.exit(2)
    except ExciseError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            print(f"error: {_validation_message(e)}", file=sys.stderr)
            sys.exit(2)
        raise
    if code == 130:  # Ctrl-C (typer turns KeyboardInterrupt into exit code 130)
        hint = _resume_hint(argv)
        print("interrupted" + (f"; continue with: {hint}" if hint else ""), file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
