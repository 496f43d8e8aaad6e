"""Batched generation equals one-prompt-at-a-time generation, in input order."""

from __future__ import annotations

import pytest
import torch

from excise.errors import ConfigError
from excise.models.generation import GenerationSettings, chat_prompt_ids, generate


def _one_by_one(model, tokenizer, prompt_ids, max_new_tokens):
    out = model.generate(
        input_ids=torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True).strip()


def test_batched_equals_single_and_keeps_order(tiny_llama, chat_tokenizer):
    users = ["hi", "a much longer question, padded least", "mid length one", "x"]
    prompts = [chat_prompt_ids(chat_tokenizer, u) for u in users]
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    batched = generate(tiny_llama, chat_tokenizer, prompts, settings, progress=False)
    single = [_one_by_one(tiny_llama, chat_tokenizer, p, 6) for p in prompts]
    assert batched == single
    assert len({len(p) for p in prompts}) > 1  # the batch really was padded


def test_string_prompts_and_sampling_is_seeded(tiny_llama, chat_tokenizer):
    settings = GenerationSettings(max_new_tokens=5, do_sample=True, seed=3)
    first = generate(tiny_llama, chat_tokenizer, ["abc", "de"], settings, progress=False)
    again = generate(tiny_llama, chat_tokenizer, ["abc", "de"], settings, progress=False)
    assert first == again


@pytest.mark.parametrize(
    "bad", [{"max_new_tokens": 0}, {"batch_size": 0}, {"do_sample": True, "temperature": 0.0}, {"top_p": 0.0}]
)
def test_bad_settings(bad):
    with pytest.raises(ConfigError):
        GenerationSettings(**bad)


def test_empty_prompt_is_an_error(tiny_llama, chat_tokenizer):
    assert generate(tiny_llama, chat_tokenizer, [], progress=False) == []
    with pytest.raises(ConfigError, match="empty prompt"):
        generate(tiny_llama, chat_tokenizer, [[]], progress=False)


@pytest.mark.parametrize("make", ["llama3_chat", "gemma_chat"])
def test_generation_stops_on_the_chat_templates_end_of_turn_token(tiny_llama, make):
    """A model that ends its turn with <|eot_id|> / <end_of_turn> (not EOS) stops right there."""
    from tests.data import toy_tokenizers

    tokenizer = getattr(toy_tokenizers, make)()
    end = tokenizer.convert_tokens_to_ids("<|eot_id|>" if make == "llama3_chat" else "<end_of_turn>")
    assert end != tokenizer.eos_token_id
    # Every position predicts the end-of-turn token: a head with zero weights and a one-hot bias.
    head = torch.nn.Linear(tiny_llama.config.hidden_size, tiny_llama.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[end] = 10.0
    tiny_llama.lm_head = head
    lengths = []
    real_generate = tiny_llama.generate

    def spy(**kwargs):
        out = real_generate(**kwargs)  # (B, T + new)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    tiny_llama.generate = spy
    prompts = [chat_prompt_ids(tokenizer, "hi"), chat_prompt_ids(tokenizer, "a longer one")]
    texts = generate(tiny_llama, tokenizer, prompts, GenerationSettings(max_new_tokens=8), progress=False)
    assert lengths == [1] and texts == ["", ""]  # stopped after the turn end, not 8 tokens later


def test_stop_ids_are_eos_end_of_turn_and_the_models_own(tiny_llama, chat_tokenizer):
    from excise.models.generation import stop_token_ids
    from tests.data.toy_tokenizers import llama3_chat

    tokenizer = llama3_chat()
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, eot]
    tiny_llama.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert stop_token_ids(tokenizer, tiny_llama) == [tokenizer.eos_token_id, eot, 7]
    assert stop_token_ids(chat_tokenizer) == [chat_tokenizer.eos_token_id]  # ChatML: <|im_end|> is EOS
