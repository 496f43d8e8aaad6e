"""Dataset loaders and prompt formatting: a hub id or a local file (DESIGN.md §4, ``data/``)."""

from excise.data.records import load_records, parse_hub_spec, require_fields
from excise.data.splits import STANDARD_SPLITS, assign_split, prompt_key, split_by_prompt

__all__ = [
    "STANDARD_SPLITS",
    "assign_split",
    "load_records",
    "parse_hub_spec",
    "prompt_key",
    "require_fields",
    "split_by_prompt",
]
