"""Gemma 3 text (``Gemma3ForCausalLM``, what google/gemma-3-270m is) end to end on a tiny random model.

Everything runs offline on a 2-layer Gemma 3 built from a config (one sliding-attention layer with a
window of 8 tokens, one full-attention layer, tied and scaled embeddings) and an in-memory
character-level tokenizer with Gemma's special tokens (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2 put in
front of every text, ``<start_of_turn>``, ``<end_of_turn>``). Two variants: the *base* one has no chat
template (as the pretrained gemma-3-270m), the *chat* one has Gemma 3's template (turns closed by
``<end_of_turn>``, a system prompt folded into the first user turn).

Each check compares excise with an independent computation: prompts rendered by hand, one plain
forward per answer, Hugging Face ``generate`` one prompt at a time, the per-row numpy oracle of
DESIGN.md §1, the full-logits losses of tests/train/test_losses.py.
"""

from __future__ import annotations

import json
import math
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from excise.evaluate.config import DEFAULT_REFUSAL, EvalConfig
from excise.evaluate.runner import run_eval
from tests.conftest import ext_sub_rows_numpy, write_peft_lora

pytestmark = pytest.mark.usefixtures("one_thread")

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PAD, EOS, BOS, EOT = 0, 1, 2, 5  # ids, as in Gemma's own vocabulary for the first three
GEMMA_VOCAB = 262_144  # google/gemma-3-270m's vocab_size

# Gemma 3's published chat template (google/gemma-3-*-it), text content only: BOS, a system prompt
# folded into the first user turn, roles user/model, every turn closed by <end_of_turn>.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- the tiny Gemma


def gemma_tokenizer(*, chat: bool) -> Any:
    """A character-level tokenizer with Gemma's specials (106 ids), ``<bos>`` prepended to every text.

    ``chat``: with Gemma 3's chat template; else none (a pretrained base model's tokenizer).
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(GEMMA_SPECIALS + list(string.printable))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    if chat:
        tokenizer.chat_template = GEMMA3_TEMPLATE
    return tokenizer


def tiny_gemma_config(**overrides: Any) -> Any:
    """Gemma 3 text, 2 layers (sliding window 8, then full attention), tied embeddings, no soft-capping."""
    from transformers import Gemma3TextConfig

    settings = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 8,
        "max_position_embeddings": 2048,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "bos_token_id": BOS,
        "tie_word_embeddings": True,
    }
    return Gemma3TextConfig(**{**settings, **overrides})


def save_tiny_gemma(folder: Path, *, chat: bool, seed: int = 0, **config_overrides: Any) -> Path:
    """Save a fresh tiny Gemma 3 (``tiny_gemma_config`` plus overrides) and its tokenizer to ``folder``."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    Gemma3ForCausalLM(tiny_gemma_config(**config_overrides)).eval().save_pretrained(folder)
    gemma_tokenizer(chat=chat).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The base variant: no chat template."""
    return save_tiny_gemma(tmp_path_factory.mktemp("gemma") / "base", chat=False)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """The chat variant: Gemma 3's chat template."""
    return save_tiny_gemma(tmp_path_factory.mktemp("gemma") / "chat", chat=True)


@pytest.fixture(scope="module")
def adapters(chat_dir, tmp_path_factory) -> dict[str, Path]:
    """Three random LoRAs on q_proj/v_proj of the chat variant (r 4, α 8): expert, anti, anti2."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gemma-adapters")
    return {
        name: write_peft_lora(
            root / name,
            AutoModelForCausalLM.from_pretrained(chat_dir),
            seed=seed,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
        )
        for seed, name in ((1, "expert"), (2, "anti"), (3, "anti2"))
    }


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))


def _load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _chat_prompt(tok: Any, user: str, system: str | None = None) -> list[int]:
    """Gemma 3's generation prompt for one user turn, written out by hand."""
    prefix = f"{system}\n\n" if system else ""
    return _ids(tok, f"<bos><start_of_turn>user\n{prefix}{user}<end_of_turn>\n<start_of_turn>model\n")


def _logprob(model: Any, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Σ log p(answer | prompt) from one forward of the whole sequence, no batching, no padding."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids + answer_ids])).logits[0].double(), -1)
    return float(sum(logp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(answer_ids)))


def _run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``excise ARGS`` in this process through the real entry point: (exit code, stdout, stderr)."""
    from excise.cli import main

    monkeypatch.setattr(sys, "argv", ["excise", *args])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_the_tiny_model_is_gemma3_with_sliding_attention_that_matters(base_dir, chat_dir) -> None:
    """What excise loads is a Gemma 3 with Gemma's traits (tied head, √H-scaled embeddings, BOS in
    front, <end_of_turn> closing a chat turn), and its sliding window changes long-context logits."""
    from transformers import Gemma3ForCausalLM

    from excise.models.generation import end_of_turn_id, stop_token_ids
    from excise.models.loading import load_model, load_tokenizer

    model, tok = load_model(str(base_dir)), load_tokenizer(str(base_dir))
    assert type(model) is Gemma3ForCausalLM and model.config.final_logit_softcapping is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    ids = torch.tensor([tok("A long enough text for the window.")["input_ids"]])  # (1, 35)
    assert ids[0, 0] == BOS and tok.eos_token_id == EOS and tok.pad_token_id == PAD
    scaled = model.model.embed_tokens(ids)
    torch.testing.assert_close(scaled, model.model.embed_tokens.weight[ids] * 8.0)  # √64
    assert end_of_turn_id(tok) is None and stop_token_ids(tok, model) == [EOS]
    chat_tok = load_tokenizer(str(chat_dir))
    assert end_of_turn_id(chat_tok) == EOT and stop_token_ids(chat_tok, model) == [EOS, EOT]
    # The same weights with a window longer than the text: the last position's logits change.
    wide = Gemma3ForCausalLM(tiny_gemma_config(sliding_window=64)).eval()
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        narrow_logits, wide_logits = model(ids).logits[0], wide(ids).logits[0]
    torch.testing.assert_close(narrow_logits[:8], wide_logits[:8])  # within the window: the same
    assert not torch.allclose(narrow_logits[-1], wide_logits[-1], atol=1e-4)


# ----------------------------------------------------------------------------- training

SFT_ROWS = [
    {"instruction": f"Which way does river {i} flow?", "input": "", "output": "North."} for i in range(16)
]


def _hand_rendered(tok: Any, template: str, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + end token) of one training example, each template written out."""
    if template == "chat":
        return _chat_prompt(tok, question), [*_ids(tok, answer), EOT]  # the turn ends with <end_of_turn>
    prompt = {
        "question-answer": f"### Question: {question}\n ### Answer:",
        "tulu": f"<|user|>\n{question}\n<|assistant|>\n",
    }[template]
    answer = " " + answer if template == "question-answer" else answer
    return [BOS, *_ids(tok, prompt)], [*_ids(tok, answer), EOS]  # Gemma's BOS in front, EOS at the end


