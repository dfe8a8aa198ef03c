"""A chunk store for random access: a memory LRU bounded in bytes, over a verified disk cache.

Map-style ``to_torch`` reads images in any order, so the chunk an index falls in must be at
hand without being downloaded again on every visit. :class:`ChunkStore` keeps compressed
chunks in a memory LRU bounded in bytes, and writes every chunk it downloads to a cache
folder shared by the DataLoader's worker processes, by later epochs and by later runs:

- a file is named by the job id and the chunk's sha256 (index and size when the API gives no
  sha256), so a chunk that changed on the server is never served stale;
- it is written under a temporary name in the same folder, verified, then renamed with
  ``os.replace``: no reader ever sees a half-written file under the final name, whatever
  process crashes, and concurrent writers of one chunk cannot corrupt it (a power cut can
  tear a file, which is not fsynced: the next check below catches that);
- a file is verified (sha256, else size) once, by the process that writes it or first
  opens it, which then leaves a stamp beside it (``<name>.verified``: the sha256 and the
  file's inode, size, mtime and ctime). A process that finds the file exactly as
  stamped does not hash it again (a DataLoader starts new workers every epoch: each would
  re-read the whole cache); any change to the file, even one that restores its mtime,
  moves its ctime and voids the stamp. Each image's own sha256 from the manifest is still
  checked when it is decoded, and a bad image in a chunk taken on its stamp makes the file
  be hashed after all (:meth:`ChunkStore.recheck`): bit rot, which moves no timestamp, is
  caught there. A corrupt file is deleted and the chunk downloaded again;
- an advisory lock per chunk (POSIX ``flock``) makes concurrent workers wait for one download
  instead of each making its own (without it the result is the same, only slower).

Cached files are memory-mapped: worker processes share one copy through the page cache, and
reading one image touches only that image's pages. Writers never modify a file in place, so
a mapping stays valid while another process replaces the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mmap
import os
import re
import secrets
import stat
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import config
from .archive import ChunkArchive
from .exceptions import DecompressionError, PixCrawlerError
from .models import Chunk

log = logging.getLogger("pixcrawler")

Buffer = bytes | bytearray | memoryview | mmap.mmap
CacheDir = str | os.PathLike[str] | bool | None

TEMP_SUFFIX = ".tmp"
STAMP_SUFFIX = ".verified"
_MAX_STAMP_BYTES = 4096  # a stamp is one line of a sha256 and five numbers
_HASH_BLOCK = 8 << 20
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

if sys.platform == "win32":  # pragma: no cover - no flock; atomic rename still keeps it safe

    def _lock_fd(fd: int, *, wait: bool = True) -> None:
        return None

else:
    import fcntl
    import resource

    def _lock_fd(fd: int, *, wait: bool = True) -> None:
        """An exclusive ``flock`` on ``fd``, released when it is closed; without ``wait``,
        BlockingIOError if another process holds it."""
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def folder_lock(root: Path, name: str, busy: Callable[[], Exception]) -> Iterator[None]:
    """Hold the lock file ``name`` inside the folder ``root`` (made if missing) for the
    block; ``busy()`` is raised at once when another process holds it.

    Inside the folder, every path to it (a symlink, a bind mount) finds the same lock, and
    it is a file opened for writing, which NFS needs to lock it. Where the file system has
    no locks, or the folder is read-only (nothing can be written there), the block runs
    unlocked."""
    root.mkdir(parents=True, exist_ok=True)
    fd = None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        with contextlib.suppress(OSError):
            fd = _open_lock_file(root / name, flags)
            break
    if fd is None:
        yield
        return
    try:
        try:
            _lock_fd(fd, wait=False)
        except BlockingIOError:
            raise busy() from None
        except OSError:  # ENOLCK and the like: no locks here
            pass
        yield
    finally:
        _close_lock_file(fd)  # releases the lock


# Lock files this process holds open (chunks', and the folders of exports and packs). A
# forked child (a DataLoader worker) inherits them, and a flock lives as long as any copy
# of its descriptor: the child closes its copies at once, or it would wait forever on a
# lock only it still keeps alive (and keep an export's folder busy after the export).
_HELD_LOCKS: set[int] = set()
# Held while a lock file is opened and registered, or unregistered and closed, and across
# every fork: a fork can then never land between ``os.open`` and the registration (which
# release the GIL), where the child would inherit a descriptor it does not know to close.
_HELD_LOCKS_GUARD = threading.Lock()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)  # not LOCK_UN: that would release the parent's lock too
    _HELD_LOCKS.clear()
    _HELD_LOCKS_GUARD.release()  # taken by the forking thread, which this one is


def _open_lock_file(path: Path, flags: int) -> int:
    """``os.open`` a lock file and register the descriptor (see ``_HELD_LOCKS``)."""
    with _HELD_LOCKS_GUARD:
        fd = os.open(path, flags, 0o644)
        _HELD_LOCKS.add(fd)
    return fd


def _close_lock_file(fd: int) -> None:
    with _HELD_LOCKS_GUARD:
        _HELD_LOCKS.discard(fd)
        os.close(fd)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(
        before=_HELD_LOCKS_GUARD.acquire,
        after_in_parent=_HELD_LOCKS_GUARD.release,
        after_in_child=_close_inherited_locks,
    )


class _Mappings:
    """One store's file mappings held in memory, counted with every other store's: before
    Python 3.13 each holds a descriptor, and the process has one limit for all of them
    (train, validation and test datasets each map their own chunks)."""

    _lock = threading.Lock()
    total = 0  # every store of this process

    def __init__(self) -> None:
        self.count = 0

    def change(self, delta: int) -> None:
        with _Mappings._lock:
            self.count += delta
            _Mappings.total += delta

    def release(self) -> None:  # the store is gone: its mappings with it
        self.change(-self.count)


def _mapped_limit() -> int:
    """How many cached files the stores of this process keep mapped at once. Before Python
    3.13 each mapping holds a descriptor open: a share of the process's limit, so that many
    small chunks never leave the sockets and files around them short of descriptors."""
    if sys.version_info >= (3, 13):
        return sys.maxsize  # mapped with trackfd=False: no descriptor kept
    if sys.platform == "win32":  # pragma: no cover - no getrlimit
        soft = 512  # the C runtime's default
    else:
        try:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (OSError, ValueError):  # pragma: no cover - no such limit here
            soft = 512
        if soft == resource.RLIM_INFINITY:
            return config.MAPPED_FILES_UNLIMITED
    return max(config.MIN_MAPPED_FILES, int(soft * config.MAPPED_FILES_SHARE))


def default_cache_root() -> Path:
    """``$PIXCRAWLER_CACHE_DIR``, else the platform's user cache dir for ``pixcrawler``."""
    env = os.environ.get(config.ENV_CACHE_DIR)
    if env and env.strip():  # set to "" (or blanks): unset
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("pixcrawler"))


