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
import json
import logging
import os
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from . import config
from .archive import ChunkArchive, Sample
from .cache import _lock_fd
from .dataset import Dataset, decode_sample, group_bounds, num_images_of
from .decode import ImageDecoder
from .downloader import ChunkDownloader, TransferStats
from .exceptions import DecompressionError
from .models import Chunk, Job
from .units import human_size

log = logging.getLogger("pixcrawler")

FORMATS = ("numpy", "images", "zip")
SIDECAR = ".progress.json"
STAGING_DIR = ".partial"  # chunk archives in transit for the numpy and images formats
_HASH_BLOCK = 1 << 20
_PROGRESS_REFRESH = 0.2  # seconds between refreshes of the bytes bar


class ExportUsageError(ValueError):
    """The job cannot be written as asked (e.g. numpy arrays of images of mixed sizes)."""


@contextlib.contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """Hold ``root``'s lock (``.<name>.lock`` beside it) for the block: two downloads into
    one folder would append to the same ``.part`` files and share the staging folder.
    Where the file system has no locks, the block runs unlocked."""
    root.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(root.with_name(f".{root.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            _lock_fd(fd, wait=False)
        except BlockingIOError:
            raise ExportUsageError(
                f"another download is writing to {root}; wait for it to end, or choose "
                "another --output-dir"
            ) from None
        except OSError:  # ENOLCK and the like: no locks here
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def transfer(
    dataset: Dataset,
    writer: Writer,
    todo: list[Chunk],
    window: int,
    progress: Progress,
) -> None:
    """Fetch ``todo`` with up to ``window`` chunks in flight; process them in order."""
    downloader = dataset.downloader()
    pool = ThreadPoolExecutor(window, thread_name_prefix="pixcrawler-fetch")
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
            path = future.result()
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
        if _intact(path, chunk):
            return path
        log.warning("%s is corrupt or stale; downloading it again", path)
        path.unlink()
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
            total=writer.total_images,
            initial=writer.done_images,
            desc=f"{job_id} images",
            unit="img",
            position=1,
            dynamic_ncols=True,
        )
        self._thread = threading.Thread(
            target=self._refresh_loop, name="pixcrawler-progress", daemon=True
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
        self.total_images = num_images_of(self.job)
        self.done_images = 0
        self.complete = False

    def prepare(self) -> list[Chunk]:
        """Create what is needed, read what an earlier run left; the chunks still to do."""
        raise NotImplementedError

    def chunk_path(self, chunk: Chunk) -> Path:
        raise NotImplementedError

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


class _ZipWriter(Writer):
    """``chunks/00000.zip`` ...: the archives as served. A verified file is kept as is."""

    name = "zip"

    def prepare(self) -> list[Chunk]:
        folder = self.root / "chunks"
        folder.mkdir(parents=True, exist_ok=True)
        listed = {self.chunk_path(chunk).name for chunk in self.job.chunks}
        for leftover in [*folder.glob("*.zip"), *folder.glob("*.zip.part")]:
            if leftover.name.removesuffix(".part") not in listed:  # an earlier version's
                leftover.unlink(missing_ok=True)
        todo: list[Chunk] = []
        for chunk in sorted(self.job.chunks, key=_index):
            path = self.chunk_path(chunk)
            if path.exists() and _intact(path, chunk):
                self.done_images += chunk.image_count or 0
            else:
                todo.append(chunk)
        self.complete = not todo
        return todo

    def chunk_path(self, chunk: Chunk) -> Path:
        return self.root / "chunks" / f"{chunk.index:05d}.zip"

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        advance(chunk.image_count or 0)

    def finish(self) -> None:
        self.complete = True

    def describe(self) -> str:
        return "zip: chunks/00000.zip ..."


class _Sidecar:
    """``.progress.json``: per format, the fingerprint of the job and the chunks written."""

    def __init__(self, root: Path, section: str) -> None:
        self.path = root / SIDECAR
        self.section = section

    def load(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        state = data.get(self.section) if isinstance(data, dict) else None
        return state if isinstance(state, dict) else None

    def save(self, state: dict[str, Any]) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
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


def _reserve(path: Path) -> None:
    """Allocate a sparse file's blocks now, so a full disk is a clean error here rather than
    a SIGBUS when a memory-mapped page is first written."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:  # pragma: no cover - macOS, Windows
        return
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            allocate(fh.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise OSError(
                    exc.errno, f"no room for {human_size(size)} in {path}: {exc.strerror}"
                ) from None
            # EOPNOTSUPP and the like: the file system cannot say; carry on.


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
        fingerprint = self.fingerprint()
        state = self.sidecar.load()
        if _valid_state(state) and state is not None and state["fingerprint"] == fingerprint:
            if state.get("complete") and self.outputs_present():
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

    def start_over(self, fingerprint: dict[str, Any]) -> None:
        self.state = {"fingerprint": fingerprint, "done": [], "counts": {}, "complete": False}
        shutil.rmtree(self.staging, ignore_errors=True)
        self.reset()
        self.sidecar.save(self.state)

    def mark_done(self, chunk: Chunk, count: int, **extra: Any) -> None:
        self.state["done"].append(chunk.index)
        self.state["counts"][str(chunk.index)] = count
        self.state.update(extra)
        self.sidecar.save(self.state)

    def check_complete(self) -> None:
        """Every chunk written, as many images as the job lists: the outputs may take
        their final names."""
        missing = [c.index for c in self.job.chunks if c.index not in set(self.state["done"])]
        if missing:  # pragma: no cover - the transfer loop processes every chunk
            raise RuntimeError(f"chunks {missing} were not written")
        written = sum(int(n) for n in self.state["counts"].values())
        if written != self.total_images:
            raise DecompressionError(
                f"job {self.job.id} lists {self.total_images:,} images but its chunks hold "
                f"{written:,}"
            )

    def mark_complete(self) -> None:
        """Record the export complete: only once its outputs have their final names, so
        a run stopped before that finishes them instead of calling old ones complete."""
        self.state["complete"] = True
        self.sidecar.save(self.state)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.complete = True

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
        """Discard partial outputs and start them afresh."""
        raise NotImplementedError


class _NumpyWriter(_StagedWriter):
    """``X.npy`` (N, H, W, C) uint8 filled chunk by chunk through a memory map, ``y.npy``
    (int64 label ids) and ``labels.json``; ``*.npy.part`` until every chunk is in."""

    name = "numpy"
    mode = "RGB"

    def __init__(self, dataset: Dataset, root: Path, image_size: tuple[int, int] | None) -> None:
        super().__init__(dataset, root)
        size = image_size or self.job.image_size
        if size is None:
            raise ExportUsageError(
                f"the images of job {self.job.id} differ in size, and numpy arrays need one: "
                "pass --image-size H W to resize them all (e.g. --image-size 224 224), or use "
                "--format images to keep the original files"
            )
        self.decoder = ImageDecoder(self.mode, size)
        self.shape = (self.total_images, size[0], size[1], self.decoder.channels)
        self.label_ids = {label: i for i, label in enumerate(self.job.labels)}
        self.x_path, self.y_path = root / "X.npy", root / "y.npy"
        self.labels_path = root / "labels.json"
        self.x_part = self.x_path.with_name("X.npy.part")
        self.y_part = self.y_path.with_name("y.npy.part")
        self.X: np.memmap[Any, Any] | None = None
        self.y: np.memmap[Any, Any] | None = None
        self.pool = ThreadPoolExecutor(
            config.DEFAULT_DECODE_THREADS, thread_name_prefix="pixcrawler-decode"
        )

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "shape": list(self.shape), "mode": self.mode}

    def outputs_present(self) -> bool:
        return all(p.exists() for p in (self.x_path, self.y_path, self.labels_path))

    def resume(self, state: dict[str, Any]) -> bool:
        try:
            X = np.lib.format.open_memmap(self.x_part, mode="r+")
            y = np.lib.format.open_memmap(self.y_part, mode="r+")
        except (OSError, ValueError):
            return False
        if X.shape != self.shape or X.dtype != np.uint8 or y.shape != self.shape[:1]:
            return False
        if y.dtype != np.int64:
            return False
        self.X, self.y = X, y
        return True

    def reset(self) -> None:
        for old in (self.x_path, self.y_path, self.labels_path):  # another version's
            old.unlink(missing_ok=True)
        self.X = np.lib.format.open_memmap(self.x_part, mode="w+", dtype=np.uint8, shape=self.shape)
        self.y = np.lib.format.open_memmap(
            self.y_part, mode="w+", dtype=np.int64, shape=self.shape[:1]
        )
        _reserve(self.x_part)
        _reserve(self.y_part)

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        if self.X is None or self.y is None:  # pragma: no cover - prepare() opened them
            raise RuntimeError("prepare() was not called")
        archive = ChunkArchive(path.read_bytes(), chunk_id=chunk.index)
        samples = archive.samples
        offset = self.offset_of(chunk)
        if offset + len(samples) > self.total_images:
            raise DecompressionError(
                f"job {self.job.id} lists {self.total_images:,} images but chunk {chunk.index} "
                f"ends at image {offset + len(samples):,}",
                chunk_id=chunk.index,
            )
        ids = [self._label_id(sample) for sample in samples]
        groups = [range(start, end) for start, end in group_bounds(len(samples))]
        futures = [
            self.pool.submit(self._decode_rows, self.X, archive, samples, rows, offset)
            for rows in groups
        ]
        try:
            for rows, future in zip(groups, futures, strict=True):
                future.result()
                advance(len(rows))
        finally:
            for future in futures:
                future.cancel()
        self.y[offset : offset + len(samples)] = ids
        self.X.flush()
        self.y.flush()
        self.mark_done(chunk, len(samples))

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
    ) -> None:
        want = self.shape[1:]
        for row in rows:
            sample = samples[row]
            image = decode_sample(archive, sample, self.decoder)
            if not isinstance(image, np.ndarray):
                raise image  # names the chunk and the image
            if image.shape != want:
                raise DecompressionError(
                    f"chunk {sample.chunk_id}: image {sample.id!r} is {image.shape[1]}x"
                    f"{image.shape[0]}, not {want[1]}x{want[0]} as the job says; pass "
                    "--image-size H W to resize every image",
                    chunk_id=sample.chunk_id,
                    sample_id=sample.id,
                )
            X[offset + row] = image

    def finish(self) -> None:
        if self.X is not None and self.y is not None:
            self.X.flush()
            self.y.flush()
        self.X = self.y = None  # unmapped before the rename
        self.check_complete()
        labels = json.dumps(list(self.job.labels), indent=1, ensure_ascii=False) + "\n"
        _write_atomic(self.labels_path, labels.encode("utf-8"))
        os.replace(self.y_part, self.y_path)
        os.replace(self.x_part, self.x_path)
        self.mark_complete()

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
        self.metadata_path = root / "metadata.jsonl"
        self.metadata_part = root / "metadata.jsonl.part"
        self.used: set[str] = set()  # file names given so far, casefolded
        names = (STAGING_DIR, SIDECAR, self.metadata_path.name, self.metadata_part.name)
        self.reserved = {name.casefold() for name in names}

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
            self.used = {json.loads(line)["file"].casefold() for line in lines}
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return True

    def reset(self) -> None:
        self._remove_listed(self.metadata_path)  # another version's images and listing
        self._remove_listed(self.metadata_part)
        self.metadata_part.write_bytes(b"")
        self.state["metadata_bytes"] = 0
        self.used = set()

    def _remove_listed(self, listing: Path) -> None:
        """Delete the image files a metadata.jsonl (or its .part) names, then it, then the
        label folders left empty: what an earlier version of the job wrote here."""
        try:
            lines = listing.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return
        root = self.root.resolve()
        folders: set[Path] = set()
        for line in lines:
            try:
                file = (root / json.loads(line)["file"]).resolve()
            except (ValueError, KeyError, TypeError, OSError):
                continue
            if file.is_relative_to(root) and file != root:
                file.unlink(missing_ok=True)
                folders.update(p for p in file.parents if p.is_relative_to(root) and p != root)
        listing.unlink(missing_ok=True)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        archive = ChunkArchive(path.read_bytes(), chunk_id=chunk.index)
        lines: list[str] = []
        for position, sample in enumerate(archive.samples):
            data = archive.payload(sample)
            rel = self._target(sample, position)
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.part")
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
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
            advance(1)
        with open(self.metadata_part, "ab") as fh:
            fh.write("".join(line + "\n" for line in lines).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            length = fh.tell()
        self.mark_done(chunk, len(archive.samples), metadata_bytes=length)

    def _target(self, sample: Sample, position: int) -> str:
        """``<label>/<name>``: the member path when it lies under the label folder, as the
        packer's do, else its file name; never outside the output folder."""
        label = _safe_relative(sample.label, sample)
        if label.split("/")[0].casefold() in self.reserved:
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
        rel = f"{label}/{name}"
        if rel.casefold() in self.used:  # two paths, one file name (or one but for case)
            pure = PurePosixPath(name)
            base = f"{label}/{pure.stem}~{sample.chunk_id}-{position}"
            rel, n = f"{base}{pure.suffix}", 1
            while rel.casefold() in self.used:  # a file of the job may bear that name too
                rel, n = f"{base}-{n}{pure.suffix}", n + 1
        self.used.add(rel.casefold())
        return rel

    def finish(self) -> None:
        self.check_complete()
        os.replace(self.metadata_part, self.metadata_path)
        self.mark_complete()

    def describe(self) -> str:
        return "images: <label>/<file>, metadata.jsonl"


def _safe_relative(text: str, sample: Sample) -> str:
    """``text`` as a relative POSIX path that cannot leave the folder it is joined to."""
    parts = text.split("/")
    unsafe = (
        not text
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


def make_writer(
    fmt: str, dataset: Dataset, root: Path, image_size: tuple[int, int] | None
) -> Writer:
    if fmt == "numpy":
        return _NumpyWriter(dataset, root, image_size)
    if fmt == "images":
        return _ImagesWriter(dataset, root)
    return _ZipWriter(dataset, root)
