"""Addition of two PEMs, ``θa + w·θb`` (the PEM-arithmetic baseline of arXiv 2308.08090).

Exact for LoRA: ``[sa·Ba, w·sb·Bb]·[Aa; Ab]``, rank ``ra + rb``. For (IA)³ the sum is
taken on ``l − 1``; for prefix tuning on the prefix vectors.
"""

from __future__ import annotations

from excise.pem.delta import Adapter, Module
from excise.pem.linalg import row_combine
from excise.pem.ops.base import ModuleSink, apply_modulewise, check_finite, rank_in_dense

__all__ = ["add", "add_dense"]


def _add_module(a: Module | None, b: Module | None, weight: float) -> Module:
    """One module: ``Wa + w·Wb``; a missing side counts as zero."""
    terms = [(1.0, a)] if a is not None else []
    if b is not None:
        terms.append((weight, b))
    return row_combine(terms)


def _add_module_dense(a: Module | None, b: Module | None, weight: float) -> Module:
    like = a if a is not None else b
    W = sum(c * m.dense() for c, m in ((1.0, a), (weight, b)) if m is not None)
    return rank_in_dense(W, like)


def add(
    a: Adapter,
    b: Adapter,
    *,
    weight: float = 1.0,
    allow_partial: bool = False,
    on_module: ModuleSink | None = None,
) -> Adapter:
    """Return ``θa + weight·θb``.

    Args:
        a: first adapter.
        b: second adapter, same base model.
        weight: multiplier of ``b`` (finite).
        allow_partial: modules present in one adapter only are kept as they are.
        on_module: stream the result module by module (:func:`~excise.pem.ops.base.apply_modulewise`).

    Returns:
        An adapter of rank ``ra + rb`` per module (LoRA).

    Raises:
        ConfigError: weight not finite.
        AdapterError: incompatible adapters.
    """
    weight = check_finite("weight", weight)
    return apply_modulewise(
        [a, b],
        lambda ms: _add_module(ms[0], ms[1], weight),
        allow_partial=allow_partial,
        operation="add",
        params={"weight": weight},
        on_module=on_module,
    )


def add_dense(
    a: Adapter,
    b: Adapter,
    *,
    weight: float = 1.0,
    allow_partial: bool = False,
    on_module: ModuleSink | None = None,
) -> Adapter:
    """:func:`add` on dense deltas, output of rank ``in`` (reference only)."""
    weight = check_finite("weight", weight)
    return apply_modulewise(
        [a, b],
        lambda ms: _add_module_dense(ms[0], ms[1], weight),
        allow_partial=allow_partial,
        operation="add_dense",
        params={"weight": weight},
        on_module=on_module,
    )
