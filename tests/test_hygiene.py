"""Resource hygiene: however an iteration ends (finished, early ``break``, an exception,
``KeyboardInterrupt``, ``close()`` from another thread, Ctrl-C), no SDK thread, socket or
temp file is left behind; and a chunk written to disk never has its final name until it
is complete and verified.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import LiveServer
from constants import (
    JOB_MIXED,
    JOB_UNIFORM,
    TEST_KEY,
    UNIFORM_CHUNK_SIZE,
    UNIFORM_SIZE,
    UNIFORM_TOTAL,
)
from helpers import close_while_consuming, corrupt_copy, edited_copy, reachable_buffers, settles
from imagegen import make_image_folder
from pixcrawler import Dataset, load_dataset
from pixcrawler.exceptions import DecompressionError, DownloadError, PixCrawlerError
from pixcrawler.packer import pack
from pixcrawler.testing import Fault, FaultProxy, FaultSchedule

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts sockets in /proc"),
]

FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0}


# -- what is left behind -----------------------------------------------------------------------


def sdk_threads() -> list[threading.Thread]:
    """Threads the SDK starts (downloads, ranges, decoders); the test servers are not ours."""
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("pixcrawler-") and not t.name.startswith("pixcrawler-server")
    ]


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed between listdir and readlink
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


class Baseline:
    """Threads, sockets and temp files before a scenario, to compare with after it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        gc.collect()
        self.sockets = open_sockets()

    def no_threads(self) -> None:
        assert settles(lambda: not sdk_threads(), 2.0), [t.name for t in sdk_threads()]

    def no_sockets(self) -> None:
        gc.collect()
        assert settles(lambda: open_sockets() <= self.sockets), (open_sockets(), self.sockets)

    def no_temp_files(self) -> None:
        assert sorted(self.tmp.rglob("*")) == []

    def all_clean(self) -> None:
        self.no_threads()
        self.no_sockets()
        self.no_temp_files()


