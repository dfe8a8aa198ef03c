"""The Dataset API against the real reference server: every public method and property."""

from __future__ import annotations

import gc
import logging
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

import pixcrawler
from conftest import LiveServer, PackedStore
from constants import (
    EXIF_ROTATED_DISPLAY_SIZE,
    EXIF_ROTATED_ID,
    JOB_MIXED,
    JOB_UNIFORM,
    MIXED_TOTAL,
    UNIFORM_CHUNK_SIZE,
    UNIFORM_LABELS,
    UNIFORM_SIZE,
    UNIFORM_TOTAL,
)
from helpers import (
    arrays_in_frames,
    copy_without_counts,
    corrupt_copy,
    digest,
    drop_counts,
    edited_copy,
    sdk_threads_left,
    settles,
)
from pixcrawler import Dataset, DatasetInfo, config, exceptions, load_dataset
from pixcrawler import dataset as dataset_module
from pixcrawler.archive import ChunkArchive, Sample
from pixcrawler.client import ApiClient, job_path
from pixcrawler.dataset import group_bounds
from pixcrawler.decode import ImageDecoder
from pixcrawler.exceptions import DecompressionError, MixedImageSizesError, PixCrawlerError
from pixcrawler.testing.faults import Fault, FaultProxy, FaultSchedule

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def uniform(live_server: LiveServer) -> Dataset:
    return load_dataset(JOB_UNIFORM, api_key=live_server.api_key, base_url=live_server.base_url)


def pillow_pixels(path: Path, mode: str = "RGB") -> np.ndarray:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert(mode)
        array = np.asarray(image)
    return array.reshape(array.shape[0], array.shape[1], -1)


def source_images(packed: PackedStore, job_id: str) -> dict[str, Path]:
    root = packed.sources[job_id]
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def test_load_dataset_downloads_nothing_until_iterated(uniform: Dataset) -> None:
    assert uniform.stats.transfer.requests == 0
    assert uniform.num_images == UNIFORM_TOTAL == len(uniform)
    assert uniform.num_chunks == -(-UNIFORM_TOTAL // UNIFORM_CHUNK_SIZE)
    assert uniform.chunk_size == UNIFORM_CHUNK_SIZE
    assert uniform.labels == UNIFORM_LABELS


def test_info_is_frozen_metadata_printed_like_the_spec(uniform: Dataset) -> None:
    info = uniform.info
    assert isinstance(info, DatasetInfo)
    assert (info.id, info.status, info.num_images) == (JOB_UNIFORM, "completed", UNIFORM_TOTAL)
    assert info.labels == UNIFORM_LABELS and info.image_size == UNIFORM_SIZE
    with pytest.raises(AttributeError):
        info.status = "failed"  # type: ignore[misc]
    lines = str(info).splitlines()
    assert lines[0] == f"Dataset: {JOB_UNIFORM}"
    assert lines[1:4] == ["Status: completed", "Images: 60", "Chunks: 4"]
    assert lines[4].startswith("Size: ") and lines[4].endswith("KB")
    assert lines[6] == "Labels: bird, cat, dog (3 classes)"


def test_info_sizes_and_dates_are_formatted_as_the_spec_shows() -> None:
    from pixcrawler.units import counted, human_size, parse_time

    assert (counted(1, "chunk"), counted(0, "image")) == ("1 chunk", "0 images")
    assert counted(2_000, "failed attempt") == "2,000 failed attempts"

    assert human_size(2_684_354_560) == "2.5 GB"
    assert human_size(512) == "512 B"
    # Just under a unit: the rounded figure moves up a unit, never "1024.0 KB".
    assert human_size(1023) == "1023 B"
    assert human_size(1024 * 1024 - 1) == "1.0 MB"
    assert human_size(1024**3 - 1) == "1.0 GB"
    assert human_size(1024**4 - 1) == "1.0 TB"
    assert human_size(1024 * 1024 - 52) == "1023.9 KB"
    from pixcrawler.models import Job

    empty = DatasetInfo.from_job(Job(id="job_x", name="x", status="pending"))
    assert str(empty).splitlines()[-1] == "Labels: - (0 classes)"
    created = parse_time("2025-10-30T12:00:00Z")
    assert created is not None and created.strftime("%Y-%m-%d %H:%M:%S") == "2025-10-30 12:00:00"
    # Every version of Python reads what 3.11 does: any fraction (Go writes nanoseconds).
    for text, micro in (("12:00:00.5Z", 500_000), ("12:00:00.123456789z", 123_456)):
        moment = parse_time(f"2025-10-30T{text}")
        assert moment is not None and (moment.second, moment.microsecond) == (0, micro)
    assert parse_time("2025-10-30T13:00:00.25+01:00") == parse_time("2025-10-30T12:00:00.250Z")


def test_iteration_yields_every_image_with_its_label_and_exact_pixels(
    uniform: Dataset, packed: PackedStore
) -> None:
    sources = source_images(packed, JOB_UNIFORM)
    seen = []
    for sample, image in uniform.iter_samples():
        assert image.dtype == np.uint8 and image.shape == (*UNIFORM_SIZE, 3)
        assert image.flags.writeable
        expected = pillow_pixels(sources[sample.path])
        tolerance = 0 if sample.path.endswith(".png") else 2  # lossy: another libjpeg build
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= tolerance
        assert sample.label == sample.path.split("/")[0]
        seen.append(sample.id)
    assert sorted(seen) == sorted(sources)
    plain = [(image.shape, label) for image, label in uniform]
    assert len(plain) == UNIFORM_TOTAL and {label for _, label in plain} == set(UNIFORM_LABELS)


def test_iterating_twice_gives_the_same_images(uniform: Dataset) -> None:
    assert digest(uniform) == digest(uniform)


def test_iter_batches_stacks_preallocated_batches_and_keeps_the_remainder(
    uniform: Dataset,
) -> None:
    batches = list(uniform.iter_batches(batch_size=25))
    assert [len(labels) for _, labels in batches] == [25, 25, 10]
    assert all(images.shape == (len(labels), *UNIFORM_SIZE, 3) for images, labels in batches)
    flat = [
        (image, label)
        for images, labels in batches
        for image, label in zip(images, labels, strict=True)
    ]
    assert digest(flat) == digest(uniform)
    assert [len(lb) for _, lb in uniform.iter_batches(batch_size=25, drop_last=True)] == [25, 25]


def test_iter_batches_default_batch_size_is_32(uniform: Dataset) -> None:
    assert [len(labels) for _, labels in uniform.iter_batches()] == [32, 28]


def test_iter_batches_trims_the_last_batch_to_the_images_left_after_skips(
    live_server: LiveServer, server_factory: Any, tmp_path: Path
) -> None:
    """The last batch is allocated for the images the job lists as left; images skipped
    on the way leave it part empty, and only the filled rows are yielded."""
    bad = (3, 40, 41)  # one in the first batch, two in the last: 57 images decode
    store = corrupt_copy(live_server.store, tmp_path, bad)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store), on_error="skip")
    batches = list(dataset.iter_batches(batch_size=32))
    assert [len(labels) for _, labels in batches] == [32, UNIFORM_TOTAL - len(bad) - 32]
    for images, labels in batches:
        assert len(images) == len(labels)
        assert images.shape == (len(labels), *UNIFORM_SIZE, 3)
        assert images.base is None  # not a view keeping the empty rows allocated
    flat = [
        (image, label)
        for images, labels in batches
        for image, label in zip(images, labels, strict=True)
    ]
    assert digest(flat) == digest(dataset)


