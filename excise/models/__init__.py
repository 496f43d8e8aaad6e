"""Base models and tokenizers: hub id, local folder, GGUF file or alias (DESIGN.md §4)."""

from excise.models.loading import (
    ALIASES,
    GgufAlias,
    cache_root,
    load_model,
    load_tokenizer,
    resolve_model,
)
from excise.models.merge import merge_adapter

__all__ = [
    "ALIASES",
    "GgufAlias",
    "cache_root",
    "load_model",
    "load_tokenizer",
    "merge_adapter",
    "resolve_model",
]
