"""Bridges to ML frameworks; each framework is imported only when its bridge is used.

- :func:`to_torch` gives a *map-style* ``torch.utils.data.Dataset`` (random access, served
  from a :class:`~pixcrawler.cache.ChunkStore`: memory LRU over a verified disk cache), or with
  ``streaming=True`` an ``IterableDataset`` that streams chunks, sharded across
  ``torch.distributed`` ranks and DataLoader workers with equal counts per rank.
- :func:`to_tensorflow` gives a ``tf.data.Dataset`` with an explicit ``output_signature``.

Both yield ``(image, label_id)``: a uint8 HWC numpy array (a tensor for TensorFlow) and the
label's position in ``dataset.labels``. Nothing live (connections, thread pools, caches) is
pickled into a DataLoader worker: each process opens its own on first use, and notices a
``fork`` by its process id.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import ctypes
import functools
import importlib
import logging
import math
import multiprocessing
import operator
import os
import threading
import time
import types
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import config
from .archive import ChunkArchive, Sample
from .cache import CacheDir, ChunkStore, resolve_cache_root
from .dataset import (
    count_mismatch,
    counts_listed,
    decode_sample,
    positive_int,
    release_left,
    total_mismatch,
    unlabelled,
)
from .decode import ImageBuffers, ImageDecoder, validate_image_size
from .exceptions import (
    DecompressionError,
    MissingDependencyError,
    MixedImageSizesError,
    PixCrawlerError,
)

if TYPE_CHECKING:
    from .dataset import Dataset
    from .downloader import ChunkDownloader

log = logging.getLogger("pixcrawler")

ImageSize = tuple[int, int]
Transform = Callable[[Any], Any]

# SeedSequence words that keep the chunk order, each chunk's own order and the buffer
# apart. (A SeedSequence ignores trailing zero words: [seed, epoch, 1, 0], chunk 0's order
# under one shared word, drew the very numbers of [seed, epoch, 1], the chunk order's.)
_SEQUENCE_STREAM = 1
_BUFFER_STREAM = 2
_CHUNK_STREAM = 3


def require(module: str, extra: str, package: str | None = None) -> Any:
    """Import an optional framework, or say which extra brings it (``package``: the name it
    is installed by, where that is not its module's, as scikit-learn's ``sklearn``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        name = package or module.partition(".")[0]
        absent = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if not (absent and f"{module}.".startswith(f"{absent}.")):
            # Installed, but broken (a library it loads, one of its own dependencies): the
            # extra is there already, and installing it again would not help.
            raise MissingDependencyError(
                f"{name} is installed but could not be imported: {exc}"
            ) from exc
        raise MissingDependencyError(
            f'{name} is required for this; install it with: pip install "pixcrawler-sdk[{extra}]"'
        ) from exc


# -- PyTorch ---------------------------------------------------------------------------------

if TYPE_CHECKING:
    # What type checkers see of the two classes to_torch() returns. They are built at run
    # time on first use (so that torch is imported only then), and this module's
    # __getattr__ gives them under these names: ``loaders.TorchDataset`` imports torch.
    from torch.utils.data import Dataset as _TorchMapBase
    from torch.utils.data import IterableDataset as _TorchIterableBase

    class _Labelled:
        """What both kinds have (as torchvision's ``ImageFolder``)."""

        @property
        def classes(self) -> list[str]: ...
        @property
        def class_to_idx(self) -> dict[str, int]: ...
        def close(self) -> None: ...
        def __len__(self) -> int: ...

    class TorchDataset(_Labelled, _TorchMapBase[Any]):  # type: ignore[misc,unused-ignore]
        """Map-style: ``len()`` images, ``ds[i]`` → ``(image, label_id)`` in any order."""

        @property
        def store(self) -> ChunkStore: ...
        def __getitem__(self, index: Any) -> Any: ...  # as torch types it (an int, a list)

    class TorchIterableDataset(_Labelled, _TorchIterableBase[Any]):  # type: ignore[misc,unused-ignore]
        """Streaming: each epoch's ``(image, label_id)``, sharded over ranks and workers."""

        @property
        def epoch(self) -> int: ...
        @property
        def num_samples(self) -> int: ...
        def set_epoch(self, epoch: int) -> None: ...
        def __iter__(self) -> Iterator[Any]: ...


_BUILT_NAMES = {"TorchDataset": "map", "TorchIterableDataset": "streaming"}


def __getattr__(name: str) -> Any:
    """``TorchDataset`` and ``TorchIterableDataset``, built (importing torch) when asked."""
    kind = _BUILT_NAMES.get(name)
    if kind is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _torch_class(kind)


def __dir__() -> list[str]:
    return sorted({*globals(), *_BUILT_NAMES})


def to_torch(
    dataset: Dataset,
    transform: Transform | None = None,
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
) -> Any:
    """A PyTorch dataset of ``(image, label_id)``; see :meth:`Dataset.to_torch`.

    Map-style (default): ``len()`` images, ``ds[i]`` in any order, served from a chunk store
    (``memory_budget`` bytes of chunks in memory per process, every chunk downloaded once
    into ``cache_dir``; ``cache_dir=False`` keeps memory only). Shuffle and shard it the
    usual way: ``DataLoader(shuffle=True)``, ``DistributedSampler``, ``random_split``.

    ``streaming=True``: an ``IterableDataset`` that downloads each chunk once per epoch and
    keeps nothing; ``shuffle``/``seed``/``set_epoch`` order it, ``rank``/``world_size``
    (default: ``torch.distributed``'s) and the DataLoader's workers split it, every rank
    yielding ``ceil(N / world_size)`` samples (``floor`` with ``drop_last=True``). Give it
    the DataLoader's ``batch_size`` too: each worker then takes whole batches, so that
    ``len(loader)`` is the number of batches it yields (otherwise every worker ends on a
    batch of its own leftovers, and ``drop_last`` in the DataLoader drops each of them).
    """
    require("torch", "torch")
    if streaming:
        if cache_dir is not None or memory_budget is not None:
            raise ValueError(
                "cache_dir and memory_budget apply to the map-style dataset; "
                "streaming=True reads each chunk once per epoch and caches nothing"
            )
        return _torch_class("streaming")(
            dataset,
            transform,
            image_size=image_size,
            shuffle=shuffle,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            shuffle_buffer=shuffle_buffer,
            batch_size=batch_size,
        )
    streaming_only = {
        "shuffle": shuffle,
        "rank": rank is not None,
        "world_size": world_size is not None,
        "drop_last": drop_last,
        "seed": seed != 0,
        "shuffle_buffer": shuffle_buffer != config.DEFAULT_SHUFFLE_BUFFER,
        "batch_size": batch_size is not None,
    }
    given = [name for name, used in streaming_only.items() if used]
    if given:
        raise ValueError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to "
            "streaming=True only; a map-style dataset is shuffled "
            "and sharded by its DataLoader: DataLoader(ds, shuffle=True) or "
            "DataLoader(ds, sampler=DistributedSampler(ds))"
        )
    return _torch_class("map")(
        dataset,
        transform,
        image_size=image_size,
        cache_dir=cache_dir,
        memory_budget=memory_budget,
    )


