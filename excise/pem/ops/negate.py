"""Negation ``−λ·θ``: SKU's knowledge negation, ``θo − λ(θh − θo)`` (arXiv 2402.10058;
DESIGN.md §2), and the task-vector negation baseline.

With a LoRA the harmful module ``θh − θo`` *is* the adapter, so negation multiplies
its scale by ``−λ``: no second model, no full task vector, rank kept.
"""

from __future__ import annotations

from excise.pem.delta import Adapter
from excise.pem.ops.base import ModuleSink, apply_modulewise, check_finite
from excise.pem.ops.scale import _scale_module, _scale_module_dense

__all__ = ["negate", "negate_dense"]


def negate(adapter: Adapter, *, lam: float = 1.0, on_module: ModuleSink | None = None) -> Adapter:
    """Return ``−lam·θ``.

    Args:
        adapter: the module to negate (e.g. SKU's harmful LoRA).
        lam: negation strength λ (finite).
        on_module: stream the result module by module (:func:`~excise.pem.ops.base.apply_modulewise`).

    Returns:
        An adapter with the same ranks.

    Raises:
        ConfigError: λ not finite.
    """
    lam = check_finite("lam", lam)
    return apply_modulewise(
        [adapter],
        lambda ms: _scale_module(ms[0], -lam),
        allow_partial=False,
        operation="negate",
        params={"lam": lam},
        on_module=on_module,
    )


def negate_dense(adapter: Adapter, *, lam: float = 1.0, on_module: ModuleSink | None = None) -> Adapter:
    """:func:`negate` on the dense delta, output of rank ``in`` (reference only)."""
    lam = check_finite("lam", lam)
    return apply_modulewise(
        [adapter],
        lambda ms: _scale_module_dense(ms[0], -lam),
        allow_partial=False,
        operation="negate_dense",
        params={"lam": lam},
        on_module=on_module,
    )
