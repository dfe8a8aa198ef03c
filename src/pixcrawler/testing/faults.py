"""A fault-injecting HTTP reverse proxy, to test retries, resume and checksums for real.

Put :class:`FaultProxy` between a client and any upstream (our server, a
:class:`~pixcrawler.testing.static.StaticServer`) and tell a :class:`FaultSchedule` which
requests misbehave and how. Faults happen on a real TCP connection, so a client sees what
it would see from a real network: a reset is an RST, a truncation is a FIN before
``Content-Length`` bytes, a stall is silence on an open socket::

    schedule = FaultSchedule.script([Fault("reset", after_bytes=16384)], match=r"/chunks/")
    with StaticServer(store) as blobs, \
            FaultProxy(blobs.base_url, schedule=schedule) as proxy, \
            run_in_thread(create_app(store, keys, chunk_base_url=proxy.base_url)) as api:
        dataset = load_dataset(job_id, api_key=key, base_url=api)   # nothing fetched yet
        for image, label in dataset: ...   # the first chunk GET is cut, then resumed
        assert proxy.stats.faults["reset"] == 1   # (a cut past a body's end is skipped)

A fault is counted in :attr:`FaultProxy.stats` when it takes effect, just before the client
can see it, so a test can wait for that moment with :meth:`FaultProxy.wait_for_fault`.
"""

from __future__ import annotations

import contextlib
import http.client
import random as _random
import re
import socket
import struct
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Literal, get_args
from urllib.parse import unquote, urlsplit

from pixcrawler.testing.static import (
    _JOIN_TIMEOUT,
    _LoopbackServer,
    _QuietHandler,
    _TrackingHTTPServer,
)

__all__ = ["FAULT_KINDS", "Fault", "FaultKind", "FaultProxy", "FaultSchedule", "ProxyStats"]

FaultKind = Literal[
    "reset",
    "status",
    "rate_limit",
    "stall",
    "truncate",
    "corrupt",
    "expired",
    "hang",
    "ignore_range",
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)

# Kinds a retrying client must absorb with no special case: the default of random().
DEFAULT_RANDOM_KINDS: tuple[FaultKind, ...] = ("reset", "status", "rate_limit", "truncate")

# Kinds answered by the proxy itself, without contacting the upstream.
_REPLY_KINDS = frozenset({"status", "rate_limit", "expired"})
# Kinds that interrupt the body after `after_bytes` bytes.
_CUT_KINDS = frozenset({"reset", "stall", "truncate"})
# What "ignore_range" leaves out of the request it forwards.
_RANGE_HEADERS = frozenset({"range", "if-range"})

_BLOCK = 256 * 1024  # bytes relayed per read from the upstream
# At a cut point in a body of unknown length (chunked, close-delimited) only a read tells
# whether the body goes on: one byte, so a slow upstream delays the fault the least.
_LOOKAHEAD = 1
_UPSTREAM_TIMEOUT = 30.0
# The default patience of FaultProxy.wait_for_fault.
_WAIT_FOR_FAULT_TIMEOUT = 10.0
# A reset waits (bounded) for the bytes before it to be acknowledged: SO_LINGER=0 discards
# unsent data, and the client must hold exactly `after_bytes` bytes when the RST lands.
_RESET_DRAIN_TIMEOUT = 2.0
_RESET_DRAIN_POLL = 0.001

# Per RFC 9110 these describe one hop only and are never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

try:  # Linux (and some BSDs): bytes sent but not yet acknowledged by the peer
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - other platforms
    _TIOCOUTQ = None


