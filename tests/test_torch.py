"""``to_torch``: the map-style dataset (chunk store, DataLoader workers, random_split), the
streaming one (ranks × workers, padding, shuffle), real DDP, and the spec's PyTorch examples."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import LiveServer
from constants import (
    JOB_MIXED,
    JOB_UNIFORM,
    MIXED_TOTAL,
    TEST_KEYS,
    UNIFORM_CHUNK_SIZE,
    UNIFORM_LABELS,
    UNIFORM_SIZE,
    UNIFORM_TOTAL,
)
from helpers import (
    arrays_in_frames,
    copy_without_counts,
    corrupt_copy,
    drop_counts,
    edited_copy,
    hold_lock,
    raised_once_closed,
    reachable_buffers,
    sdk_threads_left,
)
from pixcrawler import Dataset, config, load_dataset
from pixcrawler.config import ENV_CACHE_DIR
from pixcrawler.exceptions import DecompressionError, DownloadError, PixCrawlerError
from pixcrawler.testing import StaticServer
from pixcrawler.testing.faults import Fault, FaultProxy, FaultSchedule

SRC = Path(__file__).resolve().parents[1] / "src"

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, random_split  # noqa: E402

pytestmark = pytest.mark.timeout(120)

NUM_CHUNKS = -(-UNIFORM_TOTAL // UNIFORM_CHUNK_SIZE)
FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
# Images of the corrupted copy of job_uniform that cannot be decoded: three in rank 0's half
# (two of them adjacent), one in rank 1's, and the very last (so "next valid" wraps around).
CORRUPT = (5, 16, 17, 59)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default disk cache goes to a fresh folder, never the user's cache dir."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(ENV_CACHE_DIR, str(folder))
    return folder


@pytest.fixture(autouse=True)
def _no_garbage_for_forked_workers() -> None:
    """Collect cyclic garbage before a test can fork DataLoader workers: a TensorFlow object
    left by an earlier test and collected inside a worker aborts it (see frameworks.md)."""
    gc.collect()


def key(image: Any) -> str:
    """Identity of an image by its pixels (every image of job_uniform is distinct)."""
    array = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


@dataclass(frozen=True)
class Reference:
    """job_uniform as plain iteration yields it: index → pixels, label id, key."""

    images: list[np.ndarray]
    label_ids: list[int]
    keys: list[str]

    @property
    def index_of(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}


@pytest.fixture(scope="module")
def reference(live_server: LiveServer) -> Reference:
    dataset = load_dataset(JOB_UNIFORM, api_key=live_server.api_key, base_url=live_server.base_url)
    images, label_ids = [], []
    for image, label in dataset:
        images.append(image)
        label_ids.append(dataset.labels.index(label))
    keys = [key(image) for image in images]
    assert len(set(keys)) == UNIFORM_TOTAL
    return Reference(images, label_ids, keys)


def open_uniform(live: LiveServer | str, api_key: str | None = None, **options: Any) -> Dataset:
    base_url = live.base_url if isinstance(live, LiveServer) else live
    key_ = live.api_key if isinstance(live, LiveServer) else api_key
    return load_dataset(JOB_UNIFORM, api_key=key_, base_url=base_url, **options)


@pytest.fixture
def through_blobs(
    live_server: LiveServer, server_factory: Callable[..., str]
) -> Iterator[tuple[str, StaticServer]]:
    """An API whose chunk URLs point at a static host that counts every request."""
    with StaticServer(live_server.store) as blobs:
        yield server_factory(live_server.store, chunk_base_url=blobs.base_url), blobs


def chunk_requests(blobs: StaticServer) -> Counter[str]:
    return Counter({p: n for p, n in blobs.stats.requests_by_path.items() if "/chunks/" in p and n})


# -- a copy of job_uniform with undecodable images -----------------------------------------


@pytest.fixture(scope="module")
def corrupt_server(
    live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from pixcrawler.server import create_app, run_in_thread

    dest = corrupt_copy(live_server.store, tmp_path_factory.mktemp("corrupt"), CORRUPT)
    with run_in_thread(create_app(dest, TEST_KEYS)) as base_url:
        yield base_url


# -- map-style -----------------------------------------------------------------------------


def test_map_style_items_equal_plain_iteration_pixels_and_label_ids(
    live_server: LiveServer, reference: Reference
) -> None:
    dataset = open_uniform(live_server)
    torch_dataset = dataset.to_torch()
    assert isinstance(torch_dataset, torch.utils.data.Dataset)
    assert not isinstance(torch_dataset, IterableDataset)
    assert len(torch_dataset) == UNIFORM_TOTAL
    for index in reversed(range(UNIFORM_TOTAL)):  # any order
        image, label = torch_dataset[index]
        assert isinstance(label, int) and label == reference.label_ids[index]
        assert image.dtype == np.uint8 and image.shape == (*UNIFORM_SIZE, 3)
        np.testing.assert_array_equal(image, reference.images[index])
    assert torch_dataset.classes == list(UNIFORM_LABELS)
    assert torch_dataset.class_to_idx == {name: i for i, name in enumerate(UNIFORM_LABELS)}
    assert torch_dataset.store.stats.downloads == NUM_CHUNKS


def test_images_a_caller_keeps_stay_intact_while_later_ones_decode(
    live_server: LiveServer, reference: Reference
) -> None:
    """Decodes reuse the buffers of images nobody holds any more, never of one still held
    (as a list, a tensor, or a view of it)."""
    torch_dataset = open_uniform(live_server).to_torch()
    kept = [torch_dataset[index][0] for index in range(UNIFORM_TOTAL)]
    tensors = [torch.from_numpy(torch_dataset[index][0]) for index in range(UNIFORM_TOTAL)]
    views = [torch_dataset[index][0][2:9] for index in range(UNIFORM_TOTAL)]
    for _ in range(3):  # many more decodes, dropped at once
        for index in range(UNIFORM_TOTAL):
            torch_dataset[index]
    for index in range(UNIFORM_TOTAL):
        np.testing.assert_array_equal(kept[index], reference.images[index])
        np.testing.assert_array_equal(tensors[index].numpy(), reference.images[index])
        np.testing.assert_array_equal(views[index], reference.images[index][2:9])


def test_map_style_serves_mixed_sizes_and_nested_labels(live_server: LiveServer) -> None:
    dataset = load_dataset(JOB_MIXED, api_key=live_server.api_key, base_url=live_server.base_url)
    expected = [(image, dataset.labels.index(label)) for image, label in dataset]
    torch_dataset = dataset.to_torch(cache_dir=False)
    assert len(torch_dataset) == MIXED_TOTAL
    for index, (image, label) in enumerate(expected):
        got, got_label = torch_dataset[index]
        assert got_label == label
        np.testing.assert_array_equal(got, image)


def test_map_style_indexing_is_a_sequence(live_server: LiveServer, reference: Reference) -> None:
    torch_dataset = open_uniform(live_server).to_torch()
    np.testing.assert_array_equal(torch_dataset[-1][0], reference.images[-1])
    np.testing.assert_array_equal(torch_dataset[np.int64(7)][0], reference.images[7])
    with pytest.raises(IndexError):
        torch_dataset[UNIFORM_TOTAL]
    with pytest.raises(TypeError):
        torch_dataset[1.5]
    batch = torch_dataset.__getitems__([3, 40, 3])  # DataLoader's batched fetch, 2 threads
    assert [label for _, label in batch] == [reference.label_ids[i] for i in (3, 40, 3)]


def test_image_size_resizes_and_transform_gets_the_uint8_array(live_server: LiveServer) -> None:
    seen: list[tuple[tuple[int, ...], Any]] = []

    def transform(image: np.ndarray) -> str:
        seen.append((image.shape, image.dtype))
        return "transformed"

    torch_dataset = open_uniform(live_server).to_torch(transform, image_size=(16, 20))
    assert torch_dataset[0] == ("transformed", 0)
    assert seen == [((16, 20, 3), np.uint8)]


def test_default_collate_gives_uint8_bhwc_and_int64_labels(live_server: LiveServer) -> None:
    loader = DataLoader(open_uniform(live_server).to_torch(), batch_size=8)
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (8, *UNIFORM_SIZE, 3)
    assert labels.dtype == torch.int64


def test_dataloader_with_two_workers_and_shuffle_sees_every_index_once_per_epoch(
    live_server: LiveServer, reference: Reference
) -> None:
    torch_dataset = open_uniform(live_server).to_torch()
    torch_dataset[0]  # used in this process first: workers must not reuse its connections
    loader = DataLoader(
        torch_dataset,
        batch_size=8,
        shuffle=True,
        num_workers=2,
        generator=torch.Generator().manual_seed(0),
    )
    orders = []
    for _epoch in range(2):
        order = []
        for images, labels in loader:
            for image, label in zip(images, labels.tolist(), strict=True):
                index = reference.index_of[key(image)]
                assert label == reference.label_ids[index]
                order.append(index)
        assert sorted(order) == list(range(UNIFORM_TOTAL))
        orders.append(order)
    assert orders[0] != orders[1]


def test_random_split_gives_disjoint_subsets_that_load(
    live_server: LiveServer, reference: Reference
) -> None:
    torch_dataset = open_uniform(live_server).to_torch()
    train, val = random_split(torch_dataset, [48, 12], generator=torch.Generator().manual_seed(1))
    assert (len(train), len(val)) == (48, 12)
    assert not set(train.indices) & set(val.indices)
    keys = [
        key(images[i]) for images, _ in DataLoader(val, batch_size=5) for i in range(len(images))
    ]
    assert [reference.index_of[k] for k in keys] == list(val.indices)


def test_second_epoch_over_a_cached_dataset_makes_no_request(
    live_server: LiveServer, through_blobs: tuple[str, StaticServer]
) -> None:
    api, blobs = through_blobs
    torch_dataset = open_uniform(api, live_server.api_key).to_torch()
    loader = DataLoader(torch_dataset, batch_size=8, shuffle=True, num_workers=2)
    assert sum(len(labels) for _, labels in loader) == UNIFORM_TOTAL
    # Both workers wanted every chunk; the per-chunk lock made one download each.
    assert chunk_requests(blobs) == Counter(
        {f"/{JOB_UNIFORM}/chunks/{i:05d}.zip": 1 for i in range(NUM_CHUNKS)}
    )
    blobs.reset_stats()
    assert sum(len(labels) for _, labels in loader) == UNIFORM_TOTAL  # fresh worker processes
    assert blobs.stats.requests == 0


@pytest.mark.parametrize(
    ("chunk", "indices", "batch", "budget"),
    [
        (0, [0, UNIFORM_TOTAL - 1], True, None),  # a first batch, of chunks 0 and 3
        # ds[i] alone, as DataLoader(batch_size=None) or a plain loop asks for it
        (1, [UNIFORM_CHUNK_SIZE], False, None),  # the first image of chunk 1
        # room for chunk 0 only: chunk 3 loads once the batch's images are decoded
        (3, [0, UNIFORM_TOTAL - 1], True, 1),
    ],
    ids=["batch", "one item", "batch over the memory budget"],
)
def test_a_map_style_load_kept_waiting_on_its_chunk_says_why(
    live_server: LiveServer,
    tmp_path: Path,
    slow_waits: Callable[[], list[str]],
    caplog: pytest.LogCaptureFixture,
    chunk: int,
    indices: list[int],
    batch: bool,
    budget: int | None,
) -> None:
    """A load that waits on its download logs how far it got, as it waits."""
    stall = Fault("stall", after_bytes=2_000, seconds=1.0)
    schedule = FaultSchedule.script([stall], match=rf"/chunks/{chunk}$")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        dataset = open_uniform(proxy.base_url, live_server.api_key, max_workers=1)
        options: dict[str, Any] = {}
        if budget is not None:  # this many chunks' bytes
            options["memory_budget"] = budget * (dataset.job.chunks[0].size_bytes or 0)
        torch_dataset = dataset.to_torch(cache_dir=tmp_path, **options)
        if batch:
            items = torch_dataset.__getitems__(indices)
        else:
            items = [torch_dataset[i] for i in indices]
        assert proxy.stats.faults["stall"] == 1
    assert [label for _, label in items] == [torch_dataset[i][1] for i in indices]
    assert [image.shape for image, _ in items] == [(*UNIFORM_SIZE, 3)] * len(indices)
    waits = slow_waits()
    assert waits, caplog.text
    # (On a loaded machine the first may come before the 2 KB, or one as the stall ends
    # after the transfer is done: the stall's own messages say how far it got.)
    assert all(f" for chunk {chunk}: " in m for m in waits), waits
    assert any(re.search(rf" for chunk {chunk}: 2\.0 KB of [\d.]+ KB received", m) for m in waits)
    # And in the stats, as plain iteration keeps them (they said 0 chunks, 0 s waited).
    stats = dataset.stats
    assert stats.chunks >= 1 and stats.wait_seconds >= 0.9, stats
    assert stats.first_image_seconds is not None and stats.first_image_seconds > 0, stats


def test_an_item_over_the_memory_budget_is_downloaded_once(
    live_server: LiveServer, through_blobs: tuple[str, StaticServer]
) -> None:
    """With no room in memory and no disk cache, an item's chunk is still fetched once:
    the store keeps the chunk it loaded last, so fetching it ahead costs nothing twice."""
    api, blobs = through_blobs
    torch_dataset = open_uniform(api, live_server.api_key).to_torch(
        memory_budget=0, cache_dir=False
    )
    torch_dataset[0]
    assert chunk_requests(blobs) == Counter({f"/{JOB_UNIFORM}/chunks/00000.zip": 1})


@pytest.mark.parametrize("where", ["an image", "the zip directory"])
def test_a_rotted_cache_file_with_a_valid_stamp_is_downloaded_again_not_served(
    live_server: LiveServer, reference: Reference, where: str
) -> None:
    """Bit rot in a cached chunk moves no timestamp, so its stamp still matches: the first
    image that fails its sha256, or an archive that no longer opens (a torn end, where the
    zip keeps its directory), makes the file be hashed, replaced, and the image served."""
    from pixcrawler import cache as cache_module

    first = open_uniform(live_server).to_torch()
    first[0]  # downloads, caches and stamps chunk 0
    path = first.store.path(0)
    assert path is not None
    member = first.store.archive(0).samples[0].member
    data = bytearray(path.read_bytes())
    if where == "an image":
        data[member.offset + 100] ^= 0xFF
    else:
        data[-22:] = bytes(22)  # the end-of-central-directory record, zeroed
    path.write_bytes(bytes(data))
    cache_module._write_stamp(path, path.stat(), path.name.split("-")[1][:-4])  # as if rotted

    fresh = open_uniform(live_server).to_torch()  # another process: trusts the stamp
    image, label = fresh[0]
    np.testing.assert_array_equal(image, reference.images[0])
    assert label == reference.label_ids[0]
    assert fresh.store.stats.corrupt_files == 1 and fresh.store.stats.downloads == 1


@pytest.mark.parametrize("listed", ["sha256", "size only"])
def test_a_rotted_file_in_a_cache_this_process_cannot_write_is_not_trusted_again(
    live_server: LiveServer,
    reference: Reference,
    server_factory: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    listed: str,
) -> None:
    """A bad image makes a stamped (or, without a sha256, size-checked) file be looked at
    again by deleting its stamp or the file; in a cache this process cannot change (a
    read-only mount, another user's files in a shared folder) the deletes failed in
    silence and the same rotted bytes were trusted again: the image failed on every run."""
    from pixcrawler import cache as cache_module

    def drop_sha256(job: dict[str, Any]) -> None:
        for chunk in job["chunks"]:
            del chunk["sha256"]

    base_url = live_server.base_url
    if listed == "size only":
        base_url = server_factory(
            edited_copy(live_server.store, tmp_path, JOB_UNIFORM, drop_sha256)
        )
    first = open_uniform(base_url, live_server.api_key).to_torch()
    first[0]  # downloads, caches and stamps chunk 0
    path = first.store.path(0)
    assert path is not None
    data = bytearray(path.read_bytes())
    data[first.store.archive(0).samples[0].member.offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    if listed == "sha256":
        cache_module._write_stamp(path, path.stat(), path.name.split("-")[1][:-4])

    def refused(target: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(target))

    real_unlink, real_replace = Path.unlink, os.replace
    for owner, name, real in (
        (Path, "unlink", real_unlink),
        (cache_module.os, "replace", real_replace),
    ):

        def guarded(target: Any, *args: Any, real: Any = real, **kwargs: Any) -> Any:
            if str(path.parent) in str(target):  # nothing in the cache folder changes
                refused(target)
            return real(target, *args, **kwargs)

        monkeypatch.setattr(owner, name, guarded)
    monkeypatch.setattr(cache_module.os, "unlink", refused)

    for _ in range(2):  # another process, and another again: the same file each time
        fresh = open_uniform(base_url, live_server.api_key).to_torch()
        image, _ = fresh[0]
        np.testing.assert_array_equal(image, reference.images[0])
        assert fresh.store.stats.downloads == 1
        assert fresh.store.stats.corrupt_files == 1  # (one without a sha256 too)


def test_a_batch_over_chunks_of_unlisted_size_fetches_each_once_within_the_budget(
    live_server: LiveServer, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """A chunk listed without size_bytes counted as 0 bytes against the memory budget: a
    batch fetched all its chunks at once, the budget evicted them at once, and each was
    fetched again as its images were read."""

    def drop_sizes(job: dict[str, Any]) -> None:
        job.pop("size_bytes", None)
        for chunk in job["chunks"]:
            del chunk["size_bytes"]

    base_url = server_factory(edited_copy(live_server.store, tmp_path, JOB_UNIFORM, drop_sizes))
    one_chunk = (live_server.store / JOB_UNIFORM / "chunks" / "00000.zip").stat().st_size
    torch_dataset = open_uniform(base_url, live_server.api_key).to_torch(
        memory_budget=one_chunk, cache_dir=False
    )
    assert len(torch_dataset.__getitems__(list(range(UNIFORM_TOTAL)))) == UNIFORM_TOTAL
    assert torch_dataset.store.stats.downloads == -(-UNIFORM_TOTAL // UNIFORM_CHUNK_SIZE)


@pytest.mark.parametrize("threads", [1, 4])
def test_a_shuffled_batch_over_more_chunks_than_the_budget_holds_fetches_each_once(
    live_server: LiveServer, reference: Reference, threads: int
) -> None:
    """Images loaded in the batch's order evicted, one after another, chunks the same batch
    needed again (a batch of 60 over 4 chunks, a budget of about one: ~49 downloads)."""
    one_chunk = (live_server.store / JOB_UNIFORM / "chunks" / "00000.zip").stat().st_size
    torch_dataset = open_uniform(live_server, decode_threads=threads).to_torch(
        memory_budget=one_chunk, cache_dir=False
    )
    order = np.random.default_rng(7).permutation(UNIFORM_TOTAL).tolist()
    batch = torch_dataset.__getitems__(order)
    for position, (image, label) in zip(order, batch, strict=True):
        np.testing.assert_array_equal(image, reference.images[position])
        assert label == reference.label_ids[position]
    assert torch_dataset.store.stats.downloads == -(-UNIFORM_TOTAL // UNIFORM_CHUNK_SIZE)


def test_a_rotted_cache_file_is_replaced_once_for_a_batch_of_decode_threads(
    live_server: LiveServer, reference: Reference
) -> None:
    """Every image of a cached chunk rotted, read as one batch by 4 decode threads: the
    first to fail rechecks the file; the others, failing on the same bytes, decode again
    from the replaced chunk instead of marking good images bad for the whole process."""
    from pixcrawler import cache as cache_module

    first = open_uniform(live_server).to_torch()
    first[0]
    path = first.store.path(0)
    assert path is not None
    data = bytearray(path.read_bytes())
    for sample in first.store.archive(0).samples:
        data[sample.member.offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    cache_module._write_stamp(path, path.stat(), path.name.split("-")[1][:-4])

    fresh = open_uniform(live_server, decode_threads=4, on_error="skip").to_torch()
    for _ in range(2):  # and the next epoch
        batch = fresh.__getitems__(list(range(UNIFORM_CHUNK_SIZE)))
        for position, (image, label) in enumerate(batch):
            np.testing.assert_array_equal(image, reference.images[position])
            assert label == reference.label_ids[position]
    assert fresh.store.stats.corrupt_files == 1 and fresh.store.stats.downloads == 1


def test_memory_only_cache_serves_a_second_epoch_in_process_without_request(
    live_server: LiveServer, through_blobs: tuple[str, StaticServer], private_cache: Path
) -> None:
    api, blobs = through_blobs
    torch_dataset = open_uniform(api, live_server.api_key).to_torch(cache_dir=False)
    loader = DataLoader(torch_dataset, batch_size=16, shuffle=True)
    for _epoch in range(2):
        assert sum(len(labels) for _, labels in loader) == UNIFORM_TOTAL
        if _epoch == 0:
            assert len(chunk_requests(blobs)) == NUM_CHUNKS
            blobs.reset_stats()
    assert blobs.stats.requests == 0
    assert not private_cache.exists()  # nothing written to disk


def test_pickles_without_live_state_and_loads_in_spawned_workers(
    live_server: LiveServer, reference: Reference
) -> None:
    torch_dataset = open_uniform(live_server).to_torch()
    torch_dataset[0]  # opens a client, a downloader and the chunk store in this process
    clone = pickle.loads(pickle.dumps(torch_dataset))
    assert clone._local is None and type(clone) is type(torch_dataset)
    np.testing.assert_array_equal(clone[33][0], reference.images[33])

    loader = DataLoader(
        torch_dataset, batch_size=30, num_workers=1, multiprocessing_context="spawn"
    )
    keys = [key(image) for images, _ in loader for image in images]
    assert keys == reference.keys


def test_the_pixel_limit_travels_with_a_pickled_torch_dataset(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawned DataLoader worker imports a fresh config: the limit set in the parent
    (as a decode error tells users to) goes with the pickle, not the default."""
    torch_dataset = open_uniform(live_server).to_torch(cache_dir=False)
    monkeypatch.setattr(config, "MAX_IMAGE_PIXELS", 100)
    clone = pickle.loads(pickle.dumps(torch_dataset))
    monkeypatch.undo()  # the worker's own config: the default
    with pytest.raises(DecompressionError, match="limit of 100"):
        clone[0]
    assert torch_dataset[0][0].shape == (*UNIFORM_SIZE, 3)  # here: config's, as it is now


def test_a_stream_keeps_the_stats_plain_iteration_keeps(live_server: LiveServer) -> None:
    """Streaming never set the time to the first image."""
    dataset = open_uniform(live_server)
    assert len(list(dataset.to_torch(streaming=True))) == UNIFORM_TOTAL
    stats = dataset.stats
    assert stats.images == UNIFORM_TOTAL and stats.chunks == dataset.num_chunks
    assert stats.first_image_seconds is not None and stats.first_image_seconds > 0, stats
    dataset.close()


def test_a_stream_held_over_close_says_the_dataset_is_closed(live_server: LiveServer) -> None:
    """Not the downloader's private cancel (`_Cancelled: the download was cancelled`)."""
    dataset = open_uniform(live_server)
    images = iter(dataset.to_torch(streaming=True))
    next(images)
    dataset.close()
    with pytest.raises(PixCrawlerError, match=r"^the dataset is closed$"):
        for _ in images:
            pass


def test_closing_the_dataset_ends_its_torch_datasets_threads(live_server: LiveServer) -> None:
    before = set(threading.enumerate())
    dataset = open_uniform(live_server)
    torch_dataset = dataset.to_torch(cache_dir=False)
    torch_dataset.__getitems__(list(range(0, UNIFORM_TOTAL, 7)))  # fetch and decode threads
    assert torch_dataset.store.memory_bytes > 0

    assert sdk_threads_left(before, timeout=0)
    dataset.close()
    assert sdk_threads_left(before) == []
    assert torch_dataset._local is None  # its cached chunks are let go


def test_a_chunk_without_a_sha256_is_cached_per_version_of_its_job(
    tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """Re-packed by a producer that keeps the version and lists no sha256, a chunk of the
    same size was served from the disk cache with the last version's pixels."""
    from PIL import Image

    from pixcrawler.packer import pack

    colours = {"0000.png": (255, 0, 0), "0001.png": (0, 0, 255)}
    (tmp_path / "src" / "cat").mkdir(parents=True)
    store = tmp_path / "store"
    store.mkdir()
    base_url = server_factory(store)

    def publish(order: list[str], completed_at: str) -> None:
        for name, colour in zip(order, colours.values(), strict=True):
            # Stored PNGs of one size are files of one size: the chunk keeps its size.
            Image.new("RGB", (8, 8), colour).save(tmp_path / "src" / "cat" / name, compress_level=0)
        pack(tmp_path / "src", store, job_id="job_nosum")
        job_path = store / "job_nosum" / "job.json"
        job = json.loads(job_path.read_text())
        job.update(version=1, completed_at=completed_at)
        for chunk in job["chunks"]:
            chunk["sha256"] = None
        job_path.write_text(json.dumps(job))

    def first_pixels() -> list[int]:
        dataset = load_dataset("job_nosum", "test-key", base_url)
        with dataset:
            torch_dataset = dataset.to_torch(cache_dir=tmp_path / "cache")
            return [int(torch_dataset[i][0][0, 0, 0]) for i in range(len(torch_dataset))]

    publish(["0000.png", "0001.png"], "2025-01-01T00:00:00Z")
    assert first_pixels() == [255, 0]
    publish(["0001.png", "0000.png"], "2025-01-02T00:00:00Z")
    assert first_pixels() == [0, 255]


def test_a_bad_cache_dir_is_refused_by_to_torch(live_server: LiveServer) -> None:
    """At the call, as a ValueError, not as pathlib's error at the first item."""
    with open_uniform(live_server) as dataset:
        bad_ones: list[Any] = [123]
        if sys.platform != "win32":  # expanduser there makes a path of any user name
            bad_ones.append("~no-such-user-here/cache")
        for bad in bad_ones:
            with pytest.raises(ValueError, match="cache_dir is not a folder"):
                dataset.to_torch(cache_dir=bad)


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_closing_ends_an_items_wait_for_a_chunk_another_process_is_caching(
    live_server: LiveServer, tmp_path: Path
) -> None:
    """Another process holds chunk 0's cache lock (stopped with Ctrl-Z): closing ends the
    item's wait, so no thread is left in flock() to keep the process from exiting."""
    before = set(threading.enumerate())
    dataset = open_uniform(live_server)
    torch_dataset = dataset.to_torch(cache_dir=tmp_path)
    path = torch_dataset.store.path(0)
    assert path is not None
    fd = hold_lock(path)
    try:
        errors = raised_once_closed(lambda: torch_dataset[0], dataset.close, settle=0.5)
        assert sdk_threads_left(before) == []
    finally:
        os.close(fd)
    assert len(errors) == 1 and isinstance(errors[0], PixCrawlerError)


def test_a_torch_dataset_dropped_unclosed_frees_its_downloader_and_buffers(
    live_server: LiveServer, tmp_path: Path
) -> None:
    """A training script that builds a fresh ``to_torch()`` every epoch (as a Lightning
    ``train_dataloader`` may) and never closes it: each one's downloader, chunk buffers
    and cached chunks go with it, not when the ``Dataset`` is closed."""
    before = set(threading.enumerate())
    dataset = open_uniform(live_server)
    gone = []
    for _ in range(3):
        torch_dataset = dataset.to_torch(cache_dir=tmp_path)
        torch_dataset[0]
        local = torch_dataset._local
        assert local is not None and local.downloader is not None
        gone.append((weakref.ref(local.downloader), weakref.ref(local.store)))
        del torch_dataset, local
    gc.collect()
    assert [(d(), s()) for d, s in gone] == [(None, None)] * 3
    assert sdk_threads_left(before) == []
    dataset.close()


def test_closing_the_dataset_during_map_style_batches_raises_the_sdks_error(
    live_server: LiveServer,
) -> None:
    """close() from another thread while batches load: the batch in flight ends with a
    PixCrawlerError, never concurrent.futures' CancelledError from the pools shut down."""

    outcomes = []
    for trial in range(15):
        dataset = open_uniform(live_server)
        torch_dataset = dataset.to_torch(cache_dir=False)
        errors: list[BaseException] = []

        def consume(torch_dataset: Any, errors: list[BaseException]) -> None:
            try:
                for i in range(10_000):
                    torch_dataset.__getitems__(list(range(i % 7, UNIFORM_TOTAL, 7)))
            except BaseException as exc:  # what escapes is the point
                errors.append(exc)

        thread = threading.Thread(target=consume, args=(torch_dataset, errors))
        thread.start()
        deadline = time.monotonic() + 10
        while dataset.stats.images < 10 and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(0.0003 * (trial % 10))
        dataset.close()
        thread.join(10)
        assert not thread.is_alive() and errors
        outcomes.append(type(errors[0]))
    assert all(issubclass(kind, PixCrawlerError) for kind in outcomes), outcomes


def test_map_style_skip_serves_the_next_valid_index_and_keeps_len(corrupt_server: str) -> None:
    dataset = open_uniform(corrupt_server, "test-key", on_error="skip")
    torch_dataset = dataset.to_torch(cache_dir=False)
    assert len(torch_dataset) == UNIFORM_TOTAL
    for bad, served in ((5, 6), (16, 18), (17, 18), (59, 0)):
        np.testing.assert_array_equal(torch_dataset[bad][0], torch_dataset[served][0])
    assert dataset.stats.skipped == len(CORRUPT)  # each counted once
    assert sorted(dataset.stats.skipped_ids) == sorted(
        torch_dataset.store.archive(p // UNIFORM_CHUNK_SIZE).samples[p % UNIFORM_CHUNK_SIZE].id
        for p in CORRUPT
    )
    loader = DataLoader(torch_dataset, batch_size=10, shuffle=True, num_workers=2)
    assert sum(len(labels) for _, labels in loader) == UNIFORM_TOTAL


def test_warnings_about_skipped_images_point_at_the_caller_not_the_sdk(
    corrupt_server: str,
) -> None:
    dataset = open_uniform(corrupt_server, "test-key", on_error="warn")
    with pytest.warns(RuntimeWarning, match="skipped") as record:
        dataset.to_torch(cache_dir=False)[5]
        list(dataset.to_torch(streaming=True))
    assert {w.filename for w in record} == {__file__}


def test_map_style_warn_serves_a_remembered_bad_index_by_the_next_valid_one_each_time(
    corrupt_server: str,
) -> None:
    """Asked again (a loop that caught nothing, the next epoch), a bad index already
    remembered is still served by the next valid one under "warn", as under "skip"."""
    dataset = open_uniform(corrupt_server, "test-key", on_error="warn")
    torch_dataset = dataset.to_torch(cache_dir=False)
    with pytest.warns(RuntimeWarning, match="skipped"):
        first = torch_dataset[5]
        second = torch_dataset[5]  # remembered as bad: not decoded again
    expected, label = torch_dataset[6]
    for image, got_label in (first, second):
        np.testing.assert_array_equal(image, expected)
        assert got_label == label
    assert dataset.stats.skipped == 1


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_a_bad_image_remembered_pins_no_chunk(corrupt_server: str, on_error: str) -> None:
    """Remembered with its traceback (and its cause's), a bad image kept its chunk alive:
    one chunk per chunk with a bad image, past the memory budget and the mapping limit."""
    dataset = open_uniform(corrupt_server, "test-key", on_error=on_error)
    torch_dataset = dataset.to_torch(cache_dir=False)
    for position in CORRUPT:
        with contextlib.suppress(DecompressionError):
            torch_dataset[position]
    remembered = list(torch_dataset._process().bad.values())
    assert len(remembered) == len(CORRUPT)
    gc.collect()
    assert reachable_buffers(remembered) == []
    assert all(e.__traceback__ is None and e.__cause__ is None for e in remembered)


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_error_a_caller_keeps_from_a_stream_keeps_no_image(
    corrupt_server: str, shuffle: bool
) -> None:
    """It kept the last image, and with shuffle=True every image of the shuffle buffer, in
    the finished frames of its traceback."""
    stream = open_uniform(corrupt_server, "test-key").to_torch(streaming=True, shuffle=shuffle)
    with pytest.raises(DecompressionError) as info:
        list(stream)
    assert info.value.sample_id and arrays_in_frames(info.value) == []


def test_map_style_raises_on_a_corrupt_image_by_default(corrupt_server: str) -> None:
    dataset = open_uniform(corrupt_server, "test-key")
    torch_dataset = dataset.to_torch(cache_dir=False)
    torch_dataset[4]
    with pytest.raises(DecompressionError) as info:
        torch_dataset[5]
    assert info.value.chunk_id == 0 and info.value.sample_id
    # Asked again (a loop that caught the error, the next epoch): it raises again, never
    # serves the next image in its place.
    with pytest.raises(DecompressionError) as again:
        torch_dataset[5]
    assert again.value.sample_id == info.value.sample_id
    assert dataset.stats.skipped == 0

    def depth() -> int:
        try:
            torch_dataset[5]
        except DecompressionError as exc:
            return len(traceback.extract_tb(exc.__traceback__))
        raise AssertionError("no error")

    assert depth() == depth() == depth()  # a loop that keeps asking holds no growing chain


@pytest.mark.parametrize("notes", [True, False], ids=["notes", "no-notes"])
def test_an_error_from_a_dataloader_worker_keeps_its_fields(
    corrupt_server: str, notes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DataLoader re-raises a worker's error as ``type(error)(traceback text)``: the
    fields a handler reads (``except DecompressionError as e: e.sample_id``) survive, in an
    exception note, or (Python 3.10, no notes) after the message in the worker's text."""
    from pixcrawler import exceptions

    if notes and not hasattr(BaseException, "add_note"):
        pytest.skip("no exception notes before Python 3.11")
    monkeypatch.setattr(exceptions, "_NOTES", notes)  # the forked worker inherits it
    torch_dataset = open_uniform(corrupt_server, "test-key").to_torch(cache_dir=False)
    loader = DataLoader(torch_dataset, batch_size=8, num_workers=1, multiprocessing_context=FORK)
    with pytest.raises(DecompressionError, match="in DataLoader worker process 0") as info:
        for _ in loader:
            pass
    with pytest.raises(DecompressionError) as direct:
        torch_dataset[5]
    assert (info.value.chunk_id, info.value.sample_id) == (0, direct.value.sample_id)
    assert info.value.sample_id


# -- streaming -----------------------------------------------------------------------------


def stream_keys(
    live: LiveServer | str,
    *,
    world_size: int,
    num_workers: int = 2,
    api_key: str = "test-key",
    dataset_options: dict[str, Any] | None = None,
    **options: Any,
) -> list[list[str]]:
    """What each simulated rank yields, through a DataLoader with ``num_workers``."""
    per_rank = []
    for rank in range(world_size):
        dataset = open_uniform(live, api_key, **(dataset_options or {}))
        stream = dataset.to_torch(streaming=True, rank=rank, world_size=world_size, **options)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
        keys = [key(image) for image, _ in loader]
        assert len(keys) == len(stream)
        per_rank.append(keys)
    return per_rank


def test_streaming_is_an_iterable_dataset_with_int_labels(
    live_server: LiveServer, reference: Reference
) -> None:
    stream = open_uniform(live_server).to_torch(streaming=True)
    assert isinstance(stream, IterableDataset)
    assert (stream.rank, stream.world_size, len(stream)) == (0, 1, UNIFORM_TOTAL)
    items = list(stream)
    assert [label for _, label in items] == reference.label_ids
    assert [key(image) for image, _ in items] == reference.keys


def test_streaming_two_ranks_two_workers_cover_every_sample_exactly_once(
    live_server: LiveServer, reference: Reference
) -> None:
    per_rank = stream_keys(live_server, world_size=2)
    assert [len(keys) for keys in per_rank] == [UNIFORM_TOTAL // 2] * 2
    everything = [k for keys in per_rank for k in keys]
    assert sorted(everything) == sorted(reference.keys)


def test_streaming_pads_by_wrapping_around_when_not_divisible(
    live_server: LiveServer, reference: Reference
) -> None:
    per_rank = stream_keys(live_server, world_size=7)  # ceil(60 / 7) = 9 each, 3 padded
    assert [len(keys) for keys in per_rank] == [9] * 7
    counts = Counter(k for keys in per_rank for k in keys)
    assert set(counts) == set(reference.keys)
    assert sorted(reference.index_of[k] for k, n in counts.items() if n == 2) == [0, 1, 2]
    assert sum(counts.values()) == 63


def test_streaming_drop_last_drops_the_remainder(
    live_server: LiveServer, reference: Reference
) -> None:
    per_rank = stream_keys(live_server, world_size=7, drop_last=True)
    assert [len(keys) for keys in per_rank] == [8] * 7
    everything = [k for keys in per_rank for k in keys]
    assert len(set(everything)) == 56
    assert sorted(reference.index_of[k] for k in everything) == list(range(56))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_given_the_batch_size_workers_take_whole_batches_and_len_loader_holds(
    live_server: LiveServer, reference: Reference, workers: int, drop_last: bool
) -> None:
    """Each DataLoader worker batches its own samples: split anyhow, every worker ends on a
    short batch, so a loader yields more batches than len(loader) says (a scheduler sized
    by it fails) and drop_last drops a batch per worker (60 samples in 4 x 15: all of
    them, with batches of 16). Given batch_size, workers take whole batches."""
    stream = open_uniform(live_server).to_torch(streaming=True, batch_size=16)
    loader = DataLoader(stream, batch_size=16, num_workers=workers, drop_last=drop_last)
    sizes = [len(labels) for _, labels in loader]
    assert len(sizes) == len(loader)
    assert sorted(sizes, reverse=True) == ([16] * 3 if drop_last else [16, 16, 16, 12])
    if not drop_last:
        keys = [key(image) for images, _ in loader for image in images]
        assert sorted(keys) == sorted(reference.keys)


def test_streaming_shuffle_is_a_pure_function_of_seed_and_epoch(
    live_server: LiveServer, reference: Reference
) -> None:
    def order(seed: int, epoch: int, num_workers: int = 0) -> list[str]:
        stream = open_uniform(live_server).to_torch(
            streaming=True, shuffle=True, seed=seed, shuffle_buffer=8
        )
        stream.set_epoch(epoch)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
        return [key(image) for image, _ in loader]

    first = order(seed=0, epoch=0)
    assert sorted(first) == sorted(reference.keys) and first != reference.keys
    assert order(seed=0, epoch=0) == first
    assert order(seed=0, epoch=1) != first
    assert order(seed=1, epoch=0) != first
    assert order(seed=0, epoch=0, num_workers=2) == order(seed=0, epoch=0, num_workers=2)
    # Any int is an epoch, as DistributedSampler takes it (numpy's seeds are not negative).
    assert sorted(order(seed=0, epoch=-1)) == sorted(reference.keys)

    shuffled = stream_keys(live_server, world_size=2, shuffle=True, seed=5)
    assert sorted(k for keys in shuffled for k in keys) == sorted(reference.keys)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_set_epoch_reaches_persistent_workers_already_running(
    live_server: LiveServer, reference: Reference, context: str
) -> None:
    def stream_at(epoch: int) -> Any:
        stream = open_uniform(live_server).to_torch(
            streaming=True, shuffle=True, seed=3, shuffle_buffer=8
        )
        stream.set_epoch(epoch)
        return stream

    def keys(loader: DataLoader[Any]) -> list[str]:
        return [key(image) for image, _ in loader]

    stream = stream_at(0)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context=context,
    )
    orders = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        orders.append(keys(loader))  # the same two workers every epoch
        assert stream.epoch == epoch
    for epoch, order in enumerate(orders):
        fresh = DataLoader(stream_at(epoch), batch_size=None, num_workers=2)
        assert order == keys(fresh), epoch
    assert orders[0] != orders[1] != orders[2]
    assert all(sorted(order) == sorted(reference.keys) for order in orders)


def test_a_pickled_stream_keeps_its_epoch_and_sets_its_own(live_server: LiveServer) -> None:
    stream = open_uniform(live_server).to_torch(streaming=True, shuffle=True)
    stream.set_epoch(-7)
    clone = pickle.loads(pickle.dumps(stream))
    assert clone.epoch == -7
    clone.set_epoch(2)
    assert (clone.epoch, stream.epoch) == (2, -7)


def test_streaming_rank_downloads_only_the_chunks_of_its_slice(
    live_server: LiveServer, through_blobs: tuple[str, StaticServer]
) -> None:
    api, blobs = through_blobs
    stream = open_uniform(api, live_server.api_key).to_torch(streaming=True, rank=0, world_size=2)
    assert len(list(stream)) == 30  # images 0-29 live in chunks 0 and 1
    assert set(chunk_requests(blobs)) == {f"/{JOB_UNIFORM}/chunks/{i:05d}.zip" for i in (0, 1)}


def test_streaming_skip_pads_so_ranks_yield_equal_counts(corrupt_server: str) -> None:
    per_rank = stream_keys(
        corrupt_server, world_size=2, dataset_options={"on_error": "skip"}, shuffle=True
    )
    assert [len(keys) for keys in per_rank] == [30, 30]
    everything = [k for keys in per_rank for k in keys]
    assert len(set(everything)) == UNIFORM_TOTAL - len(CORRUPT)  # every valid one, padded


@pytest.mark.parametrize(
    ("bad", "fetches"),
    [((3,), [1, 2]), ((3, *range(30, 40)), [1, 2, 1])],
    ids=["one bad image", "then a run of bad images to pad past"],
)
def test_streaming_skip_pads_from_the_next_chunk_alone(
    live_server: LiveServer,
    server_factory: Callable[..., str],
    tmp_path: Path,
    bad: tuple[int, ...],
    fetches: list[int],
) -> None:
    """Padding for one skipped image planned a whole job's worth of positions: the rank
    downloaded (and prefetched) chunks for images it never took, every epoch; planned one
    position at a time, it downloaded a chunk again for each bad image it met. (Rank 0's
    slice ends inside chunk 1, which is fetched again for the images that follow it.)"""
    store = corrupt_copy(live_server.store, tmp_path, bad)  # 3: in chunk 0, rank 0's
    with StaticServer(store) as blobs:
        api = server_factory(store, chunk_base_url=blobs.base_url)
        dataset = open_uniform(api, live_server.api_key, on_error="skip")
        stream = dataset.to_torch(streaming=True, rank=0, world_size=2)
        assert len(list(stream)) == len(stream) == UNIFORM_TOTAL // 2
        path = f"/{JOB_UNIFORM}/chunks/{{:05d}}.zip"
        assert chunk_requests(blobs) == {path.format(i): n for i, n in enumerate(fetches)}


@pytest.mark.parametrize("valid", [20, 0])
def test_streaming_skip_pads_past_more_bad_images_than_the_job_has_good_ones(
    live_server: LiveServer,
    server_factory: Callable[..., str],
    tmp_path: Path,
    valid: int,
) -> None:
    """A slice that skips more images than the rest of the job holds wraps as often as it
    takes, as DistributedSampler does; only a job with no decodable image at all raises."""
    bad = tuple(range(UNIFORM_TOTAL - valid))
    base_url = server_factory(corrupt_copy(live_server.store, tmp_path, bad))
    dataset = open_uniform(base_url, "test-key", on_error="skip")
    stream = dataset.to_torch(streaming=True)
    if not valid:
        with pytest.raises(PixCrawlerError, match="no image of job"):
            list(stream)
        return
    keys = [key(image) for image, _ in stream]
    assert len(keys) == len(stream) == UNIFORM_TOTAL
    assert len(set(keys)) == valid


def test_a_job_listing_no_image_counts_splits_ranks_evenly_and_has_its_length(
    live_server: LiveServer,
    server_factory: Callable[..., str],
    tmp_path: Path,
    reference: Reference,
) -> None:
    """Chunks listed without image_count are opened to count them: each rank gets its
    half, and the map-style dataset its full length."""
    base_url = server_factory(copy_without_counts(live_server.store, tmp_path))
    per_rank = stream_keys(base_url, world_size=2, api_key=live_server.api_key, num_workers=0)
    assert [len(keys) for keys in per_rank] == [UNIFORM_TOTAL // 2] * 2
    assert sorted(k for keys in per_rank for k in keys) == sorted(reference.keys)
    torch_dataset = open_uniform(base_url, live_server.api_key).to_torch(cache_dir=False)
    assert len(torch_dataset) == UNIFORM_TOTAL
    np.testing.assert_array_equal(torch_dataset[UNIFORM_TOTAL - 1][0], reference.images[-1])


def test_streaming_raises_on_a_corrupt_image_by_default(corrupt_server: str) -> None:
    stream = open_uniform(corrupt_server, "test-key").to_torch(streaming=True)
    with pytest.raises(DecompressionError):
        list(stream)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("batch", "budget"), [(False, None), (True, None), (True, 0)], ids=["item", "batch", "lean"]
)
def test_ctrl_c_while_a_map_style_item_waits_on_a_stalled_chunk_stops_its_transfer(
    live_server: LiveServer, batch: bool, budget: int | None
) -> None:
    """Only the wait was stopped: the fetch thread ran on for its timeout and retries (20
    minutes with the defaults), and the process could not exit until it ended. (A batch
    over the memory budget loads its other chunks on the decode threads.)"""
    stall = Fault("stall", after_bytes=1_000, seconds=30.0)
    # Lean: the batch's first chunk comes (the wait for it is done) and the rest stall.
    stalled = r"/chunks/[12]$" if budget == 0 else r"/chunks/"
    schedule = FaultSchedule.random(1.0, [stall], match=stalled)
    before = set(threading.enumerate())
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        dataset = open_uniform(proxy.base_url, live_server.api_key, timeout=20.0, retries=1)
        options = {} if budget is None else {"memory_budget": budget}
        torch_dataset = dataset.to_torch(cache_dir=False, **options)
        main = threading.main_thread().ident
        assert main is not None
        timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))  # Ctrl-C
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            if batch:
                torch_dataset.__getitems__([0, UNIFORM_CHUNK_SIZE, 2 * UNIFORM_CHUNK_SIZE])
            else:
                torch_dataset[0]
        timer.join()
        assert sdk_threads_left(before) == []  # the stalled transfers have ended
        dataset.close()


def test_an_error_in_the_transform_stops_the_streams_threads(live_server: LiveServer) -> None:
    """The error's traceback holds the stream's frame: its downloads and decode threads ran
    on while the error lived (through interpreter exit, where it was not caught)."""
    before = set(threading.enumerate())

    def transform(image: np.ndarray) -> np.ndarray:
        raise ValueError("a bad transform")

    stream = open_uniform(live_server).to_torch(streaming=True, transform=transform)
    with pytest.raises(ValueError, match="a bad transform") as info:
        for _ in stream:
            pass
    assert info.value.__traceback__ is not None  # still alive, holding the frame
    assert sdk_threads_left(before) == []


@pytest.mark.timeout(60)  # a hang fails here, before the stall itself ends
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_dataloader_workers_whose_transfers_stall_raise_instead_of_hanging(
    live_server: LiveServer, tmp_path: Path, streaming: bool
) -> None:
    """Peers' DataLoader workers can wait forever on a dead transfer. Here every chunk
    transfer stalls for a minute: each worker gives up after its retries, and the loop
    raises the DownloadError in the main process within seconds."""
    stall = Fault("stall", after_bytes=1_000, seconds=60.0)
    schedule = FaultSchedule.random(1.0, [stall], match=r"/chunks/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        dataset = open_uniform(
            proxy.base_url, live_server.api_key, timeout=1.0, retries=1, backoff=0.01
        )
        if streaming:
            torch_dataset = dataset.to_torch(streaming=True)
        else:
            torch_dataset = dataset.to_torch(cache_dir=tmp_path)
        loader = DataLoader(
            torch_dataset, batch_size=4, num_workers=2, multiprocessing_context=FORK
        )
        started = time.monotonic()
        with pytest.raises(DownloadError, match=r"Chunk \d+ failed after 2 attempts") as info:
            for _ in loader:
                pass
        # No stall was waited out. (On a busy machine an attempt may time out even before
        # the proxy's first 1,000 bytes: the same path, so the stalls are not counted.)
        assert time.monotonic() - started < 20
        assert info.value.chunk_id in range(NUM_CHUNKS)  # re-raised with its fields


def _ddp_rank(rank: int, world_size: int, init_file: str, base_url: str, out: str) -> None:
    """One DDP process: a real gloo group, a model, one all-reduce per batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        dataset = open_uniform(base_url, "test-key", on_error="skip")
        stream = dataset.to_torch(streaming=True, shuffle=True, seed=3)  # rank from dist
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Linear(3, len(UNIFORM_LABELS)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        seen = steps = 0
        # torchrun starts ranks fresh, so their DataLoader workers fork; a rank started by
        # mp.spawn would spawn them too (seconds of imports each) unless told to fork.
        loader = DataLoader(stream, batch_size=4, num_workers=2, multiprocessing_context=FORK)
        for images, labels in loader:
            optimizer.zero_grad()
            features = images.float().mean(dim=(1, 2)) / 255
            loss = nn.functional.cross_entropy(model(features), labels)
            loss.backward()  # all-reduce: a rank with fewer batches would leave this one hanging
            optimizer.step()
            seen, steps = seen + len(labels), steps + 1
        totals = [torch.zeros(2, dtype=torch.int64) for _ in range(world_size)]
        dist.all_gather(totals, torch.tensor([seen, steps]))
        result = {
            "rank": stream.rank,
            "world_size": stream.world_size,
            "len": len(stream),
            "skipped": dataset.stats.skipped,
            "totals": [t.tolist() for t in totals],
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # Done: leave without the interpreter's teardown. Gloo's worker thread can still hold the
    # last collective's tensors; released after finalization began, they abort the process
    # (SIGABRT, "terminate called without an active exception": ~1 run in 25 here), a race
    # inside torch that has nothing to do with the counts this test checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_real_two_process_ddp_over_gloo_yields_equal_counts(
    corrupt_server: str, tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    args = (2, str(tmp_path / "init"), corrupt_server, str(tmp_path))
    mp.spawn(_ddp_rank, args=args, nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["len"]) for r in results] == [(0, 2, 30), (1, 2, 30)]
    # 15 per worker in batches of 4: 4 batches per worker, 8 steps per rank, on both ranks.
    assert results[0]["totals"] == results[1]["totals"] == [[30, 8], [30, 8]]


# -- options -------------------------------------------------------------------------------


def test_options_are_checked(live_server: LiveServer) -> None:
    dataset = open_uniform(live_server)
    with pytest.raises(ValueError, match="streaming=True only"):
        dataset.to_torch(shuffle=True)
    with pytest.raises(ValueError, match="map-style"):
        dataset.to_torch(streaming=True, cache_dir=False)
    with pytest.raises(ValueError, match="rank"):
        dataset.to_torch(streaming=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="memory_budget"):
        dataset.to_torch(memory_budget=-1)
    with pytest.raises(TypeError):
        dataset.to_torch(bogus=True)
    with pytest.raises(ValueError, match="batch_size applies to streaming=True only"):
        dataset.to_torch(batch_size=8)
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            dataset.to_torch(streaming=True, batch_size=bad)  # type: ignore[arg-type]


# -- the spec's examples -------------------------------------------------------------------


class MyModel(nn.Module):
    """The spec's ``MyModel``: a small CNN over the SDK's uint8 (B, H, W, C) batches."""

    def __init__(self, classes: int = len(UNIFORM_LABELS)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)

    def forward(self, images: Any) -> Any:
        if images.dtype == torch.uint8:  # no transform: HWC uint8 straight from the SDK
            images = images.permute(0, 3, 1, 2).float() / 255
        features = torch.relu(self.conv(images)).amax(dim=(2, 3))  # the label's colour patch
        return self.head(features)


def test_spec_example_4_pytorch_training_loop(live_server: LiveServer) -> None:
    import torch.optim as optim

    torch.manual_seed(0)
    losses: list[list[float]] = []
    # As written, with base_url added, MyModel a real one, 3 epochs instead of 10 and a
    # learning rate that shows learning within 6 steps.
    dataset = load_dataset(JOB_UNIFORM, api_key=live_server.api_key, base_url=live_server.base_url)
    torch_dataset = dataset.to_torch()

    train_loader = DataLoader(torch_dataset, batch_size=32, shuffle=True, num_workers=4)

    model = MyModel()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=0.05)

    for _epoch in range(3):
        losses.append([])
        for images, labels in train_loader:
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            losses[-1].append(loss.item())

    assert [len(epoch) for epoch in losses] == [2, 2, 2]
    assert np.mean(losses[-1]) < np.mean(losses[0])


def test_spec_to_torch_docstring_example(live_server: LiveServer) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    dataset = load_dataset(JOB_UNIFORM, api_key=live_server.api_key, base_url=live_server.base_url)

    # As the spec's to_torch() docstring writes it.
    transform = transforms.Compose(
        [
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.5], std=[0.5]),
        ]
    )
    torch_dataset = dataset.to_torch(transform=transform)
    dataloader = DataLoader(torch_dataset, batch_size=32)

    images, labels = next(iter(dataloader))
    assert tuple(images.shape) == (32, 3, *UNIFORM_SIZE) and images.dtype == torch.float32
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert labels.dtype == torch.int64 and len(labels) == 32


def test_spec_pytorch_integration_with_torchvision_random_split_and_val_loss(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    torch.manual_seed(0)

    # As written, with Resize((32, 32)) for (224, 224), 4 epochs for 10 and a learning rate
    # that shows learning within 8 steps.
    transform = transforms.Compose(
        [
            transforms.ToPILImage(),
            transforms.Resize((32, 32)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )

    dataset = load_dataset(JOB_UNIFORM, api_key=live_server.api_key, base_url=live_server.base_url)
    torch_dataset = dataset.to_torch(transform=transform)

    train_size = int(0.8 * len(torch_dataset))
    val_size = len(torch_dataset) - train_size
    train_dataset, val_dataset = random_split(torch_dataset, [train_size, val_size])

    train_loader = DataLoader(train_dataset, batch_size=32, shuffle=True)
    val_loader = DataLoader(val_dataset, batch_size=32)

    model = MyModel()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)

    for epoch in range(4):
        model.train()
        for images, labels in train_loader:
            assert tuple(images.shape[1:]) == (3, 32, 32) and images.dtype == torch.float32
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()

        model.eval()
        val_loss = 0
        with torch.no_grad():
            for images, labels in val_loader:
                outputs = model(images)
                val_loss += criterion(outputs, labels).item()

        print(f"Epoch {epoch}: Val Loss = {val_loss / len(val_loader)}")

    printed = capsys.readouterr().out.splitlines()
    val_losses = [float(line.rsplit("=", 1)[1]) for line in printed]
    assert len(val_losses) == 4 and val_losses[-1] < val_losses[0]


def test_streaming_works_where_no_shared_memory_can_be_made(
    live_server: LiveServer, reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some sandboxes have no /dev/shm: the epoch is then this process's own (workers kept
    between epochs do not see set_epoch), and streaming works as before."""

    def no_shared_memory(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory", "/dev/shm")

    monkeypatch.setattr(multiprocessing, "RawValue", no_shared_memory)
    stream = open_uniform(live_server).to_torch(streaming=True, shuffle=True)
    stream.set_epoch(1)
    keys = [key(image) for images, _ in DataLoader(stream, batch_size=8) for image in images]
    assert sorted(keys) == sorted(reference.keys) and stream.epoch == 1


def test_a_stream_made_before_the_process_group_says_every_rank_reads_everything(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made before init_process_group, a stream is rank 0 of 1 on every rank: no hang, but
    each rank trains on the whole dataset. Iterating it once the group exists warns."""
    import torch.distributed as dist

    stream = open_uniform(live_server).to_torch(streaming=True)
    assert (stream.rank, stream.world_size) == (0, 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as after init_process_group
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    with pytest.warns(RuntimeWarning, match="each of the 4 ranks yields the whole dataset"):
        assert len(list(stream)) == UNIFORM_TOTAL
    explicit = open_uniform(live_server).to_torch(streaming=True, rank=0, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(explicit)  # asked for: no warning


def test_a_stream_in_a_launched_process_without_a_process_group_says_it_reads_everything(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun sets WORLD_SIZE and RANK; without init_process_group every process was
    rank 0 of 1 and read the whole dataset, without a word."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    stream = open_uniform(live_server).to_torch(streaming=True)
    with pytest.warns(RuntimeWarning, match="WORLD_SIZE=4 is set, but torch.distributed is not"):
        assert len(list(stream)) == UNIFORM_TOTAL
    monkeypatch.setenv("WORLD_SIZE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(open_uniform(live_server).to_torch(streaming=True))  # one process: nothing to say


@pytest.mark.parametrize("streaming", [False, True])
def test_a_job_listing_no_labels_is_refused_before_any_download(
    live_server: LiveServer, server_factory: Any, tmp_path: Path, streaming: bool
) -> None:
    """Another producer's job may list no ``labels``: the class ids are positions in it, so
    to_torch() failed at the first image, after chunks had downloaded (in every worker)."""

    def unlabelled(job: dict[str, Any]) -> None:
        del job["labels"]

    store = edited_copy(live_server.store, tmp_path, JOB_UNIFORM, unlabelled)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store))
    with pytest.raises(PixCrawlerError, match=f"job {JOB_UNIFORM} lists no labels.*to_arrays"):
        dataset.to_torch(streaming=streaming)
    assert dataset.stats.transfer.requests == 0
    assert len(dataset.to_arrays()[1]) == UNIFORM_TOTAL  # names it gives still


@pytest.mark.parametrize("off_by", [1, -1])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_listed_total_the_chunks_do_not_hold_is_refused_as_plain_iteration_refuses_it(
    live_server: LiveServer, server_factory: Any, tmp_path: Path, off_by: int, streaming: bool
) -> None:
    """A job listing its total but no chunk's count: len(dataset) is the total and plain
    iteration raises where the chunks disagree; to_torch() counted the chunks and went on
    with another length, without a word."""

    def total_only(job: dict[str, Any]) -> None:
        drop_counts(job)
        job["total_images"] = UNIFORM_TOTAL + off_by

    store = edited_copy(live_server.store, tmp_path, JOB_UNIFORM, total_only)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store))
    listed = UNIFORM_TOTAL + off_by
    message = f"job {JOB_UNIFORM} lists {listed} images but its chunks hold {UNIFORM_TOTAL}"
    with pytest.raises(DecompressionError, match=message):
        dataset.to_torch(streaming=streaming)


_TYPED_USE = """
import numpy as np
from torch.utils.data import DataLoader, random_split
from typing_extensions import assert_type

from pixcrawler import load_dataset
from pixcrawler.loaders import TorchDataset, TorchIterableDataset

dataset = load_dataset("job_123", api_key="key")
torch_dataset = dataset.to_torch()
assert_type(torch_dataset, TorchDataset)
train_size = int(0.8 * len(torch_dataset))  # the spec's PyTorch example
val_size = len(torch_dataset) - train_size
train_dataset, val_dataset = random_split(torch_dataset, [train_size, val_size])
image, label = torch_dataset[np.int64(3)]  # any index torch's Dataset takes
first_two = torch_dataset[[0, 1]]
loader = DataLoader(train_dataset, batch_size=32, shuffle=True)
stream = dataset.to_torch(streaming=True, shuffle=True, batch_size=32)
assert_type(stream, TorchIterableDataset)
stream.set_epoch(1)
steps = len(DataLoader(stream, batch_size=32, num_workers=2))
either = dataset.to_torch(streaming=bool(steps))
assert_type(either, TorchDataset | TorchIterableDataset)
"""


@pytest.mark.timeout(300)
def test_what_to_torch_returns_type_checks_as_the_spec_uses_it(tmp_path: Path) -> None:
    """``len(torch_dataset)`` (the spec's example) and ``set_epoch`` pass a strict mypy: the
    two kinds are typed as torch datasets with what each of them has."""
    pytest.importorskip("mypy")
    script = tmp_path / "use.py"
    script.write_text(_TYPED_USE)
    env = {**os.environ, "MYPYPATH": str(SRC)}
    command = [sys.executable, "-m", "mypy", "--strict", "--python-version", "3.10"]
    command += ["--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_typed_names_of_what_to_torch_returns_are_its_classes(live_server: LiveServer) -> None:
    import pixcrawler.loaders
    from pixcrawler.loaders import TorchDataset, TorchIterableDataset

    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    assert isinstance(dataset.to_torch(), TorchDataset)
    assert isinstance(dataset.to_torch(streaming=True), TorchIterableDataset)
    assert issubclass(TorchIterableDataset, IterableDataset)
    assert {"TorchDataset", "TorchIterableDataset", "to_torch"} <= set(dir(pixcrawler.loaders))
    with pytest.raises(AttributeError, match="no attribute 'TorchLoader'"):
        pixcrawler.loaders.TorchLoader  # noqa: B018
    dataset.close()
