"""Chunk downloads under injected faults: resume, checksums, expiry, cancellation."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conftest import LiveServer
from constants import JOB_UNIFORM, UNIFORM_CHUNK_SIZE, UNIFORM_TOTAL
from helpers import (
    CannedHost,
    RedirectingFront,
    close_while_consuming,
    digest,
    edited_copy,
    reachable_buffers,
    settles,
)
from pixcrawler import Dataset, config, load_dataset
from pixcrawler.exceptions import DecompressionError, DownloadError, PixCrawlerError
from pixcrawler.models import Chunk
from pixcrawler.testing.faults import Fault, FaultProxy, FaultSchedule
from pixcrawler.testing.static import StaticServer, _QuietHandler
from pixcrawler.units import human_size

pytestmark = pytest.mark.timeout(60)
CHUNKS = r"/chunks/"


@pytest.fixture(scope="module")
def clean_digest(live_server: LiveServer) -> tuple[int, str]:
    return digest(load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url))


@pytest.fixture
def through_proxy(live_server: LiveServer) -> Iterator[Callable[..., tuple[Dataset, FaultProxy]]]:
    proxies: list[FaultProxy] = []

    def open_(faults: list[Fault | None], **kwargs: object) -> tuple[Dataset, FaultProxy]:
        proxy = FaultProxy(
            live_server.base_url, schedule=FaultSchedule.script(faults, match=CHUNKS)
        )
        proxy.start()
        proxies.append(proxy)
        options = {"retries": 3, "backoff": 0.01, "timeout": 5.0, **kwargs}
        return load_dataset(JOB_UNIFORM, live_server.api_key, proxy.base_url, **options), proxy  # type: ignore[arg-type]

    yield open_
    for proxy in proxies:
        proxy.stop()


def consume_on_a_thread(dataset: Dataset) -> tuple[threading.Thread, list[BaseException]]:
    """Iterate ``dataset`` to the end on a started thread; what escapes lands in the list."""
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            list(dataset)
        except BaseException as exc:  # what escapes is the point
            errors.append(exc)

    worker = threading.Thread(target=consume)
    worker.start()
    return worker, errors


def chunk_bytes(live_server: LiveServer, index: int = 0) -> bytes:
    return (live_server.store / JOB_UNIFORM / "chunks" / f"{index:05d}.zip").read_bytes()


def test_connection_reset_mid_body_resumes_with_range(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
    clean_digest: tuple[int, str],
    live_server: LiveServer,
) -> None:
    dataset, _ = through_proxy([Fault("reset", after_bytes=10_000)], prefetch=1)
    assert digest(dataset) == clean_digest
    transfer = dataset.stats.transfer
    assert transfer.resumed == 1 and transfer.retries == 1
    # Only the missing bytes crossed the wire again, not the whole chunk.
    total = sum(len(chunk_bytes(live_server, i)) for i in range(dataset.num_chunks))
    assert transfer.bytes_received == total


def test_cuts_that_each_move_the_transfer_on_never_use_up_the_retries(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
    clean_digest: tuple[int, str],
    live_server: LiveServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A link that drops now and then must not fail a chunk that is getting there: each
    cut-off attempt that brought an eighth of the chunk counts the retries afresh."""
    step = len(chunk_bytes(live_server, 0)) // 6
    cuts = [Fault("reset", after_bytes=step)] * 3 + [Fault("truncate", after_bytes=step)] * 2
    dataset, proxy = through_proxy(cuts, prefetch=1, max_workers=1)  # 5 cuts, 3 retries
    assert digest(dataset) == clean_digest
    assert proxy.stats.faults == {"reset": 3, "truncate": 2}
    assert dataset.stats.transfer.resumed == 5
    # Each retry line after the first says why it is "retry 1 of 3" again.
    retries = [r.getMessage() for r in caplog.records if "retry 1 of 3" in r.getMessage()]
    assert len(retries) == 5, retries
    assert ["retries count afresh" in m for m in retries] == [False] + [True] * 4, retries


@pytest.mark.parametrize(("progress_first", "attempts"), [(0, 4), (3, 6)])
def test_cuts_that_bring_next_to_nothing_use_up_the_retries(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
    live_server: LiveServer,
    progress_first: int,
    attempts: int,
) -> None:
    """The other side of it: an attempt cut off after a few bytes is a failure like any, so
    a host that keeps cutting the chunk short is given up on after the retries (3 after
    the last attempt that moved it on); the error counts every attempt."""
    size = len(chunk_bytes(live_server, 0))
    cuts = [Fault("reset", after_bytes=size // 6)] * progress_first
    cuts += [Fault("reset", after_bytes=size // 10)] * 5  # under an eighth
    dataset, proxy = through_proxy(cuts, prefetch=1, max_workers=1)
    with pytest.raises(DownloadError, match=f"Chunk 0 failed after {attempts} attempts") as info:
        list(dataset)
    assert info.value.chunk_id == 0
    assert proxy.stats.faults == {"reset": attempts}


def test_truncated_body_is_resumed(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]], clean_digest: tuple[int, str]
) -> None:
    dataset, _ = through_proxy([Fault("truncate", after_bytes=5_000)] * 2)
    assert digest(dataset) == clean_digest
    assert dataset.stats.transfer.resumed >= 1


def test_a_resume_answered_with_the_whole_body_starts_the_chunk_over(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
    clean_digest: tuple[int, str],
    live_server: LiveServer,
) -> None:
    """A server that ignores ``Range`` answers the resume with 200 and every byte: the
    chunk starts again from byte 0, not appended after the bytes already held."""
    dataset, proxy = through_proxy(
        [Fault("reset", after_bytes=10_000), Fault("ignore_range")], prefetch=1
    )
    assert digest(dataset) == clean_digest
    assert proxy.stats.faults["ignore_range"] == 1
    transfer = dataset.stats.transfer
    assert transfer.checksum_failures == 0 and transfer.retries == 1
    total = sum(len(chunk_bytes(live_server, i)) for i in range(dataset.num_chunks))
    assert transfer.bytes_received == total + 10_000  # the first 10,000 bytes came twice


def test_stall_longer_than_timeout_is_retried_not_waited_out(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]], clean_digest: tuple[int, str]
) -> None:
    dataset, proxy = through_proxy(
        [Fault("stall", after_bytes=2_000, seconds=30, then="close")], timeout=0.5
    )
    started = time.monotonic()
    assert digest(dataset) == clean_digest
    assert time.monotonic() - started < 15
    # The stall took effect (2,000 bytes sent, then silence) and was retried, not waited out.
    assert proxy.stats.faults == {"stall": 1}
    transfer = dataset.stats.transfer
    assert transfer.retries >= 1 and transfer.resumed >= 1  # resumed after the 2,000 bytes


def test_a_consumer_kept_waiting_is_told_how_far_its_chunk_got(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
    clean_digest: tuple[int, str],
    slow_waits: Callable[[], list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A first batch that takes long says why while it waits, not only afterwards."""
    # One stream per chunk (max_workers=1): chunk 0 stops after 2,000 bytes for 1.5 s.
    dataset, _ = through_proxy(
        [Fault("stall", after_bytes=2_000, seconds=1.5)], prefetch=1, max_workers=1
    )
    assert digest(dataset) == clean_digest
    waits = slow_waits()
    assert len(waits) >= 2, caplog.text  # repeated while the wait goes on
    size = human_size(dataset.job.chunks[0].size_bytes or 0)
    expected = rf"waited [\d.]+ s for chunk 0: 2\.0 KB of {size} received in [\d.]+ s"
    # (On a loaded machine the first may come before the 2 KB are in.)
    assert any(re.fullmatch(expected, m) for m in waits), waits
    assert dataset.stats.transfer.retries == 0  # a stall shorter than the timeout: no retry


def test_a_rate_limited_chunk_logs_its_retry_and_the_wait_names_the_cause(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
    clean_digest: tuple[int, str],
    slow_waits: Callable[[], list[str]],
    caplog: pytest.LogCaptureFixture,
    live_server: LiveServer,
) -> None:
    dataset, _ = through_proxy([Fault("rate_limit", retry_after=1)], prefetch=1, max_workers=1)
    assert digest(dataset) == clean_digest
    messages = [r.getMessage() for r in caplog.records]
    asked = r"chunk 0: HTTP 429 \(Retry-After 1 s\); retry 1 of 3 in 1\.[01] s"  # (jitter)
    assert any(re.fullmatch(asked, m) for m in messages), messages
    waits = [m for m in slow_waits() if "for chunk 0:" in m]
    why = r"; 1 failed attempt, the last: HTTP 429 \(Retry-After 1 s\); the next in 0\.\d s$"
    assert any(re.search(why, m) for m in waits), waits
    assert live_server.api_key not in caplog.text


def test_each_retry_of_a_chunk_waits_twice_as_long_as_the_last(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
    clean_digest: tuple[int, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The policy's backoff is the one the downloader sleeps (the policy had tests of its
    own, and a downloader retrying at once passed them all)."""
    import random

    caplog.set_level(logging.WARNING, logger="pixcrawler")
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # full jitter's longest
    faults = [Fault("status", status=503)] * 3
    dataset, _ = through_proxy(faults, prefetch=1, max_workers=1, backoff=0.1)
    started = time.monotonic()
    assert digest(dataset) == clean_digest
    assert time.monotonic() - started >= 0.1 + 0.2 + 0.4
    messages = [r.getMessage() for r in caplog.records]
    for retry, delay in ((1, 0.1), (2, 0.2), (3, 0.4)):
        assert f"chunk 0: HTTP 503; retry {retry} of 3 in {delay:.1f} s" in messages, messages


def test_a_consumer_served_in_time_logs_nothing(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
    clean_digest: tuple[int, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="pixcrawler")
    dataset, _ = through_proxy([])
    assert digest(dataset) == clean_digest
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_chunk_answered_429_with_a_long_retry_after_is_raised_not_slept(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
) -> None:
    """An hour's Retry-After is past what a download waits (config.MAX_RETRY_AFTER): the
    iteration raises at once, saying when to retry, instead of sleeping the hour."""
    dataset, proxy = through_proxy([Fault("rate_limit", retry_after=3600)], prefetch=1)
    started = time.monotonic()
    worker, errors = consume_on_a_thread(dataset)
    worker.join(10)
    slept = worker.is_alive()
    dataset.close()  # wakes a consumer left sleeping on the hour
    worker.join(10)
    assert not slept, f"still waiting after {time.monotonic() - started:.1f} s"
    assert len(errors) == 1 and isinstance(errors[0], DownloadError), errors
    error = errors[0]
    assert (error.chunk_id, error.status_code, error.retry_after) == (0, 429, 3600)
    assert "retry in 3600 s" in str(error)
    assert proxy.stats.faults["rate_limit"] == 1  # asked once, not retried


def test_corrupted_bytes_are_detected_and_downloaded_again(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]], clean_digest: tuple[int, str]
) -> None:
    dataset, _ = through_proxy([Fault("corrupt", offset=1234)])
    assert digest(dataset) == clean_digest
    assert dataset.stats.transfer.checksum_failures == 1


def test_corrupted_twice_is_a_download_error_naming_the_chunk(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
) -> None:
    dataset, _ = through_proxy([Fault("corrupt", offset=99)] * 2, prefetch=1)
    with pytest.raises(DownloadError, match="corrupt") as info:
        list(dataset)
    assert info.value.chunk_id == 0


def test_server_errors_on_chunks_exhaust_retries_into_download_error(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
) -> None:
    dataset, proxy = through_proxy([Fault("status", status=503)] * 20, prefetch=1, retries=2)
    with pytest.raises(DownloadError) as info:
        list(dataset)
    assert (info.value.chunk_id, info.value.status_code) == (0, 503)
    assert proxy.stats.faults["status"] == 3


def test_a_chunk_still_on_its_way_holds_back_none_of_the_images_before_it(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
) -> None:
    """Chunk 1 hangs: every image of chunk 0, downloaded and decoded, reaches the caller
    now, not when chunk 1 arrives (a first batch waiting on the second chunk)."""
    hang = Fault("hang", seconds=30)  # longer than the wait below, and than the timeout
    dataset, proxy = through_proxy([None, hang], prefetch=2, timeout=20)
    received: list[int] = []
    whole_chunk = threading.Event()

    def consume() -> None:
        with contextlib.suppress(PixCrawlerError):  # closed below, mid-hang
            for _, label in dataset:
                received.append(label)
                if len(received) == UNIFORM_CHUNK_SIZE:
                    whole_chunk.set()

    worker = threading.Thread(target=consume)
    worker.start()
    try:
        assert whole_chunk.wait(10), f"{len(received)} of chunk 0's images came"
        assert proxy.wait_for_fault("hang", timeout=10)  # chunk 1 is still on its way
        assert proxy.stats.faults["hang"] == 1
    finally:
        dataset.close()
        worker.join(10)
    assert not worker.is_alive()


def test_a_chunk_that_fails_comes_after_every_image_before_it(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
) -> None:
    dataset, _ = through_proxy([None] + [Fault("status", status=503)] * 5, retries=0)
    received = []
    with pytest.raises(DownloadError) as info:
        for _, label in dataset:
            received.append(label)
    assert info.value.chunk_id == 1 and len(received) == UNIFORM_CHUNK_SIZE


def _with_chunk_1(store: Path, root: Path, data: bytes, image_count: int) -> Path:
    """A copy of job_uniform whose chunk 1 is ``data`` (the job lists its sha256 and size)."""
    shutil.copytree(store / JOB_UNIFORM, root / JOB_UNIFORM)
    (root / JOB_UNIFORM / "chunks" / "00001.zip").write_bytes(data)
    job_path = root / JOB_UNIFORM / "job.json"
    job = json.loads(job_path.read_text())
    job["chunks"][1].update(
        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), image_count=image_count
    )
    job["total_images"] = sum(chunk["image_count"] for chunk in job["chunks"])
    job_path.write_text(json.dumps(job))
    return root