@dataclass(frozen=True)
class Fault:
    """One injected failure. ``kind`` picks the failure; the other fields tune it.

    - ``"reset"``: upstream headers and ``after_bytes`` body bytes, then a TCP RST.
    - ``"status"``: ``status`` (500-599, default 503) with a JSON error body, upstream not
      contacted; ``Retry-After`` when ``retry_after`` is set.
    - ``"rate_limit"``: 429 with ``Retry-After: retry_after`` (default 1 s) and a JSON body.
    - ``"stall"``: headers and ``after_bytes`` bytes, then ``seconds`` of silence; then
      ``then="continue"`` sends the rest, ``then="close"`` closes the connection.
    - ``"truncate"``: the upstream's headers (its full ``Content-Length``) but only
      ``after_bytes`` body bytes, then a clean close (FIN).
    - ``"corrupt"``: the whole response with the body byte at ``offset`` XOR-ed with 0xFF,
      so only a checksum can notice; nothing happens if the body is shorter.
    - ``"expired"``: 403 (or ``status=410``) with a JSON body, as a blob store answers an
      expired presigned URL; upstream not contacted.
    - ``"hang"``: nothing at all, not even headers, for ``seconds``: the client waits for
      its response. Then ``then="continue"`` relays the response, ``then="close"`` closes
      the connection.
    - ``"ignore_range"``: the request goes upstream without its ``Range`` (and
      ``If-Range``), so a ranged request gets the whole body with 200, as from a server
      or cache that does not serve ranges (RFC 9110 allows it).

    A fractional ``retry_after`` is sent as such (``0.2``): not valid HTTP, but it keeps
    tests fast against a client that parses seconds as a float.

    A fault that cannot take effect on the response it was chosen for is not applied: a
    cut (``reset``, ``stall``, ``truncate``) whose ``after_bytes`` is at or past the end of
    the body, or on a response without one (``HEAD``, 204, 304); a ``corrupt`` whose
    ``offset`` is past the end; an ``ignore_range`` on a request without ``Range``; any
    fault whose client left before its moment came. Firing such a cut once the body was
    complete would land it on the next, clean request of the keep-alive connection. A
    fault not applied is counted in :attr:`ProxyStats.faults_skipped`, not in
    :attr:`ProxyStats.faults`.
    """

    kind: FaultKind
    after_bytes: int = 0
    status: int | None = None
    retry_after: float | None = None
    seconds: float = 5.0
    then: Literal["continue", "close"] = "continue"
    offset: int = 0
    message: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.after_bytes < 0 or self.offset < 0 or self.seconds < 0:
            raise ValueError("after_bytes, offset and seconds must be >= 0")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if self.then not in ("continue", "close"):
            raise ValueError(f"then must be 'continue' or 'close', not {self.then!r}")
        # Fill in the status each replying kind sends, so equal faults compare equal.
        if self.kind == "status":
            status = 503 if self.status is None else self.status
            if not 500 <= status <= 599:
                raise ValueError(f"a 'status' fault sends a 5xx status, not {status}")
        elif self.kind == "rate_limit":
            if self.status not in (None, 429):
                raise ValueError("a 'rate_limit' fault always sends 429")
            status = 429
            if self.retry_after is None:
                object.__setattr__(self, "retry_after", 1.0)
        elif self.kind == "expired":
            status = 403 if self.status is None else self.status
            if status not in (403, 410):
                raise ValueError(f"an 'expired' fault sends 403 or 410, not {status}")
        else:
            if self.status is not None:
                raise ValueError(f"a {self.kind!r} fault relays the upstream's status")
            return
        object.__setattr__(self, "status", status)


