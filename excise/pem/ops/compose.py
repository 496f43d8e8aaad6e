"""Composition: several anti-experts removed from one expert (arXiv 2308.08090; DESIGN.md §1).

Parallel (default): each deficiency ``d_k`` is extracted against the *same* expert and
all are subtracted, ``θ+ − Σ_k λ_k d_k`` — independent of the order of the
anti-experts. Per row that is ``α_i = 1 + Σ_k (α_{k,i} − 1)``, ``β_{k,i}`` from
:func:`~excise.pem.linalg.ext_sub_coefficients`: an exact LoRA of rank ``r1 + Σ r_k``.

Sequential: Ext-Sub applied one anti-expert after the other, each against the
result so far (order matters); offered for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

from excise.errors import ConfigError
from excise.pem.delta import Adapter, Module
from excise.pem.linalg import ext_sub_coefficients, ext_sub_rows_reference, row_combine, row_norms
from excise.pem.ops.base import ModuleSink, apply_modulewise, check_finite, rank_in_dense, result_dtype
from excise.pem.ops.ext_sub import _ext_sub_module, _ext_sub_module_dense

__all__ = ["compose", "compose_dense"]


def _compose_module(
    modules: list[Module | None], lams: list[float], sequential: bool, dtype: type | None = None
) -> Module | None:
    """One module: ``W1 − Σ λ_k d_k`` (parallel) or repeated Ext-Sub (sequential, float64
    between the steps); the result's ``B`` in ``dtype``."""
    expert, anti_experts = modules[0], modules[1:]
    if expert is None:
        return None
    if sequential:
        result: Module = row_combine([(1.0, expert)])
        for anti, lam in zip(anti_experts, lams, strict=True):
            result = _ext_sub_module(result, anti, lam)
        return row_combine([(1.0, result)], dtype=dtype)
    a = row_norms(expert)  # (out,)
    alpha = 1.0
    terms = []
    for anti, lam in zip(anti_experts, lams, strict=True):
        if anti is None:
            continue
        alpha_k, beta_k = ext_sub_coefficients(a, row_norms(anti), lam)  # (out,)
        alpha = alpha + (alpha_k - 1.0)
        terms.append((beta_k, anti))
    return row_combine([(alpha, expert), *terms], dtype=dtype)


def _compose_module_dense(modules: list[Module | None], lams: list[float], sequential: bool) -> Module | None:
    expert, anti_experts = modules[0], modules[1:]
    if expert is None:
        return None
    if sequential:
        result: Module = expert
        for anti, lam in zip(anti_experts, lams, strict=True):
            result = _ext_sub_module_dense(result, anti, lam)
        return result
    W1 = expert.dense()  # (out, in)
    W = W1.copy()
    for anti, lam in zip(anti_experts, lams, strict=True):
        if anti is not None:
            W += ext_sub_rows_reference(W1, anti.dense(), lam) - W1  # −λ_k d_k
    return rank_in_dense(W, expert)


def _lams(lams: float | Sequence[float], n: int) -> list[float]:
    values = [lams] * n if isinstance(lams, int | float) else list(lams)
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ConfigError(
            f"give one λ for all anti-experts or one per anti-expert: got {len(values)} for {n}"
        )
    return [check_finite("lam", v) for v in values]


def compose(
    expert: Adapter,
    *anti_experts: Adapter,
    lams: float | Sequence[float] = 1.0,
    sequential: bool = False,
    allow_partial: bool = False,
    on_module: ModuleSink | None = None,
) -> Adapter:
    """Remove several deficiencies from one expert.

    Args:
        expert: the expert PEM θ+.
        *anti_experts: one or more anti-expert PEMs.
        lams: one λ for all, or one per anti-expert (finite).
        sequential: apply Ext-Sub one after the other instead of in parallel.
        allow_partial: combine only shared modules (see :func:`ext_sub`).
        on_module: stream the result module by module (:func:`~excise.pem.ops.base.apply_modulewise`).

    Returns:
        An adapter of rank ``r1 + Σ r_k`` per module (LoRA).

    Raises:
        ConfigError: no anti-expert, a λ count that does not match, a λ not finite.
        AdapterError: incompatible adapters.
    """
    if not anti_experts:
        raise ConfigError("compose needs at least one anti-expert")
    values = _lams(lams, len(anti_experts))
    dtype = result_dtype(expert)
    return apply_modulewise(
        [expert, *anti_experts],
        lambda ms: _compose_module(ms, values, sequential, dtype),
        allow_partial=allow_partial,
        operation="compose",
        params={"lams": values, "sequential": sequential},
        on_module=on_module,
    )


def compose_dense(
    expert: Adapter,
    *anti_experts: Adapter,
    lams: float | Sequence[float] = 1.0,
    sequential: bool = False,
    allow_partial: bool = False,
    on_module: ModuleSink | None = None,
) -> Adapter:
    """:func:`compose` on dense deltas, output of rank ``in`` (reference only)."""
    if not anti_experts:
        raise ConfigError("compose needs at least one anti-expert")
    values = _lams(lams, len(anti_experts))
    return apply_modulewise(
        [expert, *anti_experts],
        lambda ms: _compose_module_dense(ms, values, sequential),
        allow_partial=allow_partial,
        operation="compose_dense",
        params={"lams": values, "sequential": sequential},
        on_module=on_module,
    )