def test_an_empty_chunk_at_an_edge_holds_back_nothing_either(
    live_server: LiveServer, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """Chunk 1 holds no image (another producer's) and chunk 2 fails: chunk 0's images all
    come first. The empty chunk used to let the consumer wait on chunk 2 mid-chunk 0."""
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("manifest.json", json.dumps({"images": []}))
    url = server_factory(_with_chunk_1(live_server.store, tmp_path, empty.getvalue(), 0))
    failing = FaultSchedule.script([Fault("status", status=503)] * 5, match=r"/chunks/2$")
    with FaultProxy(url, schedule=failing) as proxy:
        dataset = load_dataset(JOB_UNIFORM, live_server.api_key, proxy.base_url, retries=0)
        received = []
        with pytest.raises(DownloadError) as info:
            for _, label in dataset:
                received.append(label)
                if len(received) == 1:
                    time.sleep(0.5)  # the next chunks arrive while chunk 0 still decodes
    assert info.value.chunk_id == 2 and len(received) == UNIFORM_CHUNK_SIZE


def test_a_next_chunk_that_arrives_but_cannot_be_opened_comes_after_the_images_before_it(
    live_server: LiveServer, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    bad = b"not a zip archive, with the sha256 the job lists " * 20
    url = server_factory(_with_chunk_1(live_server.store, tmp_path, bad, UNIFORM_CHUNK_SIZE))
    received = []
    with pytest.raises(DecompressionError, match="not a valid zip archive") as info:
        for _, label in load_dataset(JOB_UNIFORM, live_server.api_key, url):
            received.append(label)
            if len(received) == 1:
                time.sleep(0.5)  # chunk 1 arrives while chunk 0 still decodes
    assert info.value.chunk_id == 1 and len(received) == UNIFORM_CHUNK_SIZE


@contextlib.contextmanager
def expiring_blobs(store: Path) -> Iterator[FaultProxy]:
    """A blob host on another address serving ``store``'s chunks, whose first chunk
    request is answered as an expired presigned URL."""
    with (
        StaticServer(store) as blob,
        FaultProxy(
            blob.base_url,
            host="127.0.0.2",
            schedule=FaultSchedule.script([Fault("expired")], match=CHUNKS),
        ) as cdn,
    ):
        yield cdn


@pytest.fixture
def expiring_cdn(live_server: LiveServer, server_factory: Callable[..., str]) -> Iterator[str]:
    """An API whose chunk URLs point at an :func:`expiring_blobs` host."""
    with expiring_blobs(live_server.store) as cdn:
        yield server_factory(live_server.store, chunk_base_url=cdn.base_url)


def test_expired_presigned_url_refreshes_the_job_once(
    live_server: LiveServer, expiring_cdn: str, clean_digest: tuple[int, str]
) -> None:
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, expiring_cdn, backoff=0.01)
    assert digest(dataset) == clean_digest
    assert dataset.stats.transfer.url_refreshes == 1


def test_an_expired_url_an_api_path_redirects_to_is_refreshed(
    live_server: LiveServer, clean_digest: tuple[int, str]
) -> None:
    """Chunk URLs on the API host answering 302 to a presigned blob URL that has expired:
    the refusal comes from the blob host, so the job is read again (it was taken for the
    API rejecting the key, which was never even sent there)."""
    with (
        expiring_blobs(live_server.store) as cdn,
        RedirectingFront(
            live_server.base_url, lambda i: f"{cdn.base_url}/{JOB_UNIFORM}/chunks/{i:05d}.zip"
        ) as api,
    ):
        dataset = load_dataset(JOB_UNIFORM, live_server.api_key, api.base_url, backoff=0.01)
        assert digest(dataset) == clean_digest
        assert dataset.stats.transfer.url_refreshes == 1
        assert cdn.stats.faults["expired"] == 1


@pytest.mark.parametrize("repacked", [True, False], ids=["re-packed", "same-in-upper-case"])
def test_a_job_re_packed_before_its_urls_are_read_again_is_not_mixed_in(
    live_server: LiveServer,
    server_factory: Callable[..., str],
    tmp_path: Path,
    clean_digest: tuple[int, str],
    repacked: bool,
) -> None:
    """The job changes on the server (another chunk 1) between load_dataset and the
    re-read an expired URL makes: its new chunk verified against its own sha256 and went
    into this version's data, labels and counts, exit 0. Now the download says so. The
    same version with its sha256s in upper case is the same version."""
    shutil.copytree(live_server.store / JOB_UNIFORM, tmp_path / JOB_UNIFORM)
    with expiring_blobs(tmp_path) as cdn:
        base_url = server_factory(tmp_path, chunk_base_url=cdn.base_url)
        dataset = load_dataset(JOB_UNIFORM, live_server.api_key, base_url, backoff=0.01)
        job_json = tmp_path / JOB_UNIFORM / "job.json"
        job = json.loads(job_json.read_text())
        if repacked:
            job["chunks"][1]["sha256"] = hashlib.sha256(b"another version").hexdigest()
        else:
            for chunk in job["chunks"]:
                chunk["sha256"] = chunk["sha256"].upper()
        job_json.with_suffix(".tmp").write_text(json.dumps(job))
        job_json.with_suffix(".tmp").replace(job_json)  # as the packer rewrites it
        if repacked:
            with pytest.raises(
                DownloadError, match="changed on the server while it was being read"
            ) as info:
                list(dataset)
            # The spec prints e.chunk_id: the chunk whose URL had expired, not None.
            assert info.value.chunk_id in range(dataset.num_chunks)
            assert "load_dataset() again, or run the pixcrawler command again" in str(info.value)
        else:
            assert digest(dataset) == clean_digest
        assert cdn.stats.faults["expired"] == 1


@pytest.mark.parametrize("on_the_server", ["job packed again", "chunk damaged"])
def test_a_chunk_bad_twice_because_the_job_changed_says_so(
    live_server: LiveServer, server_factory: Callable[..., str], tmp_path: Path, on_the_server: str
) -> None:
    """Packed again since load_dataset, the job's chunk 1 is another chunk: "corrupt ...
    twice; the server's copy may be bad" blamed the server for a new version. The job is
    read again before saying so; a chunk damaged on the server still gets that error."""
    shutil.copytree(live_server.store / JOB_UNIFORM, tmp_path / JOB_UNIFORM)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(tmp_path))
    chunk_1 = tmp_path / JOB_UNIFORM / "chunks" / "00001.zip"
    if on_the_server == "job packed again":
        other = (tmp_path / JOB_UNIFORM / "chunks" / "00002.zip").read_bytes()
        chunk_1.write_bytes(other)
        job_json = tmp_path / JOB_UNIFORM / "job.json"
        job = json.loads(job_json.read_text())
        job["chunks"][1].update(sha256=hashlib.sha256(other).hexdigest(), size_bytes=len(other))
        job["version"] = 2
        job_json.write_text(json.dumps(job))
        expected = r"Chunk 1 does not match the job as it was read: .*changed on the server"
    else:
        data = bytearray(chunk_1.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk_1.write_bytes(bytes(data))
        expected = r"Chunk 1 is corrupt: .*twice; the server's copy may be bad"
    with pytest.raises(DownloadError, match=expected) as info:
        list(dataset)
    assert info.value.chunk_id == 1
    dataset.close()


def test_close_while_the_jobs_urls_are_re_read_returns_at_once(
    live_server: LiveServer, expiring_cdn: str
) -> None:
    """Chunk 0's presigned URL has expired and the API stalls on the re-read: closing the
    dataset ends the waiting consumer at once, not after the API's timeout."""
    stalled = FaultSchedule.script([None, Fault("hang")], match=rf"/jobs/{JOB_UNIFORM}$")
    with FaultProxy(expiring_cdn, schedule=stalled) as slow_api:
        dataset = load_dataset(
            JOB_UNIFORM, live_server.api_key, slow_api.base_url, timeout=30, retries=0
        )
        worker, errors = consume_on_a_thread(dataset)
        deadline = time.monotonic() + 10
        while slow_api.stats.faults["hang"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow_api.stats.faults["hang"] == 1  # the re-read is under way
        started = time.monotonic()
        dataset.close()
        worker.join(10)
        assert not worker.is_alive() and time.monotonic() - started < 3
        assert len(errors) == 1 and isinstance(errors[0], PixCrawlerError), errors


def test_a_403_from_the_api_host_itself_is_not_a_refresh(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
) -> None:
    dataset, _ = through_proxy([Fault("expired")], prefetch=1)
    with pytest.raises(DownloadError) as info:
        list(dataset)
    assert info.value.status_code == 403


@pytest.fixture
def expiring_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Callable[..., Any], dict[int, bytes]]]:
    """Two 1 MiB chunks fetched as 4 ranges each, 2 at a time, through a blob host that
    answers every URL under /old/ as an expired presigned URL: a factory for the downloader,
    given the refresh it calls, and the chunks' bytes."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    monkeypatch.setattr(config, "MIN_RANGE_PART", 64 * 1024)
    blobs = {0: bytes(range(256)) * 4096, 1: bytes(reversed(range(256))) * 4096}
    (tmp_path / "new").mkdir()
    for index, blob in blobs.items():
        (tmp_path / "new" / f"c{index}.bin").write_bytes(blob)
    expired = FaultSchedule.random(1.0, [Fault("expired")], match=r"/old/")
    with StaticServer(tmp_path) as host, FaultProxy(host.base_url, schedule=expired) as cdn:

        def chunks(folder: str) -> list[Chunk]:
            return [
                Chunk(i, f"{cdn.base_url}/{folder}/c{i}.bin", len(b), hashlib.sha256(b).hexdigest())
                for i, b in blobs.items()
            ]

        def make(refresh: Callable[[Callable[[str], list[Chunk]]], list[Chunk]]) -> Any:
            def slow_refresh() -> list[Chunk]:
                time.sleep(0.2)  # long enough for all 8 ranges to meet the expiry
                return refresh(chunks)

            return ChunkDownloader(
                ApiClient("k", "http://127.0.0.1:9"),
                chunks("old"),
                max_workers=8,
                prefetch=2,
                refresh=slow_refresh,
            )

        yield make, blobs


def test_an_expired_url_met_by_every_range_of_two_chunks_is_read_again_once(
    expiring_ranges: tuple[Callable[..., Any], dict[int, bytes]],
) -> None:
    make, blobs = expiring_ranges
    calls = []

    def refresh(chunks: Callable[[str], list[Chunk]]) -> list[Chunk]:
        calls.append(1)
        return chunks("new")

    downloader = make(refresh)
    try:
        got = {chunk.index: bytes(buffer) for chunk, buffer in downloader.iter_chunks()}
    finally:
        downloader.close()
    assert got == blobs
    assert len(calls) == downloader.stats.url_refreshes == 1, (calls, downloader.stats)


def test_an_url_still_refused_after_the_re_read_says_so_not_that_the_key_was_rejected(
    expiring_ranges: tuple[Callable[..., Any], dict[int, bytes]],
) -> None:
    make, _ = expiring_ranges
    calls = []

    def refresh(chunks: Callable[[str], list[Chunk]]) -> list[Chunk]:
        calls.append(1)
        return chunks("old")  # still expired

    downloader = make(refresh)
    try:
        with pytest.raises(DownloadError) as info:
            downloader.fetch(0)
    finally:
        downloader.close()
    message = str(info.value)
    assert "refused the URL (HTTP 403" in message and "even after" in message
    assert "API key" not in message
    assert (info.value.chunk_id, info.value.status_code, len(calls)) == (0, 403, 1)


def test_a_failed_re_read_is_every_waiting_ranges_error_and_asked_once(
    expiring_ranges: tuple[Callable[..., Any], dict[int, bytes]],
) -> None:
    make, _ = expiring_ranges
    calls = []

    def refuse(chunks: Callable[[str], list[Chunk]]) -> list[Chunk]:
        calls.append(1)
        raise PixCrawlerError("the API is down (injected)")

    downloader = make(refuse)
    try:
        with pytest.raises(PixCrawlerError, match="the API is down"):
            downloader.fetch(0)
    finally:
        downloader.close()
    assert len(calls) == 1 and downloader.stats.url_refreshes == 0


def test_large_chunk_is_fetched_as_parallel_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader
    from pixcrawler.models import Chunk

    monkeypatch.setattr(config, "MIN_RANGE_PART", 64 * 1024)
    blob = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "c.bin").write_bytes(blob)
    with StaticServer(tmp_path) as host:
        chunk = Chunk(0, f"{host.base_url}/c.bin", len(blob), hashlib.sha256(blob).hexdigest())
        downloader = ChunkDownloader(
            ApiClient("k", "http://127.0.0.1:9"), [chunk], max_workers=8, prefetch=1
        )
        assert bytes(downloader.fetch(0)) == blob
        downloader.close()
        assert downloader.stats.requests == 8


def test_a_chunk_hosts_huge_error_body_is_read_no_further_than_its_message_needs() -> None:
    """A 404 from a blob host with a 32 MiB body: one short line, from the head of the
    body (too little of this one to parse: the HTTP reason). It was read whole before."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    body = b'{"detail": "gone\\n' + b"y" * (32 << 20) + b'"}'
    with CannedHost(404, body, {"Content-Type": "application/json"}) as host:
        chunk = Chunk(0, f"{host.base_url}/c.bin", 100, None)
        downloader = ChunkDownloader(ApiClient("k", "http://127.0.0.1:9"), [chunk], prefetch=1)
        with pytest.raises(DownloadError) as info:
            downloader.fetch(0)
        downloader.close()
    message = str(info.value)
    assert "HTTP 404: Not Found" in message and len(message) < 200, message[:400]
    assert info.value.status_code == 404 and info.value.chunk_id == 0


