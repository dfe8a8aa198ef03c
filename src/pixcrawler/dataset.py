"""The user's object: a lazily loaded job, iterated image by image, in batches or whole.

``Dataset`` composes the client (metadata), the downloader (chunk bytes), the archive
(members) and the decoder (pixels). It never speaks HTTP itself.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import numbers
import os
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, cast, overload

import numpy as np

from . import cleanup, config
from .archive import ChunkArchive, Sample
from .auth import resolve_api_key, resolve_base_url
from .client import ApiClient
from .decode import ImageBuffers, ImageDecoder, import_decoders, validate_image_size
from .downloader import ChunkDownloader, TransferStats
from .exceptions import (
    DecompressionError,
    DownloadError,
    MixedImageSizesError,
    PixCrawlerError,
)
from .models import Chunk, Job
from .retry import RetryPolicy
from .units import counted, human_size, parse_time

if TYPE_CHECKING:
    import pandas as pd
    import tensorflow as tf

    from .cache import CacheDir
    from .loaders import TorchDataset, TorchIterableDataset

log = logging.getLogger("pixcrawler")

ImageSize = tuple[int, int]
# A batch of a job that lists no counts starts at this many rows and grows as it fills,
# so a huge batch_size costs no more memory than the images it gets.
_UNCOUNTED_ROWS = 256


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a job, as ``pixcrawler info`` prints it."""

    id: str
    name: str
    status: str
    progress: float
    num_images: int
    num_chunks: int
    chunk_size: int
    size_bytes: int
    labels: tuple[str, ...]
    created_at: datetime | None
    completed_at: datetime | None
    image_size: ImageSize | None
    version: int
    # False for a job that lists no image counts (other producers may omit them):
    # num_images is then 0 and printed as unknown.
    counts_listed: bool = True
    # False for a job that lists its size neither whole nor for every chunk: size_bytes is
    # then what the chunks list (0 if none) and printed as unknown.
    size_listed: bool = True

    @classmethod
    def from_job(cls, job: Job) -> DatasetInfo:
        return cls(
            id=job.id,
            name=job.name,
            status=job.status,
            progress=job.progress,
            num_images=num_images_of(job),
            num_chunks=len(job.chunks),
            chunk_size=job.chunk_size,
            size_bytes=job.size_bytes or sum(c.size_bytes or 0 for c in job.chunks),
            size_listed=size_listed(job),
            labels=job.labels,
            created_at=parse_time(job.created_at),
            completed_at=parse_time(job.completed_at),
            image_size=job.image_size,
            version=job.version,
            counts_listed=counts_listed(job),
        )

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def __str__(self) -> str:
        created = self.created_at.strftime("%Y-%m-%d %H:%M:%S") if self.created_at else "-"
        noun = "class" if len(self.labels) == 1 else "classes"
        return "\n".join(
            [
                f"Dataset: {self.id}",
                f"Status: {self.status}",
                f"Images: {self.num_images:,}" if self.counts_listed else "Images: unknown",
                f"Chunks: {self.num_chunks:,}",
                f"Size: {human_size(self.size_bytes)}" if self.size_listed else "Size: unknown",
                f"Created: {created}",
                f"Labels: {', '.join(self.labels) or '-'} ({len(self.labels)} {noun})",
            ]
        )


@dataclass
class DatasetStats:
    """What a dataset has done so far: read it to see why a first batch is slow.

    The counts add up over every pass (an epoch of ``to_tensorflow()`` is a pass), and
    ``skipped_ids`` names each skipped image once, in the order first skipped.
    ``wait_seconds`` is the time the consumer spent waiting for data (download or decode);
    ``first_image_seconds`` the time from the start of iteration to the first image (for
    map-style ``to_torch()``, from the process's first item). With DataLoader workers,
    each worker process keeps its own.
    """

    images: int = 0
    skipped: int = 0
    skipped_ids: list[str] = field(default_factory=list)
    _skipped_seen: set[str] = field(default_factory=set, repr=False, compare=False)
    chunks: int = 0
    wait_seconds: float = 0.0
    first_image_seconds: float | None = None
    transfer: TransferStats = field(default_factory=TransferStats)

    @property
    def bytes_downloaded(self) -> int:
        return self.transfer.bytes_received

    def __str__(self) -> str:
        first = "-" if self.first_image_seconds is None else f"{self.first_image_seconds:.2f} s"
        return (
            f"{counted(self.images, 'image')}, {self.skipped:,} skipped, "
            f"{counted(self.chunks, 'chunk')}, "
            f"{human_size(self.transfer.bytes_received)} received, "
            f"{self.transfer.retries} retries, first image after {first}, "
            f"waited {self.wait_seconds:.2f} s"
        )


@dataclass(frozen=True)
class ClientSettings:
    """What a worker process needs to open its own client (nothing live, so it pickles)."""

    api_key: str
    base_url: str
    timeout: float
    verify_ssl: bool
    retry: RetryPolicy
    max_workers: int

    def connect(self) -> ApiClient:
        with warnings.catch_warnings():
            if not self.verify_ssl:  # warned once, when the user asked for it
                warnings.simplefilter("ignore")
            return ApiClient(
                self.api_key,
                self.base_url,
                timeout=self.timeout,
                verify_ssl=self.verify_ssl,
                retry=self.retry,
                pool_size=self.max_workers,
            )

    def __repr__(self) -> str:
        return f"ClientSettings(base_url={self.base_url!r})"