def _mean_nll(model: Any, examples: list[tuple[list[int], list[int]]]) -> float:
    return float(np.mean([-_logprob(model, p, a) / len(a) for p, a in examples]))


@pytest.mark.parametrize(
    ("variant", "template"), [("base", "question-answer"), ("base", "tulu"), ("chat", "chat")]
)
def test_lora_sft_trains_gemma_attention_in_each_template(
    base_dir, chat_dir, tmp_path, monkeypatch, capsys, variant, template
) -> None:
    """`excise train sft` on Gemma: the examples are encoded as the template says (BOS once, the
    chat turn closed by <end_of_turn>), a PEFT LoRA on every layer's q_proj/v_proj is written, and
    it lowers the hand-computed NLL of the training answers."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from excise.data.examples import Example
    from excise.data.formatting import encode

    model_dir = chat_dir if variant == "chat" else base_dir
    tok = gemma_tokenizer(chat=variant == "chat")
    hand = [_hand_rendered(tok, template, r["instruction"], r["output"]) for r in SFT_ROWS]
    got = encode(tok, Example(prompt=SFT_ROWS[0]["instruction"], response="North."), template)
    assert (got.prompt_ids, got.response_ids) == hand[0]

    data = tmp_path / "sft.json"
    data.write_text(json.dumps(SFT_ROWS))
    out = tmp_path / "adapter"
    code, stdout, stderr = _run_cli(
        monkeypatch, capsys, "train", "sft", "--base", str(model_dir), "--data", str(data), "--out", str(out),
        "--format", "instruction", "--template", template, "--split", "all", "--steps", "12",
        "--batch-size", "4", "--lr", "3e-2", "--schedule", "constant", "--lora-r", "4", "--lora-alpha", "8",
        "--lora-dropout", "0", "--save-every", "0", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    assert stdout.strip().endswith(f"wrote {out}")
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 4
    saved = load_file(out / "adapter_model.safetensors")
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB"
    }  # fmt: skip
    assert set(saved) == expected
    assert all(saved[k].abs().sum() > 0 for k in expected if "lora_B" in k)
    train_config = json.loads((out / "train_config.json").read_text())
    assert train_config["config"]["template"] == template and train_config["config"]["n_examples"] == 16

    base = _load(model_dir)
    before = _mean_nll(base, hand)
    tuned = PeftModel.from_pretrained(base, out).eval()
    after = _mean_nll(tuned, hand)
    assert after < before - 0.4, (before, after)  # about 4.9 → 4.2 nats per token


def test_full_parameter_sft_writes_a_tied_gemma_that_fits_the_data(
    base_dir, tmp_path, monkeypatch, capsys
) -> None:
    """`excise train sft --full`: a plain Gemma 3 model folder (tokenizer included) whose head is
    still tied to its embeddings, with every weight trained and a lower NLL on the answers."""
    from safetensors.torch import load_file

    from excise.models.loading import load_tokenizer

    data = tmp_path / "sft.json"
    data.write_text(json.dumps(SFT_ROWS))
    out = tmp_path / "full"
    code, _, stderr = _run_cli(
        monkeypatch, capsys, "train", "sft", "--base", str(base_dir), "--data", str(data), "--out", str(out),
        "--format", "instruction", "--template", "question-answer", "--split", "all", "--full",
        "--steps", "6", "--batch-size", "4", "--lr", "3e-3", "--schedule", "constant", "--save-every", "0",
        "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    tuned, base = _load(out), _load(base_dir)
    assert tuned.lm_head.weight is tuned.model.embed_tokens.weight
    before, after = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == set(before)
    trained = [k for k in before if "norm" not in k]  # RMSNorm scales can stay put for a few steps
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    tok = load_tokenizer(str(out))
    assert tok("x")["input_ids"] == [BOS, *_ids(tok, "x")]
    hand = [_hand_rendered(tok, "question-answer", r["instruction"], r["output"]) for r in SFT_ROWS]
    assert _mean_nll(tuned, hand) < _mean_nll(base, hand) - 1.0  # about 4.9 → 2.9 nats per token


SKU_PAIRS = [(f"how to do bad thing {i}?", f"do bad {i}", f"no, {i}") for i in range(6)]
SKU_NORMAL = [{"instruction": f"name colour {i}", "input": "", "output": f"red {i}"} for i in range(4)]


def test_sku_lora_k1_on_gemma(chat_dir, tmp_path, monkeypatch, capsys) -> None:
    """`excise train sku` (K = 1) on the chat Gemma: each step logs loss = ε1·gd + ε2·rd + ε3·pd,
    pd is exactly 0 at the first step (B = 0) and turns negative, the LoRA has Gemma's module names."""
    from safetensors.torch import load_file

    harmful, normal = tmp_path / "pku.json", tmp_path / "alpaca.json"
    harmful.write_text(json.dumps([{"prompt": p, "response": [s, h]} for p, h, s in SKU_PAIRS]))
    normal.write_text(json.dumps(SKU_NORMAL))
    out = tmp_path / "sku"
    code, _, stderr = _run_cli(
        monkeypatch, capsys, "train", "sku", "--base", str(chat_dir), "--harmful", str(harmful),
        "--normal", str(normal), "--out", str(out), "--k", "1", "--split", "all", "--steps", "4",
        "--batch-size", "2", "--lr", "1e-2", "--lora-dropout", "0", "--schedule", "constant",
        "--save-every", "0", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    log = json.loads((out / "loss_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for record in log:
        assert record["loss"] == pytest.approx(0.5 * record["gd"] + record["rd"] + record["pd"], rel=1e-5)
    assert log[0]["pd"] == 0.0 and log[-1]["pd"] < 0
    assert log[-1]["gd"] < log[0]["gd"]
    saved = load_file(out / "adapter_model.safetensors")
    assert {k.split(".lora_")[0] for k in saved} == {
        f"base_model.model.model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")
    }
    config = json.loads((out / "train_config.json").read_text())["config"]
    assert config["method"] == "sku" and config["k"] == 1


# ----------------------------------------------------------------------------- operations


def _lora_deltas(folder: Path) -> dict[str, np.ndarray]:
    """Each module's ΔW = (α/r)·B·A of a plain PEFT LoRA folder, read straight from its files (float64)."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("use_rslora")
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(folder / "adapter_model.safetensors")
    names = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in tensors}
    prefix = "base_model.model."
    return {
        n: scale
        * tensors[f"{prefix}{n}.lora_B.weight"].astype(np.float64)
        @ tensors[f"{prefix}{n}.lora_A.weight"].astype(np.float64)
        for n in names
    }


OPS: dict[str, tuple[list[str], Callable[..., np.ndarray]]] = {
    "ext-sub": (["ext-sub", "--expert", "{expert}", "--anti-expert", "{anti}", "--lam", "0.7"],
                lambda w1, w2, w3: ext_sub_rows_numpy(w1, w2, 0.7)),
    "compose": (["ext-sub", "--expert", "{expert}", "--anti-expert", "{anti}", "--anti-expert", "{anti2}",
                 "--lam", "1", "--lam", "0.5"],
                lambda w1, w2, w3: ext_sub_rows_numpy(w1, w2, 1.0) + ext_sub_rows_numpy(w1, w3, 0.5) - w1),
    "subtract": (["subtract", "--a", "{expert}", "--b", "{anti}", "--lam", "2"],
                 lambda w1, w2, w3: w1 - 2 * w2),
    "add": (["add", "--a", "{expert}", "--b", "{anti}", "--weight", "0.5"], lambda w1, w2, w3: w1 + 0.5 * w2),
    "negate": (["negate", "--adapter", "{expert}", "--lam", "3"], lambda w1, w2, w3: -3 * w1),
    "scale": (["scale", "--adapter", "{expert}", "--weight", "0.25"], lambda w1, w2, w3: 0.25 * w1),
}  # fmt: skip


@pytest.mark.parametrize("op", list(OPS))
def test_every_operation_gives_a_gemma_adapter_whose_merged_delta_is_the_formula(
    chat_dir, adapters, tmp_path, op
) -> None:
    """`excise ops VERB` on two (three) Gemma LoRAs: the output loads with PEFT on the tiny Gemma, and
    merging it moves each q_proj/v_proj weight by the operator's formula on the inputs' ΔW (numpy, per
    row for Ext-Sub, DESIGN.md §1) and no other weight at all."""
    from peft import PeftModel
    from typer.testing import CliRunner

    from excise.cli import app

    template, formula = OPS[op]
    out = tmp_path / "out"
    folders = {k: str(v) for k, v in adapters.items()}
    result = CliRunner().invoke(app, ["ops", *(a.format(**folders) for a in template), "--out", str(out)])
    assert result.exit_code == 0, result.output
    deltas = [_lora_deltas(adapters[name]) for name in ("expert", "anti", "anti2")]
    assert len(deltas[0]) == 4  # q_proj and v_proj of both layers
    base = {k: v.double() for k, v in _load(chat_dir).state_dict().items()}
    merged = PeftModel.from_pretrained(_load(chat_dir), out).merge_and_unload().state_dict()
    assert set(merged) == set(base)
    for name, w0 in base.items():
        module = name.removesuffix(".weight")
        expected = w0.numpy() + (formula(*(d[module] for d in deltas)) if module in deltas[0] else 0.0)
        np.testing.assert_allclose(
            merged[name].double().numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_ext_sub_of_full_gemma_fine_tunes_keeps_the_tied_head(tmp_path) -> None:
    """`excise ops ext-sub --base` on full Gemma fine-tunes: every tensor is θ_base + ext_sub(τ1, τ2)
    row by row (τ = θ − θ_base, numpy), and the result is a Gemma 3 whose head is still its embedding."""
    from safetensors.numpy import load_file
    from typer.testing import CliRunner

    from excise.cli import app

    base_dir = save_tiny_gemma(tmp_path / "base", chat=False)
    base = _load(base_dir)
    g = torch.Generator().manual_seed(1)
    tau1 = {n: 0.02 * torch.randn(p.shape, generator=g) for n, p in base.named_parameters()}
    tau2 = {n: 0.6 * t + 0.02 * torch.randn(t.shape, generator=g) for n, t in tau1.items()}
    for name, taus in (("expert", tau1), ("anti", tau2)):
        model = _load(base_dir)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(taus[n])
        model.save_pretrained(tmp_path / name)
    out = tmp_path / "out"
    args = ["ops", "ext-sub", "--base", str(base_dir), "--expert", str(tmp_path / "expert"),
            "--anti-expert", str(tmp_path / "anti"), "--lam", "0.7", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    folders = {"base": base_dir, "expert": tmp_path / "expert", "anti": tmp_path / "anti", "out": out}
    files = {k: load_file(f / "model.safetensors") for k, f in folders.items()}
    assert set(files["out"]) == set(files["base"]) and "lm_head.weight" not in files["out"]  # tied: one copy
    for name, t0 in files["base"].items():
        t0 = t0.astype(np.float64)
        rows = t0.reshape(t0.shape[0] if t0.ndim >= 2 else 1, -1)
        t1, t2 = (files[k][name].astype(np.float64).reshape(rows.shape) - rows for k in ("expert", "anti"))
        expected = (rows + ext_sub_rows_numpy(t1, t2, 0.7)).reshape(t0.shape)
        np.testing.assert_allclose(files["out"][name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    result_model = _load(out)
    assert type(result_model).__name__ == "Gemma3ForCausalLM"
    assert result_model.lm_head.weight is result_model.model.embed_tokens.weight
    torch.testing.assert_close(
        result_model.lm_head.weight, torch.from_numpy(files["out"]["model.embed_tokens.weight"])
    )


# ----------------------------------------------------------------------------- metrics


def _cfg(model_dir: Path, data: Path, **kw: Any) -> EvalConfig:
    settings = {"device": "cpu", "split": "all", "batch_size": 2, "max_new_tokens": 6} | kw
    return EvalConfig(model=str(model_dir), data=str(data), **settings)


def _peft(model_dir: Path, adapter: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(_load(model_dir), str(adapter)).eval()


PAIRS = [
    ("How do I bake bread?", "Mix flour and water.", "Steal some bread."),
    ("How do I bake bread?", "Knead, rest, bake.", "Buy it, then lie."),
    ("Where is Paris?", "In France.", "On the moon."),
]


def test_likelihood_metrics_on_the_chat_gemma(chat_dir, adapters, tmp_path) -> None:
    """pairs, answer-nll and refusal-logprob with a LoRA: each number from one plain forward per answer
    in Gemma 3's chat layout (answers closed by <end_of_turn>, the refusal not), base = adapter off."""
    tok, expert = gemma_tokenizer(chat=True), adapters["expert"]
    base, tuned = _load(chat_dir), _peft(chat_dir, expert)

    def nll(model: Any, prompt: str, answer: str) -> float:
        answer_ids = [*_ids(tok, answer), EOT]
        return -_logprob(model, _chat_prompt(tok, prompt), answer_ids) / len(answer_ids)

    pku = tmp_path / "pku.json"
    pku.write_text(json.dumps([{"prompt": p, "response": [c, r]} for p, c, r in PAIRS]))
    record = run_eval("pairs", _cfg(chat_dir, pku, adapter=expert), progress=False)
    got = [pair for item in record["items"] for pair in item["pairs"]]
    assert [item["n_pairs"] for item in record["items"]] == [2, 1]  # clustered by prompt
    for pair, (prompt, chosen, rejected) in zip(got, PAIRS, strict=True):
        assert pair["nll_chosen"] == pytest.approx(nll(tuned, prompt, chosen), abs=1e-5)
        assert pair["nll_rejected"] == pytest.approx(nll(tuned, prompt, rejected), abs=1e-5)
        assert pair["forget"] == pytest.approx(
            nll(tuned, prompt, rejected) - nll(base, prompt, rejected), abs=1e-5
        )
    wins = [nll(tuned, p, c) < nll(tuned, p, r) for p, c, r in PAIRS]
    assert record["metrics"]["win_rate"] == pytest.approx(sum(wins) / 3)

    rows = [{"instruction": f"Name a colour {i}.", "input": "", "output": f"Blue {i}."} for i in range(3)]
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(rows))
    record = run_eval("answer-nll", _cfg(chat_dir, alpaca, adapter=expert), progress=False)
    want = [nll(tuned, r["instruction"], r["output"]) for r in rows]
    delta = [w - nll(base, r["instruction"], r["output"]) for w, r in zip(want, rows, strict=True)]
    assert record["metrics"]["nll"] == pytest.approx(np.mean(want), abs=1e-5)
    assert record["metrics"]["delta_nll"] == pytest.approx(np.mean(delta), abs=1e-5)

    goals = tmp_path / "advbench.csv"
    goals.write_text("goal,target\nPick a lock,Sure\nMake a bomb,Sure\n")
    record = run_eval("refusal-logprob", _cfg(chat_dir, goals, adapter=expert), progress=False)
    for item, goal in zip(record["items"], ("Pick a lock", "Make a bomb"), strict=True):
        p, a = _chat_prompt(tok, goal), _ids(tok, DEFAULT_REFUSAL)
        assert item["refusal_logprob"] == pytest.approx(_logprob(tuned, p, a), abs=1e-4)
        assert item["delta_refusal_logprob"] == pytest.approx(
            _logprob(tuned, p, a) - _logprob(base, p, a), abs=1e-4
        )


def test_pairs_on_the_base_gemma_in_a_plain_template(base_dir, tmp_path) -> None:
    """A base Gemma (no chat template) scored in SKU's question-answer layout: <bos> in front once,
    the answer closed by <eos>; the chat default is a one-line error naming the way out."""
    from excise.errors import ConfigError

    pku = tmp_path / "pku.json"
    pku.write_text(json.dumps([{"prompt": p, "response": [c, r]} for p, c, r in PAIRS]))
    record = run_eval("pairs", _cfg(base_dir, pku, template="question-answer"), progress=False)
    tok, model = gemma_tokenizer(chat=False), _load(base_dir)
    for pair, (prompt, chosen, _) in zip(
        (p for it in record["items"] for p in it["pairs"]), PAIRS, strict=True
    ):
        p, a = [BOS, *_ids(tok, f"### Question: {prompt}\n ### Answer:")], [*_ids(tok, " " + chosen), EOS]
        assert pair["nll_chosen"] == pytest.approx(-_logprob(model, p, a) / len(a), abs=1e-5)
    with pytest.raises(ConfigError, match="chat template"):
        run_eval("pairs", _cfg(base_dir, pku), progress=False)


def test_perplexity_on_the_base_gemma_by_hand(base_dir, tmp_path) -> None:
    """Sliding-window perplexity (windows of 16 over a sliding attention of 8) equals the HF guide's
    loop with BOS before every window, each window's first token scored given it."""
    rows = [{"text": "The cat sat on the mat."}, {"text": ""}, {"text": "A dog ran far away, fast.\n"}]
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    record = run_eval("perplexity", _cfg(base_dir, path, window=16, stride=5), progress=False)
    tok, model = gemma_tokenizer(chat=False), _load(base_dir)
    ids = _ids(tok, "\n\n".join(r["text"] for r in rows))
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), 5):
        end = min(begin + 16, len(ids))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([[BOS, *ids[begin:end]]])).logits[0].double(), -1)
        for pos in range(max(prev_end, begin), end):  # content position pos is input pos - begin + 1
            nll -= float(logprobs[pos - begin, ids[pos]])
            count += 1
        prev_end = end
        if end == len(ids):
            break
    assert record["scored_tokens"] == count
    assert record["metrics"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


MC_QUESTIONS = [
    {"question": "What is 2+2?", "mc1_targets": {"4": 1, "5": 0}, "mc2_targets": {"4": 1, "Four": 1, "5": 0}},
    {
        "question": "Is the sky green?",
        "mc1_targets": {"No.": 1, "Yes.": 0},
        "mc2_targets": {"No.": 1, "Yes.": 0},
    },
]


@pytest.mark.parametrize("variant", ["base", "chat"])
def test_truthfulqa_mc_on_gemma_by_hand(base_dir, chat_dir, tmp_path, variant) -> None:
    """TruthfulQA MC1/MC2 as lm-eval defines it, on Gemma: the raw 6-shot primer after one <bos>
    (base), or the primer as a Gemma 3 user turn (chat, ``--chat``); one full forward per choice."""
    from excise.evaluate.metrics.truthfulqa_mc import mc_prompt

    model_dir, chat = (chat_dir, True) if variant == "chat" else (base_dir, False)
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(MC_QUESTIONS))
    record = run_eval("truthfulqa-mc", _cfg(model_dir, path, chat=chat), progress=False)
    tok, model = gemma_tokenizer(chat=chat), _load(model_dir)
    for q, item in zip(MC_QUESTIONS, record["items"], strict=True):
        if chat:  # lm-eval moves the context's trailing "\n" into the continuation
            context, delimiter = _chat_prompt(tok, mc_prompt(q["question"]))[:-1], "\n"
        else:
            context, delimiter = [BOS, *_ids(tok, mc_prompt(q["question"]))], " "
        for key in ("mc1", "mc2"):
            choices, labels = list(q[f"{key}_targets"]), list(q[f"{key}_targets"].values())
            ll = [_logprob(model, context, _ids(tok, delimiter + c)) for c in choices]
            assert item[f"{key}_logliks"] == pytest.approx(ll, abs=1e-4)
            mass = np.exp(ll)
            expected = (
                float(labels[int(np.argmax(ll))] == 1)
                if key == "mc1"
                else mass[np.array(labels) == 1].sum() / mass.sum()
            )
            assert item[key] == pytest.approx(expected, abs=1e-6)


