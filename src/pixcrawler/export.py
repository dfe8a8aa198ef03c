"""``pixcrawler download``'s writers: a job's chunks to numpy, image files or zips on disk.

Everything goes under ``<output-dir>/<job_id>/`` and is resumable: every chunk is received
into a ``.part`` file (resumed with ``Range``), verified, then renamed; a ``.progress.json``
sidecar records which chunks are already written, so a rerun after an interruption
transfers only what is missing. Final names appear only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import threading
import unicodedata
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from . import config
from .archive import ChunkArchive, Sample
from .cache import _map, folder_lock
from .dataset import (
    Dataset,
    count_mismatch,
    counts_listed,
    decode_sample,
    group_bounds,
    num_images_of,
    unlabelled,
)
from .decode import ImageDecoder
from .downloader import ChunkDownloader, TransferStats
from .exceptions import DecompressionError, MixedImageSizesError
from .models import Chunk, Job
from .redaction import shown
from .units import human_size

log = logging.getLogger("pixcrawler")

FORMATS = ("numpy", "images", "zip")
SIDECAR = ".progress.json"
LOCK_FILE = ".download.lock"  # exclusive()'s, inside the job's folder
STAGING_DIR = ".partial"  # chunk archives in transit for the numpy and images formats
METADATA = config.IMAGES_LISTING
# Names at the top of an images export that are the export's own: a label (the first
# folder of its images' paths) named like one is refused, and the packer packs none.
RESERVED_NAMES = frozenset({STAGING_DIR, SIDECAR, LOCK_FILE, METADATA, METADATA + ".part"})
# An image on its way to its file: in the staging folder, where no image's own name can
# be (a label named like it is refused), and short, whatever the length of that name.
_IMAGE_TEMP = "image.tmp"
_HASH_BLOCK = 1 << 20
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})  # the disk, or the user's quota
_NO_ROOM = _DISK_FULL | {errno.EFBIG}  # or a file over what the file system allows
_PROGRESS_REFRESH = 0.2  # seconds between refreshes of the bytes bar


class ExportUsageError(ValueError):
    """The job cannot be written as asked (e.g. numpy arrays of images of mixed sizes)."""


def exclusive(root: Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``root``'s lock (``.download.lock`` inside it) for the block: two downloads
    into one folder would append to the same ``.part`` files and share the staging folder.
    (See :func:`~pixcrawler.cache.folder_lock`.)"""
    return folder_lock(
        root,
        LOCK_FILE,
        lambda: ExportUsageError(
            f"another download is writing to {root}; wait for it to end, or choose "
            "another --output-dir"
        ),
    )


def transfer(
    dataset: Dataset,
    writer: Writer,
    todo: list[Chunk],
    window: int,
    progress: Progress,
) -> None:
    """Fetch ``todo`` with up to ``window`` chunks in flight; process them in order."""
    downloader = dataset.downloader()
    pool = ThreadPoolExecutor(window, thread_name_prefix=f"{config.THREAD_PREFIX}fetch")
    pending = iter(todo)
    inflight: deque[tuple[Chunk, Future[Path]]] = deque()

    def submit_next() -> None:
        chunk = next(pending, None)
        if chunk is not None:
            inflight.append((chunk, pool.submit(_obtain, downloader, writer, chunk)))

    try:
        for _ in range(window):
            submit_next()
        while inflight:
            chunk, future = inflight.popleft()
            path = downloader.wait_for(chunk.index, future)  # (a slow chunk says why)
            submit_next()
            writer.process(chunk, path, progress.add_images)
            writer.release(path)
    except BaseException:
        downloader.close()  # unblocks the other transfers at once
        for _, future in inflight:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _obtain(downloader: ChunkDownloader, writer: Writer, chunk: Chunk) -> Path:
    """The chunk's verified archive on disk: kept from an earlier run, or downloaded."""
    path = writer.chunk_path(chunk)
    if path.exists():
        if writer.kept(chunk):
            return path
        # Kept until the download replaces it (renamed over it): another version's chunk
        # in a zip folder stays whole if this run stops.
        if chunk.sha256 is None:  # nothing to check it by, and no record of this version's
            log.warning("%s may be another version's; downloading it again", path)
        else:
            log.warning("%s is corrupt or stale; downloading it again", path)
    return downloader.fetch_to_file(chunk.index, path)


def _intact(path: Path, chunk: Chunk) -> bool:
    """Whether ``path`` holds exactly the chunk the API lists (size, then sha256)."""
    try:
        if chunk.size_bytes is not None and path.stat().st_size != chunk.size_bytes:
            return False
        if chunk.sha256 is None:
            return True
        hasher = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                hasher.update(block)
    except OSError:
        return False
    return hasher.hexdigest() == chunk.sha256.lower()


class Progress:
    """Two tqdm bars (bytes received, images written) on a terminal; otherwise nothing."""

    def __init__(
        self,
        enabled: bool,
        job_id: str,
        writer: Writer,
        todo: list[Chunk],
        stats: TransferStats,
    ) -> None:
        self.enabled = enabled
        self._stats = stats
        self._start = stats.bytes_received
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._bytes_bar: Any = None
        self._images_bar: Any = None
        self._thread: threading.Thread | None = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        remaining = sum(writer.bytes_to_receive(chunk) for chunk in todo)
        self._bytes_bar = tqdm(
            total=remaining,
            desc=f"{job_id} bytes",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            position=0,
            dynamic_ncols=True,
        )
        self._images_bar = tqdm(
            total=writer.total_images if writer.counted else None,  # else unknown until the end
            initial=writer.done_images,
            desc=f"{job_id} images",
            unit="img",
            position=1,
            dynamic_ncols=True,
        )
        self._thread = threading.Thread(
            target=self._refresh_loop, name=f"{config.THREAD_PREFIX}progress", daemon=True
        )
        self._thread.start()

    def add_images(self, count: int) -> None:
        if self._images_bar is not None:
            self._images_bar.update(count)

    def _refresh(self) -> None:
        with self._lock:
            received = self._stats.bytes_received - self._start
            bar = self._bytes_bar
            if bar is not None and received > bar.n:
                bar.update(received - bar.n)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(_PROGRESS_REFRESH):
            self._refresh()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.enabled:
            self._refresh()
            self._bytes_bar.close()
            self._images_bar.close()


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- the three output formats ---------------------------------------------------------------


