"""Every judge kind, in one literal list, and :func:`load_judge` that picks one by spec.

A judge spec is one string (DESIGN.md §3, "judges are pluggable"):

======================  =================================================================
``refusal``             refusal-marker heuristic (GCG test prefixes): flagged = no refusal
``harm-lm``             offline default for the harmful rate: SmolLM2-135M-Instruct reading the
                        pair as its chat, LoRA on layers 13-16 and a head trained on PKU-SafeRLHF
                        train- and judge-side responses and HH-RLHF pairs, calibrated
``harm-cross``          the earlier default: all-MiniLM-L6-v2 fine-tuned (LoRA) as a cross-encoder
                        on (prompt, response) pairs of PKU-SafeRLHF ``judge`` prompts, calibrated
``harm-probe``          the earlier offline harm judge: a logistic probe on all-MiniLM-L6-v2
                        embeddings, same data (weaker; kept for comparison)
``toxicity-probe``      offline default for toxicity: the same kind of probe, trained on
                        RealToxicityPrompts texts with Perspective scores
``probe:<file>``        a probe written by ``excise eval judge-train --out FILE``
``cross:<file>``        a cross-encoder written by ``excise eval judge-train --kind harm-cross``
``harm-lm:<folder>``    a causal-LM reader with a trained top, written by ``excise eval
                        judge-train --kind harm-lm``
``hf:<id or folder>``   a Hugging Face sequence classifier (unsafe/toxic label probability) or
                        a Llama-Guard-style causal LM (P("unsafe") of the first token)
``openai:<base url>``   an OpenAI-compatible endpoint asked to answer ``safe`` / ``unsafe``
                        (option ``model=NAME``; API key from ``$OPENAI_API_KEY``)
======================  =================================================================

Options (``load_judge(spec, threshold=0.7)``, or ``--judge-option threshold=0.7`` on the
command line, parsed by :func:`~excise.evaluate.judges.common.parse_options`) go to the
judge's constructor; an unknown option is an error naming the accepted ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from excise.errors import ConfigError
from excise.evaluate.judges.base import Judge
from excise.evaluate.judges.common import construct_judge, file_digest

__all__ = ["JUDGES", "JudgeKind", "judge_identity", "load_judge"]


@dataclass(frozen=True)
class JudgeKind:
    """One row of the registry.

    Attributes:
        name: the spec word (``refusal``) or prefix (``hf`` for ``hf:<target>``).
        make: builds the judge from ``target`` (the text after ``name:``, or ``None``) and options.
        takes_target: whether the spec is ``name:<target>``.
        summary: one line for ``--help`` and docs.
        target_optional: the bare ``name`` is valid too (``make`` gets ``None``: the shipped one).
    """

    name: str
    make: Callable[..., Judge]
    takes_target: bool
    summary: str
    target_optional: bool = False


def _refusal(target: None, **options: Any) -> Judge:
    from excise.evaluate.judges.refusal import RefusalJudge

    return construct_judge(RefusalJudge, "refusal", options)


def _shipped_probe(name: str) -> Callable[..., Judge]:
    def make(target: None, **options: Any) -> Judge:
        from excise.evaluate.judges.probe import SHIPPED, ProbeJudge

        return construct_judge(ProbeJudge, name, options, SHIPPED[name])

    return make


def _shipped_cross(target: None, **options: Any) -> Judge:
    from excise.evaluate.judges.cross import CROSS_SHIPPED, CrossJudge

    return construct_judge(CrossJudge, "harm-cross", options, CROSS_SHIPPED)


def _cross_file(target: str, **options: Any) -> Judge:
    from excise.evaluate.judges.cross import CrossJudge

    return construct_judge(CrossJudge, "cross", options, target)


def _lm_folder(target: str | None, **options: Any) -> Judge:
    from excise.evaluate.judges.lm import LM_SHIPPED, LMJudge

    return construct_judge(LMJudge, "harm-lm", options, target or LM_SHIPPED)


def _probe_file(target: str, **options: Any) -> Judge:
    from excise.evaluate.judges.probe import ProbeJudge

    return construct_judge(ProbeJudge, "probe", options, target)


def _hf(target: str, **options: Any) -> Judge:
    from excise.evaluate.judges.hf import load_hf_judge

    return load_hf_judge(target, **options)


def _openai(target: str, **options: Any) -> Judge:
    from excise.evaluate.judges.endpoint import EndpointJudge

    return construct_judge(EndpointJudge, "openai", options, target)


JUDGES: dict[str, JudgeKind] = {
    kind.name: kind
    for kind in [
        JudgeKind("refusal", _refusal, False, "refusal-marker heuristic (GCG test prefixes)"),
        JudgeKind(
            "harm-lm",
            _lm_folder,
            True,
            "offline harmful-response judge (SmolLM2-135M reader, LoRA top, PKU-SafeRLHF + HH-RLHF); "
            "harm-lm:<folder> for one written by `judge-train --kind harm-lm`",
            target_optional=True,
        ),
        JudgeKind(
            "harm-cross",
            _shipped_cross,
            False,
            "earlier offline harmful-response judge (MiniLM cross-encoder, PKU-SafeRLHF judge side)",
        ),
        JudgeKind(
            "harm-probe",
            _shipped_probe("harm-probe"),
            False,
            "offline harmful-response probe (MiniLM embeddings, PKU-SafeRLHF judge-side prompts)",
        ),
        JudgeKind(
            "toxicity-probe",
            _shipped_probe("toxicity-probe"),
            False,
            "offline toxicity probe (MiniLM embeddings, RealToxicityPrompts Perspective scores)",
        ),
        JudgeKind("probe", _probe_file, True, "a probe file written by `excise eval judge-train`"),
        JudgeKind(
            "cross", _cross_file, True, "a cross-encoder file written by `judge-train --kind harm-cross`"
        ),
        JudgeKind("hf", _hf, True, "Hugging Face sequence classifier or Llama-Guard-style causal LM"),
        JudgeKind("openai", _openai, True, "OpenAI-compatible endpoint answering safe/unsafe (model=NAME)"),
    ]
}


def load_judge(spec: str, **options: Any) -> Judge:
    """The judge a spec names (see the module docstring), built with ``options``.

    Args:
        spec: ``refusal``, ``harm-lm``, ``harm-cross``, ``harm-probe``, ``toxicity-probe``,
            ``probe:<file>``, ``cross:<file>``, ``harm-lm:<folder>``, ``hf:<hub id or folder>`` or
            ``openai:<base url>``.
        **options: constructor options of that judge (e.g. ``threshold``, ``model``).

    Returns:
        An object satisfying :class:`~excise.evaluate.judges.base.Judge`.

    Raises:
        ConfigError: unknown spec, a missing or unexpected target, or an unknown option.
        ModelLoadError: a model-backed judge cannot load its model.
    """
    name, sep, target = spec.strip().partition(":")
    kind = JUDGES.get(name)
    if kind is None:
        raise ConfigError(f"unknown judge {spec!r}; choose one of: {_choices()}")
    if kind.takes_target and not target.strip() and (sep or not kind.target_optional):
        shipped = f", or just {name!r} for the shipped one" if kind.target_optional else ""
        raise ConfigError(f"judge {name!r} needs a target: {name}:<...>{shipped} ({kind.summary})")
    if not kind.takes_target and sep:
        raise ConfigError(f"judge {name!r} takes no target; write just {name!r}")
    return kind.make((target.strip() or None) if kind.takes_target else None, **options)


def judge_identity(spec: str) -> dict[str, Any]:
    """What identifies the judge ``spec`` names without loading it: the spec and the content
    digest of the files it reads (a ``probe:`` / ``cross:`` file, an ``hf:`` folder, a shipped
    judge's weights); for a hub id, the cached snapshot's revision where one is cached.

    Caches key on this, not on the spec alone: a judge retrained into the same file is another judge.
    """
    name, _, target = spec.strip().partition(":")
    target = target.strip()
    identity: dict[str, Any] = {"spec": spec}
    files: list[Path] = []
    if name in ("harm-probe", "toxicity-probe"):
        from excise.evaluate.judges.probe import SHIPPED

        files = [SHIPPED[name]]
    elif name == "harm-cross":
        from excise.evaluate.judges.cross import CROSS_SHIPPED

        files = [CROSS_SHIPPED]
    elif name == "harm-lm":
        from excise.evaluate.judges.lm import LM_SHIPPED, METADATA_FILE, WEIGHTS_FILE

        # The two files that make the judge; a sidecar of measured figures beside them is not part
        # of it. The reader's weights are named by their fingerprint inside judge.json.
        folder = Path(target).expanduser() if target else LM_SHIPPED
        files = [folder / WEIGHTS_FILE, folder / METADATA_FILE] if folder.is_dir() else []
        if files:
            identity["sha256"] = {p.name: file_digest(p) for p in files if p.is_file()}
        return identity
    elif name in ("probe", "cross", "hf") and target:
        path = Path(target).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        elif name == "hf":
            identity["revision"] = _hub_revision(target)
    if files:
        root = files[0].parent if len(files) == 1 else Path(target).expanduser()
        identity["sha256"] = {p.relative_to(root).as_posix(): file_digest(p) for p in files if p.is_file()}
    return identity


def _hub_revision(repo: str) -> str | None:
    """The commit of the locally cached snapshot of hub model ``repo`` (its config), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "config.json")
    except (ValueError, OSError):  # not a valid repo id: the spec alone identifies it
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None


def _choices() -> str:
    def shown(kind: JudgeKind) -> str:
        if not kind.takes_target:
            return kind.name
        return f"{kind.name}[:<...>]" if kind.target_optional else f"{kind.name}:<...>"

    return ", ".join(shown(k) for k in JUDGES.values())