@pytest.mark.parametrize("status", [400, 410])
def test_a_chunk_error_echoing_the_key_or_escapes_shows_neither(status: int) -> None:
    """A chunk on the API's own host gets the key; its error words may echo it."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    key = "SECRETKEY_abcdefghijklmnopqrstuvwxyz0123456789"
    words = "x" * (config.MAX_ERROR_MESSAGE - 20) + f" Bearer {key} \x1b[2J"
    body = json.dumps({"detail": words}).encode()
    with CannedHost(status, body, {"Content-Type": "application/json"}) as host:
        chunk = Chunk(0, f"{host.base_url}/c.bin", 100, None)
        downloader = ChunkDownloader(ApiClient(key, host.base_url), [chunk], prefetch=1)
        with pytest.raises(DownloadError) as info:
            downloader.fetch(0)
        downloader.close()
    message = str(info.value)
    assert info.value.status_code == status and f"HTTP {status}" in message, message
    assert key[:12] not in message and all(ch.isprintable() for ch in message)


@pytest.mark.parametrize("replaced", [True, False], ids=["file-replaced", "replicas"])
def test_a_file_replaced_while_its_ranges_download_is_never_stitched(
    monkeypatch: pytest.MonkeyPatch, replaced: bool
) -> None:
    """The host swaps the chunk's file (same size, new ETag) after the first range: the
    parts' first requests know no ETag to send as If-Range, so 10 KB of one version and
    30 KB of the other came back as the chunk, which the job lists without a sha256. Now
    parts that disagree give way to one stream. Where the job lists a sha256, it decides:
    a CDN's replicas may give the same bytes different ETags, and the ranges stand."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    monkeypatch.setattr(config, "MIN_RANGE_PART", 8 * 1024)
    first = os.urandom(40 * 1024)
    versions = [first, os.urandom(40 * 1024) if replaced else first]
    served = [0]
    lock = threading.Lock()
    ranges_sent = threading.Barrier(4, timeout=5)  # all 4 asked before any answer is seen

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            with lock:
                arrival = served[0]
                served[0] += 1
            if arrival < 4:
                with contextlib.suppress(threading.BrokenBarrierError):
                    ranges_sent.wait()
            version = min(arrival, 1)  # the first request gets the old file
            body, etag = versions[version], f'"v{version}"'
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
            if_range = self.headers.get("If-Range")
            if match and (if_range is None or if_range == etag):
                lo, hi = int(match[1]), int(match[2]) + 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(body)}")
                body = body[lo:hi]
            else:
                self.send_response(200)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/c.bin"
        sha256 = None if replaced else hashlib.sha256(first).hexdigest()
        chunk = Chunk(0, url, len(first), sha256)
        client = ApiClient("k", "http://127.0.0.1:9")
        downloader = ChunkDownloader(client, [chunk], max_workers=4, prefetch=1)
        fetched = hashlib.sha256(downloader.fetch(0)).hexdigest()
        assert fetched in {hashlib.sha256(v).hexdigest() for v in versions}  # not a mix
        assert downloader.stats.checksum_failures == 0  # (replicas: not taken for damage)
        downloader.close()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("replaced", [True, False], ids=["file-replaced", "replicas"])
def test_a_resume_answered_from_another_version_starts_over_unless_a_sha256_decides(
    replaced: bool,
) -> None:
    """One stream, cut halfway; the host ignores If-Range and answers the resume with a
    range of a file of another ETag. Replaced (no sha256 listed): the chunk starts over,
    never stitched. Replicas of one file (sha256 listed): the resume stands, as before."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader
    from pixcrawler.retry import RetryPolicy

    first = os.urandom(64 * 1024)
    versions = [first, os.urandom(64 * 1024) if replaced else first]
    served = [0]

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            version = min(served[0], 1)
            served[0] += 1
            body = versions[version]
            match = re.fullmatch(r"bytes=(\d+)-\d*", self.headers.get("Range", ""))
            lo = int(match[1]) if match else 0
            self.send_response(206 if match else 200)
            if match:
                self.send_header("Content-Range", f"bytes {lo}-{len(body) - 1}/{len(body)}")
            self.send_header("ETag", f'"v{version}"')
            self.send_header("Content-Length", str(len(body) - lo))
            self.end_headers()
            cut = len(body) // 2 if version == 0 else len(body)  # the first answer is cut
            self.wfile.write(body[lo:cut])
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/c.bin"
        sha256 = None if replaced else hashlib.sha256(first).hexdigest()
        client = ApiClient("k", "http://127.0.0.1:9", retry=RetryPolicy(backoff_base=0.01))
        downloader = ChunkDownloader(client, [Chunk(0, url, len(first), sha256)], prefetch=1)
        fetched = bytes(downloader.fetch(0, ranges=1))
        assert fetched == versions[1]  # the new file whole, or the one file resumed
        assert downloader.stats.requests == (3 if replaced else 2)
        assert downloader.stats.checksum_failures == 0
        downloader.close()
    finally:
        server.shutdown()
        server.server_close()


def _scripted_host(answer: Callable[[int, Any], None]) -> tuple[ThreadingHTTPServer, str]:
    """A loopback host whose n-th GET (from 0) ``answer(n, handler)`` writes; and its URL."""
    served = [0]
    lock = threading.Lock()

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            with lock:
                n = served[0]
                served[0] += 1
            answer(n, self)
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/c.bin"


def _answer(
    handler: Any,
    status: int,
    body: bytes,
    *,
    lo: int = 0,
    size: int | None = None,
    etag: str | None = None,
    cut: int | None = None,
    length: bool = True,
) -> None:
    handler.send_response(status)
    if status == 206:
        handler.send_header("Content-Range", f"bytes {lo}-{len(body) - 1}/{len(body)}")
    if etag is not None:
        handler.send_header("ETag", etag)
    if length:
        handler.send_header("Content-Length", str(len(body) - lo))
    handler.end_headers()
    handler.wfile.write(body[lo : len(body) if cut is None else cut])  # fmt: skip


def _range_start(handler: Any) -> int:
    """Where the request's ``Range: bytes=N-`` starts (0 without one)."""
    match = re.fullmatch(r"bytes=(\d+)-\d*", handler.headers.get("Range", ""))
    return int(match[1]) if match else 0


@contextlib.contextmanager
def _downloader_from(
    answer: Callable[[int, Any], None], size: int | None, sha256: str | None = None
) -> Iterator[Any]:
    """A downloader of one chunk (``size``, ``sha256``) on a host scripted by ``answer``,
    with quick retries."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader
    from pixcrawler.retry import RetryPolicy

    server, url = _scripted_host(answer)
    try:
        client = ApiClient("k", "http://127.0.0.1:9", retry=RetryPolicy(backoff_base=0.01))
        downloader = ChunkDownloader(client, [Chunk(0, url, size, sha256)], prefetch=1)
        try:
            yield downloader
        finally:
            downloader.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_host_whose_every_answer_is_another_version_is_given_up_on_in_retries() -> None:
    """Every GET answered 206 with a new ETag (ranged or not), the first one cut: each
    start over counts as a failure, with its backoff. It restarted ~700 times a second."""
    body = os.urandom(64 * 1024)

    def answer(n: int, handler: Any) -> None:
        cut = len(body) // 2 if n == 0 else None
        _answer(handler, 206, body, lo=_range_start(handler), etag=f'"e{n}"', cut=cut)

    with _downloader_from(answer, len(body)) as downloader:
        with pytest.raises(DownloadError, match="failed after 4 attempts: the file changed"):
            downloader.fetch(0, ranges=1)
        assert downloader.stats.requests == 4 and downloader.stats.retries == 3


def test_a_start_over_reads_the_new_file_to_its_own_end() -> None:
    """A chunk listed without size or sha256, cut twice, then its file replaced by a
    longer one sent without Content-Length: the old file's length cut the new one short."""
    old, new = os.urandom(64 * 1024), os.urandom(96 * 1024)

    def answer(n: int, handler: Any) -> None:
        lo = _range_start(handler)
        if n == 0:
            _answer(handler, 200, old, etag='"old"', cut=16 * 1024)
        elif n == 1:
            _answer(handler, 206, old, lo=lo, etag='"old"', cut=32 * 1024)
        elif n == 2:
            _answer(handler, 206, new, lo=lo, etag='"new"')  # If-Range ignored
        else:
            _answer(handler, 200, new, etag='"new"', length=False)  # to the end of the stream

    with _downloader_from(answer, None) as downloader:
        assert bytes(downloader.fetch(0, ranges=1)) == new