@pytest.fixture
def baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Baseline]]:
    """Point every temp dir at a fresh folder; ``baseline()`` then snapshots the process."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("PIXCRAWLER_CACHE_DIR", str(tmp / "cache"))
    assert not sdk_threads()  # nothing left over from an earlier test
    yield lambda: Baseline(tmp)


def open_uniform(
    live_server: LiveServer, base_url: str | None = None, **options: object
) -> Dataset:
    merged: dict[str, object] = {**FAST, **options}
    return load_dataset(
        JOB_UNIFORM, live_server.api_key, base_url or live_server.base_url, **merged
    )  # type: ignore[arg-type]


# -- each way an iteration can end ------------------------------------------------------------


def test_a_finished_iteration_and_close_leave_nothing(
    live_server: LiveServer, baseline: Callable[[], Baseline]
) -> None:
    before = baseline()
    dataset = open_uniform(live_server, max_workers=4, prefetch=2)
    assert sum(1 for _ in dataset) == UNIFORM_TOTAL
    before.no_threads()
    dataset.close()
    before.all_clean()


def test_an_early_break_stops_every_thread_at_once(
    live_server: LiveServer, baseline: Callable[[], Baseline]
) -> None:
    before = baseline()
    dataset = open_uniform(live_server, prefetch=3)
    for i, _ in enumerate(dataset):
        if i == 2:
            break
    before.no_threads()  # the generator was closed by the break itself: no gc, no close()
    for _ in dataset.iter_batches(batch_size=8):
        break
    before.no_threads()
    dataset.close()
    before.all_clean()


def test_dropping_a_dataset_without_close_releases_its_sockets(
    live_server: LiveServer, baseline: Callable[[], Baseline]
) -> None:
    before = baseline()
    dataset = open_uniform(live_server)
    next(iter(dataset))
    del dataset
    before.all_clean()


def test_keyboard_interrupt_from_the_loop_body_stops_everything(
    live_server: LiveServer, baseline: Callable[[], Baseline]
) -> None:
    before = baseline()
    dataset = open_uniform(live_server, prefetch=2)

    def train() -> None:
        for i, _ in enumerate(dataset):
            if i == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train()
    before.no_threads()
    dataset.close()
    before.all_clean()


def test_a_download_error_mid_iteration_leaves_nothing(
    live_server: LiveServer, baseline: Callable[[], Baseline]
) -> None:
    schedule = FaultSchedule.script([Fault("corrupt", offset=10)] * 2, match="/chunks/2$")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        before = baseline()
        dataset = open_uniform(live_server, proxy.base_url, prefetch=2)
        seen = 0
        with pytest.raises(DownloadError) as info:
            for _ in dataset:
                seen += 1
        assert info.value.chunk_id == 2 and 0 < seen <= 32
        del info
        before.no_threads()
        dataset.close()
        before.no_sockets()
        before.no_temp_files()


def test_a_server_failure_exhausting_retries_leaves_nothing(
    live_server: LiveServer, baseline: Callable[[], Baseline]
) -> None:
    faults = [Fault("reset", after_bytes=500)] * 10
    with FaultProxy(
        live_server.base_url, schedule=FaultSchedule.script(faults, match="/chunks/1$")
    ) as proxy:
        before = baseline()
        dataset = open_uniform(live_server, proxy.base_url, max_workers=2)
        with pytest.raises(DownloadError, match="Chunk 1 failed after 3 attempts"):
            list(dataset)
        before.no_threads()
        dataset.close()
        before.all_clean()


@pytest.fixture
def corrupt_image_server(tmp_path: Path, server_factory: Callable[..., str]) -> str:
    """A job whose 9th image (of 12, chunks of 4) is a PNG cut in half, packed as such."""
    src = make_image_folder(tmp_path / "src", {"a": 12}, formats=("png",), seed=8)
    good = (src / "a" / "0008.png").read_bytes()
    store = tmp_path / "store"
    pack(src, store, job_id="job_bad_image", chunk_size=4)
    # Repack one chunk with the broken image (sha256s recomputed, so only decoding fails).
    (src / "a" / "0008.png").write_bytes(good[: len(good) // 2])
    return _repacked(src, store, server_factory)


def _repacked(src: Path, store: Path, server_factory: Callable[..., str]) -> str:
    import hashlib
    import io
    import zipfile

    job_path = store / "job_bad_image" / "job.json"
    job = json.loads(job_path.read_text())
    chunk_path = store / "job_bad_image" / "chunks" / "00002.zip"
    with zipfile.ZipFile(chunk_path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        members = {name: zf.read(name) for name in zf.namelist()}
    broken = (src / "a" / "0008.png").read_bytes()
    for entry in manifest["images"]:
        if entry["path"] == "a/0008.png":
            entry["sha256"] = hashlib.sha256(broken).hexdigest()
    members["a/0008.png"] = broken
    members["manifest.json"] = json.dumps(manifest).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("manifest.json", members.pop("manifest.json"))
        for name, data in members.items():
            zf.writestr(name, data)
    chunk_path.write_bytes(out.getvalue())
    entry = job["chunks"][2]
    entry["size_bytes"] = len(out.getvalue())
    entry["sha256"] = hashlib.sha256(out.getvalue()).hexdigest()
    job_path.write_text(json.dumps(job))
    return server_factory(store)


def test_a_corrupt_image_with_on_error_raise_leaves_nothing(
    corrupt_image_server: str, baseline: Callable[[], Baseline]
) -> None:
    before = baseline()
    dataset = load_dataset("job_bad_image", TEST_KEY, corrupt_image_server, on_error="raise")
    seen = 0
    with pytest.raises(DecompressionError) as info:
        for _ in dataset:
            seen += 1
    assert info.value.sample_id == "a/0008.png" and seen == 8
    del info
    before.no_threads()
    dataset.close()
    before.all_clean()
    skipping = load_dataset("job_bad_image", TEST_KEY, corrupt_image_server, on_error="skip")
    assert sum(1 for _ in skipping) == 11 and skipping.stats.skipped_ids == ["a/0008.png"]
    skipping.close()
    before.all_clean()


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "dropped"])
@pytest.mark.parametrize("ends", ["finished", "break", "batches"])
def test_an_iteration_leaves_no_cycle_that_keeps_its_dataset(
    live_server: LiveServer, ends: str, closed: bool
) -> None:
    """fill() and first_done() of an iteration's downloads referred to each other: the
    downloader (its free chunk buffers), the dataset its URL refresh reads and the
    dataset's sockets lived until the cycle collector ran, which a large process does
    rarely: memory grew pass after pass."""
    gc.collect()
    gc.disable()
    try:
        dataset = open_uniform(live_server, prefetch=2)
        if ends == "batches":
            assert sum(len(labels) for _, labels in dataset.iter_batches(8)) == UNIFORM_TOTAL
        for i, _ in enumerate(dataset):
            if ends == "break" and i == UNIFORM_CHUNK_SIZE + 2:
                break
        if closed:
            dataset.close()
        alive = weakref.ref(dataset)
        del dataset
        # (A pool thread on its way out may hold it a moment: a cycle holds it for good.)
        assert settles(lambda: alive() is None, timeout=3)
    finally:
        gc.enable()


@pytest.mark.parametrize("call", ["iterate", "iter_batches", "to_arrays"])
def test_an_error_its_caller_keeps_keeps_no_chunk_batch_or_array(
    live_server: LiveServer, server_factory: Callable[..., str], tmp_path: Path, call: str
) -> None:
    """A notebook keeps the last error (sys.last_value); a training loop may keep a list
    of them. Through its traceback's frames (and its cause's, on the decode thread) one
    kept the whole chunk and a decode group's images, the half-filled batch or X, and
    the decoder's image buffers."""
    bad = UNIFORM_CHUNK_SIZE + 4  # in chunk 1: chunk 0's images went through the buffers
    base_url = server_factory(corrupt_copy(live_server.store, tmp_path, (bad,)))
    dataset = open_uniform(live_server, base_url)
    with pytest.raises(DecompressionError) as info:
        if call == "iterate":
            for _ in dataset:
                pass
        elif call == "iter_batches":
            for _ in dataset.iter_batches(32):
                pass
        else:
            dataset.to_arrays()
    dataset.close()
    kept = info.value
    del info
    gc.collect()
    image = UNIFORM_SIZE[0] * UNIFORM_SIZE[1] * 3
    held = reachable_buffers(kept)
    assert sum(held) <= 3 * image, held  # the last images loop variables hold, at most
    # Only the frames' locals go: the cause still prints where the decode failed.
    printed = "".join(traceback.format_exception(kept))
    assert "decode.py" in printed and "in decode" in printed, printed