@dataclass
class _Local:
    """What one process opens for itself: never pickled, never inherited across fork."""

    handle: Dataset
    decoder: ImageDecoder
    store: ChunkStore | None = None
    downloader: ChunkDownloader | None = None
    pool: ThreadPoolExecutor | None = None
    fetch_pool: ThreadPoolExecutor | None = None
    bad: dict[int, DecompressionError] = field(default_factory=dict)  # never decoded again
    closed: bool = False
    opened: float = field(default_factory=time.perf_counter)  # (first_image_seconds from here)

    def close(self) -> None:
        self.closed = True
        for pool in (self.pool, self.fetch_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self.downloader is not None:
            self.handle.release_downloader(self.downloader)
        if self.store is not None:
            self.store.close()  # (ends a wait for another process's lock on a chunk)


@contextlib.contextmanager
def _unless_closed(local: _Local) -> Iterator[None]:
    """What a pool that ``close()`` shut down says to a batch still using it (a task
    cancelled in its queue, no new task taken), said as the SDK says it elsewhere."""
    try:
        yield
    except (CancelledError, RuntimeError) as exc:
        if not local.closed:
            raise
        raise PixCrawlerError("the dataset was closed while this batch loaded") from exc


class _TorchBridge:
    """What both torch datasets share: the job, label ids, decoding, per-process state."""

    _kind = ""

    def __init__(
        self,
        dataset: Dataset,
        transform: Transform | None,
        *,
        image_size: ImageSize | None,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.image_size = (
            validate_image_size(image_size) if image_size is not None else dataset.image_size
        )
        self.labels: tuple[str, ...] = label_names(dataset)
        self._label_ids = {name: i for i, name in enumerate(self.labels)}
        self._counts = _chunk_counts(dataset)
        self._owner_pid = os.getpid()
        self._local: _Local | None = None
        self._local_pid: int | None = None
        self._local_lock = threading.Lock()
        self._lock_pid = self._owner_pid
        self._max_pixels: int | None = None  # None: config's, as it is when decoding starts
        dataset.closes_with(self)  # dataset.close() ends this one's threads too

    @property
    def classes(self) -> list[str]:
        """Label names by id, as torchvision's ``ImageFolder.classes``."""
        return list(self.labels)

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Label name → id, as torchvision's ``ImageFolder.class_to_idx``."""
        return dict(self._label_ids)

    def close(self) -> None:
        """Release this process's downloads, decode threads and cached chunks."""
        with self._local_lock:
            local, self._local = self._local, None
            pid, self._local_pid = self._local_pid, None
        if local is not None and pid == os.getpid():
            local.close()

    # -- per process -------------------------------------------------------------------

    def _process(self) -> _Local:
        pid = os.getpid()
        local = self._local
        if local is not None and self._local_pid == pid:
            return local
        if self._lock_pid != pid:  # a lock held by another thread at fork stays held
            self._local_lock = threading.Lock()
            self._lock_pid = pid
        with self._local_lock:
            if self._local is None or self._local_pid != pid:
                # After a fork the parent's state (sockets, threads, locks) is unusable here:
                # drop it unclosed and open our own. The user's dataset object is used only in
                # the process that created this one, so its stats stay visible there.
                handle = self.dataset if pid == self._owner_pid else copy.copy(self.dataset)
                self._local = self._open(handle)
                self._local_pid = pid
            return self._local

    def _open(self, handle: Dataset) -> _Local:
        # A DataLoader batch holds its images until it is collated, then drops them all:
        # reusable buffers spare the page faults of fresh ones. Images a shuffle buffer
        # holds would only pin them.
        buffers = ImageBuffers() if self._reuses_images else None
        decoder = ImageDecoder(
            handle.mode, self.image_size, max_pixels=self._max_pixels, buffers=buffers
        )
        return _Local(handle, decoder)

    @property
    def _reuses_images(self) -> bool:
        return True

    def _label_id(self, sample: Sample) -> int:
        try:
            return self._label_ids[sample.label]
        except KeyError:
            raise PixCrawlerError(
                f"image {sample.id!r} has label {sample.label!r}, which the job does not list "
                f"in its labels {list(self.labels)}"
            ) from None

    def _output(self, image: np.ndarray, sample: Sample) -> tuple[Any, int]:
        label = self._label_id(sample)
        return (self.transform(image) if self.transform is not None else image), label

    # -- pickling: state only; the class is rebuilt where torch is importable ----------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_local=None, _local_pid=None, _local_lock=None, _lock_pid=None)
        # A spawned worker imports a fresh config: the pixel limit goes with the pickle.
        state["_max_pixels"] = config.MAX_IMAGE_PIXELS
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local_lock = threading.Lock()
        self._lock_pid = os.getpid()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._kind, self.__getstate__()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(job={self.dataset.job.id!r}, images={len(self)})"

    def __len__(self) -> int:
        raise NotImplementedError


class _MapStyle(_TorchBridge):
    """Map-style torch dataset: ``ds[i]`` → ``(image, label_id)`` in any order.

    ``image`` is a uint8 ``(H, W, C)`` numpy array, or what ``transform`` makes of it; with
    no transform the default collate stacks a batch into a uint8 ``(B, H, W, C)`` tensor.
    Chunks come from a per-process :class:`~pixcrawler.cache.ChunkStore`. With
    ``on_error="skip"`` (or ``"warn"``) an image that cannot be decoded is served by the next
    index that can (wrapping around), so ``len()`` never changes.
    """

    _kind = "map"

    def __init__(
        self,
        dataset: Dataset,
        transform: Transform | None,
        *,
        image_size: ImageSize | None,
        cache_dir: CacheDir,
        memory_budget: int | None,
    ) -> None:
        super().__init__(dataset, transform, image_size=image_size)
        if memory_budget is not None and memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0 bytes, got {memory_budget}")
        resolve_cache_root(cache_dir)  # a bad one is refused here, not at the first item
        self.cache_dir = cache_dir
        self.memory_budget = memory_budget
        self._chunk_ids = sorted(self._counts)
        self._starts: list[int] = []
        total = 0
        for index in self._chunk_ids:
            self._starts.append(total)
            total += self._counts[index]
        self._total = total
        self._chunk_bytes = {c.index: c.size_bytes for c in dataset.job.chunks}

    def __len__(self) -> int:
        return self._total

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (list, tuple)):
            return self.__getitems__(list(index))
        position = self._position(index)
        local = self._process()
        image, sample = self._load(local, position)
        local.handle.note_first_image(local.opened)
        return self._output(image, sample)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A batch, as ``DataLoader`` asks for it: decoded on the dataset's decode threads
        in the main process; one by one in a DataLoader worker (the workers are the
        parallelism there)."""
        positions = [self._position(i) for i in indices]
        local = self._process()
        self._fetch_missing(local, positions)
        # Loaded chunk by chunk, handed out in the batch's order: a shuffled batch over more
        # chunks than the memory budget holds evicted, image by image, chunks it needed next.
        by_chunk = sorted(range(len(positions)), key=lambda i: self._locate(positions[i])[0])
        loaded: list[Any] = [None] * len(positions)
        worker = _worker_info()
        if worker is not None or len(positions) < 2 or local.handle.decode_threads < 2:
            for i in by_chunk:
                loaded[i] = self._load(local, positions[i])
        else:
            pool = self._pool(local)
            with _unless_closed(local), self._stopped_if_interrupted():
                futures = [(i, pool.submit(self._load, local, positions[i])) for i in by_chunk]
                for i, future in futures:
                    loaded[i] = future.result()
        local.handle.note_first_image(local.opened)
        return [self._output(*item) for item in loaded]

    @property
    def store(self) -> ChunkStore:
        """This process's chunk store (opened on first use)."""
        store = self._process().store
        if store is None:  # pragma: no cover - _open always sets it
            raise PixCrawlerError("the chunk store is not open")
        return store

    def _position(self, index: Any) -> int:
        position = operator.index(index)
        if position < 0:
            position += self._total
        if not 0 <= position < self._total:
            raise IndexError(f"index {index} is out of range for {self._total} images")
        return position

    def _open(self, handle: Dataset) -> _Local:
        local = super()._open(handle)
        # A window as wide as the transfer threads: a chunk fetched alone is not split into
        # ranges, so concurrent fetches of a batch's chunks stay within the connection pool.
        downloader = handle.downloader(prefetch=handle.settings.max_workers)
        local.downloader = downloader
        local.store = ChunkStore(
            handle.job.chunks,
            downloader.fetch,
            job_id=handle.job.id,
            memory_budget=self.memory_budget,
            cache_dir=self.cache_dir,
            # What tells this version of the job from another where no sha256 does (a
            # producer that re-packs without a new version still gives a new time).
            origin="|".join(
                str(part)
                for part in (
                    handle.settings.base_url,
                    handle.job.id,
                    f"v{handle.job.version}",
                    handle.job.created_at,
                    handle.job.completed_at,
                    handle.job.total_images,
                )
            ),
        )
        return local

    def _fetch_missing(self, local: _Local, positions: Sequence[int]) -> None:
        """Bring the chunks a batch needs into the store concurrently, not one by one: a
        shuffled batch touches many chunks, and the first epoch would otherwise wait on
        each download in turn. As many as the memory budget holds. They load on the fetch
        threads while this one waits, so a long wait is logged with how far each got."""
        store = local.store
        if store is None:  # pragma: no cover - _open always sets it
            return
        missing: list[int] = []
        room = store.memory_budget
        for index in sorted({self._locate(p)[0] for p in positions}):
            if store.in_memory(index):
                continue
            # A size the job does not list takes all the room left: counted as 0, every
            # chunk of a batch was fetched at once, evicted at once, and fetched again.
            size = self._chunk_bytes.get(index)
            room -= size if size is not None else max(room, 1)
            if missing and room < 0:
                break
            missing.append(index)
        if not missing:  # (the store keeps the chunk it loaded last, whatever the budget)
            return
        pool = self._fetch_pool(local)
        with _unless_closed(local), self._stopped_if_interrupted():
            futures = [(index, pool.submit(store.archive, index)) for index in missing]
            try:
                for index, future in futures:
                    self._wait(local, index, future)
            finally:
                for _, future in futures:
                    future.cancel()

    def _archive(self, local: _Local, store: ChunkStore, index: int) -> ChunkArchive:
        """Chunk ``index``'s archive. One the store does not hold (a batch's chunks beyond
        the memory budget) loads on a fetch thread while this one waits, so that a long
        wait for it is logged too."""
        if store.in_memory(index):
            return store.archive(index)
        with _unless_closed(local), self._stopped_if_interrupted():
            future = self._fetch_pool(local).submit(store.archive, index)
            try:
                return self._wait(local, index, future)
            finally:
                future.cancel()

    @contextlib.contextmanager
    def _stopped_if_interrupted(self) -> Iterator[None]:
        """A Ctrl-C (or SystemExit) while a fetch thread loads a chunk stops that transfer
        too, not only the wait for it: it would run on for its timeout and retries, and
        the process could not exit until it ended. The next item opens afresh."""
        try:
            yield
        except BaseException as exc:
            if not isinstance(exc, Exception):
                self.close()
            raise

    def _fetch_pool(self, local: _Local) -> ThreadPoolExecutor:
        with self._local_lock:
            if local.fetch_pool is None:
                local.fetch_pool = ThreadPoolExecutor(
                    local.handle.settings.max_workers,
                    thread_name_prefix=f"{config.THREAD_PREFIX}fetch",
                )
            return local.fetch_pool

    @staticmethod
    def _wait(local: _Local, index: int, future: Future[ChunkArchive]) -> ChunkArchive:
        """A chunk the store did not hold, loaded (downloaded, or read from the disk
        cache): counted, with the time waited for it, in the dataset's stats."""
        started = time.perf_counter()
        loaded = 0
        try:
            if local.downloader is None:  # pragma: no cover - _open always sets it
                archive = future.result()
            else:
                archive = local.downloader.wait_for(index, future)  # says why if it is long
            loaded = 1
            return archive
        finally:
            local.handle.count_wait(time.perf_counter() - started, chunks=loaded)

    def _pool(self, local: _Local) -> ThreadPoolExecutor:
        with self._local_lock:
            if local.pool is None:
                local.pool = ThreadPoolExecutor(
                    local.handle.decode_threads, thread_name_prefix=f"{config.THREAD_PREFIX}torch"
                )
            return local.pool

    def _locate(self, position: int) -> tuple[int, int]:
        slot = bisect.bisect_right(self._starts, position) - 1
        return self._chunk_ids[slot], position - self._starts[slot]

    def _load(self, local: _Local, position: int) -> tuple[np.ndarray, Sample]:
        """The image at ``position``, or (skip/warn) at the next position that decodes."""
        store = local.store
        if store is None:  # pragma: no cover - _open always sets it
            raise PixCrawlerError("the chunk store is not open")
        for step in range(self._total):
            current = (position + step) % self._total
            error = local.bad.get(current)
            if error is not None:
                if local.handle.on_error == "raise":
                    raise _detached(error)  # a fresh one each time: the kept one stays bare
                continue
            chunk, offset = self._locate(current)
            archive = self._archive(local, store, chunk)
            if len(archive.samples) != self._counts[chunk]:
                raise count_mismatch(self.dataset.job.id, chunk, self._counts[chunk], archive)
            sample = archive.samples[offset]
            result = decode_sample(archive, sample, local.decoder)
            if not isinstance(result, np.ndarray):
                # Read on another process's stamp: hashed now, downloaded again if corrupt.
                # Another decode thread may have rechecked it first: then it is reloaded.
                rechecked = store.recheck(chunk)
                fresh = self._archive(local, store, chunk)
                if rechecked or fresh is not archive:
                    archive, sample = fresh, fresh.samples[offset]
                    result = decode_sample(archive, sample, local.decoder)
            if not isinstance(result, np.ndarray):
                local.bad[current] = _detached(result)  # before on_error may raise
            image = local.handle.accept(sample, result)
            if image is not None:
                return image, sample
        raise PixCrawlerError(f"no image of job {self.dataset.job.id} could be decoded")


def _detached(error: DecompressionError) -> DecompressionError:
    """``error`` without its traceback, cause or context, to be kept: their frames would
    hold the chunk its image was in (one per chunk with a bad image, past any budget)."""
    return DecompressionError(error.message, chunk_id=error.chunk_id, sample_id=error.sample_id)


class _Streaming(_TorchBridge):
    """Iterable torch dataset: chunks streamed once per epoch, split across ranks and workers.

    The epoch's sample sequence is the chunks in order (with ``shuffle``: a permutation of
    the chunks and of each chunk's images, a pure function of ``(seed, epoch)``). Rank ``r``
    takes the ``r``-th contiguous slice of it, so it downloads mostly its own chunks, and each
    DataLoader worker a contiguous part of that. Every rank yields exactly ``len(self)``
    samples (``DistributedSampler``'s rule): the sequence wraps around to pad the last rank,
    and an image that cannot be decoded (``on_error="skip"``/``"warn"``) is replaced by the
    next ones after the worker's slice. With ``shuffle``, each worker also mixes across
    chunks through a buffer of ``shuffle_buffer`` decoded images.
    """

    _kind = "streaming"

    def __init__(
        self,
        dataset: Dataset,
        transform: Transform | None,
        *,
        image_size: ImageSize | None,
        shuffle: bool,
        seed: int,
        rank: int | None,
        world_size: int | None,
        drop_last: bool,
        shuffle_buffer: int,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(dataset, transform, image_size=image_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.shuffle_buffer = int(shuffle_buffer)
        self.batch_size = None if batch_size is None else positive_int("batch_size", batch_size)
        self.rank, self.world_size = _distributed(rank, world_size)
        self._ranks_defaulted = world_size is None  # from torch.distributed's, or (0, 1)
        self._epoch = 0
        # The epoch's seed word in shared memory: DataLoader workers started once
        # (``persistent_workers=True``) read there what ``set_epoch`` wrote after they began.
        self._epoch_word = _shared_word()
        self._total = sum(self._counts.values())

    @property
    def _reuses_images(self) -> bool:
        return not self.shuffle

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration yields (see :meth:`set_epoch`)."""
        word = self._epoch_word.value
        if word == _seed_word(self._epoch):
            return self._epoch
        return word - (1 << 64) if word >= 1 << 63 else word  # set in another process

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order to yield (as ``DistributedSampler.set_epoch``).

        Call it before each epoch's DataLoader iteration. It reaches DataLoader workers
        already running (``persistent_workers=True``) as well as those started afterwards.
        """
        self._epoch = int(epoch)
        self._epoch_word.value = _seed_word(self._epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if multiprocessing.context.get_spawning_popen() is None:
            # Pickled for anything but starting a process (which shares the word): a copy
            # with its own word, at this epoch.
            state["_epoch_word"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self._epoch_word is None:
            self._epoch_word = _shared_word(_seed_word(self._epoch))

    @property
    def num_samples(self) -> int:
        """Images in the whole dataset (one epoch over every rank, before padding)."""
        return self._total

    def __len__(self) -> int:
        """Samples this rank yields per epoch, over all its DataLoader workers."""
        if self.drop_last:
            return self._total // self.world_size
        return math.ceil(self._total / self.world_size)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        worker = _worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        if self._ranks_defaulted and self.world_size == 1 and worker_id == 0:
            _warn_if_distributed_since()
        lo, hi = self._worker_share(worker_id, workers)
        local = self._process()
        sequence = _Sequence(self, self._epoch_word.value)
        source = self._samples(local, sequence, lo, hi)
        samples: Iterator[tuple[np.ndarray, Sample]] = source
        if self.shuffle:
            rng = np.random.default_rng(
                [*sequence.seed_words, _BUFFER_STREAM, self.rank, worker_id]
            )
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        image: np.ndarray | None = None
        try:
            for image, sample in samples:
                yield self._output(image, sample)
        except BaseException as exc:
            # An error a caller keeps would keep, in the frames of its traceback, the last
            # image, and with shuffle=True the buffer's (up to shuffle_buffer of them).
            image = None
            release_left(exc)
            raise
        finally:
            # Now, not when the frame goes: an error in the user's transform holds this
            # frame in its traceback, and the downloads and decoders would run on.
            source.close()

    def _worker_share(self, worker_id: int, workers: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` of the sequence that this DataLoader worker yields: a
        contiguous part of the rank's slice; whole batches with ``batch_size``, the last
        worker's ending on the rank's one short batch."""
        per_rank = len(self)
        start = self.rank * per_rank
        unit = self.batch_size or 1
        units = -(-per_rank // unit)
        lo = min(per_rank, unit * (units * worker_id // workers))
        hi = min(per_rank, unit * (units * (worker_id + 1) // workers))
        return start + lo, start + hi

    def _samples(
        self, local: _Local, sequence: _Sequence, lo: int, hi: int
    ) -> Generator[tuple[np.ndarray, Sample], None, None]:
        """Exactly ``hi - lo`` decoded samples: positions ``[lo, hi)`` of the sequence, then as
        many following positions (wrapping) as were skipped."""
        handle = local.handle
        missing = 0
        started = time.perf_counter()
        own = handle.decode_chunks(local.decoder, sequence.segments(lo, hi), expect=self._counts)
        try:
            for sample, result in own:
                image = handle.accept(sample, result)
                if image is None:
                    missing += 1
                else:
                    if handle.stats.first_image_seconds is None:
                        handle.note_first_image(started)
                    yield image, sample
        finally:
            own.close()
        if not missing:
            return
        # Pad as DistributedSampler does, with what follows the slice, wrapping as often as
        # it takes (a slice may skip more images than the rest of the job holds). Errors
        # met here are some other worker's to report (or this one's, met again): skip them.
        # As many positions at a time as images are missing, and the rest of the chunk that
        # holds the first: a plan of the whole job would download (and prefetch) chunks for
        # images never taken, and one of fewer positions the same chunk again and again
        # over a run of bad images (streaming keeps no chunk), every epoch.
        start = hi
        barren = 0  # positions met in a row that did not decode
        while missing:
            span = max(missing, sequence.chunk_end(start) - start)
            extra = handle.decode_chunks(
                local.decoder, sequence.segments(start, start + span), expect=self._counts
            )
            try:
                for sample, result in extra:
                    if isinstance(result, np.ndarray):
                        handle.accept(sample, result)  # counts it
                        yield result, sample
                        missing -= 1
                        barren = 0
                        if not missing:
                            return
                    else:
                        barren += 1
            finally:
                extra.close()
            if barren >= self._total:  # a whole pass over the job and not one image decoded
                raise PixCrawlerError(f"no image of job {self.dataset.job.id} could be decoded")
            start += span


class _Sequence:
    """One epoch's sample order: position → (chunk, image in chunk), positions mod N."""

    def __init__(self, owner: _Streaming, epoch: int) -> None:
        counts = owner._counts
        order = [index for index in sorted(counts) if counts[index] > 0]
        self.shuffle = owner.shuffle
        self.seed_words = [_seed_word(owner.seed), _seed_word(epoch)]  # any int, as torch
        if self.shuffle:
            rng = np.random.default_rng([*self.seed_words, _SEQUENCE_STREAM])
            order = [order[i] for i in rng.permutation(len(order))]
        self.order = order
        self.counts = [counts[index] for index in order]
        self.starts = [0]
        for count in self.counts:
            self.starts.append(self.starts[-1] + count)
        self.total = self.starts[-1]

    def offsets(self, slot: int, lo: int, hi: int) -> list[int]:
        if not self.shuffle:
            return list(range(lo, hi))
        rng = np.random.default_rng([*self.seed_words, _CHUNK_STREAM, self.order[slot]])
        return [int(i) for i in rng.permutation(self.counts[slot])[lo:hi]]

    def _slot(self, position: int) -> tuple[int, int]:
        """``position`` within the epoch (positions wrap), and the slot of its chunk."""
        wrapped = position % self.total
        return wrapped, bisect.bisect_right(self.starts, wrapped) - 1

    def chunk_end(self, position: int) -> int:
        """The position just past the last of the chunk that holds ``position``."""
        wrapped, slot = self._slot(position)
        return position - wrapped + self.starts[slot + 1]

    def segments(self, lo: int, hi: int) -> list[tuple[int, list[int]]]:
        """``(chunk index, images in it)`` covering positions ``[lo, hi)`` in order."""
        segments: list[tuple[int, list[int]]] = []
        position = lo
        while position < hi and self.total:
            wrapped, slot = self._slot(position)
            first = wrapped - self.starts[slot]
            take = min(hi - position, self.counts[slot] - first)
            segments.append((self.order[slot], self.offsets(slot, first, first + take)))
            position += take
        return segments


# -- shared helpers ------------------------------------------------------------------------


def _worker_info() -> Any:
    return require("torch.utils.data", "torch").get_worker_info()


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else ``torch.distributed``'s when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        dist = require("torch.distributed", "torch")
        initialised = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = int(dist.get_world_size()) if initialised else 1
        if rank is None:
            rank = int(dist.get_rank()) if initialised else 0
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return rank, world_size


def _warn_if_distributed_since() -> None:
    """A stream made before ``init_process_group`` took rank 0 of 1: every rank then yields
    the whole dataset. Nothing hangs, so say it rather than let it pass unseen."""
    dist = require("torch.distributed", "torch")
    initialised = dist.is_available() and dist.is_initialized()
    if initialised and dist.get_world_size() > 1:
        warnings.warn(
            f"this streaming dataset was made before torch.distributed was initialised, so "
            f"it is rank 0 of 1 and each of the {dist.get_world_size()} ranks yields the "
            "whole dataset; call to_torch(streaming=True) after init_process_group, or pass "
            "rank= and world_size=",
            RuntimeWarning,
            stacklevel=3,
        )
    elif not initialised and (launched := os.environ.get("WORLD_SIZE", "").strip()) not in (
        "",
        "1",
    ):
        # torchrun (or a job launcher) started this process as one of several, and no
        # process group is up: each of them yields the whole dataset.
        warnings.warn(
            f"WORLD_SIZE={launched[:20]} is set, but torch.distributed is not initialised, so "
            "this streaming dataset is rank 0 of 1 and this process yields the whole "
            "dataset; call init_process_group before to_torch(streaming=True), or pass "
            "rank= and world_size=",
            RuntimeWarning,
            stacklevel=3,
        )


def _seed_word(seed: int) -> int:
    return seed % (1 << 64)  # SeedSequence takes non-negative words


def _shared_word(value: int = 0) -> ctypes.c_uint64:
    """A 64-bit word in memory shared with the processes started (forked or spawned) after;
    where no shared memory can be made (no ``/dev/shm`` in some sandboxes), one of this
    process's own, and workers already running keep the epoch they began with."""
    try:
        word: ctypes.c_uint64 = multiprocessing.RawValue("Q", value)
    except OSError as exc:
        log.warning(
            "no shared memory for the epoch (%s): DataLoader workers kept between epochs "
            "(persistent_workers=True) will not see set_epoch",
            exc,
        )
        return ctypes.c_uint64(value)
    return word


def _shuffled(
    items: Iterator[tuple[np.ndarray, Sample]], size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, Sample]]:
    """A bounded shuffle buffer: each new item swaps out a random held one."""
    buffer: list[tuple[np.ndarray, Sample]] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def label_names(dataset: Dataset) -> tuple[str, ...]:
    """The names whose positions are the class ids the frameworks give: the job's
    ``labels``. A job with images that lists none (another producer) is refused here, not
    at its first image, once chunks have downloaded and a training loop has started."""
    if unlabelled(dataset.job):
        raise PixCrawlerError(
            f"job {dataset.job.id} lists no labels, so its images' labels have no class ids: "
            "iterate it, or use to_arrays() or to_dataframe(), which give label names"
        )
    return dataset.labels


def _chunk_counts(dataset: Dataset) -> dict[int, int]:
    """Images per chunk, from the job; a chunk the API lists without a count is opened."""
    counts: dict[int, int] = {}
    missing: list[int] = []
    for chunk in dataset.job.chunks:
        if chunk.image_count is None:
            missing.append(chunk.index)
        else:
            counts[chunk.index] = chunk.image_count
    if missing:
        log.info(
            "job %s lists no image count for %d chunks: reading them", dataset.job.id, len(missing)
        )
        downloader = dataset.downloader()
        try:
            for chunk, data in downloader.iter_chunks(missing):
                counts[chunk.index] = len(ChunkArchive(data, chunk_id=chunk.index))
        finally:
            dataset.release_downloader(downloader)
        held, total = sum(counts.values()), dataset.job.total_images
        if total and held != total:  # as plain iteration refuses it (before any image here)
            raise total_mismatch(dataset.job.id, total, f"{held:,}")
    return counts


@functools.cache
def _torch_classes() -> dict[str, type]:
    """The torch dataset classes, built on first use so that torch is imported only then."""
    data = require("torch.utils.data", "torch")
    built: dict[str, type] = {}
    for kind, name, mixin, base in (
        ("map", "TorchDataset", _MapStyle, data.Dataset),
        ("streaming", "TorchIterableDataset", _Streaming, data.IterableDataset),
    ):

        def body(namespace: dict[str, Any], name: str = name, mixin: type = mixin) -> None:
            namespace.update(__module__=__name__, __qualname__=name, __doc__=mixin.__doc__)

        built[kind] = types.new_class(name, (mixin, base), {}, body)
    return built


def _torch_class(kind: str) -> Any:
    return _torch_classes()[kind]


def _rebuild(kind: str, state: dict[str, Any]) -> Any:
    """Unpickle a torch dataset (in a DataLoader worker, say): class rebuilt, state restored."""
    cls = _torch_class(kind)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


# -- TensorFlow ------------------------------------------------------------------------------


_TF_ROWS = 64  # images per call into the generator of to_tensorflow(), at most
_TF_BATCH_BYTES = 8 << 20  # and the bytes of one such batch, at most (one image at least)


def _tf_rows(shape: tuple[int, int, int]) -> int:
    """Images per batch of :func:`_tf_batches`: 64, or fewer where their bytes would pass
    ``_TF_BATCH_BYTES`` (64 images of 1024x1024 RGB took 192 MB, held beside the batches
    TensorFlow still had), and one where a single image does."""
    height, width, channels = shape
    return max(1, min(_TF_ROWS, _TF_BATCH_BYTES // max(1, height * width * channels)))


def _tf_batches(
    labelled: Callable[[], Iterator[tuple[np.ndarray, int]]], shape: tuple[int, int, int]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``labelled()``'s images of one ``shape`` in batches, for TensorFlow to unbatch: one
    call into Python per image cost about as much CPU as decoding a small one. The first
    batch is one image (the first element waits for no more), each next twice as large up
    to :func:`_tf_rows`. Each batch is new: TensorFlow may keep a yielded array as its
    tensor's memory, not copy it."""
    most, size = _tf_rows(shape), 1
    images, labels, rows = np.empty((size, *shape), np.uint8), np.empty(size, np.int64), 0
    try:
        for image, label in labelled():
            images[rows] = image
            labels[rows] = label
            rows += 1
            if rows == size:
                yield images, labels
                size = min(most, 2 * size)
                images, labels = np.empty((size, *shape), np.uint8), np.empty(size, np.int64)
                rows = 0
    except Exception:
        if rows:  # the images before the error reach the pipeline, as one by one
            yield images[:rows], labels[:rows]
        raise
    if rows:
        yield images[:rows], labels[:rows]


def to_tensorflow(dataset: Dataset, *, image_size: ImageSize | None = None) -> Any:
    """A ``tf.data.Dataset`` of ``(image, label_id)``: uint8 ``(H, W, C)`` and int64.

    The image shape is fixed when ``image_size`` (here or at ``load_dataset``) or the job's
    own uniform size fixes it, else ``(None, None, C)``; mixed sizes then need
    ``image_size`` (or a ``map`` that resizes) before ``batch``. With ``on_error="raise"``,
    on a job that lists its image counts, the cardinality is known (``len(tf_dataset)``
    works). Each iteration (each Keras epoch)
    streams the chunks again.

    Example:
        >>> tf_dataset = dataset.to_tensorflow().batch(32).prefetch(tf.data.AUTOTUNE)
        >>> model.fit(tf_dataset, epochs=10)
    """
    tf = require("tensorflow", "tensorflow")
    size = validate_image_size(image_size) if image_size is not None else None
    shape_size = size or dataset.image_size or dataset.job.image_size
    channels = ImageDecoder(dataset.mode).channels
    height, width = shape_size if shape_size is not None else (None, None)
    # A size only the job lists is the producer's word, not a resize: an image that
    # differs gets the error to_arrays() gives, not TensorFlow's mid-epoch shape error.
    listed = None if size or dataset.image_size else dataset.job.image_size
    label_ids = {name: i for i, name in enumerate(label_names(dataset))}

    def labelled() -> Iterator[tuple[np.ndarray, int]]:
        for sample, image in dataset.iter_samples(size):
            if listed is not None and image.shape[:2] != tuple(listed):
                raise MixedImageSizesError(
                    f"image {sample.id!r} is {image.shape[1]}x{image.shape[0]} but job "
                    f"{dataset.job.id} lists every image as {listed[1]}x{listed[0]}: pass "
                    "image_size=(H, W) to resize them all.",
                    chunk_id=sample.chunk_id,
                    sample_id=sample.id,
                )
            label = label_ids.get(sample.label)
            if label is None:
                raise PixCrawlerError(
                    f"image {sample.id!r} has label {sample.label!r}, which the job does not "
                    f"list in its labels {list(dataset.labels)}"
                )
            yield image, label

    def one_by_one() -> Iterator[tuple[np.ndarray, np.int64]]:
        for image, label in labelled():
            yield image, np.int64(label)

    if height is not None and width is not None:
        tf_dataset = tf.data.Dataset.from_generator(
            functools.partial(_tf_batches, labelled, (height, width, channels)),
            output_signature=(
                tf.TensorSpec(shape=(None, height, width, channels), dtype=tf.uint8),
                tf.TensorSpec(shape=(None,), dtype=tf.int64),
            ),
        ).unbatch()
    else:  # sizes vary: one image at a time
        tf_dataset = tf.data.Dataset.from_generator(
            one_by_one,
            output_signature=(
                tf.TensorSpec(shape=(None, None, channels), dtype=tf.uint8),
                tf.TensorSpec(shape=(), dtype=tf.int64),
            ),
        )
    if dataset.on_error == "raise" and counts_listed(dataset.job):
        tf_dataset = tf_dataset.apply(tf.data.experimental.assert_cardinality(dataset.num_images))
    return tf_dataset
