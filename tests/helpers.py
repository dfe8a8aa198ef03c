"""Small helpers shared by the SDK tests: a header-recording host, the digest of a run, and
a copy of job_uniform with corrupt images."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import urllib3

from constants import JOB_UNIFORM, UNIFORM_CHUNK_SIZE
from pixcrawler.testing.static import _QuietHandler


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


_Host = TypeVar("_Host", bound="_LoopbackHost")


class _LoopbackHost:
    """A threaded HTTP server on a loopback address and an ephemeral port, serving while
    its ``with`` block runs."""

    def _listen(self, handler: type[_QuietHandler], host: str) -> None:
        self._server = ThreadingHTTPServer((host, 0), handler)
        self._server.daemon_threads = True
        self.base_url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self: _Host) -> _Host:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class RecordingHost(_LoopbackHost):
    """A blob host on any loopback address: serves files under ``root`` and records the
    headers of every request, so a test can prove what was (not) sent to it."""

    def __init__(self, root: Path, host: str = "127.0.0.2") -> None:
        self.root = root
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.redirect_to: str | None = None
        lock = threading.Lock()
        outer = self

        class Handler(_QuietHandler):
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

        self._listen(Handler, host)


class CannedHost(_LoopbackHost):
    """A loopback host giving every GET one canned answer: ``status``, ``body`` and
    ``headers`` (odd answers no real server of ours would give)."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                with contextlib.suppress(OSError):  # a client that read enough and left
                    self.wfile.write(body)

        self._listen(Handler, "127.0.0.1")


class RedirectingFront(_LoopbackHost):
    """The API at ``upstream``, fronted: chunk paths (``/chunks/<index>``) are answered with
    a 302 to ``target(index)`` (a presigned blob URL, say); every other GET is relayed."""

    def __init__(self, upstream: str, target: Callable[[int], str]) -> None:
        pool = urllib3.PoolManager(retries=False)

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                chunk = re.search(r"/chunks/(\d+)$", self.path.split("?")[0])
                if chunk is not None:
                    self.send_response(302)
                    self.send_header("Location", target(int(chunk[1])))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = pool.request(
                    "GET", upstream + self.path, headers=dict(self.headers), redirect=False
                )
                self.send_response(answer.status)
                for name in ("Content-Type", "Retry-After"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(answer.data)))
                self.end_headers()
                self.wfile.write(answer.data)

        self._listen(Handler, "127.0.0.1")


class ForwardProxy(_LoopbackHost):
    """An HTTP forward proxy on 127.0.0.1, as a corporate network puts in the way: a GET
    for an absolute URL is relayed (the whole answer, then the connection closes), a
    CONNECT becomes a tunnel to its host. ``requests`` records each request line as the
    proxy got it, ``auth`` each one's Proxy-Authorization; ``refuse`` answers every
    request with ``refusal`` (407 by default: a status and its reason) instead, ``stall``
    with nothing until the proxy stops. ``hosts``
    maps names only the proxy knows to addresses (the SDK sends loopback hosts past any
    proxy: a test names its server otherwise)."""

    def __init__(self, hosts: dict[str, str] | None = None) -> None:
        known = dict(hosts or {})
        self.requests: list[str] = []
        self.auth: list[str | None] = []
        self.refuse = False
        self.refusal = (407, "Proxy Authentication Required")
        self.refused_paths = ""  # a regex: refuse only the requests it finds (all: "")
        self.stall = False
        self._stopping = threading.Event()
        outer = self

        class Handler(_QuietHandler):
            def _seen(self) -> bool:
                outer.requests.append(f"{self.command} {self.path}")
                outer.auth.append(self.headers.get("Proxy-Authorization"))
                if outer.stall:
                    outer._stopping.wait(60)
                    self.close_connection = True
                    return False
                refuse = outer.refuse and re.search(outer.refused_paths, self.path) is not None
                if refuse:
                    self.send_response(*outer.refusal)
                    self.send_header("Proxy-Authenticate", 'Basic realm="test"')
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                return not refuse

            def do_GET(self) -> None:
                if not self._seen():
                    return
                target = urlsplit(self.path)
                sent = {
                    name: value
                    for name, value in self.headers.items()
                    if name.lower() not in ("proxy-authorization", "proxy-connection", "connection")
                }
                name = target.hostname or ""
                upstream = http.client.HTTPConnection(
                    known.get(name, name), target.port, timeout=30
                )
                try:
                    upstream.request(
                        "GET",
                        urlsplit(self.path)._replace(scheme="", netloc="").geturl() or "/",
                        headers=sent,
                    )
                    answer = upstream.getresponse()
                    body = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("connection", "content-length", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def do_CONNECT(self) -> None:
                if not self._seen():
                    return
                host, _, port = self.path.rpartition(":")
                upstream = socket.create_connection((known.get(host, host), int(port)), 30)
                self.send_response(200, "Connection established")
                self.end_headers()
                self.close_connection = True

                def pipe(source: socket.socket, sink: socket.socket) -> None:
                    with contextlib.suppress(OSError):
                        while data := source.recv(65536):
                            sink.sendall(data)
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)

                back = threading.Thread(target=pipe, args=(upstream, self.connection), daemon=True)
                back.start()
                pipe(self.connection, upstream)
                back.join(30)
                upstream.close()

        self._listen(Handler, "127.0.0.1")
        self.url = self.base_url

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        super().__exit__(*exc)