class Dataset:
    """A completed PixCrawler job, loaded lazily. Create it with :func:`load_dataset`.

    Nothing is downloaded until you iterate. Chunks stream through memory: at most
    ``prefetch`` chunks are held ahead of the one being decoded, and each is released
    once its images have been yielded.

    Example:
        >>> with load_dataset("job_123", api_key="key") as dataset:
        ...     for images, labels in dataset.iter_batches(batch_size=64):
        ...         train(images, labels)
    """

    def __init__(
        self,
        job: Job,
        settings: ClientSettings,
        *,
        client: ApiClient | None = None,
        prefetch: int = config.DEFAULT_PREFETCH,
        mode: str = "RGB",
        image_size: ImageSize | None = None,
        on_error: str = "raise",
        decode_threads: int | None = None,
        progress: bool = False,
    ) -> None:
        self.image_size = check_options(
            prefetch=prefetch,
            mode=mode,
            image_size=image_size,
            on_error=on_error,
            decode_threads=decode_threads,
        )
        self.job = job
        self.settings = settings
        self.prefetch = prefetch
        self.mode = mode
        self.on_error = on_error
        self.decode_threads = decode_threads or config.DEFAULT_DECODE_THREADS
        self.progress = progress
        self.stats = DatasetStats()
        self._client = client
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        # Weak, as _views: a downloader dropped unclosed (a map-style torch dataset's, say)
        # is freed with its chunk buffers instead of living as long as this dataset.
        self._downloaders: weakref.WeakSet[ChunkDownloader] = weakref.WeakSet()
        self._pools: weakref.WeakSet[ThreadPoolExecutor] = weakref.WeakSet()  # decoding now
        self._views: weakref.WeakSet[Any] = weakref.WeakSet()  # to_torch()'s datasets
        self._closed = False

    # -- metadata ----------------------------------------------------------------------------

    @property
    def info(self) -> DatasetInfo:
        """Dataset metadata and statistics."""
        return DatasetInfo.from_job(self.job)

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names; a label's integer id is its position here."""
        return self.job.labels

    @property
    def num_images(self) -> int:
        """Total number of images in the dataset (0 if the job lists no counts; ``len()``
        then raises TypeError, as for any iterable of unknown length)."""
        return num_images_of(self.job)

    @property
    def num_chunks(self) -> int:
        """Total number of chunks."""
        return len(self.job.chunks)

    @property
    def chunk_size(self) -> int:
        """Images per chunk (typically 500)."""
        return self.job.chunk_size

    def __len__(self) -> int:
        if not counts_listed(self.job):
            # 0 would be a lie (and make `if dataset:` false): unsized, as a generator is.
            raise TypeError(
                f"job {self.job.id} lists no image counts: its length is unknown until "
                "it is iterated"
            )
        return self.num_images

    def __bool__(self) -> bool:
        return not counts_listed(self.job) or self.num_images > 0

    def __repr__(self) -> str:
        return (
            f"Dataset(id={self.job.id!r}, name={self.job.name!r}, images={self.num_images}, "
            f"chunks={self.num_chunks}, labels={len(self.labels)}, "
            f"base_url={self.settings.base_url!r})"
        )

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        """Yield ``(image, label)``: an ``(H, W, C)`` uint8 array and the label name.

        Example:
            >>> for image, label in dataset:
            ...     process(image, label)
        """
        image: np.ndarray | None = None
        try:
            for sample, image in self.iter_samples():
                yield image, sample.label
        except BaseException:
            image = None  # (an error a caller keeps would keep the last image, in this frame)
            raise

    def iter_samples(
        self,
        image_size: ImageSize | None = None,
        chunks: list[int] | None = None,
        *,
        keeps: bool = False,
    ) -> Iterator[tuple[Sample, np.ndarray]]:
        """Yield ``(sample, image)`` with the sample's id, path and metadata.

        Images decode into reusable buffers (:class:`~pixcrawler.decode.ImageBuffers`): one
        the caller drops is written again later, one it keeps stays its own. ``keeps=True``
        says the caller keeps every image: each then gets an array of its exact size.
        """
        size = validate_image_size(image_size) if image_size is not None else self.image_size
        # Fresh arrays fault their pages in again image after image (~100k page faults in
        # a process's first pass over 5,000 photos, ~5% of its throughput).
        buffers = None if keeps else ImageBuffers()
        samples = self._decoded(ImageDecoder(self.mode, size, buffers=buffers), chunks)
        item: tuple[Sample, np.ndarray] | None = None
        try:
            if not self.progress:
                yield from samples
                return
            from tqdm.auto import tqdm

            total = self.num_images if counts_listed(self.job) else None
            with (
                contextlib.closing(samples),  # an early break stops the downloads now
                tqdm(total=total, unit="img", desc=self.job.id) as bar,
                _bar_postfix(bar, self.stats) as postfix,
                _logged_above_bars(),
            ):
                for item in samples:
                    yield item
                    bar.update()
                postfix()  # the skips at the end, shown as the bar closes
        except BaseException as exc:
            # The frames of an error's traceback keep the decoder, and its buffers with it,
            # for as long as the caller keeps the error (a notebook keeps the last one); a
            # chunk's error, that chunk's bytes and the last decode group's images too.
            item = None  # (with progress: the last image)
            if buffers is not None:
                buffers.forget()
            release_left(exc)
            raise

    def iter_batches(
        self,
        batch_size: int = 32,
        drop_last: bool = False,
        *,
        image_size: ImageSize | None = None,
    ) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Yield ``(images, labels)``: a ``(B, H, W, C)`` uint8 array and B label names.

        Each batch is a new array allocated once, at its full size or at the images left
        when fewer (a job that lists no image counts: grown as it fills). Images of
        different sizes need ``image_size=(H, W)``; without it they raise
        :class:`MixedImageSizesError`.

        Example:
            >>> for images, labels in dataset.iter_batches(batch_size=64):
            ...     train_model(images, labels)
        """
        positive_int("batch_size", batch_size)  # here, not at the first next()
        size = validate_image_size(image_size) if image_size is not None else None
        return self._batches(int(batch_size), drop_last, size)

    def _batches(
        self, batch_size: int, drop_last: bool, image_size: ImageSize | None
    ) -> Iterator[tuple[np.ndarray, list[str]]]:
        # Images still to come, if the job says: a batch is never larger than that.
        left = self.num_images if counts_listed(self.job) else None
        batch: np.ndarray | None = None
        image: np.ndarray | None = None
        labels: list[str] = []
        try:
            for sample, image in self.iter_samples(image_size):
                if batch is None:
                    rows = min(batch_size, _UNCOUNTED_ROWS if left is None else max(1, left))
                    batch = np.empty((rows, *image.shape), dtype=np.uint8)
                elif len(labels) == len(batch):  # a job listing no counts: up to batch_size
                    batch = _grown(batch, limit=batch_size)
                _put(batch, len(labels), image, sample)
                labels.append(sample.label)
                if len(labels) == batch_size:
                    yield batch, labels
                    batch, labels = None, []
                    left = None if left is None else left - batch_size
        except BaseException:
            batch = image = None  # not kept, for as long as the caller keeps the error
            raise
        if labels and batch is not None and not drop_last:
            if len(batch) > len(labels):  # images skipped, or a job that lists no counts:
                # shrunk in place, as to_arrays() does; a view would keep every row allocated
                batch.resize((len(labels), *batch.shape[1:]), refcheck=False)
            yield batch, labels

    def to_arrays(self, *, image_size: ImageSize | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Load the whole dataset: ``X`` of shape (N, H, W, C) uint8 and ``y`` label names.

        Warning: this holds every image in memory. ``X`` is allocated once at its final size
        and filled chunk by chunk (no list-then-stack doubling); for a job that lists no
        image counts it grows by half again whenever it is full, and is shrunk in place to
        the images it holds.

        Example:
            >>> X, y = dataset.to_arrays()
            >>> X_train, X_test, y_train, y_test = train_test_split(X, y)
        """
        total = self.num_images
        images: np.ndarray | None = None
        image: np.ndarray | None = None
        labels: list[str] = []
        try:
            for sample, image in self.iter_samples(image_size):
                if images is None:
                    images = _allocated_images(self.job.id, total, image.shape)
                if len(labels) >= len(images):  # a job that lists no counts (the listed
                    images = _grown(images)  # ones are checked as chunks open): X grows
                _put(images, len(labels), image, sample)
                labels.append(sample.label)
        except BaseException:
            images = image = None  # not kept, for as long as the caller keeps the error
            raise
        if images is None:  # nothing decoded: the shape the images would have had
            channels = ImageDecoder(self.mode).channels
            size = validate_image_size(image_size) if image_size is not None else None
            height, width = size or self.image_size or self.job.image_size or (0, 0)
            images = np.empty((0, height, width, channels), dtype=np.uint8)
        elif len(labels) < len(images):  # images skipped, or a job that lists no counts
            # Shrunk in place (realloc), not sliced: a view would keep every row allocated.
            images.resize((len(labels), *images.shape[1:]), refcheck=False)
        return images, np.array(labels, dtype=str)

    def to_dataframe(self) -> pd.DataFrame:
        """A DataFrame with columns ``image`` (arrays), ``label`` and ``metadata`` (dicts).

        Example:
            >>> df = dataset.to_dataframe()
            >>> df[df["label"] == "cat"]
        """
        from .loaders import require

        pandas = require("pandas", "pandas")
        rows: dict[str, list[Any]] = {"image": [], "label": [], "metadata": []}
        for sample, image in self.iter_samples(keeps=True):
            rows["image"].append(image)
            rows["label"].append(sample.label)
            rows["metadata"].append(sample_metadata(sample, image))
        frame = pandas.DataFrame(rows)
        if not rows["label"]:  # no rows: the dtypes rows would give, not float64
            text = pandas.Series([""]).dtype  # pandas' own for strings (str, or object)
            frame = frame.astype({"image": object, "label": text, "metadata": object})
        return cast("pd.DataFrame", frame)

    @overload
    def to_torch(
        self,
        transform: Callable[[Any], Any] | None = None,
        *,
        streaming: Literal[False] = False,
        image_size: ImageSize | None = None,
        cache_dir: CacheDir = None,
        memory_budget: int | None = None,
    ) -> TorchDataset: ...

    @overload
    def to_torch(
        self,
        transform: Callable[[Any], Any] | None = None,
        *,
        streaming: Literal[True],
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        image_size: ImageSize | None = None,
        shuffle_buffer: int = config.DEFAULT_SHUFFLE_BUFFER,
        batch_size: int | None = None,
    ) -> TorchIterableDataset: ...

    @overload
    def to_torch(
        self,
        transform: Callable[[Any], Any] | None = None,
        *,
        streaming: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        image_size: ImageSize | None = None,
        cache_dir: CacheDir = None,
        memory_budget: int | None = None,
        shuffle_buffer: int = config.DEFAULT_SHUFFLE_BUFFER,
        batch_size: int | None = None,
    ) -> TorchDataset | TorchIterableDataset: ...

    def to_torch(
        self,
        transform: Callable[[Any], Any] | None = None,
        *,
        streaming: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        image_size: ImageSize | None = None,
        cache_dir: CacheDir = None,
        memory_budget: int | None = None,
        shuffle_buffer: int = config.DEFAULT_SHUFFLE_BUFFER,
        batch_size: int | None = None,
    ) -> TorchDataset | TorchIterableDataset:
        """A PyTorch dataset (map-style by default; ``streaming=True`` for an iterable one).

        Images are uint8 HWC arrays (``transform`` gets them), labels integer class ids.
        The options are described at :func:`pixcrawler.loaders.to_torch`. Both kinds are
        ``torch.utils.data.Dataset``s; type checkers see the map-style one as
        :class:`pixcrawler.loaders.TorchDataset` (``len``, ``ds[i]``) and the streaming one
        as :class:`pixcrawler.loaders.TorchIterableDataset` (``len``, ``set_epoch``).

        Example:
            >>> loader = DataLoader(dataset.to_torch(), batch_size=32, shuffle=True)
        """
        from .loaders import to_torch

        return cast(
            "TorchDataset | TorchIterableDataset",
            to_torch(
                self,
                transform,
                streaming=streaming,
                shuffle=shuffle,
                seed=seed,
                rank=rank,
                world_size=world_size,
                drop_last=drop_last,
                image_size=image_size,
                cache_dir=cache_dir,
                memory_budget=memory_budget,
                shuffle_buffer=shuffle_buffer,
                batch_size=batch_size,
            ),
        )

    def to_tensorflow(self, *, image_size: ImageSize | None = None) -> tf.data.Dataset:
        """A ``tf.data.Dataset`` of ``(image uint8 HWC, label int64 id)``.

        Example:
            >>> tf_dataset = dataset.to_tensorflow().batch(32).prefetch(1)
        """
        from .loaders import to_tensorflow

        return to_tensorflow(self, image_size=image_size)

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel downloads in flight and release connections. Safe to call twice."""
        with self._lock:
            self._closed = True
            downloaders = list(self._downloaders)
            pools = list(self._pools)
            views = list(self._views)
        for downloader in downloaders:
            downloader.close()
        for pool in pools:  # an iterator the caller still holds: its decode threads end now
            pool.shutdown(wait=False, cancel_futures=True)
        for view in views:  # their decode threads and cached chunks, in this process
            view.close()
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        live = ("_client", "_lock", "_count_lock", "_downloaders", "_pools", "_views", "stats")
        for name in live:
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client = None
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._downloaders = weakref.WeakSet()
        self._pools = weakref.WeakSet()
        self._views = weakref.WeakSet()
        self.stats = DatasetStats()
        # Unpickled in a process of its own (torch.multiprocessing.spawn, say), which may
        # fork DataLoader workers in turn: as load_dataset does (see import_decoders). Only
        # a warm-up: what fails here fails again, and says so, where it is used.
        with contextlib.suppress(Exception):
            _import_for_reading(self.progress)

    # -- the pipeline ---------------------------------------------------------------------

    def client(self) -> ApiClient:
        with self._lock:
            if self._closed:
                raise PixCrawlerError("the dataset is closed")
            if self._client is None:
                self._client = self.settings.connect()
            return self._client

    def downloader(self, *, prefetch: int | None = None) -> ChunkDownloader:
        """A downloader over this job's chunks, closed with the dataset."""
        client = self.client()
        downloader = ChunkDownloader(
            client,
            self.job.chunks,
            max_workers=self.settings.max_workers,
            prefetch=prefetch or self.prefetch,
            refresh=lambda: self._fresh_urls(client),
            stats=self.stats.transfer,
        )
        with self._lock:
            closed = self._closed  # close() may have come while it was being made
            if not closed:
                self._downloaders.add(downloader)
        if closed:
            downloader.close()
            raise PixCrawlerError("the dataset is closed")
        return downloader

    def _fresh_urls(self, client: ApiClient) -> tuple[Chunk, ...]:
        """The job's chunks read again for new URLs (expired presigned ones): of the same
        version, or an error. A job re-packed meanwhile must not mix into this one: its
        chunks would verify against their own sha256, the labels and counts being ours."""
        fresh = client.get_completed_job(self.job.id)
        if _contents(fresh) != _contents(self.job):
            raise DownloadError(
                f"job {self.job.id} changed on the server while it was being read (another "
                "version or other chunks); load it again: load_dataset() again, or run the "
                "pixcrawler command again"
            )
        return fresh.chunks

    def closes_with(self, view: Any) -> None:
        """Have :meth:`close` call ``view.close()`` too (while ``view`` is alive)."""
        with self._lock:
            self._views.add(view)

    def release_downloader(self, downloader: ChunkDownloader) -> None:
        """Close a downloader from :meth:`downloader` and forget it."""
        downloader.close()
        with self._lock:
            self._downloaders.discard(downloader)

    def _decoded(
        self, decoder: ImageDecoder, chunks: list[int] | None
    ) -> Generator[tuple[Sample, np.ndarray], None, None]:
        """Decoded samples in order, ``on_error`` applied, counted in ``stats``."""
        started = time.perf_counter()
        plan = None if chunks is None else [(_chunk_index(index), None) for index in chunks]
        decoded = self.decode_chunks(decoder, plan)
        try:
            for sample, result in decoded:
                image = self.accept(sample, result)
                if image is None:
                    continue
                if self.stats.first_image_seconds is None:  # (no call per image)
                    self.note_first_image(started)
                yield sample, image
        finally:
            decoded.close()  # an early break stops the downloads and decoders now

    def decode_chunks(
        self,
        decoder: ImageDecoder,
        plan: Sequence[tuple[int, Sequence[int] | None]] | None = None,
        *,
        expect: Mapping[int, int] | None = None,
    ) -> Generator[tuple[Sample, np.ndarray | DecompressionError], None, None]:
        """``(sample, image or the error that names it)`` in order, for every image of each
        ``(chunk, offsets)`` of ``plan`` (``None`` offsets: the whole chunk; ``None`` plan:
        every chunk). Chunks download ``prefetch`` ahead; groups of images decode on a thread
        pool, several in flight across a chunk edge (never into a third chunk), so decoders
        never wait on an edge; a chunk's buffer goes back to the downloader once its last
        group has decoded. ``expect`` (chunk → image count) refuses a chunk that disagrees.
        Decoded images are never held back behind a chunk still on its way, nor lost to one
        that fails: the next chunk is opened early only once it has arrived, and its error
        is raised after every image before it.
        """
        downloader = self.downloader()
        pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix=_DECODE_THREAD)
        with self._lock:
            self._pools.add(pool)
        inflight: deque[_Inflight] = deque()
        groups = self._groups(downloader, plan, expect, decoder)
        chunk_ends: deque[int] = deque()  # inflight lengths at which a chunk's groups end
        at_edge = False  # every group of the chunks opened so far is submitted
        failed: Exception | None = None  # the next chunk's error, raised after what precedes
        ahead = 0  # bytes the groups in flight decode to, as far as the manifests say
        begun_in = cleanup.begun()
        try:
            while True:
                waited = time.perf_counter()
                while len(inflight) < config.DECODE_GROUPS_IN_FLIGHT and len(chunk_ends) < 2:
                    if failed is not None:
                        break
                    if ahead >= config.DECODE_AHEAD_BYTES and len(inflight) >= self.decode_threads:
                        break
                    if at_edge and inflight and not downloader.next_chunk_ready():
                        break  # hand out what is decoded; ask again after the next group
                    try:
                        item = next(groups, None)
                    except Exception as exc:  # a chunk that failed, or arrived but is bad
                        if not inflight:
                            raise
                        failed = exc
                        break
                    if item is None:
                        break
                    archive, group, last, nbytes = item
                    try:
                        future = pool.submit(decode_group, archive, group, decoder)
                    except RuntimeError:  # close() shut the pool down
                        if not self._closed:
                            raise
                        raise PixCrawlerError("the dataset is closed") from None
                    inflight.append(_Inflight(group, future, archive if last else None, nbytes))
                    ahead += nbytes
                    if last:
                        chunk_ends.append(len(inflight))
                    at_edge = last
                if not inflight:
                    if failed is not None:
                        raise failed
                    return
                chunk_ends = deque(end - 1 for end in chunk_ends if end > 1)
                done = inflight.popleft()
                ahead -= done.nbytes
                try:
                    results = done.future.result()
                except CancelledError:  # close() came: it cancelled what had not started
                    raise PixCrawlerError("the dataset is closed") from None
                if done.finished is not None:  # the chunk's groups have all decoded, in order
                    downloader.recycle(done.finished.close())
                self.stats.wait_seconds += time.perf_counter() - waited
                group = done.group
                del done
                yield from zip(group, results, strict=True)
        finally:
            ending = functools.partial(self._end_decoding, groups, inflight, pool, downloader)
            cleanup.end(ending, begun_in)

    def _end_decoding(
        self,
        groups: Generator[Any, None, None],
        inflight: deque[_Inflight],
        pool: ThreadPoolExecutor,
        downloader: ChunkDownloader,
    ) -> None:
        """The end of :meth:`decode_chunks`: each step whatever the one before raised."""
        try:
            # (Unless the garbage collector is closing it on another thread right now.)
            if inspect.getgeneratorstate(groups) != inspect.GEN_RUNNING:
                groups.close()
        finally:
            for pending in inflight:
                pending.future.cancel()
            inflight.clear()
            pool.shutdown(wait=True)
            self.release_downloader(downloader)

    def _groups(
        self,
        downloader: ChunkDownloader,
        plan: Sequence[tuple[int, Sequence[int] | None]] | None,
        expect: Mapping[int, int] | None,
        decoder: ImageDecoder,
    ) -> Generator[tuple[ChunkArchive, list[Sample], bool, int], None, None]:
        """(archive, group of samples, whether it is the chunk's last group, the bytes it
        decodes to as far as the manifest says: 0 where it lists no sizes)."""
        # A job listing its total but not every chunk's count: the whole job is held to it.
        total = None
        if plan is None:
            plan = [(index, None) for index in downloader.indexes]
            if any(c.image_count is None for c in self.job.chunks) and self.job.total_images:
                total = self.job.total_images
        if expect is None:  # the counts the job lists, so len() never says more than comes
            expect = {c.index: c.image_count for c in self.job.chunks if c.image_count is not None}
        chunks = downloader.iter_chunks([index for index, _ in plan], recycles=True)
        first = True
        held = 0
        try:
            for (chunk, data), (_, offsets) in zip(chunks, plan, strict=True):
                archive = ChunkArchive(data, chunk_id=chunk.index)
                del data
                listed = expect.get(chunk.index)
                if listed is not None and len(archive.samples) != listed:
                    raise count_mismatch(self.job.id, chunk.index, listed, archive)
                held += len(archive.samples)
                if total is not None and held > total:
                    raise total_mismatch(
                        self.job.id,
                        total,
                        f"more (chunk {chunk.index} holds {len(archive.samples):,})",
                        chunk_id=chunk.index,
                    )
                self.stats.chunks += 1
                log.debug("chunk %d: %d images", chunk.index, len(archive))
                samples = archive.samples
                if offsets is not None:
                    samples = [samples[offset] for offset in offsets]
                if not samples:  # one empty group: its chunk is an edge like any other
                    yield archive, [], True, 0
                weights = decoded_bytes(samples, decoder)
                for start, end in group_bounds(len(samples), ramp=first, weights=weights):
                    nbytes = sum(weights[start:end]) if weights is not None else 0
                    yield archive, samples[start:end], end >= len(samples), nbytes
                first = first and not samples
            if total is not None and held < total:
                raise total_mismatch(self.job.id, total, f"{held:,}")
        except PixCrawlerError as exc:
            if self._closed:  # close() cancelled the chunks an iterator still held waits for
                raise PixCrawlerError("the dataset is closed") from exc
            raise
        finally:
            chunks.close()  # stops its downloads now

    def count_wait(self, seconds: float, *, chunks: int = 0) -> None:
        """A wait for data in ``stats`` (and the chunks it brought), from any thread."""
        with self._count_lock:
            self.stats.wait_seconds += seconds
            self.stats.chunks += chunks

    def note_first_image(self, started: float) -> None:
        """``stats.first_image_seconds``, if not set yet: the first image is here, and
        the pass (or the process's first item) began at ``started`` (``perf_counter``)."""
        if self.stats.first_image_seconds is None:
            self.stats.first_image_seconds = time.perf_counter() - started

    def accept(self, sample: Sample, result: np.ndarray | DecompressionError) -> np.ndarray | None:
        """One decode result, as every consumer takes it: an image is counted in ``stats``
        and returned; an error gets ``on_error`` (raised, or counted as skipped: None).
        Nothing once the dataset is closed: an iterator held past close() ends there."""
        if self._closed:
            raise PixCrawlerError("the dataset is closed")
        if isinstance(result, np.ndarray):
            with self._count_lock:  # (decode threads of a map-style batch call this too)
                self.stats.images += 1
            return result
        if self.on_error == "raise":
            _release_frames(result)
            raise result
        with self._count_lock:
            self.stats.skipped += 1
            if sample.id not in self.stats._skipped_seen:  # not again every epoch
                self.stats._skipped_seen.add(sample.id)
                self.stats.skipped_ids.append(sample.id)
        if self.on_error == "warn":
            _warn_above_bars(f"skipped {result.message}", _caller_level())
        return None


