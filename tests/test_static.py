"""The static blob host of tests and benchmarks: HTTP/1.1 semantics, safety, lifecycle."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from pixcrawler.testing import StaticServer, StaticStats
from pixcrawler.testing.static import _StaticHandler

pytestmark = pytest.mark.timeout(20)

CHUNK = "job_1/chunks/00000.zip"


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, bytes]:
    """A store with one 300 KB random chunk, and a secret file just outside it."""
    root = tmp_path / "store"
    (root / "job_1" / "chunks").mkdir(parents=True)
    data = os.urandom(300_000)
    (root / CHUNK).write_bytes(data)
    (tmp_path / "secret.txt").write_bytes(b"not for you")
    return root, data


@pytest.fixture
def server(store: tuple[Path, bytes]) -> Iterator[StaticServer]:
    with StaticServer(store[0]) as srv:
        yield srv


@pytest.fixture
def pool() -> Iterator[urllib3.PoolManager]:
    with urllib3.PoolManager(retries=False, timeout=5.0) as manager:
        yield manager


def raw_get(srv: StaticServer, raw_path: str) -> int:
    """GET a path exactly as written: urllib3 would normalise '..' away."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request("GET", raw_path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_serves_file_with_length_etag_and_accept_ranges(
    server: StaticServer, store: tuple[Path, bytes], pool: urllib3.PoolManager
) -> None:
    data = store[1]
    response = pool.request("GET", server.url(CHUNK))
    assert response.status == 200
    assert response.data == data
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Content-Type"] == "application/zip"
    etag = response.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 2
    # The same file keeps its ETag; a rewritten one (new size) gets another.
    assert pool.request("GET", server.url(CHUNK)).headers["ETag"] == etag
    (store[0] / CHUNK).write_bytes(data + b"x")
    assert pool.request("GET", server.url(CHUNK)).headers["ETag"] != etag


def test_head_sends_headers_without_body(
    server: StaticServer, store: tuple[Path, bytes], pool: urllib3.PoolManager
) -> None:
    response = pool.request("HEAD", server.url(CHUNK))
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(store[1]))
    assert response.data == b""
    assert server.stats.bytes_sent == 0


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=1000-1999", 1000, 2000),
        ("bytes=299000-", 299_000, 300_000),
        ("bytes=-500", 299_500, 300_000),
        ("bytes=299990-400000", 299_990, 300_000),  # a last byte past the end is clipped
        ("bytes=0-0", 0, 1),
    ],
)
def test_range_returns_206_with_content_range(
    server: StaticServer,
    store: tuple[Path, bytes],
    pool: urllib3.PoolManager,
    range_header: str,
    start: int,
    end: int,
) -> None:
    data = store[1]
    response = pool.request("GET", server.url(CHUNK), headers={"Range": range_header})
    assert response.status == 206
    assert response.data == data[start:end]
    assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert response.headers["Content-Length"] == str(end - start)


@pytest.mark.parametrize("range_header", ["bytes=300000-", "bytes=400000-400010", "bytes=-0"])
def test_unsatisfiable_range_returns_416(
    server: StaticServer, store: tuple[Path, bytes], pool: urllib3.PoolManager, range_header: str
) -> None:
    response = pool.request("GET", server.url(CHUNK), headers={"Range": range_header})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{len(store[1])}"
    assert response.json()["error"]["status_code"] == 416


@pytest.mark.parametrize(
    "range_header",
    [
        "bytes=0-10,20-30",
        "lines=1-2",
        "bytes=50-10",
        "bytes=0-" + "9" * 5000,
        "bytes=" + "1" * 40 + "-",
    ],
)
def test_unsupported_range_is_ignored_with_whole_file(
    server: StaticServer, store: tuple[Path, bytes], pool: urllib3.PoolManager, range_header: str
) -> None:
    response = pool.request("GET", server.url(CHUNK), headers={"Range": range_header})
    assert response.status == 200
    assert response.data == store[1]


def test_if_range_resumes_only_the_same_version(
    server: StaticServer, store: tuple[Path, bytes], pool: urllib3.PoolManager
) -> None:
    data = store[1]
    etag = pool.request("HEAD", server.url(CHUNK)).headers["ETag"]
    same = pool.request("GET", server.url(CHUNK), headers={"Range": "bytes=100-", "If-Range": etag})
    assert same.status == 206
    assert same.data == data[100:]
    other = pool.request(
        "GET", server.url(CHUNK), headers={"Range": "bytes=100-", "If-Range": '"stale"'}
    )
    assert other.status == 200
    assert other.data == data