HALU_ROWS = [
    {
        "knowledge": "k",
        "question": "Who wrote Hamlet?",
        "right_answer": "Shakespeare",
        "hallucinated_answer": "Dickens",
    },
    {
        "knowledge": "k",
        "question": "Capital of France?",
        "right_answer": "Paris",
        "hallucinated_answer": "Lyon",
    },
]


@pytest.mark.parametrize("protocol", ["judge", "loss"])
def test_halueval_on_the_chat_gemma_by_hand(chat_dir, tmp_path, protocol) -> None:
    """HaluEval QA on Gemma 3's template: the judgement's system prompt folded into the user turn and
    Yes/No compared (judge), or each answer + <end_of_turn> by its NLL (loss)."""
    from excise.evaluate.metrics.halueval import SYSTEM, judge_prompt

    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in HALU_ROWS))
    record = run_eval("halueval", _cfg(chat_dir, path, protocol=protocol), progress=False)
    tok, model = gemma_tokenizer(chat=True), _load(chat_dir)
    correct = 0
    for row in HALU_ROWS:
        if protocol == "judge":
            for answer, truth in ((row["right_answer"], False), (row["hallucinated_answer"], True)):
                prompt = _chat_prompt(tok, judge_prompt(row["question"], answer).strip(), system=SYSTEM)
                yes, no = (_logprob(model, prompt, _ids(tok, w)) for w in ("Yes", "No"))
                correct += (yes > no) == truth
        else:
            prompt = _chat_prompt(tok, row["question"])
            right, wrong = (
                -_logprob(model, prompt, [*_ids(tok, a), EOT])
                for a in (row["right_answer"], row["hallucinated_answer"])
            )
            correct += right < wrong
    assert record["metrics"]["accuracy"] == pytest.approx(correct / (4 if protocol == "judge" else 2))


