"""Scaling ``w·θ`` of one PEM. For LoRA only the scale changes: the rank is kept."""

from __future__ import annotations

from excise.pem.delta import Adapter, Module
from excise.pem.linalg import row_combine
from excise.pem.ops.base import ModuleSink, apply_modulewise, check_finite, rank_in_dense

__all__ = ["scale", "scale_dense"]


def _scale_module(m: Module | None, weight: float) -> Module:
    assert m is not None
    return row_combine([(weight, m)])


def _scale_module_dense(m: Module | None, weight: float) -> Module:
    assert m is not None
    return rank_in_dense(weight * m.dense(), m)


def scale(
    adapter: Adapter,
    *,
    weight: float,
    on_module: ModuleSink | None = None,
) -> Adapter:
    """Return ``weight·θ``.

    Args:
        adapter: the adapter to scale.
        weight: the factor (finite).
        on_module: stream the result module by module (:func:`~excise.pem.ops.base.apply_modulewise`).

    Returns:
        An adapter with the same ranks.

    Raises:
        ConfigError: weight not finite.
    """
    weight = check_finite("weight", weight)
    return apply_modulewise(
        [adapter],
        lambda ms: _scale_module(ms[0], weight),
        allow_partial=False,
        operation="scale",
        params={"weight": weight},
        on_module=on_module,
    )


def scale_dense(adapter: Adapter, *, weight: float, on_module: ModuleSink | None = None) -> Adapter:
    """:func:`scale` on the dense delta, output of rank ``in`` (reference only)."""
    weight = check_finite("weight", weight)
    return apply_modulewise(
        [adapter],
        lambda ms: _scale_module_dense(ms[0], weight),
        allow_partial=False,
        operation="scale_dense",
        params={"weight": weight},
        on_module=on_module,
    )