def test_a_whole_body_of_the_same_version_cut_short_is_not_taken_for_the_chunk() -> None:
    """Unsized chunk: a 206 told its length; a resume answered whole (Range ignored), same
    ETag, with no Content-Length, cut at 40 KB of 64. The known length still holds it to
    64 KB: the cut is a failure to retry, not a chunk of 40 KB."""
    body = os.urandom(64 * 1024)

    def answer(n: int, handler: Any) -> None:
        if n == 0:
            _answer(handler, 200, body, etag='"one"', cut=16 * 1024)
        elif n == 1:
            _answer(handler, 206, body, lo=_range_start(handler), etag='"one"', cut=32 * 1024)
        elif n == 2:
            _answer(handler, 200, body, etag='"one"', cut=40 * 1024, length=False)
        else:
            _answer(handler, 200, body, etag='"one"')

    with _downloader_from(answer, None) as downloader:
        assert bytes(downloader.fetch(0, ranges=1)) == body


@pytest.mark.parametrize("etag", [None, 'W/"B"'], ids=["no-etag", "weak-etag"])
def test_a_whole_body_of_unknown_version_is_never_resumed_from_the_old_one(
    etag: str | None,
) -> None:
    """200 "A" cut; the resume answered whole with file B (Range ignored), its version
    unknown (no or a weak ETag), cut too. The next resume sent If-Range "A", which a host
    keeping the rules answered with A's rest: B's head and A's tail, without a word."""
    a, b = os.urandom(64 * 1024), os.urandom(64 * 1024)

    def answer(n: int, handler: Any) -> None:
        if n == 0:
            _answer(handler, 200, a, etag='"A"', cut=16 * 1024)
        elif n == 1:
            _answer(handler, 200, b, etag=etag, cut=40 * 1024)
        elif handler.headers.get("If-Range") == '"A"':
            _answer(handler, 206, a, lo=_range_start(handler), etag='"A"')
        else:  # no If-Range, or another: all of the current file
            _answer(handler, 200, a, etag='"A"')

    with _downloader_from(answer, len(a)) as downloader:
        assert bytes(downloader.fetch(0, ranges=1)) == a


def test_a_content_range_of_absurd_length_is_the_sdks_error() -> None:
    """int() refuses more than 4,300 digits: a bare ValueError escaped the download."""
    body = os.urandom(1024)

    def answer(n: int, handler: Any) -> None:
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes 0-1023/{'9' * 5000}")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with _downloader_from(answer, len(body)) as downloader, pytest.raises(DownloadError):
        downloader.fetch(0, ranges=1)


@pytest.mark.parametrize("ignored", ["every range", "one range"])
def test_ranges_a_server_ignores_fall_back_to_one_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ignored: str
) -> None:
    """A chunk split into ranges, through a proxy that answers some or all of them with the
    whole body (200): the chunk comes as one stream instead, every byte right."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    monkeypatch.setattr(config, "MIN_RANGE_PART", 64 * 1024)
    blob = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    (tmp_path / "c.bin").write_bytes(blob)
    faults = (
        [Fault("ignore_range")] * 8 if ignored == "every range" else [None, Fault("ignore_range")]
    )
    schedule = FaultSchedule.script(faults, match=r"/c\.bin")
    with StaticServer(tmp_path) as host, FaultProxy(host.base_url, schedule=schedule) as proxy:
        chunk = Chunk(0, f"{proxy.base_url}/c.bin", len(blob), hashlib.sha256(blob).hexdigest())
        downloader = ChunkDownloader(
            ApiClient("k", "http://127.0.0.1:9"), [chunk], max_workers=8, prefetch=1
        )
        try:
            assert bytes(downloader.fetch(0)) == blob
        finally:
            downloader.close()
        assert proxy.stats.faults["ignore_range"] >= 1
    assert downloader.stats.checksum_failures == 0 and downloader.stats.retries == 0


def _ranged_blobs(
    root: Path, count: int, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], list[Chunk]]:
    """``count`` 1 MiB files under ``root``, big enough to be split into two ranges; the
    returned function lists them as chunks on a given host."""

    monkeypatch.setattr(config, "MIN_RANGE_PART", 256 * 1024)
    blobs = [bytes([i]) * (1 << 20) for i in range(count)]
    for i, blob in enumerate(blobs):
        (root / f"{i}.bin").write_bytes(blob)
    return lambda base: [
        Chunk(i, f"{base}/{i}.bin", len(blob), hashlib.sha256(blob).hexdigest())
        for i, blob in enumerate(blobs)
    ]


def test_chunks_fetched_ahead_of_need_go_as_one_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle workers split only a chunk the consumer waits for: the first, fetched alone,
    in as many ranges as there are workers; the others arrive before they are asked for,
    each on one connection."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    chunks = _ranged_blobs(tmp_path, 4, monkeypatch)
    with StaticServer(tmp_path) as host:
        downloader = ChunkDownloader(
            ApiClient("k", "http://127.0.0.1:9"), chunks(host.base_url), max_workers=4
        )
        for _ in downloader.iter_chunks():
            time.sleep(0.5)  # a consumer slower than the loopback (even on a loaded machine)
        downloader.close()
        by_path = host.stats.requests_by_path
    assert [by_path[f"/{i}.bin"] for i in range(4)] == [4, 1, 1, 1]


def test_a_consumer_waiting_on_the_network_gets_its_chunks_as_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each response is 0.3 s late: the consumer finds chunk 1 not ready, so the chunk
    fetched next (3) is split again; chunk 2 started alongside 1, before anyone waited."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    chunks = _ranged_blobs(tmp_path, 4, monkeypatch)
    late = FaultSchedule.random(1.0, [Fault("hang", seconds=0.3)])
    with StaticServer(tmp_path) as host, FaultProxy(host.base_url, schedule=late) as proxy:
        downloader = ChunkDownloader(
            ApiClient("k", "http://127.0.0.1:9", timeout=5), chunks(proxy.base_url), max_workers=4
        )
        got = [bytes(data[:1]) for _, data in downloader.iter_chunks()]
        downloader.close()
        by_path = host.stats.requests_by_path
    assert got == [bytes([i]) for i in range(4)]
    assert [by_path[f"/{i}.bin"] for i in range(4)] == [4, 1, 1, 2]


def test_the_first_chunk_is_fetched_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing can be used before chunk 0: no other transfer competes with it."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    chunks = _ranged_blobs(tmp_path, 3, monkeypatch)
    spans: dict[int, tuple[float, float]] = {}
    fetch = ChunkDownloader.fetch

    def timed_fetch(
        self: ChunkDownloader, index: int, cancel: object = None, **options: bool
    ) -> bytearray:
        started = time.perf_counter()
        data = fetch(self, index, cancel, **options)  # type: ignore[arg-type]
        spans[index] = (started, time.perf_counter())
        return data

    monkeypatch.setattr(ChunkDownloader, "fetch", timed_fetch)
    with StaticServer(tmp_path) as host:
        downloader = ChunkDownloader(ApiClient("k", "http://127.0.0.1:9"), chunks(host.base_url))
        assert [c.index for c, _ in downloader.iter_chunks()] == [0, 1, 2]
        assert spans[1][0] >= spans[0][1] and spans[2][0] >= spans[0][1]

        # A consumer that recycles: chunk 0 in brings one more chunk, not the whole window
        # (the opening of chunk 0 is what the first image waits for).
        spans.clear()
        chunks_out = downloader.iter_chunks(recycles=True)
        _, data = next(chunks_out)
        assert settles(lambda: 1 in spans, timeout=10)  # chunk 1 comes whole; then nothing
        time.sleep(0.3)
        assert sorted(spans) == [0, 1]
        downloader.recycle(data)
        assert [c.index for c, _ in chunks_out] == [1, 2]
        downloader.close()


def test_an_iteration_closed_on_its_own_download_thread_cleans_up_and_close_ends_its_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The garbage collector may finalize an iteration it found in a cycle on one of its
    own download threads, which cannot wait for its pool to end: the RuntimeError skipped
    the rest of the cleanup. And close() left the threads of an iteration its caller still
    held running until the iteration was dropped."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    chunks = _ranged_blobs(tmp_path, 3, monkeypatch)
    with StaticServer(tmp_path) as host:
        downloader = ChunkDownloader(ApiClient("k", "http://127.0.0.1:9"), chunks(host.base_url))
        iteration = downloader.iter_chunks(recycles=True)
        next(iteration)
        (pool,) = downloader._pools
        pool.submit(iteration.close).result(timeout=30)  # as the collector would, there
        # Its hooks go with the rest of the cleanup (on the cleanup thread).
        assert settles(lambda: not downloader._recycling, 10)

        held = downloader.iter_chunks()
        next(held)
        time.sleep(0.2)  # the window's fetches have ended: the pool's threads idle
        threads = [t for t in threading.enumerate() if t.name.startswith("pixcrawler-download")]
        assert threads
        downloader.close()
        for thread in threads:
            thread.join(timeout=5)
            assert not thread.is_alive()
        with pytest.raises(PixCrawlerError, match="cancelled"):
            next(held)  # not the chunks fetched ahead before close(), nor a silent end


def test_a_first_chunk_that_fails_starts_no_other_transfer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its error ends the iteration: a second chunk started meanwhile would only race it
    (and hit a rate-limited server once more)."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    chunks = _ranged_blobs(tmp_path, 3, monkeypatch)
    with StaticServer(tmp_path) as host:
        listed = chunks(host.base_url)
        listed[0] = replace(listed[0], url=f"{host.base_url}/missing.bin")
        downloader = ChunkDownloader(ApiClient("k", "http://127.0.0.1:9"), listed)
        with pytest.raises(DownloadError):
            list(downloader.iter_chunks(recycles=True))
        time.sleep(0.2)  # a fetch started by mistake would have asked by now
        downloader.close()
        by_path = host.stats.requests_by_path
    assert by_path["/missing.bin"] >= 1 and by_path["/1.bin"] == by_path["/2.bin"] == 0


def test_chunk_buffers_are_resizable_bytearrays_of_the_size_asked() -> None:
    """Fresh chunk buffers skip the zero-fill, but are still plain bytearrays: the pool
    shrinks and grows them in place."""
    from pixcrawler.downloader import BufferPool, unfilled_bytearray

    buffer = unfilled_bytearray(3 << 20)
    assert type(buffer) is bytearray and len(buffer) == 3 << 20
    buffer[-1:] = b"x"
    del buffer[1 << 20 :]
    assert len(buffer) == 1 << 20
    pool = BufferPool(4 << 20)
    taken = pool.take(3 << 20)
    assert type(taken) is bytearray and len(taken) == 3 << 20
    pool.give(taken)
    assert pool.take(2 << 20) is taken and len(taken) == 2 << 20


def test_a_finished_iteration_leaves_no_chunk_behind_for_the_garbage_collector(
    live_server: LiveServer,
) -> None:
    """Chunk buffers are freed when an iteration ends, not whenever a cycle is collected:
    a reference cycle through a future once kept the last iteration's chunks alive."""
    import gc
    from concurrent.futures import Future

    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    gc.collect()
    gc.disable()
    try:
        assert sum(1 for _ in dataset) == UNIFORM_TOTAL
        # type() rather than isinstance(): isinstance would ask every live object for its
        # __class__, and some (torch's deprecated module attributes) warn when asked.
        leftovers = [
            obj
            for obj in gc.get_objects()
            if type(obj) is Future and isinstance(getattr(obj, "_result", None), bytearray)
        ]
    finally:
        gc.enable()
    assert leftovers == []


def test_fetch_to_file_resumes_a_partial_file_and_renames_atomically(
    live_server: LiveServer, tmp_path: Path
) -> None:
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    expected = chunk_bytes(live_server, 1)
    target = tmp_path / "00001.zip"
    (tmp_path / "00001.zip.part").write_bytes(expected[:7_000])
    downloader = dataset.downloader()
    downloader.fetch_to_file(1, target)
    assert target.read_bytes() == expected
    assert not (tmp_path / "00001.zip.part").exists()
    assert downloader.stats.bytes_received == len(expected) - 7_000
    assert downloader.stats.resumed == 1


def test_fetch_to_file_discards_a_corrupt_partial_file(
    live_server: LiveServer, tmp_path: Path
) -> None:
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    expected = chunk_bytes(live_server, 1)
    (tmp_path / "00001.zip.part").write_bytes(b"x" * 7_000)
    dataset.downloader().fetch_to_file(1, tmp_path / "00001.zip")
    assert (tmp_path / "00001.zip").read_bytes() == expected


