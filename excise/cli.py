"""The ``excise`` command: the app assembled from excise/commands/, and :func:`main`.

Each command group lives in ``excise/commands/`` (one module per group or top-level
command); this module only mounts them, and turns user errors into one line. Heavy
imports live inside the commands so ``excise --help`` and ``excise ops`` start small
(``ops`` never imports transformers). User errors (:class:`ExciseError`) print one line
to stderr and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from excise.runtime import configure_process

# One BLAS thread and a malloc that keeps freed blocks (see excise/runtime.py): the
# operators are 2–10× faster so. Must run before numpy is imported.
configure_process()

import sys
import warnings
from pathlib import Path
from typing import Any

import typer

from excise.commands import data, evaluate, inspect, merge, ops, report, run, sweep, train
from excise.commands.common import reflow_help
from excise.errors import ExciseError

app = typer.Typer(
    help="Remove a deficiency from an LLM by exact arithmetic on parameter-efficient modules.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(ops.app, name="ops")
app.add_typer(train.app, name="train")
app.add_typer(evaluate.app, name="eval")
app.add_typer(data.app, name="data")
app.command("inspect")(inspect.inspect)
app.command("sweep")(sweep.sweep)
app.command("report")(report.report)
app.command("merge")(merge.merge)
app.command("run")(run.run)
reflow_help(app)  # docstring paragraphs as paragraphs in --help, not their source lines


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
