"""`excise ops`: the exact, rank-additive operators on PEFT adapters, or on full models with --base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from excise.commands.common import Dir, Out, Overwrite, Partial, PushToHub, done, push

__all__ = ["app"]

app = typer.Typer(
    help="Exact, rank-additive operators on PEFT adapters (LoRA, (IA)³, prefix).", no_args_is_help=True
)

Dense = Annotated[
    bool, typer.Option("--dense", help="Dense reference path (rank-`in` output, slow; for parity).")
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
        push(out, push_to_hub, f"excise ops {name}")
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
    push(out, push_to_hub, f"excise ops {name}")


@app.command("ext-sub")
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


@app.command("subtract")
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


@app.command("add")
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


@app.command("negate")
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


@app.command("scale")
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