class Writer:
    """One output format: which chunks are still to do, where their archives go, and what
    to write once a chunk's archive is on disk and verified."""

    name = ""

    def __init__(self, dataset: Dataset, root: Path) -> None:
        self.dataset = dataset
        self.job: Job = dataset.job
        self.root = root
        # A job that lists no counts (other producers may omit them): its images are
        # counted as they are written, and the count checks that need a listed one are left.
        self.counted = counts_listed(self.job)
        self.total_images = num_images_of(self.job)  # an uncounted job's: set by finish()
        self.done_images = 0
        self.skipped_total = 0  # images left out (numpy, on_error="skip"), every run's
        self.complete = False

    def prepare(self) -> list[Chunk]:
        """Create what is needed, read what an earlier run left; the chunks still to do."""
        raise NotImplementedError

    def chunk_path(self, chunk: Chunk) -> Path:
        raise NotImplementedError

    def kept(self, chunk: Chunk) -> bool:
        """Whether the chunk's archive on disk is the one the job lists, kept from an
        earlier run."""
        path = self.chunk_path(chunk)
        return path.exists() and _intact(path, chunk)

    def bytes_to_receive(self, chunk: Chunk) -> int:
        """Bytes of ``chunk`` not yet on disk (an estimate: a stale file is fetched again)."""
        path = self.chunk_path(chunk)
        if path.exists():
            return 0
        return max(0, (chunk.size_bytes or 0) - _size_of(path.with_name(path.name + ".part")))

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        raise NotImplementedError

    def release(self, path: Path) -> None:
        """The chunk's archive is no longer needed."""

    def finish(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        """Release files and threads (after success or failure)."""

    def fingerprint(self) -> dict[str, Any]:
        """What a partial download must match to be resumed: the job's exact chunks."""
        return {
            "job_id": self.job.id,
            "version": self.job.version,
            "chunks": [[c.index, c.sha256, c.size_bytes] for c in self.job.chunks],
        }


_CHUNK_FILE = re.compile(r"[0-9]{5,}\.zip", re.ASCII)  # _ZipWriter.chunk_path's names


class _ZipWriter(Writer):
    """``chunks/00000.zip`` ...: the archives as served. A verified file is kept as is.
    A job that lists no counts has its images counted from each chunk's manifest."""

    name = "zip"

    def __init__(self, dataset: Dataset, root: Path) -> None:
        super().__init__(dataset, root)
        self.counts: dict[int, int] = {}  # images per chunk index, of an uncounted job
        # The chunks this version has written: a chunk the job lists without a sha256 is
        # kept only if recorded here (a file of the same size may be another version's).
        self.sidecar = _Sidecar(root, self.name)
        self.written: set[int] = set()

    def prepare(self) -> list[Chunk]:
        folder = self.root / "chunks"
        folder.mkdir(parents=True, exist_ok=True)
        listed = self._listed()
        for leftover in folder.glob("*.zip.part"):
            name = leftover.name.removesuffix(".part")
            if _CHUNK_FILE.fullmatch(name) and name not in listed:  # another version's
                _unlink_if_there(leftover)
        state = self.sidecar.load()
        if state is not None and state.get("fingerprint") == self.fingerprint():
            done = state.get("done")
            if isinstance(done, list):
                self.written = {i for i in done if isinstance(i, int)}
        else:
            # Not this version's record: a partial chunk may be another version's head,
            # which a resume would complete with this one's tail (without a sha256 to
            # catch it; with one, only to find it corrupt and spend its one re-download).
            for chunk in self.job.chunks:
                _unlink_if_there(self._part(chunk))
        todo: list[Chunk] = []
        kept: list[Chunk] = []
        for chunk in sorted(self.job.chunks, key=_index):
            if self.kept(chunk):
                kept.append(chunk)
                # A kept chunk never resumes a .part: one beside it is another version's.
                _unlink_if_there(self._part(chunk))
            else:
                todo.append(chunk)
        if not todo:
            # Whole: an earlier version's chunks go now; the rest is left as it is, its
            # images uncounted.
            self._remove_unlisted()
            self.complete = True
            return todo
        self.done_images = sum(self._count(chunk, self.chunk_path(chunk)) for chunk in kept)
        self._record()  # the .part files are this version's from now on
        return todo

    def kept(self, chunk: Chunk) -> bool:
        if chunk.sha256 is None and chunk.index not in self.written:
            return False
        return super().kept(chunk)

    def _record(self) -> None:
        self.sidecar.save({"fingerprint": self.fingerprint(), "done": sorted(self.written)})

    def chunk_path(self, chunk: Chunk) -> Path:
        return self.root / "chunks" / f"{chunk.index:05d}.zip"

    def _part(self, chunk: Chunk) -> Path:
        path = self.chunk_path(chunk)
        return path.with_name(path.name + ".part")

    def _listed(self) -> set[str]:
        return {self.chunk_path(chunk).name for chunk in self.job.chunks}

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        if chunk.sha256 is None:
            count = self._checked_count(chunk, path)
            self.written.add(chunk.index)
            self._record()
        else:
            count = self._count(chunk, path)
        advance(count)

    def _checked_count(self, chunk: Chunk, path: Path) -> int:
        """The images of a chunk no sha256 vouches for, once its bytes are found to be a
        chunk archive holding the images the job lists for it (a captive portal's login
        page was kept as ``00000.zip``, exit 0, and for good); else it is removed, and
        the error is bad data."""
        try:
            archive = _mapped_archive(chunk, path)
            if chunk.image_count is not None and len(archive.samples) != chunk.image_count:
                raise count_mismatch(self.job.id, chunk.index, chunk.image_count, archive)
        except DecompressionError:
            _unlink_if_there(path)
            raise
        count = len(archive.samples)
        if not self.counted:
            self.counts[chunk.index] = count
        return count

    def _count(self, chunk: Chunk, path: Path) -> int:
        """The chunk's images: as the job lists them, or from the manifest of ``path``."""
        if self.counted:
            return chunk.image_count or 0
        count = len(_mapped_archive(chunk, path))
        self.counts[chunk.index] = count
        return count

    def finish(self) -> None:
        if not self.counted:
            self.total_images = sum(self.counts.values())
        self._remove_unlisted()
        self.complete = True

    def _remove_unlisted(self) -> None:
        """Delete an earlier version's chunks the job no longer lists: only once this one
        is whole."""
        listed = self._listed()
        for leftover in (self.root / "chunks").glob("*.zip"):
            # (only files named as this writer names chunks: others are the user's)
            if _CHUNK_FILE.fullmatch(leftover.name) and leftover.name not in listed:
                leftover.unlink(missing_ok=True)

    def describe(self) -> str:
        return "zip: chunks/00000.zip ..."


def _mapped_archive(chunk: Chunk, path: Path) -> ChunkArchive:
    """The chunk archive at ``path``, mapped, not read: a chunk may be gigabytes."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = _map(fh.fileno(), path, size) if size else b""
    return ChunkArchive(memoryview(data), chunk_id=chunk.index)


def _unlink_if_there(path: Path) -> None:
    """Delete ``path`` if it is there. (``unlink(missing_ok=True)`` of a file that is not
    there still fails on a read-only mount: EROFS, not ENOENT.)"""
    if os.path.lexists(path):
        path.unlink(missing_ok=True)


class _Sidecar:
    """``.progress.json``: per format, the fingerprint of the job and the chunks written."""

    def __init__(self, root: Path, section: str) -> None:
        self.path = root / SIDECAR
        self.section = section

    def load(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # RecursionError: absurd nesting
            return None
        state = data.get(self.section) if isinstance(data, dict) else None
        return state if isinstance(state, dict) else None

    def save(self, state: dict[str, Any]) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        data[self.section] = state
        _write_atomic(self.path, json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def _index(chunk: Chunk) -> int:
    return chunk.index


def _valid_state(state: dict[str, Any] | None) -> bool:
    """A sidecar section as this module writes it (a hand-edited one starts over)."""
    if state is None or not isinstance(state.get("fingerprint"), dict):
        return False
    done, counts = state.get("done"), state.get("counts")
    if not isinstance(done, list) or not isinstance(counts, dict):
        return False
    return all(isinstance(i, int) and isinstance(counts.get(str(i)), int) for i in done)


def _written(state: dict[str, Any]) -> int:
    """Images of the chunks a sidecar section records written."""
    return sum(int(n) for n in state["counts"].values())


def _reserve(path: Path, start: int = 0) -> None:
    """Allocate a sparse file's blocks from ``start`` on now, so a full disk is a clean error
    here rather than a SIGBUS when a memory-mapped page is first written."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:  # pragma: no cover - macOS, Windows
        return
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= start:
            return
        try:
            allocate(fh.fileno(), start, size - start)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise OSError(
                    exc.errno, f"no room for {human_size(size)} in {path}: {exc.strerror}"
                ) from None
            # EOPNOTSUPP and the like: the file system cannot say; carry on.


def _resize_npy(
    path: Path, shape: tuple[int, ...], dtype: type[np.generic], held: int | None = None
) -> None:
    """Make the ``.npy`` file ``path`` (created if missing) an array of ``shape``: its
    header is rewritten in place (numpy leaves room in it for the first axis to grow) and
    the file cut or extended, so rows already written stay where they are. ``held``: the
    bytes the file had before an attempt that failed for room, all of whose growth is
    reserved again.

    The header never promises more rows than the file holds, even if the process stops
    in between (a growing file is extended first, a shrinking one cut after), so a rerun
    can always open what is there."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": shape,
        },
    )
    data = header.getvalue()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+b") as fh:
        old_size = fh.seek(0, os.SEEK_END)
        if old_size:
            fh.seek(0)
            if np.lib.format.read_magic(fh) != (1, 0):
                raise ValueError(f"{path} is not a version 1.0 .npy file")
            np.lib.format.read_array_header_1_0(fh)
            if fh.tell() != len(data):  # pragma: no cover - numpy >= 1.23 pads the header
                raise ValueError(f"the header of {path} has no room for shape {shape}")
        new_size = len(data) + math.prod(shape) * np.dtype(dtype).itemsize
        if new_size >= old_size:
            fh.truncate(new_size)
        fh.seek(0)
        fh.write(data)
        if new_size < old_size:
            fh.flush()
            fh.truncate(new_size)
    _reserve(path, old_size if held is None else min(held, old_size))


# _write_atomic's temp files beside the sidecar and labels.json (of any process).
_TEMP_FILE = re.compile(rf"\.({re.escape(SIDECAR)}|labels\.json)\.[0-9]+-[0-9]+\.tmp", re.ASCII)


def _sweep_temp_files(root: Path) -> None:
    """Delete the temp files a download killed mid-write (kill -9) left in ``root``. Called
    under :func:`exclusive`: no other download writes there now."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if _TEMP_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _fold(name: str) -> str:
    """``name`` as file systems that ignore case or Unicode normalisation see it (NTFS,
    APFS: ``Cat`` is ``cat``, and ``café`` composed is ``café`` decomposed)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def _write_atomic(
    path: Path, data: bytes | memoryview, tmp: Path | None = None, *, sync: bool = True
) -> None:
    """Write ``data`` to ``tmp`` (by default a hidden name beside ``path``), then rename it
    to ``path``; ``tmp`` does not outlive the call, even on a full disk or a Ctrl-C."""
    if tmp is None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _StagedWriter(Writer):
    """A format built from the archives: they are staged in ``.partial/`` while in transit
    and removed once their content is written."""

    def __init__(self, dataset: Dataset, root: Path) -> None:
        super().__init__(dataset, root)
        self.sidecar = _Sidecar(root, self.name)
        self.state: dict[str, Any] = {}
        self.staging = root / STAGING_DIR

    def chunk_path(self, chunk: Chunk) -> Path:
        return self.staging / f"{chunk.index:05d}.zip"

    def release(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def prepare(self) -> list[Chunk]:
        self.root.mkdir(parents=True, exist_ok=True)
        _sweep_temp_files(self.root)
        fingerprint = self.fingerprint()
        state = self.sidecar.load()
        if (
            _valid_state(state)
            and state is not None
            and state["fingerprint"] == fingerprint
            and not state.get("starting_over")
        ):
            done = set(state["done"])
            if state.get("renaming") and not state.get("complete") and self.all_in(done):
                # Stopped inside finish(): every chunk is written, the outputs were taking
                # their final names. Finish the renames rather than download it all again.
                self.state = state
                self.rename_outputs()
                if self.outputs_present():
                    self.mark_complete()
                    return []
            if state.get("complete") and self.outputs_present():
                if self.staging.exists():  # a run stopped after marking it complete
                    shutil.rmtree(self.staging, ignore_errors=True)
                self.complete = True
                return []
            if self.resume(state):
                self.state = state
            else:
                self.start_over(fingerprint)
        else:
            self.start_over(fingerprint)
        self.staging.mkdir(exist_ok=True)
        done = set(self.state["done"])
        counts = self.state["counts"]
        self.done_images = sum(int(counts[str(i)]) for i in done)
        # Index order, as the SDK iterates: X's rows and metadata.jsonl's lines follow it.
        return sorted((c for c in self.job.chunks if c.index not in done), key=_index)

    def all_in(self, done: set[int]) -> bool:
        """Whether ``done`` holds every chunk of the job."""
        return all(chunk.index in done for chunk in self.job.chunks)

    def start_over(self, fingerprint: dict[str, Any]) -> None:
        """Discard the partial outputs and begin anew. The final outputs of an earlier run
        (another version of the job, other options) stay until the new ones replace them:
        a rerun that stops leaves the user what they had."""
        self.state = {"fingerprint": fingerprint, "done": [], "counts": {}, "complete": False}
        # Recorded before the partial outputs are recreated, as a start over not yet ended:
        # a run stopped in between must leave no record of the chunks an earlier run wrote
        # into them (a rerun would keep its rows, zeroed), and the next run starts over too.
        self.sidecar.save({**self.state, "starting_over": True})
        shutil.rmtree(self.staging, ignore_errors=True)
        self.reset()
        self.sidecar.save(self.state)

    def mark_done(self, chunk: Chunk, count: int, **extra: Any) -> None:
        self.state["done"].append(chunk.index)
        self.state["counts"][str(chunk.index)] = count
        self.state.update(extra)
        self.sidecar.save(self.state)

    def check_complete(self) -> None:
        """Every chunk written, as many images as the job lists (where it lists them): the
        outputs may take their final names."""
        missing = [c.index for c in self.job.chunks if c.index not in set(self.state["done"])]
        if missing:  # pragma: no cover - the transfer loop processes every chunk
            raise RuntimeError(f"chunks {missing} were not written")
        written = self.written()
        self.skipped_total = sum(int(n) for n in self.state.get("skipped", {}).values())
        if self.counted and written + self.skipped_total != self.total_images:
            raise DecompressionError(
                f"job {self.job.id} lists {self.total_images:,} images but its chunks hold "
                f"{written + self.skipped_total:,}"
            )
        self.total_images = written  # what the outputs hold

    def written(self) -> int:
        """Images of the chunks written so far."""
        return _written(self.state)

    def finish_outputs(self) -> None:
        """Give the outputs their final names, recording first that they are being given
        them: a run stopped in between is finished by the next one's prepare()."""
        self.state["renaming"] = True
        self.sidecar.save(self.state)
        self.rename_outputs()
        self.mark_complete()

    def mark_complete(self) -> None:
        """Record the export complete: only once its outputs have their final names, so
        a run stopped before that finishes them instead of calling old ones complete."""
        self.state["complete"] = True
        self.sidecar.save(self.state)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.complete = True

    def archive_of(self, chunk: Chunk, path: Path) -> ChunkArchive:
        """The chunk's archive at ``path``, holding as many images as the job lists for it
        (where it lists a count), as iteration requires."""
        archive = ChunkArchive(path.read_bytes(), chunk_id=chunk.index)
        if chunk.image_count is not None and len(archive.samples) != chunk.image_count:
            raise count_mismatch(self.job.id, chunk.index, chunk.image_count, archive)
        return archive

    def offset_of(self, chunk: Chunk) -> int:
        """Images before ``chunk``: chunks are written in order, so all earlier ones are
        done and their counts recorded."""
        counts = self.state["counts"]
        return sum(
            int(counts.get(str(c.index), c.image_count or 0))
            for c in self.job.chunks
            if c.index < chunk.index
        )

    # Format-specific parts.
    def outputs_present(self) -> bool:
        raise NotImplementedError

    def resume(self, state: dict[str, Any]) -> bool:
        """Reopen the partial outputs of ``state``; False when they cannot be resumed."""
        raise NotImplementedError

    def reset(self) -> None:
        """Discard partial outputs and start them afresh (never the final ones)."""
        raise NotImplementedError

    def rename_outputs(self) -> None:
        """Move the complete partial outputs to their final names, over any earlier ones.
        Idempotent: what a stopped run already moved is passed over."""
        raise NotImplementedError


class _NumpyWriter(_StagedWriter):
    """``X.npy`` (N, H, W, C) uint8 filled chunk by chunk through a memory map, ``y.npy``
    (int64 label ids) and ``labels.json``; ``*.npy.part`` until every chunk is in.

    A job that lists no counts (other producers may omit them) cannot size the arrays up
    front: they grow by each chunk's rows as it is written, and where the job lists no
    image size either, the first image sets it (to_arrays() does the same in memory).

    With ``on_error="skip"`` an image that cannot be decoded is left out: its chunk's rows
    close up behind it, the arrays are cut to the rows written, and a warning names it."""

    name = "numpy"
    mode = "RGB"

    def __init__(
        self,
        dataset: Dataset,
        root: Path,
        image_size: tuple[int, int] | None,
        on_error: str = "raise",
    ) -> None:
        super().__init__(dataset, root)
        if unlabelled(self.job):
            raise ExportUsageError(
                f"job {self.job.id} lists no labels, so y.npy has no label ids to hold: use "
                "--format images (label folders and metadata.jsonl) or --format zip"
            )
        self.skip = on_error == "skip"
        size = image_size or self.job.image_size
        # The packer's null size: the images differ (a job of no images has none to differ).
        if size is None and self.counted and self.total_images:
            raise ExportUsageError(
                f"the images of job {self.job.id} differ in size, and numpy arrays need one: "
                "pass --image-size H W to resize them all (e.g. --image-size 224 224), or use "
                "--format images to keep the original files"
            )
        self.size = size
        # Resized only to the size asked for: an image of another size than the job lists
        # is refused by _decode_rows, never stretched into place without a word.
        self.decoder = ImageDecoder(self.mode, image_size)
        # (H, W, C) of every row; None until the first image where nothing gives the size.
        self.image_shape: tuple[int, ...] | None = (
            None if size is None else (size[0], size[1], self.decoder.channels)
        )
        self.rows = self.total_images  # X's rows: as listed, or (uncounted) written so far
        self.label_ids = {label: i for i, label in enumerate(self.job.labels)}
        self.x_path, self.y_path = root / "X.npy", root / "y.npy"
        self.labels_path = root / "labels.json"
        self.x_part = self.x_path.with_name("X.npy.part")
        self.y_part = self.y_path.with_name("y.npy.part")
        self.X: np.memmap[Any, Any] | None = None
        self.y: np.memmap[Any, Any] | None = None
        self.pool = ThreadPoolExecutor(
            config.DEFAULT_DECODE_THREADS, thread_name_prefix=f"{config.THREAD_PREFIX}decode"
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *(self.image_shape or (0, 0, self.decoder.channels)))

    def fingerprint(self) -> dict[str, Any]:
        if self.counted:
            shape: list[int | None] = list(self.shape)
        else:  # the rows are not known ahead, nor (without a size) the image shape
            height, width = self.size or (None, None)
            shape = [None, height, width, self.decoder.channels]
        skipping = {"on_error": "skip"} if self.skip else {}  # rows laid out another way
        return {**super().fingerprint(), "shape": shape, "mode": self.mode, **skipping}

    def outputs_present(self) -> bool:
        return all(p.exists() for p in (self.x_path, self.y_path, self.labels_path))

    def resume(self, state: dict[str, Any]) -> bool:
        try:
            X = np.lib.format.open_memmap(self.x_part, mode="r+")
            y = np.lib.format.open_memmap(self.y_part, mode="r+")
        except (OSError, ValueError):
            return False
        if X.dtype != np.uint8 or y.dtype != np.int64 or X.ndim != 4 or y.ndim != 1:
            return False
        if self.counted:
            # Or already cut to the images written, every chunk in (images skipped): a run
            # stopped in finish() between the cut and recording the renames.
            cut = self.all_in(set(state["done"])) and len(X) == _written(state)
            if X.shape[1:] != self.shape[1:] or len(y) != len(X):
                return False
            if len(X) != self.rows and not cut:
                return False
            self.rows = len(X)
        else:
            # Rows past those written are the chunk that was cut short (overwritten), and
            # a run stopped while growing the two (or out of disk) left one longer.
            rows = min(len(X), len(y))
            if rows < _written(state) or X.shape[3] != self.decoder.channels:
                return False
            if self.image_shape is not None and X.shape[1:] != self.image_shape:
                return False
            if X.shape[1]:  # else (0, 0, C): no image was decoded yet to set the size
                self.image_shape = X.shape[1:]
            self.rows = rows
        self.X, self.y = X, y
        return True

    def reset(self) -> None:
        # X.npy, y.npy and labels.json of an earlier run stay until finish() replaces them.
        if not self.counted:  # created with the first image, grown chunk by chunk
            self.x_part.unlink(missing_ok=True)
            self.y_part.unlink(missing_ok=True)
            self.X = self.y = None
            self.rows = 0
            if self.size is None:
                self.image_shape = None
            return
        self._with_room(self._allocate)

    def _allocate(self) -> None:
        self.X = np.lib.format.open_memmap(self.x_part, mode="w+", dtype=np.uint8, shape=self.shape)
        self.y = np.lib.format.open_memmap(
            self.y_part, mode="w+", dtype=np.int64, shape=self.shape[:1]
        )
        _reserve(self.x_part)
        _reserve(self.y_part)

    def _with_room(self, make: Callable[[], None]) -> None:
        """``make()`` the new arrays; if the disk is full and an earlier run's arrays are
        still here (kept until the new ones replace them), remove those and make again."""
        try:
            make()
            return
        except OSError as exc:
            earlier = [p for p in (self.x_path, self.y_path) if p.exists()]
            if exc.errno not in _DISK_FULL or not earlier:  # (EFBIG: removing would not help)
                raise
        self.X = self.y = None
        log.warning(
            "no room to keep the earlier %s until the new arrays are complete; removing %s",
            " and ".join(p.name for p in earlier),
            "them" if len(earlier) > 1 else "it",
        )
        for path in earlier:
            path.unlink(missing_ok=True)
        make()

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        archive = self.archive_of(chunk, path)
        samples = archive.samples
        offset = self.offset_of(chunk)
        if self.counted and offset + len(samples) > self.total_images:
            raise DecompressionError(
                f"job {self.job.id} lists {self.total_images:,} images but chunk {chunk.index} "
                f"ends at image {offset + len(samples):,}",
                chunk_id=chunk.index,
            )
        ids = [self._label_id(sample) for sample in samples]
        if not samples:
            self.mark_done(chunk, 0)
            return
        if not self.counted:
            if self.image_shape is None:  # no size given or listed: the first image's
                self.image_shape = self._first_shape(archive, samples)
            self._resize(offset + len(samples))
        if self.X is None or self.y is None:  # pragma: no cover - prepare() opened them
            raise RuntimeError("prepare() was not called")
        groups = [range(start, end) for start, end in group_bounds(len(samples))]
        futures = [
            self.pool.submit(self._decode_rows, self.X, archive, samples, rows, offset)
            for rows in groups
        ]
        bad: dict[int, DecompressionError] = {}
        try:
            for rows, future in zip(groups, futures, strict=True):
                bad.update(future.result())
                advance(len(rows))
        finally:
            for future in futures:
                future.cancel()
        good = [row for row in range(len(samples)) if row not in bad]
        for to, row in enumerate(good):  # close up behind the images left out
            if to != row:
                self.X[offset + to] = self.X[offset + row]
        self.y[offset : offset + len(good)] = [ids[row] for row in good]
        self.X.flush()
        self.y.flush()
        for row in sorted(bad):
            log.warning("skipped %s", bad[row].message)
        if bad:  # saved with the chunk by mark_done
            self.state["skipped"] = {**self.state.get("skipped", {}), str(chunk.index): len(bad)}
        self.mark_done(chunk, len(good))

    def _first_shape(self, archive: ChunkArchive, samples: list[Sample]) -> tuple[int, ...] | None:
        """The shape of the chunk's first image that decodes; None where (skipping) none
        does, so a later chunk's sets it. The undecodable ones are recorded as skipped by
        _decode_rows, as anywhere else."""
        for sample in samples:
            image = decode_sample(archive, sample, self.decoder)
            if isinstance(image, np.ndarray):
                return image.shape
            if not self.skip:
                raise image  # names the chunk and the image
        return None

    def _label_id(self, sample: Sample) -> int:
        try:
            return self.label_ids[sample.label]
        except KeyError:
            raise DecompressionError(
                f"chunk {sample.chunk_id}: image {sample.id!r} has label {sample.label!r}, "
                "which the job does not list",
                chunk_id=sample.chunk_id,
                sample_id=sample.id,
            ) from None

    def _decode_rows(
        self,
        X: np.memmap[Any, Any],
        archive: ChunkArchive,
        samples: list[Sample],
        rows: range,
        offset: int,
    ) -> dict[int, DecompressionError]:
        """Decode ``rows`` of the chunk into ``X``; return the rows skipped and why."""
        want = self.shape[1:]
        bad: dict[int, DecompressionError] = {}
        for row in rows:
            sample = samples[row]
            image = decode_sample(archive, sample, self.decoder)
            if not isinstance(image, np.ndarray):
                if self.skip:
                    bad[row] = image
                    continue
                raise image  # names the chunk and the image
            if image.shape != want and self.size is None:  # the first image set the size
                raise MixedImageSizesError(
                    f"chunk {sample.chunk_id}: image {sample.id!r} is {image.shape[1]}x"
                    f"{image.shape[0]} but earlier images are {want[1]}x{want[0]}: images of "
                    "different sizes cannot be stacked; pass --image-size H W to resize them "
                    "all, or use --format images to keep the original files",
                    chunk_id=sample.chunk_id,
                    sample_id=sample.id,
                )
            if image.shape != want:
                raise DecompressionError(
                    f"chunk {sample.chunk_id}: image {sample.id!r} is {image.shape[1]}x"
                    f"{image.shape[0]}, not {want[1]}x{want[0]} as the job says; pass "
                    "--image-size H W to resize every image",
                    chunk_id=sample.chunk_id,
                    sample_id=sample.id,
                )
            X[offset + row] = image
        return bad

    def _resize(self, rows: int) -> None:
        """Make ``X.npy.part`` and ``y.npy.part`` hold ``rows`` rows (an uncounted job's, at
        its first image and each chunk; cut to the rows written where images were skipped),
        remapped; rows written before stay as they are."""
        # (0, 0, C) while no image has set the size: a job of no images, or (skipping) of
        # none decoded yet; image_shape stays None so that the first that decodes sets it.
        image_shape = self.image_shape or (0, 0, self.decoder.channels)
        self.X = self.y = None  # unmapped while the files change

        # What the files hold now: a retry reserves all their growth, the failed try's too.
        held = [_size_of(self.x_part), _size_of(self.y_part)]

        def grow() -> None:
            _resize_npy(self.x_part, (rows, *image_shape), np.uint8, held[0])
            _resize_npy(self.y_part, (rows,), np.int64, held[1])

        self._with_room(grow)
        self.X = np.lib.format.open_memmap(self.x_part, mode="r+")
        self.y = np.lib.format.open_memmap(self.y_part, mode="r+")
        self.rows = rows

    def finish(self) -> None:
        if not self.counted or self.written() != self.rows:
            # Exact: made where no chunk held an image, cut where images were skipped.
            self._resize(self.written())
        if self.X is not None and self.y is not None:
            self.X.flush()
            self.y.flush()
        self.X = self.y = None  # unmapped before the rename
        self.check_complete()
        self.finish_outputs()

    def rename_outputs(self) -> None:
        # labels.json goes first and comes back last: a run stopped between the renames
        # leaves no labels.json, never one that names another version's label ids (a new
        # label sorted first read every y of the arrays still there as another class).
        with contextlib.suppress(FileNotFoundError):
            self.labels_path.unlink()
        for part, final in ((self.y_part, self.y_path), (self.x_part, self.x_path)):
            with contextlib.suppress(FileNotFoundError):  # renamed by a run that stopped
                os.replace(part, final)
        labels = json.dumps(list(self.job.labels), indent=1, ensure_ascii=False) + "\n"
        _write_atomic(self.labels_path, labels.encode("utf-8"))

    def describe(self) -> str:
        shape = ", ".join(str(n) for n in self.shape)
        return f"numpy: X.npy ({shape}) uint8, y.npy, labels.json"

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.X = self.y = None


class _ImagesWriter(_StagedWriter):
    """``<label>/<file>`` byte-identical to what was packed, plus ``metadata.jsonl``."""

    name = "images"

    def __init__(self, dataset: Dataset, root: Path) -> None:
        super().__init__(dataset, root)
        self.metadata_path = root / METADATA
        self.metadata_part = root / f"{METADATA}.part"
        self.used: set[str] = set()  # file names given so far, folded (_fold)
        self.folders: set[str] = set()  # and the folders they lie in, folded
        self._earlier: set[str] | None = None  # the files a complete earlier export lists
        self.reserved = {_fold(name) for name in RESERVED_NAMES}
        # The top folders of the labels the job lists: no unlabelled image's file takes
        # one's name, whichever comes first.
        self.label_tops = {
            _fold(_fitted(label.split("/")[0])) for label in self.job.labels if label
        }
        self.path_max: int | None = None  # bytes, read once the folder is there

    def outputs_present(self) -> bool:
        return self.metadata_path.exists()

    def resume(self, state: dict[str, Any]) -> bool:
        length = int(state.get("metadata_bytes", 0))
        try:
            with open(self.metadata_part, "r+b") as fh:
                if fh.seek(0, os.SEEK_END) < length:
                    return False
                fh.truncate(length)  # lines of a chunk that was not finished
                fh.seek(0)
                lines = fh.read().decode("utf-8").splitlines()
            self.used, self.folders = set(), set()
            for line in lines:
                self._claim(json.loads(line)["file"])
        # (AttributeError: a hand-edited "file" that is not text)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return False
        return True

    def reset(self) -> None:
        # The images only an unfinished run's listing names belong to no complete export;
        # those metadata.jsonl names stay until finish() replaces it (rename_outputs).
        self._remove_listed(self.metadata_part, keep=self.metadata_path)
        self.metadata_part.write_bytes(b"")
        self.state["metadata_bytes"] = 0
        self.used, self.folders = set(), set()

    def rename_outputs(self) -> None:
        if not self.metadata_part.exists():  # renamed by a run that stopped
            return
        # An earlier version's images that this one does not list go first: a run stopped
        # in between does it again, as the old listing is still there to say which.
        self._remove_listed(self.metadata_path, keep=self.metadata_part)
        os.replace(self.metadata_part, self.metadata_path)

    def _listed(self, listing: Path) -> list[str]:
        """The files a metadata.jsonl (or its .part) names; none if it cannot be read."""
        try:
            lines = listing.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return []
        files: list[str] = []
        for line in lines:
            try:
                file = json.loads(line)["file"]
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
            if isinstance(file, str):
                files.append(file)
        return files

    def _remove_listed(self, listing: Path, *, keep: Path) -> None:
        """Delete the image files ``listing`` names and ``keep`` does not, then the label
        folders left empty: what an earlier run wrote here that the outputs drop."""
        kept = set(self._listed(keep))
        by_case = {_fold(name): name for name in kept}
        root = self.root.resolve()
        folders: set[Path] = set()
        for name in self._listed(listing):
            if name in kept or _fold(name.split("/")[0]) in self.reserved:
                continue
            try:
                file = (root / name).resolve()
            except (OSError, ValueError):
                continue
            twin = by_case.get(_fold(name))  # the same file where names ignore case (or NFC)
            if twin is not None and _same_file(file, root / twin):
                continue
            # (A folder there now is the new version's: an old file's name became a label.)
            if file.is_relative_to(root) and file != root and not file.is_dir():
                file.unlink(missing_ok=True)
                folders.update(p for p in file.parents if p.is_relative_to(root) and p != root)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        archive = self.archive_of(chunk, path)
        lines: list[str] = []
        files: list[tuple[str, Sample]] = []  # (not their bytes: inflated, a chunk's worth)
        for position, sample in enumerate(archive.samples):
            data = archive.payload(sample)
            rel = self._target(sample, position)
            files.append((rel, sample))
            record = {
                "id": sample.id,
                "label": sample.label,
                "file": rel,
                "path": sample.path,
                "chunk": chunk.index,
                "width": sample.width,
                "height": sample.height,
                "sha256": sample.sha256 or hashlib.sha256(data).hexdigest(),
                "metadata": dict(sample.metadata),
            }
            lines.append(json.dumps(record, ensure_ascii=False, sort_keys=True))
        # The chunk's lines go in before its files: a run stopped among them leaves every
        # file it wrote named in the listing, past the length the sidecar holds. A rerun of
        # this version drops those lines and writes the chunk again; a start over for
        # another version removes what they name (unnamed, they outlived every version).
        with open(self.metadata_part, "ab") as fh:
            fh.write("".join(line + "\n" for line in lines).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            length = fh.tell()
        for rel, sample in files:
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(dest, archive.payload(sample), self.staging / _IMAGE_TEMP, sync=False)
            advance(1)
        self.mark_done(chunk, len(archive.samples), metadata_bytes=length)

    def _target(self, sample: Sample, position: int) -> str:
        """``<label>/<name>``: the member path when it lies under the label folder, as the
        packer's do, else its file name; never outside the output folder. An image with no
        label (another producer's) lies at the top, by its file name."""
        if sample.label == "":
            base = PurePosixPath(_safe_relative(sample.path, sample)).name
            return self._placed(sample, position, "", base)
        label = _safe_relative(sample.label, sample)
        if _fold(label.split("/")[0]) in self.reserved:
            raise DecompressionError(
                f"chunk {sample.chunk_id}: image {sample.id!r} has the label {label!r}, a name "
                "this folder keeps for the export itself",
                chunk_id=sample.chunk_id,
                sample_id=sample.id,
            )
        prefix = sample.label + "/"
        if sample.path.startswith(prefix):
            name = _safe_relative(sample.path[len(prefix) :], sample)
        else:
            name = PurePosixPath(_safe_relative(sample.path, sample)).name
        folder, _, base = f"{label}/{name}".rpartition("/")
        folder = "/".join(_fitted(part) for part in folder.split("/"))
        return self._placed(sample, position, folder, base)

    def _placed(self, sample: Sample, position: int, folder: str, base: str) -> str:
        """``folder/base`` ("" for the top), claimed, under a name no other file of the job
        has and that the file system takes."""
        rel = f"{folder}/{base}" if folder else base
        if self.path_max is None:
            self.path_max = _path_max(self.root)
        if (length := len(os.fsencode(self.root / rel))) > self.path_max:
            # Labels nested deep: no file system takes the path (it was exit 1, with the
            # whole path of 4 KB in the message, on every rerun).
            raise DecompressionError(
                f"chunk {sample.chunk_id}: image {shown(sample.id)} would be written at a "
                f"path of {length:,} bytes under its label {shown(sample.label)}, longer "
                f"than this file system allows ({self.path_max:,})",
                chunk_id=sample.chunk_id,
                sample_id=sample.id,
            )
        for parent in _prefixes(folder):
            if _fold(parent) in self.used:
                # A folder where an earlier image of the job is a file (another producer's
                # names, or one a case-blind file system folds together): no name serves.
                raise DecompressionError(
                    f"chunk {sample.chunk_id}: image {sample.id!r} would go into the folder "
                    f"{folder!r}, where another image of the job is a file of that name",
                    chunk_id=sample.chunk_id,
                    sample_id=sample.id,
                )
            if _fold(parent) not in self.folders:  # (one an earlier image made is clear)
                self._clear_stale(parent)
        # Two paths, one file name (or one but for case); a file named as a folder of
        # another image's; or a name too long for a file system (another producer's: the
        # packer packs only files that had their names).
        # An image at the top named as the export's own files (metadata.jsonl, or a temp
        # file a rerun sweeps away) too.
        if (
            self._taken(rel)
            or len(base.encode()) > config.MAX_NAME_BYTES
            or (not folder and self._kept_back(base))
        ):
            for n in itertools.count():
                tag = f"~{sample.chunk_id}-{position}" + (f"-{n}" if n else "")
                name = _tagged(base, tag)
                rel = f"{folder}/{name}" if folder else name
                if not self._taken(rel):  # a file of the job may bear it too
                    break
        self._claim(rel)
        return rel

    def _kept_back(self, name: str) -> bool:
        """Whether a file at the top may not be named ``name``: the export's own files, a
        temp file a rerun sweeps away, a listed label's folder."""
        folded = _fold(name)
        return (
            folded in self.reserved or folded in self.label_tops or bool(_TEMP_FILE.fullmatch(name))
        )

    def _taken(self, rel: str) -> bool:
        """Whether ``rel`` is another image's file or folder, or a folder already there (an
        earlier version's, say)."""
        folded = _fold(rel)
        return folded in self.used or folded in self.folders or (self.root / rel).is_dir()

    def _clear_stale(self, folder: str) -> None:
        """Delete a file where this job needs the folder ``folder`` if the earlier version's
        listing names it: it goes when the new listing takes its name, and is in the way
        now (a label of the new version named as an image of the old)."""
        path = self.root / folder
        if path.is_dir() or not (path.exists() or path.is_symlink()):
            return
        if self._earlier is None:
            self._earlier = {_fold(name) for name in self._listed(self.metadata_path)}
        if _fold(folder) in self._earlier:
            path.unlink()

    def _claim(self, rel: str) -> None:
        """Record the file ``rel`` and the folders it lies in as given."""
        folder = rel.rpartition("/")[0]
        self.used.add(_fold(rel))
        self.folders.update(_fold(parent) for parent in _prefixes(folder))

    def finish(self) -> None:
        self.check_complete()
        self.finish_outputs()

    def describe(self) -> str:
        return "images: <label>/<file>, metadata.jsonl"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is gone
        return False


def _prefixes(folder: str) -> list[str]:
    """``a/b/c`` -> ``a``, ``a/b``, ``a/b/c``."""
    parts = folder.split("/") if folder else []
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _tagged(name: str, tag: str) -> str:
    """``name`` with ``tag`` before its extension (``a.png`` -> ``a~0-3.png``), the stem cut
    so that the result fits in a file name (``config.MAX_NAME_BYTES``), as ``name`` may
    have only just fitted. An extension too long to keep is cut as part of the stem."""
    pure = PurePosixPath(name)
    stem, suffix = pure.stem, pure.suffix
    room = config.MAX_NAME_BYTES - len(tag.encode()) - len(suffix.encode())
    if room < 1:
        stem, suffix = name, ""
        room = config.MAX_NAME_BYTES - len(tag.encode())
    return f"{_cut(stem, room)}{tag}{suffix}"


def _path_max(root: Path) -> int:
    """The longest path, in bytes, the file system under ``root`` takes."""
    try:
        return min(config.MAX_PATH_BYTES, os.pathconf(root, "PC_PATH_MAX") - 1)
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no limit
        return config.MAX_PATH_BYTES


def _fitted(folder: str) -> str:
    """The folder name ``folder`` if a file system takes it, else cut to fit with a hash of
    the whole appended (a label of 90 CJK characters is 270 bytes): one name per label,
    and two labels that share their first 240 bytes still two folders."""
    if len(folder.encode()) <= config.MAX_NAME_BYTES:
        return folder
    tag = "~" + hashlib.sha256(folder.encode()).hexdigest()[:12]
    return _cut(folder, config.MAX_NAME_BYTES - len(tag)) + tag


def _cut(text: str, room: int) -> str:
    """``text`` cut to at most ``room`` bytes of UTF-8, on a character boundary (a sequence
    cut short would not decode)."""
    return text.encode()[:room].decode(errors="ignore")


def _safe_relative(text: str, sample: Sample) -> str:
    """``text`` as a relative POSIX path that cannot leave the folder it is joined to, and
    that a file system can be given (no lone surrogate, which UTF-8 cannot encode)."""
    parts = text.split("/")
    unsafe = (
        not text
        or not _encodable(text)
        or text.startswith("/")
        or "\\" in text
        or "\x00" in text
        or (len(text) > 1 and text[1] == ":")
        or any(part in ("", ".", "..") for part in parts)
    )
    if unsafe:
        raise DecompressionError(
            f"chunk {sample.chunk_id}: image {sample.id!r} names the unsafe path or label {text!r}",
            chunk_id=sample.chunk_id,
            sample_id=sample.id,
        )
    return text


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def make_writer(
    fmt: str,
    dataset: Dataset,
    root: Path,
    image_size: tuple[int, int] | None,
    on_error: str = "raise",
) -> Writer:
    if fmt == "numpy":
        return _NumpyWriter(dataset, root, image_size, on_error)
    if fmt == "images":
        return _ImagesWriter(dataset, root)
    return _ZipWriter(dataset, root)