def resolve_cache_root(cache_dir: CacheDir) -> Path | None:
    """The cache root a ``cache_dir=`` argument means: None (or True) → the default,
    False → no disk cache, else that folder."""
    try:
        if cache_dir is False:
            return None
        if cache_dir is None or cache_dir is True:
            return default_cache_root()
        if isinstance(cache_dir, str) and not cache_dir.strip():
            # Path("") is the working directory: never what an unset setting meant.
            raise ValueError(
                f"cache_dir={cache_dir!r} names no folder: pass None for the default folder"
                " or False for no disk cache"
            )
        return Path(cache_dir).expanduser()
    except (TypeError, RuntimeError) as exc:  # not a path; "~nobody/x" of no such user
        default = cache_dir is None or cache_dir is True  # (1 == True: "in" would say so)
        given = f"${config.ENV_CACHE_DIR}" if default else "cache_dir"
        raise ValueError(f"{given} is not a folder one can use: {exc}") from None


@dataclass
class CacheStats:
    """What a store has done in this process."""

    memory_hits: int = 0
    disk_hits: int = 0
    downloads: int = 0
    evictions: int = 0
    corrupt_files: int = 0
    write_failures: int = 0


@dataclass
class _Entry:
    buffer: Buffer
    size: int
    archive: ChunkArchive | None = None