def test_to_arrays_returns_all_images_and_label_names(uniform: Dataset) -> None:
    X, y = uniform.to_arrays()
    assert X.shape == (UNIFORM_TOTAL, *UNIFORM_SIZE, 3) and X.dtype == np.uint8
    assert y.shape == (UNIFORM_TOTAL,) and set(y) == set(UNIFORM_LABELS)
    assert digest(zip(X, y, strict=True)) == digest(uniform)


def test_a_job_listing_no_image_counts_still_loads_whole(
    live_server: LiveServer, server_factory: Any, tmp_path: Path, uniform: Dataset
) -> None:
    """total_images and image_count are in the wire contract, but another producer may
    omit them: to_arrays() grows X instead of refusing the first image."""
    base_url = server_factory(copy_without_counts(live_server.store, tmp_path))
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, base_url)
    X, y = dataset.to_arrays()
    assert X.shape == (UNIFORM_TOTAL, *UNIFORM_SIZE, 3)
    assert digest(zip(X, y, strict=True)) == digest(uniform)
    # Its length is unknown, not 0: len() says so, and the dataset is still true.
    with pytest.raises(TypeError, match="no image counts"):
        len(dataset)
    assert not dataset.info.counts_listed and "Images: unknown" in str(dataset.info).splitlines()
    assert dataset and len(list(dataset)) == UNIFORM_TOTAL
    # A batch grows as it fills instead of allocating batch_size rows up front.
    (images, labels), *rest = list(dataset.iter_batches(batch_size=10**7))
    assert rest == [] and images.shape == (UNIFORM_TOTAL, *UNIFORM_SIZE, 3)
    assert digest(zip(images, labels, strict=True)) == digest(uniform)
    batches = list(dataset.iter_batches(batch_size=25))
    assert [len(b) for b, _ in batches] == [25, 25, 10]
    assert all(b.base is None for b, _ in batches)  # the last one too: grown, then shrunk
    assert digest((i, lab) for b, ls in batches for i, lab in zip(b, ls, strict=True)) == digest(
        uniform
    )


def test_a_job_whose_total_its_chunks_contradict_is_refused_at_load(
    live_server: LiveServer, server_factory: Any, tmp_path: Path
) -> None:
    """8 images listed, one chunk of 4: len() said 8 and 4 came (a chunk left out of the
    listing). Its metadata still reads (``info``); its data is refused as bad data."""

    def overcount(job: dict[str, Any]) -> None:
        job["total_images"] += 1

    base_url = server_factory(edited_copy(live_server.store, tmp_path, JOB_UNIFORM, overcount))
    message = f"lists {UNIFORM_TOTAL + 1} images but its chunks list {UNIFORM_TOTAL}"
    with pytest.raises(DecompressionError, match=message):
        load_dataset(JOB_UNIFORM, live_server.api_key, base_url)
    job = ApiClient(live_server.api_key, base_url).get_job(JOB_UNIFORM)
    assert job.total_images == UNIFORM_TOTAL + 1


def test_a_chunk_holding_another_count_than_listed_stops_iteration_before_its_images(
    live_server: LiveServer, server_factory: Any, tmp_path: Path
) -> None:
    """len() is the job's count: a chunk holding fewer images than it lists is an error,
    not a loop that silently ends short of len() (or runs past it)."""

    def recount(job: dict[str, Any]) -> None:
        job["chunks"][1]["image_count"] += 1
        job["total_images"] += 1

    store = edited_copy(live_server.store, tmp_path, JOB_UNIFORM, recount)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store))
    assert len(dataset) == UNIFORM_TOTAL + 1
    seen = 0
    message = (
        f"lists {UNIFORM_CHUNK_SIZE + 1} images in chunk 1 but the chunk holds {UNIFORM_CHUNK_SIZE}"
    )
    with pytest.raises(PixCrawlerError, match=message):
        for _ in dataset:
            seen += 1
    assert seen == UNIFORM_CHUNK_SIZE  # chunk 0 whole, none of chunk 1


@pytest.mark.parametrize("listed", [UNIFORM_TOTAL + 1, UNIFORM_TOTAL - 1])
def test_a_total_listed_without_chunk_counts_is_held_to_what_the_chunks_hold(
    live_server: LiveServer, server_factory: Any, tmp_path: Path, listed: int
) -> None:
    """A job listing ``total_images`` but no chunk's ``image_count``: len() said the total
    and iteration quietly ended short of it, or ran past it (TensorFlow's cardinality then
    failed with an error naming nothing). Either is bad data, named at the chunk that shows
    it, after every image before it."""

    def total_only(job: dict[str, Any]) -> None:
        drop_counts(job)
        job["total_images"] = listed

    store = edited_copy(live_server.store, tmp_path, JOB_UNIFORM, total_only)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store))
    assert len(dataset) == listed
    if listed > UNIFORM_TOTAL:
        message, before = (
            f"lists {listed} images but its chunks hold {UNIFORM_TOTAL}$",
            UNIFORM_TOTAL,
        )
    else:  # the last chunk (3) is the one too many: none of its images
        message, before = (
            f"lists {listed} images but its chunks hold more \\(chunk 3",
            3 * UNIFORM_CHUNK_SIZE,
        )
    seen = 0
    with pytest.raises(DecompressionError, match=message):
        for _ in dataset:
            seen += 1
    assert seen == before
    with pytest.raises(DecompressionError, match=message):
        dataset.to_arrays()


@pytest.mark.parametrize("total", [10**12, 2**53])
def test_to_arrays_of_more_images_than_memory_holds_is_the_sdks_error_naming_the_need(
    live_server: LiveServer, server_factory: Any, tmp_path: Path, total: int
) -> None:
    """X is allocated once at the job's count: numpy's bare MemoryError ("Unable to allocate
    43.7 TiB"), or ValueError ("array is too big") past what an address reaches, named
    neither the job nor a way out."""

    def huge(job: dict[str, Any]) -> None:
        drop_counts(job)
        job["total_images"] = total

    store = edited_copy(live_server.store, tmp_path, JOB_UNIFORM, huge)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store))
    height, width = UNIFORM_SIZE
    with pytest.raises(
        PixCrawlerError,
        match=rf"job {JOB_UNIFORM}: {total:,} images "
        rf"of {height}x{width}x3 need .*; iterate with iter_batches\(\) instead",
    ):
        dataset.to_arrays()


