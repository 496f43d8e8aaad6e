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
from excise.commands import run as run_commands
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

Dir = Annotated[
    str,
    typer.Option(help="PEFT adapter folder, or hub id org/name or org/name@revision.", show_default=False),
]
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
Dtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="With --base: dtype of the written weights (float32, bfloat16, float16, float64). Default: per "
        "tensor the widest of the inputs' dtypes, so a bf16 base with fp32 fine-tunes gives fp32; a narrower "
        "one warns with the share of changed weights it rounds back to the base's values.",
        show_default=False,
    ),
]

PushToHub = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="REPO",
        help="Then publish the output folder, provenance record included, to the hub repository "
        "org/name (created if missing; needs `hf auth login` or HF_TOKEN).",
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
    inputs: list[str],
    out: Path,
    params: dict,
    *,
    dense: bool,
    partial: bool,
    overwrite: bool,
    base: str | None,
    sha256: bool = False,
    push_to_hub: str | None = None,
    dtype: str | None = None,
) -> None:
    from excise.hub import check_push_target, resolve_adapter

    if push_to_hub is not None:
        check_push_target(push_to_hub)  # before any work
    if base is not None:
        if dense:
            raise typer.BadParameter("--dense applies to adapters, not to full models (--base)")
        if partial:
            raise typer.BadParameter(
                "--allow-partial applies to adapters; full models (--base) must hold the same tensors "
                "as the base (fine-tunes of it, same architecture)"
            )
        from excise.models import resolve_model
        from excise.pem.full import apply_full

        models = [Path(spec) for spec in inputs]
        model = Path(resolve_model(base))
        done(apply_full(name, model, models, out, params=params, dtype=dtype, overwrite=overwrite))
        _push(out, push_to_hub, f"excise ops {name}")
        return
    if dtype is not None:
        raise typer.BadParameter(
            "--dtype applies to full models (--base); adapters keep the first one's dtype"
        )
    from excise.pem.apply import apply_operator

    done(
        apply_operator(
            name,
            [resolve_adapter(spec) for spec in inputs],
            out,
            params=params,
            dense=dense,
            allow_partial=partial,
            overwrite=overwrite,
            digest="sha256" if sha256 else "xxh3_128",
        )
    )
    _push(out, push_to_hub, f"excise ops {name}")


def _push(out: Path, repo: str | None, message: str) -> None:
    """Publish ``out`` to ``repo`` when asked, and say where it went."""
    if repo is not None:
        from excise.hub import push_folder

        typer.echo(f"pushed {out} to {push_folder(out, repo, message=message)}")


