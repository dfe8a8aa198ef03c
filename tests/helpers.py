"""Small helpers shared by the SDK tests: a header-recording host and digest of a run."""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np


def raw_get(base_url: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """Send ``target`` byte for byte: no client-side normalisation of ``..`` or escapes
    (urllib3 would normalise ``..`` and re-encode)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def settles(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether ``condition`` holds within ``timeout`` (servers close their side of a
    connection a moment after the client closes its own)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def close_while_consuming(
    dataset: Any, ready: Callable[[], bool], *, settle: float = 0.0
) -> tuple[float, list[BaseException]]:
    """Iterate ``dataset`` on a thread; once ``ready()`` holds (and ``settle`` more seconds),
    close it from this thread. Returns the seconds from close() until the consumer had
    stopped (``inf`` if it never did) and what the consumer raised."""
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            list(dataset)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=consume)
    worker.start()
    assert settles(ready, timeout=10), "the consumer never got going"
    time.sleep(settle)
    started = time.monotonic()
    dataset.close()
    worker.join(10)
    return (float("inf") if worker.is_alive() else time.monotonic() - started), errors


def digest(samples: Iterable[tuple[np.ndarray, Any]]) -> tuple[int, str]:
    """(count, sha256 over every image's shape, pixels and label): a run's fingerprint."""
    hasher = hashlib.sha256()
    count = 0
    for image, label in samples:
        hasher.update(repr((image.shape, str(label))).encode())
        hasher.update(np.ascontiguousarray(image).tobytes())
        count += 1
    return count, hasher.hexdigest()


class RecordingHost:
    """A blob host on any loopback address: serves files under ``root`` and records the
    headers of every request, so a test can prove what was (not) sent to it."""

    def __init__(self, root: Path, host: str = "127.0.0.2") -> None:
        self.root = root
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.redirect_to: str | None = None
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with lock:
                    outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                    outer.paths.append(self.path)
                if outer.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", outer.redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = (outer.root / self.path.split("?")[0].lstrip("/")).resolve()
                if not path.is_file() or outer.root.resolve() not in path.parents:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingHost:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