def test_the_pixel_limit_a_decode_error_names_is_one_a_user_can_raise(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error says to raise pixcrawler.config.MAX_IMAGE_PIXELS: doing so reaches the
    decoders a Dataset makes (the limit was fixed when the module was imported)."""
    monkeypatch.setattr(config, "MAX_IMAGE_PIXELS", UNIFORM_SIZE[0] * UNIFORM_SIZE[1] - 1)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    with pytest.raises(DecompressionError, match=r"raise pixcrawler\.config\.MAX_IMAGE_PIXELS"):
        next(iter(dataset))
    monkeypatch.setattr(config, "MAX_IMAGE_PIXELS", UNIFORM_SIZE[0] * UNIFORM_SIZE[1])
    assert next(iter(dataset))[0].shape == (*UNIFORM_SIZE, 3)


def test_to_arrays_of_nothing_decoded_has_the_images_shape(
    live_server: LiveServer, server_factory: Any, tmp_path: Path
) -> None:
    store = corrupt_copy(live_server.store, tmp_path, tuple(range(UNIFORM_TOTAL)))
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store), on_error="skip")
    X, y = dataset.to_arrays()
    assert X.shape == (0, *UNIFORM_SIZE, 3) and y.shape == (0,)  # the job's image_size
    X, _ = dataset.to_arrays(image_size=np.array([8, 12]))
    assert X.shape == (0, 8, 12, 3)


def test_to_arrays_with_skips_returns_an_array_of_its_own_size(
    live_server: LiveServer, server_factory: Any, tmp_path: Path
) -> None:
    """Not a view of the array allocated for every image the job lists."""
    bad = tuple(range(0, UNIFORM_TOTAL, 2))
    store = corrupt_copy(live_server.store, tmp_path, bad)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store), on_error="skip")
    X, y = dataset.to_arrays()
    assert X.shape == (UNIFORM_TOTAL - len(bad), *UNIFORM_SIZE, 3) and len(y) == len(X)
    assert X.flags.owndata and X.base is None
    clean = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    expected = [image for i, (image, _) in enumerate(clean) if i not in bad]
    assert all(np.array_equal(a, b) for a, b in zip(X, expected, strict=True))


def test_mixed_sizes_need_image_size_and_the_error_says_so(live_server: LiveServer) -> None:
    dataset = load_dataset(JOB_MIXED, live_server.api_key, live_server.base_url)
    with pytest.raises(MixedImageSizesError, match=r"image_size=\(H, W\)") as info:
        dataset.to_arrays()
    everyone = [sample for sample, _ in dataset.iter_samples((8, 8))]
    named = [s for s in everyone if s.id == info.value.sample_id]  # the image it quotes
    assert len(named) == 1 and named[0].chunk_id == info.value.chunk_id
    assert f"image {info.value.sample_id!r} is " in info.value.message
    with pytest.raises(MixedImageSizesError) as info:
        list(dataset.iter_batches(batch_size=8))
    assert info.value.sample_id is not None and info.value.chunk_id is not None
    X, _ = dataset.to_arrays(image_size=(16, 20))
    assert X.shape == (MIXED_TOTAL, 16, 20, 3)
    images, labels = next(dataset.iter_batches(batch_size=8, image_size=(24, 24)))
    assert images.shape == (8, 24, 24, 3) and len(labels) == 8


def test_mixed_formats_and_modes_decode_like_pillow(
    live_server: LiveServer, packed: PackedStore
) -> None:
    sources = source_images(packed, JOB_MIXED)
    for mode, channels in (("RGB", 3), ("L", 1), ("RGBA", 4)):
        dataset = load_dataset(JOB_MIXED, live_server.api_key, live_server.base_url, mode=mode)
        count = 0
        for sample, image in dataset.iter_samples():
            expected = pillow_pixels(sources[sample.path], mode)
            assert image.shape == expected.shape and image.shape[2] == channels, sample.path
            lossy = sample.path.endswith((".jpg", ".jpeg", ".webp"))
            diff = np.abs(image.astype(int) - expected.astype(int)).max()
            assert diff <= (2 if lossy else 0), (mode, sample.path, diff)
            count += 1
        assert count == MIXED_TOTAL
    labels = {
        label for _, label in load_dataset(JOB_MIXED, live_server.api_key, live_server.base_url)
    }
    assert "animals/cat" in labels


def test_exif_orientation_is_applied(live_server: LiveServer) -> None:
    dataset = load_dataset(JOB_MIXED, live_server.api_key, live_server.base_url)
    shapes = {sample.id: image.shape for sample, image in dataset.iter_samples()}
    assert shapes[EXIF_ROTATED_ID][:2] == EXIF_ROTATED_DISPLAY_SIZE


def test_image_size_given_to_load_dataset_resizes_everything(live_server: LiveServer) -> None:
    dataset = load_dataset(
        JOB_MIXED, live_server.api_key, live_server.base_url, image_size=(12, 10)
    )
    assert {image.shape for image, _ in dataset} == {(12, 10, 3)}


def test_to_dataframe_has_image_label_metadata_columns(uniform: Dataset) -> None:
    pytest.importorskip("pandas")
    df = uniform.to_dataframe()
    assert list(df.columns) == ["image", "label", "metadata"]
    assert len(df) == UNIFORM_TOTAL
    assert len(df[df["label"] == "cat"]) == UNIFORM_TOTAL // 3
    meta = df["metadata"].iloc[0]
    assert {"id", "path", "chunk", "width", "height", "sha256"} - set(meta) <= {"sha256"}
    assert meta["width"] == UNIFORM_SIZE[1]


@pytest.mark.parametrize("on_error", ["skip", "warn"])
def test_to_dataframe_leaves_corrupt_images_out_with_skip_and_warn(
    live_server: LiveServer, tmp_path: Path, server_factory: Callable[..., str], on_error: str
) -> None:
    pytest.importorskip("pandas")
    bad = (3, 17, 40)
    base_url = server_factory(corrupt_copy(live_server.store, tmp_path, bad))
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, base_url, on_error=on_error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = dataset.to_dataframe()
    assert len(df) == UNIFORM_TOTAL - len(bad)
    assert dataset.stats.skipped == len(bad)
    skipped = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(skipped) == (len(bad) if on_error == "warn" else 0)


def test_to_dataframe_of_no_rows_keeps_the_columns_dtypes(
    live_server: LiveServer, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """A job of no images (or every image skipped) gives the dtypes rows would have, not
    pandas' float64 for empty lists: ``df["label"].str`` and concatenation still work."""
    pandas = pytest.importorskip("pandas")

    def empty(job: dict[str, Any]) -> None:
        job["chunks"], job["total_images"] = [], 0

    base_url = server_factory(edited_copy(live_server.store, tmp_path, JOB_UNIFORM, empty))
    df = load_dataset(JOB_UNIFORM, live_server.api_key, base_url).to_dataframe()
    full = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url).to_dataframe()
    assert len(df) == 0 and list(df.columns) == ["image", "label", "metadata"]
    assert dict(df.dtypes) == dict(full.dtypes)
    assert list(df["label"].str.upper()) == []
    assert dict(pandas.concat([df, full]).dtypes) == dict(full.dtypes)


