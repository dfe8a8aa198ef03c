"""The chunk store behind map-style ``to_torch``: memory LRU, verified disk cache, atomic writes.

These tests drive :class:`ChunkStore` directly with the real chunks of ``job_uniform`` and a
counting ``fetch`` in place of the network, so every download is visible.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from constants import JOB_UNIFORM, UNIFORM_CHUNK_SIZE, UNIFORM_TOTAL
from helpers import hold_lock, raised_once_closed
from pixcrawler import cache as cache_module
from pixcrawler.archive import ChunkArchive
from pixcrawler.cache import ChunkStore, resolve_cache_root
from pixcrawler.config import CACHE_SUBDIR, ENV_CACHE_DIR, STALE_TEMP_SECONDS
from pixcrawler.exceptions import PixCrawlerError
from pixcrawler.models import Chunk, Job

pytestmark = pytest.mark.timeout(60)

NUM_CHUNKS = -(-UNIFORM_TOTAL // UNIFORM_CHUNK_SIZE)


class Remote:
    """The chunks of a packed job, fetched from disk with every download counted."""

    def __init__(self, store: Path, job_id: str = JOB_UNIFORM) -> None:
        data = json.loads((store / job_id / "job.json").read_text())
        for entry in data["chunks"]:
            entry["url"] = f"/jobs/{job_id}/chunks/{entry['index']}"
        self.job = Job.from_json(data)
        self.folder = store / job_id / "chunks"
        self.calls: Counter[int] = Counter()
        self._lock = threading.Lock()

    @property
    def chunks(self) -> tuple[Chunk, ...]:
        return self.job.chunks

    def bytes_of(self, index: int) -> bytes:
        return (self.folder / f"{index:05d}.zip").read_bytes()

    def fetch(self, index: int) -> bytearray:
        with self._lock:
            self.calls[index] += 1
        return bytearray(self.bytes_of(index))

    def store(self, cache_dir: Path | bool, **options: object) -> ChunkStore:
        return ChunkStore(
            self.chunks,
            self.fetch,
            job_id=self.job.id,
            cache_dir=cache_dir,  # type: ignore[arg-type]
            **options,  # type: ignore[arg-type]
        )


def _refuse_mappings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every mapping of a cached file fails, as with the descriptors used up: the store
    reads files into memory instead."""

    class Refused(mmap.mmap):
        def __new__(cls, *args: Any, **kwargs: Any) -> Refused:
            raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(cache_module.mmap, "mmap", Refused)


@pytest.fixture
def remote(store: Path) -> Remote:
    return Remote(store)


def largest_chunk(remote: Remote) -> int:
    return max(c.size_bytes or 0 for c in remote.chunks)


def test_second_read_is_served_from_memory(remote: Remote, tmp_path: Path) -> None:
    chunks = remote.store(tmp_path)
    first = chunks.archive(0)
    assert chunks.archive(0) is first  # the opened archive is kept with the bytes
    assert bytes(chunks.get(0)) == remote.bytes_of(0)
    assert remote.calls == {0: 1}
    assert chunks.stats.downloads == 1 and chunks.stats.memory_hits == 2
    assert isinstance(first, ChunkArchive) and len(first) == UNIFORM_CHUNK_SIZE


def test_every_download_is_written_to_disk_named_by_job_and_sha256(
    remote: Remote, tmp_path: Path
) -> None:
    chunks = remote.store(tmp_path)
    for chunk in remote.chunks:
        chunks.get(chunk.index)
    folder = tmp_path / CACHE_SUBDIR / JOB_UNIFORM
    names = sorted(p.name for p in folder.glob("*.zip"))
    assert names == sorted(f"{c.index:05d}-{c.sha256}.zip" for c in remote.chunks)
    for chunk in remote.chunks:
        path = chunks.path(chunk.index)
        assert path is not None and path.read_bytes() == remote.bytes_of(chunk.index)
    assert not list(folder.glob("*.tmp"))


def test_chunks_over_the_memory_budget_spill_to_disk_and_read_back_without_download(
    remote: Remote, tmp_path: Path
) -> None:
    chunks = remote.store(tmp_path, memory_budget=largest_chunk(remote) + 1)
    for chunk in remote.chunks:
        chunks.archive(chunk.index)
    assert chunks.stats.evictions == NUM_CHUNKS - 1
    assert [chunks.in_memory(c.index) for c in remote.chunks] == [False] * (NUM_CHUNKS - 1) + [True]
    assert chunks.memory_bytes <= chunks.memory_budget

    archive = chunks.archive(0)  # evicted: comes back from the disk cache, not the network
    assert chunks.stats.disk_hits == 1
    assert sum(remote.calls.values()) == NUM_CHUNKS
    sample = archive.samples[3]
    payload = bytes(archive.payload(sample))
    fresh = ChunkArchive(remote.bytes_of(0), chunk_id=0)
    assert payload == bytes(fresh.payload(fresh.samples[3]))


