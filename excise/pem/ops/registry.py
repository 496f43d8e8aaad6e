"""The operator registry: one literal list, keyed by name (STYLE.md rule 3).

The name is the file in ``excise/pem/ops/``, the recipe value and, with ``-`` for
``_``, the CLI verb (``ext_sub`` ↔ ``excise ops ext-sub``).
"""

from __future__ import annotations

from excise.errors import ConfigError
from excise.pem.ops.add import add, add_dense
from excise.pem.ops.base import Operator
from excise.pem.ops.compose import compose, compose_dense
from excise.pem.ops.ext_sub import ext_sub, ext_sub_dense
from excise.pem.ops.negate import negate, negate_dense
from excise.pem.ops.scale import scale, scale_dense
from excise.pem.ops.subtract import subtract, subtract_dense

__all__ = ["OPERATORS", "get_operator"]

_EXT_SUB = "arXiv:2308.08090"
_SKU = "arXiv:2402.10058"

OPERATORS: dict[str, Operator] = {
    op.name: op
    for op in [
        Operator(
            "ext_sub", ext_sub, ext_sub_dense, _EXT_SUB, "expert minus the anti-expert's extracted deficiency"
        ),
        Operator("compose", compose, compose_dense, _EXT_SUB, "expert minus several extracted deficiencies"),
        Operator("subtract", subtract, subtract_dense, _EXT_SUB, "direct subtraction a - lam*b (baseline)"),
        Operator("add", add, add_dense, _EXT_SUB, "addition a + weight*b"),
        Operator("scale", scale, scale_dense, "", "weight*adapter"),
        Operator("negate", negate, negate_dense, _SKU, "knowledge negation -lam*adapter"),
    ]
}


def get_operator(name: str) -> Operator:
    """Look an operator up by registry name.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    try:
        return OPERATORS[name.replace("-", "_")]
    except KeyError:
        raise ConfigError(f"unknown operator {name!r}; choose one of {', '.join(OPERATORS)}") from None