def test_manifest_metadata_never_replaces_the_rows_id_or_image_size() -> None:
    """A producer's metadata may name the original photo's ``width`` or its own ``id``:
    the row keeps the SDK's (its image as returned, its unique id), and theirs too."""
    from pixcrawler.archive import Member, Sample
    from pixcrawler.dataset import sample_metadata

    member = Member("cat/0.jpg", 0, 10, 10, 0, False)
    theirs = {"id": "crawl-42", "width": 1920, "height": 1080, "url": "https://x/0.jpg"}
    sample = Sample("cat/0.jpg", "cat", "cat/0.jpg", member, 3, None, None, None, theirs)
    meta = sample_metadata(sample, np.zeros((12, 16, 3), np.uint8))
    assert meta == {
        "id": "cat/0.jpg",
        "path": "cat/0.jpg",
        "chunk": 3,
        "height": 12,
        "width": 16,
        "manifest_id": "crawl-42",
        "manifest_width": 1920,
        "manifest_height": 1080,
        "url": "https://x/0.jpg",
    }
    theirs = {"manifest_id": "batch-7", "id": "crawl-42"}  # their own manifest_id first
    sample = sample._replace(metadata=theirs)
    meta = sample_metadata(sample, np.zeros((12, 16, 3), np.uint8))
    assert (meta["id"], meta["manifest_id"]) == ("cat/0.jpg", "batch-7")
    assert meta["manifest_manifest_id"] == "crawl-42"  # nothing of theirs is lost


def test_early_break_cancels_downloads_and_leaves_no_threads(live_server: LiveServer) -> None:
    before = {t.ident for t in threading.enumerate()}
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, prefetch=2)
    for i, _ in enumerate(dataset):
        if i == 3:
            break
    gc.collect()
    leftover = [
        t
        for t in threading.enumerate()
        if t.ident not in before and t.name.startswith("pixcrawler")
    ]
    assert leftover == []
    assert dataset.stats.chunks <= 2  # decoding opens at most two chunks at once
    dataset.close()


def test_early_break_with_a_progress_bar_stops_the_downloads_and_leaves_no_threads(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    before = set(threading.enumerate())
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, progress=True)
    for i, _ in enumerate(dataset):
        if i == 3:
            break
    assert sdk_threads_left(before) == []  # the bar's refresh too
    assert dataset.stats.chunks <= 2
    dataset.close()


def test_context_manager_closes_and_a_closed_dataset_refuses_to_iterate(
    live_server: LiveServer,
) -> None:
    with load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url) as dataset:
        next(iter(dataset))
    with pytest.raises(PixCrawlerError, match="closed"):
        next(iter(dataset))
    dataset.close()  # twice is fine


def test_a_close_landing_while_an_iteration_starts_stops_it(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() from another thread between the closed check and the new downloader's
    registration: that downloader was never closed, and a whole epoch ran after close()."""
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    made = dataset_module.ChunkDownloader

    def made_while_closing(*args: Any, **kwargs: Any) -> Any:
        downloader = made(*args, **kwargs)
        dataset.close()  # as if another thread's close() landed now
        return downloader

    monkeypatch.setattr(dataset_module, "ChunkDownloader", made_while_closing)
    with pytest.raises(PixCrawlerError, match="the dataset is closed"):
        next(iter(dataset))
    assert dataset.stats.transfer.requests == 0


def test_an_iterator_still_held_when_its_dataset_closes_says_the_dataset_is_closed(
    live_server: LiveServer,
) -> None:
    """Not the downloader's "the download was cancelled" (a tf.data iterator kept alive
    over a close() showed it as `_Cancelled`), nor a loop that ends short in silence."""
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, prefetch=1)
    images = iter(dataset)
    next(images)
    dataset.close()
    with pytest.raises(PixCrawlerError, match=r"^the dataset is closed$"):
        for _ in images:
            pass


def test_a_held_iterator_gives_nothing_more_once_its_dataset_closes_and_its_threads_end(
    live_server: LiveServer,
) -> None:
    """It went on handing out the decode group in hand (31 images), and its decode and
    download threads lived until it was dropped."""
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    images = iter(dataset)
    next(images)
    time.sleep(0.2)  # the groups in flight have decoded
    working = [
        t
        for t in threading.enumerate()
        if t.name.startswith(("pixcrawler-decode", "pixcrawler-download"))
    ]
    assert {t.name.split("_")[0] for t in working} == {"pixcrawler-decode", "pixcrawler-download"}
    dataset.close()
    for thread in working:
        thread.join(timeout=5)
        assert not thread.is_alive()
    more = 0
    with pytest.raises(PixCrawlerError, match=r"^the dataset is closed$"):
        for _ in images:
            more += 1
    assert more == 0


def test_a_close_landing_just_before_a_decode_group_is_submitted_says_the_dataset_is_closed(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() from another thread after the iterator's look at it, before its submit: the
    shut pool's RuntimeError came out instead."""
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    submitted = 0

    class ClosingPool(ThreadPoolExecutor):
        def submit(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal submitted
            submitted += 1
            if submitted == 3:
                dataset.close()  # as if another thread's close() landed now
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "ThreadPoolExecutor", ClosingPool)
    with pytest.raises(PixCrawlerError, match=r"^the dataset is closed$"):
        for _ in dataset:
            pass


def test_an_error_the_caller_throws_in_leaves_the_callers_frames_alone(
    live_server: LiveServer,
) -> None:
    """The frames an error comes out of are cleared (they hold a chunk); one the caller
    throws in brings the caller's own frames too: a generator of theirs was finalized."""
    log: list[str] = []

    def watcher() -> Iterator[Exception]:
        try:
            while True:
                try:
                    raise TimeoutError("budget spent")
                except TimeoutError as exc:
                    yield exc  # suspended here: its frame is in the error's traceback
                log.append("resumed")
        finally:
            log.append("finalized")

    watch = watcher()
    reason = next(watch)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    samples = dataset.iter_samples()
    next(samples)
    with pytest.raises(TimeoutError):
        samples.throw(reason)
    assert log == []
    next(watch)
    assert log == ["resumed"]
    dataset.close()


