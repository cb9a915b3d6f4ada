"""A local HTTP server speaking the few Hugging Face Hub endpoints `qcore inspect` uses: file
metadata (HEAD), downloads with HTTP ranges (GET) and paths-info (POST). It serves a directory as
one repository, and records every range asked for."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, root: Path, repo: str) -> None:
        self.root, self.repo = root, repo
        self.ranges: list[str] = []
        self.full_downloads: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

            def do_POST(self) -> None:
                hub.paths_info(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"

    def file(self, url_path: str) -> Path | None:
        match = re.match(rf"^/{re.escape(self.repo)}/resolve/[^/]+/(.+)$", unquote(url_path))
        path = self.root / match.group(1) if match else None
        return path if path is not None and path.is_file() else None

    def answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = self.file(request.path)
        if path is None:
            request.send_response(404)
            request.send_header("X-Error-Code", "EntryNotFound")
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        data = path.read_bytes()
        wanted = request.headers.get("range")
        status = 200
        if wanted and body:
            self.ranges.append(f"{path.name} {wanted}")
            first, last = (int(n) for n in re.match(r"bytes=(\d+)-(\d+)", wanted).groups())
            data, status = data[first : last + 1], 206
        elif body:
            self.full_downloads.append(path.name)
        request.send_response(status)
        request.send_header("ETag", f'"{hashlib.sha1(path.read_bytes()).hexdigest()}"')
        request.send_header("X-Repo-Commit", COMMIT)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)

    def paths_info(self, request: BaseHTTPRequestHandler) -> None:
        raw = request.rfile.read(int(request.headers.get("Content-Length", 0))).decode()
        try:
            paths = json.loads(raw)["paths"]
        except ValueError:
            paths = parse_qs(raw).get("paths", [])
        found = [
            {"type": "file", "path": p, "size": (self.root / p).stat().st_size, "oid": "0" * 40}
            for p in paths
            if (self.root / p).is_file()
        ]
        payload = json.dumps(found).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)


@contextmanager
def fake_hub(root: Path, repo: str, cache: Path, monkeypatch) -> Iterator[FakeHub]:  # type: ignore[no-untyped-def]
    """Serve ``root`` as hub repository ``repo``; huggingface_hub talks to it, caching into ``cache``."""
    import huggingface_hub.constants as constants

    hub = FakeHub(root, repo)
    thread = threading.Thread(target=hub.server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        yield hub
    finally:
        hub.server.shutdown()
        hub.server.server_close()
