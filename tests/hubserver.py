"""A tiny stand-in for the Hugging Face Hub's file-resolve endpoint, on 127.0.0.1, for fetch tests.

Answers `HEAD/GET /<repo>/resolve/<revision>/<path>` the way huggingface_hub expects (ETag,
X-Repo-Commit, Content-Length, Range), plus any plain URL path in `urls`. `cut_once` names files
whose first GET sends half the body and then fails every request until `healthy()` is called,
like a connection that dropped mid-download.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class FakeHub:
    def __init__(self, files: dict[str, bytes], urls: dict[str, bytes] | None = None) -> None:
        self.files = files  # "owner/name/path/in/repo" -> content
        self.urls = urls or {}  # "/some/path" -> content
        self.cut_once: set[str] = set()
        self.broken = False
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def healthy(self) -> None:
        self.broken = False

    def fetched(self, name: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(name)]

    def _content(self, path: str) -> tuple[str, bytes] | None:
        m = _RESOLVE.match(path)
        if m:
            key = f"{m['repo']}/{m['path']}"
            return (key, self.files[key]) if key in self.files else None
        return (path, self.urls[path]) if path in self.urls else None

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?")[0]
        rng = h.headers.get("Range")
        self.requests.append((h.command, path, rng))
        found = self._content(path)
        if self.broken or found is None:
            h.send_response(503 if self.broken else 404)
            h.send_header("Content-Length", "0")
            h.send_header("X-Error-Code", "EntryNotFound" if found is None else "")
            h.end_headers()
            return
        key, data = found
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        h.send_response(206 if start else 200)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        if key in self.cut_once and not start:
            self.cut_once.discard(key)
            self.broken = True
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data[start:])