class FaultSchedule:
    """Which requests get which :class:`Fault`; build one with :meth:`script`,
    :meth:`random` or :meth:`none`.

    Only requests whose URL path matches ``match`` (``re.search``; every path when
    ``None``) consult the schedule; the others always pass clean. Decisions are taken in
    the order requests arrive, under a lock.
    """

    def __init__(
        self,
        *,
        script: Sequence[Fault | None] = (),
        rate: float | None = None,
        kinds: Sequence[Fault] = (),
        seed: int = 0,
        match: str | re.Pattern[str] | None = None,
    ) -> None:
        self._script = tuple(script)
        self._rate = rate
        self._kinds = tuple(kinds)
        self._seed = seed
        self._rng = _random.Random(seed)
        self._match = re.compile(match) if isinstance(match, str) else match
        self._lock = threading.Lock()
        self._matched = 0

    @classmethod
    def script(
        cls, faults: Iterable[Fault | None], *, match: str | re.Pattern[str] | None = None
    ) -> FaultSchedule:
        """The n-th matching request gets ``faults[n]`` (``None``: passes clean); every
        request after the list passes clean."""
        return cls(script=list(faults), match=match)

    @classmethod
    def random(
        cls,
        rate: float,
        kinds: Sequence[FaultKind | Fault] = DEFAULT_RANDOM_KINDS,
        *,
        seed: int = 0,
        match: str | re.Pattern[str] | None = None,
    ) -> FaultSchedule:
        """Each matching request gets a fault with probability ``rate``, its kind drawn
        uniformly from ``kinds`` (a kind name means that kind's defaults; a :class:`Fault`
        is used as given). The same seed gives the same sequence of decisions."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], not {rate}")
        templates = [k if isinstance(k, Fault) else Fault(k) for k in kinds]
        if not templates:
            raise ValueError("random() needs at least one fault kind")
        return cls(rate=rate, kinds=templates, seed=seed, match=match)

    @classmethod
    def none(cls) -> FaultSchedule:
        """No faults: the proxy only relays and counts."""
        return cls()

    def decide(self, path: str) -> Fault | None:
        """The fault for the next request to ``path``, or ``None``; advances the schedule."""
        if self._match is not None and self._match.search(path) is None:
            return None
        with self._lock:
            n = self._matched
            self._matched += 1
            if self._rate is None:
                return self._script[n] if n < len(self._script) else None
            # Two draws per decision, always, so the sequence depends on the seed alone.
            hit = self._rng.random() < self._rate
            template = self._rng.choice(self._kinds)
            return template if hit else None

    @property
    def matched(self) -> int:
        """How many requests have consulted the schedule."""
        with self._lock:
            return self._matched

    @property
    def exhausted(self) -> bool:
        """A script has handed out its last entry (a random schedule never is)."""
        with self._lock:
            return self._rate is None and self._matched >= len(self._script)


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of a :class:`FaultProxy`'s counters.

    ``faults`` and ``fault_log`` (``(path, kind)`` in order) hold the faults that took
    effect, each counted just before the client could see it; ``faults_skipped`` the ones
    chosen for a response they could not apply to (see :class:`Fault`).
    ``bytes_forwarded`` grows block by block as body bytes are written to clients, so it
    includes the bytes before a stall while the stall goes on.
    """

    requests: int = 0
    requests_by_path: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    bytes_forwarded: int = 0
    fault_log: tuple[tuple[str, str], ...] = ()
    errors: int = 0
    faults_skipped: Counter[str] = field(default_factory=Counter)

    @property
    def faults_injected(self) -> int:
        """Faults of every kind."""
        return sum(self.faults.values())


