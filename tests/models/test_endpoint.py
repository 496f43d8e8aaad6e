"""The OpenAI-compatible client against the local stub server: replies, order, retries, errors."""

from __future__ import annotations

import threading
import time

import pytest

from excise.errors import ConfigError, ModelLoadError
from excise.models.endpoint import ChatEndpoint, normalise_base_url
from tests.stub_openai import StubOpenAI, unused_url


def _client(url: str, **kw) -> ChatEndpoint:
    return ChatEndpoint(url, "stub-model", sleep=lambda s: None, **kw)


def test_chat_sends_the_openai_body_and_reads_the_reply():
    with StubOpenAI() as stub:
        reply = _client(stub.url).chat(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
            max_tokens=7,
            temperature=0.5,
            seed=3,
        )
    assert reply == "HELLO"
    assert stub.requests == [
        {
            "model": "stub-model",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
            "max_tokens": 7,
            "temperature": 0.5,
            "seed": 3,
        }
    ]


def test_api_key_comes_from_the_named_env_var(monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with StubOpenAI() as stub:
        _client(stub.url, api_key_env="STUB_KEY").chat([{"role": "user", "content": "x"}])
        _client(stub.url).chat([{"role": "user", "content": "x"}])
    assert stub.headers[0].get("Authorization") == "Bearer sk-test"
    assert "Authorization" not in stub.headers[1]


def test_chat_many_keeps_input_order_and_runs_concurrently():
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow_echo(body):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return body["messages"][-1]["content"] * 2

    texts = [f"q{i}" for i in range(12)]
    with StubOpenAI(slow_echo) as stub:
        replies = _client(stub.url, concurrency=4).chat_many(
            [[{"role": "user", "content": t}] for t in texts]
        )
    assert replies == [t * 2 for t in texts]
    assert stub.count == 12
    assert 2 <= peak[0] <= 4


def test_retries_transient_failures_with_backoff():
    waits = []
    with StubOpenAI(fail_first=[503, 429, 500]) as stub:
        client = ChatEndpoint(stub.url, "m", max_retries=3, backoff=0.5, sleep=waits.append)
        assert client.chat([{"role": "user", "content": "ok"}]) == "OK"
    assert stub.count == 4
    assert waits == [0.5, 0.0, 2.0]  # 0.5·2^k, except that the 429 sent Retry-After: 0


def test_gives_up_after_the_retries_with_one_line():
    with StubOpenAI(fail_first=[503] * 5) as stub, pytest.raises(ModelLoadError) as err:
        _client(stub.url, max_retries=2).chat([{"role": "user", "content": "x"}])
    assert stub.count == 3
    assert "failed after 3 attempt(s) (HTTP 503 stub failure 503)" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("status", "advice"), [(401, r"set a valid API key in \$OPENAI_API_KEY"), (404, "base URL")]
)
def test_client_errors_fail_at_once(status, advice):
    with StubOpenAI(fail_first=[status]) as stub, pytest.raises(ModelLoadError, match=advice):
        _client(stub.url).chat([{"role": "user", "content": "x"}])
    assert stub.count == 1


def test_unreachable_endpoint_is_one_clear_line():
    with pytest.raises(ModelLoadError) as err:
        _client(unused_url(), max_retries=1, timeout=2).chat([{"role": "user", "content": "x"}])
    message = str(err.value)
    assert "failed after 2 attempt(s)" in message and "check that the server is running" in message
    assert "\n" not in message


def test_malformed_replies_are_errors():
    with (
        StubOpenAI(lambda body: (200, {"nothing": 1})) as stub,
        pytest.raises(ModelLoadError, match="choices"),
    ):
        _client(stub.url).chat([{"role": "user", "content": "x"}])


def test_base_url_normalisation_and_settings():
    assert normalise_base_url("http://h:1/v1/chat/completions/") == "http://h:1/v1"
    assert normalise_base_url(" https://api.example.com/v1 ") == "https://api.example.com/v1"
    with pytest.raises(ConfigError, match="not an http"):
        normalise_base_url("localhost:8000")
    with pytest.raises(ConfigError, match="needs a model name"):
        ChatEndpoint("http://h/v1", " ")
    with pytest.raises(ConfigError, match="concurrency >= 1"):
        ChatEndpoint("http://h/v1", "m", concurrency=0)