def test_an_iterator_collected_on_its_own_decode_thread_cleans_up(live_server: LiveServer) -> None:
    """The garbage collector may finalize an iterator it finds in a cycle on any thread, one
    of its own decode threads too: that thread cannot wait for its own pool to end, and
    the RuntimeError skipped the rest of the cleanup (the downloader stayed registered)."""
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    samples = dataset.iter_samples()
    next(samples)
    (pool,) = dataset._pools
    pool.submit(samples.close).result(timeout=30)  # as the collector would, on that thread
    assert settles(lambda: not dataset._downloaders, 10)  # (ended on the cleanup thread)
    assert digest(dataset) == digest(load_dataset(JOB_UNIFORM, live_server.api_key,
                                                   live_server.base_url))  # fmt: skip
    dataset.close()


@pytest.mark.parametrize("held", ["dataset", "downloader"])
def test_an_iterator_the_collector_ends_under_one_of_the_sdks_locks_does_not_deadlock(
    live_server: LiveServer, held: str
) -> None:
    """The collector runs a dropped iterator's cleanup wherever it allocates: under a plain
    lock of the SDK's (close() builds lists under the dataset's), the cleanup took that
    lock again and waited for ever; in a thread still starting, it waited for threads
    inside threading's own lock. The cleanup runs on a thread of its own there."""
    before = set(threading.enumerate())
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    samples = dataset.iter_samples()
    next(samples)
    (downloader,) = dataset._downloaders
    lock = dataset._lock if held == "dataset" else downloader._lock
    box: list[Any] = [samples]
    box.append(box)  # a cycle: only the collector frees it
    del samples, box
    collected = threading.Event()

    def collect_under_the_lock() -> None:
        with lock:
            gc.collect()
        collected.set()

    threading.Thread(target=collect_under_the_lock, daemon=True).start()
    assert collected.wait(10), "the cleanup waited for a lock its own thread held"
    assert settles(lambda: not dataset._downloaders, 10)
    assert sdk_threads_left(before) == []
    assert digest(dataset) == digest(load_dataset(JOB_UNIFORM, live_server.api_key,
                                                   live_server.base_url))  # fmt: skip


def test_an_iterator_collected_on_a_thread_of_its_byte_ranges_cleans_up(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk over twice MIN_RANGE_PART downloads in ranges on threads of their own, which
    cannot wait for their own pool to end either: "cannot join current thread", and the
    downloader stayed registered. (The part size is lowered here: these chunks split.)"""
    monkeypatch.setattr(config, "MIN_RANGE_PART", 1024)
    before = set(threading.enumerate())
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, max_workers=4)
    samples = dataset.iter_samples()
    next(samples)
    (downloader,) = dataset._downloaders
    assert downloader._part_pool is not None
    downloader._part_pool.submit(samples.close).result(timeout=30)  # as the collector would
    assert settles(lambda: not dataset._downloaders, 10)
    assert sdk_threads_left(before) == []


def test_num_images_of_a_job_listing_some_chunks_counts_is_unknown_not_their_sum(
    live_server: LiveServer, server_factory: Any, tmp_path: Path
) -> None:
    """It said the counted chunks' sum, so tqdm(total=dataset.num_images) ran past 100%."""

    def drop_last_count(job: dict[str, Any]) -> None:
        del job["total_images"], job["chunks"][-1]["image_count"]

    base_url = server_factory(
        edited_copy(live_server.store, tmp_path, JOB_UNIFORM, drop_last_count)
    )
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, base_url)
    assert dataset.num_images == 0 and dataset.info.num_images == 0
    assert "images=0" in repr(dataset) and "Images: unknown" in str(dataset.info)
    with pytest.raises(TypeError, match="no image counts"):
        len(dataset)
    assert len(list(dataset)) == UNIFORM_TOTAL


