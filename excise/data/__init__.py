"""Dataset loaders and prompt formatting: a hub id or a local file (DESIGN.md §4, ``data/``)."""

from excise.data.records import load_records, parse_hub_spec, require_fields

__all__ = ["load_records", "parse_hub_spec", "require_fields"]
