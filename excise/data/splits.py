"""Deterministic splits *by prompt*: no prompt ever appears on two sides.

A prompt's side depends only on a hash of its normalised text (Unicode NFKC, lower case,
whitespace collapsed: :func:`prompt_key`) and a salt, never on the file's order or size, so the
same prompt lands on the same side in every dataset and every run — a prompt in PKU-SafeRLHF
that trained a module can never reappear in the judge's training data or in the evaluation.

:data:`STANDARD_SPLITS` is the project-wide partition every stage uses:

- ``train``: modules are trained on these prompts (SFT, SKU, baselines);
- ``judge``: the offline judge classifier is trained and measured on these;
- ``eval``: held-out prompts for evaluation (harmful rate, utility, scores).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from excise.errors import ConfigError

__all__ = ["SPLIT_SALT", "STANDARD_SPLITS", "assign_split", "prompt_key", "split_by_prompt"]

T = TypeVar("T")

STANDARD_SPLITS: dict[str, float] = {"train": 0.6, "judge": 0.2, "eval": 0.2}
SPLIT_SALT = "excise"  # mixed into every prompt's hash; recorded with what a module trained on


def prompt_key(prompt: str) -> str:
    """The normalised prompt that identifies it across files: Unicode NFKC (a full-width or
    ligature spelling reads as its plain form), lower case, whitespace collapsed to single spaces.

    Training records, the split and the evaluation's overlap check all compare prompts through
    this one function, so the same question typed two ways is one prompt everywhere.
    """
    return " ".join(unicodedata.normalize("NFKC", prompt).lower().split())


def assign_split(
    prompt: str, fractions: Mapping[str, float] = STANDARD_SPLITS, *, salt: str = SPLIT_SALT
) -> str:
    """The side ``prompt`` falls on: a uniform hash of its key, bucketed by ``fractions``.

    Raises:
        ConfigError: fractions are empty, negative, or do not sum to 1.
    """
    _check_fractions(fractions)
    digest = hashlib.sha256(f"{salt}\x00{prompt_key(prompt)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    edge = 0.0
    for name, fraction in fractions.items():
        edge += fraction
        if u < edge:
            return name
    return next(reversed(fractions))  # u within rounding of 1


def split_by_prompt(
    items: Iterable[T],
    prompt_of: Callable[[T], str],
    fractions: Mapping[str, float] = STANDARD_SPLITS,
    *,
    salt: str = SPLIT_SALT,
) -> dict[str, list[T]]:
    """Items grouped by the side of their prompt, each side in input order (every side present)."""
    _check_fractions(fractions)
    sides: dict[str, list[T]] = {name: [] for name in fractions}
    for item in items:
        sides[assign_split(prompt_of(item), fractions, salt=salt)].append(item)
    return sides


def _check_fractions(fractions: Mapping[str, float]) -> None:
    if not fractions:
        raise ConfigError("split fractions are empty")
    if any(not f >= 0 for f in fractions.values()):
        raise ConfigError(f"split fractions must be non-negative, got {dict(fractions)}")
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ConfigError(f"split fractions must sum to 1, got {sum(fractions.values())} ({dict(fractions)})")
