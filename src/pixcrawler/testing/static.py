"""A fast static file server on loopback: the blob store / CDN of tests and benchmarks.

The performance model says a client must be measured against a *cheap* static host, not
against our API server, so this one does as little as possible per request: one ``stat``,
one ``open`` and a kernel ``sendfile`` of the body. It speaks enough HTTP/1.1 for a chunk
downloader (keep-alive, ``ETag``, ``Accept-Ranges``, a single ``Range``, ``If-Range``)::

    with StaticServer(tmp_path) as srv:
        urllib3.request("GET", f"{srv.base_url}/chunks/00000.zip")

It also holds the lifecycle that :class:`~pixcrawler.testing.faults.FaultProxy` shares:
daemon threads, every open connection tracked so that :meth:`stop` never waits on a
keep-alive client, and nothing ever written to stderr.
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import os
import re
import socket
import socketserver
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

__all__ = ["StaticServer", "StaticStats"]

# serve_forever() notices shutdown() only between polls: a short poll keeps stop() quick.
_POLL_INTERVAL = 0.05
# How long stop() waits, for all handler threads together, after their sockets are shut down.
_JOIN_TIMEOUT = 2.0
# Benchmarks open many connections at once; the stdlib default backlog (5) drops some.
_LISTEN_BACKLOG = 128

# 18 digits are past the end of any file; a longer bound is ignored (whole file) rather than
# given to int(), which refuses more than 4,300 digits and is slow well before that.
_RANGE_RE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})")
_UNSATISFIABLE = (-1, -1)  # what _parse_range returns for a range that misses the file


class _TrackingHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server that knows its open connections and keeps quiet."""

    daemon_threads = True
    # The stdlib joins non-daemon threads on close; ours are daemons and joined by stop().
    block_on_close = False
    request_queue_size = _LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._conn_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self.errors = 0
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can
        # take seconds on a machine with broken DNS; a loopback test server needs none.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"{type(self).__name__}-conn",
            daemon=True,
        )
        with self._conn_lock:
            self._connections[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr; tests and benchmarks want silence.
        # Expected client disconnects are handled in the handlers; anything else is counted.
        with self._conn_lock:
            self.errors += 1

    def close_connections(self, timeout: float = _JOIN_TIMEOUT) -> None:
        """Shut down every open connection and wait for their threads, ``timeout`` seconds
        for all of them together."""
        with self._conn_lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            # SHUT_RDWR wakes a thread blocked reading the next keep-alive request, or
            # sending to a client that stopped reading; close() alone would not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        # One deadline for all: a thread that outlives it must not cost `timeout` again each.
        deadline = time.monotonic() + timeout
        for _, thread in connections:
            if thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.0))

    def reset_errors(self) -> None:
        with self._conn_lock:
            self.errors = 0


