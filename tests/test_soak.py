"""Soak: a few hundred chunk downloads through a proxy that breaks one request in five
(resets, 5xx, 429, truncations, stalls past the timeout, flipped bytes), seeded.

Every run either yields exactly what a clean run yields (same images, same pixels, same
labels, same order: the digest of ``helpers.digest``) or stops with a typed
``PixCrawlerError``; a chunk corrupted twice in a row is a ``DownloadError`` by design.
The summary (run with ``-s`` to see it) gives the figures quoted in docs/reliability.md.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from constants import TEST_KEY, TEST_KEYS
from helpers import digest
from imagegen import make_image_folder
from pixcrawler import load_dataset
from pixcrawler.exceptions import PixCrawlerError
from pixcrawler.packer import pack
from pixcrawler.server import create_app, run_in_thread
from pixcrawler.testing import Fault, FaultProxy, FaultSchedule

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

JOB = "job_soak"
IMAGES_PER_LABEL = 40
CHUNK_SIZE = 2  # 80 images -> 40 chunks of 1-2 KB: many downloads, little decoding
RUNS = int(os.environ.get("PIXCRAWLER_SOAK_RUNS", 8))
FAULT_RATE = 0.2
SEED = int(os.environ.get("PIXCRAWLER_SOAK_SEED", 2024))
TIMEOUT = 0.3  # seconds of silence before a stalled transfer is given up and resumed
SOAK = {"retries": 4, "backoff": 0.002, "timeout": TIMEOUT, "max_workers": 4, "prefetch": 2}

# Cut points inside even the smallest chunk (about 1.2 KB).
FAULTS = [
    Fault("reset", after_bytes=300),
    Fault("status", status=503),
    Fault("status", status=500),
    Fault("rate_limit", retry_after=0),
    Fault("truncate", after_bytes=600),
    Fault("stall", after_bytes=200, seconds=1.0, then="close"),
    Fault("corrupt", offset=100),
]


@dataclass
class Tally:
    runs: int = 0
    survived: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    chunk_downloads: int = 0
    requests: int = 0
    retries: int = 0
    resumed: int = 0
    checksum_failures: int = 0
    bytes_received: int = 0
    bytes_clean: int = 0
    seconds: float = 0.0

    @property
    def refetched(self) -> int:
        return self.bytes_received - self.bytes_clean


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, int]]:
    """(base URL, number of chunks, total chunk bytes) of a job of many small chunks."""
    root = tmp_path_factory.mktemp("soak")
    labels = {"bird": IMAGES_PER_LABEL, "cat": IMAGES_PER_LABEL}
    src = make_image_folder(root / "src", labels, size=(12, 16), formats=("jpg", "png"), seed=21)
    result = pack(src, root / "store", job_id=JOB, chunk_size=CHUNK_SIZE)
    with run_in_thread(create_app(root / "store", TEST_KEYS)) as base_url:
        yield base_url, result.num_chunks, result.size_bytes


def why(exc: PixCrawlerError) -> str:
    text = str(exc)
    if "corrupt" in text:
        return "corrupt twice in a row"
    if "attempts" in text:
        return "faults past the retries"
    return text[:60]


def report(title: str, tally: Tally, faults: Counter[str]) -> None:
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(faults.items()))
    failed = ", ".join(f"{kind} {count}" for kind, count in sorted(tally.failed.items())) or "none"
    print(
        f"\n[soak] {title}: {tally.runs} runs, {tally.survived} pixel-identical, "
        f"failed: {failed}\n"
        f"[soak]   {tally.chunk_downloads} chunk downloads, {tally.requests} requests, "
        f"{sum(faults.values())} faults injected ({kinds})\n"
        f"[soak]   {tally.retries} retries, {tally.resumed} resumed with Range, "
        f"{tally.checksum_failures} checksum failures; bytes received {tally.bytes_received:,}"
        f" for {tally.bytes_clean:,} clean = {tally.refetched:,} re-fetched "
        f"({tally.refetched / max(1, tally.bytes_clean):.1%}); {tally.seconds:.1f} s"
    )


def test_iterating_under_a_20_percent_fault_mix_is_exact_or_a_typed_error(
    soak_server: tuple[str, int, int],
) -> None:
    base_url, num_chunks, clean_bytes = soak_server
    clean = digest(load_dataset(JOB, TEST_KEY, base_url))
    assert clean[0] == 2 * IMAGES_PER_LABEL
    schedule = FaultSchedule.random(FAULT_RATE, FAULTS, seed=SEED, match="/chunks/")
    tally = Tally()
    started = time.monotonic()
    with FaultProxy(base_url, schedule=schedule) as proxy:
        for _ in range(RUNS):
            dataset = load_dataset(JOB, TEST_KEY, proxy.base_url, **SOAK)  # type: ignore[arg-type]
            tally.runs += 1
            try:
                outcome = digest(dataset)
            except PixCrawlerError as exc:  # anything else fails the test
                tally.failed[f"{type(exc).__name__} ({why(exc)})"] += 1
            else:
                assert outcome == clean  # never a wrong, missing or repeated image
                tally.survived += 1
                tally.bytes_clean += clean_bytes
                tally.bytes_received += dataset.stats.transfer.bytes_received
            finally:
                dataset.close()
            transfer = dataset.stats.transfer
            tally.chunk_downloads += transfer.chunks_completed
            tally.requests += transfer.requests
            tally.retries += transfer.retries
            tally.resumed += transfer.resumed
            tally.checksum_failures += transfer.checksum_failures
        faults = proxy.stats.faults
    tally.seconds = time.monotonic() - started
    report("iteration", tally, faults)
    assert tally.chunk_downloads >= RUNS * num_chunks * 0.75
    assert set(faults) == {f.kind for f in FAULTS}  # every kind was exercised
    assert sum(faults.values()) >= 0.1 * tally.requests
    assert tally.survived >= RUNS // 2  # with 4 retries, nearly every run gets through
    # Resumes fetch only what is missing: re-fetching stays a fraction of the clean bytes.
    assert 0 <= tally.refetched < 0.5 * tally.bytes_clean


def test_downloads_to_disk_under_the_fault_mix_are_exact_or_a_typed_error(
    soak_server: tuple[str, int, int], tmp_path: Path
) -> None:
    base_url, num_chunks, _ = soak_server
    store_files = {}
    reference = load_dataset(JOB, TEST_KEY, base_url)
    for index in reference.downloader().indexes:
        store_files[index] = bytes(reference.downloader().fetch(index))
    reference.close()
    schedule = FaultSchedule.random(FAULT_RATE, FAULTS, seed=SEED + 1, match="/chunks/")
    outcomes: Counter[str] = Counter()
    with FaultProxy(base_url, schedule=schedule) as proxy:
        dataset = load_dataset(JOB, TEST_KEY, proxy.base_url, **SOAK)  # type: ignore[arg-type]
        downloader = dataset.downloader()
        for index in downloader.indexes:
            target = tmp_path / f"{index:05d}.zip"
            try:
                downloader.fetch_to_file(index, target)
            except PixCrawlerError as exc:
                outcomes[f"{type(exc).__name__} ({why(exc)})"] += 1
                assert not target.exists()  # a failed download never takes the name
                continue
            assert target.read_bytes() == store_files[index]
            outcomes["exact"] += 1
        leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".zip")]
        assert all(name.endswith(".zip.part") for name in leftovers)
        dataset.close()
        faults = proxy.stats.faults
    transfer = downloader.stats
    print(
        f"\n[soak] to disk: {sum(outcomes.values())} downloads, {dict(outcomes)}; "
        f"{sum(faults.values())} faults ({dict(faults)}); {transfer.retries} retries, "
        f"{transfer.resumed} resumed, {transfer.checksum_failures} checksum failures"
    )
    assert sum(outcomes.values()) == num_chunks
    assert outcomes["exact"] >= 0.75 * num_chunks