def test_a_warning_with_progress_on_points_at_the_callers_loop_on_a_line_of_its_own(
    live_server: LiveServer,
    tmp_path: Path,
    server_factory: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It pointed into tqdm; then it was written on from the bar's last drawing:
    `... 40.0img/s]tests/...: RuntimeWarning`."""
    pytest.importorskip("tqdm")
    base_url = server_factory(corrupt_copy(live_server.store, tmp_path, (3,)))
    dataset = load_dataset(
        JOB_UNIFORM, live_server.api_key, base_url, on_error="warn", progress=True
    )
    warned: list[str] = []

    def show(message: Any, category: Any, filename: str, lineno: int, *_: Any) -> None:
        warned.append(filename)
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno))

    with warnings.catch_warnings():  # (pytest records warnings: show them, as Python does)
        warnings.simplefilter("always")
        warnings.showwarning = show
        for _ in dataset:
            pass
    assert warned == [__file__]
    err = capsys.readouterr().err
    shown = err.index(f"{__file__}:")
    assert "RuntimeWarning: skipped" in err[shown:], err
    assert err[shown - 1] in "\r\n", repr(err[max(0, shown - 80) : shown + 40])
    assert err.rstrip().endswith("received, 1 skipped]")  # the bar drawn again after it


@pytest.mark.parametrize("set_up", [False, True], ids=["no logging set up", "logging set up"])
def test_a_log_line_with_progress_on_goes_above_the_bar_once(
    live_server: LiveServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    set_up: bool,
) -> None:
    """Python's last-resort handler wrote a retry's line on from the bar's last drawing;
    where logging is set up, its handlers print it, as before, and only they."""
    schedule = FaultSchedule.script([Fault("reset", after_bytes=2_000)], match=r"/chunks/1$")
    # (Not pytest's handlers: none, or one printing as a user's basicConfig() would.)
    handlers = [logging.StreamHandler(sys.stderr)] if set_up else []
    monkeypatch.setattr(logging.root, "handlers", handlers)
    monkeypatch.setattr(dataset_module.log, "handlers", [])  # (the CLI's, an earlier test's)
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        dataset = load_dataset(
            JOB_UNIFORM, live_server.api_key, proxy.base_url, progress=True, backoff=0.01
        )
        assert len(list(dataset)) == UNIFORM_TOTAL
    err = capsys.readouterr().err
    said = err.index("chunk 1: ")
    assert "retry 1 of 3" in err[said:] and err.count("chunk 1: ") == 1, err
    if not set_up:
        assert err[said - 1] in "\r\n", repr(err[max(0, said - 80) : said + 40])
    assert dataset_module.log.handlers == []  # none left once the bar is gone


@pytest.mark.parametrize("way", ["iterate", "iterate with progress", "iter_batches", "to_arrays"])
def test_an_error_a_caller_keeps_keeps_no_image(
    live_server: LiveServer, tmp_path: Path, server_factory: Callable[..., str], way: str
) -> None:
    """Each kept error kept the last image decoded before it, in the finished frames of
    its traceback (a notebook keeps the last error; a loop that collects them, every one)."""
    base_url = server_factory(corrupt_copy(live_server.store, tmp_path, (3,)))
    dataset = load_dataset(
        JOB_UNIFORM, live_server.api_key, base_url, progress=way.endswith("progress")
    )
    calls = {
        "iterate": lambda: list(dataset),
        "iterate with progress": lambda: list(dataset),
        "iter_batches": lambda: list(dataset.iter_batches(2)),
        "to_arrays": dataset.to_arrays,
    }
    with pytest.raises(DecompressionError) as info:
        calls[way]()
    assert info.value.sample_id and arrays_in_frames(info.value) == []


@pytest.mark.parametrize("job_id", [None, float("nan"), 1.0, True])
def test_a_job_id_of_another_type_is_refused_not_asked_for_as_text(
    live_server: LiveServer, job_id: Any
) -> None:
    """None was asked for as GET /jobs/None: "job 'None' not found"."""
    with pytest.raises(ValueError, match="job_id must be an int or a string"):
        load_dataset(job_id, live_server.api_key, live_server.base_url)
    assert job_path(np.int64(7)) == "/jobs/7"  # type: ignore[arg-type]


def test_chunks_of_another_type_are_refused_by_name(uniform: Dataset) -> None:
    """chunks=["1"] said "the job lists no chunk 1", though it does."""
    with pytest.raises(ValueError, match=r"chunks must list chunk indexes \(ints\), got '1'"):
        next(uniform.iter_samples(chunks=["1"]))  # type: ignore[list-item]
    assert [s.chunk_id for s, _ in uniform.iter_samples(chunks=[np.int64(1)])][:1] == [1]


def test_repr_never_shows_the_key(uniform: Dataset, live_server: LiveServer) -> None:
    text = repr(uniform) + str(uniform.info) + repr(uniform.settings) + str(uniform.stats)
    assert live_server.api_key not in text
    assert JOB_UNIFORM in repr(uniform)


def test_stats_explain_where_time_went(uniform: Dataset) -> None:
    for _ in uniform:
        pass
    stats = uniform.stats
    assert stats.images == UNIFORM_TOTAL and stats.skipped == 0
    assert stats.chunks == uniform.num_chunks
    assert stats.transfer.bytes_received == uniform.info.size_bytes
    assert stats.first_image_seconds is not None and stats.first_image_seconds >= 0
    assert "first image after" in str(stats)


def test_stats_time_the_first_image_once_and_add_up_every_wait(
    live_server: LiveServer,
) -> None:
    """Chunk 0 stalls for a second: the first image comes after it, not at the last image,
    and the time the consumer spent waiting adds up the stall with every later wait."""
    stall = Fault("stall", after_bytes=2_000, seconds=1.0)
    schedule = FaultSchedule.script([stall], match=r"/chunks/0$")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        dataset = load_dataset(
            JOB_UNIFORM,
            live_server.api_key,
            proxy.base_url,
            max_workers=1,
            timeout=5.0,
            retries=1,
            backoff=0.01,
        )
        started = time.perf_counter()
        for _ in dataset:
            time.sleep(0.02)  # a consumer slower than the decoders: 1.2 s over the job
        elapsed = time.perf_counter() - started
        assert proxy.stats.faults["stall"] == 1
    stats = dataset.stats
    assert stats.images == UNIFORM_TOTAL
    assert stats.first_image_seconds is not None
    assert 0.9 <= stats.first_image_seconds < elapsed - 0.6, (stats.first_image_seconds, elapsed)
    assert 0.9 <= stats.wait_seconds < elapsed
    waited = re.search(r"waited (\d+\.\d+) s", str(stats))
    assert waited is not None and float(waited.group(1)) >= 0.9, str(stats)


@pytest.mark.parametrize(
    "consumer", ["iterate", "iter_batches", "to_arrays", "torch-streaming", "torch-map"]
)
def test_memory_does_not_grow_pass_after_pass(uniform: Dataset, consumer: str) -> None:
    """What a pass allocates, it gives back: eight more passes over the job leave less than
    two chunks of Python and numpy memory behind. Keeping one chunk's bytes per chunk would
    leave 32, one decoded image per chunk 6; Pillow's and the threads' own bookkeeping
    measured ~12-16 KB."""
    import tracemalloc

    if consumer.startswith("torch"):
        pytest.importorskip("torch")
    by_index = uniform.to_torch(cache_dir=False) if consumer == "torch-map" else None
    source: Any = {
        "iterate": lambda: uniform,
        "iter_batches": lambda: uniform.iter_batches(8),
        "to_arrays": lambda: uniform.to_arrays(),  # (X, y): two items, made whole each pass
        "torch-streaming": lambda: uniform.to_torch(streaming=True),
        "torch-map": lambda: (by_index[i] for i in range(len(by_index))),
    }[consumer]

    def passes(count: int) -> None:
        for _ in range(count):
            for _ in source():
                pass
        gc.collect()

    passes(4)  # buffers, pools, Pillow's lazy imports: made once
    tracemalloc.start()
    try:
        passes(4)
        before = tracemalloc.get_traced_memory()[0]
        passes(8)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    chunk = min(c.size_bytes or 0 for c in uniform.job.chunks)
    assert grown < 2 * chunk, (grown, chunk)


def test_progress_bar_is_opt_in(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    quiet = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    list(quiet)
    assert capsys.readouterr().err == ""
    loud = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, progress=True)
    list(loud)
    assert "60/60" in capsys.readouterr().err


def test_a_progress_bar_shows_bytes_received_while_the_first_chunk_is_slow(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No image arrives while the first chunk downloads: the bar stood at 0 without a word
    for as long as that took."""
    monkeypatch.setattr(config, "PROGRESS_REFRESH_SECONDS", 0.05)
    stall = Fault("stall", after_bytes=3000, seconds=1.0)
    schedule = FaultSchedule.script([stall], match=r"/chunks/0$")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        dataset = load_dataset(
            JOB_UNIFORM, live_server.api_key, proxy.base_url, progress=True, prefetch=1
        )
        images = iter(dataset)
        next(images)
        during = capsys.readouterr().err  # drawn before the first image came
        list(images)
    assert re.search(r"0/60 .*\b[23]\.\d KB received", during), during
    assert re.search(r"60/60 .* received\]$", capsys.readouterr().err.strip()), "final"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("on_error", "ignore"),
        ("mode", "CMYK"),
        ("image_size", (0, 4)),
        ("image_size", "64"),
        ("max_workers", 0),
        ("prefetch", 0),
        ("prefetch", True),
        ("decode_threads", 0),
        ("decode_threads", -1),
        ("decode_threads", 2.0),
        ("timeout", 0),
        ("timeout", -1.0),
        ("timeout", float("nan")),
        ("timeout", "5"),
        ("timeout", float("inf")),
    ],
)
def test_bad_arguments_are_refused_before_any_request(option: str, value: Any) -> None:
    # No server listens there: checked after the request, each would be a NetworkError.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ValueError, match=option):
        load_dataset(JOB_UNIFORM, "key", nowhere, **{"retries": 0, "timeout": 1, option: value})