def above_bars() -> contextlib.AbstractContextManager[Any]:
    """While tqdm bars are drawn: a block whose writes to stderr get a line of their own,
    not the end of a bar's (the bars are cleared first and drawn again after, as
    ``tqdm.write`` does); otherwise a block like any other."""
    std = sys.modules.get("tqdm.std")  # bars exist only if tqdm is imported
    if std is None or not getattr(std.tqdm, "_instances", None):
        return contextlib.nullcontext()
    manager: contextlib.AbstractContextManager[Any] = std.tqdm.external_write_mode(file=sys.stderr)
    return manager


def _warn_above_bars(message: str, stacklevel: int) -> None:
    """A ``RuntimeWarning``, above any progress bars (:func:`above_bars`)."""
    with above_bars():
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


_DECODE_THREAD = f"{config.THREAD_PREFIX}decode"


@dataclass
class _Inflight:
    group: list[Sample]
    future: Future[list[np.ndarray | DecompressionError]]
    finished: ChunkArchive | None  # set on a chunk's last group: free its bytes after it
    nbytes: int  # what it decodes to, as far as the manifest says


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning raised by this function's caller at the
    first frame outside the SDK: the user's loop, or the framework that drives it."""
    frame = sys._getframe(2)  # the caller's caller: stacklevel 2
    level = 2
    while frame.f_back is not None and _ours(frame):
        frame = frame.f_back
        level += 1
    return level


