"""Judges behind one interface (:class:`~excise.evaluate.judges.base.Judge`), picked by spec.

``load_judge("refusal")``, ``load_judge("harm-probe")``, ``load_judge("hf:org/model")``,
``load_judge("openai:http://localhost:8000/v1", model="name")`` — see
:mod:`excise.evaluate.judges.registry` and docs/JUDGES.md.
"""

from excise.evaluate.judges.base import Judge
from excise.evaluate.judges.common import parse_options
from excise.evaluate.judges.registry import JUDGES, JudgeKind, load_judge

__all__ = ["JUDGES", "Judge", "JudgeKind", "load_judge", "parse_options"]