def test_fetch_to_file_corrupt_twice_leaves_no_file_behind(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]], tmp_path: Path
) -> None:
    dataset, _ = through_proxy([Fault("corrupt", offset=99)] * 2, prefetch=1)
    with pytest.raises(DownloadError, match="corrupt") as info:
        dataset.downloader().fetch_to_file(0, tmp_path / "00000.zip")
    assert info.value.chunk_id == 0
    assert list(tmp_path.iterdir()) == []  # neither the file nor an empty .part


def test_close_unblocks_a_stalled_download_at_once(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
) -> None:
    dataset, proxy = through_proxy(
        [Fault("stall", after_bytes=1_000, seconds=60)], timeout=60, prefetch=1
    )
    # A fault counts once it has taken effect: chunk 0's first 1,000 bytes are sent and the
    # proxy has gone silent. (Bytes forwarded would be met by the job's JSON first.)
    seconds, errors = close_while_consuming(
        dataset, lambda: proxy.wait_for_fault("stall", timeout=0), settle=0.2
    )
    assert proxy.stats.faults == {"stall": 1}  # close() came in the stall, not before it
    assert seconds < 5
    assert errors  # the consumer learns it was cancelled instead of hanging


def test_close_unblocks_a_request_still_waiting_for_its_headers(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]],
) -> None:
    """The server took the request and says nothing: not even headers. close() (what Ctrl-C
    and an early break lead to) must not wait out the 60 s timeout."""
    dataset, proxy = through_proxy([Fault("hang", seconds=60)], timeout=60, prefetch=1)
    seconds, errors = close_while_consuming(
        dataset, lambda: proxy.stats.faults["hang"] > 0, settle=0.2
    )
    assert seconds < 5
    assert errors


def test_a_hang_shorter_than_the_timeout_is_waited_for(
    through_proxy: Callable[..., tuple[Dataset, FaultProxy]], clean_digest: tuple[int, str]
) -> None:
    dataset, proxy = through_proxy([Fault("hang", seconds=0.3)], timeout=30, prefetch=1)
    assert digest(dataset) == clean_digest
    assert proxy.stats.faults["hang"] == 1


def test_every_image_exactly_once_under_a_random_fault_mix(
    live_server: LiveServer, clean_digest: tuple[int, str]
) -> None:
    kinds = [
        Fault("reset", after_bytes=3_000),
        Fault("status", status=502),
        Fault("rate_limit", retry_after=0),
        Fault("truncate", after_bytes=4_000),
    ]  # corruption is left out: two on one chunk is, by design, a DownloadError
    schedule = FaultSchedule.random(0.3, kinds, seed=7, match=CHUNKS)
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        for _ in range(3):
            dataset = load_dataset(
                JOB_UNIFORM, live_server.api_key, proxy.base_url, retries=6, backoff=0.01
            )
            assert digest(dataset) == clean_digest
        assert proxy.stats.faults_injected > 0
    assert clean_digest[0] == UNIFORM_TOTAL


def test_buffer_pool_reuses_one_allocation_across_chunk_sizes() -> None:
    from pixcrawler.downloader import BufferPool

    pool = BufferPool(capacity=1000)
    first = pool.take(900)
    assert len(first) == 900
    pool.give(first)
    again = pool.take(1000)  # grows back within the allocation: same object
    assert again is first and len(again) == 1000
    pool.give(again)
    view = memoryview(again)  # someone still reads it: it must not be resized
    other = pool.take(700)
    assert other is not again and len(again) == 1000 and len(other) == 700
    view.release()
    assert len(pool.take(2000)) == 2000  # larger than any listed chunk: its own buffer


def test_a_buffer_still_viewed_is_not_reused_for_a_chunk_of_the_same_size() -> None:
    """A chunk of the very size of a returned buffer needs no resize, the step that
    refuses a viewed buffer; the pool must still see the view (a slice some error's
    traceback holds, say) and leave those bytes alone."""
    from pixcrawler.downloader import BufferPool

    pool = BufferPool(capacity=1000)
    first = pool.take(800)
    first[:] = b"a" * 800
    view = memoryview(first)[10:20]
    pool.give(first)
    other = pool.take(800)
    assert other is not first and len(other) == 800
    assert bytes(view) == b"a" * 10 and len(first) == 800
    view.release()
    pool.give(first)
    assert pool.take(800) is first and first == b"a" * 800  # unviewed: reused, bytes intact


def test_iterating_recycles_chunk_buffers(live_server: LiveServer) -> None:
    from pixcrawler.downloader import BufferPool

    taken: list[int] = []
    original = BufferPool.take

    def counting(self: BufferPool, size: int) -> bytearray:
        buffer = original(self, size)
        taken.append(id(buffer))
        return buffer

    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, prefetch=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BufferPool, "take", counting)
        for _ in range(3):
            list(dataset)
    assert len(taken) == 3 * dataset.num_chunks
    assert len(set(taken)) < len(taken)  # buffers came back and were used again


@pytest.mark.parametrize("prefetch", [1, 2])
def test_the_chunks_being_decoded_count_in_the_window(
    live_server: LiveServer, prefetch: int
) -> None:
    """At most prefetch + 1 chunk buffers exist at once, the ones being decoded included
    (the design's memory bound): a chunk finishing its last groups while the next one
    starts does not open the window further."""
    from pixcrawler.downloader import ChunkDownloader

    lock = threading.Lock()
    state = {"out": 0, "peak": 0, "fetched": 0}
    fetch, recycle = ChunkDownloader.fetch, ChunkDownloader.recycle

    def counting_fetch(
        self: ChunkDownloader, index: int, cancel: object = None, **options: bool
    ) -> bytearray:
        with lock:
            state["out"] += 1
            state["fetched"] += 1
            state["peak"] = max(state["peak"], state["out"])
        return fetch(self, index, cancel, **options)  # type: ignore[arg-type]

    def counting_recycle(self: ChunkDownloader, buffer: bytearray | None) -> None:
        with lock:
            state["out"] -= 1
        recycle(self, buffer)

    dataset = load_dataset(
        JOB_UNIFORM, live_server.api_key, live_server.base_url, prefetch=prefetch
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ChunkDownloader, "fetch", counting_fetch)
        patch.setattr(ChunkDownloader, "recycle", counting_recycle)
        for _ in dataset:
            time.sleep(0.001)  # a consumer slower than the loopback: the window fills
        assert sum(1 for _ in dataset.iter_batches(batch_size=7)) == -(-UNIFORM_TOTAL // 7)
    assert state["fetched"] == 2 * dataset.num_chunks and state["out"] == 0
    assert state["peak"] <= prefetch + 1


def test_chunks_a_consumer_still_holds_count_in_the_window(live_server: LiveServer) -> None:
    """A consumer that takes chunks without recycling them holds them all: no fetch
    starts past prefetch + 1 chunks out, however long it keeps them."""
    from pixcrawler.downloader import ChunkDownloader

    prefetch = 2
    lock = threading.Lock()
    started: list[int] = []
    fetch = ChunkDownloader.fetch

    def counting_fetch(
        self: ChunkDownloader, index: int, cancel: object = None, **options: bool
    ) -> bytearray:
        with lock:
            started.append(index)
        return fetch(self, index, cancel, **options)  # type: ignore[arg-type]

    dataset = load_dataset(
        JOB_UNIFORM, live_server.api_key, live_server.base_url, prefetch=prefetch
    )
    assert dataset.num_chunks > prefetch + 1  # a chunk left that must not be fetched
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ChunkDownloader, "fetch", counting_fetch)
        downloader = dataset.downloader()
        chunks = downloader.iter_chunks(recycles=True)
        held = [next(chunks) for _ in range(prefetch + 1)]  # none recycled
        time.sleep(0.5)  # a fetch started by mistake would have begun by now
        with lock:
            fetched = sorted(started)
        chunks.close()
        dataset.release_downloader(downloader)
    assert [chunk.index for chunk, _ in held] == [0, 1, 2]
    assert fetched == [0, 1, 2]  # prefetch + 1 at most


def test_max_workers_bounds_the_chunks_downloaded_at_once(live_server: LiveServer) -> None:
    """DESIGN.md: max_workers bounds concurrent transfers, whatever the window holds."""
    from pixcrawler.downloader import ChunkDownloader

    lock = threading.Lock()
    running = peak = 0
    fetch = ChunkDownloader.fetch

    def slow_fetch(
        self: ChunkDownloader, index: int, cancel: object = None, **options: bool
    ) -> bytearray:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.1)  # long enough for a second transfer to overlap
            return fetch(self, index, cancel, **options)  # type: ignore[arg-type]
        finally:
            with lock:
                running -= 1

    dataset = load_dataset(
        JOB_UNIFORM, live_server.api_key, live_server.base_url, max_workers=1, prefetch=3
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ChunkDownloader, "fetch", slow_fetch)
        assert sum(1 for _ in dataset) == UNIFORM_TOTAL
    assert peak == 1


def test_a_content_length_other_than_the_listed_size_is_refused(
    live_server: LiveServer, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """The chunk file changed behind the listing: its Content-Length says so before a byte of
    the body is trusted; fetched again once, then a DownloadError naming the chunk."""
    import shutil

    shutil.copytree(live_server.store / JOB_UNIFORM, tmp_path / JOB_UNIFORM)
    with open(tmp_path / JOB_UNIFORM / "chunks" / "00001.zip", "ab") as fh:
        fh.write(b"extra bytes")
    base_url = server_factory(tmp_path)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, base_url, retries=0)
    with pytest.raises(DownloadError, match=r"announced \d+ bytes where \d+ were due") as info:
        list(dataset)
    assert info.value.chunk_id == 1
    assert dataset.stats.transfer.checksum_failures == 2


_Host = TypeVar("_Host", bound="_BlobHost")