class _Counters:
    """The proxy's mutable, thread-safe counters; they outlive a stop()/start()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Notified when a fault is applied: what FaultProxy.wait_for_fault waits on.
        self.applied = threading.Condition(self.lock)
        self.requests = 0
        self.by_path: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.bytes_forwarded = 0
        self.fault_log: list[tuple[str, str]] = []
        self.errors = 0

    def clear(self) -> None:
        with self.lock:
            self.requests = 0
            self.by_path.clear()
            self.faults.clear()
            self.skipped.clear()
            self.bytes_forwarded = 0
            self.fault_log.clear()
            self.errors = 0


class _ProxyHTTPServer(_TrackingHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        proxy: FaultProxy,
    ) -> None:
        self.proxy = proxy
        # Every upstream socket a handler opened: a handler blocked reading a slow upstream
        # is not woken by shutting its client's socket, only by shutting this one. Weak, so
        # a socket closed and dropped by its handler needs no bookkeeping.
        self._upstream_lock = threading.Lock()
        self._upstreams: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._closing = False
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        counters = self.proxy._counters
        with counters.lock:
            counters.errors += 1

    def track_upstream(self, sock: socket.socket) -> None:
        """Register a new upstream socket; refused (and closed) once stopping began, so no
        socket opened during close_connections() escapes it."""
        with self._upstream_lock:
            if not self._closing:
                self._upstreams.add(sock)
                return
        sock.close()
        raise ConnectionAbortedError("the proxy is stopping")

    def close_connections(self, timeout: float = _JOIN_TIMEOUT) -> None:
        with self._upstream_lock:
            self._closing = True
            upstreams = list(self._upstreams)
        for sock in upstreams:
            # Wakes a handler blocked on the upstream's headers or body at once.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        super().close_connections(timeout)


class _TrackedConnection(http.client.HTTPConnection):
    """An upstream connection whose every socket (http.client reconnects on its own after
    a ``Connection: close`` response) is registered with the proxy, for stop()."""

    def __init__(
        self, server: _ProxyHTTPServer, host: str, port: int | None, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._server = server
        # http.client's connect() opens its socket with this, then sets TCP_NODELAY.
        self._create_connection = self._open_tracked

    def _open_tracked(
        self,
        address: tuple[str, int],
        timeout: float | None,
        source_address: tuple[str, int] | None = None,
    ) -> socket.socket:
        """socket.create_connection, but each socket is registered before it connects:
        stop() shuts it down, which aborts a connect() blocked on an upstream that does not
        accept (its accept queue full, SYNs dropped) at once, not after ``timeout``."""
        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM
        ):
            sock = None
            try:
                sock = socket.socket(family, kind, proto)
                # Refused (the socket closed) once stopping began: so is every next address.
                self._server.track_upstream(sock)
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as exc:
                if sock is not None:
                    sock.close()
                error = exc
                continue
            return sock
        raise error if error is not None else OSError(f"getaddrinfo found no address for {host}")

    def connect(self) -> None:
        super().connect()
        # HTTPS: the TLS socket that wraps (and took over) the one registered above.
        self._server.track_upstream(self.sock)


class _TrackedHTTPSConnection(_TrackedConnection, http.client.HTTPSConnection):
    """The same over TLS: HTTPSConnection.connect wraps the socket that is registered."""


class _ProxyHandler(_QuietHandler):
    server: _ProxyHTTPServer
    _upstream_conn: http.client.HTTPConnection | None = None
    # The request being handled: its path, its fault, and whether the fault took effect.
    _path = ""
    _fault: Fault | None = None
    _fault_applied = False

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def finish(self) -> None:
        self._drop_upstream()
        with contextlib.suppress(OSError):
            super().finish()

    # The request side.

    def _proxy(self) -> None:
        proxy = self.server.proxy
        split = urlsplit(self.path)
        path = unquote(split.path) or "/"
        counters = proxy._counters
        with counters.lock:
            counters.requests += 1
            counters.by_path[path] += 1

        if "Transfer-Encoding" in self.headers:
            # Request bodies are framed by Content-Length only; no client of ours streams.
            self.close_connection = True
            self.send_json_error(411, "LengthRequiredError", "send a Content-Length body")
            return
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            self.close_connection = True
            self.send_json_error(400, "BadRequestError", f"bad Content-Length {length!r}")
            return
        body = self.rfile.read(int(length)) or None

        fault = proxy.schedule.decide(path)
        self._path, self._fault, self._fault_applied = path, fault, False
        try:
            self._handle_fault_and_forward(split.path or "/", split.query, body)
        finally:
            if fault is not None and not self._fault_applied:
                with counters.lock:
                    counters.skipped[fault.kind] += 1

    def _handle_fault_and_forward(self, path: str, query: str, body: bytes | None) -> None:
        proxy = self.server.proxy
        fault = self._fault
        if fault is not None and fault.kind in _REPLY_KINDS:
            self._applied()
            self._reply_fault(fault)
            return
        if fault is not None and fault.kind == "hang":
            self._applied()
            stopped = proxy._stop_event.wait(fault.seconds)
            if stopped or fault.then == "close":
                self.close_connection = True
                return

        target = proxy._upstream_prefix + path
        if query:
            target += f"?{query}"
        drop = None
        if fault is not None and fault.kind == "ignore_range":
            drop = _RANGE_HEADERS
            if "Range" in self.headers:  # If-Range alone asks for no range: nothing to ignore
                self._applied()
        try:
            response = self._forward(target, body, drop)
        except (OSError, http.client.HTTPException) as exc:
            self._drop_upstream()
            self.send_json_error(502, "BadGatewayError", f"upstream {proxy.upstream}: {exc}")
            return
        self._relay(response, fault)

    def _applied(self) -> None:
        """Count this request's fault as taken effect: called just before the client can
        see it, so a test that saw the count never sees the response before the fault."""
        fault = self._fault
        if fault is None or self._fault_applied:
            return
        self._fault_applied = True
        counters = self.server.proxy._counters
        with counters.applied:
            counters.faults[fault.kind] += 1
            counters.fault_log.append((self._path, fault.kind))
            counters.applied.notify_all()

    def _forward(
        self, target: str, body: bytes | None, drop: frozenset[str] | None = None
    ) -> http.client.HTTPResponse:
        reused = self._upstream_conn is not None
        try:
            return self._send_upstream(target, body, drop)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # A kept-alive upstream connection may have been closed while idle: one retry
            # on a fresh connection, never on a fresh one that failed, nor when stop() cut it.
            self._drop_upstream()
            if not reused or self.server.proxy._stop_event.is_set():
                raise
            return self._send_upstream(target, body, drop)

    def _send_upstream(
        self, target: str, body: bytes | None, drop: frozenset[str] | None
    ) -> http.client.HTTPResponse:
        """``drop``: request headers (lower case) not forwarded."""
        if self._upstream_conn is None:
            self._upstream_conn = self.server.proxy._connect_upstream(self.server)
        conn = self._upstream_conn
        conn.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", self.server.proxy._upstream_host)
        for name, value in self.headers.items():
            lower = name.lower()
            if lower not in _HOP_BY_HOP and lower != "host" and (drop is None or lower not in drop):
                conn.putheader(name, value)
        conn.endheaders(body)
        return conn.getresponse()

    def _drop_upstream(self) -> None:
        if self._upstream_conn is not None:
            self._upstream_conn.close()
            self._upstream_conn = None

    # The response side.

    def _reply_fault(self, fault: Fault) -> None:
        status = fault.status if fault.status is not None else 503
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = _format_seconds(fault.retry_after)
        if fault.kind == "rate_limit":
            error_type = "RateLimitError"
            message = f"rate limited (injected); retry after {headers['Retry-After']} s"
        elif fault.kind == "expired":
            error_type = "ForbiddenError"
            message = "request has expired (injected)"
        else:
            error_type = "ServerError"
            message = f"server error {status} (injected)"
        self.send_json_error(status, error_type, fault.message or message, headers=headers)

    def _relay(self, response: http.client.HTTPResponse, fault: Fault | None) -> None:
        has_body = self.command != "HEAD" and response.status >= 200
        has_body = has_body and response.status not in (204, 304)
        # Without a Content-Length upstream (chunked, or close-delimited) we frame the body
        # ourselves, so the client connection can stay alive either way.
        chunked = has_body and response.getheader("Content-Length") is None
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        try:
            self.end_headers()
            complete = self._relay_body(response, fault, chunked=chunked)
        except (OSError, http.client.HTTPException):
            # Either side went away mid-body; neither connection is usable now.
            complete = False
            self.close_connection = True
        if not complete:
            # The upstream response was not read to its end: its connection is spoiled.
            self._drop_upstream()

    def _relay_body(
        self, response: http.client.HTTPResponse, fault: Fault | None, *, chunked: bool
    ) -> bool:
        """Copy the body in blocks, applying ``fault``; whether it ran to its end."""
        cut = fault.after_bytes if fault is not None and fault.kind in _CUT_KINDS else None
        flip = fault.offset if fault is not None and fault.kind == "corrupt" else None
        block = bytearray(_BLOCK)
        view = memoryview(block)
        done = 0
        while True:
            n = 0
            if fault is not None and cut is not None and done >= cut:
                cut = None
                if response.length is None:
                    n = response.readinto(view[:_LOOKAHEAD])
                    goes_on = n > 0
                else:  # http.client counts down what is left of a Content-Length body
                    goes_on = response.length > 0
                # At or past the end the response is whole: the fault is not applied, as
                # fired now it would hit the connection's next request. The read below
                # still runs, to let http.client finish the response (HEAD, 204, 304).
                if goes_on and not self._interrupt(fault):
                    return False
            if not n:
                # Reads stop exactly at the cut, so the client holds `after_bytes` bytes.
                limit = _BLOCK if cut is None else min(_BLOCK, cut - done)
                n = response.readinto(view[:limit])
                if not n:
                    break
            if flip is not None and done <= flip < done + n:
                block[flip - done] ^= 0xFF
                flip = None
                self._applied()
            self._write_block(view[:n], chunked=chunked)
            done += n
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        return True

    def _write_block(self, data: memoryview, *, chunked: bool) -> None:
        if chunked:
            self.wfile.write(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            self.wfile.write(data)
        # Counted as written, not when the response ends: a stall's bytes show at once.
        counters = self.server.proxy._counters
        with counters.lock:
            counters.bytes_forwarded += len(data)

    def _interrupt(self, fault: Fault) -> bool:
        """Apply a cut fault at the cut point; whether the body goes on afterwards."""
        self._applied()
        if fault.kind == "reset":
            self._reset_connection()
            return False
        if fault.kind == "truncate":
            # A FIN now, while this handler still owns the socket; the server closes it
            # after this response.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
            return False
        stopped = self.server.proxy._stop_event.wait(fault.seconds)
        if stopped or fault.then == "close":
            self.close_connection = True
            return False
        return True

    def _reset_connection(self) -> None:
        sock = self.connection
        _wait_acknowledged(sock, self.server.proxy._stop_event)
        # Linger on with a zero timeout: close() drops the connection with an RST, not FIN.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        self.close_connection = True


def _wait_acknowledged(sock: socket.socket, stop: threading.Event) -> None:
    """Wait until the peer has acknowledged every byte sent (bounded), where we can tell."""
    if _TIOCOUTQ is None:  # pragma: no cover - other platforms
        stop.wait(0.05)
        return
    deadline = time.monotonic() + _RESET_DRAIN_TIMEOUT
    buf = bytearray(4)
    while time.monotonic() < deadline and not stop.is_set():
        try:
            fcntl.ioctl(sock.fileno(), _TIOCOUTQ, buf)
        except OSError:
            return
        if struct.unpack("i", buf)[0] == 0:
            return
        time.sleep(_RESET_DRAIN_POLL)


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class FaultProxy(_LoopbackServer):
    """A reverse proxy to ``upstream`` that injects the faults ``schedule`` decides.

    Forwards the method, path and query, headers (``Authorization``, ``X-API-Key``,
    ``Range`` ...) and a ``Content-Length`` body; relays the upstream's status, headers and
    body in blocks. ``schedule`` may be replaced while running (``proxy.schedule = ...``);
    the next request uses the new one. Example::

        with FaultProxy(srv.base_url, schedule=FaultSchedule.random(0.2, seed=1)) as proxy:
            urllib3.request("GET", f"{proxy.base_url}/chunks/00000.zip")
    """

    _handler = _ProxyHandler

    def __init__(
        self,
        upstream: str,
        *,
        schedule: FaultSchedule | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        upstream_timeout: float = _UPSTREAM_TIMEOUT,
    ) -> None:
        super().__init__(host, port)
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http(s) URL, not {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self.schedule = schedule if schedule is not None else FaultSchedule.none()
        self.upstream_timeout = upstream_timeout
        self._upstream_scheme = parts.scheme
        self._upstream_hostname = parts.hostname
        self._upstream_port = parts.port
        self._upstream_host = parts.netloc
        self._upstream_prefix = parts.path.rstrip("/")
        self._counters = _Counters()
        self._stop_event = threading.Event()

    def _make_httpd(self) -> _TrackingHTTPServer:
        return _ProxyHTTPServer((self.host, self.port), self._handler, self)

    def _connect_upstream(self, server: _ProxyHTTPServer) -> http.client.HTTPConnection:
        cls = _TrackedHTTPSConnection if self._upstream_scheme == "https" else _TrackedConnection
        return cls(server, self._upstream_hostname, self._upstream_port, self.upstream_timeout)

    def start(self) -> FaultProxy:
        """Bind, listen and serve on a daemon thread; returns ``self``."""
        self._stop_event.clear()
        super().start()
        return self

    def _before_stop(self) -> None:
        # Wakes every stall at once, so stop() never waits out a stall's seconds.
        self._stop_event.set()

    def __enter__(self) -> FaultProxy:
        return self.start()

    @property
    def stats(self) -> ProxyStats:
        """Requests (in all and per URL path), faults applied and skipped per kind, body
        bytes forwarded."""
        c = self._counters
        with c.lock:
            return ProxyStats(
                requests=c.requests,
                requests_by_path=Counter(c.by_path),
                faults=Counter(c.faults),
                bytes_forwarded=c.bytes_forwarded,
                fault_log=tuple(c.fault_log),
                errors=c.errors,
                faults_skipped=Counter(c.skipped),
            )

    def wait_for_fault(
        self,
        kind: FaultKind | None = None,
        *,
        count: int = 1,
        timeout: float = _WAIT_FOR_FAULT_TIMEOUT,
    ) -> bool:
        """Wait until ``count`` faults of ``kind`` (of any kind if ``None``) have taken
        effect since the proxy was made or :meth:`reset_stats` (counters outlive a
        stop()); whether they did within ``timeout`` seconds.

        A fault counts just before the client can see it: once this is true for a
        ``"stall"``, the client has been sent ``after_bytes`` bytes and the proxy has gone
        silent. Example::

            assert proxy.wait_for_fault("stall", timeout=5)   # the chunk is in its stall
            dataset.close()
        """
        if kind is not None and kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        c = self._counters

        def reached() -> bool:
            applied = c.faults[kind] if kind is not None else sum(c.faults.values())
            return applied >= count

        with c.applied:
            return c.applied.wait_for(reached, timeout)

    def reset_stats(self) -> None:
        """Zero the counters (the schedule keeps its place)."""
        self._counters.clear()
