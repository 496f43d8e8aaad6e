"""Parameter-efficient modules: reading, the low-rank representation, operators.

Tensors only: imports numpy, safetensors and the standard library at module level
(STYLE.md rule 1); torch only when a file needs it (bf16, legacy ``.bin``).
"""

from excise.pem.delta import Adapter, LowRankDelta, Module, RowDelta
from excise.pem.io import load_adapter, save_adapter

__all__ = ["Adapter", "LowRankDelta", "Module", "RowDelta", "load_adapter", "save_adapter"]
