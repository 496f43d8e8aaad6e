"""Does a PEFT adapter fit a base model? Checked once, up front, before either is loaded.

The base model's module shapes come from its config alone (a model built on the ``meta``
device: no weights read); the adapter's from its ``adapter_config.json`` and the headers of
its weight file. A LoRA factor pair ``lora_A (r, in)``, ``lora_B (out, r)`` must match its
module's ``(in, out)``; an (IA)³ vector its module's ``out`` (or ``in`` for feed-forward
layers). A mismatch is an :class:`AdapterError` naming the module and both shapes; an
adapter that records another base model but fits this one gets a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from excise.errors import AdapterError, ExciseWarning, ModelLoadError

__all__ = ["adapter_shapes", "check_adapter_fits", "loading_error_line", "require_adapter_folder"]

# base_model.model.<module>.lora_A.weight / .lora_A.default.weight / .ia3_l(.default)
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|ia3_l)(?:\.[^.]+)?(?:\.weight)?$"
)


def require_adapter_folder(adapter: Path) -> Path:
    """``adapter`` as a Path, or a one-line error saying it is missing or not a PEFT folder."""
    adapter = Path(adapter)
    if not adapter.exists():
        raise AdapterError(f"adapter folder {adapter} not found")
    if not adapter.is_dir():
        raise AdapterError(f"adapter {adapter} is a file; pass the PEFT adapter folder that holds it")
    if not (adapter / "adapter_config.json").is_file():
        raise AdapterError(f"{adapter} is not a PEFT adapter folder (it has no adapter_config.json)")
    return adapter


def adapter_shapes(adapter: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module: {"lora_A": shape, "lora_B": shape} or {"ia3_l": shape}}`` from the weight file's header."""
    adapter = require_adapter_folder(adapter)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in _tensor_shapes(adapter).items():
        match = _KEY.match(key)
        if match:
            shapes.setdefault(match["module"], {})[match["kind"]] = shape
    return shapes


def check_adapter_fits(base: str, adapter: Path) -> None:
    """Raise if ``adapter`` does not fit ``base``; warn if it names another base but fits.

    Raises:
        AdapterError: the folder is missing, or a module is absent from the base or has other shapes.
        ModelLoadError: the base model's config cannot be read.
    """
    from excise.models.loading import resolve_model

    adapter = require_adapter_folder(adapter)
    source = resolve_model(base)
    modules = _base_modules(source, base)
    recorded = _recorded_base(adapter)
    made_for = (
        f" (it was made for {recorded!r})" if recorded and not _same_base(recorded, base, source) else ""
    )
    problems = []
    for name, parts in adapter_shapes(adapter).items():
        module = modules.get(name)
        if module is None:
            problems.append(f"module {name} is not in the base")
            continue
        n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if n_in is None or n_out is None:
            continue  # embeddings, convolutions: PEFT checks those itself
        got = _adapter_in_out(parts)
        if got is not None and got != (n_in, n_out):
            problems.append(
                f"module {name} maps {n_in} -> {n_out} features in the base, "
                f"{got[0]} -> {got[1]} in the adapter"
            )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterError(f"adapter {adapter} does not fit base {base!r}{made_for}: {problems[0]}{more}")
    if made_for:
        warnings.warn(
            f"adapter {adapter} was made for {recorded!r}, not {base!r}; its shapes fit, so it is applied",
            ExciseWarning,
            stacklevel=2,
        )


def loading_error_line(err: Exception) -> str:
    """One informative line of a (possibly multi-line) adapter loading error.

    torch's ``load_state_dict`` puts only a header on the first line ("Error(s) in
    loading state_dict for PeftModel:") and one line per mismatched tensor below it,
    so the first detail line is kept, with a count of the rest.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        return f"{lines[1]}{more}"
    return lines[0]


def _adapter_in_out(parts: dict[str, tuple[int, ...]]) -> tuple[int | None, int | None] | None:
    """``(in, out)`` a LoRA pair implies (None where a factor is missing); None for (IA)³."""
    a, b = parts.get("lora_A"), parts.get("lora_B")
    if a is None and b is None:
        return None
    n_in = a[-1] if a is not None and len(a) == 2 else None
    n_out = b[0] if b is not None and len(b) == 2 else None
    if n_in is None or n_out is None:
        return None
    return n_in, n_out


def _tensor_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    st = adapter / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    binary = adapter / "adapter_model.bin"
    if binary.is_file():
        import torch

        state = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    raise AdapterError(f"{adapter} holds no adapter_model.safetensors or adapter_model.bin")


def _base_modules(source: str, spec: str) -> dict[str, Any]:
    """The base model's modules by name, built on the meta device from its config (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot read the config of base model {spec!r}: {str(err).splitlines()[0]}"
        ) from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return dict(model.named_modules())


def _recorded_base(adapter: Path) -> str | None:
    try:
        value = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise AdapterError(f"{adapter / 'adapter_config.json'} is not valid JSON: {err}") from err
    return value if isinstance(value, str) and value else None


def _same_base(recorded: str, spec: str, source: str) -> bool:
    """Whether the adapter's recorded base is the given one: same spec, or same resolved folder."""
    if recorded in (spec, source):
        return True
    from excise.models.loading import resolve_model

    try:
        other = resolve_model(recorded)
    except ModelLoadError:
        return False
    left, right = Path(other), Path(source)
    if left.is_dir() and right.is_dir():
        return left.resolve() == right.resolve()
    return other == source