def _ours(frame: FrameType) -> bool:
    """Whether ``frame`` runs the SDK's code, or the progress bar it wraps around it."""
    return frame.f_code.co_filename.startswith(_PACKAGE) or frame.f_globals.get(
        "__name__", ""
    ).startswith("tqdm.")


def count_mismatch(
    job_id: str, chunk: int, listed: int, archive: ChunkArchive
) -> DecompressionError:
    """Bad data, as a download of the job says it (exit code 8)."""
    return DecompressionError(
        f"job {job_id} lists {listed} images in chunk {chunk} but the chunk holds "
        f"{len(archive.samples)}",
        chunk_id=chunk,
    )


def total_mismatch(
    job_id: str, total: int, held: str, *, chunk_id: int | None = None
) -> DecompressionError:
    """Bad data: the job's chunks hold another number of images than its ``total_images``
    (``held``: how many, or "more" and where)."""
    return DecompressionError(
        f"job {job_id} lists {total:,} images but its chunks hold {held}", chunk_id=chunk_id
    )


def decode_sample(
    archive: ChunkArchive, sample: Sample, decoder: ImageDecoder
) -> np.ndarray | DecompressionError:
    """One sample's pixels, or the error that names it (returned, so a pool can carry it)."""
    try:
        return archive.decoded(sample, decoder.decode)
    except DecompressionError as exc:
        message = exc.message
        if sample.id not in message:
            message = f"chunk {sample.chunk_id}, image {sample.id!r}: {message}"
        error = DecompressionError(message, chunk_id=sample.chunk_id, sample_id=sample.id)
        error.__cause__ = exc.__cause__ or exc
        return error