@pytest.mark.parametrize("progress", [False, True])
@pytest.mark.parametrize("fault", ["count", "not a zip", "missing"])
def test_a_chunk_error_its_caller_keeps_keeps_no_chunk_or_decode_group(
    live_server: LiveServer,
    server_factory: Callable[..., str],
    tmp_path: Path,
    fault: str,
    progress: bool,
) -> None:
    """Through the frames it came out of, a chunk's error (a count the chunk disagrees
    with, bytes that are no zip, a chunk the host has lost) kept that chunk's bytes, the
    open archive and the last decode group's images for as long as it was kept."""
    store = tmp_path / "store"
    chunk = store / JOB_UNIFORM / "chunks" / "00001.zip"
    garbage = b"not a zip at all " * 20_000

    def edit(job: dict[str, Any]) -> None:
        if fault == "count":
            job["chunks"][1]["image_count"] += 1
            job["total_images"] += 1
        elif fault == "not a zip":
            job["chunks"][1]["sha256"] = hashlib.sha256(garbage).hexdigest()
            job["chunks"][1]["size_bytes"] = len(garbage)
            job.pop("size_bytes", None)

    edited_copy(live_server.store, store, JOB_UNIFORM, edit)
    if fault == "not a zip":
        chunk.write_bytes(garbage)
    elif fault == "missing":
        chunk.unlink()
    dataset = open_uniform(live_server, server_factory(store), progress=progress)
    with pytest.raises(PixCrawlerError) as info:
        for _ in dataset:
            pass
    dataset.close()
    kept = info.value
    del info
    gc.collect()
    held = reachable_buffers(kept)
    assert sum(held) <= 3 * UNIFORM_SIZE[0] * UNIFORM_SIZE[1] * 3, (kept, held)