def test_a_new_process_reuses_the_disk_cache(remote: Remote, tmp_path: Path) -> None:
    remote.store(tmp_path).get(2)
    again = remote.store(tmp_path)  # another worker, epoch or run: nothing in memory yet
    assert bytes(again.get(2)) == remote.bytes_of(2)
    assert remote.calls == {2: 1} and again.stats.disk_hits == 1


def test_memory_only_store_downloads_an_evicted_chunk_again(remote: Remote, tmp_path: Path) -> None:
    chunks = remote.store(False, memory_budget=0)
    chunks.get(0)
    chunks.get(1)  # budget 0 keeps only the chunk in use
    chunks.get(0)
    assert remote.calls == {0: 2, 1: 1}
    assert chunks.path(0) is None and chunks.directory is None


def test_a_changed_chunk_is_never_served_stale(remote: Remote, tmp_path: Path) -> None:
    remote.store(tmp_path).get(0)
    changed = list(remote.chunks)
    changed[0] = replace(changed[0], sha256=hashlib.sha256(b"new bytes").hexdigest())
    served: list[int] = []

    def fetch(index: int) -> bytearray:
        served.append(index)
        return bytearray(b"new bytes")

    chunks = ChunkStore(changed, fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path)
    assert bytes(chunks.get(0)) == b"new bytes"
    assert served == [0]


def test_chunk_without_sha256_is_keyed_by_index_size_and_origin(
    remote: Remote, tmp_path: Path
) -> None:
    bare = [replace(c, sha256=None) for c in remote.chunks]
    one = ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path, origin="a")
    one.get(1)
    path = one.path(1)
    assert path is not None and path.name.startswith(f"00001-{bare[1].size_bytes}b-")
    other = ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path, origin="b")
    assert other.path(1) != path  # another server's job of the same id and size
    assert ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path, origin="a").get(1)
    assert remote.calls == {1: 1}

    unsized = [replace(c, sha256=None, size_bytes=None) for c in remote.chunks]
    memory_only = ChunkStore(unsized, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path)
    assert memory_only.path(1) is None  # nothing could tell a stale file from a current one


def test_a_damaged_cached_chunk_without_sha256_is_downloaded_again(
    remote: Remote, tmp_path: Path
) -> None:
    """Only its size names and checks it: a file torn in place (same size) that no longer
    opens is deleted and the chunk downloaded again, not served to every later run."""
    bare = [replace(c, sha256=None) for c in remote.chunks]
    ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path).get(1)
    later = ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path)
    path = later.path(1)
    assert path is not None
    data = bytearray(path.read_bytes())
    data[-30:] = bytes(30)  # the zip's end record, zeroed
    path.write_bytes(data)
    archive = later.archive(1)  # refused, rechecked: deleted and downloaded again
    assert len(archive.samples) == bare[1].image_count
    assert remote.calls == {1: 2} and path.read_bytes() == remote.bytes_of(1)
    assert ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path).archive(1)
    assert remote.calls == {1: 2}  # the next run reads the good file


def test_an_intact_cached_chunk_without_sha256_is_not_downloaded_again_for_a_bad_image(
    remote: Remote, tmp_path: Path
) -> None:
    """A bad image in a chunk that is whole (its file hashes to what was written) is bad at
    its source: recheck says so, and no run downloads the chunk again for it."""
    bare = [replace(c, sha256=None) for c in remote.chunks]
    ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path).get(1)
    for _ in range(3):  # three later runs
        later = ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path)
        later.get(1)
        assert later.recheck(1) is False
    assert remote.calls == {1: 1}


@pytest.mark.parametrize("mapped", [True, False])
def test_a_store_whose_file_another_store_replaced_reads_the_new_one(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    """Two stores (DataLoader workers) hold one cached chunk without sha256; it rots in
    place. The first to meet a bad image downloads it again; the second must then read
    that fresh file, not call its own stale copy's image bad at its source. (Read rather
    than mapped, the old file's inode is free at once, and the new file often gets it.)"""
    if not mapped:
        _refuse_mappings(monkeypatch)
    bare = [replace(c, sha256=None) for c in remote.chunks]
    ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path).get(1)
    first, second = (
        ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path) for _ in range(2)
    )
    first.get(1)
    second.get(1)
    path = first.path(1)
    assert path is not None
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # rot, same size
    with open(path, "r+b") as fh:  # in place: both mappings see it
        fh.write(data)
    assert first.recheck(1) is True  # torn: deleted, and downloaded again
    assert bytes(first.get(1)) == remote.bytes_of(1)
    assert second.recheck(1) is True  # its copy is stale: it reads the new file
    assert bytes(second.get(1)) == remote.bytes_of(1)
    assert remote.calls == {1: 2}


