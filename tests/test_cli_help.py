"""Every command's ``--help`` at 80 columns: paragraphs reflow, no docstring line breaks show."""

from __future__ import annotations

import itertools
import re

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from excise.cli import app

WIDTH = 80
BOX = ("│", "╭", "╰")  # rich's panels of arguments, options and commands


def _commands(command=None, path=()):
    """Every group and command below ``excise`` (itself included), with its argv path."""
    command = command or get_command(app)
    yield path, command
    for name in getattr(command, "list_commands", lambda ctx: [])(None):
        yield from _commands(command.get_command(None, name), (*path, name))


PATHS = [path for path, _ in _commands()]


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=WIDTH, env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, result.output
    return result.output


def test_the_walk_finds_every_group_and_command():
    assert {("ops", "ext-sub"), ("train", "sku"), ("eval", "judge-check"), ("data", "anti")} <= set(PATHS)
    assert {("inspect",), ("sweep",), ("report",), ("merge",), ("run",)} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "excise")
def test_help_paragraphs_reflow_at_80_columns(path):
    """Rich wraps a line only when the next word does not fit: a shorter break is the docstring's."""
    lines = [line.rstrip() for line in _help(path).splitlines()]
    text = [line for line in lines if not line.lstrip().startswith(BOX)]
    assert all(len(line) <= WIDTH for line in lines)
    for line, after in itertools.pairwise(text):
        if not line.strip() or not after.strip() or after.strip().startswith("- "):
            continue  # paragraph ends and list items break on purpose
        word = after.split()[0]
        assert len(line) + 1 + len(word) > WIDTH - 2, (
            f"`excise {' '.join(path)} --help` breaks mid-paragraph after {line.strip()!r} "
            f"(next: {after.strip()!r}); write the docstring as paragraphs"
        )


def test_no_help_text_is_taken_for_rich_markup():
    """Rich drops ``[default: …]`` or ``[@rev]`` as a markup tag unless the bracket is escaped."""
    tag = re.compile(r"(?<!\\)\[[a-z#/@][^[]*?]")  # rich's own tag pattern, unescaped
    for path, command in _commands():
        texts = [("help", command.help), *((p.name, getattr(p, "help", None)) for p in command.params)]
        for name, text in texts:
            found = tag.search(text or "")
            assert found is None, f"`excise {' '.join(path)}` {name}: write {found.group()!r} as '\\\\[...]'"
