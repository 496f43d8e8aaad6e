"""Row-wise maths shared by the operators (DESIGN.md §1), on the low-rank form.

Every operator in ``pem/ops`` produces, per module, a *row-weighted sum* of its
inputs, ``W_i = Σ_k c_{k,i} W_{k,i}``. For LoRA inputs that is an exact LoRA of rank
``Σ_k r_k``::

    W = [diag(c_1) s_1 B_1, …, diag(c_K) s_K B_K] · [A_1; …; A_K]

so nothing here forms a dense ``(out, in)`` delta. Row norms and dot products come
from ``r×r`` Gram matrices: ``|W_i|² = s² B_i (A Aᵀ) B_iᵀ``. All scalars are float64.

A closed form worth knowing (derived from DESIGN.md §1). With ``cos_i = p_i/(a_i b_i)``,
``σ_i² = 2(1 + cos_i)`` and ``k_i = b_i (1 + cos_i)/σ_i``, hence ``k_i/σ_i = b_i/2``
exactly and::

    d_i = W2_i − (k_i/σ_i)(n1_i + n2_i) = (b_i/2)(n2_i − n1_i)
    α_i = 1 + λ b_i/(2 a_i)          β_i = −λ/2

The deficiency is half the difference of the unit rows, scaled by ``|W2_i|``. The
coefficients need only the two row norms; the formula is continuous at the
antiparallel case (``n1 = −n2`` gives ``d = W2``, as DESIGN.md requires) and avoids
the cancellation in ``σ`` that makes the published per-row loop unstable there.
"""

from __future__ import annotations

import numpy as np

from excise.pem.delta import LowRankDelta, Module, RowDelta

__all__ = [
    "as_float64",
    "ext_sub_coefficients",
    "ext_sub_rows_reference",
    "row_combine",
    "row_dots",
    "row_norms",
]

_F64 = np.float64
# Rounding bound for a quadratic form x G xᵀ in float64, as a multiple of eps·|x|²·tr(G).
_GRAM_RTOL = 64 * np.finfo(_F64).eps


def _f64(x: np.ndarray) -> np.ndarray:
    return x.astype(_F64, copy=False)


def row_norms(m: Module) -> np.ndarray:
    """Per-row Euclidean norm of a module's effective delta, float64, shape ``(rows,)``.

    For a LoRA the norm comes from the Gram matrix ``G = A Aᵀ``. Rows whose squared
    norm is at most the float64 rounding bound of that quadratic form,
    ``RTOL·s²·tr(G)·|B_i|²``, are returned as exact zeros, so a row of ``B`` in the
    null space of ``Aᵀ`` is recognised as a zero row. Rows that clear the bound even
    with ``|B_i|²`` replaced by ``|B|_F²`` (one BLAS dot product) need no ``|B_i|²`` of
    their own; only the rest — typically just the zero rows — are tested one by one.
    """
    if isinstance(m, RowDelta):
        return np.linalg.norm(_f64(m.rows), axis=1)  # (rows,)
    B, A = _f64(m.B), _f64(m.A)  # (out, r), (r, in)
    G = A @ A.T  # (r, r)
    s2 = m.scale * m.scale
    sq = np.einsum("ij,ij->i", B @ G, B)  # (out,), without s²
    bound = _GRAM_RTOL * float(G.diagonal().sum())  # per unit |B_i|²
    flat = B.reshape(-1)
    uncertain = (sq <= bound * float(flat @ flat)).nonzero()[0]  # (k,); Σ_i |B_i|² ≥ each |B_i|²
    if uncertain.size:
        rows = B[uncertain]  # (k, r)
        below = sq[uncertain] <= bound * np.einsum("ij,ij->i", rows, rows)
        sq[uncertain[below]] = 0.0  # rounding noise: a zero row; every other sq is > 0
    sq *= s2
    return np.sqrt(sq, out=sq)


def as_float64(m: Module) -> Module:
    """The module with ``B`` (or the rows) in float64, converted once for several uses.

    ``A`` is kept as it is: it only enters Gram matrices (converted there, ``r×in``)
    and the result's stacked ``A`` unchanged.
    """
    if isinstance(m, RowDelta):
        return RowDelta(_f64(m.rows), m.shape)
    return LowRankDelta(_f64(m.B), m.A, m.scale)


def row_dots(m1: Module, m2: Module) -> np.ndarray:
    """Per-row dot product ``W1_i · W2_i`` of two modules' deltas, float64, ``(rows,)``."""
    if isinstance(m1, RowDelta) and isinstance(m2, RowDelta):
        return np.einsum("ij,ij->i", _f64(m1.rows), _f64(m2.rows))  # (rows,)
    assert isinstance(m1, LowRankDelta) and isinstance(m2, LowRankDelta)
    G12 = _f64(m1.A) @ _f64(m2.A).T  # (r1, r2)
    return m1.scale * m2.scale * np.einsum("ij,ij->i", _f64(m1.B) @ G12, _f64(m2.B))  # (out,)


