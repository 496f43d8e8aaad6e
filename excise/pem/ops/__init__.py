"""Exact, rank-additive operators on PEMs (DESIGN.md §1), one file each."""

from excise.pem.ops.add import add, add_dense
from excise.pem.ops.base import Operator
from excise.pem.ops.compose import compose, compose_dense
from excise.pem.ops.ext_sub import ext_sub, ext_sub_dense
from excise.pem.ops.negate import negate, negate_dense
from excise.pem.ops.registry import OPERATORS, get_operator
from excise.pem.ops.scale import scale, scale_dense
from excise.pem.ops.subtract import subtract, subtract_dense

__all__ = [
    "OPERATORS",
    "Operator",
    "add",
    "add_dense",
    "compose",
    "compose_dense",
    "ext_sub",
    "ext_sub_dense",
    "get_operator",
    "negate",
    "negate_dense",
    "scale",
    "scale_dense",
    "subtract",
    "subtract_dense",
]
