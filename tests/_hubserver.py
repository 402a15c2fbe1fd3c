"""A Hugging Face Hub look-alike on 127.0.0.1 for the Hub tests: serves `/ORG/REPO/resolve/REV/FILE`
(HEAD and GET, with the headers huggingface_hub's hf_hub_download reads) from local folders, and 404s
with the Hub's error codes. No internet is touched."""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Handler(http.server.BaseHTTPRequestHandler):
    repos: dict[str, Path] = {}
    requests: list[str] = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _resolve(self) -> Path | None:
        self.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].strip("/").split("/")
        # ORG/REPO/resolve/REVISION/FILE
        if len(parts) < 5 or parts[2] != "resolve":
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.repos:
            self._error(401, "RepoNotFound", "Repository not found")  # the Hub answers 401 to unknown repos
            return None
        if revision not in ("main", COMMIT):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return None
        path = self.repos[repo] / filename
        if not path.is_file():
            self._error(404, "EntryNotFound", "Entry not found")
            return None
        return path

    def _error(self, code: int, error_code: str, message: str) -> None:
        body = (f'{{"error": "{message}"}}').encode()
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _headers(self, path: Path) -> bytes:
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        return data

    def do_HEAD(self) -> None:
        path = self._resolve()
        if path is not None:
            self._headers(path)

    def do_GET(self) -> None:
        path = self._resolve()
        if path is not None:
            self.wfile.write(self._headers(path))


@contextlib.contextmanager
def hub_server(repos: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    """Serves {"ORG/REPO": folder} on 127.0.0.1 (a free port); yields (endpoint URL, request log)."""
    handler = type("Handler", (_Handler,), {"repos": dict(repos), "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path) -> None:
    """huggingface_hub reads HF_ENDPOINT / HF_HUB_CACHE when first imported: set both the variables (for
    subprocesses and fresh imports) and its constants (for this process)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