@pytest.mark.parametrize("timeout", [30, 0.5, np.int64(30), np.float32(2.5), Fraction(1, 2)])
def test_any_positive_real_is_a_timeout(live_server: LiveServer, timeout: Any) -> None:
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, timeout=timeout)
    assert dataset.settings.timeout == float(timeout)
    dataset.close()


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.0, None, "8"])
def test_a_bad_batch_size_is_refused_when_iter_batches_is_called(
    uniform: Dataset, batch_size: Any
) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        uniform.iter_batches(batch_size=batch_size)  # not at the first next()
    assert uniform.stats.chunks == 0


@pytest.mark.parametrize(
    "image_size", ["64", b"64", (224.9, 224.9), (True, True), (0.5, 3), (16,), (16, 16, 3)]
)
def test_image_size_must_be_two_whole_numbers(uniform: Dataset, image_size: Any) -> None:
    with pytest.raises(ValueError, match="image_size"):
        uniform.to_arrays(image_size=image_size)


@pytest.mark.parametrize("image_size", [(50_000, 50_000), (10**20, 3)])
def test_an_image_size_past_the_pixel_limit_is_refused_up_front(
    live_server: LiveServer, image_size: tuple[int, int]
) -> None:
    """Not an OverflowError, nor a 1 TB array, at the first batch."""
    with pytest.raises(ValueError, match=r"image_size .* pixels, over the limit"):
        load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, image_size=image_size)


def test_the_limit_on_image_size_is_not_the_limit_on_input_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MAX_IMAGE_PIXELS guards what is decoded (bombs); a target size is another thing."""
    from pixcrawler.decode import validate_image_size

    monkeypatch.setattr(config, "MAX_IMAGE_PIXELS", 1_000_000)
    assert validate_image_size((1024, 1024)) == (1024, 1024)
    assert validate_image_size((16_384, 16_384)) == (16_384, 16_384)
    monkeypatch.setattr(config, "MAX_IMAGE_PIXELS", 10**9)  # raised for large inputs
    assert validate_image_size((20_000, 15_000)) == (20_000, 15_000)
    from pixcrawler.decode import ImageDecoder

    monkeypatch.undo()  # a spawned worker's fresh config, with the parent's limit passed
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # (raised below)
    assert ImageDecoder(image_size=(20_000, 15_000), max_pixels=10**9).image_size is not None


def test_image_size_takes_numpy_integers(uniform: Dataset) -> None:
    for image_size in (np.array([8, 12]), (np.int64(8), np.uint16(12))):
        images, _ = next(uniform.iter_batches(batch_size=4, image_size=image_size))
        assert images.shape == (4, 8, 12, 3)


def test_a_batch_is_never_larger_than_the_images_left(uniform: Dataset) -> None:
    # 10**7 rows of 32x48x3 would be 43 GiB: only the 60 images left are allocated.
    (images, _), *rest = list(uniform.iter_batches(batch_size=10**7))
    assert rest == [] and images.shape == (UNIFORM_TOTAL, *UNIFORM_SIZE, 3)
    assert images.base is None  # the array itself, not a view keeping more alive
    sizes = [len(b) for b, _ in uniform.iter_batches(batch_size=25)]
    assert sizes == [25, 25, 10]


def test_dataset_pickles_without_live_connections(uniform: Dataset) -> None:
    import pickle

    next(iter(uniform))
    clone = pickle.loads(pickle.dumps(uniform))
    assert digest(clone) == digest(uniform)


def test_import_pixcrawler_stays_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pixcrawler; "
        "print(sorted(m for m in ('torch', 'tensorflow', 'pandas', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert {"load_dataset", "Dataset", "DatasetInfo", "PixCrawlerError"} <= set(pixcrawler.__all__)
    # Every exception, at the top as DESIGN.md has it (the two of ours were not).
    assert set(exceptions.__all__) <= set(pixcrawler.__all__)
    for name in exceptions.__all__:
        assert getattr(pixcrawler, name) is getattr(exceptions, name)


@pytest.mark.parametrize("ramp", [False, True])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 13, 30, 31, 500])
def test_decode_groups_cover_every_sample_once_in_order(count: int, ramp: bool) -> None:
    bounds = list(group_bounds(count, ramp=ramp))
    assert [i for start, end in bounds for i in range(start, end)] == list(range(count))
    assert all(0 < end - start <= config.DECODE_GROUP for start, end in bounds)


def test_the_first_chunk_decodes_in_small_groups_first(
    uniform: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first image waits for a group of 2 decodes, not for a whole group; later chunks
    decode in whole groups."""
    assert [end - start for start, end in group_bounds(40, ramp=True)] == [2, 4, 8, 16, 10]
    assert [end - start for start, end in group_bounds(40)] == [16, 16, 8]
    groups: list[tuple[int, int]] = []  # (chunk, images) of each decode task, as it starts
    real = dataset_module.decode_group

    def spy(archive: ChunkArchive, group: list[Sample], decoder: ImageDecoder) -> list[Any]:
        with lock:
            groups.append((group[0].chunk_id, len(group)))
        return real(archive, group, decoder)

    lock = threading.Lock()
    monkeypatch.setattr(dataset_module, "decode_group", spy)
    assert sum(1 for _ in uniform) == UNIFORM_TOTAL
    sizes = {chunk: sorted(n for c, n in groups if c == chunk) for chunk, _ in groups}
    assert UNIFORM_CHUNK_SIZE == 16  # so the ramp shows: 2, 4, 8 and the rest (2)
    assert sizes[0] == [2, 2, 4, 8]  # sorted: two decode threads start them in either order
    assert sizes[1] == [16]


def test_decode_groups_of_large_images_are_cut_by_their_decoded_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "DECODE_GROUP_BYTES", 100)
    assert list(group_bounds(5, weights=[60] * 5)) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert list(group_bounds(5, weights=[40] * 5)) == [(0, 2), (2, 4), (4, 5)]
    # One image past the bound is a group of its own; images of no listed size weigh 0.
    assert list(group_bounds(4, weights=[30, 500, 0, 0])) == [(0, 1), (1, 2), (2, 4)]
    assert [b - a for a, b in group_bounds(9, ramp=True, weights=[25] * 9)] == [2, 4, 3]

    def sample(width: int | None, height: int | None) -> Sample:
        return Sample("x", "x", "x", None, 0, None, width, height, {})  # type: ignore[arg-type]

    # Photos small enough that no group of DECODE_GROUP reaches the bound: by count alone.
    monkeypatch.setattr(config, "DECODE_GROUP_BYTES", 16 * 10 * 10 * 3)
    assert dataset_module.decoded_bytes([sample(10, 10)] * 3, ImageDecoder()) is None
    assert dataset_module.decoded_bytes([sample(10, 11), sample(None, 9)], ImageDecoder()) == [
        330,
        0,
    ]
    assert dataset_module.decoded_bytes([sample(10, 11)], ImageDecoder("L")) is None
    assert dataset_module.decoded_bytes([sample(1, 1)] * 2, ImageDecoder(image_size=(11, 10))) == [
        330,
        330,
    ]


