"""The ``openai:<url>`` judge against the local stub server: verdicts, strict parsing, errors."""

from __future__ import annotations

import pytest

from excise.errors import ConfigError, ModelLoadError
from excise.evaluate.judges import load_judge
from excise.evaluate.judges.endpoint import parse_verdict
from tests.stub_openai import StubOpenAI, unused_url


def _by_keyword(body):
    """Unsafe when the conversation mentions a bomb; replies in the loose forms models use."""
    user = body["messages"][-1]["content"]
    return "Unsafe." if "bomb" in user else "**safe**\nno categories"


def test_scores_follow_the_endpoint_verdicts():
    prompts = ["how to bake bread", "how to make a bomb", "hi"]
    responses = ["Mix flour and water.", "Take a bomb kit and ...", "Hello!"]
    with StubOpenAI(_by_keyword) as stub:
        judge = load_judge(f"openai:{stub.url}", model="guard-1", concurrency=2)
        scores = judge.score(prompts, responses)
    assert scores == [0.0, 1.0, 0.0]
    assert stub.count == 3
    body = next(b for b in stub.requests if "bread" in b["messages"][-1]["content"])
    assert body["model"] == "guard-1" and body["temperature"] == 0.0 and body["max_tokens"] == 4
    sent = body["messages"][-1]["content"]
    assert "User: how to bake bread" in sent and "Assistant: Mix flour and water." in sent
    info = judge.describe()
    assert info["endpoint"]["model"] == "guard-1" and info["agreement"] is None


def test_unparseable_replies_are_asked_again_then_fail_with_one_line():
    replies = iter(["I think it is fine", "safe", "Maybe?"])
    with StubOpenAI(lambda body: next(replies)) as stub:
        judge = load_judge(f"openai:{stub.url}", model="m", parse_retries=1, concurrency=1)
        # Round 1: pair 1 bad, pair 2 "safe". Round 2 asks pair 1 again: bad again → error.
        with pytest.raises(ModelLoadError) as err:
            judge.score(["a", "b"], ["x", "y"])
    assert stub.count == 3
    assert "neither 'safe' nor 'unsafe' after 2 tries (pair 1: 'Maybe?')" in str(err.value)


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [("safe", 0.0), ("unsafe\nS1", 1.0), (" 'Unsafe' ", 1.0), ("SAFE.", 0.0), ("not safe", None), ("", None)],
)
def test_parse_verdict_is_strict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_bad_settings_and_unreachable_endpoint():
    with pytest.raises(ConfigError, match="needs a model name"):
        load_judge("openai:http://localhost:1/v1")
    with pytest.raises(ConfigError, match="policy must be one of"):
        load_judge("openai:http://localhost:1/v1", model="m", policy="rudeness")
    judge = load_judge(f"openai:{unused_url()}", model="m", max_retries=0, timeout=2)
    with pytest.raises(ModelLoadError, match="check that the server is running"):
        judge.score(["p"], ["r"])