class _QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler that never logs and answers errors as JSON."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; Nagle would hold the body for an ACK.
    disable_nagle_algorithm = True
    server_version = "pixcrawler-testing"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the stdlib's per-request line on stderr."""

    def version_string(self) -> str:
        """The ``Server`` header: our name, without the Python version."""
        return self.server_version

    def handle(self) -> None:
        """Serve the connection's requests; a peer that hangs up is not an error."""
        with contextlib.suppress(ConnectionError):
            super().handle()

    def send_json_error(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Reply with the wire contract's error body, keeping the connection alive."""
        body = json.dumps(
            {"error": {"type": error_type, "message": message, "status_code": status}}
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (a bad request line, an unsupported method, a header too
        long) as the same JSON, on a connection then closed: the request was not all read."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "HTTP"
        error_type = phrase.replace(" ", "").replace("-", "") + "Error"
        self.send_json_error(code, error_type, message or phrase, headers={"Connection": "close"})


class _LoopbackServer:
    """Start/stop/context-manager lifecycle of a server on a background thread."""

    _handler: ClassVar[type[BaseHTTPRequestHandler]]

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._httpd: _TrackingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _make_httpd(self) -> _TrackingHTTPServer:
        return _TrackingHTTPServer((self.host, self.port), self._handler)

    def start(self) -> _LoopbackServer:
        """Bind, listen and serve on a daemon thread; returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        httpd = self._make_httpd()
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close the listening socket and every open connection."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._before_stop()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if thread is not None:
            thread.join(_JOIN_TIMEOUT)
        self._httpd = None
        self._thread = None

    def _before_stop(self) -> None:
        """Hook: wake anything that sleeps in a handler before connections are closed."""

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._httpd is not None

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server (no trailing slash)."""
        if self._httpd is None:
            raise RuntimeError(f"{type(self).__name__} is not running; call start()")
        host = str(self._httpd.server_address[0])
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class StaticStats:
    """A snapshot of a :class:`StaticServer`'s counters."""

    requests: int = 0
    requests_by_path: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    errors: int = 0


class _StaticHandler(_QuietHandler):
    server: _StaticHTTPServer

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, *, send_body: bool) -> None:
        url_path = unquote(urlsplit(self.path).path)
        self.server.count_request(url_path)
        file_path = self.server.resolve(url_path)
        if file_path is None:
            self.send_json_error(404, "NotFoundError", f"no file at {url_path}")
            return
        try:
            fh = open(file_path, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError:
            self.send_json_error(404, "NotFoundError", f"no file at {url_path}")
            return
        try:
            self._send_file(fh, send_body=send_body)
        finally:
            fh.close()

    def _send_file(self, fh: Any, *, send_body: bool) -> None:
        st = os.fstat(fh.fileno())
        size = st.st_size
        # A version without reading it: size and mtime, plus the inode (a file replaced by
        # rename) and ctime (rewritten in place with its mtime kept, as cp -p and copy2 do;
        # the kernel sets ctime on every change and no call can set it back).
        etag = f'"{size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}-{st.st_ctime_ns:x}"'
        common = {"ETag": etag, "Accept-Ranges": "bytes"}

        if_none_match = self.headers.get("If-None-Match")
        if if_none_match is not None and _none_match(if_none_match, etag):
            self._send_head(304, common)
            return

        start, end = 0, size  # end is exclusive
        status = 200
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        # If-Range: resume only if the file is the one the client holds the start of.
        if range_header is not None and (if_range is None or if_range.strip() == etag):
            parsed = _parse_range(range_header, size)
            if parsed == _UNSATISFIABLE:
                self.send_json_error(
                    416,
                    "RangeNotSatisfiableError",
                    f"range {range_header!r} outside {size} bytes",
                    headers={"Content-Range": f"bytes */{size}", **common},
                )
                return
            if parsed is not None:
                start, end = parsed
                status = 206
                common["Content-Range"] = f"bytes {start}-{end - 1}/{size}"

        ctype = mimetypes.guess_type(fh.name)[0] or "application/octet-stream"
        self._send_head(
            status, {**common, "Content-Type": ctype, "Content-Length": str(end - start)}
        )
        if send_body and end > start:
            self._send_body(fh, start, end - start)

    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_body(self, fh: Any, offset: int, count: int) -> None:
        sent = 0
        try:
            # socket.sendfile uses os.sendfile where the OS has it: no copy into Python.
            sent = self.connection.sendfile(fh, offset, count)
        except OSError:
            # The client went away mid-body; the connection is unusable either way.
            self.close_connection = True
            sent = max(fh.tell() - offset, 0)
        finally:
            self.server.count_bytes(sent)
        if sent != count:
            self.close_connection = True


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)``, ``_UNSATISFIABLE``, or ``None`` to ignore the header.

    RFC 9110 lets a server ignore a Range it does not support: several ranges or a bad
    syntax get the whole file (200), which every client handles.
    """
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return _UNSATISFIABLE
        return max(size - length, 0), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return _UNSATISFIABLE
    end = size if not last else min(int(last) + 1, size)
    return start, end


class _StaticHTTPServer(_TrackingHTTPServer):
    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], root: Path
    ) -> None:
        self.root = root
        self._stats_lock = threading.Lock()
        self._requests = 0
        self._by_path: Counter[str] = Counter()
        self._bytes_sent = 0
        super().__init__(address, handler)

    def resolve(self, url_path: str) -> Path | None:
        """The file under ``root`` that ``url_path`` names, or ``None`` (-> 404)."""
        if "\x00" in url_path:
            return None
        try:
            candidate = (self.root / url_path.lstrip("/")).resolve()
            # resolve() follows symlinks and '..', so this also refuses a link out of root.
            if not candidate.is_relative_to(self.root) or not candidate.is_file():
                return None
        except OSError:  # a name too long for the file system, a loop of links: not found
            return None
        return candidate

    def count_request(self, path: str) -> None:
        with self._stats_lock:
            self._requests += 1
            self._by_path[path] += 1

    def count_bytes(self, n: int) -> None:
        with self._stats_lock:
            self._bytes_sent += n

    def snapshot(self) -> StaticStats:
        with self._stats_lock:
            return StaticStats(
                requests=self._requests,
                requests_by_path=Counter(self._by_path),
                bytes_sent=self._bytes_sent,
                errors=self.errors,
            )

    def reset(self) -> None:
        with self._stats_lock:
            self._requests = 0
            self._by_path.clear()
            self._bytes_sent = 0
        self.reset_errors()


class StaticServer(_LoopbackServer):
    """Serve the files under ``root`` over HTTP/1.1 on a background thread.

    ``GET``/``HEAD`` only; ``ETag`` (size, mtime, inode, ctime), ``Accept-Ranges: bytes``, one
    ``Range`` -> 206 with ``Content-Range``, an unsatisfiable one -> 416, ``If-Range`` and
    ``If-None-Match`` honoured. A path outside ``root``, a directory or a missing file -> 404
    with a JSON error body. Example::

        with StaticServer(store) as srv:
            url = f"{srv.base_url}/job_1/chunks/00000.zip"
    """

    _handler = _StaticHandler

    def __init__(
        self, root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        super().__init__(host, port)
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"StaticServer root is not a directory: {self.root}")
        self._last_stats = StaticStats()

    def _make_httpd(self) -> _TrackingHTTPServer:
        return _StaticHTTPServer((self.host, self.port), self._handler, self.root)

    def start(self) -> StaticServer:
        """Bind, listen and serve on a daemon thread; returns ``self``."""
        super().start()
        return self

    def stop(self) -> None:
        """Stop serving and close every socket; :attr:`stats` keeps its last values."""
        httpd = self._httpd
        super().stop()
        # Taken once the connections are shut and their threads joined, so the bytes and
        # errors of responses that were still in flight are in it.
        if isinstance(httpd, _StaticHTTPServer):
            self._last_stats = httpd.snapshot()

    def __enter__(self) -> StaticServer:
        return self.start()

    def url(self, relative: str) -> str:
        """The absolute URL of a file, given its path relative to ``root``."""
        return f"{self.base_url}/{quote(relative.lstrip('/'))}"

    @property
    def stats(self) -> StaticStats:
        """Requests (in all and per URL path), body bytes sent and handler errors so far."""
        if isinstance(self._httpd, _StaticHTTPServer):
            return self._httpd.snapshot()
        return self._last_stats

    def reset_stats(self) -> None:
        """Zero the counters, e.g. between a warm-up and a measured run."""
        if isinstance(self._httpd, _StaticHTTPServer):
            self._httpd.reset()
        self._last_stats = StaticStats()


def _none_match(header: str, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag``: a list of tags, each perhaps weak (the
    weak comparison RFC 9110 13.1.2 asks for), or ``*``."""
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)