def test_decoded_images_held_ahead_are_bounded_by_bytes_where_the_manifest_lists_sizes(
    uniform: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookahead was 4 groups of 16 images whatever their size: 64 twelve-megapixel
    photos held ahead of the consumer were 2.3 GB. (The bounds are lowered here to a few of
    this job's images.)"""
    each = UNIFORM_SIZE[0] * UNIFORM_SIZE[1] * 3
    monkeypatch.setattr(config, "DECODE_GROUP_BYTES", 3 * each)
    monkeypatch.setattr(config, "DECODE_AHEAD_BYTES", 6 * each)
    lock = threading.Lock()
    sizes: list[int] = []
    counts = {"decoded": 0, "consumed": 0, "most": 0}
    real = dataset_module.decode_group

    def spy(archive: ChunkArchive, group: list[Sample], decoder: ImageDecoder) -> list[Any]:
        results = real(archive, group, decoder)
        with lock:
            sizes.append(len(group))
            counts["decoded"] += len(group)
            counts["most"] = max(counts["most"], counts["decoded"] - counts["consumed"])
        return results

    monkeypatch.setattr(dataset_module, "decode_group", spy)
    for _ in uniform:
        time.sleep(0.005)  # a slow consumer: the decoders run as far ahead as they may
        with lock:
            counts["consumed"] += 1
    assert counts["consumed"] == UNIFORM_TOTAL and max(sizes) == 3
    # Two groups in flight (the bytes of two, and one per decode thread) and the rest of
    # the group being handed out: 3 + 2 x 3. By count alone it was up to 4 groups.
    assert counts["most"] <= 9


def test_iteration_reuses_image_buffers_and_images_kept_stay_intact(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JPEGs decode into pooled buffers (no fresh pages per image), and a buffer an image
    still uses is never written again: every tenth image, kept to the end, is unchanged."""
    from pixcrawler.decode import ImageBuffers

    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    reference = {s.id: image for s, image in dataset.iter_samples(keeps=True)}
    takes = []
    take = ImageBuffers.take

    def counting_take(self: ImageBuffers, nbytes: int) -> np.ndarray:
        takes.append(nbytes)
        return take(self, nbytes)

    monkeypatch.setattr(ImageBuffers, "take", counting_take)
    kept = {}
    for position, (sample, image) in enumerate(dataset.iter_samples()):
        if position % 10 == 0:
            kept[sample.id] = image
    assert len(takes) == UNIFORM_TOTAL // 2  # the JPEG half; PNGs go through Pillow
    assert len(kept) == UNIFORM_TOTAL // 10
    for sample_id, image in kept.items():
        np.testing.assert_array_equal(image, reference[sample_id])


def test_to_dataframe_images_are_arrays_of_their_own(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DataFrame keeps every image: none sits in a pooled buffer bigger than itself."""
    from pixcrawler.decode import ImageBuffers

    def no_take(self: ImageBuffers, nbytes: int) -> np.ndarray:
        raise AssertionError("to_dataframe must not use pooled buffers")

    monkeypatch.setattr(ImageBuffers, "take", no_take)
    df = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url).to_dataframe()
    assert len(df) == UNIFORM_TOTAL
    for image in df["image"]:
        assert (image if image.base is None else image.base).nbytes == image.nbytes


def test_load_dataset_keeps_the_specs_positional_parameters_and_defaults(
    live_server: LiveServer,
) -> None:
    import inspect

    params = list(inspect.signature(load_dataset).parameters.values())
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == [
        "job_id", "api_key", "base_url", "max_workers", "timeout", "verify_ssl"
    ]  # fmt: skip
    assert [p.default for p in positional[3:]] == [4, 300, True]
    assert all(p.kind is p.KEYWORD_ONLY for p in params[len(positional) :])
    # All six by position, as the spec's signature allows.
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, 2, 30, True)
    assert len(dataset) == UNIFORM_TOTAL


def test_framework_conversions_show_their_options_and_return_types() -> None:
    """IDEs and help() see every option and what comes back (the spec promises full type
    hints), without importing a framework at run time."""
    import inspect

    torch_params = inspect.signature(Dataset.to_torch).parameters
    assert {"transform", "streaming", "shuffle", "seed", "rank", "world_size"} <= set(torch_params)
    assert (
        inspect.signature(Dataset.to_torch).return_annotation
        == "TorchDataset | TorchIterableDataset"
    )
    tf_signature = inspect.signature(Dataset.to_tensorflow)
    assert "image_size" in tf_signature.parameters
    assert tf_signature.return_annotation == "tf.data.Dataset"


def test_a_decode_error_in_the_callers_except_block_leaves_its_frames_and_generators() -> None:
    """A decode on the caller's thread (map-style ``ds[i]``, a DataLoader worker) inside
    the caller's own ``except`` block: the decoder's error picks up the caller's error as
    its context, and the clearing of the decode's frames (so a kept error keeps no chunk)
    followed it: it cleared the caller's finished frames and closed its generator."""
    import inspect
    from types import SimpleNamespace

    from pixcrawler.dataset import decode_sample
    from pixcrawler.exceptions import DecompressionError

    dataset = object.__new__(Dataset)  # accept() needs only these
    dataset.on_error = "raise"
    dataset._count_lock = threading.Lock()
    dataset._closed = False
    archive = SimpleNamespace(decoded=lambda sample, decode: decode(b"not an image at all"))
    sample = SimpleNamespace(id="img-7", chunk_id=0)

    def parse(raw: str) -> None:
        record = {"raw": raw}  # noqa: F841 - a local the caller may inspect
        raise ValueError(raw)

    def rows() -> Iterator[object]:
        try:
            parse("row-1")
        except ValueError as exc:
            yield exc
        yield "second"

    pending = rows()
    kept = next(pending)
    try:
        parse("abc")
    except ValueError as mine:
        frame = mine.__traceback__.tb_next.tb_frame  # type: ignore[union-attr]
        try:
            try:
                raise kept  # type: ignore[misc]
            except ValueError:
                result = decode_sample(archive, sample, ImageDecoder())  # type: ignore[arg-type]
                dataset.accept(sample, result)  # type: ignore[arg-type]
        except DecompressionError:
            pass
        assert frame.f_locals["record"] == {"raw": "abc"}
    assert inspect.getgeneratorstate(pending) == inspect.GEN_SUSPENDED
    assert next(pending) == "second"


def test_unpickling_only_warms_up_what_reading_imports(
    uniform: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dataset unpickled in a DataLoader worker imports what reading needs first; where
    that fails, the worker's first read says why (torch reports it), not its unpickling
    (torch said only "worker exited unexpectedly")."""
    import pickle

    import pixcrawler.dataset

    def broken() -> None:
        raise RuntimeError("a decoder that cannot load")

    monkeypatch.setattr(pixcrawler.dataset, "import_decoders", broken)
    clone = pickle.loads(pickle.dumps(uniform))
    assert clone.num_images == uniform.num_images
    clone.close()
