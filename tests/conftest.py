"""Shared fixtures: fixed seeds, tiny adapters on disk and a tiny random Llama."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


def tiny_llama_config(**overrides):
    """A 2-layer Llama small enough that a forward pass takes milliseconds."""
    from transformers import LlamaConfig

    settings = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**settings, **overrides})


@pytest.fixture
def tiny_llama():
    """A freshly initialised tiny Llama in eval mode (fp32)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


# ----------------------------------------------------------------------------- adapters

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from excise.pem.delta import Adapter, LowRankDelta, RowDelta  # noqa: E402


def random_lora(
    shapes: dict[str, tuple[int, int]],
    rank: int | dict[str, int] = 4,
    *,
    scale: float = 2.0,
    seed: int = 0,
) -> Adapter:
    """An in-memory LoRA adapter with random factors (no zero rows unless made so)."""
    rng = np.random.default_rng(seed)
    modules = {}
    for name, (n_out, n_in) in shapes.items():
        r = rank[name] if isinstance(rank, dict) else rank
        modules[name] = LowRankDelta(rng.standard_normal((n_out, r)), rng.standard_normal((r, n_in)), scale)
    return Adapter("LORA", {"peft_type": "LORA", "r": 4, "lora_alpha": 8}, modules, {"path": f"seed{seed}"})


def random_rows(
    shapes: dict[str, tuple[int, ...]], row_dim: int | None = None, *, seed: int = 0, peft_type: str = "IA3"
) -> Adapter:
    """An in-memory adapter of dense rows ((IA)³-like: one row per module, or rows of row_dim)."""
    rng = np.random.default_rng(seed)
    modules = {}
    for name, shape in shapes.items():
        values = rng.standard_normal(shape)
        rows = values.reshape(1, -1) if row_dim is None else values.reshape(-1, row_dim)
        modules[name] = RowDelta(rows, tuple(shape))
    return Adapter(peft_type, {"peft_type": peft_type}, modules, {"path": f"seed{seed}"})


def write_peft_lora(folder: Path, model, *, seed: int, **lora_kwargs) -> Path:
    """Train-free PEFT LoRA: random non-zero A and B on ``model`` (mutated), saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    return folder


def adapter_json(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A character-level ChatML tokenizer built in memory (no hub): 104 ids < 128.

    Each printable ASCII character is one token (anything else is ``<unk>``), and the
    ChatML markers are special tokens, so it fits :func:`tiny_llama_config`'s vocab.
    """
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.fixture(name="chat_tokenizer")
def _chat_tokenizer():
    """The tiny character-level ChatML tokenizer (:func:`tiny_tokenizer`) as a fixture."""
    return tiny_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_llama):
    """A folder holding the tiny Llama and the tiny tokenizer, loadable by spec."""
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def save_tiny_model(folder: Path, *, seed: int = 0, **config_overrides) -> Path:
    """Save a fresh tiny Llama (``tiny_llama_config`` plus overrides) and the tiny tokenizer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(**config_overrides)).eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def ext_sub_rows_numpy(W1: np.ndarray, W2: np.ndarray, lam: float) -> np.ndarray:
    """DESIGN.md §1 row by row, in float64, written out plainly (a test oracle).

    Degenerate rows as DESIGN.md §1 says: a zero ``W1_i`` or ``W2_i`` removes nothing,
    ``n1_i = −n2_i`` makes the whole ``W2_i`` the deficiency.
    """
    W1, W2 = np.asarray(W1, np.float64), np.asarray(W2, np.float64)
    out = np.empty_like(W1)
    for i, (w1, w2) in enumerate(zip(W1, W2, strict=True)):
        a, b = np.linalg.norm(w1), np.linalg.norm(w2)
        if a == 0 or b == 0:
            out[i] = w1
            continue
        n1, n2 = w1 / a, w2 / b
        sigma = np.linalg.norm(n1 + n2)
        if sigma <= 1e-12:
            d = w2
        else:
            c = (n1 + n2) / sigma
            g = (w2 @ c) * c
            d = w2 - g
        out[i] = w1 - lam * d
    return out


def write_raw_lora(
    folder: Path, seed: int, shapes: dict[str, tuple[int, int]], r: int = 3, base: str = "tiny"
) -> Path:
    """A PEFT LoRA folder written by hand (no model needed): random A, B for each of ``shapes``."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    tensors = {}
    for name, (n_out, n_in) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = rng.standard_normal((r, n_in)).astype(np.float32)
        tensors[f"base_model.model.{name}.lora_B.weight"] = rng.standard_normal((n_out, r)).astype(np.float32)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": base,
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine the thread pool's contention costs 50x here.

    Opt in per module (or package) with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A Python script that runs several `excise` command lines (a JSON list in argv[1]) in one
# process, so torch is imported once; it stops at the first one that fails.
CLI_BATCH_SCRIPT = """
import json, sys
from excise.cli import main
for argv in json.loads(sys.argv[1]):
    sys.argv = ["excise", *argv]
    try:
        main()
    except SystemExit as exit_:
        if exit_.code:
            raise
"""


def load_script(relative: str):
    """Import a file of scripts/ or benchmarks/ (not a package) as a module, by its repo-relative path."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