def row_combine(
    terms: list[tuple[np.ndarray | float, Module]], *, dtype: np.dtype | type | None = None
) -> Module:
    """``W = Σ_k diag(c_k) W_k`` for modules of one kind; exact and rank-additive.

    Args:
        terms: pairs ``(c_k, W_k)``; ``c_k`` is a scalar or a ``(rows,)`` array.
        dtype: dtype of the result's ``B`` (LoRA only). Each entry is the float64
            product ``c_k s_k B_k`` rounded once to it — what a cast on writing would
            give — so an operator whose output is written in float32 skips the float64
            copy. Default float64.

    Returns:
        A :class:`LowRankDelta` of rank ``Σ r_k`` with scale 1 — ``B`` in ``dtype``,
        ``A`` the inputs' ``A`` stacked unchanged (nothing multiplies it) — or a
        float64 :class:`RowDelta` when the inputs are dense rows.
    """
    first = terms[0][1]
    if isinstance(first, RowDelta):
        rows = sum(_as_column(c, first.rows.shape[0]) * _f64(m.rows) for c, m in terms)
        return RowDelta(rows, first.shape)  # (rows, dim)
    n_rows = first.B.shape[0]
    B = np.empty((n_rows, sum(m.rank for _, m in terms)), dtype=dtype or _F64)  # (out, Σ r_k)
    start = 0
    for c, m in terms:
        assert isinstance(m, LowRankDelta)
        coef = _as_column(c, n_rows)
        # One pass per block, written in place: diag(c_k) s_k B_k, computed in float64.
        np.multiply(m.B, coef * m.scale, out=B[:, start : start + m.rank], dtype=_F64, casting="same_kind")
        start += m.rank
    blocks_A = [m.A for _, m in terms]  # (r_k, in) each
    A = blocks_A[0] if len(blocks_A) == 1 else np.concatenate(blocks_A, axis=0)  # (Σ r_k, in)
    return LowRankDelta(B, A, 1.0)


def _as_column(c: np.ndarray | float, n: int) -> np.ndarray | float:
    if isinstance(c, np.ndarray):
        assert c.shape == (n,), f"coefficient shape {c.shape} != ({n},)"
        return _f64(c)[:, None]  # (rows, 1)
    return float(c)


def ext_sub_coefficients(a: np.ndarray, b: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Row coefficients of Ext-Sub, ``W_i = α_i W1_i + β_i W2_i`` (DESIGN.md §1).

    Uses the closed form ``α_i = 1 + λ b_i/(2 a_i)``, ``β_i = −λ/2`` (module docstring).
    Degenerate rows are defined, never NaN: ``W2_i = 0`` or ``W1_i = 0`` means nothing
    is removed (``α_i = 1, β_i = 0``); ``n1_i = −n2_i`` needs no special case.

    Args:
        a: ``(rows,)`` norms of the expert rows, float64.
        b: ``(rows,)`` norms of the anti-expert rows, float64.
        lam: the subtraction weight λ.

    Returns:
        ``(alpha, beta)``, each ``(rows,)`` float64.
    """
    active = (a > 0) & (b > 0)  # (rows,)
    if active.all():  # the usual case: no degenerate row
        return 1.0 + (lam / 2.0) * (b / a), np.full(a.shape, -lam / 2.0)
    safe_a = np.where(active, a, 1.0)
    alpha = np.where(active, 1.0 + (lam / 2.0) * (b / safe_a), 1.0)  # (rows,)
    beta = np.where(active, -lam / 2.0, 0.0)  # (rows,)
    return alpha, beta


def ext_sub_rows_reference(W1: np.ndarray, W2: np.ndarray, lam: float) -> np.ndarray:
    """Ext-Sub on dense rows, written like the published algorithm (reference only).

    ``n = W/|W|``, ``c = (n1 + n2)/|n1 + n2|``, ``g = (W2·c) c``, ``d = W2 − g``,
    ``W = W1 − λ d`` — vectorised over rows, in float64. Degenerate rows follow
    DESIGN.md §1 (the published code returns NaN there): ``W1_i = 0`` or ``W2_i = 0``
    removes nothing; ``n1_i = −n2_i`` makes the whole ``W2_i`` the deficiency.

    Args:
        W1: ``(rows, dim)`` expert rows.
        W2: ``(rows, dim)`` anti-expert rows.
        lam: the subtraction weight λ.

    Returns:
        ``(rows, dim)`` float64 result.
    """
    W1, W2 = _f64(W1), _f64(W2)
    a = np.linalg.norm(W1, axis=1, keepdims=True)  # (rows, 1)
    b = np.linalg.norm(W2, axis=1, keepdims=True)  # (rows, 1)
    n1 = W1 / np.where(a > 0, a, 1.0)  # (rows, dim)
    n2 = W2 / np.where(b > 0, b, 1.0)  # (rows, dim)
    common = n1 + n2  # (rows, dim)
    sigma = np.linalg.norm(common, axis=1, keepdims=True)  # (rows, 1)
    antiparallel = sigma <= 1e-12
    c = common / np.where(antiparallel, 1.0, sigma)  # (rows, dim)
    g = np.einsum("ij,ij->i", W2, c)[:, None] * c  # (rows, dim)
    d = np.where(antiparallel, W2, W2 - g)  # (rows, dim)
    d = np.where((a > 0) & (b > 0), d, 0.0)
    return W1 - lam * d
