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
