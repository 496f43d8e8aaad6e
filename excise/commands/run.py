"""`excise run RECIPE [KEY=VALUE …]`: a whole job from one recipe (excise/pipeline/run.py)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from excise.commands.common import Threads

__all__ = ["run"]


def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file (see recipes/).", show_default=False)],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Overrides KEY=VALUE with a dotted KEY, values read as YAML: train.steps=50, "
            "out=runs/try, sweeps.ext_sub.lams=[0,1,2].",
            show_default=False,
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="What ${data} stands for (default: the recipe's data_dir, else $EXCISE_DATA_DIR, "
            "else ../shared/data beside the working folder or the repository)."
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Validate the recipe and list its stages; run nothing.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Run every stage again, even when up to date; no cached evaluations."),
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="Run only the stages whose name matches this glob (repeatable; names as --check lists "
            "them, e.g. 'train *', 'eval pairs/*', 'sweep sku'); the others are left as they are.",
        ),
    ] = None,
    threads: Threads = None,
) -> None:
    """Run a recipe: train → operate → evaluate → sweep λ → report; stages already done are skipped.

    Every problem of the recipe is reported (one line each) before anything runs. Outputs go
    below the recipe's `out` folder, with the resolved recipe (recipe.yaml) and a stage
    manifest (stages.json); an interrupted run continues where it stopped.
    """
    from excise.pipeline.recipe import RecipeError, load_recipe
    from excise.pipeline.run import is_main_process, plan, run_recipe
    from excise.runtime import set_threads

    set_threads(threads)

    try:
        loaded = load_recipe(recipe, overrides or [], data_dir=data_dir)
    except RecipeError as err:
        for line in err.problems:
            print(f"error: {line}", file=sys.stderr)
        raise typer.Exit(2) from None
    if check:
        stages = plan(loaded)
        typer.echo(f"{recipe}: valid; {len(stages)} stages into {loaded.out} (data: {loaded.data_dir})")
        for i, stage in enumerate(stages, start=1):
            typer.echo(f"  {i:>2}. {stage.name} → {stage.output}")
        return
    command = " ".join(shlex.quote(a) for a in ["excise", *sys.argv[1:]])
    result = run_recipe(loaded, command=command, force=force, only=only or None)
    if is_main_process():  # under accelerate launch, one line, not one per process
        typer.echo(f"wrote {result}")
