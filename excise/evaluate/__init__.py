"""The metrics of DESIGN.md §3: batched scoring and generation, judges, result files."""
