"""Ext-Sub: extraction-before-subtraction (arXiv 2308.08090; DESIGN.md §1).

Per output row ``i`` of each adapted module, with ``W1 = θ+`` (expert) and
``W2 = θ−`` (anti-expert)::

    n1 = W1/|W1|   n2 = W2/|W2|   c = (n1 + n2)/|n1 + n2|
    g = (W2·c) c   d = W2 − g     W = W1 − λ d

The result is ``W_i = α_i W1_i + β_i W2_i``: an exact LoRA of rank ``r1 + r2``
(:mod:`excise.pem.linalg` has the closed form for ``α, β``). The dense twin
:func:`ext_sub_dense` forms ``W1, W2`` and writes a rank-``in`` LoRA (``A = I``) as
the published ``ext_sub.py`` does; it exists for parity tests and ``--dense``.

Departures from the published code, on purpose: it ignores each adapter's own
LoRA scale (it applies the expert's to everything), needs square layers, returns
NaN on zero rows and, for (IA)³, subtracts ``W2`` with weight 1 whatever λ is.
"""

from __future__ import annotations

import numpy as np

from excise.pem.delta import Adapter, Module
from excise.pem.linalg import as_float64, ext_sub_coefficients, ext_sub_rows_reference, row_combine, row_norms
from excise.pem.ops.base import ModuleSink, apply_modulewise, check_finite, rank_in_dense, result_dtype

__all__ = ["ext_sub", "ext_sub_dense"]


def _ext_sub_module(
    expert: Module | None, anti_expert: Module | None, lam: float, dtype: np.dtype | type | None = None
) -> Module | None:
    """One module: ``W1 − λ d`` as a rank ``r1 + r2`` row combination, ``B`` in ``dtype``."""
    if expert is None:  # W1 = 0: the common direction is n2, nothing is removed
        return None
    if anti_expert is None:
        return row_combine([(1.0, expert)], dtype=dtype)
    expert, anti_expert = as_float64(expert), as_float64(anti_expert)  # B read by norms and combine
    alpha, beta = ext_sub_coefficients(row_norms(expert), row_norms(anti_expert), lam)  # (out,)
    return row_combine([(alpha, expert), (beta, anti_expert)], dtype=dtype)


def _ext_sub_module_dense(expert: Module | None, anti_expert: Module | None, lam: float) -> Module | None:
    if expert is None:
        return None
    W1 = expert.dense()  # (out, in)
    W = W1 if anti_expert is None else ext_sub_rows_reference(W1, anti_expert.dense(), lam)
    return rank_in_dense(W, expert)


def ext_sub(
    expert: Adapter,
    anti_expert: Adapter,
    *,
    lam: float = 1.0,
    allow_partial: bool = False,
    on_module: ModuleSink | None = None,
) -> Adapter:
    """Remove the anti-expert's deficiency from the expert: ``θ+ − λ·d(θ−)``.

    Args:
        expert: the expert PEM θ+.
        anti_expert: the anti-expert PEM θ−, same base model and module shapes.
        lam: subtraction weight λ (finite).
        allow_partial: combine only shared modules; expert-only modules are kept,
            anti-expert-only modules are dropped (nothing to subtract them from).
        on_module: stream the result module by module (:func:`~excise.pem.ops.base.apply_modulewise`).

    Returns:
        An adapter whose modules have rank ``r1 + r2`` (LoRA) or the input shape.

    Raises:
        ConfigError: λ not finite.
        AdapterError: incompatible adapters.
    """
    lam = check_finite("lam", lam)
    dtype = result_dtype(expert)
    return apply_modulewise(
        [expert, anti_expert],
        lambda ms: _ext_sub_module(ms[0], ms[1], lam, dtype),
        allow_partial=allow_partial,
        operation="ext_sub",
        params={"lam": lam},
        on_module=on_module,
    )


def ext_sub_dense(
    expert: Adapter,
    anti_expert: Adapter,
    *,
    lam: float = 1.0,
    allow_partial: bool = False,
    on_module: ModuleSink | None = None,
) -> Adapter:
    """:func:`ext_sub` computed on dense deltas, output of rank ``in`` (reference only)."""
    lam = check_finite("lam", lam)
    return apply_modulewise(
        [expert, anti_expert],
        lambda ms: _ext_sub_module_dense(ms[0], ms[1], lam),
        allow_partial=allow_partial,
        operation="ext_sub_dense",
        params={"lam": lam},
        on_module=on_module,
    )
