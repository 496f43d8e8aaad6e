"""Continuation log-likelihoods against a plain one-request-at-a-time loop, and lm-eval's split rule."""

from __future__ import annotations

import random

import pytest
import torch

from excise.errors import ConfigError
from excise.evaluate.scoring import continuation_logliks, encode_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, context, continuation):
    """Sum of log P(continuation | context) from one full forward pass (no batching, no cache)."""
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    n = len(continuation)
    rows = logprobs[-n:]
    return float(sum(rows[i, t] for i, t in enumerate(continuation))), all(
        int(rows[i].argmax()) == t for i, t in enumerate(continuation)
    )


def _requests(seed=0):
    rng = random.Random(seed)
    shared = [rng.randrange(128) for _ in range(12)]  # a preamble common to every request
    requests = []
    for _ in range(5):
        context = shared + [rng.randrange(128) for _ in range(rng.randrange(1, 6))]
        requests += [(context, [rng.randrange(128) for _ in range(rng.randrange(1, 5))]) for _ in range(3)]
        requests += [(context, [7]), (context, [9]), (context, [9, 3])]  # shared and nested inputs
    return requests


@pytest.mark.parametrize(("batch_size", "share_prefix"), [(1, False), (3, True), (4, False), (64, True)])
def test_matches_plain_loop(tiny_llama, batch_size, share_prefix):
    requests = _requests()
    got = continuation_logliks(
        tiny_llama, requests, batch_size=batch_size, share_prefix=share_prefix, progress=False
    )
    for (context, continuation), score in zip(requests, got, strict=True):
        logprob, greedy = _reference(tiny_llama, context, continuation)
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.greedy == greedy
        assert score.n_tokens == len(continuation)


def test_left_truncation_follows_lm_eval(tiny_llama):
    context, continuation = list(range(10, 40)), [5, 6, 7]
    got = continuation_logliks(tiny_llama, [(context, continuation)], max_length=20, progress=False)[0]
    whole = (context + continuation)[-21:]  # lm-eval: (ctx + cont)[-(max_length + 1):][:-1] is the input
    assert got.logprob == pytest.approx(_reference(tiny_llama, whole[:-3], whole[-3:])[0], abs=1e-4)


def test_bad_requests(tiny_llama):
    with pytest.raises(ConfigError, match="empty continuation"):
        continuation_logliks(tiny_llama, [([1, 2], [])], progress=False)
    with pytest.raises(ConfigError, match="context token"):
        continuation_logliks(tiny_llama, [([], [3])], progress=False)
    with pytest.raises(ConfigError, match="batch size"):
        continuation_logliks(tiny_llama, [([1], [3])], batch_size=0, progress=False)
    assert continuation_logliks(tiny_llama, [], progress=False) == []


def test_encode_pair_moves_trailing_space(chat_tokenizer):
    tok = chat_tokenizer
    context, continuation = encode_pair(tok, "Q: x\nA: ", "yes")
    assert tok.decode(context) == "Q: x\nA:"
    assert tok.decode(continuation) == " yes"  # the space moved to the continuation, as lm-eval does
    context, continuation = encode_pair(tok, "A:", " no")
    assert tok.decode(context) + "|" + tok.decode(continuation) == "A:| no"
