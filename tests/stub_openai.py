"""A stub OpenAI-compatible server for tests: stdlib ``http.server`` in a thread, on port 0.

    with StubOpenAI(reply=lambda body: "unsafe") as stub:
        client = ChatEndpoint(stub.url, "stub-model")
        ...
        assert stub.count == 1

``reply(body)`` gets each request's JSON and returns the assistant text, or a
``(status, payload)`` tuple to answer an error. ``fail_first=[503, 429]`` makes the first
requests fail with those statuses before ``reply`` is used. Every request body and its
headers are recorded (``stub.requests``, ``stub.headers``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = Callable[[dict[str, Any]], "str | tuple[int, Any]"]


def echo_last_user(body: dict[str, Any]) -> str:
    """Default reply: the last user message, upper-cased (easy to check)."""
    users = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
    return users[-1].upper() if users else ""


class StubOpenAI:
    """Serve ``POST /v1/chat/completions`` (and ``GET /v1/models``) until the context exits."""

    def __init__(self, reply: Reply = echo_last_user, *, fail_first: list[int] | None = None) -> None:
        self.reply = reply
        self.fail_first = list(fail_first or [])
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with stub._lock:
                    stub.requests.append(body)
                    stub.headers.append(dict(self.headers))
                    failure = stub.fail_first.pop(0) if stub.fail_first else None
                if failure is not None:
                    self._send(failure, {"error": {"message": f"stub failure {failure}"}})
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                answer = stub.reply(body)
                if isinstance(answer, tuple):
                    self._send(*answer)
                    return
                self._send(
                    200,
                    {
                        "id": f"stub-{len(stub.requests)}",
                        "object": "chat.completion",
                        "model": body.get("model"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop",
                            }
                        ],
                    },
                )

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        """The base URL, ending in ``/v1``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def count(self) -> int:
        """Requests received so far (failed ones included)."""
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> StubOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def unused_url() -> str:
    """A base URL on a port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
