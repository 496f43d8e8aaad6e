"""Parameter-efficient modules: reading, the low-rank representation, operators.

Tensors only: imports torch, safetensors and the standard library (STYLE.md rule 1).
"""

from excise.pem.delta import Adapter, LowRankDelta, Module, RowDelta
from excise.pem.io import load_adapter, save_adapter

__all__ = ["Adapter", "LowRankDelta", "Module", "RowDelta", "load_adapter", "save_adapter"]