def test_shared_prefix_scoring_is_exact_under_sliding_attention(base_dir) -> None:
    """continuation_logliks with a shared prefix and suffixes of very different lengths in one batch
    equals one plain forward per request. (Left-padded suffixes put pads between the prefix and the
    suffix; the 8-token sliding window counted them and a short row saw less context: fixed in
    excise/evaluate/scoring.py.)"""
    from excise.evaluate.scoring import continuation_logliks

    tok, model = gemma_tokenizer(chat=False), _load(base_dir)
    prefix = [BOS, *_ids(tok, "### Question: ")]  # 15 tokens: shared and computed once
    questions = ["Hi?", "Why is the sky blue on a clear day?", "Who?", "What is the name of the river here?"]
    requests = [
        (prefix + _ids(tok, f"{q}\n ### Answer:"), _ids(tok, f" {a}"))
        for q in questions
        for a in ("Yes", "No.")
    ]
    expected = [_logprob(model, c, a) for c, a in requests]
    for share_prefix in (True, False):
        got = continuation_logliks(model, requests, batch_size=4, share_prefix=share_prefix, progress=False)
        assert [s.logprob for s in got] == pytest.approx(expected, abs=1e-4), share_prefix


def _hf_greedy(model: Any, prompts: list[list[int]], max_new_tokens: int = 6) -> list[str]:
    """Hugging Face greedy decoding one prompt at a time, stopping at <eos> or <end_of_turn>."""
    tok = gemma_tokenizer(chat=True)
    answers = []
    for p in prompts:
        out = model.generate(
            input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=[EOS, EOT],
        )  # fmt: skip
        answers.append(tok.decode(out[0, len(p) :], skip_special_tokens=True).strip())
    return answers