class _BlobHost:
    """A host of one file on 127.0.0.1, answered by a handler class a subclass makes."""

    url = ""

    def _serve(self, handler: type[BaseHTTPRequestHandler], path: str = "/c.bin") -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{path}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self: _Host) -> _Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SlowRanges(_BlobHost):
    """A chunk host for split fetches: ``Range`` requests answered 206, each byte range
    streamed slowly (16 KiB per 20 ms) except the first; the first range is answered with
    ``first_status`` instead when that is set."""

    def __init__(self, size: int, first_status: int | None = None) -> None:
        self.size = size

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                lo, hi = (int(v) for v in self.headers["Range"].split("=")[1].split("-"))
                if lo == 0 and first_status is not None:
                    self.send_response(first_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {lo}-{hi}/{size}")
                self.send_header("Content-Length", str(hi - lo + 1))
                self.end_headers()
                left = hi - lo + 1
                try:
                    while left:
                        n = min(16 << 10, left)
                        self.wfile.write(b"x" * n)
                        left -= n
                        if lo:
                            time.sleep(0.02)
                except OSError:
                    pass

        self._serve(Handler)


def test_a_range_that_fails_stops_the_chunks_other_ranges_before_fetch_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One byte range of a split chunk fails for good (404): fetch() raises only once the
    other ranges have stopped. None keeps its socket, retries, or downloads on into a
    buffer nobody will read."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader
    from pixcrawler.retry import RetryPolicy

    monkeypatch.setattr(config, "MIN_RANGE_PART", 64 * 1024)
    host = _SlowRanges(1 << 20, first_status=404)
    client = ApiClient("k", "http://127.0.0.1:9", retry=RetryPolicy(retries=1, backoff_base=0.01))
    downloader = ChunkDownloader(client, [Chunk(0, host.url, 1 << 20)], max_workers=4)
    try:
        with pytest.raises(DownloadError, match="HTTP 404"):
            downloader.fetch(0, ranges=4)
        received = downloader.stats.bytes_received
        time.sleep(0.3)  # a range still running would receive ~200 KB meanwhile
        assert downloader.stats.bytes_received == received
        assert downloader.stats.requests == 4  # no range was retried after the failure
    finally:
        downloader.close()
        host.close()


def test_closing_during_split_fetches_ends_them_with_the_sdks_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two split fetches on two range threads: one fetch's second range waits in the queue
    when close() runs. Both fetches end with the SDK's cancellation error (a PixCrawlerError),
    not concurrent.futures' CancelledError, and a fetch after close() starts no thread."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader
    from pixcrawler.exceptions import PixCrawlerError
    from pixcrawler.retry import RetryPolicy

    monkeypatch.setattr(config, "MIN_RANGE_PART", 64 * 1024)
    host = _SlowRanges(4 << 20)  # each slow range takes seconds
    client = ApiClient("k", "http://127.0.0.1:9", retry=RetryPolicy(retries=0))
    chunks = [Chunk(i, f"{host.url}?{i}", 4 << 20) for i in range(2)]
    downloader = ChunkDownloader(client, chunks, max_workers=2, prefetch=1)
    errors: dict[int, BaseException] = {}

    def fetch(index: int, ranges: int) -> None:
        try:
            downloader.fetch(index, ranges=ranges)
        except BaseException as exc:  # what escapes is the point
            errors[index] = exc

    first = threading.Thread(target=fetch, args=(0, 3))
    first.start()
    time.sleep(0.3)  # its two later ranges hold both range threads
    second = threading.Thread(target=fetch, args=(1, 2))
    second.start()
    time.sleep(0.3)  # its first range is done; its second waits in the queue
    try:
        downloader.close()
        first.join(10)
        second.join(10)
        assert not first.is_alive() and not second.is_alive()
        assert sorted(errors) == [0, 1]
        assert all(isinstance(e, PixCrawlerError) for e in errors.values()), errors
        threads = {t.name for t in threading.enumerate()}
        with pytest.raises(PixCrawlerError):
            downloader.fetch(1, ranges=2)
        assert {t.name for t in threading.enumerate()} <= threads  # no range pool again
    finally:
        host.close()


def test_waiting_for_a_fetch_that_close_cancelled_in_the_queue_ends_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A future cancelled by a pool's shutdown(cancel_futures=True) never counts as done
    for concurrent.futures.wait(); wait_for() must still end, not log "waited" forever."""
    from concurrent.futures import CancelledError, ThreadPoolExecutor

    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    monkeypatch.setattr(config, "SLOW_WAIT_SECONDS", 0.05)
    downloader = ChunkDownloader(ApiClient("k", "http://127.0.0.1:9"), [Chunk(0, "c", 1)])
    pool = ThreadPoolExecutor(1)
    gate = threading.Event()
    pool.submit(gate.wait)
    queued = pool.submit(bytes, 1)
    pool.shutdown(wait=False, cancel_futures=True)
    try:
        started = time.monotonic()
        with pytest.raises(CancelledError):
            downloader.wait_for(0, queued)
        assert time.monotonic() - started < 1
    finally:
        gate.set()
        downloader.close()


@pytest.mark.parametrize("extra", [0, 500])
def test_fetch_to_file_of_a_chunk_of_unknown_size_ends_a_resume_the_server_cannot_serve(
    live_server: LiveServer, tmp_path: Path, extra: int
) -> None:
    """A chunk listed without size_bytes, its .part already whole (or longer than the chunk,
    left by another file): the resume is answered 416 with the chunk's length. A whole part
    is verified and kept without a byte downloaded; a longer one is fetched afresh."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    chunk = replace(dataset.downloader().chunk(1), size_bytes=None)
    expected = chunk_bytes(live_server, 1)
    target = tmp_path / "00001.zip"
    (tmp_path / "00001.zip.part").write_bytes(expected + b"x" * extra)
    client = ApiClient(live_server.api_key, live_server.base_url)
    downloader = ChunkDownloader(client, [chunk])
    try:
        downloader.fetch_to_file(1, target)
    finally:
        downloader.close()
    assert target.read_bytes() == expected
    assert downloader.stats.bytes_received == (len(expected) if extra else 0)


def test_a_chunk_listed_without_a_size_or_with_size_0_is_read_to_its_end(
    live_server: LiveServer,
) -> None:
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader
    from pixcrawler.exceptions import PixCrawlerError

    entry = {"index": 1, "url": "/x", "sha256": "0" * 64}
    assert Chunk.from_json({**entry, "size_bytes": 0}).size_bytes is None
    assert Chunk.from_json(entry).size_bytes is None
    with pytest.raises(PixCrawlerError, match="negative"):
        Chunk.from_json({**entry, "size_bytes": -1})

    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    chunk = replace(dataset.downloader().chunk(1), size_bytes=None)
    downloader = ChunkDownloader(ApiClient(live_server.api_key, live_server.base_url), [chunk])
    try:
        assert bytes(downloader.fetch(1)) == chunk_bytes(live_server, 1)
    finally:
        downloader.close()


def test_a_chunk_listed_at_an_impossible_size_fails_alone_and_typed(
    live_server: LiveServer, server_factory: Any, tmp_path: Path
) -> None:
    """One chunk listed at 10**15 bytes sized every chunk's buffer: the first, good chunk
    failed with a bare MemoryError before any image (and CPython printed a SystemError).
    Now only that chunk fails, as a DownloadError naming it and the limit."""

    def impossible(job: dict[str, Any]) -> None:
        job["chunks"][1]["size_bytes"] = 10**15

    store = edited_copy(live_server.store, tmp_path, JOB_UNIFORM, impossible)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store))
    seen = 0
    with pytest.raises(
        DownloadError,
        match="Chunk 1 is listed at 1,000,000,000,000,000 bytes, "
        r"more than the 8,589,934,592 a chunk may hold .*MAX_CHUNK_BYTES",
    ) as info:
        for _ in dataset:
            seen += 1
    assert seen == UNIFORM_CHUNK_SIZE and info.value.chunk_id == 1


def test_a_chunk_listed_without_a_size_stops_at_the_most_a_chunk_may_hold(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A body that never ends, for a chunk listed with no size, grew until the process ran
    out of memory."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    expected = chunk_bytes(live_server, 1)
    monkeypatch.setattr(config, "MAX_CHUNK_BYTES", len(expected) - 1)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    chunk = replace(dataset.downloader().chunk(1), size_bytes=None)
    downloader = ChunkDownloader(ApiClient(live_server.api_key, live_server.base_url), [chunk])
    try:
        with pytest.raises(DownloadError, match=r"Chunk 1 is larger than the .* bytes a chunk"):
            downloader.fetch(1)
        # Into a file too (pixcrawler download): it filled the disk.
        part = tmp_path / "00001.zip.part"
        with pytest.raises(DownloadError, match=r"Chunk 1 is larger than the .* bytes a chunk"):
            downloader.fetch_to_file(1, tmp_path / "00001.zip")
        assert not (tmp_path / "00001.zip").exists()
        assert not part.exists() or part.stat().st_size <= len(expected) - 1
        monkeypatch.setattr(config, "MAX_CHUNK_BYTES", len(expected))  # exactly: it fits
        assert bytes(downloader.fetch(1)) == expected
        assert downloader.fetch_to_file(1, tmp_path / "00001.zip").read_bytes() == expected
    finally:
        downloader.close()
    # A chunk that lists its size is held to that size, however large, on disk.
    monkeypatch.setattr(config, "MAX_CHUNK_BYTES", 1)
    sized = dataset.downloader().chunk(1)
    downloader = ChunkDownloader(ApiClient(live_server.api_key, live_server.base_url), [sized])
    try:
        assert downloader.fetch_to_file(1, tmp_path / "sized.zip").read_bytes() == expected
    finally:
        downloader.close()


def test_a_chunk_the_job_does_not_list_is_a_typed_error(live_server: LiveServer) -> None:
    from pixcrawler.exceptions import PixCrawlerError

    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
    with pytest.raises(PixCrawlerError, match="lists no chunk 99"):
        list(dataset.iter_samples(chunks=[99]))
    with pytest.raises(PixCrawlerError, match="lists no chunk 99"):
        dataset.downloader().fetch(99)


class _ReplacedFileHost(_BlobHost):
    """A blob host whose file is replaced while a download of it is cut off after 3,000
    bytes: it honours ``If-Range`` as RFC 9110 says (a 200 with the whole new file when
    the tag is not the current one), and can answer a range shorter than asked. Its
    ``validator``: a strong ETag, a weak one (as a host compressing on the fly gives) or
    only Last-Modified."""

    def __init__(
        self, first: bytes, second: bytes, short_ranges: bool = False, validator: str = "strong"
    ) -> None:
        self.current = first
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                outer.requests.append(dict(self.headers.items()))
                data = outer.current
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                # ("replicas": one file, its Last-Modified by the replica that answers)
                changed = len(outer.requests) % 2 if validator == "replicas" else data == second
                version = {"strong": ("ETag", etag), "weak": ("ETag", f"W/{etag}")}.get(
                    validator, ("Last-Modified", f"Sun, 06 Dec 2026 0{int(changed)}:00:00 GMT")
                )
                asked = self.headers.get("Range")
                if asked is None or self.headers.get("If-Range", etag) != etag:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header(*version)
                    self.end_headers()
                    if len(outer.requests) == 1:  # cut off, and the file replaced
                        self.wfile.write(data[:3000])
                        outer.current = second
                        self.close_connection = True
                        return
                    self.wfile.write(data)
                    return
                start = int(asked.removeprefix("bytes=").split("-")[0])
                stop = min(start + 1000, len(data)) if short_ranges else len(data)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
                self.send_header("Content-Length", str(stop - start))
                self.send_header(*version)
                self.end_headers()
                self.wfile.write(data[start:stop])

        self._serve(Handler, path="")


def _fetch_unverified(host: _ReplacedFileHost, size: int | None, retries: int = 2) -> bytearray:
    """Chunk 0 from ``host``, listed without a sha256 (other producers may omit it)."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader
    from pixcrawler.retry import RetryPolicy

    policy = RetryPolicy(retries=retries, backoff_base=0.01)
    client = ApiClient("key", host.url, timeout=5, retry=policy)
    try:
        chunks = [Chunk(index=0, url=host.url + "/c/0", size_bytes=size)]
        downloader = ChunkDownloader(client, chunks, max_workers=1, prefetch=1)
        try:
            return downloader.fetch(0)
        finally:
            downloader.close()
    finally:
        client.close()


@pytest.mark.parametrize("validator", ["strong", "weak", "last-modified"])
def test_a_resume_never_stitches_two_versions_of_a_file(validator: str) -> None:
    """A weak ETag (nginx or Apache compressing) or Last-Modified is no If-Range, but it
    still tells the versions apart: the resumed range of the new file was spliced onto the
    old one's first 3,000 bytes, and with no sha256 listed nothing noticed."""
    first, second = os.urandom(10_000), os.urandom(10_000)
    host = _ReplacedFileHost(first, second, validator=validator)
    try:
        assert bytes(_fetch_unverified(host, size=10_000)) == second  # whole, not mixed
        if validator == "strong":
            assert host.requests[1]["If-Range"] == f'"{hashlib.sha256(first).hexdigest()}"'
        else:
            assert "If-Range" not in host.requests[1]
    finally:
        host.close()


def test_replicas_naming_one_file_differently_cost_a_restart_not_a_failure() -> None:
    """Last-Modified differs by replica: the resume after the cut starts over at once, and
    with one retry allowed the chunk still comes (counted as a failure, it failed)."""
    data = os.urandom(10_000)
    host = _ReplacedFileHost(data, data, validator="replicas")
    try:
        assert bytes(_fetch_unverified(host, size=10_000, retries=1)) == data
        assert [("Range" in r) for r in host.requests] == [False, True, False]
    finally:
        host.close()


@pytest.mark.timeout(20)  # (endless, it would run until stopped)
def test_a_host_whose_every_answer_is_another_version_gets_no_endless_free_restarts() -> None:
    """Every GET answered with a short 206, replicas taking turns with their Last-Modified:
    each resume of the rest started over for free, 700 requests a second for ever. One
    restart per failure is free; the next counts, and the retries end it."""
    body = os.urandom(256 * 1024)
    served: list[int] = []

    def answer(n: int, handler: Any) -> None:
        served.append(n)
        lo = _range_start(handler)
        hi = min(len(body), lo + 64 * 1024)
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(body)}")
        handler.send_header("Last-Modified", f"Sun, 06 Dec 2026 0{n % 2}:00:00 GMT")
        handler.send_header("Content-Length", str(hi - lo))
        # (Said: a connection closed unannounced may be taken for reuse, and fail.)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(body[lo:hi])

    expected = r"Chunk 0 failed after 4 attempts: .*changing"
    with (
        _downloader_from(answer, len(body)) as downloader,
        pytest.raises(DownloadError, match=expected),
    ):
        downloader.fetch(0, ranges=1)
    assert len(served) <= 16