def corrupt_copy(
    store: Path, dest: Path, positions: tuple[int, ...], *, image_sha256: bool = True
) -> Path:
    """Copy job_uniform into ``dest`` with the images at ``positions`` replaced by garbage
    (manifest and job checksums updated, so only the decoder can notice; with
    ``image_sha256=False`` the manifest keeps the images' old sha256, which they fail)."""
    shutil.copytree(store / JOB_UNIFORM, dest / JOB_UNIFORM)
    job_path = dest / JOB_UNIFORM / "job.json"
    job = json.loads(job_path.read_text())
    for chunk in job["chunks"]:
        index = chunk["index"]
        bad = {p % UNIFORM_CHUNK_SIZE for p in positions if p // UNIFORM_CHUNK_SIZE == index}
        if not bad:
            continue
        path = dest / JOB_UNIFORM / "chunks" / f"{index:05d}.zip"
        with zipfile.ZipFile(path) as source:
            manifest = json.loads(source.read("manifest.json"))
            members = {name: source.read(name) for name in source.namelist()}
        for offset in bad:
            entry = manifest["images"][offset]
            members[entry["path"]] = b"this is not an image"
            if image_sha256:
                entry["sha256"] = hashlib.sha256(b"this is not an image").hexdigest()
        del members["manifest.json"]
        rewrite_chunk(path, chunk, manifest, members.items())
    job_path.write_text(json.dumps(job))
    return dest


def rewrite_chunk(
    path: Path,
    chunk: dict[str, Any],
    manifest: dict[str, Any],
    members: Iterable[tuple[str, bytes]],
) -> None:
    """Write the chunk archive ``path`` anew, ``manifest`` first, then ``members``; its
    job.json entry ``chunk`` lists the new bytes' sha256 and size."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        target.writestr("manifest.json", json.dumps(manifest))
        for name, data in members:
            target.writestr(name, data)
    path.write_bytes(buffer.getvalue())
    chunk["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    chunk["size_bytes"] = len(buffer.getvalue())


def edited_copy(
    store: Path, dest: Path, job_id: str, edit: Callable[[dict[str, Any]], None]
) -> Path:
    """``dest`` holding a copy of ``job_id`` whose job.json ``edit`` has changed."""
    shutil.copytree(store / job_id, dest / job_id)
    job_path = dest / job_id / "job.json"
    job = json.loads(job_path.read_text())
    edit(job)
    job_path.write_text(json.dumps(job))
    return dest


def drop_counts(job: dict[str, Any]) -> None:
    """A job as a producer would list it without ``total_images`` and without any chunk's
    ``image_count`` (both optional to a reader)."""
    del job["total_images"]
    for chunk in job["chunks"]:
        del chunk["image_count"]


def copy_without_counts(store: Path, dest: Path) -> Path:
    """``dest`` holding job_uniform without its counts (:func:`drop_counts`)."""
    return edited_copy(store, dest, JOB_UNIFORM, drop_counts)


def sdk_threads_left(before: set[threading.Thread], timeout: float = 5.0) -> list[str]:
    """Names of the SDK's threads started since ``before`` still running after up to
    ``timeout`` seconds (idle pool threads end a moment after their pool is shut or freed)."""
    deadline = time.monotonic() + timeout
    while True:
        new = set(threading.enumerate()) - before
        names = [t.name for t in new if t.name.startswith("pixcrawler-")]
        if not names or time.monotonic() >= deadline:
            return names
        time.sleep(0.02)


def hold_lock(path: Path) -> int:
    """Another process's hold on the cache lock of the chunk file ``path`` (flock is per
    open file: another descriptor of this process conflicts as another process's would);
    released when the descriptor is closed."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def raised_once_closed(
    call: Callable[[], object], close: Callable[[], object], *, settle: float = 0.3
) -> list[BaseException]:
    """Run ``call`` on a thread; once it has been blocked ``settle`` seconds, ``close()``,
    which must end it within 5 s. Returns what ``call`` raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=run)
    waiter.start()
    time.sleep(settle)
    assert waiter.is_alive(), "the call did not block"
    close()
    waiter.join(5)
    assert not waiter.is_alive(), "close() did not end the call"
    return errors


def reachable_buffers(root: object) -> list[int]:
    """The sizes of the buffers (bytearrays, arrays, memoryviews) that can be reached from
    ``root`` (an error a caller keeps, say), modules and the main module's globals aside."""
    import gc
    import sys
    import types

    main = getattr(sys.modules.get("__main__"), "__dict__", None)
    seen: set[int] = set()
    pending, found = [root], []
    with warnings.catch_warnings():
        # (Some objects reached warn when their type is asked: torch's deprecated reduce_op.)
        warnings.simplefilter("ignore", FutureWarning)
        while pending:
            obj = pending.pop()
            skipped = (str, bytes, int, float, type, types.ModuleType)
            if id(obj) in seen or isinstance(obj, skipped):
                continue
            seen.add(id(obj))
            if isinstance(obj, (bytearray, memoryview, np.ndarray)):
                found.append(len(obj) if isinstance(obj, bytearray) else obj.nbytes)
                if not isinstance(obj, np.ndarray) or obj.base is None:
                    continue
            if obj is not sys.modules and obj is not main:
                pending.extend(gc.get_referents(obj))
    return found


def arrays_in_frames(exc: BaseException) -> list[str]:
    """The locals of the SDK's frames in ``exc``'s traceback that hold an array, directly
    or in a list or tuple (a shuffle buffer of ``(image, sample)``), as ``function:name``:
    what a caller keeping the error keeps with it."""
    import pixcrawler

    package = os.path.dirname(os.path.abspath(pixcrawler.__file__)) + os.sep

    def holds(value: object, depth: int = 2) -> bool:
        if isinstance(value, np.ndarray):
            return True
        if depth and isinstance(value, (list, tuple)):
            return any(holds(item, depth - 1) for item in value)
        return False

    held = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename.startswith(package):
            held += [
                f"{code.co_name}:{name}"
                for name, value in tb.tb_frame.f_locals.items()
                if holds(value)
            ]
        tb = tb.tb_next
    return held
