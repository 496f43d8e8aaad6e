"""Packing SFT examples into full rows: no padding, several examples per row.

:func:`pack` places encoded examples into rows of at most ``capacity`` tokens by best-fit
decreasing (longest first, each into the fullest row it still fits), once for the run; the
loop then shuffles the rows each epoch. :func:`collate_packed` lays a batch of rows out with
``position_ids`` that restart at 0 for every example and labels on response tokens only
(never on an example's first token: nothing of its own predicts it).

Attention boundaries: the losses pass such a batch without a 2D attention mask, and
transformers' mask builder (``masking_utils.find_packed_sequence_indices``, used by Llama,
Qwen, Mistral, SmolLM2… with eager and SDPA attention alike) then derives a block-diagonal
causal mask from the restarting position ids, so each example attends only to itself and
gets the positions it would have alone (tests check the loss equals the unpacked one). A
model with its own mask code that ignores position ids would let an example attend to the
ones before it in its row, as most packing trainers do (TRL's ``packing=True`` without
``padding_free``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from excise.data import Encoded
from excise.train.losses import IGNORE_INDEX

__all__ = ["collate_packed", "pack"]


def pack(encoded: Sequence[Encoded], capacity: int) -> list[list[Encoded]]:
    """Rows of examples, each row at most ``capacity`` tokens (best-fit decreasing, deterministic).

    Raises:
        ValueError: an example is longer than ``capacity`` (encode with ``max_length`` ≤ it).
    """
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    rows: list[list[Encoded]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        n = len(encoded[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the packing capacity {capacity}")
        at = bisect.bisect_left(free, (n, -1))  # the fullest row with room for n
        if at == len(free):
            rows.append([])
            room, row = capacity, len(rows) - 1
        else:
            room, row = free.pop(at)
        rows[row].append(encoded[i])
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


def collate_packed(rows: Sequence[Sequence[Encoded]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One batch of packed rows, right-padded to the longest.

    Returns:
        ``input_ids``, ``attention_mask`` (1 on example tokens), ``position_ids`` (restarting at
        0 for each example, and for the padding, which forms a segment of its own) and
        ``labels`` (response tokens; -100 on prompts, padding and each example's first token),
        each ``(B, T)`` int64.
    """
    B, T = len(rows), max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        start = 0
        for e in row:
            n, p = len(e), len(e.prompt_ids)
            input_ids[b, start : start + n] = torch.tensor(e.prompt_ids + e.response_ids)
            attention_mask[b, start : start + n] = 1
            position_ids[b, start : start + n] = torch.arange(n)
            labels[b, start + max(p, 1) : start + n] = torch.tensor(
                e.response_ids[max(1 - p, 0) :], dtype=torch.long
            )
            start += n
        position_ids[b, start:] = torch.arange(T - start)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
    }