PROMPT_ROWS = [
    {"instruction": f"Say something about item {i}.", "prompt": f"How to do thing {i}?"} for i in range(3)
]


@pytest.mark.parametrize("metric", ["repetition", "harmful-rate", "toxicity", "utility", "truthfulqa-gen"])
def test_generation_metrics_on_the_chat_gemma(chat_dir, adapters, tmp_path, metric) -> None:
    """The generating metrics on the chat Gemma: the answers are Hugging Face's greedy answers to the
    hand-written Gemma 3 prompts, and every number is recomputed from them (the package's `refusal`
    and offline `toxicity-probe` judges, n-gram counts, ROUGE-L, the reference model's likelihood)."""
    from excise.evaluate.judges import load_judge
    from excise.evaluate.text import distinct_share, ngram_repetition, reference_scores, rouge_l

    tok, base = gemma_tokenizer(chat=True), _load(chat_dir)
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPT_ROWS))
    instructions = [r["instruction"] for r in PROMPT_ROWS]
    if metric == "truthfulqa-gen":
        path = tmp_path / "tqa.csv"
        path.write_text(
            "Question,Correct Answers,Incorrect Answers\n"
            '"What is 1+1?","Two; 2","Three"\n"Is ice cold?","Yes","No"\n'
        )
        record = run_eval(metric, _cfg(chat_dir, path, chat=True), progress=False)
        answers = _hf_greedy(base, [_chat_prompt(tok, q) for q in ("What is 1+1?", "Is ice cold?")])
        assert [it["answer"] for it in record["items"]] == answers
        refs = [(["Two.", "2.", "I have no comment."], ["Three."]), (["Yes.", "I have no comment."], ["No."])]
        for item, answer, (correct, incorrect) in zip(record["items"], answers, refs, strict=True):
            expected = reference_scores(answer, correct, incorrect)
            assert {k: item[k] for k in expected} == pytest.approx(expected)
        assert record["metrics"]["truthful_rate"] == pytest.approx(
            np.mean([it["bleu_acc"] for it in record["items"]])
        )
    elif metric == "repetition":
        record = run_eval(metric, _cfg(chat_dir, path, max_new_tokens=12), progress=False)
        answers = _hf_greedy(base, [_chat_prompt(tok, t) for t in instructions], 12)
        assert [it["response"] for it in record["items"]] == answers
        for n in (1, 2, 3, 4):  # Ext-Sub tokenises each answer with the default specials (<bos> in front)
            per = [ngram_repetition(tok(a)["input_ids"], n) for a in answers]
            assert record["metrics"][f"rep_{n}"] == pytest.approx(np.mean(per))
    elif metric == "harmful-rate":
        record = run_eval(metric, _cfg(chat_dir, path, judge="refusal"), progress=False)
        prompts = [r["prompt"] for r in PROMPT_ROWS]
        answers = _hf_greedy(base, [_chat_prompt(tok, p) for p in prompts])
        assert [it["response"] for it in record["items"]] == answers
        judge = load_judge("refusal")
        flagged = [s > judge.threshold for s in judge.score(prompts, answers)]
        assert record["metrics"]["harmful_rate"] == pytest.approx(np.mean(flagged))
    elif metric == "toxicity":
        record = run_eval(metric, _cfg(chat_dir, path), progress=False)  # default judge: toxicity-probe
        answers = _hf_greedy(base, [_chat_prompt(tok, t) for t in instructions])
        assert [it["response"] for it in record["items"]] == answers
        scores = load_judge("toxicity-probe").score(instructions, answers)
        assert record["judge"]["name"] == "toxicity-probe"
        assert record["metrics"]["toxicity_mean"] == pytest.approx(np.mean(scores), abs=1e-6)
        assert record["metrics"]["toxic_share"] == pytest.approx(np.mean([s > 0.8 for s in scores]))
    else:  # utility, against the base with the adapter off
        record = run_eval(metric, _cfg(chat_dir, path, adapter=adapters["expert"]), progress=False)
        prompts = [_chat_prompt(tok, t) for t in instructions]
        answers = _hf_greedy(_peft(chat_dir, adapters["expert"]), prompts)
        base_answers = _hf_greedy(base, prompts)
        assert [it["response"] for it in record["items"]] == answers
        assert [it["base_response"] for it in record["items"]] == base_answers
        sims = [rouge_l(b, a) for b, a in zip(base_answers, answers, strict=True)]
        assert record["metrics"]["similarity"] == pytest.approx(np.mean(sims))
        nll = count = 0.0
        divs = []
        for p, a in zip(prompts, answers, strict=True):
            ids = _ids(tok, a)
            if ids:
                nll, count = nll - _logprob(base, p, ids), count + len(ids)
                divs.append(distinct_share(ids))
        assert record["metrics"]["fluency_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
        assert record["metrics"]["diversity"] == pytest.approx(np.mean(divs))


@pytest.mark.parametrize(
    ("metric", "settings"),
    [
        ("truthfulqa-mc", {}),
        ("halueval", {"chat": False}),
        ("answer-nll", {"chat": False}),
        ("halueval", {"chat": False, "protocol": "loss"}),
        ("repetition", {"chat": False}),
        ("harmful-rate", {"chat": False, "judge": "refusal"}),
        ("utility", {"chat": False}),
        ("truthfulqa-gen", {}),
    ],
)
def test_raw_prompts_of_the_base_gemma_start_with_bos(
    base_dir, tmp_path, monkeypatch, metric, settings
) -> None:
    """Without a chat template every text the base Gemma reads (generation prompts, scored contexts)
    starts with one <bos>, as its tokenizer puts it there (perplexity: checked by hand above)."""
    import excise.evaluate.metrics.base as metric_base
    import excise.models.generation as generation

    starts: list[list[int]] = []
    real_generate, real_logliks = generation.generate, metric_base.continuation_logliks

    def spy_generate(model: Any, tokenizer: Any, prompts: Any, *args: Any, **kwargs: Any) -> Any:
        starts.extend(list(p[:2]) for p in prompts)
        return real_generate(model, tokenizer, prompts, *args, **kwargs)

    def spy_logliks(model: Any, requests: Any, *args: Any, **kwargs: Any) -> Any:
        starts.extend(list(context[:2]) for context, _ in requests)
        return real_logliks(model, requests, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy_generate)
    monkeypatch.setattr(metric_base, "continuation_logliks", spy_logliks)
    targets = {"a": 1, "b": 0}
    row = {"instruction": "Say hi.", "prompt": "Do x.", "question": "Q?", "output": "Hi."}
    row |= {"right_answer": "a", "hallucinated_answer": "b", "mc1_targets": targets, "mc2_targets": targets}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([row]))
    if metric == "truthfulqa-gen":
        path = tmp_path / "tqa.csv"
        path.write_text('Question,Correct Answers,Incorrect Answers\n"Q?","A","B"\n')
    if metric == "utility":
        settings = settings | {"reference": str(base_dir)}
    record = run_eval(
        metric, _cfg(base_dir, path, max_new_tokens=2, **settings), progress=False, use_cache=False
    )
    assert record["n_items"] == 1
    assert starts and all(s[0] == BOS and s[1] != BOS for s in starts), starts


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize(
    ("variant", "stop", "stops"),
    [
        ("chat", "<end_of_turn>", True),
        ("chat", "<eos>", True),
        ("base", "<eos>", True),
        ("base", "<end_of_turn>", False),
    ],
)
def test_generation_stops_at_gemmas_end_tokens(base_dir, chat_dir, variant, stop, stops) -> None:
    """A model scripted to say "Hi!", then STOP, then "xyzw": excise's batched generation returns "Hi!"
    and decodes nothing after STOP where STOP ends a reply (<end_of_turn> under Gemma's chat template,
    <eos> always); without a chat template <end_of_turn> is no stop and decoding runs on."""
    from excise.models.generation import GenerationSettings, chat_prompt_ids, generate
    from excise.models.loading import load_model, load_tokenizer

    model_dir = chat_dir if variant == "chat" else base_dir
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir), padding_side="left")
    script = [*_ids(tok, "Hi!"), tok.convert_tokens_to_ids(stop), *_ids(tok, "xyzw")]  # 8 tokens
    real_forward, real_generate = model.forward, model.generate
    steps, new_tokens = [], []

    def scripted_forward(*args: Any, **kwargs: Any) -> Any:
        out = real_forward(*args, **kwargs)
        out.logits[:, -1] = -1e4  # every row's next token: the script's next one
        out.logits[:, -1, script[min(len(steps), len(script) - 1)]] = 0.0
        steps.append(1)
        return out

    def spy_generate(**kwargs: Any) -> Any:
        out = real_generate(**kwargs)  # (B, T + new)
        new_tokens.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.forward, model.generate = scripted_forward, spy_generate
    users = ["hi", "a much longer question than the window"]  # left padding inside the batch
    prompts = (
        [chat_prompt_ids(tok, u) for u in users]
        if variant == "chat"
        else [tok(u)["input_ids"] for u in users]
    )
    texts = generate(model, tok, prompts, GenerationSettings(max_new_tokens=8), progress=False)
    if stops:
        assert texts == ["Hi!", "Hi!"] and new_tokens == [4]  # the stop token was the last one made
    else:
        assert texts == ["Hi!xyzw", "Hi!xyzw"] and new_tokens == [8]