def test_close_from_another_thread_during_a_stall_leaves_nothing(
    live_server: LiveServer, baseline: Callable[[], Baseline]
) -> None:
    stall = Fault("stall", after_bytes=1_000, seconds=60)
    with FaultProxy(
        live_server.base_url, schedule=FaultSchedule.script([stall], match="/chunks/0$")
    ) as proxy:
        before = baseline()
        dataset = open_uniform(live_server, proxy.base_url, timeout=60)
        # A fault counts once it has taken effect: chunk 0's first 1,000 bytes are sent and
        # the proxy has gone silent. (Bytes forwarded would be met by the job's JSON first.)
        seconds, outcome = close_while_consuming(
            dataset, lambda: proxy.wait_for_fault("stall", timeout=0)
        )
        stats = proxy.stats
        assert [kind for _, kind in stats.fault_log] == ["stall"]  # close() came in the stall
        assert stats.fault_log[0][0].endswith("/chunks/0")
        assert seconds < 5
        assert len(outcome) == 1 and isinstance(outcome[0], PixCrawlerError)
        outcome.clear()
        before.no_threads()
    before.all_clean()  # once the proxy's stalled handler has let go of its sockets too


def start_script(
    script: str, live_server: LiveServer, proxy: FaultProxy, *args: str
) -> subprocess.Popen[str]:
    """``script`` in a Python process of its own, given job id, key, the proxy's URL (and
    ``args``); its stdin a pipe, closed by ``communicate()``."""
    return subprocess.Popen(
        [sys.executable, "-c", script, JOB_UNIFORM, live_server.api_key, proxy.base_url, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_while_waiting_on_a_stalled_chunk_exits_at_once(live_server: LiveServer) -> None:
    """A real SIGINT to a training script blocked on a chunk that will not come for a
    minute: the script is interrupted and the process exits, it does not wait it out."""
    script = textwrap.dedent(
        """
        import sys
        from pixcrawler import load_dataset
        dataset = load_dataset(sys.argv[1], sys.argv[2], sys.argv[3], timeout=120, prefetch=2)
        for i, (image, label) in enumerate(dataset):
            if i == 0:
                print("training", flush=True)
        """
    )
    stall = Fault("stall", after_bytes=100, seconds=60)
    with FaultProxy(
        live_server.base_url, schedule=FaultSchedule.script([stall], match="/chunks/2$")
    ) as proxy:
        child = start_script(script, live_server, proxy)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "training"
            assert settles(lambda: proxy.stats.faults["stall"] == 1, 20)
            time.sleep(0.3)  # the consumer is now blocked on chunk 2
            interrupted = time.monotonic()
            child.send_signal(signal.SIGINT)
            _, stderr = child.communicate(timeout=20)
        finally:
            if child.poll() is None:
                child.kill()
        assert time.monotonic() - interrupted < 5
        assert child.returncode != 0 and "KeyboardInterrupt" in stderr


def test_a_script_that_ends_holding_an_iterator_with_stalled_downloads_exits_at_once(
    live_server: LiveServer,
) -> None:
    """A step-based training loop keeps ``it = iter(...)`` and calls ``next(it)``; the
    script ends while chunks are stalled on the network. Python joins thread-pool threads
    at exit before that iterator is collected: the process stayed up until every stalled
    transfer had used its timeout and retries (20 minutes with the defaults). The script
    ends once told to (its stdin closed), when a chunk is stalled: ending right after the
    first image, it at times ended before any later chunk's transfer had begun."""
    script = textwrap.dedent(
        """
        import sys
        from pixcrawler import load_dataset
        dataset = load_dataset(sys.argv[1], sys.argv[2], sys.argv[3], timeout=60, prefetch=2)
        steps = iter(dataset)
        next(steps)
        print("trained", flush=True)
        sys.stdin.read()
        """
    )
    stall = Fault("stall", after_bytes=100, seconds=60)
    with FaultProxy(
        live_server.base_url, schedule=FaultSchedule.script([stall] * 3, match="/chunks/[1-9]$")
    ) as proxy:
        child = start_script(script, live_server, proxy)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "trained"
            assert proxy.wait_for_fault("stall", timeout=20)  # a chunk is stalled now
            ended = time.monotonic()
            _, stderr = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
        assert time.monotonic() - ended < 5, stderr
        assert child.returncode == 0, stderr


def test_a_thread_of_the_programs_own_still_downloading_at_exit_finishes(
    live_server: LiveServer, tmp_path: Path
) -> None:
    """Python waits for a non-daemon thread the script started before it exits; the exit
    hook that cancels abandoned transfers cancelled that thread's download too."""
    script = textwrap.dedent(
        """
        import sys, threading
        from pathlib import Path
        from pixcrawler.client import ApiClient
        from pixcrawler.downloader import ChunkDownloader
        client = ApiClient(sys.argv[2], sys.argv[3], timeout=30)
        downloader = ChunkDownloader(client, client.get_job(sys.argv[1]).chunks)
        def work():
            try:
                size = downloader.fetch_to_file(1, Path(sys.argv[4])).stat().st_size
                print("saved", size, flush=True)
            except BaseException as exc:
                print("failed", type(exc).__name__, exc, flush=True)
        threading.Thread(target=work).start()
        print("returning", flush=True)
        """
    )
    stall = Fault("stall", after_bytes=100, seconds=1.5)  # then the rest of the chunk
    with FaultProxy(
        live_server.base_url, schedule=FaultSchedule.script([stall], match="/chunks/1$")
    ) as proxy:
        child = start_script(script, live_server, proxy, str(tmp_path / "00001.zip"))
        try:
            stdout, stderr = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
        assert proxy.stats.faults["stall"] == 1, (stdout, stderr)
    assert child.returncode == 0, stderr
    assert stdout.split("\n")[:2] == ["returning", f"saved {len(chunk_file(live_server, 1))}"]


# -- downloads to disk are atomic --------------------------------------------------------------


def chunk_file(live_server: LiveServer, index: int) -> bytes:
    return (live_server.store / JOB_UNIFORM / "chunks" / f"{index:05d}.zip").read_bytes()


def test_a_stalled_download_to_disk_has_only_a_part_file(
    live_server: LiveServer, tmp_path: Path, baseline: Callable[[], Baseline]
) -> None:
    expected = chunk_file(live_server, 1)
    stall = Fault("stall", after_bytes=4_000, seconds=60)
    with FaultProxy(
        live_server.base_url, schedule=FaultSchedule.script([stall], match="/chunks/1$")
    ) as proxy:
        before = baseline()
        dataset = open_uniform(live_server, proxy.base_url, timeout=60)
        downloader = dataset.downloader()
        target = tmp_path / "out" / "00001.zip"
        target.parent.mkdir()
        part = target.with_name("00001.zip.part")
        errors: list[BaseException] = []

        def download() -> None:
            try:
                downloader.fetch_to_file(1, target)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=download)
        worker.start()
        # Mid-body: the bytes so far go to the .part file; the final name does not exist.
        assert settles(lambda: part.exists() and proxy.stats.faults["stall"] == 1)
        assert settles(lambda: downloader.stats.bytes_received == 4_000)
        assert not target.exists()
        assert sorted(p.name for p in target.parent.iterdir()) == ["00001.zip.part"]
        dataset.close()
        worker.join(10)
        assert not worker.is_alive() and len(errors) == 1
        assert not target.exists() and part.stat().st_size == 4_000  # kept, to resume
        errors.clear()
        before.no_threads()
    # Counted once the proxy has stopped: its stalled handler holds its own sockets.
    before.no_sockets()

    # A later run resumes the .part with Range and only then takes the final name.
    again = open_uniform(live_server)
    downloader = again.downloader()
    downloader.fetch_to_file(1, target)
    assert target.read_bytes() == expected and not part.exists()
    assert downloader.stats.resumed == 1
    assert downloader.stats.bytes_received == len(expected) - 4_000
    again.close()
    before.all_clean()


def test_a_download_to_disk_that_fails_verification_never_takes_the_final_name(
    live_server: LiveServer, tmp_path: Path
) -> None:
    schedule = FaultSchedule.script([Fault("corrupt", offset=123)] * 2, match="/chunks/3$")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        dataset = open_uniform(live_server, proxy.base_url)
        target = tmp_path / "00003.zip"
        with pytest.raises(DownloadError, match="corrupt"):
            dataset.downloader().fetch_to_file(3, target)
        assert not target.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["00003.zip.part"])
        assert not (tmp_path / "00003.zip.part").exists() or (
            (tmp_path / "00003.zip.part").stat().st_size == 0
        )
        dataset.close()


