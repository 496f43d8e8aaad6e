"""The SFT loss counts response tokens only: checked against a plain per-example loop.

Llama-style (pad = EOS) and OPT-style (pad ≠ EOS, BOS = EOS) tokenizers on a tiny Llama
and a tiny OPT, left and right padding: the batched, padded, ``logits_to_keep`` loss must
equal the loss computed one unpadded example at a time with full logits.
"""

from __future__ import annotations

import pytest
import torch

from excise.data import Example, collate, encode, pad_id_of
from excise.train.nll import response_logprobs, response_nll
from tests.conftest import tiny_llama_config
from tests.data.toy_tokenizers import llama_style, opt_style

EXAMPLES = [
    Example("What is the capital of France?", "Paris."),
    Example("Add the numbers", "They sum to five, as 2 + 3 = 5.", input="2 and 3"),
    Example("Hi", "Hello there, how can I help?"),
]


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(tiny_llama_config(vocab_size=320)).eval()
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=320, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    return OPTForCausalLM(config).eval()


def _reference_logprobs(model, encoded) -> list[list[float]]:
    """Each example alone, no padding, full logits: log p(response token | everything before)."""
    out = []
    for e in encoded:
        ids = torch.tensor([e.prompt_ids + e.response_ids])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
        first = len(e.prompt_ids)
        out.append([logprobs[first + j - 1, t].item() for j, t in enumerate(e.response_ids) if first + j > 0])
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("kind", "make_tokenizer"), [("llama", llama_style), ("opt", opt_style)])
def test_batched_loss_equals_per_example_loop(kind, make_tokenizer, side):
    tok, model = make_tokenizer(), _model(kind)
    encoded = [encode(tok, x, "question-answer") for x in EXAMPLES]
    batch = collate(encoded, pad_id_of(tok), padding_side=side)
    expected = _reference_logprobs(model, encoded)

    with torch.no_grad():
        logprobs, mask = response_logprobs(model, batch)  # (B, A)
        loss = response_nll(model, batch)
    for i, row in enumerate(expected):
        got = logprobs[i][mask[i]].tolist()
        assert got == pytest.approx(row, abs=2e-5)
    flat = [v for row in expected for v in row]
    assert loss.item() == pytest.approx(-sum(flat) / len(flat), abs=1e-5)
    assert mask.sum().item() == sum(len(e.response_ids) for e in encoded)


def test_pad_id_value_does_not_change_the_loss():
    """Masking comes from the attention mask: filling padding with any id gives the same loss."""
    tok, model = opt_style(), _model("llama")
    encoded = [encode(tok, x, "alpaca") for x in EXAMPLES]
    with torch.no_grad():
        losses = {pad: response_nll(model, collate(encoded, pad)).item() for pad in (0, 1, 2, 77)}
    assert max(losses.values()) - min(losses.values()) < 1e-6
