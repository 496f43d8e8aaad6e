"""`excise sweep`: an operation over a λ grid, λ chosen by a stated rule (excise/pipeline/sweep.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from excise.commands.common import Out, Overwrite, Partial, Threads, done

__all__ = ["sweep"]


def sweep(
    operation: Annotated[
        str, typer.Argument(help="ext-sub, subtract, negate or compose.", show_default=False)
    ],
    adapters: Annotated[
        list[str],
        typer.Argument(
            help="Adapter folders (or hub ids org/name\\[@rev]) in the operator's order: EXPERT ANTI "
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
            help="Allowed relative utility loss against λ = 0 when choosing λ (0.05: +5 % perplexity;"
            " absolute when the utility at λ = 0 is 0)."
        ),
    ] = 0.05,
    tolerance_on: Annotated[
        str,
        typer.Option(
            help="Check the tolerance on the utility loss's `point` estimate, the `worst` end of its paired "
            "interval (the whole interval within) or the `best` end (refused only when surely beyond)."
        ),
    ] = "point",
    tolerance_kind: Annotated[
        str | None,
        typer.Option(
            help="`absolute`: the tolerance in the utility's own units (for a utility that is a difference, "
            "e.g. answer-nll:delta_nll); default: relative, absolute when the utility at λ = 0 is 0."
        ),
    ] = None,
    select_share: Annotated[
        float,
        typer.Option(
            help="Share of the items (hash-chosen) that choose λ; the figures at the chosen λ are reported "
            "on the rest. 1: choose and report on the same items."
        ),
    ] = 0.5,
    bootstrap: Annotated[
        int, typer.Option(help="Paired bootstrap resamples for the intervals (0: none).")
    ] = 10000,
    dtype: Annotated[
        str,
        typer.Option(
            help="`float32` (default: exact) or `bfloat16`: ≈ 2× faster generation on GPUs and on CPUs with "
            "AVX512-BF16/AMX; answers differ (docs/EVALUATION.md, Faster generation)."
        ),
    ] = "float32",
    device: Annotated[str, typer.Option(help="`auto` (CUDA if present), `cpu`, `cuda`…")] = "auto",
    allow_partial: Partial = False,
    overwrite: Overwrite = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache",
            help="Recompute every λ point even if a cached result exists (a point is keyed by the "
            "digests of W0 and D and by λ; λ = 0 by W0 alone, so sweeps from one expert share it).",
        ),
    ] = False,
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
        tolerance_on=tolerance_on,
        tolerance_kind=tolerance_kind,
        select_share=select_share,
        bootstrap=bootstrap,
        out=out,
        overwrite=overwrite,
        progress=progress,
        cache=not no_cache,
    )
    from excise.pipeline.sweep import format_table, run_sweep

    # Hub ids are fetched only once the settings are known to be valid.
    cfg = cfg.model_copy(update={"inputs": [resolve_adapter(spec) for spec in adapters]})
    folder = run_sweep(cfg)
    typer.echo(format_table(folder / "sweep.json"))
    done(folder)