# Longer than any file system's timestamp tick (coarse kernel clocks: 4-10 ms), so the
# rewrite below gets a ctime of its own.
CLOCK_TICK = 0.05


@pytest.mark.parametrize("how", ["replaced", "rewritten in place"])
def test_if_range_refuses_a_same_size_version_with_the_same_mtime(
    server: StaticServer, store: tuple[Path, bytes], how: str
) -> None:
    """A new version of the same size and mtime: published by rename (a new inode), or
    copied over the old one keeping its mtime (cp -p, shutil.copy2: a new ctime). A resume
    against the old version's ETag must get the whole new file, not its tail spliced on."""
    path = store[0] / CHUNK
    old = path.stat()
    new_data = os.urandom(old.st_size)
    staged = store[0] / "staged.zip"
    staged.write_bytes(new_data)
    os.utime(staged, ns=(old.st_atime_ns, old.st_mtime_ns))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("HEAD", f"/{CHUNK}")
        response = conn.getresponse()
        response.read()
        etag = response.getheader("ETag")
        time.sleep(CLOCK_TICK)
        if how == "replaced":
            os.replace(staged, path)
        else:
            shutil.copy2(staged, path)
        assert path.stat().st_mtime_ns == old.st_mtime_ns  # the same size and mtime
        conn.request("GET", f"/{CHUNK}", headers={"Range": "bytes=100-", "If-Range": etag or ""})
        resumed = conn.getresponse()
        body = resumed.read()
    finally:
        conn.close()
    assert resumed.getheader("ETag") != etag
    assert resumed.status == 200 and body == new_data


