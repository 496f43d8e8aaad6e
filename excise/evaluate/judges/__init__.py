"""Judges behind one interface (:class:`~excise.evaluate.judges.base.Judge`)."""

from excise.evaluate.judges.base import Judge

__all__ = ["Judge"]
