"""excise: remove a deficiency from an LLM by arithmetic on parameter-efficient modules."""

__version__ = "0.1.0"
