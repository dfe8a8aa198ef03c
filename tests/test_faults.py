"""The fault-injecting proxy: every fault kind on a real loopback connection, the schedules
(scripted and seeded-random), pass-through of headers and ranges, counters and shutdown."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from pixcrawler.testing import Fault, FaultProxy, FaultSchedule, StaticServer
from pixcrawler.testing.static import _QuietHandler

pytestmark = pytest.mark.timeout(20)

CHUNK = "/chunks/00000.zip"
SMALL = "/small.txt"
SIZE = 400_000
BLOCK = 4096  # client read size; cut points are multiples of it, so no read straddles one


@pytest.fixture
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def upstream(tmp_path: Path, data: bytes) -> Iterator[StaticServer]:
    """A blob host with one 400 KB random chunk and a small file."""
    (tmp_path / "chunks").mkdir()
    (tmp_path / "chunks" / "00000.zip").write_bytes(data)
    (tmp_path / "small.txt").write_bytes(b"hello")
    with StaticServer(tmp_path) as srv:
        yield srv


@pytest.fixture
def pool() -> Iterator[urllib3.PoolManager]:
    with urllib3.PoolManager(retries=False, timeout=5.0) as manager:
        yield manager


def get(
    pool: urllib3.PoolManager, url: str, **kwargs: Any
) -> tuple[urllib3.BaseHTTPResponse, bytes, Exception | None]:
    """GET ``url`` reading the body in blocks: the response, the bytes got, and the error
    that ended the read early, if any."""
    response = pool.request("GET", url, preload_content=False, **kwargs)
    got = bytearray()
    try:
        while block := response.read(BLOCK):
            got += block
    except (ProtocolError, ReadTimeoutError) as exc:
        return response, bytes(got), exc
    finally:
        response.release_conn()
    return response, bytes(got), None


def proxy_with(
    upstream: StaticServer, *faults: Fault | None, match: str | None = None
) -> FaultProxy:
    return FaultProxy(upstream.base_url, schedule=FaultSchedule.script(faults, match=match))


# Each fault kind.


def test_reset_aborts_with_rst_after_partial_bytes(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    with proxy_with(upstream, Fault("reset", after_bytes=16 * BLOCK)) as proxy:
        response, got, error = get(pool, proxy.base_url + CHUNK)
    assert response.status == 200
    assert response.headers["Content-Length"] == str(SIZE)
    assert got == data[: 16 * BLOCK]
    assert isinstance(error, ProtocolError)
    assert isinstance(error.args[1], ConnectionResetError)  # an RST, not a clean FIN


def test_reset_after_zero_bytes_sends_only_headers(
    upstream: StaticServer, pool: urllib3.PoolManager
) -> None:
    with proxy_with(upstream, Fault("reset")) as proxy:
        response, got, error = get(pool, proxy.base_url + CHUNK)
    assert response.status == 200
    assert got == b""
    assert isinstance(error, ProtocolError)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_status_fault_replies_json_error_without_upstream(
    upstream: StaticServer, pool: urllib3.PoolManager, status: int
) -> None:
    with proxy_with(upstream, Fault("status", status=status, retry_after=2)) as proxy:
        response = pool.request("GET", proxy.base_url + CHUNK)
    assert response.status == status
    assert response.headers["Retry-After"] == "2"
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "ServerError"
    assert error["status_code"] == status
    assert error["message"]
    assert upstream.stats.requests == 0  # answered by the proxy alone


def test_status_fault_defaults_to_503_without_retry_after(
    upstream: StaticServer, pool: urllib3.PoolManager
) -> None:
    with proxy_with(upstream, Fault("status")) as proxy:
        response = pool.request("GET", proxy.base_url + CHUNK)
    assert response.status == 503
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize(("retry_after", "header"), [(None, "1"), (7, "7"), (0.25, "0.25")])
def test_rate_limit_replies_429_with_retry_after(
    upstream: StaticServer, pool: urllib3.PoolManager, retry_after: float | None, header: str
) -> None:
    with proxy_with(upstream, Fault("rate_limit", retry_after=retry_after)) as proxy:
        response = pool.request("GET", proxy.base_url + CHUNK)
    assert response.status == 429
    assert response.headers["Retry-After"] == header
    assert response.json()["error"]["status_code"] == 429
    assert response.json()["error"]["type"] == "RateLimitError"


def test_stall_is_seen_as_a_read_timeout(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    with proxy_with(upstream, Fault("stall", after_bytes=2 * BLOCK, seconds=10)) as proxy:
        started = time.monotonic()
        response, got, error = get(
            pool, proxy.base_url + CHUNK, timeout=urllib3.Timeout(connect=2, read=0.5)
        )
        elapsed = time.monotonic() - started
    assert response.status == 200
    assert got == data[: 2 * BLOCK]
    assert isinstance(error, ReadTimeoutError)
    assert 0.4 < elapsed < 3.0


def test_stall_then_continue_delivers_the_whole_body_late(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    with proxy_with(upstream, Fault("stall", after_bytes=BLOCK, seconds=0.3)) as proxy:
        started = time.monotonic()
        _, got, error = get(pool, proxy.base_url + CHUNK)
        elapsed = time.monotonic() - started
    assert error is None
    assert got == data
    assert elapsed >= 0.3


def test_stall_then_close_ends_the_body_early(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    fault = Fault("stall", after_bytes=BLOCK, seconds=0.2, then="close")
    with proxy_with(upstream, fault) as proxy:
        _, got, error = get(pool, proxy.base_url + CHUNK)
    assert got == data[:BLOCK]
    assert isinstance(error, ProtocolError)


class _SilentUpstream:
    """An upstream that takes connections and never finishes a response: nothing at all,
    or headers and a few bytes of a longer body (``headers``)."""

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10

    def __init__(self, *, headers: bool) -> None:
        self.headers = headers
        self.held: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
                if self.headers:
                    conn.recv(65536)  # the proxy's request, sent whole at once
                    conn.sendall(self.HEAD)
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept(), which close() would not
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)
        for conn in self.held:
            conn.close()


HANDLERS = 4  # proxy handlers blocked on the silent upstream at once


@pytest.mark.parametrize("headers", [False, True], ids=["no-headers", "mid-body"])
def test_stop_wakes_handlers_blocked_on_a_silent_upstream(headers: bool) -> None:
    silent = _SilentUpstream(headers=headers)
    before = set(threading.enumerate())
    clients: list[socket.socket] = []
    try:
        proxy = FaultProxy(silent.base_url, upstream_timeout=30).start()
        for _ in range(HANDLERS):
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            client.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(client)
        deadline = time.monotonic() + 5
        while len(silent.held) < HANDLERS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(silent.held) == HANDLERS
        if headers:  # the proxy relays what it got, then blocks reading the rest
            for client in clients:
                assert client.recv(65536).startswith(b"HTTP/1.1 200")
        handlers = [t for t in threading.enumerate() if t not in before and "-conn" in t.name]
        assert len(handlers) == HANDLERS
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 1.9  # not 2 s per handler, one after another
        assert [t for t in handlers if t.is_alive()] == []  # not left until upstream_timeout
    finally:
        for client in clients:
            client.close()
        silent.close()


@pytest.mark.timeout(20)
def test_stop_wakes_a_handler_blocked_connecting_to_its_upstream() -> None:
    # An upstream that listens and never accepts: with its accept queue full (listen(0)
    # holds one connection) the kernel drops every further SYN, so a connect() blocks.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    address = listener.getsockname()
    fillers: list[socket.socket] = []
    clients: list[socket.socket] = []
    before = set(threading.enumerate())
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(address)
            fillers.append(filler)
        with socket.socket() as probe:  # the trick works here: a connect does block
            probe.settimeout(0.3)
            with pytest.raises(TimeoutError):
                probe.connect(address)
        proxy = FaultProxy(f"http://127.0.0.1:{address[1]}", upstream_timeout=30).start()
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        clients.append(client)
        client.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 5
        while proxy.stats.requests < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.stats.requests == 1
        time.sleep(0.2)  # the handler is now in connect(), which nothing answers
        handlers = [t for t in threading.enumerate() if t not in before and "-conn" in t.name]
        assert len(handlers) == 1
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 1.9  # not the 2 s join, nor upstream_timeout
        assert [t for t in handlers if t.is_alive()] == []
    finally:
        for sock in clients + fillers:
            sock.close()
        listener.close()


def test_stop_returns_quickly_during_a_stall(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    proxy = proxy_with(upstream, Fault("stall", after_bytes=BLOCK, seconds=60)).start()
    response = pool.request("GET", proxy.base_url + CHUNK, preload_content=False)
    assert response.read(BLOCK) == data[:BLOCK]  # the proxy is now asleep in the stall
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 1.5
    assert not proxy.running
    with pytest.raises(ProtocolError):  # the connection closed with the body unfinished
        response.read()


def test_truncate_sends_fewer_bytes_than_content_length_then_fin(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    with proxy_with(upstream, Fault("truncate", after_bytes=10 * BLOCK)) as proxy:
        response, got, error = get(pool, proxy.base_url + CHUNK)
    assert response.headers["Content-Length"] == str(SIZE)
    assert got == data[: 10 * BLOCK]
    # A clean close short of Content-Length: IncompleteRead, not a connection reset.
    assert isinstance(error, ProtocolError)
    assert "IncompleteRead" in str(error)
    assert not isinstance(error.args[1], ConnectionResetError)


@pytest.mark.parametrize("offset", [0, 12_345, SIZE - 1])
def test_corrupt_flips_exactly_one_byte_at_offset(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes, offset: int
) -> None:
    clean = pool.request("GET", upstream.base_url + CHUNK)
    with proxy_with(upstream, Fault("corrupt", offset=offset)) as proxy:
        response, got, error = get(pool, proxy.base_url + CHUNK)
    assert error is None
    assert len(got) == len(data)
    assert [i for i in range(len(data)) if got[i] != data[i]] == [offset]
    assert got[offset] == data[offset] ^ 0xFF
    assert hashlib.sha256(got).digest() != hashlib.sha256(data).digest()
    for header in ("Content-Length", "ETag", "Content-Type", "Accept-Ranges"):
        assert response.headers[header] == clean.headers[header]


def test_corrupt_past_the_end_changes_nothing(
    upstream: StaticServer, pool: urllib3.PoolManager
) -> None:
    with proxy_with(upstream, Fault("corrupt", offset=100)) as proxy:
        _, got, _ = get(pool, proxy.base_url + SMALL)
    assert got == b"hello"
    # Nothing was changed, so nothing counts as injected.
    assert proxy.stats.faults == {}
    assert proxy.stats.faults_skipped == {"corrupt": 1}


# A fault that cannot take effect within its response is not applied: fired after the body,
# it would land on the next, clean request of the keep-alive connection.

STALL_PAST_END = 1.0  # seconds: long enough that a misplaced stall shows in the timing


@pytest.mark.parametrize(
    "fault",
    [
        Fault("stall", after_bytes=len(b"hello"), seconds=STALL_PAST_END),
        Fault("stall", after_bytes=BLOCK, seconds=STALL_PAST_END),
        Fault("stall", after_bytes=BLOCK, seconds=STALL_PAST_END, then="close"),
        Fault("reset", after_bytes=len(b"hello")),
        Fault("truncate", after_bytes=BLOCK),
    ],
    ids=["stall-at-end", "stall-past-end", "stall-close", "reset-at-end", "truncate-past-end"],
)
def test_a_cut_at_or_past_the_end_of_the_body_is_not_applied(
    upstream: StaticServer, pool: urllib3.PoolManager, fault: Fault
) -> None:
    with proxy_with(upstream, fault) as proxy:
        connection = pool.connection_from_url(proxy.base_url)
        started = time.monotonic()
        first = connection.request("GET", SMALL)
        second = connection.request("GET", SMALL)  # the next request: clean and prompt
        elapsed = time.monotonic() - started
        stats = proxy.stats
    assert (first.status, first.data, second.status, second.data) == (200, b"hello") * 2
    assert connection.num_connections == 1  # neither closed nor reset under the client
    assert elapsed < STALL_PAST_END / 2
    assert stats.faults == {} and stats.fault_log == ()
    assert stats.faults_skipped == {fault.kind: 1}
    assert not proxy.wait_for_fault(timeout=0.05)


@pytest.mark.parametrize("request_kind", ["HEAD", "304"])
def test_a_cut_on_a_response_without_a_body_is_not_applied(
    upstream: StaticServer, pool: urllib3.PoolManager, request_kind: str
) -> None:
    with proxy_with(upstream, Fault("reset")) as proxy:
        connection = pool.connection_from_url(proxy.base_url)
        if request_kind == "HEAD":
            first = connection.request("HEAD", CHUNK)
            assert first.status == 200
        else:
            etag = pool.request("HEAD", upstream.base_url + CHUNK).headers["ETag"]
            first = connection.request("GET", CHUNK, headers={"If-None-Match": etag})
            assert first.status == 304
        assert connection.request("GET", SMALL).data == b"hello"
    assert connection.num_connections == 1
    assert proxy.stats.faults == {}
    assert proxy.stats.faults_skipped == {"reset": 1}


def test_a_cut_in_a_chunked_body_applies_only_before_its_end(
    echo: str, pool: urllib3.PoolManager
) -> None:
    """A body of unknown length: whether it goes on past the cut is learnt by reading."""
    with FaultProxy(echo) as measure:
        size = len(pool.request("GET", measure.base_url + "/chunked").data)
    # The echo sends 10 bytes, then the rest: cut between them, and at the very end.
    faults = [
        Fault("stall", after_bytes=size, seconds=STALL_PAST_END),
        Fault("stall", after_bytes=10, seconds=0.2),
    ]
    with FaultProxy(echo, schedule=FaultSchedule.script(faults)) as proxy:
        connection = pool.connection_from_url(proxy.base_url)
        started = time.monotonic()
        at_end = connection.request("GET", "/chunked")
        at_end_seconds = time.monotonic() - started
        started = time.monotonic()
        inside = connection.request("GET", "/chunked")
        inside_seconds = time.monotonic() - started
        stats = proxy.stats
    assert at_end.json()["path"] == inside.json()["path"] == "/chunked"
    assert at_end_seconds < STALL_PAST_END / 2
    assert inside_seconds >= 0.2
    assert stats.faults == {"stall": 1} and stats.faults_skipped == {"stall": 1}
    assert connection.num_connections == 1


def test_ignore_range_on_a_request_without_range_is_not_applied(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    with proxy_with(upstream, Fault("ignore_range"), Fault("ignore_range")) as proxy:
        assert pool.request("GET", proxy.base_url + CHUNK).data == data
        ranged = pool.request("GET", proxy.base_url + CHUNK, headers={"Range": "bytes=10-"})
        stats = proxy.stats
    assert ranged.status == 200 and ranged.data == data
    assert stats.faults == {"ignore_range": 1}
    assert stats.faults_skipped == {"ignore_range": 1}


def test_ignore_range_on_a_request_with_only_if_range_is_not_applied(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    # If-Range without Range asks for no range (RFC 9110 ignores it): nothing to ignore.
    with proxy_with(upstream, Fault("ignore_range")) as proxy:
        response = pool.request("GET", proxy.base_url + CHUNK, headers={"If-Range": '"x"'})
        # A skip is counted once the answer is out: the next request on the connection
        # is read after that (the first test of this kind read the count too early).
        assert pool.request("GET", proxy.base_url + CHUNK).data == data
        stats = proxy.stats
    assert response.status == 200 and response.data == data
    assert stats.faults == {}
    assert stats.faults_skipped == {"ignore_range": 1}


# Knowing when a fault has taken effect.


def test_bytes_before_a_stall_are_counted_while_it_lasts(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    with proxy_with(upstream, Fault("stall", after_bytes=16 * BLOCK, seconds=10)) as proxy:
        response = pool.request("GET", proxy.base_url + CHUNK, preload_content=False)
        # Counted before the client can see the silence: no polling, no sleep.
        assert proxy.wait_for_fault("stall", timeout=5)
        assert proxy.stats.bytes_forwarded == 16 * BLOCK
        assert response.read(16 * BLOCK) == data[: 16 * BLOCK]
        assert proxy.stats.fault_log == ((CHUNK, "stall"),)


def test_wait_for_fault_counts_faults_of_a_kind_or_of_any(
    upstream: StaticServer, pool: urllib3.PoolManager
) -> None:
    with proxy_with(upstream, Fault("status"), Fault("rate_limit", retry_after=0)) as proxy:
        assert not proxy.wait_for_fault(timeout=0.05)
        pool.request("GET", proxy.base_url + CHUNK)
        assert proxy.wait_for_fault("status", timeout=0)  # counted before it was answered
        assert not proxy.wait_for_fault("rate_limit", timeout=0.05)
        pool.request("GET", proxy.base_url + CHUNK)
        assert proxy.wait_for_fault(count=2, timeout=0)
        proxy.reset_stats()
        assert not proxy.wait_for_fault(timeout=0)
        with pytest.raises(ValueError):
            proxy.wait_for_fault("explode", timeout=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [403, 410])
def test_expired_replies_like_an_expired_presigned_url(
    upstream: StaticServer, pool: urllib3.PoolManager, status: int
) -> None:
    fault = Fault("expired") if status == 403 else Fault("expired", status=410)
    with proxy_with(upstream, fault) as proxy:
        response = pool.request("GET", proxy.base_url + CHUNK)
    assert response.status == status
    assert response.json()["error"]["status_code"] == status
    assert upstream.stats.requests == 0


def test_invalid_faults_are_refused() -> None:
    with pytest.raises(ValueError):
        Fault("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Fault("status", status=404)
    with pytest.raises(ValueError):
        Fault("reset", status=500)
    with pytest.raises(ValueError):
        Fault("truncate", after_bytes=-1)
    with pytest.raises(ValueError):
        Fault("stall", then="later")  # type: ignore[arg-type]
    assert Fault("status") == Fault("status", status=503)
    assert Fault("rate_limit").retry_after == 1.0


# Pass-through.


def test_range_passes_through_as_206(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    with FaultProxy(upstream.base_url) as proxy:
        response = pool.request("GET", proxy.base_url + CHUNK, headers={"Range": "bytes=1000-2999"})
        unsatisfiable = pool.request(
            "GET", proxy.base_url + CHUNK, headers={"Range": f"bytes={SIZE}-"}
        )
    assert response.status == 206
    assert response.data == data[1000:3000]
    assert response.headers["Content-Range"] == f"bytes 1000-2999/{SIZE}"
    assert unsatisfiable.status == 416


def test_ignore_range_answers_a_ranged_request_with_the_whole_body(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    with proxy_with(upstream, Fault("ignore_range")) as proxy:
        ignored = pool.request("GET", proxy.base_url + CHUNK, headers={"Range": "bytes=1000-"})
        honoured = pool.request("GET", proxy.base_url + CHUNK, headers={"Range": "bytes=1000-"})
        assert proxy.stats.faults["ignore_range"] == 1
    assert ignored.status == 200 and ignored.data == data
    assert "Content-Range" not in ignored.headers
    assert honoured.status == 206 and honoured.data == data[1000:]


def test_clean_requests_keep_one_client_connection(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    # A reply fault keeps the connection alive too: only cut faults end it.
    with proxy_with(upstream, None, Fault("status"), None) as proxy:
        http_pool = pool.connection_from_url(proxy.base_url)
        statuses = [http_pool.request("GET", CHUNK).status for _ in range(3)]
        assert http_pool.request("GET", CHUNK).data == data
    assert statuses == [200, 503, 200]
    assert http_pool.num_connections == 1


class _EchoHandler(_QuietHandler):
    """Answers with what it received, to see what the proxy forwards."""

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        echo = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": self.rfile.read(length).decode(),
        }
        body = json.dumps(echo).encode()
        self.send_response(200)
        if self.path.startswith("/chunked"):
            # No Content-Length: the proxy must frame the body itself.
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (body[:10], body[10:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


@pytest.fixture
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_forwards_method_path_query_auth_headers_and_body(
    echo: str, pool: urllib3.PoolManager
) -> None:
    headers = {
        "Authorization": "Bearer secret",
        "X-API-Key": "secret2",
        "Range": "bytes=0-9",
        "Connection": "keep-alive",
    }
    with FaultProxy(echo + "/api") as proxy:
        response = pool.request(
            "POST", proxy.base_url + "/v1/jobs?page=2&size=5", headers=headers, body=b"payload"
        )
    seen = response.json()
    assert seen["method"] == "POST"
    assert seen["path"] == "/api/v1/jobs?page=2&size=5"  # the upstream's base path is kept
    assert seen["headers"]["authorization"] == "Bearer secret"
    assert seen["headers"]["x-api-key"] == "secret2"
    assert seen["headers"]["range"] == "bytes=0-9"
    assert seen["headers"]["host"] == echo.removeprefix("http://")
    assert "connection" not in seen["headers"]  # hop-by-hop headers stay on their hop
    assert seen["body"] == "payload"


def test_relays_a_chunked_upstream_body(echo: str, pool: urllib3.PoolManager) -> None:
    with FaultProxy(echo) as proxy:
        response = pool.request("GET", proxy.base_url + "/chunked")
    assert response.status == 200
    assert response.json()["path"] == "/chunked"


def test_unreachable_upstream_gives_502(pool: urllib3.PoolManager) -> None:
    with StaticServer(Path.cwd()) as gone:
        url = gone.base_url
    with FaultProxy(url) as proxy:
        response = pool.request("GET", proxy.base_url + CHUNK)
    assert response.status == 502
    assert response.json()["error"]["status_code"] == 502


# Schedules.


def test_script_applies_in_order_to_matching_paths_only(
    upstream: StaticServer, pool: urllib3.PoolManager
) -> None:
    schedule = FaultSchedule.script(
        [Fault("status", status=500), None, Fault("rate_limit")], match=r"^/chunks/"
    )
    with FaultProxy(upstream.base_url, schedule=schedule) as proxy:
        statuses = []
        for path in (CHUNK, SMALL, CHUNK, SMALL, CHUNK, CHUNK, CHUNK):
            statuses.append(pool.request("GET", proxy.base_url + path).status)
    # SMALL never matches, so it never consumes a scripted fault.
    assert statuses == [500, 200, 200, 200, 429, 200, 200]
    assert schedule.exhausted
    assert schedule.matched == 5


def test_random_schedule_is_reproducible_and_near_its_rate() -> None:
    def decisions(seed: int) -> list[str | None]:
        schedule = FaultSchedule.random(rate=0.2, kinds=["reset", "status", "truncate"], seed=seed)
        return [f.kind if (f := schedule.decide(CHUNK)) else None for _ in range(2000)]

    first = decisions(seed=3)
    assert first == decisions(seed=3)
    assert first != decisions(seed=4)
    counts = Counter(first)
    assert 0.16 < 1 - counts[None] / len(first) < 0.24
    for kind in ("reset", "status", "truncate"):  # uniform over kinds
        assert 100 < counts[kind] < 170


def test_random_schedule_through_the_proxy_repeats_for_a_seed(
    upstream: StaticServer, pool: urllib3.PoolManager
) -> None:
    kinds: list[Any] = [Fault("status", status=500), Fault("rate_limit", retry_after=0), "expired"]

    def run(seed: int) -> tuple[list[int], tuple[tuple[str, str], ...]]:
        schedule = FaultSchedule.random(0.5, kinds, seed=seed, match="chunks")
        with FaultProxy(upstream.base_url, schedule=schedule) as proxy:
            statuses = [pool.request("GET", proxy.base_url + SMALL).status for _ in range(3)]
            statuses += [pool.request("HEAD", proxy.base_url + CHUNK).status for _ in range(40)]
            return statuses, proxy.stats.fault_log

    statuses, log = run(seed=11)
    assert (statuses, log) == run(seed=11)
    assert statuses[:3] == [200, 200, 200]
    assert set(statuses[3:]) == {200, 500, 429, 403}
    assert 10 < len(log) < 30
    assert all(path == CHUNK for path, _ in log)


def test_random_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        FaultSchedule.random(rate=1.5)
    with pytest.raises(ValueError):
        FaultSchedule.random(rate=0.1, kinds=[])


# Counters.


def test_counters_count_requests_faults_and_bytes(
    upstream: StaticServer, pool: urllib3.PoolManager, data: bytes
) -> None:
    faults = [Fault("status"), Fault("truncate", after_bytes=BLOCK), Fault("corrupt")]
    with proxy_with(upstream, *faults, match="chunks") as proxy:
        for _ in range(4):
            get(pool, proxy.base_url + CHUNK)
        get(pool, proxy.base_url + SMALL)
    # Read after stop(): a handler adds its bytes just after the client has them all.
    stats = proxy.stats  # the counters outlive stop()
    assert stats.requests == 5
    assert stats.requests_by_path == {CHUNK: 4, SMALL: 1}
    assert stats.faults == {"status": 1, "truncate": 1, "corrupt": 1}
    assert stats.faults_injected == 3
    # truncate forwarded one block; corrupt and the clean request the whole chunk.
    assert stats.bytes_forwarded == BLOCK + 2 * len(data) + len(b"hello")
    assert stats.fault_log == ((CHUNK, "status"), (CHUNK, "truncate"), (CHUNK, "corrupt"))
    assert stats.errors == 0
    proxy.reset_stats()
    assert proxy.stats.requests == 0
    assert proxy.stats.faults_injected == 0


def test_no_output_on_stderr(
    upstream: StaticServer, pool: urllib3.PoolManager, capfd: pytest.CaptureFixture[str]
) -> None:
    faults = [Fault(kind) for kind in ("reset", "truncate", "status", "corrupt")]
    with proxy_with(upstream, *faults) as proxy:
        for _ in range(5):
            get(pool, proxy.base_url + CHUNK)
    assert capfd.readouterr().err == ""