@contextlib.contextmanager
def _bar_postfix(bar: Any, stats: DatasetStats) -> Iterator[Callable[[], None]]:
    """Keep ``bar``'s postfix at the bytes received and images skipped, refreshed every
    ``config.PROGRESS_REFRESH_SECONDS`` by a thread of its own: while the first chunk
    downloads no image arrives to move the bar, which stood at 0 without a word."""
    stop = threading.Event()

    def postfix() -> None:
        skipped = f", {stats.skipped:,} skipped" if stats.skipped else ""
        bar.set_postfix_str(f"{human_size(stats.transfer.bytes_received)} received{skipped}")

    def refresh() -> None:
        while not stop.wait(config.PROGRESS_REFRESH_SECONDS):
            postfix()

    threading.Thread(target=refresh, name=f"{config.THREAD_PREFIX}progress", daemon=True).start()
    try:
        yield postfix
    finally:
        # Not joined: this may run in a collection, on a thread holding the bar's lock,
        # which the refresh waits for. Stopped, it ends within one refresh.
        stop.set()


class _AboveBars(logging.Handler):
    """A record of the SDK's that no handler takes, which Python would print with its
    last-resort handler (WARNING and up, on stderr) into a bar's line, printed above the
    bars instead. Where the caller has set up logging, its own handlers print it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)  # (the last-resort handler's level)
        self.bars = 0  # progress bars drawn now; guarded by _ABOVE_BARS_LOCK

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return  # another handler takes it
            logger = logger.parent if logger.propagate else None
        try:
            line = self.format(record)
            with above_bars():
                sys.stderr.write(line + "\n")
        except Exception:
            self.handleError(record)


_ABOVE_BARS = _AboveBars()
# (Reentrant: a bar's iteration the garbage collector ends may end inside this lock.)
_ABOVE_BARS_LOCK = threading.RLock()


@contextlib.contextmanager
def _logged_above_bars() -> Iterator[None]:
    """While a progress bar is drawn: the SDK's log lines above it (see :class:`_AboveBars`)."""
    with _ABOVE_BARS_LOCK:
        _ABOVE_BARS.bars += 1
        if _ABOVE_BARS.bars == 1:
            log.addHandler(_ABOVE_BARS)
    try:
        yield
    finally:
        with _ABOVE_BARS_LOCK:
            _ABOVE_BARS.bars -= 1
            if _ABOVE_BARS.bars == 0:
                log.removeHandler(_ABOVE_BARS)