@ops_app.command("ext-sub")
def ops_ext_sub(
    expert: Dir,
    anti_expert: Annotated[
        list[str],
        typer.Option(
            help="Anti-expert adapter folder or hub id; repeat to remove several deficiencies.",
            show_default=False,
        ),
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
    dtype: Dtype = None,
    sha256: Sha256 = False,
    push_to_hub: PushToHub = None,
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
        push_to_hub=push_to_hub,
        dtype=dtype,
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
    dtype: Dtype = None,
    sha256: Sha256 = False,
    push_to_hub: PushToHub = None,
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
        push_to_hub=push_to_hub,
        dtype=dtype,
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
    dtype: Dtype = None,
    sha256: Sha256 = False,
    push_to_hub: PushToHub = None,
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
        push_to_hub=push_to_hub,
        dtype=dtype,
    )


@ops_app.command("negate")
def ops_negate(
    adapter: Dir,
    out: Out,
    lam: Annotated[float, typer.Option(help="Negation strength λ: the result is −λ·adapter.")] = 1.0,
    dense: Dense = False,
    overwrite: Overwrite = False,
    base: Base = None,
    dtype: Dtype = None,
    sha256: Sha256 = False,
    push_to_hub: PushToHub = None,
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
        push_to_hub=push_to_hub,
        dtype=dtype,
    )


@ops_app.command("scale")
def ops_scale(
    adapter: Dir,
    out: Out,
    weight: Annotated[float, typer.Option(help="Factor.", show_default=False)],
    dense: Dense = False,
    overwrite: Overwrite = False,
    sha256: Sha256 = False,
    push_to_hub: PushToHub = None,
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
        push_to_hub=push_to_hub,
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
    from excise.hub import resolve_adapter
    from excise.pem.diagnostics import diagnose, format_summary, plot_diagnostics
    from excise.pem.io import load_adapter

    expert_adapter, anti_adapter = (load_adapter(resolve_adapter(a)) for a in (expert, anti_expert))
    report = diagnose(expert_adapter, anti_adapter, lam=lam, allow_partial=allow_partial)
    typer.echo(format_summary(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        done(json_out)
    if plot is not None:
        done(plot_diagnostics(report, plot))


@app.command("sweep")
def sweep(
    operation: Annotated[
        str, typer.Argument(help="ext-sub, subtract, negate or compose.", show_default=False)
    ],
    adapters: Annotated[
        list[str],
        typer.Argument(
            help="Adapter folders (or hub ids org/name[@rev]) in the operator's order: EXPERT ANTI "
            "(ext-sub), A B (subtract), ADAPTER (negate), EXPERT ANTI1 ANTI2… (compose).",
            show_default=False,
        ),
    ],
    base: Annotated[
        str, typer.Option("--base", help="Base MODEL: alias, .gguf, folder or hub id.", show_default=False)
    ],
    out: Out,
    lams: Annotated[
        str, typer.Option("--lams", help="λ grid, comma-separated (0 is always added as the reference).")
    ] = "0,0.25,0.5,0.75,1",
    deficiency: Annotated[
        str,
        typer.Option(
            help="METRIC:KEY the edit should improve, e.g. truthfulqa-mc:mc2, toxicity:toxicity_mean."
        ),
    ] = "truthfulqa-mc:mc2",
    utility: Annotated[
        str, typer.Option(help="METRIC:KEY it must not spoil, e.g. perplexity:perplexity.")
    ] = "perplexity:perplexity",
    deficiency_set: Annotated[
        list[str],
        typer.Option(
            "--deficiency-set",
            help="An eval setting of the deficiency metric, FIELD=VALUE (repeatable): limit=50, data=FILE…",
        ),
    ] = [],  # noqa: B006
    utility_set: Annotated[
        list[str],
        typer.Option(
            "--utility-set", help="An eval setting of the utility metric, FIELD=VALUE (repeatable)."
        ),
    ] = [],  # noqa: B006
    extra: Annotated[
        list[str],
        typer.Option(
            "--extra",
            help="Another METRIC:KEY scored at every λ, with intervals, not used to choose λ (repeatable); "
            "it takes the settings of the deficiency or utility metric of the same name.",
        ),
    ] = [],  # noqa: B006
    weights: Annotated[
        str | None, typer.Option(help="compose: relative λ of each anti-expert, comma-separated.")
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            help="Allowed relative utility loss against λ = 0 when choosing λ (0.05: +5 % perplexity)."
        ),
    ] = 0.05,
    bootstrap: Annotated[
        int, typer.Option(help="Paired bootstrap resamples for the intervals (0: none).")
    ] = 1000,
    dtype: Annotated[str, typer.Option(help="`float32` or `bfloat16`.")] = "float32",
    device: Annotated[str, typer.Option(help="`auto` (CUDA if present), `cpu`, `cuda`…")] = "auto",
    allow_partial: Partial = False,
    overwrite: Overwrite = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    threads: Threads = None,
) -> None:
    """Evaluate an operation over a λ grid with the model loaded once; choose λ by a stated rule.

    Writes OUT/sweep.json (trade-off table with per-item scores and paired bootstrap intervals
    against λ = 0, the Pareto front, the chosen λ and the knee), the evaluation records and
    the two adapters W0 and D (the result at λ is W0 + λ·D). See docs/SWEEP.md.
    """
    from typing import get_args

    from excise.hub import resolve_adapter
    from excise.pipeline.sweep import SweepConfig, build_config, parse_assignments, parse_floats
    from excise.runtime import set_threads

    set_threads(threads)

    def axis(spec: str, sets: list[str], flag: str) -> dict:
        metric, _, key = spec.partition(":")
        if not key:
            raise typer.BadParameter(f"{flag} takes METRIC:KEY, e.g. perplexity:perplexity; got {spec!r}")
        return {"metric": metric, "key": key, "settings": parse_assignments(sets, flag=f"{flag}-set")}

    def extra_axis(spec: str) -> dict:  # the settings of the deficiency or utility metric of that name
        same = [sets for axis_spec, sets in ((deficiency, deficiency_set), (utility, utility_set))
                if axis_spec.partition(":")[0] == spec.partition(":")[0]]  # fmt: skip
        return axis(spec, same[0] if same else [], "--extra")

    verbs = [op.replace("_", "-") for op in get_args(SweepConfig.model_fields["operation"].annotation)]
    if operation not in verbs:
        raise typer.BadParameter(f"OPERATION {operation!r} is not one of: {', '.join(verbs)}")
    cfg = build_config(
        model=base,
        operation=operation.replace("-", "_"),
        inputs=[Path(spec) for spec in adapters],
        weights=parse_floats(weights, flag="--weights") if weights else None,
        allow_partial=allow_partial,
        lams=parse_floats(lams, flag="--lams"),
        deficiency=axis(deficiency, deficiency_set, "--deficiency"),
        utility=axis(utility, utility_set, "--utility"),
        extra=[extra_axis(spec) for spec in extra],
        dtype=dtype,
        device=device,
        tolerance=tolerance,
        bootstrap=bootstrap,
        out=out,
        overwrite=overwrite,
        progress=progress,
    )
    from excise.pipeline.sweep import format_table, run_sweep

    # Hub ids are fetched only once the settings are known to be valid.
    cfg = cfg.model_copy(update={"inputs": [resolve_adapter(spec) for spec in adapters]})
    folder = run_sweep(cfg)
    typer.echo(format_table(folder / "sweep.json"))
    done(folder)


@app.command("report")
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder (results/, sweeps/, diagnostics/…).", show_default=False)
    ],
    out: Annotated[Path | None, typer.Option(help="Report folder; default RUN/report.")] = None,
    title: Annotated[str | None, typer.Option(help="Heading; default the run folder's name.")] = None,
    samples: Annotated[int, typer.Option(help="Prompts shown per generation metric.")] = 3,
) -> None:
    """Write report.json, report.md and a self-contained report.html for a run folder (docs/SWEEP.md)."""
    from excise.pipeline.report import write_report

    done(write_report(run_dir, out=out, title=title, samples=samples))


@app.command("merge")
def merge(
    base: Annotated[
        str, typer.Option(help="Base MODEL: hub id, folder or `smollm2-135m-instruct`.", show_default=False)
    ],
    adapter: Dir,
    out: Out,
    overwrite: Overwrite = False,
    push_to_hub: PushToHub = None,
    threads: Threads = None,
) -> None:
    """Merge an adapter into its base model and save a plain transformers model."""
    from excise.data import recorded_training_data
    from excise.hub import check_push_target, resolve_adapter
    from excise.models.merge import merge_adapter
    from excise.runtime import set_threads

    set_threads(threads)
    if push_to_hub is not None:
        check_push_target(push_to_hub)
    folder = resolve_adapter(adapter)
    records = recorded_training_data(folder)  # what it was trained on, for `excise eval`'s check
    done(merge_adapter(base, folder, out, overwrite=overwrite, training_data=records))
    _push(out, push_to_hub, "excise merge")


app.command("run")(run_commands.run)


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