def test_a_range_shorter_than_asked_is_never_handed_out_as_the_chunk() -> None:
    data = os.urandom(10_000)
    host = _ReplacedFileHost(data, data, short_ranges=True)
    try:
        # Unsized, 4,000 bytes looked complete. The 206 names the file's length: the rest
        # is asked for, 1,000 bytes an answer, each resumed where the last one ended.
        assert bytes(_fetch_unverified(host, size=None)) == data
        starts = [r["Range"].split("=")[1].split("-")[0] for r in host.requests[1:]]
        assert starts == [str(n) for n in range(3000, 10_000, 1000)]
    finally:
        host.close()


class _OddRanges(_BlobHost):
    """A blob host of ``body`` whose 206s need not be the range asked: ``answer(lo, hi)``
    (the first and last byte asked) gives the first and last byte it sends and the file
    length it names. A GET without ``Range`` gets the whole body, cut after ``cut`` bytes
    when set: the first time, or every time if ``cut_every``. Keep-alive, as a CDN. An
    answer past the range asked sends what was asked at once, the rest 0.2 s later: a
    client that put its connection back in the pool would send its next request there, and
    read the rest as the answer. Such requests are counted."""

    def __init__(
        self,
        body: bytes,
        answer: Callable[[int, int], tuple[int, int, int]],
        cut: int | None = None,
        cut_every: bool = False,
    ) -> None:
        self.ranges: list[str | None] = []
        self.after_unread = 0
        lock = threading.Lock()
        outer = self

        class Handler(_QuietHandler):
            unread = False  # the last answer on this connection went past what was asked

            def do_GET(self) -> None:
                asked = self.headers.get("Range")
                with lock:
                    outer.ranges.append(asked)
                    outer.after_unread += self.unread
                    whole_once = outer.ranges.count(None) == 1
                    cut_now = cut if whole_once or cut_every else None
                if asked is None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:cut_now])
                    self.close_connection = cut_now is not None
                    return
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", asked)
                assert match is not None
                lo, hi = int(match[1]), int(match[2] or len(body) - 1)
                first, last, total = answer(lo, hi)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{total}")
                self.send_header("Content-Length", str(last - first + 1))
                self.end_headers()
                self.unread = last > hi
                with contextlib.suppress(OSError):  # a client that read what it asked and left
                    self.wfile.write(body[first : min(last, hi) + 1])
                    if self.unread:
                        self.wfile.flush()
                        time.sleep(0.2)
                        self.wfile.write(body[hi + 1 : last + 1])

        self._serve(Handler)


