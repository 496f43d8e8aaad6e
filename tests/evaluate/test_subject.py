"""The model under evaluation (excise/evaluate/subject.py): the bfloat16 fast path for generation
(issue 26 item 4) is used when asked, merged adapters answer as unmerged ones do, and float32 stays
the default. Behaviour only; the speed is measured by benchmarks/bench_eval.py --sections speed."""

from __future__ import annotations

import json

import pytest
import torch

import excise.models.generation as generation
from excise.evaluate.config import EvalConfig
from excise.evaluate.runner import run_eval
from excise.evaluate.subject import load_subject
from excise.models.generation import GenerationSettings, chat_prompt_ids, generate
from excise.models.loading import load_model
from tests.conftest import save_tiny_model, write_peft_lora

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["How do I bake bread?", "Tell me a story.", "Why is the sky blue?", "List three colours."]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", max_position_embeddings=512)


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory):
    """A random LoRA of excise train's default shape (q_proj, v_proj) that changes the answers."""
    folder = tmp_path_factory.mktemp("a") / "lora"
    return write_peft_lora(
        folder, load_model(str(model_dir)), seed=3, r=4, target_modules=["q_proj", "v_proj"]
    )


@pytest.fixture
def generation_spy(monkeypatch):
    """What each call of ``excise.models.generation.generate`` ran on: (model class, parameter dtypes)."""
    calls = []
    real = generation.generate

    def spy(model, *args, **kwargs):
        calls.append((type(model).__name__, {p.dtype for p in model.parameters()}))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    return calls


def _prompts(subject):
    return [chat_prompt_ids(subject.tokenizer, t) for t in TEXTS]


def _logits(subject, prompts):
    """Last-position logits of each prompt, one at a time (no padding), in float32."""
    with torch.no_grad():
        return torch.stack([subject.model(torch.tensor([p])).logits[0, -1].float() for p in prompts])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_unmerged_lora_takes_the_models_dtype(model_dir, adapter, dtype):
    # PEFT's default would keep the LoRA in float32 on a bfloat16 base: a cast in every adapted
    # layer, which made bfloat16 generation slower than float32.
    subject = load_subject(str(model_dir), adapter, dtype=dtype, device="cpu")
    lora = {p.dtype for name, p in subject.model.named_parameters() if "lora_" in name}
    assert lora == {getattr(torch, dtype)}
    assert {p.dtype for p in subject.model.parameters()} == {getattr(torch, dtype)}


def test_merged_lora_answers_like_unmerged_in_float32(model_dir, adapter):
    plain = load_subject(str(model_dir), device="cpu")
    unmerged = load_subject(str(model_dir), adapter, device="cpu")
    merged = load_subject(str(model_dir), adapter, merge=True, device="cpu")
    assert type(merged.model).__name__ == "LlamaForCausalLM" and merged.merged
    prompts = _prompts(unmerged)
    torch.testing.assert_close(_logits(merged, prompts), _logits(unmerged, prompts), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(plain, prompts), _logits(unmerged, prompts), atol=1e-3)  # it matters
    settings = GenerationSettings(max_new_tokens=12, batch_size=2)
    answers = generate(unmerged.model, unmerged.tokenizer, prompts, settings, progress=False)
    assert generate(merged.model, merged.tokenizer, prompts, settings, progress=False) == answers


def test_bfloat16_stays_close_to_float32_merged_or_not(model_dir, adapter):
    exact = load_subject(str(model_dir), adapter, device="cpu")
    prompts = _prompts(exact)
    reference = _logits(exact, prompts)
    spread = reference.abs().max().item()
    for merge in (False, True):
        fast = load_subject(str(model_dir), adapter, merge=merge, dtype="bfloat16", device="cpu")
        assert {p.dtype for p in fast.model.parameters()} == {torch.bfloat16}
        # bfloat16 keeps 8 significant bits: each logit within a few percent of the largest one.
        torch.testing.assert_close(_logits(fast, prompts), reference, atol=0.05 * spread, rtol=0.05)


def _cfg(model_dir, data, **kw):
    return EvalConfig(
        model=str(model_dir), data=str(data), device="cpu", max_new_tokens=5, batch_size=2, **kw
    )


@pytest.fixture
def instructions(tmp_path):
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps([{"instruction": t} for t in TEXTS]))
    return path


def test_eval_generates_in_float32_unmerged_by_default(model_dir, adapter, instructions, generation_spy):
    record = run_eval("repetition", _cfg(model_dir, instructions, adapter=adapter), progress=False)
    assert generation_spy == [("PeftModel", {torch.float32})]
    assert record["settings"]["dtype"] == "float32" and record["settings"]["merge"] is False


def test_eval_fast_path_generates_in_bfloat16_with_the_lora_merged(
    model_dir, adapter, instructions, generation_spy
):
    cfg = _cfg(model_dir, instructions, adapter=adapter, dtype="bfloat16", merge=True)
    fast = run_eval("repetition", cfg, progress=False)
    assert generation_spy == [("LlamaForCausalLM", {torch.bfloat16})]
    assert fast["settings"]["dtype"] == "bfloat16" and fast["settings"]["merge"] is True
    # Another cache entry than float32's: the answers may differ.
    exact = run_eval("repetition", _cfg(model_dir, instructions, adapter=adapter), progress=False)
    assert not exact["from_cache"] and exact["provenance"]["cache_key"] != fast["provenance"]["cache_key"]
    again = run_eval("repetition", cfg, progress=False)
    assert again["from_cache"] and len(generation_spy) == 2


def test_utility_keeps_the_lora_switchable_in_bfloat16(model_dir, adapter, instructions, generation_spy):
    # utility compares with the base model's own answers: no merge, the LoRA in bfloat16 too.
    run_eval(
        "utility",
        _cfg(model_dir, instructions, adapter=adapter, dtype="bfloat16", merge=True),
        progress=False,
    )
    assert generation_spy and all(call == ("PeftModel", {torch.bfloat16}) for call in generation_spy)
