"""Chunk bytes: a window of downloads in flight, retries, Range resume and sha256 checks.

No business logic: this module knows chunks as indexes, URLs, sizes and digests. It knows
nothing of labels or images.

Guarantees:
- a chunk handed out is complete and, where the API gave a sha256, verified;
- an interrupted transfer resumes with ``Range`` from the bytes already held;
- a checksum mismatch discards the bytes and downloads once more from byte 0, then gives up
  with :class:`DownloadError`;
- the API key goes only to the API's origin (the client sees to that), and an expired
  presigned URL (403/410 from another host) makes the job's URLs be read again, once;
- ``iter_chunks`` holds at most ``prefetch`` chunks ahead of its consumer (``prefetch + 1``
  buffers in all for a consumer that recycles), and closing it (an early ``break``)
  cancels what is in flight and unblocks its sockets at once.

Workers the window leaves idle fetch a large chunk as parallel byte ranges, but only a
chunk someone waits for: ``fetch`` itself, an iteration's first chunk (fetched alone, with
every worker), and every chunk while its consumer has found its last chunk not ready (the
network is not keeping up). A chunk fetched ahead of need goes as one stream, hashed as it
arrives: on a network that keeps up, ranges only add connections, threads and a second
pass over the bytes to hash them.

Nothing waits in silence: every retry is logged (WARNING, logger ``pixcrawler``) with its
cause and delay, and a consumer kept waiting ``config.SLOW_WAIT_SECONDS`` for one chunk
logs what holds it up: the bytes received so far, the failed attempts and the last cause,
and when the next attempt starts.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import logging
import os
import re
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.exceptions import HTTPError as Urllib3Error

from . import cleanup, config
from .client import (
    ApiClient,
    certificate_refused,
    error_body,
    proxy_refusal,
    refused_certificate,
    shutdown_connection,
)
from .exceptions import DownloadError, JobNotCompleteError, NetworkError, PixCrawlerError
from .models import Chunk
from .redaction import shown
from .retry import Attempts, parse_retry_after, status_cause, wait_in_words
from .units import counted, human_size

log = logging.getLogger("pixcrawler")
T = TypeVar("T")

Refresh = Callable[[], Sequence[Chunk]]


@dataclass
class TransferStats:
    """Counters of what crossed the network; safe to read while a download runs."""

    bytes_received: int = 0
    chunks_completed: int = 0
    requests: int = 0
    retries: int = 0
    resumed: int = 0
    checksum_failures: int = 0
    url_refreshes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class _Sink(Protocol):
    def write(self, pos: int, data: bytes) -> None: ...
    def restart(self) -> None: ...


class BufferPool:
    """Chunk buffers handed back by a consumer, reused for later chunks.

    Fresh memory is expensive on a VM (a new 20 MB buffer faults in at well under 1 GB/s),
    and a process that frees and allocates 20 MB buffers by turns fragments glibc's heap
    until its RSS grows with every chunk. So every buffer is allocated once at the job's
    largest chunk size and resized in place to each chunk (CPython keeps a bytearray's
    allocation when it shrinks by less than half and when it grows within it). At most
    ``keep`` free buffers wait here; a buffer still viewed by anyone cannot be resized and
    is simply dropped.
    """

    def __init__(self, capacity: int, keep: int = 2) -> None:
        self.capacity = capacity
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        if size > self.capacity:
            return unfilled_bytearray(size)
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is not None and _allocated(buffer) >= size:
            try:
                if len(buffer) > size:
                    del buffer[size:]
                elif len(buffer) < size:
                    buffer.extend(bytes(size - len(buffer)))
                elif buffer:  # no resize to refuse a viewed buffer: make one that keeps it
                    last = buffer[-1]
                    del buffer[-1:]
                    buffer.append(last)
                return buffer
            except BufferError:
                pass
        if size < self.capacity // 2:  # a shrink by over half would give the rest back
            return unfilled_bytearray(size)
        buffer = unfilled_bytearray(self.capacity)
        del buffer[size:]  # keeps the allocation (size >= capacity / 2)
        return buffer

    def give(self, buffer: bytearray) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffer)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


_BYTEARRAY_OVERHEAD = sys.getsizeof(bytearray())
_CANCEL_POLL = 0.05  # seconds between looks at a cancel while the job's URLs are re-read
_MAX_DIGITS = 20
_CONTENT_RANGE = re.compile(
    r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)", re.ASCII | re.IGNORECASE
)
# A 206 that ends before the byte asked for (a host that caps each ranged answer, as some
# CDNs do) is kept, and the rest asked for at once: progress, not a failure, while it
# brings 64 KiB or 1/1024 of the stream, whichever is less. So a stream takes at most
# max(1024, its bytes / 64 KiB) such answers; a shorter one says that ranges are of no use
# on that host (see _ShortRange).
_SHORT_RANGE_FLOOR = 64 << 10
_SHORT_RANGES = 1024
# An attempt cut off (a reset, a stall, an early close) that took the transfer 1 MiB or an
# eighth of its stream (whichever is less) past the furthest byte any failed attempt had
# reached moved it on: the retries count again from none, so a link that drops now and then
# cannot fail a large chunk that is getting there. A stream takes at most 8 or (its bytes /
# 1 MiB) such fresh starts, so none goes on for ever, even where it keeps starting over;
# and none once the attempts cut off have brought over twice the bytes they reached, so a
# host that answers a resume from byte 0 cannot have a chunk fetched again and again.
_PROGRESS_FLOOR = 1 << 20
_PROGRESS_PARTS = 8
_DOWNLOAD_THREAD = f"{config.THREAD_PREFIX}download"


@functools.cache
def _bytearray_from_c() -> Callable[[None, int], bytearray] | None:
    """CPython's ``PyByteArray_FromStringAndSize``, which leaves a new bytearray's bytes
    as malloc gave them; None where it cannot be had (not CPython)."""
    try:
        import ctypes

        make = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except (ImportError, AttributeError):  # pragma: no cover - other interpreters
        return None
    make.restype = ctypes.py_object
    make.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    return make


def unfilled_bytearray(size: int) -> bytearray:
    """A bytearray of ``size`` bytes, not zero-filled: for a buffer every byte of which is
    written before use (a chunk's bytes, all checked). ``bytearray(size)`` zero-fills under
    the GIL: ~8 ms per 18 MiB (40 ms when the pages are new), every decode thread and the
    consumer waiting, before the first byte arrives; here the pages fill as bytes land."""
    make = _bytearray_from_c()
    return make(None, size) if make is not None else bytearray(size)


def _allocated(buffer: bytearray) -> int:
    """Bytes a bytearray can hold without reallocating (getsizeof reports its allocation)."""
    return sys.getsizeof(buffer) - _BYTEARRAY_OVERHEAD


class _MemorySink:
    """Bytes into one buffer, preallocated when the size is known (no doubling on growth)."""

    def __init__(self, chunk: Chunk, pool: BufferPool | None = None) -> None:
        self.chunk_id = chunk.index
        size = chunk.size_bytes
        if size is None:
            self.buffer = bytearray()
        else:
            if size > config.MAX_CHUNK_BYTES:
                raise DownloadError(
                    f"Chunk {chunk.index} is listed at {size:,} bytes, more than the "
                    f"{config.MAX_CHUNK_BYTES:,} a chunk may hold "
                    "(pixcrawler.config.MAX_CHUNK_BYTES)",
                    chunk_id=chunk.index,
                )
            try:
                self.buffer = pool.take(size) if pool is not None else unfilled_bytearray(size)
            except MemoryError:
                raise DownloadError(
                    f"Chunk {chunk.index} is listed at {size:,} bytes, more memory than "
                    "there is to hold it",
                    chunk_id=chunk.index,
                ) from None
        self.view = memoryview(self.buffer) if size is not None else None

    def detach(self) -> bytearray:
        """The buffer, with this sink's view of it released (so it can be recycled)."""
        if self.view is not None:
            self.view.release()
            self.view = None
        return self.buffer

    def drop(self) -> bytearray:
        """The buffer, detached: this sink holds it no longer."""
        buffer = self.detach()
        self.buffer = bytearray()
        return buffer

    def write(self, pos: int, data: bytes) -> None:
        if self.view is not None:
            if pos + len(data) > len(self.buffer):
                raise _IntegrityError("the server sent more bytes than the chunk's listed size")
            self.view[pos : pos + len(data)] = data
        elif pos + len(data) > config.MAX_CHUNK_BYTES:
            raise _too_large(self.chunk_id)
        else:
            self.buffer[pos:] = data

    def restart(self) -> None:
        if self.view is None:
            del self.buffer[:]


def _too_large(chunk_id: int) -> DownloadError:
    return DownloadError(
        f"Chunk {chunk_id} is larger than the {config.MAX_CHUNK_BYTES:,} bytes a chunk may "
        "hold (pixcrawler.config.MAX_CHUNK_BYTES); the job lists no size for it",
        chunk_id=chunk_id,
    )


class _FileSink:
    """Bytes appended to a ``.part`` file, so a later run can resume from its length."""

    def __init__(self, fh: Any, chunk: Chunk) -> None:
        self.fh = fh
        self.chunk_id = chunk.index
        self.sized = chunk.size_bytes is not None

    def write(self, pos: int, data: bytes) -> None:
        # (A listed size is enforced as the bytes come, whatever it is; an endless body of
        # a chunk that lists none filled the disk.)
        if not self.sized and pos + len(data) > config.MAX_CHUNK_BYTES:
            raise _too_large(self.chunk_id)
        self.fh.seek(pos)
        self.fh.write(data)

    def restart(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()


class _Changed(Exception):
    """A resume was answered from another version of the file (a new strong ETag): the
    chunk starts again from byte 0."""


class _IntegrityError(Exception):
    """The bytes are wrong (size or digest): start the chunk again from byte 0."""


class _Restart(Exception):
    """A resume answered from another version of the file, as told by what is sent as no
    If-Range (a weak ETag, Last-Modified): from byte 0 at once, as the 200 a stale If-Range
    gets would be, and not as a failure (a CDN's replicas may name one file differently)."""


class _RangeIgnored(Exception):
    """The server answered a ranged request with the whole body, or with too little of the
    range to be worth asking again (see _ShortRange)."""


class _ShortRange(Exception):
    """A 206 brought less of the range than a short answer must (see _SHORT_RANGES): on
    that host ranges are of no use. A single stream starts over from byte 0, asking for no
    range (as it does when a host answers a range with the whole body), but as a failure,
    after a backoff: a host that answers a byte at a time costs a few requests, not one a
    byte. (A part raises _RangeIgnored instead: the chunk comes as one stream.)"""


class _Cancelled(PixCrawlerError):
    def __init__(self) -> None:
        super().__init__("the download was cancelled")


@dataclass
class _Progress(Attempts):
    """Where one chunk's transfer stands, for the consumer waiting on it."""

    size: int | None
    started: float = field(default_factory=time.monotonic)
    received: dict[int, int] = field(default_factory=dict)  # a stream's first byte → bytes held

    def describe(self) -> str:
        now = time.monotonic()
        held = sum(self.received.values())
        of = f" of {human_size(self.size)}" if self.size is not None else ""
        text = f"{human_size(held)}{of} received in {now - self.started:.1f} s"
        if self.failures:
            text += f"; {self.last_failure()}"
        if (next_in := self.next_in(now)) is not None:
            text += f"; {next_in}"
        return text


class _Recycling(NamedTuple):
    """The hooks of an ``iter_chunks(recycles=True)`` iteration."""

    released: Callable[[], None]  # a chunk came back: fetch on
    upcoming: Callable[[], bool]  # whether the next chunk has arrived whole


@dataclass
class _Refreshing:
    """A re-read of the job's URLs: done when it has ended, ``error`` if it failed."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


# Every downloader alive, closed when the interpreter exits (see _close_all_at_exit).
_LIVE: weakref.WeakSet[ChunkDownloader] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _close_all_at_exit() -> None:
    """At interpreter exit, before its thread pools' threads are joined: cancel every
    transfer, so a transfer stalled on the network (an iterator the script kept, its
    downloads in flight) cannot keep the process alive through its timeouts and retries.

    Not while a thread of the program's own still runs: Python waits for it, and the
    transfers may be its work (a download on a thread the script started and returned
    from). Then the process ends as it would without this hook."""
    if any(_works_on(thread) for thread in threading.enumerate()):
        return
    with _LIVE_LOCK:
        downloaders = list(_LIVE)
    for downloader in downloaders:
        try:
            downloader.close()
        except Exception:  # one failure must not keep the rest (or exit's other hooks) waiting
            log.debug("closing a downloader at exit failed", exc_info=True)


def _works_on(thread: threading.Thread) -> bool:
    """Whether ``thread`` is one of the program's own that Python waits for at exit: not
    daemon, not the main thread (ending now), not a pool thread of the SDK's."""
    return (
        thread.is_alive()
        and not thread.daemon
        and thread is not threading.main_thread()
        and not thread.name.startswith(config.THREAD_PREFIX)
    )


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) leaves its parent's downloaders alone: closing
    its copies would shut down sockets the parent still reads, and a lock a parent thread
    held at the fork would never be released here."""
    global _LIVE, _LIVE_LOCK
    _LIVE, _LIVE_LOCK = weakref.WeakSet(), threading.Lock()


# threading's exit hooks run before non-daemon threads (concurrent.futures' among them)
# are joined, the last registered first; atexit's run after them: too late.
getattr(threading, "_register_atexit", atexit.register)(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class ChunkDownloader:
    """Downloads a job's chunks for one consumer; see the module docstring for guarantees."""

    def __init__(
        self,
        client: ApiClient,
        chunks: Sequence[Chunk],
        *,
        max_workers: int = config.DEFAULT_MAX_WORKERS,
        prefetch: int = config.DEFAULT_PREFETCH,
        refresh: Refresh | None = None,
        stats: TransferStats | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.client = client
        self.max_workers = max_workers
        self.prefetch = prefetch
        self.stats = stats or TransferStats()
        self._refresh = refresh
        # A chunk's strong ETag, as its server last gave it: sent as If-Range with every
        # resume, so bytes of a file replaced meanwhile are never stitched to the old ones.
        self._etags: dict[int, str] = {}
        # And what else tells its versions apart where no strong ETag does (a weak one, as
        # a host compressing on the fly gives; Last-Modified): compared, not sent, on every
        # ranged answer of a chunk no sha256 checks.
        self._versions: dict[int, str] = {}
        self._lock = threading.Lock()
        self._chunks = {c.index: c for c in chunks}
        # Per transfer: its response, or its connection while it waits for the headers.
        self._active: dict[threading.Event, set[urllib3.BaseHTTPResponse | HTTPConnection]] = {}
        # The fetches under way per event: an iteration's fetches share one, which must stay
        # within close()'s reach while any of them (one asleep in its backoff, say) runs.
        self._watchers: dict[threading.Event, int] = {}
        # A fetch's own event for the byte ranges it runs on other threads: cancelled with
        # the fetch's event, and on its own when the fetch ends early.
        self._children: dict[threading.Event, list[threading.Event]] = {}
        self._closed = threading.Event()
        self._part_pool: ThreadPoolExecutor | None = None
        sizes = (c.size_bytes or 0 for c in chunks)
        # (A size past MAX_CHUNK_BYTES fails its own chunk; it must not size every buffer.)
        self._buffers = BufferPool(
            max((n for n in sizes if n <= config.MAX_CHUNK_BYTES), default=0)
        )
        self._recycling: list[_Recycling] = []  # the recycling iteration's hooks
        self._pools: weakref.WeakSet[ThreadPoolExecutor] = weakref.WeakSet()  # iter_chunks'
        self._progress: dict[int, _Progress] = {}  # chunks being fetched
        # The re-read of the job's URLs under way, if any: every transfer whose URL expires
        # meanwhile waits for it instead of asking the API again.
        self._refreshing: _Refreshing | None = None
        with _LIVE_LOCK:
            _LIVE.add(self)

    # -- public ----------------------------------------------------------------------------

    @property
    def indexes(self) -> list[int]:
        return sorted(self._chunks)

    def chunk(self, index: int) -> Chunk:
        with self._lock:
            chunk = self._chunks.get(index)
        if chunk is None:
            raise PixCrawlerError(f"the job lists no chunk {index}")
        return chunk

    def fetch(
        self, index: int, cancel: threading.Event | None = None, *, ranges: int | None = None
    ) -> bytearray:
        """One chunk, complete and verified, in memory, in up to ``ranges`` parallel byte
        ranges (default: the workers a full window leaves to each chunk; 1: one stream,
        for a chunk wanted ahead of need)."""
        cancel = cancel or threading.Event()
        with self._transfer(index, cancel):
            for attempt in (1, 2):
                chunk = self.chunk(index)
                sink = _MemorySink(chunk, self._buffers)
                try:
                    self._etags.pop(index, None)  # no bytes held: any version will do
                    self._versions.pop(index, None)
                    digest = self._receive(chunk, sink, cancel, ranges=ranges)
                    self._verify(chunk, digest, attempt)
                except _IntegrityError as exc:
                    self._buffers.give(sink.drop())  # for the download that follows
                    self._integrity_failed(chunk, attempt, str(exc), cancel)
                    continue
                except BaseException:
                    # The error's traceback holds this frame and those below it for as long
                    # as a caller keeps the error: they must not hold the chunk's buffer.
                    sink.drop()
                    raise
                self.stats.add(chunks_completed=1)
                return sink.detach()
            raise AssertionError("unreachable")  # pragma: no cover

    def fetch_to_file(self, index: int, path: Path, cancel: threading.Event | None = None) -> Path:
        """One chunk into ``path``, resuming ``path.part`` from a previous run; atomic rename.

        The final name appears only once every byte is present and verified.
        """
        cancel = cancel or threading.Event()
        part = path.with_name(path.name + ".part")
        with self._transfer(index, cancel):
            for attempt in (1, 2):
                chunk = self.chunk(index)
                failure: str | None = None
                with open(part, "a+b") as fh:
                    held = fh.seek(0, os.SEEK_END)
                    if chunk.size_bytes is not None and held > chunk.size_bytes:
                        fh.truncate(0)
                        held = 0
                    hasher = _hash_file(fh, held)
                    whole = held > 0 and held == chunk.size_bytes
                    if whole and not self._matches(chunk, hasher.hexdigest()):
                        # Another version's whole file, left by an earlier run: not a failed
                        # download (it would use up one of the two), just not this chunk.
                        fh.truncate(0)
                        held, hasher = 0, hashlib.sha256()
                    if held:
                        self.stats.add(resumed=1)
                    try:
                        sink = _FileSink(fh, chunk)
                        digest = self._receive(chunk, sink, cancel, held, hasher)
                        self._verify(chunk, digest, attempt)
                    except _IntegrityError as exc:
                        fh.truncate(0)
                        failure = str(exc)
                    else:
                        fh.flush()
                        os.fsync(fh.fileno())
                if failure is not None:
                    if attempt >= 2:  # bad twice: nothing in it is worth resuming
                        part.unlink(missing_ok=True)
                    self._integrity_failed(chunk, attempt, failure, cancel)
                    continue
                os.replace(part, path)
                self.stats.add(chunks_completed=1)
                return path
            raise AssertionError("unreachable")  # pragma: no cover

    def iter_chunks(
        self, order: Iterable[int] | None = None, *, recycles: bool = False
    ) -> Generator[tuple[Chunk, bytearray], None, None]:
        """Chunks in ``order`` (default: by index), ``prefetch`` of them in flight ahead.

        ``recycles=True`` is the consumer's promise to call :meth:`recycle` once for every
        chunk it got, when it is done with it. Then the chunks it still holds count against
        the window: ``prefetch + 1`` chunk buffers at most, the one being consumed included,
        where a consumer that finishes one chunk while starting the next would otherwise
        hold ``prefetch + 2``.
        """
        todo = iter(self.indexes if order is None else list(order))
        cancel = threading.Event()
        # max_workers bounds the transfers at once, however many chunks the window holds.
        workers = min(self.prefetch, self.max_workers)
        pool = ThreadPoolExecutor(workers, thread_name_prefix=_DOWNLOAD_THREAD)
        with self._lock:
            self._pools.add(pool)
        window: deque[tuple[int, Future[bytearray]]] = deque()
        held = 0  # chunks handed out and not recycled yet (counted when recycles=True)
        starved = False  # the consumer found the last chunk it asked for not ready
        first: Future[bytearray] | None = None  # the iteration's first fetch
        lock = threading.Lock()

        def fill(least: int = 0, most: int | None = None) -> None:
            nonlocal first
            started = None
            with lock:
                if cancel.is_set() or self._closed.is_set():  # the pool may be shut down
                    return
                room = self.prefetch + 1 - held if recycles else self.prefetch
                want = max(least, min(room, self.prefetch))
                if most is not None:
                    want = min(want, len(window) + most)
                while len(window) < want:
                    if first is not None and not first.done():
                        # The first chunk has the network and the CPU to itself: nothing
                        # can be decoded before it, and a second would only slow it down.
                        break
                    index = next(todo, None)
                    if index is None:
                        break
                    # Ranges for a chunk the consumer waits for (see the module doc); the
                    # first, alone in flight, gets every worker.
                    if first is None:
                        ranges: int | None = self.max_workers
                    else:
                        ranges = None if starved or (least > 0 and not window) else 1
                    try:
                        future = pool.submit(self.fetch, index, cancel, ranges=ranges)
                    except RuntimeError:  # close() shut the pool down meanwhile
                        return
                    window.append((index, future))
                    if first is None:
                        first = started = future
            if started is not None:  # outside the lock: a done future calls back at once
                started.add_done_callback(first_done)

        def first_done(future: Future[bytearray]) -> None:
            # One more chunk then, not the whole window: the first image waits on the
            # opening of chunk 0, which every transfer started now slows down. None if
            # chunk 0 failed: its error ends the iteration, and must not race a new fetch.
            if not future.cancelled() and future.exception() is None:
                for refill in refills:
                    refill(most=1)

        # first_done() reaches fill() only through this list, emptied when the iteration
        # ends: fill() refers to first_done(), and a cycle of the two kept this downloader
        # (its free buffers, the dataset its refresh reads) until the cycle collector ran.
        refills = [fill]

        def released() -> None:
            nonlocal held
            with lock:
                held -= 1
            fill()

        def upcoming() -> bool:
            with lock:
                future = window[0][1] if window else None
            return (
                future is not None
                and future.done()
                and not future.cancelled()
                and future.exception() is None
            )

        hooks = _Recycling(released, upcoming)
        if recycles:
            self._recycling.append(hooks)

        def end() -> None:
            nonlocal first
            with lock:  # no fill() submits to the pool once this is set
                cancel.set()
            first = None  # its callback refers back to fill(): a cycle that held a chunk
            if recycles:
                self._recycling.remove(hooks)
            _cancel_each([future for _, future in window])
            self._abort(cancel)
            pool.shutdown(wait=True)
            window.clear()
            refills.clear()

        begun_in = cleanup.begun()
        try:
            while True:
                if self._closed.is_set():  # nothing more, nor an end that looks complete
                    raise _Cancelled()
                fill(least=1)  # the consumer waits for a chunk: fetch one even when it holds many
                if not window:
                    return
                index, future = window.popleft()
                # The first chunk is always waited for; later waits mean the network lags.
                starved = future is not first and not future.done()
                try:
                    data = self.wait_for(index, future)
                except CancelledError:  # close() shut the pool down before it started
                    raise _Cancelled() from None
                if recycles:
                    # The window refills when a chunk comes back or the next is asked for,
                    # not now: a fetch started now would compete with the opening and
                    # first decodes of this chunk (that is the first image's wait).
                    with lock:
                        held += 1
                else:
                    fill()
                yield self.chunk(index), data
                del data
        finally:
            # (In a function of its own: the frame an error's traceback keeps would hold
            # the last chunk fetched ahead through a loop variable here.)
            cleanup.end(end, begun_in)

    def recycle(self, buffer: bytearray | None) -> None:
        """The consumer is done with a chunk: hand back its buffer (None if it cannot be
        reused) for the next chunk, and let ``iter_chunks(recycles=True)`` fetch on."""
        if buffer is not None:
            self._buffers.give(buffer)
        with self._lock:
            hooks = self._recycling[0] if self._recycling else None
        if hooks is not None:
            hooks.released()

    def next_chunk_ready(self) -> bool:
        """Whether the next chunk of the ``iter_chunks(recycles=True)`` iteration has
        arrived whole, so that asking for it will not wait on the network (nor raise)."""
        with self._lock:
            hooks = self._recycling[0] if self._recycling else None
        return hooks is not None and hooks.upcoming()

    def describe(self, index: int) -> str:
        """Where chunk ``index``'s transfer stands, in words (for a consumer kept waiting)."""
        with self._lock:
            progress = self._progress.get(index)
        if progress is None:  # not begun, or its bytes are all in and being checked
            return "no transfer of it in progress"
        return progress.describe()

    def wait_for(self, index: int, future: Future[T]) -> T:
        """The result of ``future``, which needs chunk ``index``; every
        ``config.SLOW_WAIT_SECONDS`` of waiting logs where that chunk's transfer stands (a
        first batch that takes minutes says why)."""
        started = time.monotonic()
        while True:
            try:  # (result() also ends for a future cancelled in a pool shut down; wait() not)
                return future.result(timeout=config.SLOW_WAIT_SECONDS)
            except FutureTimeoutError:
                if future.done():  # the work itself raised a TimeoutError
                    raise
            if future.done():  # done since: nothing to wait for, nor to say
                continue
            log.warning(
                "waited %.1f s for chunk %d: %s",
                time.monotonic() - started,
                index,
                self.describe(index),
            )

    @contextlib.contextmanager
    def _transfer(self, index: int, cancel: threading.Event) -> Iterator[None]:
        """One fetch of chunk ``index``: ``close()`` can reach it through ``cancel``, and
        ``describe()`` reads how far it got."""
        self._watch(cancel)
        try:
            size = self.chunk(index).size_bytes
            with self._lock:
                self._progress[index] = _Progress(size)
            yield
        finally:
            self._unwatch(cancel)
            with self._lock:
                self._progress.pop(index, None)

    def close(self) -> None:
        """Cancel every transfer in flight; later fetches fail at once."""
        self._closed.set()
        with self._lock:
            events = list(self._active)
            pools = list(self._pools)
        for event in events:
            event.set()
            self._abort(event)
        for pool in pools:  # an iteration its caller still holds: its threads end now
            pool.shutdown(wait=False, cancel_futures=True)
        if self._part_pool is not None:
            self._part_pool.shutdown(wait=True, cancel_futures=True)
            self._part_pool = None
        self._buffers.clear()  # (a kept error's traceback may keep this downloader)

    # -- one chunk ---------------------------------------------------------------------------

    def _receive(
        self,
        chunk: Chunk,
        sink: _Sink,
        cancel: threading.Event,
        start: int = 0,
        hasher: Any = None,
        *,
        ranges: int | None = 1,
    ) -> str:
        """Every byte of ``chunk`` into ``sink``, in up to ``ranges`` parallel byte ranges
        (None: the workers a full window leaves idle); returns the sha256 hex digest."""
        parts = self._split(chunk.size_bytes, ranges) if start == 0 else []
        if len(parts) > 1 and isinstance(sink, _MemorySink):
            try:
                return self._receive_parts(chunk, sink, parts, cancel)
            except _RangeIgnored:
                log.debug("chunk %d: ranges not honoured, one stream instead", chunk.index)
        hasher = hasher if hasher is not None else hashlib.sha256()
        hasher = self._stream(chunk.index, sink, start, chunk.size_bytes, hasher, cancel)
        return str(hasher.hexdigest())

    def _split(self, size: int | None, ranges: int | None) -> list[tuple[int, int]]:
        """Up to ``ranges`` byte ranges (None: one per worker a full window leaves idle);
        none for one, or for a chunk too small to split."""
        spare = self.max_workers // self.prefetch if ranges is None else ranges
        if size is None or spare < 2 or size < 2 * config.MIN_RANGE_PART:
            return []
        n = min(spare, size // config.MIN_RANGE_PART)
        step = -(-size // n)
        return [(lo, min(size, lo + step)) for lo in range(0, size, step)]

    def _receive_parts(
        self,
        chunk: Chunk,
        sink: _MemorySink,
        parts: list[tuple[int, int]],
        cancel: threading.Event,
    ) -> str:
        parts_cancel = threading.Event()
        with self._lock:
            if self._closed.is_set():  # close() has shut the part pool down
                raise _Cancelled()
            if self._part_pool is None:
                self._part_pool = ThreadPoolExecutor(
                    self.max_workers, thread_name_prefix=f"{config.THREAD_PREFIX}range"
                )
            pool = self._part_pool
            self._children.setdefault(cancel, []).append(parts_cancel)
        if cancel.is_set():
            parts_cancel.set()
        futures: list[Future[Any]] = []
        failure: BaseException | None = None

        def stop_on_failure(future: Future[Any]) -> None:
            # One part that fails for good stops the others (the first one too) at once:
            # the chunk fails with its error, not after the rest have downloaded.
            if not future.cancelled() and future.exception() is not None:
                parts_cancel.set()
                self._abort(parts_cancel)

        try:
            try:
                for lo, hi in parts[1:]:
                    future = pool.submit(
                        self._stream, chunk.index, sink, lo, hi, None, parts_cancel, part=True
                    )
                    futures.append(future)
                    future.add_done_callback(stop_on_failure)
            except RuntimeError:  # close() shut the pool down since the check above
                raise _Cancelled() from None
            # The first part is hashed as it arrives, each later one once it is complete
            # (most of it arrived meanwhile): only the last part's hash waits on the wire.
            # It runs under the parts' event (cancelled with ``cancel``, as a child of it).
            hasher = self._stream(
                chunk.index, sink, *parts[0], hashlib.sha256(), parts_cancel, part=True
            )
            with memoryview(sink.buffer) as view:
                for (lo, hi), future in zip(parts[1:], futures, strict=True):
                    try:
                        future.result()
                    except CancelledError:  # close() emptied the part pool's queue
                        raise _Cancelled() from None
                    hasher.update(view[lo:hi])
        except BaseException as exc:
            # Whatever ended this fetch (a failed part, a server that ignored Range, a
            # cancel), the other parts stop, and are waited for: none may write into the
            # buffer once the caller retries, streams the chunk whole, or hands it back.
            parts_cancel.set()
            self._abort(parts_cancel)
            for future in futures:
                # Not wait(futures): a future close() cancelled in the pool's queue never
                # counts as done there, and the wait would last forever.
                if not future.cancel():
                    with contextlib.suppress(BaseException):
                        future.exception()  # a running part: until it has stopped
            if not isinstance(exc, _Cancelled) or cancel.is_set() or self._closed.is_set():
                raise
            failure = _first_failure(futures)  # what stopped this part
            if failure is None:
                raise
        finally:
            with self._lock:
                siblings = self._children.get(cancel, [])
                siblings.remove(parts_cancel)
                if not siblings:
                    self._children.pop(cancel, None)
            self._unwatch(parts_cancel)
        if failure is not None:
            raise failure
        return str(hasher.hexdigest())

    def _stream(
        self,
        index: int,
        sink: _Sink,
        start: int,
        end: int | None,
        hasher: Any,
        cancel: threading.Event,
        *,
        part: bool = False,
    ) -> Any:
        """Bytes ``[start, end)`` of chunk ``index`` (to EOF if ``end`` is None), with retries.
        A ``part`` (one of parallel ranges) is always asked for as a ``Range``.

        Returns the hasher fed with every byte in order (a fresh one if the server made us
        start over), or None when ``hasher`` was None.
        """
        pos = start
        listed_end = end  # a restart reads to this again, not to an older file's length
        failures = 0
        free_restart = -1  # the failures there were at the last restart counted as none
        furthest = pos  # the furthest byte a failed attempt reached (a restart goes back)
        fetched = 0  # the bytes attempts cut off brought, whether they were held already
        spent = 0  # failed attempts before the retries last counted afresh

        def attempts() -> str:  # every failed attempt, fresh starts or not
            return counted(spent + failures, "attempt")

        refreshed = False
        policy = self.client.retry
        with self._lock:
            progress = self._progress.get(index) or _Progress(end)
        key = start if part else 0  # a whole body counts the bytes resumed from, too
        while True:
            if cancel.is_set() or self._closed.is_set():
                raise _Cancelled()
            if end is not None and 0 < end <= pos:  # a resumed .part, complete already
                return hasher
            begun = pos  # where this attempt's bytes start
            chunk = self.chunk(index)
            headers = {}
            restart = False
            ranged = pos > 0 or part
            if ranged:
                last = "" if end is None else str(end - 1)
                headers["Range"] = f"bytes={pos}-{last}"
                if (etag := self._etags.get(index)) is not None:
                    headers["If-Range"] = etag
            retry_after: float | None = None
            until = end  # where this answer's bytes end (a 206's range may end elsewhere)
            response: urllib3.BaseHTTPResponse | None = None
            connections: list[HTTPConnection] = []  # tracked while the headers are due
            complete = False
            try:
                url = self.client.resolve(chunk.url)
                self.stats.add(requests=1)
                response, answered = self.client.request_answered(
                    url,
                    headers=headers,
                    stream=True,
                    on_connection=functools.partial(self._track_waiting, cancel, connections),
                )
                self._track(cancel, response)
                status = response.status
                etag = response.headers.get("ETag")
                strong = etag if etag and not etag.startswith("W/") else None
                previous = self._etags.get(index)  # the version of the bytes held, if known
                version = _version_of(response)
                if status == 206 and strong is None and version is not None:
                    known = self._versions.setdefault(index, version)
                    if known != version and chunk.sha256 is None:
                        # Spliced, it would pass every check: the size is the same, and
                        # no sha256 is listed (weak ETags are not sent as If-Range).
                        if part:
                            raise _RangeIgnored()
                        raise _Restart()
                elif status == 200:
                    if version is None:
                        self._versions.pop(index, None)
                    else:
                        self._versions[index] = version
                if status == 206 and strong is not None:
                    known = self._etags.setdefault(index, strong)  # (parts race to set it)
                    self._etags[index] = strong
                    if known != strong and chunk.sha256 is None:
                        # A range of another version of the file than the bytes held (or
                        # than another part's): asked without If-Range, or it was ignored.
                        # Where the job lists a sha256, it decides instead: a CDN's replicas
                        # may give one file different ETags.
                        if part:
                            raise _RangeIgnored()  # one stream, one version, instead
                        raise _Changed(f"the file changed on its host at byte {pos}")
                elif status == 200:
                    # A whole body: the bytes held from here on are its version, whatever
                    # was recorded before (a stale If-Range would fetch the old one's rest).
                    if strong is None:
                        self._etags.pop(index, None)
                    else:
                        self._etags[index] = strong
                if status == 200 and ranged:
                    if part:
                        raise _RangeIgnored()
                    pos = start = 0  # the server ignored Range: take the whole body afresh
                    if previous is not None and etag != previous:  # another version
                        end = listed_end  # (its own length, not the last one's)
                    sink.restart()
                    hasher = _reset(hasher)
                elif status == 206:
                    until, total = _check_content_range(response, pos, end, chunk.size_bytes, index)
                    if end is None and not part:
                        end = total  # an unsized chunk: the rest ends where its file does
                elif status == 416 and not part and pos > 0:
                    total = _unsatisfied_length(response)
                    if (end is not None and pos >= end) or (end is None and total == pos):
                        return hasher  # everything is here already
                    if end is None:  # more bytes held than the chunk has: they are not it
                        pos = start = 0
                        sink.restart()
                        hasher = _reset(hasher)
                        continue
                if status in (200, 206):
                    _check_length(response, pos, until)
                    # A range that runs past the bytes due (a host that sent the rest of the
                    # file) is read only up to them; its connection, the rest unread, is
                    # closed, not reused.
                    late = until is not None and end is not None and until > end
                    due = end if late or until is None else until
                    begun = pos
                    while block := _receive_block(response, sink, pos, due):
                        if cancel.is_set():
                            raise _Cancelled()
                        if hasher is not None:
                            hasher.update(block)
                        pos += len(block)
                        progress.received[key] = pos - key
                        self.stats.add(bytes_received=len(block))
                    if end is not None and pos >= end and not late and _more_to_come(response):
                        raise _IntegrityError(
                            "the server sent more bytes than the chunk's listed size"
                        )
                    if end is None or pos >= end:
                        complete = not late
                        return hasher
                    if due is None or pos < due:
                        raise urllib3.exceptions.ProtocolError(
                            f"connection closed at byte {pos} of {due}"
                        )
                    # A range that ended early, every byte of it in (a host that caps its
                    # ranged answers): kept, and the rest asked for at once, unless it
                    # brought too little to be worth asking again (see _SHORT_RANGES).
                    if _more_to_come(response):
                        raise _IntegrityError("the server sent more bytes than its range named")
                    complete = True
                    floor = min(_SHORT_RANGE_FLOOR, -(-(end - start) // _SHORT_RANGES))
                    if pos - begun >= floor:
                        continue
                    if part:
                        raise _RangeIgnored()  # one stream, asked for no range, instead
                    raise _ShortRange(
                        f"ranges of no use: {counted(pos - begun, 'byte')} of the "
                        f"{end - begun} asked from byte {begun}"
                    )
                # Whether the host that refused is a blob host: where the URL led, which
                # an API path redirecting to a presigned URL makes another host than its own.
                blob_host = not self.client.sends_key_to(answered)
                if (
                    status in config.URL_EXPIRED_STATUSES
                    and blob_host
                    and self._refresh is not None
                    and not refreshed
                ):
                    refreshed = True
                    self._refresh_urls(cancel, chunk)
                    continue
                if blob_host and (status in config.URL_EXPIRED_STATUSES or status == 401):
                    # (No key went there: the URL was refused, not the key.)
                    raise DownloadError(
                        f"Chunk {index} could not be downloaded: its host refused the URL "
                        f"(HTTP {status}: "
                        f"{self.client.error_message(response, error_body(response))})"
                        + (" even after the job's URLs were read again" if refreshed else ""),
                        chunk_id=index,
                        status_code=status,
                    )
                if status not in config.RETRY_STATUSES:
                    what = f"GET chunk {index}"
                    cause = self.client.refusal(response, what, error_body(response), answered)
                    raise DownloadError(
                        f"Chunk {index} could not be downloaded: {cause.message}",
                        chunk_id=index,
                        status_code=status,
                    ) from cause
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                failures += 1
                why = status_cause(status, retry_after)
                if policy.retry_after_too_long(retry_after) or failures > policy.retries:
                    # The host's own words, as the API client's error gives them.
                    said = self.client.error_message(response, error_body(response))
                    raise DownloadError(
                        f"Chunk {index} failed with HTTP {status} after "
                        f"{attempts()} ({said})"
                        + (f"; retry in {wait_in_words(retry_after)}" if retry_after else ""),
                        chunk_id=index,
                        status_code=status,
                        retry_after=retry_after,
                    )
            except _Restart:
                changed_at = pos
                pos = start = 0
                end = listed_end
                sink.restart()
                hasher = _reset(hasher)
                self._versions.pop(index, None)  # the whole body's will be the one
                if free_restart != failures:  # one for free after each failure, no more:
                    free_restart = failures  # a host answering every GET with a short 206
                    restart = True  # of another version would have kept it going for ever
                else:
                    failures += 1
                    if failures > policy.retries:
                        raise DownloadError(
                            f"Chunk {index} failed after {attempts()}: the "
                            f"file kept changing on its host (at byte {changed_at})",
                            chunk_id=index,
                        ) from None
                    why = f"the file changed on its host at byte {changed_at}"
            except (_Changed, _ShortRange) as exc:
                # From byte 0 again, after a backoff, as a failure.
                pos = start = 0
                end = listed_end
                sink.restart()
                hasher = _reset(hasher)
                failures += 1
                if failures > policy.retries:
                    raise DownloadError(
                        f"Chunk {index} failed after {attempts()}: {exc}",
                        chunk_id=index,
                    ) from None
                why = str(exc)
            except NetworkError as exc:  # a URL no request can take, or a redirect loop
                raise DownloadError(
                    f"Chunk {index} could not be downloaded: {exc.message}", chunk_id=index
                ) from exc
            except Urllib3Error as exc:
                # urllib3's urlopen keeps its error in a local of a frame its traceback
                # holds: a cycle that kept this frame, the downloader and its dataset until
                # the cycle collector ran. Its frames' locals go; its traceback still prints.
                traceback.clear_frames(exc.__traceback__)
                if cancel.is_set() or self._closed.is_set():
                    raise _Cancelled() from exc
                if certificate_refused(exc):
                    raise DownloadError(
                        f"Chunk {index} failed: {refused_certificate(exc, self.client.ca_bundle)}",
                        chunk_id=index,
                    ) from exc
                if (refusal := proxy_refusal(exc)) is not None:
                    raise DownloadError(f"Chunk {index} failed: {refusal}", chunk_id=index) from exc
                fetched += pos - begun
                fresh = ""
                if (
                    pos - max(begun, furthest) >= _progress_floor(start, end)
                    and fetched <= 2 * (pos - start)  # not at the cost of fetching it again
                ):
                    if failures:  # (a first failure has none counted to start afresh)
                        fresh = ", which moved the chunk on: its retries count afresh"
                    spent, failures = spent + failures, 0  # the retries count afresh
                furthest = max(furthest, pos)
                failures += 1
                if failures > policy.retries:
                    raise DownloadError(
                        f"Chunk {index} failed after {attempts()} "
                        f"({exc.__class__.__name__}) at byte {pos}",
                        chunk_id=index,
                    ) from exc
                if pos > start:
                    self.stats.add(resumed=1)
                why = f"{exc.__class__.__name__} at byte {pos}{fresh}"
            finally:
                for connection in connections:
                    self._untrack(cancel, connection)
                if response is not None:
                    self._untrack(cancel, response)
                    if not complete:
                        response.close()  # unread bytes must not go back to the pool
                    response.release_conn()
            if restart:
                continue
            self.stats.add(retries=1)
            delay = policy.delay(failures, retry_after)
            progress.failed(why, delay)
            policy.announce(f"chunk {index}", why, failures, delay)
            if cancel.wait(delay):
                raise _Cancelled()

    @staticmethod
    def _matches(chunk: Chunk, digest: str) -> bool:
        """Whether bytes of sha256 ``digest`` are ``chunk`` (True where no sha256 says)."""
        return chunk.sha256 is None or digest == chunk.sha256.lower()

    def _verify(self, chunk: Chunk, digest: str, attempt: int) -> None:
        if not self._matches(chunk, digest):
            listed = chunk.sha256 or ""
            raise _IntegrityError(f"sha256 {digest[:12]}… does not match {listed[:12]}…")

    def _integrity_failed(
        self, chunk: Chunk, attempt: int, why: str, cancel: threading.Event
    ) -> None:
        self.stats.add(checksum_failures=1)
        if attempt >= 2:
            self._unless_the_job_changed(chunk, cancel)
            raise DownloadError(
                f"Chunk {chunk.index} is corrupt: {why}, twice; the server's copy may be bad",
                chunk_id=chunk.index,
            )
        log.warning("chunk %d corrupt (%s); downloading it again", chunk.index, why)
        with self._lock:
            progress = self._progress.get(chunk.index)
        if progress is not None:  # the bytes held are thrown away
            progress.received.clear()
            progress.failed(f"corrupt ({why})", 0.0)

    def _unless_the_job_changed(self, chunk: Chunk, cancel: threading.Event) -> None:
        """Bad twice may mean a job packed again on the server since it was read, not a bad
        copy there: the job is read again, and a new version (or one being packed) is the
        error, which says to load it again. Where that cannot be told, nothing is raised."""
        try:
            self._refresh_urls(cancel, chunk)
        except (DownloadError, JobNotCompleteError) as exc:  # changed, or being re-packed
            raise DownloadError(
                f"Chunk {chunk.index} does not match the job as it was read: {exc.message}",
                chunk_id=chunk.index,
            ) from exc
        except PixCrawlerError:  # the API could not say: the chunk's own error, as it was
            pass

    def _refresh_urls(self, cancel: threading.Event, stale: Chunk) -> None:
        """Re-read the job's chunk URLs, ``stale`` (the chunk as last requested) having
        expired. Once per expiry, however many transfers meet it: a transfer whose chunk was
        refreshed since it read ``stale`` just retries, and one that meets a re-read under
        way waits for it. The API request runs on a thread of its own, so a close() or a
        cancel (an early break) returns at once instead of waiting out its timeout and
        retries; the abandoned request ends by itself."""
        refresh = self._refresh
        if refresh is None:
            return
        with self._lock:
            if self._chunks.get(stale.index) is not stale:
                return  # another transfer's re-read has replaced it
            flight = self._refreshing
            if flight is None:
                flight = self._refreshing = _Refreshing()
                threading.Thread(
                    target=self._reread,
                    args=(refresh, flight),
                    name=f"{config.THREAD_PREFIX}refresh",
                    daemon=True,
                ).start()
        while not flight.done.wait(_CANCEL_POLL):
            if cancel.is_set() or self._closed.is_set():
                raise _Cancelled()
        error = flight.error
        if isinstance(error, DownloadError) and error.chunk_id is None:
            raise DownloadError(
                error.message, chunk_id=stale.index, status_code=error.status_code
            ) from error
        if error is not None:
            raise error.with_traceback(None)  # each waiter raises it afresh

    def _reread(self, refresh: Refresh, flight: _Refreshing) -> None:
        try:
            fresh = refresh()
        except BaseException as exc:  # handed to the transfers that wait
            flight.error = exc
        else:
            self.stats.add(url_refreshes=1)
            with self._lock:
                self._chunks.update({c.index: c for c in fresh})
        finally:
            with self._lock:
                self._refreshing = None
            flight.done.set()

    # -- cancellation: a blocked socket read is unblocked by shutting its socket down ------

    def _watch(self, cancel: threading.Event) -> None:
        with self._lock:
            self._active.setdefault(cancel, set())
            self._watchers[cancel] = self._watchers.get(cancel, 0) + 1

    def _unwatch(self, cancel: threading.Event) -> None:
        with self._lock:
            left = self._watchers.pop(cancel, 0) - 1
            if left > 0:  # another fetch still runs under this event
                self._watchers[cancel] = left
            elif not self._active.get(cancel):
                self._active.pop(cancel, None)

    def _track(
        self, cancel: threading.Event, response: urllib3.BaseHTTPResponse | HTTPConnection
    ) -> None:
        with self._lock:
            self._active.setdefault(cancel, set()).add(response)

    def _track_waiting(
        self, cancel: threading.Event, connections: list[HTTPConnection], connection: HTTPConnection
    ) -> None:
        connections.append(connection)
        self._track(cancel, connection)
        if cancel.is_set() or self._closed.is_set():  # cancelled before it was tracked
            shutdown_connection(connection)

    def _untrack(
        self, cancel: threading.Event, response: urllib3.BaseHTTPResponse | HTTPConnection
    ) -> None:
        with self._lock:
            self._active.get(cancel, set()).discard(response)

    def _abort(self, cancel: threading.Event) -> None:
        with self._lock:
            responses = list(self._active.pop(cancel, ()))
            children = list(self._children.get(cancel, ()))
        for child in children:
            child.set()
            self._abort(child)
        for response in responses:
            if isinstance(response, HTTPConnection):  # still waiting for its headers
                shutdown_connection(response)
                continue
            shutdown = getattr(response, "shutdown", None)
            if shutdown is not None:
                # The transfer may finish meanwhile: urllib3 then refuses with RuntimeError
                # (connection back in the pool) or ValueError (response closed). Escaping
                # here would skip the caller's cleanup and leave its threads running.
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    shutdown()


def _cancel_each(futures: list[Future[Any]]) -> None:
    for future in futures:
        future.cancel()


def _version_of(response: urllib3.BaseHTTPResponse) -> str | None:
    """What names the version of an answer's file where no strong ETag does: a weak ETag,
    else Last-Modified; None if neither."""
    etag = response.headers.get("ETag")
    if etag:
        return None if not etag.startswith("W/") else etag
    modified = response.headers.get("Last-Modified")
    return f"modified {modified}" if modified else None


_END_PROBE_SECONDS = 0.25  # how long _more_to_come waits for a chunked body's end


def _more_to_come(response: urllib3.BaseHTTPResponse) -> bool:
    """Whether a chunked body goes on past the bytes due: one more byte is asked for, which
    also reads the body's end marker, so the connection can be reused. (_check_length
    refused an announced length longer than due; a body that ends when its connection
    closes has no end to wait for, and is not asked.) The bytes due are all in and are
    checked: a failure to read past them is not the chunk's. The look waits
    ``_END_PROBE_SECONDS``, not the read timeout: an end marker sent late held every chunk
    for the whole timeout (300 s by default) with all its bytes in; past the wait the
    connection is closed instead of reused."""
    if response.length_remaining is not None or not getattr(response, "chunked", False):
        return False
    sock = getattr(getattr(response, "connection", None), "sock", None)
    timeout = sock.gettimeout() if sock is not None else None
    try:
        if sock is not None:
            sock.settimeout(_END_PROBE_SECONDS)
        more = bool(response.read1(1))
    except (Urllib3Error, OSError) as exc:
        traceback.clear_frames(exc.__traceback__)  # (a cycle in urllib3: see _stream)
        response.close()  # not back to the pool half read
        return False
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)  # for the next request on this connection
    return more


def _first_failure(futures: list[Future[Any]]) -> BaseException | None:
    """The error of the first of ``futures`` (all done) that failed on its own, not by
    being stopped."""
    for future in futures:
        if not future.cancelled():
            error = future.exception()
            if error is not None and not isinstance(error, _Cancelled):
                return error
    return None


def _receive_block(
    response: urllib3.BaseHTTPResponse, sink: _Sink, pos: int, end: int | None
) -> bytes:
    """The next bytes of the body, already stored in ``sink`` at ``pos``; empty at the end.

    ``read1`` hands over whatever arrived, so bytes received before a connection drop are
    kept and the retry resumes after them. (Receiving straight into the buffer with
    ``readinto`` measured no cheaper here, and loses a partial block on a drop.)
    """
    limit = config.READ_BLOCK if end is None else min(config.READ_BLOCK, end - pos)
    if limit <= 0:
        return b""  # every byte due is here; a longer body was refused by _check_length
    block = response.read1(limit)
    if block:
        sink.write(pos, block)
    return block


def _digits(value: str) -> bool:
    """``str.isdigit()`` takes "²" and Arabic-Indic digits, which ``int()`` refuses, and
    ``int()`` refuses more than 4,300 digits: no byte count has 20."""
    return value.isascii() and value.isdigit() and len(value) < _MAX_DIGITS


def _check_length(response: urllib3.BaseHTTPResponse, pos: int, end: int | None) -> None:
    """A body whose announced length disagrees with the chunk's listed size is wrong."""
    length = response.headers.get("Content-Length")
    if end is None or length is None or not _digits(length):
        return
    if int(length) != end - pos:
        raise _IntegrityError(f"the server announced {length} bytes where {end - pos} were due")


def _progress_floor(start: int, end: int | None) -> int:
    """The bytes an attempt cut off must have brought to count as progress (see
    _PROGRESS_FLOOR)."""
    if end is None:
        return _PROGRESS_FLOOR
    return max(1, min(_PROGRESS_FLOOR, -(-(end - start) // _PROGRESS_PARTS)))


def _check_content_range(
    response: urllib3.BaseHTTPResponse, pos: int, end: int | None, size: int | None, index: int
) -> tuple[int, int | None]:
    """A 206 must start at the byte asked for, in a file of the chunk's listed size; returns
    where its range ends (exclusive) and that file's length when the server says it.

    Its end may differ from the one asked: a host that caps each ranged answer ends it
    early (the caller asks for the rest), one that sends the rest of the file from the
    range's start ends it late (the caller reads no further than it asked). Anything else
    (another first byte, a range of a file of another length, bytes past the file's end)
    is not stitched into the chunk. Without a listed size, a range that names no file
    length is refused: nothing would say where the chunk ends."""
    value = response.headers.get("Content-Range", "")
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None or int(match[1]) != pos:
        raise _IntegrityError(f"chunk {index}: asked for byte {pos}, got range {shown(value, 100)}")
    stop = int(match[2]) + 1
    total = None if match[3] == "*" else int(match[3])
    if stop <= pos or (total is not None and stop > total) or (end is None and total is None):
        asked = f"{pos}-{'' if end is None else end - 1}"
        raise _IntegrityError(
            f"chunk {index}: asked for bytes {asked}, got range {shown(value, 100)}"
        )
    if size is not None and total is not None and total != size:
        raise _IntegrityError(
            f"chunk {index}: the server's file is {total} bytes, not the {size} listed"
        )
    if size is not None and stop > size:
        raise _IntegrityError(
            f"chunk {index}: got range {shown(value, 100)} of a file listed as {size} bytes"
        )
    return stop, total


def _unsatisfied_length(response: urllib3.BaseHTTPResponse) -> int | None:
    """The complete length a 416 names (``Content-Range: bytes */<length>``), if any."""
    value = response.headers.get("Content-Range", "")
    unit, _, length = value.partition(" */")
    return int(length) if unit.strip() == "bytes" and _digits(length.strip()) else None


def _hash_file(fh: Any, length: int) -> Any:
    hasher = hashlib.sha256()
    fh.seek(0)
    remaining = length
    while remaining:
        block = fh.read(min(config.READ_BLOCK, remaining))
        if not block:
            break
        hasher.update(block)
        remaining -= len(block)
    return hasher


def _reset(hasher: Any) -> Any:
    return hashlib.new(hasher.name)