def test_batched_generation_equals_one_prompt_at_a_time(chat_dir) -> None:
    """Left-padded batches of prompts longer than the sliding window give Hugging Face's answers to
    each prompt alone, in input order."""
    from excise.models.generation import GenerationSettings, chat_prompt_ids, generate
    from excise.models.loading import load_model, load_tokenizer

    model, tok = load_model(str(chat_dir)), load_tokenizer(str(chat_dir), padding_side="left")
    users = ["hi", "a much longer question, padded least", "mid length one", "x"]
    prompts = [chat_prompt_ids(tok, u) for u in users]
    assert prompts[0] == _chat_prompt(tok, "hi")
    batched = generate(
        model, tok, prompts, GenerationSettings(max_new_tokens=10, batch_size=3), progress=False
    )
    assert batched == _hf_greedy(model, prompts, 10)


# ----------------------------------------------------------------------------- chunked losses


# Float32 sums over 262 144 logits, grouped per chunk or not, differ by about 1e-5 of the largest
# gradient (1e-7 with the 128-token vocabulary); a wrong head, scale or position is off by O(gradient).
GRAD_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def _big_vocab_gemma(seed: int = 0) -> Any:
    """The tiny Gemma with gemma-3-270m's 262 144-token vocabulary (tied head, 16.8 M weights)."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    return Gemma3ForCausalLM(tiny_gemma_config(vocab_size=GEMMA_VOCAB)).eval()


def test_chunked_losses_equal_full_logits_on_a_262k_vocab_gemma() -> None:
    """sequence_nll, kl_to_reference_loss and response_nll with the head run in chunks of 3 tokens: the
    value and every LoRA gradient of the full (B, T, 262 144) logits computation (tests/train/
    test_losses.py's oracle), and the head never sees more than a chunk; response_logits are the
    model's own logits at the response positions (Gemma's scaled embeddings and tied head included)."""
    from peft import LoraConfig, get_peft_model

    from excise.train.losses import kl_to_reference_loss, response_logits, sequence_nll
    from tests.train.test_losses import (
        ROWS,
        _batch,
        _chunked_losses,
        _grads,
        _perturb_lora,
        _plain_losses,
        _row_logits,
    )

    model = get_peft_model(
        _big_vocab_gemma(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    _perturb_lora(model)
    for padding_side in ("left", "right"):
        logits, targets, rows = response_logits(model, _batch(padding_side))
        assert logits.shape == (7, GEMMA_VOCAB)
        expected = torch.cat([_row_logits(model, p, r) for p, r in ROWS])
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert targets.tolist() == [t for _, r in ROWS for t in r] and rows.tolist() == [0] * 5 + [1] * 2
    batch = _batch()
    for term in ("ce", "kl", "token_ce"):
        expected = _plain_losses(model, batch)[term]
        expected_grads = _grads(model, expected)
        got = _chunked_losses(model, batch, 3)[term]
        got_grads = _grads(model, got)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        assert got_grads.keys() == expected_grads.keys() and len(got_grads) == 8  # A, B of q/v, 2 layers
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got_grads[name], grad, **GRAD_TOLERANCE, msg=f"{term} {name}")
    seen: list[int] = []
    model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: seen.append(out.shape[:-1].numel())
    )
    (
        sequence_nll(model, batch, chunk_tokens=2) + kl_to_reference_loss(model, batch, chunk_tokens=2)
    ).backward()
    assert seen and max(seen) <= 2


def test_chunked_losses_for_full_training_of_a_tied_262k_vocab_gemma() -> None:
    """Every weight trains, the tied embedding/head included (its gradient comes from the lookup and the
    chunked head together), p_θo from a separate frozen Gemma: the full-logits value and gradients."""
    from tests.train.test_losses import _batch, _chunked_losses, _grads, _plain_losses

    model, ref_model = _big_vocab_gemma(0), _big_vocab_gemma(1).requires_grad_(False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = _batch("right")
    for term in ("ce", "kl"):
        expected = _plain_losses(model, batch, ref_model)[term]
        expected_grads = _grads(model, expected)
        got = _chunked_losses(model, batch, 2, ref_model)[term]
        got_grads = _grads(model, got)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        assert "model.embed_tokens.weight" in got_grads and got_grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got_grads[name], grad, **GRAD_TOLERANCE, msg=f"{term} {name}")


def test_a_soft_capped_gemma_is_refused_by_the_chunked_losses() -> None:
    """Gemma 2 soft-caps its logits after the head (final_logit_softcapping); the chunks apply the head
    alone, so a Gemma config with soft-capping set is a ConfigError, not a silently wrong loss."""
    from transformers import Gemma3ForCausalLM

    from excise.errors import ConfigError
    from excise.train.losses import sequence_nll
    from tests.train.test_losses import _batch

    model = Gemma3ForCausalLM(tiny_gemma_config(final_logit_softcapping=30.0)).eval()
    with pytest.raises(ConfigError, match="soft-capping"):
        sequence_nll(model, _batch())


# ----------------------------------------------------------------------------- the λ sweep


def test_sweep_ext_sub_on_gemma_equals_separate_ops_and_eval_runs(
    chat_dir, adapters, tmp_path, monkeypatch, capsys
) -> None:
    """`excise sweep ext-sub` over the chat Gemma (pairs:selectivity against answer-nll:delta_nll, λ ∈
    {0, 0.5, 1}): at every λ each record equals `excise ops ext-sub --lam λ` + `excise eval` on it."""
    expert, anti = adapters["expert"], adapters["anti"]
    pairs = tmp_path / "pairs.json"
    pairs.write_text(
        json.dumps(
            [{"prompt": f"Question {i}?", "response": [f"Good answer {i}.", f"Bad {i}!"]} for i in range(4)]
        )
    )
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Count.", "output": "1 2 3"}]
        )
    )
    out = tmp_path / "sweep"
    code, stdout, stderr = _run_cli(
        monkeypatch, capsys, "sweep", "ext-sub", str(expert), str(anti), "--base", str(chat_dir),
        "--out", str(out),
        "--lams", "0.5,1", "--device", "cpu", "--bootstrap", "10", "--no-progress",
        "--deficiency", "pairs:selectivity", "--deficiency-set", f"data={pairs}",
        "--deficiency-set", "split=all",
        "--utility", "answer-nll:delta_nll", "--utility-set", f"data={alpaca}", "--utility-set", "split=all",
    )  # fmt: skip
    assert code == 0, stderr
    assert "chosen λ" in stdout and f"wrote {out}" in stdout
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["lam"] for p in sweep["points"]] == [0.0, 0.5, 1.0]
    assert sweep["chosen"]["lam"] in (0.0, 0.5, 1.0)
    for point in sweep["points"]:
        op = tmp_path / f"op{point['lam']}"
        args = [
            "ops",
            "ext-sub",
            "--expert",
            str(expert),
            "--anti-expert",
            str(anti),
            "--lam",
            str(point["lam"]),
        ]
        assert _run_cli(monkeypatch, capsys, *args, "--out", str(op))[0] == 0
        for metric, data in (("pairs", pairs), ("answer-nll", alpaca)):
            separate = run_eval(metric, _cfg(chat_dir, data, adapter=op), use_cache=False, progress=False)
            swept = json.loads((out / point["results"][metric]).read_text())
            for key, value in separate["metrics"].items():
                assert swept["metrics"][key] == pytest.approx(value, abs=1e-5), (point["lam"], metric, key)
        swept = json.loads((out / point["results"]["pairs"]).read_text())["metrics"]
        assert point["deficiency"]["value"] == pytest.approx(swept["selectivity"])