def test_if_none_match_returns_304(server: StaticServer, pool: urllib3.PoolManager) -> None:
    etag = pool.request("HEAD", server.url(CHUNK)).headers["ETag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = pool.request("GET", server.url(CHUNK), headers={"If-None-Match": header})
        assert response.status == 304, header
        assert response.data == b""
    other = pool.request("GET", server.url(CHUNK), headers={"If-None-Match": '"other"'})
    assert other.status == 200


@pytest.mark.parametrize(
    "raw_path",
    [
        "/../secret.txt",
        "/job_1/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/job_1/%2E%2E/%2E%2E/secret.txt",
        "/..%2fsecret.txt",
        "/job_1",  # a directory: no listings
        "/job_1/chunks/",
        "/missing.zip",
        "/job_1/%00.zip",
        "/" + "a" * 300,  # a name too long for the file system: still an answer
    ],
)
def test_refuses_paths_outside_root_and_non_files(server: StaticServer, raw_path: str) -> None:
    assert raw_get(server, raw_path) == 404


def test_refuses_symlink_out_of_root(server: StaticServer, store: tuple[Path, bytes]) -> None:
    link = store[0] / "escape.txt"
    try:
        link.symlink_to(store[0].parent / "secret.txt")
    except OSError:  # pragma: no cover - platforms without symlinks
        pytest.skip("symlinks unavailable")
    assert raw_get(server, "/escape.txt") == 404


def exchange(srv: StaticServer, request: bytes) -> bytes:
    """Send raw bytes; return all the server answers before it closes the connection."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize(
    ("request_bytes", "status", "error_type"),
    [
        (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", 501, "NotImplementedError"),
        (
            b"GET /x HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n",
            431,
            "RequestHeaderFieldsTooLargeError",
        ),
        (b"GET /x HTTP/2.0\r\n\r\n", 505, "HTTPVersionNotSupportedError"),
        (b"NONSENSE\r\n\r\n", 400, "BadRequestError"),  # answered HTTP/0.9 style: body only
    ],
    ids=["POST", "too many headers", "HTTP/2", "not HTTP"],
)
def test_errors_the_stdlib_answers_are_json_too(
    server: StaticServer, request_bytes: bytes, status: int, error_type: str
) -> None:
    """An unsupported method or a malformed request gets the JSON error body as every
    other error does, not the stdlib's HTML page, and the connection is closed."""
    head, _, body = exchange(server, request_bytes).rpartition(b"\r\n\r\n")
    if head:
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {status} ")
        assert "Content-Type: application/json" in lines
        assert "Connection: close" in lines
    error = json.loads(body)["error"]
    assert (error["type"], error["status_code"]) == (error_type, status)
    assert error["message"]


def test_keeps_one_connection_alive_across_requests(
    server: StaticServer, store: tuple[Path, bytes]
) -> None:
    data = store[1]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        sockets = []
        for headers, expected in (
            ({"Range": "bytes=0-99"}, data[:100]),
            ({"Range": "bytes=100-199"}, data[100:200]),
            ({}, data),
        ):
            conn.request("GET", f"/{CHUNK}", headers=headers)
            response = conn.getresponse()
            assert response.read() == expected
            assert not response.will_close
            sockets.append(conn.sock)
        assert sockets[0] is sockets[1] is sockets[2]
    finally:
        conn.close()


def test_counts_requests_per_path_and_bytes_sent(
    server: StaticServer, store: tuple[Path, bytes], pool: urllib3.PoolManager
) -> None:
    pool.request("GET", server.url(CHUNK))
    pool.request("GET", server.url(CHUNK), headers={"Range": "bytes=0-999"})
    pool.request("GET", server.url("missing.zip"))
    stats = server.stats
    assert stats.requests == 3
    assert stats.requests_by_path == {f"/{CHUNK}": 2, "/missing.zip": 1}
    assert stats.bytes_sent == len(store[1]) + 1000
    assert stats.errors == 0
    server.reset_stats()
    assert server.stats.requests == 0
    assert server.stats.bytes_sent == 0


def test_reset_stats_zeroes_the_error_count(
    server: StaticServer, pool: urllib3.PoolManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: _StaticHandler, fh: Any, *, send_body: bool) -> None:
        raise RuntimeError("a bug in the handler")

    with monkeypatch.context() as patch:
        patch.setattr(_StaticHandler, "_send_file", broken)
        with pytest.raises(urllib3.exceptions.ProtocolError):
            pool.request("GET", server.url(CHUNK))
    assert server.stats.errors == 1
    server.reset_stats()
    assert server.stats == StaticStats()  # every counter, errors too
    assert pool.request("GET", server.url(CHUNK)).status == 200
    assert server.stats.errors == 0


def test_client_hanging_up_mid_body_is_quiet(
    server: StaticServer,
    store: tuple[Path, bytes],
    pool: urllib3.PoolManager,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # A client that reads a few bytes and resets: the server must not log nor count an error.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"GET /{CHUNK} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(100)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        sock.recv(1000)
    assert pool.request("GET", server.url(CHUNK)).data == store[1]
    assert server.stats.errors == 0
    assert capfd.readouterr().err == ""


def test_stop_is_quick_with_idle_keepalive_connection_and_closes_socket(
    store: tuple[Path, bytes],
) -> None:
    srv = StaticServer(store[0]).start()
    port = srv.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", f"/{CHUNK}")
    conn.getresponse().read()  # the connection now idles, its server thread reading
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 1.9  # not the 2 s join of a thread left reading
    assert not srv.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert srv.stats.requests == 1  # the counters outlive stop()
    conn.close()


BIG = 50 << 20  # sparse: far more than the socket buffers hold, at no cost on disk
RECEIVED = 1 << 20  # what the client reads before it stops reading


def test_stats_after_stop_count_the_bytes_of_a_response_cut_by_stop(tmp_path: Path) -> None:
    with open(tmp_path / "big.bin", "wb") as fh:
        fh.truncate(BIG)
    srv = StaticServer(tmp_path).start()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        while received < RECEIVED:
            received += len(sock.recv(65536))
        # The server is now blocked in sendfile; its bytes are counted when that ends.
        srv.stop()
    stats = srv.stats
    assert received <= stats.bytes_sent < BIG
    assert (stats.requests, stats.errors) == (1, 0)


STUCK = 3  # handlers that outlive stop()'s wait
JOIN = 0.3  # seconds close_connections() waits, for them all together


def test_close_connections_waits_once_for_all_threads_not_once_each(tmp_path: Path) -> None:
    release = threading.Event()

    class Stuck(_StaticHandler):
        """A handler that a socket shutdown does not wake (as a buggy one might not be)."""

        def do_GET(self) -> None:
            release.wait(10)

    class StuckServer(StaticServer):
        _handler = Stuck

    srv = StuckServer(tmp_path).start()
    clients = []
    try:
        for _ in range(STUCK):
            client = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            client.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(client)
        httpd = srv._httpd
        assert httpd is not None
        deadline = time.monotonic() + 5
        while len(httpd._connections) < STUCK and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        httpd.close_connections(timeout=JOIN)
        assert time.monotonic() - started < 2 * JOIN  # not JOIN for each in turn
    finally:
        release.set()
        srv.stop()
        for client in clients:
            client.close()


def test_base_url_needs_a_running_server(store: tuple[Path, bytes]) -> None:
    srv = StaticServer(store[0])
    with pytest.raises(RuntimeError):
        _ = srv.base_url
    with srv:
        assert srv.base_url == f"http://127.0.0.1:{srv.port}"
        assert srv.port != 0
    with pytest.raises(NotADirectoryError):
        StaticServer(store[0] / CHUNK)
