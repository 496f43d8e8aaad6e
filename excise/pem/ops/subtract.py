"""Direct subtraction ``θa − λ·θb``: the Ext-Sub paper's baseline (arXiv 2308.08090).

It removes the anti-expert whole, general capability included, which is what makes
it degrade text (DESIGN.md §1). Exact for LoRA, rank ``ra + rb``.
"""

from __future__ import annotations

from excise.pem.delta import Adapter
from excise.pem.ops.add import _add_module, _add_module_dense
from excise.pem.ops.base import ModuleSink, apply_modulewise, check_finite

__all__ = ["subtract", "subtract_dense"]


def subtract(
    a: Adapter,
    b: Adapter,
    *,
    lam: float = 1.0,
    allow_partial: bool = False,
    on_module: ModuleSink | None = None,
) -> Adapter:
    """Return ``θa − lam·θb``.

    Args:
        a: the adapter to subtract from (the expert).
        b: the adapter subtracted (the anti-expert), same base model.
        lam: subtraction weight λ (finite).
        allow_partial: modules present in one adapter only are kept (``−λ·θb`` for b).
        on_module: stream the result module by module (:func:`~excise.pem.ops.base.apply_modulewise`).

    Returns:
        An adapter of rank ``ra + rb`` per module (LoRA).

    Raises:
        ConfigError: λ not finite.
        AdapterError: incompatible adapters.
    """
    lam = check_finite("lam", lam)
    return apply_modulewise(
        [a, b],
        lambda ms: _add_module(ms[0], ms[1], -lam),
        allow_partial=allow_partial,
        operation="subtract",
        params={"lam": lam},
        on_module=on_module,
    )


def subtract_dense(
    a: Adapter,
    b: Adapter,
    *,
    lam: float = 1.0,
    allow_partial: bool = False,
    on_module: ModuleSink | None = None,
) -> Adapter:
    """:func:`subtract` on dense deltas, output of rank ``in`` (reference only)."""
    lam = check_finite("lam", lam)
    return apply_modulewise(
        [a, b],
        lambda ms: _add_module_dense(ms[0], ms[1], -lam),
        allow_partial=allow_partial,
        operation="subtract_dense",
        params={"lam": lam},
        on_module=on_module,
    )
