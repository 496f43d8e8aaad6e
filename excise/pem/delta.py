"""The one representation every operator sees (STYLE.md rule 4).

A LoRA module is held as its *effective* delta ``W = scale · B @ A``, with the
adapter config (``lora_alpha``, rsLoRA, ``rank_pattern``, ``alpha_pattern``) already
folded into ``scale`` by :mod:`excise.pem.io`. (IA)³ and prefix-tuning modules are
dense tensors whose rows are the vectors the Ext-Sub projection acts on
(DESIGN.md §1): for (IA)³ the whole ``l − 1`` vector is one row; for prefix tuning
each (virtual token, layer, key/value, head) vector of length ``head_dim`` is one row.

Arrays are numpy, not torch: the operators are a few small matrix products per
module, and importing torch alone costs ~2.5 s and ~220 MB on a 2-core machine —
more than the whole Ext-Sub of a 7B adapter — so ``excise ops`` never imports it
(torch is loaded lazily only for bf16 files and legacy ``.bin`` files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Adapter", "LowRankDelta", "Module", "RowDelta"]


@dataclass(frozen=True)
class LowRankDelta:
    """A LoRA weight delta ``W = scale · B @ A``.

    Attributes:
        B: ``(out, r)`` up-projection.
        A: ``(r, in)`` down-projection.
        scale: the effective LoRA scale (``alpha / r`` or ``alpha / sqrt(r)``).
    """

    B: np.ndarray
    A: np.ndarray
    scale: float = 1.0

    def __post_init__(self) -> None:
        assert self.B.ndim == 2 and self.A.ndim == 2, "LowRankDelta needs 2-D factors"
        assert self.B.shape[1] == self.A.shape[0], "rank of B and A differ"

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the dense delta."""
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self, dtype: np.dtype | type = np.float64) -> np.ndarray:
        """The dense ``(out, in)`` delta; for tests and reference code only."""
        return self.scale * (self.B.astype(dtype) @ self.A.astype(dtype))  # (out, in)

    def folded(self) -> LowRankDelta:
        """The same delta with ``scale`` folded into ``B`` (scale 1); ``A`` is kept as is.

        With scale 1 the delta is returned unchanged (``B`` keeps its dtype); otherwise
        the new ``B`` is the float64 product.
        """
        if self.scale == 1.0:
            return self
        return LowRankDelta(self.scale * self.B.astype(np.float64), self.A, 1.0)


@dataclass(frozen=True)
class RowDelta:
    """A dense delta stored as rows, with the shape to restore on write.

    Attributes:
        rows: ``(n_rows, dim)``; each row is one vector of the Ext-Sub projection.
        shape: the tensor's shape in the adapter file.
    """

    rows: np.ndarray
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        assert self.rows.ndim == 2, "RowDelta rows must be 2-D"
        assert self.rows.size == _numel(self.shape), "rows do not fill shape"

    def tensor(self) -> np.ndarray:
        """The rows reshaped to the file's shape."""
        return self.rows.reshape(self.shape)

    def dense(self, dtype: np.dtype | type = np.float64) -> np.ndarray:
        """The ``(n_rows, dim)`` rows in ``dtype``."""
        return self.rows.astype(dtype)


Module = LowRankDelta | RowDelta


@dataclass(frozen=True)
class Adapter:
    """A parameter-efficient module: its type, its config and its per-module deltas.

    Attributes:
        peft_type: ``"LORA"``, ``"IA3"`` or ``"PREFIX_TUNING"``.
        config: the ``adapter_config.json`` it was read from (or derives from).
        modules: module name (as in the base model, e.g.
            ``model.layers.0.self_attn.q_proj``) to its delta. For prefix tuning the
            single key is ``prompt_embeddings``.
        source: where it came from and how it was made; written to ``excise.json``.
        dtype: dtype name of the input weights (``"float32"``, ``"bfloat16"``…), used
            when the result is written.
    """

    peft_type: str
    config: dict[str, Any]
    modules: dict[str, Module]
    source: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
