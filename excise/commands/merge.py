"""`excise merge`: an adapter merged into its base model, saved as a plain transformers model."""

from __future__ import annotations

from typing import Annotated

import typer

from excise.commands.common import Dir, Out, Overwrite, PushToHub, Threads, done, push

__all__ = ["merge"]


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
    push(out, push_to_hub, "excise merge")