def test_recheck_leaves_a_file_another_process_has_just_put_in_place(
    remote: Remote, tmp_path: Path
) -> None:
    bare = [replace(c, sha256=None) for c in remote.chunks]
    ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path).get(1)
    later = ChunkStore(bare, remote.fetch, job_id=JOB_UNIFORM, cache_dir=tmp_path)
    path = later.path(1)
    assert path is not None
    later.get(1)
    path.with_name(path.name + cache_module.STAMP_SUFFIX).unlink()  # nothing to check by
    fresh = path.with_name("fresh")
    fresh.write_bytes(remote.bytes_of(1))
    os.replace(fresh, path)  # another process's download, renamed into place
    assert later.recheck(1) is True  # unsure of what it loaded: it reads again
    assert path.read_bytes() == remote.bytes_of(1)  # but the other file stays


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_lock_held_by_a_stopped_process_is_waited_for_a_bounded_time(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setattr(cache_module.config, "CACHE_LOCK_WAIT_SECONDS", 0.5)
    chunks = remote.store(tmp_path)
    path = chunks.path(0)
    assert path is not None
    fd = hold_lock(path)  # and never let go: a process stopped with Ctrl-Z
    try:
        started = time.monotonic()
        assert bytes(chunks.get(0)) == remote.bytes_of(0)
        assert 0.5 <= time.monotonic() - started < 5
    finally:
        os.close(fd)
    assert "held its cache lock" in caplog.text and path.read_bytes() == remote.bytes_of(0)


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_closing_the_store_ends_a_wait_for_another_processs_lock(
    remote: Remote, tmp_path: Path
) -> None:
    """A thread left in flock() kept the process from exiting after Ctrl-C (the
    interpreter joins pool threads at exit)."""
    chunks = remote.store(tmp_path)
    path = chunks.path(0)
    assert path is not None
    fd = hold_lock(path)
    try:
        errors = raised_once_closed(lambda: chunks.get(0), chunks.close)
    finally:
        os.close(fd)
    assert len(errors) == 1 and isinstance(errors[0], PixCrawlerError)
    assert "closed" in str(errors[0]) and remote.calls == {}


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_cached_file_is_detected_deleted_and_downloaded_again(
    remote: Remote, tmp_path: Path, damage: str
) -> None:
    remote.store(tmp_path).get(1)
    chunks = remote.store(tmp_path)
    path = chunks.path(1)
    assert path is not None
    data = bytearray(path.read_bytes())
    time.sleep(0.05)  # the damage gets a later ctime than the stamp, even on a coarse clock
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    else:
        del data[-100:]
    path.write_bytes(bytes(data))

    assert bytes(chunks.get(1)) == remote.bytes_of(1)
    assert chunks.stats.corrupt_files == 1 and remote.calls == {1: 2}
    assert path.read_bytes() == remote.bytes_of(1)  # replaced by a good copy
    assert remote.store(tmp_path).get(1) and remote.calls == {1: 2}


def test_a_corrupt_file_found_as_another_process_replaces_it_leaves_the_new_files_stamp(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This store finds its cached file corrupt; before it deletes it, another process
    renames its fresh download into place and stamps it. That stamp stays: the fresh file
    is taken on it, not hashed again (here or in every process after)."""
    remote.store(tmp_path).get(1)
    chunks = remote.store(tmp_path)
    path = chunks.path(1)
    assert path is not None
    time.sleep(0.05)  # the damage gets a later ctime than the stamp, even on a coarse clock
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    real_unlink = cache_module._unlink_unless_replaced

    def other_process_first(target: Path, loaded: Any) -> None:
        fresh = target.with_name("fresh")
        fresh.write_bytes(remote.bytes_of(1))
        os.replace(fresh, target)
        sha256 = remote.chunks[1].sha256
        assert sha256 is not None
        cache_module._write_stamp(target, os.stat(target), sha256)
        real_unlink(target, loaded)

    monkeypatch.setattr(cache_module, "_unlink_unless_replaced", other_process_first)
    hashed = _counting_hashes(monkeypatch)
    assert bytes(chunks.get(1)) == remote.bytes_of(1)
    assert hashed == [len(data)]  # the corrupt file only: the fresh one is taken on its stamp
    assert remote.calls == {1: 1} and chunks.stats.disk_hits == 1
    assert cache_module._read_stamp(path) == cache_module._stamp(
        os.stat(path), remote.chunks[1].sha256 or ""
    )


def _counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every whole-file sha256 the store computes on opening a cached file, by size."""
    hashed: list[int] = []
    real = cache_module._sha256

    def counting(buffer: cache_module.Buffer) -> str:
        hashed.append(len(buffer))
        return real(buffer)

    monkeypatch.setattr(cache_module, "_sha256", counting)
    return hashed


def _flip_member_byte(path: Path, archive: ChunkArchive) -> None:
    """Change one byte of the first image in place, size kept: what bit rot does."""
    offset = archive.samples[0].member.offset + 100
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _rot_with_mtime_kept(chunks: ChunkStore, index: int) -> ChunkArchive:
    """Chunk ``index`` cached, then one byte of it changed in place with its mtime set
    back (only the ctime still moves); returns the archive read before."""
    archive = chunks.archive(index)
    path = chunks.path(index)
    assert path is not None
    before = path.stat()
    time.sleep(0.05)  # a later ctime even where the clock is coarse
    _flip_member_byte(path, archive)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return archive


def test_a_file_verified_by_one_process_is_not_hashed_again_by_the_next(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer stamps what it verified; a new store (a new DataLoader worker) trusts a
    file that is exactly as stamped instead of reading all of it again."""
    remote.store(tmp_path).get(1)
    path = remote.store(tmp_path).path(1)
    assert path is not None and path.with_name(path.name + ".verified").is_file()
    hashed = _counting_hashes(monkeypatch)
    chunks = remote.store(tmp_path)
    assert bytes(chunks.get(1)) == remote.bytes_of(1)
    assert hashed == [] and chunks.stats.disk_hits == 1 and remote.calls == {1: 1}


def test_a_stamp_is_void_once_the_file_changes_even_with_its_mtime_restored(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = remote.store(tmp_path)
    _rot_with_mtime_kept(chunks, 1)
    hashed = _counting_hashes(monkeypatch)
    again = remote.store(tmp_path)
    assert bytes(again.get(1)) == remote.bytes_of(1)
    assert len(hashed) == 1 and again.stats.corrupt_files == 1 and remote.calls == {1: 2}


def test_a_stamp_holds_on_another_machine_sharing_the_cache_over_nfs(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS numbers a file's device per client mount: a stamp naming the device was never
    taken on another machine, so each re-hashed every chunk the other last stamped."""
    from types import SimpleNamespace

    from pixcrawler import cache as cache_module

    remote.store(tmp_path).get(1)  # downloaded, written and stamped here
    real_stat = cache_module.os.fstat

    def elsewhere(fd: int) -> Any:
        st = real_stat(fd)
        fields = {name: getattr(st, name) for name in dir(st) if name.startswith("st_")}
        return SimpleNamespace(**{**fields, "st_dev": st.st_dev + 1})

    monkeypatch.setattr(cache_module.os, "fstat", elsewhere)
    hashed = _counting_hashes(monkeypatch)
    there = remote.store(tmp_path)
    assert bytes(there.get(1)) == remote.bytes_of(1)
    assert hashed == [] and there.stats.disk_hits == 1 and remote.calls == {1: 1}


def test_a_bad_image_in_a_chunk_taken_on_its_stamp_gets_the_file_hashed_and_replaced(
    remote: Remote, tmp_path: Path
) -> None:
    """Bit rot moves no timestamp: the stamp still matches, the image's own sha256 does
    not. recheck() then voids the stamp; the next read hashes, discards, downloads."""
    from pixcrawler.dataset import decode_sample
    from pixcrawler.decode import ImageDecoder

    chunks = remote.store(tmp_path)
    path = chunks.path(1)
    assert path is not None
    _flip_member_byte(path, chunks.archive(1))
    cache_module._write_stamp(path, path.stat(), remote.chunks[1].sha256 or "")  # as if rotted

    rotted = remote.store(tmp_path)
    archive = rotted.archive(1)
    sample = archive.samples[0]
    assert not isinstance(decode_sample(archive, sample, ImageDecoder()), np.ndarray)
    assert rotted.recheck(1) is True
    archive = rotted.archive(1)
    assert isinstance(decode_sample(archive, archive.samples[0], ImageDecoder()), np.ndarray)
    assert rotted.stats.corrupt_files == 1 and remote.calls == {1: 2}
    assert rotted.recheck(1) is False  # verified here now: a bad image would be bad at source


def test_bit_rot_in_a_file_this_store_wrote_is_repaired_once_read_back_from_disk(
    remote: Remote, tmp_path: Path
) -> None:
    """The writer itself reads the file back once the chunk has left its memory, without
    hashing it again: a bad image there gets it hashed and replaced, as on a stamp."""
    from pixcrawler.dataset import decode_sample
    from pixcrawler.decode import ImageDecoder

    chunks = remote.store(tmp_path, memory_budget=0)
    path = chunks.path(1)
    assert path is not None
    _flip_member_byte(path, chunks.archive(1))
    chunks.get(2)  # chunk 1 leaves memory
    chunks._verified[path] = cache_module._identity(path.stat())  # rot moves no timestamp

    archive = chunks.archive(1)
    assert not isinstance(decode_sample(archive, archive.samples[0], ImageDecoder()), np.ndarray)
    assert chunks.recheck(1) is True
    archive = chunks.archive(1)
    assert isinstance(decode_sample(archive, archive.samples[0], ImageDecoder()), np.ndarray)
    assert chunks.stats.corrupt_files == 1 and remote.calls == {1: 2, 2: 1}


def test_writes_are_atomic_no_file_under_the_final_name_until_verified(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = remote.store(tmp_path)
    final = chunks.path(0)
    assert final is not None
    seen: list[tuple[bool, list[str]]] = []
    real_digest = cache_module._file_digest

    def watching_digest(path: Path) -> tuple[int, str]:  # written, read back for the check
        seen.append((final.exists(), [p.name for p in final.parent.glob("*.tmp")]))
        return real_digest(path)

    monkeypatch.setattr(cache_module, "_file_digest", watching_digest)
    chunks.get(0)
    assert len(seen) == 1
    exists_while_writing, temps = seen[0]
    assert not exists_while_writing and len(temps) == 1 and temps[0].startswith(final.name)
    assert final.read_bytes() == remote.bytes_of(0)
    assert not list(final.parent.glob("*.tmp"))


def test_a_failed_write_leaves_no_file_and_still_serves_the_chunk(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A full disk fails every chunk's write: each is counted, the first one said (not one
    warning per chunk of a long job)."""
    chunks = remote.store(tmp_path)

    real_open = open

    def disk_full(file: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
        handle = real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]
        if "x" in mode:  # the temp file: created, then the disk fills up
            handle.close()
            raise OSError(28, "No space left on device")
        return handle

    monkeypatch.setattr("builtins.open", disk_full)
    assert bytes(chunks.get(0)) == remote.bytes_of(0)
    final = chunks.path(0)
    assert final is not None and not final.exists()
    assert not list(final.parent.glob("*.tmp"))
    assert chunks.stats.write_failures == 1
    assert bytes(chunks.get(1)) == remote.bytes_of(1)
    assert bytes(chunks.get(2)) == remote.bytes_of(2)
    assert chunks.stats.write_failures == 3
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "chunk 0: not cached on disk" in said[0].getMessage(), said


def test_a_cache_dir_that_cannot_hold_files_is_said_once_not_twice_per_chunk(
    remote: Remote, tmp_path: Path, caplog: Any
) -> None:
    """A file where the folder should be: each load warned twice (two opens) and once
    more (the write), for every chunk, for the whole run. The data is right all the same."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    chunks = remote.store(blocker, memory_budget=0)
    for index in (0, 1, 2, 0):
        assert bytes(chunks.get(index)) == remote.bytes_of(index)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 2, said
    assert "cannot open cached file" in said[0] and "not cached on disk" in said[1], said
    assert chunks.stats.write_failures == 4


def test_a_write_that_reads_back_other_bytes_is_never_renamed_into_place(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temp file is read back before the rename: one byte changed on its way to the
    disk (same size: only the sha256 can tell) leaves no cached file, and no stamp that a
    later process would trust."""

    class Flipping:
        """The temp file, written with one byte changed."""

        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> Flipping:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, data: cache_module.Buffer) -> int:
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0xFF
            return int(self.handle.write(damaged))

    real_open = open

    def flipping_open(file: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
        handle = real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]
        return Flipping(handle) if "x" in mode else handle

    chunks = remote.store(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr("builtins.open", flipping_open)
        assert bytes(chunks.get(0)) == remote.bytes_of(0)  # served from memory all the same
    final = chunks.path(0)
    assert final is not None and not final.exists()
    assert not final.with_name(final.name + ".verified").exists()
    assert not list(final.parent.glob("*.tmp"))
    assert chunks.stats.write_failures == 1
    again = remote.store(tmp_path)  # another worker: nothing cached, so a good download
    assert bytes(again.get(0)) == remote.bytes_of(0)
    assert remote.calls == {0: 2} and again.stats.disk_hits == 0


def test_temp_files_left_by_a_dead_process_are_swept(remote: Remote, tmp_path: Path) -> None:
    folder = tmp_path / CACHE_SUBDIR / JOB_UNIFORM
    folder.mkdir(parents=True)
    old = folder / "00003-abc.zip.123-dead.tmp"
    fresh = folder / "00003-abc.zip.124-live.tmp"  # may belong to a live writer
    for leftover in (old, fresh):
        leftover.write_bytes(b"partial")
    day_ago = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(old, (day_ago, day_ago))
    remote.store(tmp_path).get(0)
    assert not old.exists() and fresh.exists()


def test_default_cache_dir_is_the_env_var_else_the_platform_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "env"))
    assert resolve_cache_root(None) == tmp_path / "env"
    assert resolve_cache_root(tmp_path / "mine") == tmp_path / "mine"
    assert resolve_cache_root(False) is None
    monkeypatch.delenv(ENV_CACHE_DIR)
    import platformdirs

    default = Path(platformdirs.user_cache_dir("pixcrawler"))
    assert resolve_cache_root(None) == default
    for blank in ("", "  "):  # set but blank (``export PIXCRAWLER_CACHE_DIR=``): unset
        monkeypatch.setenv(ENV_CACHE_DIR, blank)
        assert resolve_cache_root(None) == default


@pytest.mark.parametrize("blank", ["", " "])
def test_a_blank_cache_dir_is_a_value_error_not_the_working_directory(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blank: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="names no folder: pass None for the default"):
        remote.store(blank)
    assert list(tmp_path.iterdir()) == []


def test_threads_wanting_one_chunk_share_one_download(remote: Remote, tmp_path: Path) -> None:
    chunks = remote.store(tmp_path)
    barrier = threading.Barrier(6)

    def read() -> None:
        barrier.wait()
        chunks.archive(2)

    threads = [threading.Thread(target=read) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert remote.calls == {2: 1}


def _read_all_chunks(store: str, cache_dir: str, counter: object, start: object) -> None:
    remote = Remote(Path(store))
    real_fetch = remote.fetch

    def slow_fetch(index: int) -> bytearray:
        with counter.get_lock():  # type: ignore[attr-defined]
            counter.value += 1  # type: ignore[attr-defined]
        time.sleep(0.05)  # long enough for the other processes to arrive and wait
        return real_fetch(index)

    remote.fetch = slow_fetch  # type: ignore[method-assign]
    chunks = remote.store(Path(cache_dir))
    start.wait()  # type: ignore[attr-defined]
    for chunk in remote.chunks:
        archive = chunks.archive(chunk.index)
        assert len(archive) == chunk.image_count


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_worker_processes_sharing_the_folder_download_each_chunk_once(
    store: Path, tmp_path: Path
) -> None:
    context = multiprocessing.get_context("fork")
    counter = context.Value("i", 0)
    start = context.Event()
    processes = [
        context.Process(target=_read_all_chunks, args=(str(store), str(tmp_path), counter, start))
        for _ in range(3)
    ]
    for process in processes:
        process.start()
    start.set()
    for process in processes:
        process.join(30)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    assert counter.value == NUM_CHUNKS  # the others waited on the lock, then read the file


def test_names_from_the_api_never_lead_the_cache_outside_its_folder(
    remote: Remote, tmp_path: Path
) -> None:
    """The cache names files after the API's chunk sha256 and its folder after the job id:
    a hostile API's "/../" in either must not open, create or delete a file elsewhere."""
    victim = tmp_path / "home" / "thesis.zip"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    data = json.loads((remote.folder.parent / "job.json").read_text())
    entry = dict(data["chunks"][0], url="/c.zip", sha256="/../../../../home/thesis")
    with pytest.raises(PixCrawlerError, match=r"sha256 '/\.\./\.\./\.\./\.\./home/thesis'"):
        Job.from_json(dict(data, chunks=[entry]))
    with pytest.raises(PixCrawlerError, match=r"id '\.\./\.\./home'"):
        Job.from_json(dict(data, id="../../home", chunks=[]))
    with pytest.raises(ValueError, match="job_id must match"):
        ChunkStore(remote.chunks, remote.fetch, job_id="../../home", cache_dir=tmp_path / "c")
    # A Chunk built by hand (not from the API's JSON) is kept out of file names too.
    chunk = replace(remote.chunks[0], sha256="/../../../../home/thesis")
    store = ChunkStore([chunk], remote.fetch, job_id=remote.job.id, cache_dir=tmp_path / "c")
    path = store.path(0)
    assert path is not None and path.parent == tmp_path / "c" / CACHE_SUBDIR / remote.job.id
    store.get(0)
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["thesis.zip"]


def test_a_file_this_store_verified_is_checked_again_once_rewritten_in_place(
    remote: Remote, tmp_path: Path
) -> None:
    """The store's own memory of a verified file goes by the same identity as the stamp:
    bit rot or a rewrite with its mtime set back is caught on the next read from disk."""
    chunks = remote.store(tmp_path)
    _rot_with_mtime_kept(chunks, 1).close()
    chunks.clear_memory()
    assert bytes(chunks.get(1)) == remote.bytes_of(1)
    assert chunks.stats.corrupt_files == 1 and remote.calls == {1: 2}


def test_a_folder_without_file_locks_still_caches(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some network mounts refuse flock (ENOLCK): the cache works on without the lock."""

    def refuse(fd: int, *, wait: bool = True) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(cache_module, "_lock_fd", refuse)
    remote.store(tmp_path).get(2)
    again = remote.store(tmp_path)
    assert bytes(again.get(2)) == remote.bytes_of(2)
    assert remote.calls == {2: 1} and again.stats.disk_hits == 1


def _take_lock(path: str, after: float = 0.0) -> None:
    """In a forked child: the chunk's lock, as a DataLoader worker's ChunkStore takes it
    (``after`` seconds from now)."""
    time.sleep(after)
    with cache_module._exclusive(Path(path), threading.Event()):
        pass


@pytest.mark.skipif(sys.platform == "win32", reason="fork and flock are POSIX")
def test_a_worker_forked_while_the_parent_holds_a_chunk_lock_gets_it_once_released(
    tmp_path: Path,
) -> None:
    """The parent is fetching chunk 0 (holding its lock) when DataLoader forks a worker.
    The worker inherits the lock's descriptor; unless it lets go of that copy, the flock
    outlives the parent's release and the worker waits on it forever."""
    chunk = tmp_path / "00000.zip"
    holding, release = threading.Event(), threading.Event()

    def parent_fetch() -> None:
        with cache_module._exclusive(chunk, threading.Event()):
            holding.set()
            release.wait(10)

    fetcher = threading.Thread(target=parent_fetch)
    fetcher.start()
    assert holding.wait(5)
    worker = multiprocessing.get_context("fork").Process(target=_take_lock, args=(str(chunk),))
    worker.start()
    time.sleep(0.3)
    release.set()  # the parent's fetch ends
    fetcher.join(5)
    _assert_took_the_lock(worker)


@pytest.mark.skipif(sys.platform == "win32", reason="fork and flock are POSIX")
def test_a_fork_while_a_lock_file_is_being_opened_leaves_the_child_no_copy_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.open`` of a chunk's lock file releases the GIL: a DataLoader forking a worker
    just then used to leave the worker a descriptor it did not know it held, so the flock
    outlived the parent's release and the worker (or any process after) waited forever."""
    chunk = tmp_path / "00000.zip"
    opened, resume = threading.Event(), threading.Event()
    real_open = os.open

    def slow_open(path: Any, flags: int, *args: Any) -> int:
        fd = real_open(path, flags, *args)
        if str(path).endswith(".lock"):
            opened.set()
            resume.wait(5)  # the window between the open and the registration
        return fd

    monkeypatch.setattr(cache_module.os, "open", slow_open)
    fetcher = threading.Thread(target=_take_lock, args=(str(chunk),))
    fetcher.start()
    assert opened.wait(5)
    monkeypatch.setattr(cache_module.os, "open", real_open)
    # The worker asks for the lock once the parent has taken and released it.
    worker = multiprocessing.get_context("fork").Process(target=_take_lock, args=(str(chunk), 1.0))
    starter = threading.Thread(target=worker.start)  # forks now, or once the window closes
    starter.start()
    time.sleep(0.3)
    resume.set()
    for thread in (starter, fetcher):
        thread.join(5)
    _assert_took_the_lock(worker)


def _take_folder_lock(path: str) -> None:
    """In a forked child: an export's folder lock, as a second ``pixcrawler download``."""
    with cache_module.folder_lock(Path(path), ".lock", lambda: RuntimeError("busy")):
        pass


@pytest.mark.skipif(sys.platform == "win32", reason="fork and flock are POSIX")
def test_a_child_forked_during_an_export_does_not_keep_its_folder_locked(
    tmp_path: Path,
) -> None:
    """An export (or pack) holds its folder's lock while a DataLoader forks a worker in
    another thread: once the export ends, the folder is free, though the worker lives."""
    holding, release, forked = threading.Event(), threading.Event(), threading.Event()

    def export() -> None:
        with cache_module.folder_lock(tmp_path, ".lock", lambda: RuntimeError("busy")):
            holding.set()
            release.wait(10)

    exporter = threading.Thread(target=export)
    exporter.start()
    assert holding.wait(5)
    sleeper = multiprocessing.get_context("fork").Process(target=forked.wait, args=(10,))
    sleeper.start()  # a long-lived worker
    try:
        release.set()
        exporter.join(5)
        checker = multiprocessing.get_context("fork").Process(
            target=_take_folder_lock, args=(str(tmp_path),)
        )
        checker.start()
        _assert_took_the_lock(checker)
    finally:
        sleeper.kill()
        sleeper.join(5)


def _assert_took_the_lock(worker: Any) -> None:
    """The forked worker got the chunk's lock and ended, rather than hanging on it."""
    worker.join(10)
    try:
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()


def _read_cached_chunks_with_few_descriptors(cache_dir: str, count: int, headroom: int) -> None:
    """In a child: a store reads ``count`` tiny chunks from the disk cache with only
    ``headroom`` descriptors to spare under its limit; exits 0 if all came back right."""
    import resource

    blobs, chunks = _tiny_chunks(count)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + headroom, in_use + headroom))

    def no_download(index: int) -> bytearray:
        raise AssertionError(f"chunk {index} was downloaded, not read from the cache")

    store = ChunkStore(chunks, no_download, job_id="tiny", cache_dir=cache_dir)
    for index in range(count):
        assert bytes(store.get(index)) == blobs[index]
    assert len(os.listdir("/proc/self/fd")) <= in_use + headroom // 2


def _tiny_chunks(count: int) -> tuple[list[bytes], list[Chunk]]:
    blobs = [index.to_bytes(4, "big") * 256 for index in range(count)]
    chunks = [
        Chunk(index, f"/c/{index}", len(blob), hashlib.sha256(blob).hexdigest())
        for index, blob in enumerate(blobs)
    ]
    return blobs, chunks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_many_small_cached_chunks_never_use_up_the_descriptor_limit(tmp_path: Path) -> None:
    """Each mapping of a cached file holds a descriptor (before Python 3.13): a memory budget
    that holds 300 tiny chunks must not hold 300 descriptors under a limit of ~100."""
    blobs, chunks = _tiny_chunks(300)
    writer = ChunkStore(chunks, lambda i: bytearray(blobs[i]), job_id="tiny", cache_dir=tmp_path)
    for index in range(len(chunks)):
        writer.get(index)
    reader = multiprocessing.get_context("fork").Process(
        target=_read_cached_chunks_with_few_descriptors, args=(str(tmp_path), 300, 100)
    )
    reader.start()
    reader.join(30)
    assert reader.exitcode == 0


def test_the_limit_on_mappings_evicts_mappings_not_chunks_held_in_plain_memory(
    remote: Remote, tmp_path: Path
) -> None:
    writer = remote.store(tmp_path)
    for index in (1, 2, 3):
        writer.get(index)
    chunks = remote.store(tmp_path / "elsewhere")
    chunks.directory = writer.directory  # 0 is downloaded here; 1-3 are mapped from disk
    chunks._mapped_limit = 2
    for index in range(NUM_CHUNKS):
        chunks.get(index)
    assert [chunks.in_memory(i) for i in range(NUM_CHUNKS)] == [True, False, True, True]
    assert chunks.stats.evictions == 1


def test_the_limit_on_mappings_is_the_processs_not_each_stores(tmp_path: Path) -> None:
    """Before Python 3.13 each mapping holds a descriptor: four map-style datasets each
    mapping up to the limit would use four times the share meant for all of them."""
    blobs, chunks = _tiny_chunks(4)
    writer = ChunkStore(chunks, lambda i: bytearray(blobs[i]), job_id="tiny", cache_dir=tmp_path)
    for index in range(4):
        writer.get(index)  # downloaded: plain memory, no mapping
    before = cache_module._Mappings.total
    stores = [ChunkStore(chunks, bytearray, job_id="tiny", cache_dir=tmp_path) for _ in range(2)]
    for store in stores:
        store._mapped_limit = before + 3
        for index in range(4):
            assert bytes(store.get(index)) == blobs[index]  # mapped from the cache
    # The first store keeps 3; the second, over the limit, only the one in use.
    assert cache_module._Mappings.total == before + 4
    assert (stores[0].stats.evictions, stores[1].stats.evictions) == (1, 3)
    del stores[0]  # a store that goes lets go of its share
    assert cache_module._Mappings.total == before + 1


def test_a_cached_file_that_cannot_be_mapped_is_read_instead(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote.store(tmp_path).get(1)
    _refuse_mappings(monkeypatch)
    again = remote.store(tmp_path)
    assert bytes(again.get(1)) == remote.bytes_of(1)
    assert remote.calls == {1: 1} and again.stats.disk_hits == 1


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs are POSIX")
@pytest.mark.parametrize("foreign", ["fifo", "folder"])
def test_something_not_a_file_where_a_chunk_belongs_is_passed_over(
    remote: Remote, tmp_path: Path, foreign: str
) -> None:
    """A FIFO used to hang the open forever; a folder, on a chunk listed without a size,
    raised a bare OSError from mmap. Each is now left alone and the chunk downloaded."""
    unsized = remote.store(tmp_path)
    unsized._chunks[0] = replace(remote.chunks[0], size_bytes=None)
    path = unsized.path(0)
    assert path is not None
    path.parent.mkdir(parents=True)
    if foreign == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    assert bytes(unsized.get(0)) == remote.bytes_of(0)
    assert remote.calls == {0: 1}


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/zero are POSIX")
@pytest.mark.parametrize("foreign", ["fifo", "folder"])
def test_something_not_a_stamp_where_a_stamp_belongs_is_passed_over(
    remote: Remote, tmp_path: Path, foreign: str
) -> None:
    """A FIFO at ``<chunk>.verified`` blocked the open for ever (a link to /dev/zero, not
    tested here, read without end). It is no stamp: the file is hashed instead."""
    remote.store(tmp_path).get(0)
    chunks = remote.store(tmp_path)
    path = chunks.path(0)
    assert path is not None
    stamp = path.with_name(path.name + cache_module.STAMP_SUFFIX)
    stamp.unlink()
    if foreign == "fifo":
        os.mkfifo(stamp)
    else:
        stamp.mkdir()
    assert bytes(chunks.get(0)) == remote.bytes_of(0)
    assert remote.calls == {0: 1} and chunks.stats.disk_hits == 1


def test_a_cache_dir_that_is_no_folder_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not pathlib's TypeError, or RuntimeError for "~user" of a user who does not exist."""
    for bad in (123, 1):  # (1 == True, which means the default folder)
        with pytest.raises(ValueError, match=r"^cache_dir is not a folder"):
            resolve_cache_root(bad)  # type: ignore[arg-type]
    if sys.platform == "win32":  # expanduser there makes a path of any user name
        return
    with pytest.raises(ValueError, match="cache_dir is not a folder"):
        resolve_cache_root("~no-such-user-here/cache")
    monkeypatch.setenv(ENV_CACHE_DIR, "~no-such-user-here/cache")
    with pytest.raises(ValueError, match=r"\$PIXCRAWLER_CACHE_DIR is not a folder"):
        resolve_cache_root(None)
