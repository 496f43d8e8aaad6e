"""A small client for OpenAI-compatible ``/chat/completions`` endpoints (stdlib only).

Shared by the ``openai:<url>`` judge and ``excise data anti --generator URL``. It speaks
the subset every compatible server (OpenAI, vLLM, llama.cpp, TGI, Ollama, LM Studio)
understands: ``POST {base_url}/chat/completions`` with ``model``, ``messages``,
``max_tokens``, ``temperature`` (and ``seed`` when given), reading
``choices[0].message.content``.

- **API key** from an environment variable (default ``OPENAI_API_KEY``), sent as a
  bearer token; with the variable unset no header is sent (local servers need none).
- **Retries** with exponential backoff (``backoff · 2^k`` seconds, or the server's
  ``Retry-After``) on connection errors, timeouts, 408, 409, 429 and 5xx; other HTTP
  errors (401 bad key, 404 wrong URL or model, 400 bad request) fail at once.
- **Concurrency**: :meth:`ChatEndpoint.chat_many` sends requests from a thread pool and
  returns replies in input order.
- Every failure is one :class:`~excise.errors.ModelLoadError` line naming the URL and
  what to do.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from tqdm.auto import tqdm

from excise.errors import ConfigError, ModelLoadError

__all__ = ["ChatEndpoint", "Message", "normalise_base_url"]

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}

_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_ENDPOINT_SUFFIXES = ("/chat/completions", "/completions")


def normalise_base_url(url: str) -> str:
    """``http://host:8000/v1/chat/completions/`` → ``http://host:8000/v1`` (scheme and host required).

    Raises:
        ConfigError: not an http(s) URL with a host.
    """
    url = url.strip().rstrip("/")
    for suffix in _ENDPOINT_SUFFIXES:
        if url.endswith(suffix):
            url = url[: -len(suffix)]
            break
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"endpoint {url!r} is not an http(s) URL; pass e.g. http://localhost:8000/v1")
    return url


class ChatEndpoint:
    """An OpenAI-compatible chat endpoint.

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``.
        model: the model name the server expects.
        api_key_env: environment variable holding the API key (unset: no key is sent).
        timeout: seconds to wait for one reply.
        max_retries: further attempts after a retryable failure.
        backoff: seconds before the first retry; doubled each time (capped at 60 s).
        concurrency: requests in flight at once in :meth:`chat_many`.
        sleep: the wait function (tests pass a no-op).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        concurrency: int = 4,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not model or not model.strip():
            raise ConfigError(f"endpoint {base_url!r} needs a model name (e.g. --model gpt-4o-mini)")
        if timeout <= 0 or max_retries < 0 or backoff < 0 or concurrency < 1:
            raise ConfigError(
                "endpoint settings: timeout > 0, max_retries >= 0, backoff >= 0 and concurrency >= 1 "
                f"(got {timeout}, {max_retries}, {backoff}, {concurrency})"
            )
        self.base_url = normalise_base_url(base_url)
        self.model = model.strip()
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.concurrency = int(concurrency)
        self._sleep = sleep

    def describe(self) -> dict[str, Any]:
        """URL, model and client settings (never the key)."""
        return {
            "base_url": self.base_url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "api_key_set": bool(os.environ.get(self.api_key_env)),
            "timeout": self.timeout,
            "max_retries": self.max_retries,
        }

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The assistant's reply to ``messages`` (``choices[0].message.content``).

        Raises:
            ModelLoadError: unreachable after the retries, an HTTP error, or a reply not
                shaped like an OpenAI chat completion.
        """
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if seed is not None:
            body["seed"] = seed
        body |= extra or {}
        reply = self._post("/chat/completions", body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise ModelLoadError(
                f"endpoint {self.base_url} sent a reply without choices[0].message.content "
                f"({json.dumps(reply)[:200]}); is it OpenAI-compatible?"
            ) from err
        return "" if content is None else str(content)

    def chat_many(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        progress: bool = False,
        desc: str = "requests",
        **settings: Any,
    ) -> list[str]:
        """Replies to many conversations, ``concurrency`` at a time, in input order."""
        if not conversations:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            futures = [pool.submit(self.chat, messages, **settings) for messages in conversations]
            return [f.result() for f in tqdm(futures, desc=desc, unit="req", disable=not progress)]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON, retrying what is worth retrying; the decoded JSON reply."""
        url = self.base_url + path
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            wait = min(self.backoff * 2**attempt, 60.0)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code not in _RETRY_STATUS:
                    raise ModelLoadError(_http_advice(url, err.code, detail, self.api_key_env)) from err
                last = f"HTTP {err.code} {detail}".strip()
                wait = _retry_after(err, wait)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            else:
                try:
                    reply = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise ModelLoadError(
                        f"endpoint {url} did not answer with JSON ({raw[:120]!r}); is it OpenAI-compatible?"
                    ) from err
                if not isinstance(reply, dict):
                    raise ModelLoadError(
                        f"endpoint {url} answered with a {type(reply).__name__}, not an object"
                    )
                return reply
            if attempt < self.max_retries:
                self._sleep(wait)
        raise ModelLoadError(
            f"endpoint {url} failed after {self.max_retries + 1} attempt(s) ({last}); "
            "check that the server is running and the URL is right"
        )


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's error message, when its body is OpenAI-style JSON; else a short excerpt."""
    try:
        raw = err.read()
    except OSError:
        return ""
    try:
        payload = json.loads(raw)
        message = payload.get("error", payload)
        message = message.get("message", message) if isinstance(message, dict) else message
        return str(message)[:200]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return raw[:200].decode("utf-8", "replace").replace("\n", " ")


def _retry_after(err: urllib.error.HTTPError, default: float) -> float:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return min(max(float(value), 0.0), 60.0) if value is not None else default
    except ValueError:
        return default


def _http_advice(url: str, code: int, detail: str, key_env: str) -> str:
    hint = {
        401: f"set a valid API key in ${key_env}",
        403: f"the key in ${key_env} is not allowed to use this model",
        404: "check the base URL (it usually ends in /v1) and the model name",
    }.get(code, "check the request settings")
    detail = f": {detail}" if detail else ""
    return f"endpoint {url} answered HTTP {code}{detail}; {hint}"
