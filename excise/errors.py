"""User-facing errors.

Every error a user can cause subclasses :class:`ExciseError` (and the builtin it
replaces), carries a one-line message saying what, where and how to fix, and is
printed by the CLI without a traceback (exit code 2). Anything else is a bug.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "ConfigError",
    "DataError",
    "ExciseError",
    "ExciseWarning",
    "ModelLoadError",
    "first_line",
]


class ExciseError(Exception):
    """Base class of every error caused by user input."""


class ConfigError(ExciseError, ValueError):
    """A setting or flag is invalid (e.g. a non-finite lambda)."""


class AdapterError(ExciseError, ValueError):
    """An adapter folder is missing, unreadable, malformed or incompatible."""


class DataError(ExciseError, ValueError):
    """A dataset is missing, empty or lacks a required field."""


class ModelLoadError(ExciseError, FileNotFoundError):
    """A base model cannot be found or loaded."""


class ExciseWarning(UserWarning):
    """Something the user should know that does not stop the run (printed as one line)."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