class ChunkStore:
    """A job's chunks by index: from memory, else from the disk cache, else downloaded.

    Args:
        chunks: The job's chunks (their sha256 and size name and check the cached files).
        fetch: Downloads one chunk by index and returns its verified bytes.
        job_id: Names the cache sub-folder.
        memory_budget: Bytes of chunks kept in memory (default
            ``config.DEFAULT_MEMORY_CACHE_BYTES``); the chunk in use is kept even when it
            alone is larger.
        cache_dir: Root of the disk cache; None for the default
            (``$PIXCRAWLER_CACHE_DIR`` or the platform cache dir), False for none.
        origin: Distinguishes the cached files of chunks that have no sha256 (e.g. the API's
            base URL and the job version), since their name cannot carry their content.

    Safe to share between threads. Not to be shared across ``fork``: each process opens its
    own store over the same folder.

    Example:
        >>> store = ChunkStore(job.chunks, downloader.fetch, job_id=job.id)
        >>> archive = store.archive(3)          # downloaded, cached on disk and in memory
        >>> archive = store.archive(3)          # from memory
    """

    def __init__(
        self,
        chunks: Sequence[Chunk],
        fetch: Callable[[int], Buffer],
        *,
        job_id: str,
        memory_budget: int | None = None,
        cache_dir: CacheDir = None,
        origin: str = "",
    ) -> None:
        budget = config.DEFAULT_MEMORY_CACHE_BYTES if memory_budget is None else memory_budget
        if budget < 0:
            raise ValueError(f"memory_budget must be >= 0 bytes, got {budget}")
        if not re.fullmatch(config.JOB_ID_PATTERN, job_id):  # it names a folder
            raise ValueError(f"job_id must match {config.JOB_ID_PATTERN}, got {job_id[:80]!r}")
        root = resolve_cache_root(cache_dir)
        self.memory_budget = int(budget)
        self.directory = root / config.CACHE_SUBDIR / job_id if root is not None else None
        self.stats = CacheStats()
        self._chunks = {c.index: c for c in chunks}
        self._fetch = fetch
        self._origin_tag = hashlib.sha256(origin.encode()).hexdigest()[:12]
        self._lock = threading.Lock()
        self._memory: OrderedDict[int, _Entry] = OrderedDict()
        self._memory_bytes = 0
        self._mapped = _Mappings()  # entries in memory that are file mappings
        weakref.finalize(self, self._mapped.release)
        self._mapped_limit = _mapped_limit()
        self._loading: dict[int, threading.Lock] = {}
        self._verified: dict[Path, tuple[int, ...]] = {}
        self._trusted: set[int] = set()  # chunks read from disk without hashing them
        # Files a bad image put in doubt, as they stood: never taken on a stamp or on their
        # size again, even where their stamp or the file itself could not be deleted (a
        # read-only cache, another user's file in a shared folder).
        self._doubted: dict[Path, tuple[int, ...]] = {}
        # Files found corrupt, as they stood: passed over, not hashed again, where they
        # could not be deleted.
        self._condemned: set[tuple[Path, tuple[int, ...]]] = set()
        self._swept = False
        self._closed = threading.Event()
        self._failures: set[tuple[str, int | None]] = set()  # (what, errno) said so far

    # -- public ------------------------------------------------------------------------

    def get(self, index: int) -> Buffer:
        """The chunk's complete, verified bytes."""
        return self._entry(index).buffer

    def archive(self, index: int) -> ChunkArchive:
        """The chunk's archive, opened once per stay in memory."""
        entry = self._entry(index)
        archive = entry.archive
        if archive is None:
            try:
                archive = ChunkArchive(memoryview(entry.buffer), chunk_id=index)
            except DecompressionError:
                # A file taken on another process's stamp may be torn where the zip keeps
                # its directory: hashed now (downloaded again if corrupt), then opened.
                if not self.recheck(index):
                    raise
                entry = self._entry(index)
                archive = ChunkArchive(memoryview(entry.buffer), chunk_id=index)
            entry.archive = archive
        return archive

    def path(self, index: int) -> Path | None:
        """Where chunk ``index`` is (or would be) cached on disk; None if it cannot be."""
        if self.directory is None:
            return None
        chunk = self._chunks[index]
        if chunk.sha256 and re.fullmatch(r"[0-9a-fA-F]{64}", chunk.sha256):  # it names a file
            return self.directory / f"{index:05d}-{chunk.sha256.lower()}.zip"
        if chunk.size_bytes is not None:
            name = f"{index:05d}-{chunk.size_bytes}b-{self._origin_tag}.zip"
            return self.directory / name
        return None  # nothing to tell a stale file from a current one: memory only

    def recheck(self, index: int) -> bool:
        """Chunk ``index`` gave a bad image. If its bytes were read from disk without being
        hashed (on a stamp, or as verified earlier by this store), forget the stamp and the
        bytes, so that the next read hashes the file (and downloads the chunk again if the
        file is corrupt): True, read it again. A chunk the API lists no sha256 for is
        hashed against the sha256 its stamp recorded when it was written: a file torn
        since (or with no stamp) is deleted and the chunk downloaded again. False when the
        bytes were hashed as they were read or downloaded, or match their record (the
        image is bad at its source)."""
        path = self.path(index)
        with self._lock:
            if index not in self._trusted:
                return False
            self._trusted.discard(index)  # one caller reloads it
            loaded = self._verified.get(path) if path is not None else None
        sized_only = path is not None and not self._chunks[index].sha256
        if sized_only and path is not None:
            stamp = _read_stamp(path)
            if loaded is not None and _freshly_written(path, loaded, stamp):
                # Another store has put a fresh download in its place since this one read
                # it (stamped as it stands): read that.
                with self._lock:
                    self._verified.pop(path, None)
                    self._drop(index)
                return True
            if _as_written(path, stamp):
                return False
            self._count("corrupt_files")  # torn since it was written, or never recorded
            log.warning(
                "chunk %d: cached file %s no longer holds what was written; downloading it again",
                index,
                path,
            )
        with self._lock:
            if path is not None:
                if loaded is None:
                    with contextlib.suppress(OSError):
                        loaded = _identity(os.stat(path))
                if loaded is not None:
                    self._doubted[path] = loaded
                # Forgotten before the bytes go, so no thread reloads them as verified.
                self._forget_verified(path)
                if sized_only:  # only a download can tell what it should hold
                    _unlink_unless_replaced(path, loaded)
            self._drop(index)
        return True

    def in_memory(self, index: int) -> bool:
        with self._lock:
            return index in self._memory

    @property
    def memory_bytes(self) -> int:
        """Bytes of chunks held in memory now."""
        with self._lock:
            return self._memory_bytes

    def clear_memory(self) -> None:
        """Drop every chunk held in memory (the disk cache stays)."""
        with self._lock:
            self._memory.clear()
            self._memory_bytes = 0
            self._mapped.release()

    def close(self) -> None:
        """Drop the chunks held in memory and end any wait for another process's lock
        (PixCrawlerError there): a thread left waiting would keep the process from exiting."""
        self._closed.set()
        self.clear_memory()

    # -- memory ------------------------------------------------------------------------

    def _first_failure(self, what: str, exc: OSError) -> bool:
        """Whether ``what`` ("open", "write") has not failed with ``exc``'s errno before in
        this store: only the first is warned of, the same failure chunk after chunk not."""
        with self._lock:
            first = (what, exc.errno) not in self._failures
            self._failures.add((what, exc.errno))
        return first

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _entry(self, index: int) -> _Entry:
        if index not in self._chunks:
            raise IndexError(f"no chunk {index}")
        with self._lock:
            entry = self._memory_hit(index)
            if entry is not None:
                return entry
            loading = self._loading.setdefault(index, threading.Lock())
        with loading:  # one thread loads a chunk; the others wait for it
            with self._lock:
                entry = self._memory_hit(index)
                if entry is not None:
                    return entry
            entry = self._load(index)
            with self._lock:
                self._memory[index] = entry
                self._memory_bytes += entry.size
                self._mapped.change(isinstance(entry.buffer, mmap.mmap))
                self._evict()
        return entry

    def _memory_hit(self, index: int) -> _Entry | None:
        """The chunk if it is in memory (then the most recently used); call with the lock."""
        entry = self._memory.get(index)
        if entry is not None:
            self._memory.move_to_end(index)
            self.stats.memory_hits += 1
        return entry

    def _evict(self) -> None:
        """Least recently used first, down to the budget; then the least recently used
        mappings down to their limit (a chunk in plain memory holds no descriptor)."""
        while len(self._memory) > 1 and self._memory_bytes > self.memory_budget:
            _, old = self._memory.popitem(last=False)
            self._forget(old)
            self.stats.evictions += 1
        excess = _Mappings.total - self._mapped_limit
        if excess > 0:  # this store's, oldest first; never the one just used
            mapped = [i for i, e in self._memory.items() if isinstance(e.buffer, mmap.mmap)]
            for index in mapped[:-1][:excess]:
                self._forget(self._memory.pop(index))
                self.stats.evictions += 1

    def _drop(self, index: int) -> None:
        """Take chunk ``index`` out of memory, if it is there (call with the lock)."""
        entry = self._memory.pop(index, None)
        if entry is not None:
            self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        """Uncount an entry taken out of memory (call with the lock)."""
        self._memory_bytes -= entry.size
        self._mapped.change(-isinstance(entry.buffer, mmap.mmap))

    # -- disk --------------------------------------------------------------------------

    def _load(self, index: int) -> _Entry:
        path = self.path(index)
        if path is None:
            return self._download(index)
        cached = self._open_cached(index, path)
        if cached is not None:
            return cached
        # Another process may be writing it: wait, then look again.
        with _exclusive(path, self._closed):
            cached = self._open_cached(index, path)
            if cached is not None:
                return cached
            entry = self._download(index)
            self._write(index, path, entry.buffer)
            return entry

    def _download(self, index: int) -> _Entry:
        data = self._fetch(index)
        self._count("downloads")
        return _Entry(data, len(data))

    def _open_cached(self, index: int, path: Path) -> _Entry | None:
        """The verified file mapped into memory, or None (absent, or corrupt and deleted)."""
        chunk = self._chunks[index]
        try:
            # Non-blocking: a FIFO put where a chunk belongs must not hang the open.
            fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if self._first_failure("open", exc):  # (an unusable cache_dir: every chunk)
                log.warning(
                    "chunk %d: cannot open cached file %s (%s); later chunks failing so are "
                    "not each reported",
                    index,
                    path,
                    exc,
                )
            else:
                log.debug("chunk %d: cannot open cached file %s (%s)", index, path, exc)
            return None
        try:
            st = os.fstat(fd)
            seen = _identity(st)
            if not stat.S_ISREG(st.st_mode):
                log.warning("chunk %d: %s is not a regular file; not using it", index, path)
                return None
            if (path, seen) in self._condemned:  # found corrupt, not deletable
                return None
            if st.st_size == 0 or (chunk.size_bytes is not None and st.st_size != chunk.size_bytes):
                self._discard(index, path, st, f"{st.st_size} bytes, expected {chunk.size_bytes}")
                return None
            buffer = _map(fd, path, st.st_size)
        finally:
            os.close(fd)
        doubted = self._doubted.get(path) == seen
        if not chunk.sha256:  # its size, checked above, is all there is to check
            if doubted:  # found torn, and still here: only a download says what it holds
                if isinstance(buffer, mmap.mmap):
                    buffer.close()
                return None
            with self._lock:
                self._trusted.add(index)
        if self._verified.get(path) != seen:
            expected = chunk.sha256.lower() if chunk.sha256 else None
            if expected is not None:
                if not doubted and _read_stamp(path) == _stamp(st, expected):
                    with self._lock:
                        self._trusted.add(index)
                elif _sha256(buffer) != expected:
                    if isinstance(buffer, mmap.mmap):
                        buffer.close()
                    self._discard(index, path, st, "sha256 does not match")
                    return None
                else:
                    _write_stamp(path, st, expected)
            self._verified[path] = seen
        elif chunk.sha256:  # verified here before, not hashed now: rot would go unseen
            with self._lock:
                self._trusted.add(index)
        self._count("disk_hits")
        return _Entry(buffer, st.st_size)

    def _discard(self, index: int, path: Path, st: os.stat_result, why: str) -> None:
        loaded = _identity(st)
        self._condemned.add((path, loaded))
        self._count("corrupt_files")
        log.warning(
            "chunk %d: cached file %s is corrupt (%s); downloading it again", index, path, why
        )
        _unlink_unless_replaced(path, loaded)
        if _freshly_written(path, loaded, _read_stamp(path)):
            # Another process renamed its download into place meanwhile, then its stamp:
            # that stamp is not this file's to delete.
            self._verified.pop(path, None)
        else:
            self._forget_verified(path)
        with self._lock:
            self._trusted.discard(index)

    def _forget_verified(self, path: Path) -> None:
        """Drop this process's record of ``path`` and its stamp (takes no lock)."""
        with contextlib.suppress(OSError):
            _stamp_path(path).unlink()
        self._verified.pop(path, None)

    def _write(self, index: int, path: Path, data: Buffer) -> None:
        """Temp file in the same folder, verify, rename. A failure costs only the cache.

        No fsync (it cost ~40 ms per 18 MiB chunk here, a tenth of a first epoch): a crash
        of this process leaves its bytes in the page cache, whole; a power cut could leave
        a torn file, which the sha256 check of the next process to open it catches.
        """
        chunk = self._chunks[index]
        temp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._sweep(path.parent)
            with open(temp, "xb") as fh:
                fh.write(data)
            size, digest = _file_digest(temp)
            if size != len(data) or (chunk.sha256 and digest != chunk.sha256.lower()):
                raise OSError(f"read back {size} bytes that do not match what was written")
            os.replace(temp, path)
            st = os.stat(path)
            self._verified[path] = _identity(st)
            # (Without a sha256 from the API, the one read back: what recheck() compares.)
            _write_stamp(path, st, chunk.sha256.lower() if chunk.sha256 else digest)
        except OSError as exc:
            self._count("write_failures")
            if self._first_failure("write", exc):  # (a full disk: every chunk)
                log.warning(
                    "chunk %d: not cached on disk (%s); keeping it in memory only (later "
                    "chunks failing so are not each reported)",
                    index,
                    exc,
                )
            else:
                log.debug("chunk %d: not cached on disk (%s)", index, exc)
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()

    def _sweep(self, directory: Path) -> None:
        """Delete temp files left by processes that died mid-write (once per store)."""
        if self._swept:
            return
        self._swept = True
        cutoff = time.time() - config.STALE_TEMP_SECONDS
        for leftover in directory.glob(f"*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()


@contextlib.contextmanager
def _exclusive(path: Path, stop: threading.Event) -> Iterator[None]:
    """Hold the chunk's lock file (``<name>.lock``) for the block; no lock if it cannot
    (see :func:`_wait_for_lock`)."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_lock_file(lock_path, os.O_RDWR | os.O_CREAT)
    except OSError:
        yield
        return
    try:
        try:
            _wait_for_lock(fd, path, stop)  # outside the guard: a fork meanwhile closes the copy
        except OSError as exc:  # flock unsupported (ENOLCK, ENOSYS on some network mounts)
            log.debug("no lock on %s (%s); atomic renames still keep the cache whole", path, exc)
        yield
    finally:
        _close_lock_file(fd)  # releases the lock


def _wait_for_lock(fd: int, path: Path, stop: threading.Event) -> None:
    """``flock`` ``fd``, polling, so that ``stop`` (the store closed) ends the wait with
    PixCrawlerError; after ``config.CACHE_LOCK_WAIT_SECONDS`` without it, go on unlocked
    (temp files and atomic renames still keep the cache whole): a process stopped while
    holding it (Ctrl-Z, a debugger) must not stall this one for ever."""
    started = time.monotonic()
    next_report = started + config.SLOW_WAIT_SECONDS
    pause = 0.002
    while True:
        try:
            _lock_fd(fd, wait=False)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - started
        if waited >= config.CACHE_LOCK_WAIT_SECONDS:
            log.warning(
                "%s: another process has held its cache lock for %.0f s; downloading it here too",
                path.name,
                waited,
            )
            return
        if started + waited >= next_report:
            log.warning("%s: waited %.0f s for another process caching it", path.name, waited)
            next_report += config.SLOW_WAIT_SECONDS
        if stop.wait(pause):
            raise PixCrawlerError(f"{path.name}: the chunk store was closed")
        pause = min(2 * pause, 0.1)


def _map(fd: int, path: Path, size: int) -> Buffer:
    """The open file, mapped read-only (with no descriptor kept on Python 3.13+). Where it
    cannot be mapped (descriptors or mappings used up, a file system without mmap): read."""
    try:
        if sys.version_info >= (3, 13):
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ, trackfd=False)
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: emptied since it was measured
        log.debug("cannot map %s (%s); reading it", path, exc)
    buffer = bytearray(size)
    with memoryview(buffer) as view, io.FileIO(fd, closefd=False) as fh:
        filled = 0
        while filled < size and (got := fh.readinto(view[filled:])):
            filled += got
    del buffer[filled:]  # a file cut short since: its check refuses it
    return buffer


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """The file as this process verified it: rewriting it in place moves the ctime even
    where the mtime is set back, and a file put in its place has another inode."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + STAMP_SUFFIX)


def _stamp(st: os.stat_result, sha256: str) -> str:
    """What a stamp says: this sha256 was verified for the file with exactly this inode,
    size and timestamps (a write moves both; ``utime`` can set the mtime back, not the
    ctime). Not its device: NFS numbers that per client mount, so machines sharing a cache
    would never take each other's stamps (the inode and times are the server's)."""
    return " ".join([sha256, *map(str, _identity(st)[1:])]) + "\n"


def _stamped_sha256(stamp: str) -> str:
    """The sha256 a stamp (:func:`_stamp`'s text) records."""
    return stamp.split(" ", 1)[0]


def _read_stamp(path: Path) -> str | None:
    """The stamp's text; None where there is none, or where something else than a small
    regular file stands in its place (a FIFO would block the open, /dev/zero never end)."""
    try:
        fd = os.open(_stamp_path(path), os.O_RDONLY | _O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, _MAX_STAMP_BYTES).decode()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def _write_stamp(path: Path, st: os.stat_result, sha256: str) -> None:
    """Atomically, like the chunk itself; a stamp that cannot be written only costs a hash."""
    stamp = _stamp_path(path)
    temp = stamp.with_name(f"{stamp.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        temp.write_text(_stamp(st, sha256))
        os.replace(temp, stamp)
    except OSError as exc:
        log.debug("no stamp for %s (%s)", path, exc)
        with contextlib.suppress(OSError):
            temp.unlink()


def _as_written(path: Path, stamp: str | None) -> bool:
    """Whether the file still hashes to the sha256 its ``stamp`` recorded when it was
    written."""
    if not stamp:
        return False
    try:
        return _file_digest(path)[1] == _stamped_sha256(stamp)
    except OSError:
        return False


def _freshly_written(path: Path, loaded: tuple[int, ...], stamp: str | None) -> bool:
    """Whether the file at ``path`` is another than the one read as ``loaded`` (another
    inode, or the same one reused, with new times) and stands exactly as :meth:`_write`
    stamped it (``stamp``): a store's fresh download, not this file rotted in place."""
    if not stamp:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _identity(st) != loaded and stamp == _stamp(st, _stamped_sha256(stamp))


def _unlink_unless_replaced(path: Path, loaded: tuple[int, ...] | None) -> None:
    """Delete ``path`` unless another file has been renamed into its place since it was
    read as ``loaded`` (an :func:`_identity`; another process's fresh download)."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if loaded is None or (st.st_dev, st.st_ino) == loaded[:2]:
            os.unlink(path)


def _sha256(buffer: Buffer) -> str:
    return hashlib.sha256(buffer).hexdigest()


def _file_digest(path: Path) -> tuple[int, str]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            hasher.update(block)
            size += len(block)
    return size, hasher.hexdigest()
