"""A minimal Hugging Face hub on 127.0.0.1, for tests: what ``huggingface_hub`` needs, nothing more.

Point ``HF_ENDPOINT`` at :attr:`LocalHub.url` and the real client talks to it. It serves the
endpoints ``snapshot_download`` calls (read from huggingface_hub 2.4's ``_snapshot_download.py``,
``file_download.py`` and ``hf_api.py``) and those ``create_repo`` + ``upload_folder`` call
(``hf_api.py``, ``_commit_api.py``, ``_upload_pipeline.py``):

- ``GET /api/models/{repo}[/revision/{rev}]``: model info; ``sha`` is the commit.
- ``GET /api/models/{repo}/tree/{rev}``: the file listing (one page).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a file, with ``X-Repo-Commit``, ``ETag``
  and ``Content-Length`` (no redirect, no Xet).
- ``POST /api/repos/create``: 200 with the URL, 409 when it exists.
- ``POST /api/models/{repo}/preupload/{rev}``: every file is uploaded ``regular``
  (inline in the commit, base64), so no LFS or Xet storage is needed.
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit; kept in :attr:`LocalHub.commits`.

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as
the hub's do, so the client raises its own exception types.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha → path → content
    refs: dict[str, str] = field(default_factory=dict)  # branch → sha


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class LocalHub:
    """A hub in a thread: ``with LocalHub() as hub: hub.add_folder("org/name", folder)``."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.commits: list[dict] = []  # each commit request: {"repo", "revision", "header", "files"}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main") -> str:
        """Make a commit of ``files`` (added to the branch's current ones) and return its sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo())
            parent = repo.refs.get(branch)
            content = dict(repo.commits[parent]) if parent else {}
            content.update(files)
            digest = hashlib.sha1(repr((parent, sorted(content.items()))).encode()).hexdigest()
            repo.commits[digest] = content
            repo.refs[branch] = digest
            return digest

    def add_folder(self, repo_id: str, folder: Path, *, branch: str = "main") -> str:
        """Commit every file of ``folder`` (recursively) to ``repo_id``; return the commit sha."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return self.commit(repo_id, files, branch=branch)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at a branch or commit."""
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)]

    def _resolve(self, repo_id: str, revision: str) -> tuple[str | None, str | None]:
        """(sha, error code): the commit a revision names, or why not."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, "RepoNotFound"
        sha = repo.refs.get(revision, revision if revision in repo.commits else None)
        return (sha, None) if sha else (None, "RevisionNotFound")


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

        # ------------------------------------------------------------------ plumbing
        def _parts(self) -> list[str]:
            return [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(payload).encode()
            self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

        def _error(self, code: str, status: int = 404, headers: dict[str, str] | None = None) -> None:
            self._json(status, {"error": code}, {"X-Error-Code": code, **(headers or {})})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        # ------------------------------------------------------------------ verbs
        def do_HEAD(self) -> None:
            self._get()

        def do_GET(self) -> None:
            self._get()

        def do_POST(self) -> None:
            hub.requests.append((self.command, self.path))
            parts = self._parts()
            if parts[:3] == ["api", "repos", "create"]:
                return self._create(json.loads(self._body()))
            if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
                repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                if repo_id not in hub.repos:
                    return self._error("RepoNotFound")
                return self._preupload(repo_id) if action == "preupload" else self._commit(repo_id, revision)
            self._error("NotFound")

        def _get(self) -> None:
            hub.requests.append((self.command, self.path))
            parts = self._parts()
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                if not rest:
                    return self._info(repo_id, "main")
                if rest[0] == "revision":
                    return self._info(repo_id, "/".join(rest[1:]))
                if rest[0] == "tree":
                    return self._tree(repo_id, rest[1])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            self._error("NotFound")

        # ------------------------------------------------------------------ endpoints
        def _info(self, repo_id: str, revision: str) -> None:
            sha, error = hub._resolve(repo_id, revision)
            if error:
                return self._error(error)
            siblings = [{"rfilename": p} for p in sorted(hub.repos[repo_id].commits[sha])]
            self._json(200, {"id": repo_id, "sha": sha, "private": False, "siblings": siblings})

        def _tree(self, repo_id: str, revision: str) -> None:
            sha, error = hub._resolve(repo_id, revision)
            if error:
                return self._error(error)
            files = hub.repos[repo_id].commits[sha]
            listing = [
                {"type": "file", "path": p, "size": len(c), "oid": _git_blob_oid(c)}
                for p, c in sorted(files.items())
            ]
            self._json(200, listing)

        def _file(self, repo_id: str, revision: str, path: str) -> None:
            sha, error = hub._resolve(repo_id, revision)
            if error:
                return self._error(error)
            content = hub.repos[repo_id].commits[sha].get(path)
            if content is None:
                return self._error("EntryNotFound", headers={"X-Repo-Commit": sha})
            etag = f'"{hashlib.sha256(content).hexdigest()}"'
            self._send(
                200, content, {"X-Repo-Commit": sha, "ETag": etag, "Content-Type": "application/octet-stream"}
            )

        def _create(self, payload: dict) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._error("RepoExists", status=409)
            hub.repos[repo_id] = _Repo()
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _preupload(self, repo_id: str) -> None:
            files = json.loads(self._body())["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            self._json(200, {"files": modes})

        def _commit(self, repo_id: str, revision: str) -> None:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            files = {
                item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in lines
                if item["key"] == "file"
            }
            if any(item["key"] not in ("header", "file") for item in lines):
                return self._error("UnsupportedOperation", status=400)  # this hub stores files inline only
            sha = hub.commit(repo_id, files, branch=revision)
            hub.commits.append({"repo": repo_id, "revision": revision, "header": header, "files": files})
            self._json(
                200,
                {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None},
            )

    return Handler
