"""The published Ext-Sub algorithm for LoRA, re-implemented as the benchmark's baseline.

Credit: this follows ``weigth_extraction_before_subtraction`` (the ``LORA`` branch)
and ``merge_lora_weight`` in ``ext_sub.py`` of the authors' code,
https://github.com/HITsz-TMG/Ext-Sub (arXiv 2308.08090, "Separate the Wheat from the
Chaff: Model Deficiency Unlearning via Parameter-Efficient Module Operation").
It is a re-implementation written for timing, not a copy of that file. What it keeps,
on purpose, because that is what is being measured:

- torch, float32: each module's delta is densified as ``B.float() @ A.float()``;
- rows normalised, common feature ``(n1 + n2)/|n1 + n2|``, then a **Python loop over
  rows** doing ``torch.dot(W2[i], c[i]) * c[i]``, the rows stacked, and
  ``W1 − λ·W2 + λ·proj``;
- the output form: ``lora_B`` = the dense ``(out, in)`` result, ``lora_A`` = the
  ``(in, in)`` identity (:func:`published_output_bytes` gives its size).

Where it departs from the published code, and why:

- The published code ignores the LoRA scale while computing and writes the expert's
  ``lora_alpha / r`` into the output config, so its effective result is
  ``s·(B1A1 − λ d(B2A2))``. Here the expert's scale ``s`` is applied to both dense
  deltas first; with equal scales (as in the benchmark) that is the same result,
  and it makes the output directly comparable with excise's.
- The published code densifies *every* module of both adapters before the first
  projection (two full dense adapters in memory: 17.8 GB for q,v at 32 layers).
  Here one module is densified at a time, so the full LLaMA-7B shape fits in RAM;
  the arithmetic per module is the same, so the time is comparable and, if
  anything, lower (less memory traffic).
- Inputs are read with ``safetensors.torch.load_file`` instead of ``torch.load`` of
  an ``adapter_model.bin``, and the result is not written (8+ GB); its size is
  computed from the shapes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["ReferenceModule", "load_lora", "module_name", "published_output_bytes", "reference_ext_sub"]

_LORA_KEY = re.compile(r"^(?P<name>.+)\.lora_(?P<which>[AB])\.weight$")
_FP32_BYTES = 4


@dataclass(frozen=True)
class ReferenceModule:
    """One module's result and where its time went (seconds).

    Attributes:
        key: the ``lora_B`` key the published code would overwrite.
        W: ``(out, in)`` float32 dense result, ``s·(W1 − λ·d)``.
        densify_s: both ``B @ A`` products.
        normalise_s: row norms, unit rows and the common feature.
        row_loop_s: the Python loop over rows and the stack.
        combine_s: ``W1 − λ·W2 + λ·proj``.
    """

    key: str
    W: torch.Tensor
    densify_s: float
    normalise_s: float
    row_loop_s: float
    combine_s: float

    @property
    def total_s(self) -> float:
        return self.densify_s + self.normalise_s + self.row_loop_s + self.combine_s


def load_lora(folder: str | Path) -> tuple[dict[str, torch.Tensor], float]:
    """All tensors of a PEFT LoRA folder and its scale ``lora_alpha / r`` (as the published code)."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    return load_file(str(folder / "adapter_model.safetensors")), config["lora_alpha"] / config["r"]


def reference_ext_sub(
    weights_1: dict[str, torch.Tensor],
    weights_2: dict[str, torch.Tensor],
    *,
    scale: float,
    lam: float,
) -> Iterator[ReferenceModule]:
    """Ext-Sub module by module, as the published row loop; yields each timed result.

    Args:
        weights_1: expert state dict (``…lora_A.weight`` ``(r, in)``, ``…lora_B.weight`` ``(out, r)``).
        weights_2: anti-expert state dict, same keys and shapes.
        scale: the expert's LoRA scale, applied to both dense deltas.
        lam: the subtraction weight λ (the published ``--alpha``).

    Yields:
        One :class:`ReferenceModule` per ``lora_B`` key, in state-dict order. The
        time spent by the consumer between two yields is not counted.
    """
    for key in weights_1:
        if ".lora_B." not in key:
            continue
        key_A = key.replace(".lora_B.", ".lora_A.")
        t0 = time.perf_counter()
        W1 = scale * torch.matmul(weights_1[key].float(), weights_1[key_A].float())  # (out, in)
        W2 = scale * torch.matmul(weights_2[key].float(), weights_2[key_A].float())  # (out, in)
        t1 = time.perf_counter()
        n1 = W1 / torch.norm(W1, dim=-1, keepdim=True)  # (out, in)
        n2 = W2 / torch.norm(W2, dim=-1, keepdim=True)  # (out, in)
        common = n1 + n2  # (out, in)
        c = common / torch.norm(common, dim=-1, keepdim=True)  # (out, in)
        t2 = time.perf_counter()
        proj = []
        for i in range(W2.size(0)):  # the published per-row loop, kept on purpose
            proj.append(torch.dot(W2[i], c[i]) * c[i])  # (in,)
        proj = torch.stack(proj)  # (out, in)
        t3 = time.perf_counter()
        W = W1 - lam * W2 + lam * proj  # (out, in)
        t4 = time.perf_counter()
        yield ReferenceModule(key, W, t1 - t0, t2 - t1, t3 - t2, t4 - t3)


def published_output_bytes(weights: dict[str, torch.Tensor]) -> int:
    """Tensor bytes of the published output: per module ``lora_B`` ``(out, in)``, ``lora_A`` ``I (in, in)``.

    Float32, as for float32 inputs (the published code casts back to the input dtype);
    the file header (a few kB) is not counted.
    """
    total = 0
    for key, A in weights.items():
        if ".lora_A." in key:
            n_out, n_in = weights[key.replace(".lora_A.", ".lora_B.")].shape[0], A.shape[1]
            total += (n_out * n_in + n_in * n_in) * _FP32_BYTES
    return total


def module_name(key: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj.lora_B.weight`` → ``model.layers.0.mlp.up_proj``."""
    match = _LORA_KEY.match(key.removeprefix("base_model.model."))
    assert match is not None, key
    return match["name"]