def release_left(exc: BaseException) -> None:
    """Clear the locals of the SDK's frames (and its progress bar's) ``exc`` was raised in
    and came out of (the entries of its traceback after the first, which is the frame
    handling it: they have all ended, a generator's too), then, for an error of the SDK's,
    those behind its causes (:func:`_release_frames`). The walk stops at the first frame
    that is not the SDK's: an error the caller threw in (``throw()``) brings the caller's
    own frames, which may be a generator still to run, and a debugger may want their
    locals."""
    tb = exc.__traceback__
    tb = tb.tb_next if tb is not None else None
    while tb is not None and _ours(tb.tb_frame):
        with contextlib.suppress(RuntimeError):  # (none is running: only to be safe)
            tb.tb_frame.clear()
        tb = tb.tb_next
    if isinstance(exc, PixCrawlerError):
        _release_frames(exc)


def _release_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames behind ``exc``'s causes: those of the decode
    (the chunk's bytes, its decode group's images, the decoder's buffers) would live as
    long as a caller keeps the error (a notebook keeps the last one). Tracebacks still
    print every file and line. Only explicit causes are followed (``raise ... from``, as
    the decoders raise): an implicit ``__context__`` may be the caller's own error, when
    the decode ran in its ``except`` block. Running frames are left alone, and so is any
    generator's or coroutine's (clearing one that is suspended would close it)."""
    seen: set[int] = set()
    error = exc.__cause__
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            frame: FrameType | None = tb.tb_frame
            while frame is not None:  # and the frames that called it (a pool's work item)
                if not frame.f_code.co_flags & _SUSPENDABLE:
                    with contextlib.suppress(RuntimeError):  # still running
                        frame.clear()
                frame = frame.f_back
            tb = tb.tb_next
        error = error.__cause__


_SUSPENDABLE = (
    inspect.CO_GENERATOR
    | inspect.CO_COROUTINE
    | inspect.CO_ITERABLE_COROUTINE
    | inspect.CO_ASYNC_GENERATOR
)


def group_bounds(
    count: int, *, ramp: bool = False, weights: Sequence[int] | None = None
) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each decode group over ``count`` samples. With ``ramp`` (an
    iteration's first chunk) the first groups are small (config.DECODE_RAMP): the first
    image then waits for a couple of decodes, not for a whole group. With ``weights`` (each
    sample's decoded bytes) a group also ends before it would pass DECODE_GROUP_BYTES."""
    sizes = iter(config.DECODE_RAMP if ramp else ())
    start = 0
    while start < count:
        end = min(count, start + next(sizes, config.DECODE_GROUP))
        if weights is not None:
            held = weights[start]
            for cut in range(start + 1, end):
                held += weights[cut]
                if held > config.DECODE_GROUP_BYTES:
                    end = cut
                    break
        yield start, end
        start = end


def decoded_bytes(samples: Sequence[Sample], decoder: ImageDecoder) -> list[int] | None:
    """Each sample's decoded bytes as its manifest's size (or the decoder's ``image_size``)
    says, 0 where none is listed; None where no group of them can reach DECODE_GROUP_BYTES
    (photos of a few hundred pixels a side: the groups go by count alone)."""
    if decoder.image_size is not None:
        height, width = decoder.image_size
        each = height * width * decoder.channels
        if each * config.DECODE_GROUP <= config.DECODE_GROUP_BYTES:
            return None
        return [each] * len(samples)
    channels = decoder.channels
    weights = [(s.width or 0) * (s.height or 0) * channels for s in samples]
    if max(weights, default=0) * config.DECODE_GROUP <= config.DECODE_GROUP_BYTES:
        return None
    return weights


def decode_group(
    archive: ChunkArchive, group: list[Sample], decoder: ImageDecoder
) -> list[np.ndarray | DecompressionError]:
    """Runs on a decode thread: every sample's pixels, or the error that names it."""
    # (A loop, not a comprehension: before Python 3.12 that is a function of its own, its
    # closure holding the chunk beyond the reach of _release_frames.)
    results = []
    for sample in group:
        results.append(decode_sample(archive, sample, decoder))
    return results


def _put(target: np.ndarray, row: int, image: np.ndarray, sample: Sample) -> None:
    if image.shape != target.shape[1:]:
        raise MixedImageSizesError(
            f"image {sample.id!r} is {image.shape[1]}x{image.shape[0]} but earlier images are "
            f"{target.shape[2]}x{target.shape[1]}: images of different sizes cannot be stacked. "
            "Pass image_size=(H, W) to resize them all.",
            chunk_id=sample.chunk_id,
            sample_id=sample.id,
        )
    target[row] = image


def sample_metadata(sample: Sample, image: np.ndarray) -> dict[str, Any]:
    """The metadata column of ``to_dataframe``: the sample's id, path and chunk and the
    image's size as returned, then the manifest's own metadata. A manifest key of the
    same name (a producer's ``width`` of the original photo) never replaces the SDK's
    (the row's id, or its image's size): it is kept as ``manifest_<key>``."""
    own: dict[str, Any] = {
        "id": sample.id,
        "path": sample.path,
        "chunk": sample.chunk_id,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
    }
    clashing = [key for key in sample.metadata if key in own]
    own.update((k, v) for k, v in sample.metadata.items() if k not in own)
    for key in clashing:
        name = f"manifest_{key}"
        while name in own:  # (a producer's own "manifest_id" too)
            name = f"manifest_{name}"
        own[name] = sample.metadata[key]
    return own


def check_options(
    *, prefetch: int, mode: str, image_size: Any, on_error: str, decode_threads: int | None
) -> ImageSize | None:
    """Refuse a bad option with a ValueError naming it (before any request is sent);
    return ``image_size`` checked."""
    if on_error not in config.ON_ERROR_POLICIES:
        raise ValueError(
            f"on_error must be one of {', '.join(config.ON_ERROR_POLICIES)}, got {on_error!r}"
        )
    positive_int("prefetch", prefetch)
    if decode_threads is not None:
        positive_int("decode_threads", decode_threads)
    size = validate_image_size(image_size) if image_size is not None else None
    ImageDecoder(mode)  # refuses an unknown mode now, not at the first image
    return size


def _chunk_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):  # not "1": no chunk
        raise ValueError(f"chunks must list chunk indexes (ints), got {value!r}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _contents(job: Job) -> tuple[Any, ...]:
    """What the job's data is, as listed: its version, labels and each chunk's identity."""
    chunks = sorted(
        (c.index, c.sha256 and c.sha256.lower(), c.size_bytes, c.image_count) for c in job.chunks
    )
    return job.version, job.labels, chunks


def counts_listed(job: Job) -> bool:
    """Whether the job says how many images it holds (the wire contract's
    ``total_images`` or every chunk's ``image_count``; other producers may omit both)."""
    if job.total_images:
        return True
    # Only a completed job lists its chunks: no chunk of another one is no count.
    return job.status == "completed" and all(c.image_count is not None for c in job.chunks)


def unlabelled(job: Job) -> bool:
    """Whether the job may hold images but lists no ``labels`` (another producer's): its
    labels then have no class ids, which the frameworks and numpy's y.npy give."""
    return (
        not job.labels and bool(job.chunks) and not (counts_listed(job) and not num_images_of(job))
    )


def size_listed(job: Job) -> bool:
    """Whether the job says how many bytes it holds: ``size_bytes``, or every chunk's (only
    a completed job lists its chunks: one still running has no size yet)."""
    if job.size_bytes:
        return True
    return job.status == "completed" and all(c.size_bytes for c in job.chunks)


def _allocated_images(job_id: str, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """``to_arrays``' X, allocated once: numpy's MemoryError (or, past what an address can
    reach, its ValueError "array is too big") named what asked for it."""
    try:
        return np.empty((count, *shape), dtype=np.uint8)
    except (MemoryError, ValueError):
        need = count * int(np.prod(shape))
        raise PixCrawlerError(
            f"job {job_id}: {count:,} images of {'x'.join(map(str, shape))} need "
            f"{human_size(need)}, more memory than there is; iterate with iter_batches() "
            "instead"
        ) from None


def _grown(images: np.ndarray, limit: int | None = None) -> np.ndarray:
    """``images`` copied into an array half as long again (at least one row more, at most
    ``limit`` rows)."""
    rows = max(len(images) * 3 // 2, len(images) + 1)
    grown = np.empty((rows if limit is None else min(rows, limit), *images.shape[1:]), np.uint8)
    grown[: len(images)] = images
    return grown


def num_images_of(job: Job) -> int:
    """The images the job says it holds: 0 where it does not say it (see counts_listed),
    never the sum of the counts some of its chunks list."""
    if not counts_listed(job):
        return 0
    return job.total_images or sum(c.image_count or 0 for c in job.chunks)


def _import_for_reading(progress: bool) -> None:
    """Import what reading would import on first use, here, not then (see
    import_decoders): the decoders; with ``progress``, tqdm and its lock, and termios,
    which tqdm before 4.66 imports to read the terminal's width."""
    import_decoders()
    if not progress:
        return
    from tqdm.auto import tqdm

    tqdm.get_lock()  # type: ignore[no-untyped-call]
    with contextlib.suppress(ImportError):
        import termios  # noqa: F401


def load_dataset(
    job_id: str | int,
    api_key: str | None = None,
    base_url: str | None = None,
    max_workers: int = config.DEFAULT_MAX_WORKERS,
    timeout: float = config.DEFAULT_TIMEOUT,
    verify_ssl: bool = True,
    *,
    prefetch: int = config.DEFAULT_PREFETCH,
    mode: str = "RGB",
    image_size: ImageSize | None = None,
    on_error: str = "raise",
    decode_threads: int | None = None,
    retries: int = config.DEFAULT_RETRIES,
    backoff: float = config.DEFAULT_BACKOFF_BASE,
    progress: bool = False,
) -> Dataset:
    """Load a PixCrawler dataset lazily: only the job's metadata is fetched here.

    Args:
        job_id: Job/dataset identifier.
        api_key: PixCrawler API key (else ``PIXCRAWLER_API_KEY``, else ``pixcrawler login``).
        base_url: API host (else ``PIXCRAWLER_BASE_URL``, else production).
        max_workers: Parallel download threads.
        timeout: Seconds to connect, and the longest silence allowed mid-transfer.
        verify_ssl: Verify TLS certificates.
        prefetch: Chunks downloaded ahead of the consumer (bounds memory).
        mode: ``"RGB"``, ``"L"`` or ``"RGBA"``.
        image_size: ``(H, W)`` to resize every image to.
        on_error: What a corrupt image does: ``"raise"``, ``"skip"`` or ``"warn"``.
        decode_threads: Threads decoding images (default 2).
        retries: Retries per request on network errors, 429 and 5xx (a chunk transfer
            cut off after it moved on counts them afresh: see docs/reliability.md).
        backoff: Base of the exponential backoff, in seconds.
        progress: Show a progress bar while iterating.

    Raises:
        AuthenticationError: Invalid API key.
        NotFoundError: Job not found.
        JobNotCompleteError: Job still processing (or failed, or cancelled).

    Example:
        >>> dataset = load_dataset("job_123", api_key="key")
        >>> for image, label in dataset:
        ...     print(image.shape)
    """
    positive_int("max_workers", max_workers)
    if not isinstance(verify_ssl, bool):  # None, "false" or a CA bundle's path: not a switch
        raise ValueError(f"verify_ssl must be True or False, got {verify_ssl!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < 1e9:
        raise ValueError(
            f"timeout must be a number of seconds above 0 and below 1e9, got {timeout!r}"
        )
    image_size = check_options(
        prefetch=prefetch,
        mode=mode,
        image_size=image_size,
        on_error=on_error,
        decode_threads=decode_threads,
    )
    settings = ClientSettings(
        api_key=resolve_api_key(api_key),
        base_url=resolve_base_url(base_url),
        timeout=float(timeout),
        verify_ssl=verify_ssl,
        retry=RetryPolicy(retries=retries, backoff_base=backoff),
        max_workers=max_workers,
    )
    client = ApiClient(
        settings.api_key,
        settings.base_url,
        timeout=settings.timeout,
        verify_ssl=verify_ssl,
        retry=settings.retry,
        pool_size=max_workers,
    )
    try:
        job = client.get_completed_job(job_id)
        _import_for_reading(progress)
        return Dataset(
            job,
            settings,
            client=client,
            prefetch=prefetch,
            mode=mode,
            image_size=image_size,
            on_error=on_error,
            decode_threads=decode_threads,
            progress=progress,
        )
    except BaseException:
        client.close()
        raise
