"""LoRA settings → ``peft.LoraConfig``, and attaching a fresh adapter to a model.

The defaults are PEFT's for Llama-style models as Ext-Sub trained them (``q_proj``,
``v_proj``; HITsz-TMG/Ext-Sub ``training/train_peft.py``: r 16, alpha 32, dropout 0.05
there; r 8, alpha 16 here, as SmolLM2-sized models need less). rsLoRA scales by
``alpha / sqrt(r)`` instead of ``alpha / r`` (PEFT ``use_rslora``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from excise.errors import ConfigError, first_line

__all__ = [
    "LoraSettings",
    "attach_lora",
    "enable_activation_checkpointing",
    "save_trained",
    "trainable_parameters",
    "unfreeze_all",
]


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter's shape.

    Attributes:
        r: rank.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the adapter's input during training.
        target_modules: module name suffixes to adapt, or ``("all-linear",)`` for every linear
            layer but the output head.
        rslora: rank-stabilised scaling.
        bias: ``none``, ``lora_only`` or ``all`` (which biases train).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    rslora: bool = False
    bias: str = "none"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"LoRA rank r must be at least 1, got {self.r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("name at least one LoRA target module (e.g. q_proj), or all-linear")
        if self.bias not in ("none", "lora_only", "all"):
            raise ConfigError(f"LoRA bias must be none, lora_only or all, got {self.bias!r}")

    def to_peft_config(self) -> Any:
        """The equivalent ``peft.LoraConfig`` (task type causal LM)."""
        from peft import LoraConfig

        targets: str | list[str] = (
            "all-linear" if self.target_modules == ("all-linear",) else list(self.target_modules)
        )
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            use_rslora=self.rslora,
            bias=self.bias,
            task_type="CAUSAL_LM",
        )


def attach_lora(model: Any, settings: LoraSettings) -> Any:
    """Wrap ``model`` (mutated in place, as PEFT does) in a fresh, trainable LoRA adapter.

    The initialisation draws from torch's global RNG: seed it first for a reproducible adapter.

    Raises:
        ConfigError: a target module matches nothing in the model.
    """
    from peft import get_peft_model

    try:
        return get_peft_model(model, settings.to_peft_config())
    except ValueError as err:
        raise ConfigError(f"cannot attach LoRA: {first_line(err)}") from err


def unfreeze_all(model: Any) -> Any:
    """Full-parameter training: every parameter trains. Returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def enable_activation_checkpointing(model: Any) -> Any:
    """Recompute each decoder layer's activations in the backward instead of keeping them. Returns ``model``.

    Uses the model's own checkpointing (transformers' ``activation_checkpointing_enable``, non-reentrant
    ``torch.utils.checkpoint``, dropout masks replayed from the saved RNG state), which also
    registers the input-embedding hook PEFT needs (``enable_input_require_grads``) so that
    gradients reach a LoRA behind frozen embeddings. transformers skips it where gradients
    are off, so a reference forward under ``torch.no_grad()`` (SKU's ``p_θo``) runs as is.

    Raises:
        ConfigError: the model's architecture has no activation checkpointing.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside a PeftModel
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(base).__name__} does not support activation checkpointing; "
            "train without --gradient-checkpointing"
        )
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # also calls enable_input_require_grads
    return model


def trainable_parameters(model: Any) -> dict[str, Any]:
    """``name → parameter`` for every parameter that trains, in module order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_trained(model: Any, folder: Path, *, base: str, tokenizer: Any = None) -> None:
    """Save what trained into ``folder``: a PEFT adapter, or (full training) the model and ``tokenizer``.

    An adapter records ``base``, the model spec the user gave (alias, hub id or path), as its
    ``base_model_name_or_path``. PEFT would record the folder the weights were loaded from,
    which for an alias or a ``.gguf`` file is this machine's cache (``~/.cache/excise/models/…``)
    and names nothing elsewhere; ``train_config.json`` keeps that resolved path instead. The
    spec is set after PEFT has saved, so PEFT's own checks (is the vocabulary resized?) still
    read the local folder, not the hub.
    """
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    config_file = Path(folder) / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))  # as PEFT writes it
