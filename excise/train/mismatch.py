"""Random responses of *other* prompts: SKU's random disassociation and the GA-mismatch baselines.

For each harmful prompt, ``L_RD`` (arXiv 2402.10058, DESIGN.md §2) trains on K responses
drawn at random from other prompts. "Other" is decided by prompt key
(:func:`excise.data.splits.prompt_key` of the dialogue before the response), not by row:
PKU-SafeRLHF repeats prompts (5,135 pairs, 930 prompts), and a duplicate row of the same
prompt would otherwise hand the prompt its own harmful answer as a "random" one.

Departure from the reference code (franciscoliu/SKU ``utils.py``, ``get_rand_ans_loss``):
it draws one set of K answers per batch from *all* harmful answers, the prompt's own
included; here each prompt gets its own K, distinct, never its own prompt's.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from collections.abc import Sequence

from excise.errors import ConfigError, DataError

__all__ = ["MismatchSampler"]


class MismatchSampler:
    """Draws, for a prompt key, K distinct pool entries whose prompt key differs.

    Args:
        pool_keys: the prompt key of each pool entry (the responses to draw from).
        k: responses per prompt.
        query_keys: the keys that will be asked for; checked up front, so a prompt that
            cannot get K responses of other prompts fails before training starts.

    Raises:
        ConfigError: ``k`` < 1.
        DataError: the pool is empty, every entry shares one prompt, or some query key
            leaves fewer than ``k`` entries of other prompts.
    """

    def __init__(self, pool_keys: Sequence[str], k: int, *, query_keys: Sequence[str] = ()) -> None:
        if k < 1:
            raise ConfigError(f"K (random responses per prompt) must be at least 1, got {k}")
        if not pool_keys:
            raise DataError("no responses to draw random mismatched responses from (the pool is empty)")
        self.k = k
        self.n = len(pool_keys)
        self.counts = Counter(pool_keys)
        self._own: dict[str, list[int]] = {}  # key -> sorted pool indices holding it
        for i, key in enumerate(pool_keys):
            self._own.setdefault(key, []).append(i)
        if len(self.counts) == 1 and set(query_keys) <= set(self.counts):
            raise DataError(
                f"all {self.n} responses answer the same prompt; random disassociation needs responses "
                "of other prompts (use data with several distinct prompts)"
            )
        for key in dict.fromkeys(query_keys):
            available = self.n - self.counts.get(key, 0)
            if available < k:
                raise DataError(
                    f"K={k} random responses per prompt, but prompt {key[:60]!r} has only {available} "
                    f"response(s) of other prompts among {self.n}; lower --k or add data"
                )

    def draw(self, key: str, rng: random.Random) -> list[int]:
        """K distinct pool indices, uniformly among the entries whose prompt key is not ``key``."""
        own = self._own.get(key, [])
        available = self.n - len(own)
        if available < self.k:
            raise DataError(
                f"prompt {key[:60]!r} has only {available} response(s) of other prompts, K={self.k}"
            )
        return [self._skip_own(j, own) for j in rng.sample(range(available), self.k)]

    @staticmethod
    def _skip_own(j: int, own: list[int]) -> int:
        """The j-th pool index (0-based) that is not in the sorted list ``own``."""
        # Find the smallest i with i − |own ∩ [0, i]| = j and i ∉ own: shift j past the own
        # indices at or below it, repeatedly (each own index below moves it up by one).
        i, passed = j, 0
        while True:
            now = bisect.bisect_right(own, i)
            if now == passed:
                return i
            i, passed = j + now, now