def _verified_downloader(host: _OddRanges, body: bytes, **options: Any) -> Any:
    """A downloader of ``body`` from ``host`` as chunk 0, its sha256 listed; quick retries."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader
    from pixcrawler.retry import RetryPolicy

    client = ApiClient("k", "http://127.0.0.1:9", retry=RetryPolicy(backoff_base=0.01), timeout=5)
    chunk = Chunk(0, host.url, len(body), hashlib.sha256(body).hexdigest())
    return ChunkDownloader(client, [chunk], **options)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["ranges", "first of an iteration", "resume", "to a file"])
def test_a_host_that_caps_each_range_answer_is_asked_for_the_rest(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 206 ends after 48 KiB at most, its Content-Range saying so (some CDNs cap
    ranged answers): its bytes are kept and the rest asked for, no failure and no backoff.
    Each split range, and a resume, was refused as corrupt, so a chunk split into ranges
    failed twice: "the server's copy may be bad", though one stream worked."""
    monkeypatch.setattr(config, "MIN_RANGE_PART", 64 * 1024)
    body, cap = os.urandom(512 * 1024), 48 * 1024
    cut = 100_000 if how == "resume" else None
    with _OddRanges(body, lambda lo, hi: (lo, min(hi, lo + cap - 1), len(body)), cut) as host:
        downloader = _verified_downloader(host, body, max_workers=4)
        try:
            if how == "ranges":
                assert bytes(downloader.fetch(0, ranges=4)) == body
            elif how == "first of an iteration":
                assert [bytes(data) for _, data in downloader.iter_chunks()] == [body]
            elif how == "resume":
                assert bytes(downloader.fetch(0, ranges=1)) == body
            else:
                (tmp_path / "c.bin.part").write_bytes(body[:100_000])
                downloader.fetch_to_file(0, tmp_path / "c.bin")
                assert (tmp_path / "c.bin").read_bytes() == body
        finally:
            downloader.close()
        transfer = downloader.stats
        assert transfer.checksum_failures == 0
        assert transfer.retries == (1 if how == "resume" else 0)  # the cut, nothing more
        if how in ("ranges", "first of an iteration"):  # 128 KiB a range, 3 answers each
            assert None not in host.ranges and len(host.ranges) == transfer.requests == 12
        else:  # whatever was held, then every answer from where the last one ended
            held = [100_000 + n * cap for n in range(-(-(len(body) - 100_000) // cap))]
            asked = [r.split("=")[1].split("-")[0] for r in host.ranges if r is not None]
            assert asked == [str(n) for n in held]
        assert host.after_unread == 0


@pytest.mark.timeout(30)
def test_a_range_answered_to_the_end_of_the_file_is_read_only_as_far_as_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that sends the rest of the file from a range's first byte (its end ignored,
    Content-Range saying so): each range takes the bytes it asked for, and its connection,
    the rest unread, is closed, not handed to the next request. It was refused as corrupt."""
    monkeypatch.setattr(config, "MIN_RANGE_PART", 64 * 1024)
    body = os.urandom(512 * 1024)
    with _OddRanges(body, lambda lo, hi: (lo, len(body) - 1, len(body))) as host:
        downloader = _verified_downloader(host, body, max_workers=4)
        try:
            for _ in range(2):  # the second on the connections the first left, if any
                assert bytes(downloader.fetch(0, ranges=4)) == body
        finally:
            downloader.close()
        assert downloader.stats.checksum_failures == downloader.stats.retries == 0
        assert len(host.ranges) == 8 and None not in host.ranges
        assert host.after_unread == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("odd", ["another first byte", "another file length"])
def test_a_range_answered_from_another_byte_or_file_is_still_refused(
    odd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 206 that starts at another byte than asked, or names a file of another length,
    is not part of this chunk, whatever its end: corrupt, fetched again, then the error."""
    monkeypatch.setattr(config, "MIN_RANGE_PART", 64 * 1024)
    body = os.urandom(512 * 1024)

    def answer(lo: int, hi: int) -> tuple[int, int, int]:
        if odd == "another first byte":
            return max(lo - 1, 0), hi, len(body)  # (the first range starts where asked)
        return lo, hi, len(body) + 1

    with _OddRanges(body, answer) as host:
        downloader = _verified_downloader(host, body, max_workers=4)
        try:
            with pytest.raises(DownloadError, match=r"is corrupt: chunk 0: .*twice") as info:
                downloader.fetch(0, ranges=4)
        finally:
            downloader.close()
        assert info.value.chunk_id == 0 and downloader.stats.checksum_failures == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["ranges", "resume"])
def test_a_host_that_answers_a_range_a_byte_at_a_time_is_not_asked_for_ever(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 206 carries one byte: ranges are of no use on that host, and "ask for the
    rest" alone would make ~500,000 requests. A chunk split into ranges comes as one
    stream instead; a resume starts over from byte 0, asking for no range, as a failure
    (with its backoff, within the retries). Refused as corrupt, it cost a resume one of
    the chunk's two downloads, and a chunk split into ranges the chunk."""
    monkeypatch.setattr(config, "MIN_RANGE_PART", 64 * 1024)
    body = os.urandom(512 * 1024)
    cut = 100_000 if how == "resume" else None
    with _OddRanges(body, lambda lo, hi: (lo, lo, len(body)), cut) as host:
        downloader = _verified_downloader(host, body, max_workers=4)
        try:
            assert bytes(downloader.fetch(0, ranges=4 if how == "ranges" else 1)) == body
        finally:
            downloader.close()
        assert downloader.stats.checksum_failures == 0
        if how == "ranges":  # up to four ranges, one byte each, then one stream
            assert host.ranges.count(None) == 1 and len(host.ranges) <= 5
            assert downloader.stats.retries == 0
        else:  # cut; one byte from where the cut left off; then the whole body
            assert host.ranges == [None, f"bytes=100000-{len(body) - 1}", None]
            assert downloader.stats.retries == 2


@pytest.mark.timeout(30)
class _RestartingHost(_BlobHost):
    """A blob host of ``body`` that ignores ``Range``: every GET gets 200 and the body from
    byte 0, its ``n``-th cut off after ``n * step`` bytes (then ``Connection: close``)."""

    def __init__(self, body: bytes, step: int) -> None:
        self.requests = 0
        self.sent = 0
        lock = threading.Lock()
        outer = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                with lock:
                    outer.requests += 1
                    cut = outer.requests * step
                    outer.sent += min(cut, len(body))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body[:cut])

        self._serve(Handler)


@pytest.mark.timeout(30)
def test_a_host_that_answers_each_resume_from_byte_0_cannot_have_a_chunk_fetched_for_ever() -> None:
    """Each cut a little further than the last, each attempt is progress; but each brings
    the bytes before it again. The retries count afresh only while the attempts have brought
    at most twice the bytes they reached, so the chunk fails after a few times its size
    instead of after its size squared (a 64 MiB chunk took 61 requests, 2 GB)."""
    body = os.urandom(1 << 20)  # floor: 128 KiB
    host = _RestartingHost(body, step=130 << 10)
    downloader = _downloader({0: (host.url, len(body))}, max_workers=1)
    try:
        with pytest.raises(DownloadError, match="Chunk 0 failed after 6 attempts"):
            downloader.fetch(0)
    finally:
        downloader.close()
        host.close()
    # Three fresh starts (cut at 130, 260 and 390 KiB: 780 KiB brought), then 3 retries.
    assert host.requests == 6
    assert host.sent < 4 * len(body)


def test_a_stream_given_a_byte_at_a_time_ends_within_its_retries() -> None:
    """Every whole body cut after 100,000 bytes, every range answered with one byte: each
    try is a failure, so the chunk fails after its retries (four requests), not a byte at
    a time."""
    body = os.urandom(512 * 1024)
    with _OddRanges(body, lambda lo, hi: (lo, lo, len(body)), 100_000, cut_every=True) as host:
        downloader = _verified_downloader(host, body, max_workers=1)
        try:
            with pytest.raises(DownloadError, match="after 4 attempts: ranges of no use: 1 byte"):
                downloader.fetch(0, ranges=1)
        finally:
            downloader.close()
        assert host.ranges == [None, f"bytes=100000-{len(body) - 1}"] * 2


def test_a_length_header_with_a_digit_int_refuses_is_no_length() -> None:
    """ "²" passes str.isdigit() and fails int(): taken as no length, never a ValueError."""
    from types import SimpleNamespace

    from pixcrawler.downloader import _check_length, _unsatisfied_length

    _check_length(SimpleNamespace(headers={"Content-Length": "\xb2"}), 0, 10)  # type: ignore[arg-type]
    unsatisfied = SimpleNamespace(headers={"Content-Range": "bytes */\xb2"})
    assert _unsatisfied_length(unsatisfied) is None  # type: ignore[arg-type]


def _downloader(urls: dict[int, tuple[str, int]], **options: Any) -> Any:
    """A ChunkDownloader of chunks ``index: (url, size)`` (no sha256), quick to retry."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader
    from pixcrawler.retry import RetryPolicy

    retry = RetryPolicy(retries=options.pop("retries", 3), backoff_base=0.01)
    client = ApiClient("k", "http://127.0.0.1:9", retry=retry, timeout=options.pop("timeout", 5))
    chunks = [Chunk(index, url, size) for index, (url, size) in urls.items()]
    return ChunkDownloader(client, chunks, **options)


def test_a_chunk_whose_retries_run_out_on_5xx_says_what_the_host_said() -> None:
    """The API's error gave the server's words; the chunk's gave the status alone."""
    body = json.dumps({"detail": "storage node 7 is rebuilding"}).encode()
    with CannedHost(503, body, {"Content-Type": "application/json"}) as host:
        downloader = _downloader({0: (host.base_url + "/c0", 100)}, retries=1)
        with pytest.raises(DownloadError) as info:
            downloader.fetch(0)
        downloader.close()
    assert str(info.value).splitlines()[0] == (
        "Chunk 0 failed with HTTP 503 after 2 attempts (storage node 7 is rebuilding)"
    )


def test_a_chunks_retry_after_no_one_would_wait_is_said_as_such() -> None:
    """A Retry-After of 1e308 was printed with its 309 digits (now: 400 nines, as 1e308
    is no delta-seconds and is ignored)."""
    with CannedHost(429, b"", {"Retry-After": "9" * 400}) as host:
        downloader = _downloader({0: (host.base_url + "/c0", 100)})
        with pytest.raises(DownloadError) as info:
            downloader.fetch(0)
        downloader.close()
    assert str(info.value).splitlines()[0].endswith("retry in more than a year")


def test_close_wakes_a_fetch_asleep_in_its_retry_after_once_a_sibling_has_finished(
    tmp_path: Path,
) -> None:
    """An iteration's fetches share one cancel event: the one that finished first took it
    out of close()'s reach, and a fetch asleep in a 20 s Retry-After slept it out."""
    for index in range(3):
        (tmp_path / f"{index}.bin").write_bytes(os.urandom(64 << 10))
    schedule = FaultSchedule.script([Fault("rate_limit", retry_after=20)], match=r"/1\.bin$")
    with StaticServer(tmp_path) as host, FaultProxy(host.base_url, schedule=schedule) as proxy:
        urls = {i: (f"{proxy.base_url}/{i}.bin", 64 << 10) for i in range(3)}
        downloader = _downloader(urls, max_workers=2, prefetch=2)
        got: list[object] = []

        def consume() -> None:
            try:
                got.extend(chunk.index for chunk, _ in downloader.iter_chunks())
            except BaseException as exc:  # what escapes is the point
                got.append(exc)

        worker = threading.Thread(target=consume)
        worker.start()
        assert settles(lambda: downloader.stats.chunks_completed == 2, timeout=10)  # 0 and 2
        assert proxy.stats.faults["rate_limit"] == 1  # chunk 1 sleeps its Retry-After
        started = time.monotonic()
        downloader.close()
        worker.join(10)
        assert not worker.is_alive() and time.monotonic() - started < 5, got
        assert got[:1] == [0] and isinstance(got[-1], PixCrawlerError), got


def test_a_range_that_fails_for_good_stops_the_first_and_is_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Range 0 streams on the caller's thread; a later range's 404 waited for it (here
    silent: its read timeout and retries) and was lost behind that range's timeout."""
    monkeypatch.setattr(config, "MIN_RANGE_PART", 64 << 10)
    size = 1 << 20

    def answer(n: int, handler: Any) -> None:
        lo = int(re.fullmatch(r"bytes=(\d+)-\d+", handler.headers["Range"])[1])
        if lo:
            _answer(handler, 404, b"")
            return
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes 0-{size // 4 - 1}/{size}")
        handler.send_header("Content-Length", str(size // 4))
        handler.end_headers()
        handler.wfile.write(b"x" * 1024)
        time.sleep(8)  # then silent, past the client's timeout

    server, url = _scripted_host(answer)
    downloader = _downloader({0: (url, size)}, max_workers=4, retries=0, timeout=3)
    try:
        started = time.monotonic()
        with pytest.raises(DownloadError) as info:
            downloader.fetch(0, ranges=4)
        assert info.value.status_code == 404 and info.value.chunk_id == 0, info.value
        assert time.monotonic() - started < 2.5  # not after range 0's read timeout
    finally:
        downloader.close()
        server.shutdown()
        server.server_close()


def test_a_download_error_kept_by_its_caller_keeps_no_chunk_buffer(tmp_path: Path) -> None:
    """The error's traceback holds the frames it passed through: the window of chunks
    fetched ahead and the failed chunk's buffer lived as long as the error did."""
    size = 4 << 20
    for index in (0, 2):
        (tmp_path / f"{index}.bin").write_bytes(os.urandom(size))
    with StaticServer(tmp_path) as host:
        urls = {i: (f"{host.base_url}/{i}.bin", size) for i in range(3)}  # no 1.bin: 404
        downloader = _downloader(urls, max_workers=2, prefetch=2)
        kept: list[BaseException] = []
        try:
            for _chunk, data in downloader.iter_chunks():
                del data
                assert settles(lambda: downloader.stats.chunks_completed == 2, timeout=10)
        except DownloadError as exc:
            kept.append(exc)
        downloader.close()
    assert kept and kept[0].status_code == 404  # type: ignore[attr-defined]
    assert not [n for n in reachable_buffers(kept[0]) if n >= size]


@pytest.mark.parametrize("left", ["this version", "another version"])
def test_a_part_file_complete_already_is_verified_not_downloaded_again(
    tmp_path: Path, left: str
) -> None:
    """A run stopped between the fsync and the rename left every byte in the .part: the
    resume asked for "bytes=N-(N-1)", which hosts ignore, and got the whole chunk again.
    A whole .part of another version (sha256 listed) is refused, but it is no failed
    download: it used up one of the chunk's two, and one fault more failed the chunk."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader

    data = os.urandom(1 << 20)
    (tmp_path / "c.zip").write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.zip.part").write_bytes(data if left == "this version" else os.urandom(len(data)))
    with StaticServer(tmp_path) as host:
        chunk = Chunk(0, f"{host.base_url}/c.zip", len(data), hashlib.sha256(data).hexdigest())
        downloader = ChunkDownloader(ApiClient("k", "http://127.0.0.1:9"), [chunk])
        assert downloader.fetch_to_file(0, out / "c.zip").read_bytes() == data
        downloader.close()
        assert host.stats.requests == downloader.stats.requests == (left != "this version")
    assert downloader.stats.checksum_failures == 0


def test_a_blob_hosts_401_is_its_refusal_of_the_url_not_of_the_key() -> None:
    """No key is sent to a blob host: "the API key was rejected ... pixcrawler login" sent
    users to fix what was not broken."""

    def answer(n: int, handler: Any) -> None:
        assert "Authorization" not in handler.headers
        _answer(handler, 401, b'{"error": {"message": "Request signature does not match"}}')

    server, url = _scripted_host(answer)
    downloader = _downloader({0: (url, 10)})
    try:
        with pytest.raises(DownloadError) as info:
            downloader.fetch(0)
    finally:
        downloader.close()
        server.shutdown()
        server.server_close()
    message = str(info.value)
    assert "its host refused the URL (HTTP 401: Request signature does not match)" in message
    assert "API key" not in message and "login" not in message
    assert info.value.status_code == 401 and info.value.chunk_id == 0


@pytest.mark.parametrize("extra", [b"trailing bytes", b""], ids=["longer", "as-listed"])
def test_a_chunked_body_longer_than_listed_is_refused_as_one_with_a_length_is(
    extra: bytes,
) -> None:
    """Chunked (no Content-Length), the extra bytes were cut off and the rest handed out;
    a body of the listed size is read to its end marker, no retry."""
    body = os.urandom(100_000)

    def answer(n: int, handler: Any) -> None:
        data = body + extra
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))

    server, url = _scripted_host(answer)
    downloader = _downloader({0: (url, len(body))})
    try:
        if extra:
            with pytest.raises(DownloadError, match="more bytes than the chunk's listed size"):
                downloader.fetch(0)
        else:
            assert bytes(downloader.fetch(0)) == body
            assert downloader.stats.retries == 0
    finally:
        downloader.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("framing", ["close-delimited", "chunked, its end late"])
def test_every_byte_in_is_a_chunk_whatever_comes_after_it(framing: str) -> None:
    """The look-past-the-end for a longer body waited on a body whose end comes when its
    connection closes (or a chunked end marker sent late): a read timeout, a retry, and
    with no retries left a failed chunk whose every byte had arrived. A late end marker
    then held the chunk for the whole read timeout (300 s by default): the look is brief."""
    body = os.urandom(20_000)

    def answer(n: int, handler: Any) -> None:
        handler.send_response(200)
        if framing == "chunked, its end late":
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
            handler.wfile.flush()
            time.sleep(3)
            handler.wfile.write(b"0\r\n\r\n")
        else:
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(body)
            handler.wfile.flush()
            time.sleep(3)  # then the close that ends the body

    server, url = _scripted_host(answer)
    downloader = _downloader({0: (url, len(body))}, retries=0, timeout=10)
    try:
        started = time.monotonic()
        assert bytes(downloader.fetch(0)) == body
        assert downloader.stats.retries == 0 and time.monotonic() - started < 2.5
    finally:
        downloader.close()
        server.shutdown()
        server.server_close()


def test_a_forked_child_leaves_its_parents_downloads_alone(tmp_path: Path) -> None:
    """A DataLoader worker forked while a chunk is in flight runs threading's exit hooks
    as it exits: it closed its copies of the parent's downloaders, shutting down sockets
    the parent still read (a retry each time), or hung on a lock held at the fork."""
    import multiprocessing
    import warnings

    data = os.urandom(1 << 16)
    (tmp_path / "c.zip").write_bytes(data)
    schedule = FaultSchedule.script([Fault("stall", after_bytes=1000, seconds=1.5)])
    with StaticServer(tmp_path) as host, FaultProxy(host.base_url, schedule=schedule) as proxy:
        downloader = _downloader({0: (f"{proxy.base_url}/c.zip", len(data))}, timeout=10)
        got: list[bytes] = []
        fetching = threading.Thread(target=lambda: got.append(bytes(downloader.fetch(0))))
        fetching.start()
        assert proxy.wait_for_fault("stall", timeout=10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
            child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
            child.start()
        child.join(10)
        assert child.exitcode == 0
        fetching.join(10)
        downloader.close()
    assert got == [data] and downloader.stats.retries == 0


def test_a_connection_error_leaves_no_cycle_that_keeps_the_downloader() -> None:
    """urllib3's urlopen keeps the error it raises in a local of a frame that error's own
    traceback holds: a cycle through our frames that kept the downloader (and, through its
    URL refresh, the dataset) until the cycle collector ran."""
    import gc
    import socket
    import weakref

    listener = socket.create_server(("127.0.0.1", 0))

    def hang_up() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                connection.close()  # before any response: RemoteDisconnected in urlopen

    threading.Thread(target=hang_up, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/c.bin"
    gc.collect()
    gc.disable()
    try:
        downloader = _downloader({0: (url, 100)}, retries=1)
        with pytest.raises(DownloadError):
            downloader.fetch(0)
        downloader.close()
        alive = weakref.ref(downloader)
        del downloader
        assert alive() is None
    finally:
        gc.enable()
        listener.close()


def test_a_key_a_chunk_host_echoes_in_a_header_is_in_no_error_or_log(caplog: Any) -> None:
    """The Content-Range of a bad 206 is quoted in the error and the retry warnings: a
    host echoing the key there put it into both, in full, and into the DownloadError."""
    from pixcrawler.client import ApiClient
    from pixcrawler.downloader import ChunkDownloader
    from pixcrawler.retry import RetryPolicy

    key = "sk-live-ECHOED-5b1e07c9d2a44f6e"
    caplog.set_level(logging.DEBUG, logger="pixcrawler")
    headers = {"Content-Range": f"bytes 5-9/{key}"}
    with CannedHost(206, b"x" * 5, headers) as host:
        client = ApiClient(key, host.base_url, retry=RetryPolicy(retries=1, backoff_base=0.01))
        downloader = ChunkDownloader(client, [Chunk(0, host.base_url + "/c0", 10)], prefetch=1)
        with pytest.raises(DownloadError) as info:
            downloader.fetch(0)
        downloader.close()
    assert "got range 'bytes 5-9/***'" in str(info.value), info.value
    assert caplog.records and key[:8] not in caplog.text
    assert all(key[:8] not in str(e) for e in (info.value, info.value.__cause__))
