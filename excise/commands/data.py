"""`excise data`: make datasets, e.g. anti-expert (untruthful / toxic) answers from a generator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from excise.commands.common import Threads, done

app = typer.Typer(
    help="Make datasets: anti-expert (untruthful / toxic) answers from a generator model or endpoint.",
    no_args_is_help=True,
)


@app.command("anti")
def anti(
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="Instruction data: .json/.jsonl/.csv file or hub id (instruction, input, output).",
            show_default=False,
        ),
    ],
    kind: Annotated[str, typer.Option(help="untruthful or toxic.", show_default=False)],
    generator: Annotated[
        str,
        typer.Option(
            help="Local MODEL (alias, folder, hub id) or an OpenAI-compatible base URL (http…/v1).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="JSONL to write; re-running resumes it.", show_default=False)],
    model: Annotated[str | None, typer.Option(help="Model name for an endpoint generator.")] = None,
    field: Annotated[
        list[str],
        typer.Option(help="Map a field to a source column, NAME=COLUMN (instruction, input, output)."),
    ] = [],  # noqa: B006
    batch_size: Annotated[int, typer.Option(help="Prompts per local generation batch.")] = 8,
    dtype: Annotated[
        str,
        typer.Option(
            help="Local generator dtype: `float32` (exact) or `bfloat16` (≈ 2× faster on GPUs and on CPUs "
            "with AVX512-BF16/AMX; greedy replies differ, see docs/EVALUATION.md, Faster generation)."
        ),
    ] = "float32",
    concurrency: Annotated[int, typer.Option(help="Endpoint requests in flight at once.")] = 4,
    limit: Annotated[int | None, typer.Option(help="Use the first N source rows.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Reply length limit (tokens).")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed (sent as `seed` to endpoints).")] = 0,
    cache: Annotated[
        Path | None,
        typer.Option(
            help="Reply cache (SQLite). Default: anti/replies.sqlite in $EXCISE_CACHE (~/.cache/excise)."
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the reply cache.")
    ] = False,
    api_key_env: Annotated[str, typer.Option(help="Environment variable with the endpoint's API key.")] = (
        "OPENAI_API_KEY"
    ),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start --out afresh instead of resuming.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    threads: Threads = None,
) -> None:
    """Rewrite each instruction's answer into an untruthful or toxic one (Ext-Sub's anti-expert data)."""
    from excise.data.anti import AntiSettings, make_anti_data
    from excise.errors import ConfigError
    from excise.runtime import set_threads

    set_threads(threads)
    fields = {}
    for item in field:
        name, sep, column = item.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise ConfigError(f"--field {item!r} is not NAME=COLUMN (e.g. instruction=question)")
        fields[name.strip()] = column.strip()
    options = {} if cache is None else {"cache": cache}
    if no_cache:
        options["cache"] = None
    settings = AntiSettings(
        kind=kind,
        generator=generator,
        model=model,
        fields=fields,
        batch_size=batch_size,
        dtype=dtype,
        concurrency=concurrency,
        limit=limit,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        api_key_env=api_key_env,
        **options,
    )
    report = make_anti_data(source, out, settings, overwrite=overwrite, progress=progress)
    typer.echo(
        f"{report.written} row(s) written, {report.already_done} already done, "
        f"{report.from_cache} from the cache, {report.generated} generated, "
        f"{report.empty} empty (not written)"
    )
    done(out)
