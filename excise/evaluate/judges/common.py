"""Helpers every judge shares: input checks, ``key=value`` option parsing, construction from options."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from excise.errors import ConfigError, DataError

__all__ = ["check_pairs", "construct_judge", "parse_options"]


def check_pairs(prompts: Sequence[str], responses: Sequence[str], judge: str) -> None:
    """Raise DataError unless prompts and responses are equal-length sequences of strings."""
    if isinstance(prompts, str) or isinstance(responses, str):
        raise DataError(f"{judge} judge: pass lists of prompts and responses, not a single string")
    if len(prompts) != len(responses):
        raise DataError(
            f"{judge} judge: {len(prompts)} prompts but {len(responses)} responses; "
            "pass one prompt per response"
        )
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True), start=1):
        if not isinstance(p, str) or not isinstance(r, str):
            raise DataError(
                f"{judge} judge: pair {i} is ({type(p).__name__}, {type(r).__name__}), expected two strings"
            )


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["threshold=0.7", "model=gpt-4o-mini", "case_sensitive=false"]`` → a dict of typed values.

    Values become ``int``, ``float``, ``bool`` (``true``/``false``) or ``None`` (``none``) where
    they read as one, and stay strings otherwise; a comma-separated value stays one string.

    Raises:
        ConfigError: an item has no ``=`` or an empty key.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"judge option {item!r} is not KEY=VALUE (e.g. threshold=0.7)")
        options[key] = _typed(value.strip())
    return options


def _typed(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def construct_judge(cls: type, name: str, options: dict[str, Any], *args: Any) -> Any:
    """``cls(*args, **options)``, with unknown options reported as one ConfigError line."""
    accepted = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ][len(args) :]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"judge {name!r} has no option(s) {', '.join(unknown)}; it accepts: {', '.join(accepted)}"
        )
    return cls(*args, **options)


class TrainedTop:
    """Save and load what a judge's training changes: the parameters of its backbone (attribute
    ``backbone``: ``encoder``, ``decoder``) that require a gradient, and its ``head``. Mixed into the
    cross-encoder and the LM reader (``torch.nn.Module`` subclasses)."""

    backbone: str
    what: str  # for errors: "cross-encoder weights do not fit the model"

    def trainable_state(self) -> dict[str, Any]:
        """The tensors training changes (LoRA, trained norms, the head): what is saved."""
        model = getattr(self, self.backbone)
        state = {f"{self.backbone}.{n}": p for n, p in model.named_parameters() if p.requires_grad}
        state.update({f"head.{n}": p for n, p in self.head.named_parameters()})  # type: ignore[attr-defined]
        return {k: v.detach().contiguous() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        """Load :meth:`trainable_state` tensors; any missing or extra name is an error."""
        import torch

        from excise.errors import ModelLoadError

        expected = set(self.trainable_state())
        if set(state) != expected:
            raise ModelLoadError(
                f"{self.what}: missing {sorted(expected - set(state))[:3]}, "
                f"unexpected {sorted(set(state) - expected)[:3]}"
            )
        with torch.no_grad():
            params = dict(self.named_parameters())  # type: ignore[attr-defined]
            for name, tensor in state.items():
                params[name].copy_(tensor)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, computed once per process for an unchanged file (size, mtime)."""
    from excise.data import file_sha256

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]