@pytest.mark.parametrize(
    ("simplejpeg", "opened"),
    [("installed", "load_dataset"), ("absent", "load_dataset"), ("installed", "unpickled")],
)
def test_nothing_is_imported_on_first_use_once_load_dataset_returns(
    live_server: LiveServer, simplejpeg: str, opened: str, tmp_path: Path
) -> None:
    """A module imported on first use holds its import lock meanwhile: a DataLoader that
    forks its workers then (another thread decoding its first image) gave them the lock
    held, for ever, and they hung. So load_dataset imports what reading any image takes,
    every format and resize, and reading a job afterwards tries to import nothing: not
    even a module that is not there (simplejpeg, the ``fast`` extra), which takes its lock
    as long as it is looked for. A dataset unpickled in a process of its own (spawned, as
    torch.multiprocessing.spawn does, which may fork workers in turn) too."""
    script = textwrap.dedent(
        """
        import sys

        class Record:  # every import that takes a module's lock (one not imported yet)
            tried = []
            hide = sys.argv[4] == "absent"

            def find_spec(self, name, path=None, target=None):
                self.tried.append(name)
                if self.hide and name.partition(".")[0] == "simplejpeg":
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, Record())
        from pixcrawler import load_dataset

        if sys.argv[5] == "-":
            dataset = load_dataset(sys.argv[1], sys.argv[2], sys.argv[3], progress=True)
        else:
            import pickle

            with open(sys.argv[5], "rb") as fh:
                dataset = pickle.load(fh)
        try:
            import torch
        except ImportError:
            torch = None
        else:  # made where a training script makes them, then used on any thread
            by_index = dataset.to_torch(image_size=(16, 16))
            stream = dataset.to_torch(streaming=True, image_size=(16, 16))
        Record.tried.clear()
        if torch is not None:
            by_index[0], by_index[[1, 2]], list(stream)
            by_index.close()
        for image, label in dataset:
            pass
        for images, labels in dataset.iter_batches(8, image_size=(16, 16)):
            pass
        dataset.to_arrays(image_size=(20, 24))
        dataset.close()
        print(sorted(set(Record.tried)))
        """
    )
    pickled = "-"
    if opened == "unpickled":
        pickled = str(tmp_path / "dataset.pickle")
        with load_dataset(JOB_MIXED, live_server.api_key, live_server.base_url) as made:
            made.progress = True
            Path(pickled).write_bytes(pickle.dumps(made))
    arguments = [JOB_MIXED, live_server.api_key, live_server.base_url, simplejpeg, pickled]
    result = subprocess.run(
        [sys.executable, "-c", script, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_sdist_carries_what_its_tests_and_docs_need(tmp_path: Path) -> None:
    """It carried tests/test_*.py (setuptools' default) without the helpers they import:
    17 test files failed to load from an unpacked sdist, and the README's docs/ links led
    nowhere."""
    import shutil
    import tarfile

    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tree, out = tmp_path / "tree", tmp_path / "dist"
    for name in listed.stdout.splitlines():
        if (root / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, tree / name)
    (tree / "tests" / "__pycache__").mkdir()
    (tree / "tests" / "__pycache__" / "helpers.cpython-311.pyc").write_bytes(b"stale")
    out.mkdir()
    code = "import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])"
    built = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tests = {name for name in listed.stdout.splitlines() if name.startswith("tests/")}
    assert tests <= names, sorted(tests - names)
    assert {"LICENSE", "README.md", "docs/reliability.md", "src/pixcrawler/py.typed"} <= names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
