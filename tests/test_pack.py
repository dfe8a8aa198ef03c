"""The packer turns a labelled image folder into deterministic chunk archives and a job.json."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import LiveServer, PackedStore, build_mixed_source
from constants import (
    EXIF_ROTATED_DISPLAY_SIZE,
    EXIF_ROTATED_ID,
    EXIF_ROTATED_STORED_SIZE,
    JOB_MIXED,
    JOB_UNIFORM,
    MIXED_CHUNK_SIZE,
    MIXED_LABELS,
    MIXED_TOTAL,
    UNIFORM_CHUNK_SIZE,
    UNIFORM_LABELS,
    UNIFORM_SIZE,
    UNIFORM_TOTAL,
)
from imagegen import make_image, make_image_folder, save_image
from pixcrawler import config, export
from pixcrawler import packer as packer_module
from pixcrawler.archive import ChunkArchive
from pixcrawler.client import ApiClient
from pixcrawler.config import JOB_ID_PATTERN
from pixcrawler.packer import pack, write_job

pytestmark = pytest.mark.timeout(30)

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def chunk_files(store: Path, job_id: str) -> list[Path]:
    return sorted((store / job_id / "chunks").glob("*.zip"))


def manifests(store: Path, job_id: str) -> list[dict[str, Any]]:
    out = []
    for path in chunk_files(store, job_id):
        with zipfile.ZipFile(path) as archive:
            out.append(json.loads(archive.read("manifest.json")))
    return out


def read_job(store: Path, job_id: str) -> dict[str, Any]:
    return dict(json.loads((store / job_id / "job.json").read_text()))


# -- determinism -------------------------------------------------------------------------


def test_packing_twice_gives_byte_identical_chunks_and_the_same_job_id(
    packed: PackedStore, tmp_path: Path
) -> None:
    src = packed.sources[JOB_MIXED]
    first = pack(src, tmp_path / "a", chunk_size=MIXED_CHUNK_SIZE)
    second = pack(src, tmp_path / "b", chunk_size=MIXED_CHUNK_SIZE)
    assert first == second
    assert re.fullmatch(r"job_[0-9a-f]{12}", first.job_id)
    a, b = chunk_files(tmp_path / "a", first.job_id), chunk_files(tmp_path / "b", first.job_id)
    assert [p.name for p in a] == ["00000.zip", "00001.zip", "00002.zip"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    job_a, job_b = read_job(tmp_path / "a", first.job_id), read_job(tmp_path / "b", first.job_id)
    assert job_a["chunks"] == job_b["chunks"]
    assert [c["sha256"] for c in job_a["chunks"]] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in a
    ]


def test_default_job_id_depends_on_content_and_owner(packed: PackedStore, tmp_path: Path) -> None:
    src = packed.sources[JOB_UNIFORM]
    base = pack(src, tmp_path, chunk_size=UNIFORM_CHUNK_SIZE).job_id
    assert pack(src, tmp_path, chunk_size=UNIFORM_CHUNK_SIZE, owner="other").job_id != base
    assert pack(src, tmp_path, chunk_size=7).job_id != base
    assert pack(src, tmp_path, chunk_size=UNIFORM_CHUNK_SIZE, name="renamed").job_id == base


def test_repacking_into_fewer_chunks_removes_the_stale_ones(
    packed: PackedStore, tmp_path: Path
) -> None:
    src = packed.sources[JOB_UNIFORM]
    assert pack(src, tmp_path, job_id="job_x", chunk_size=7).num_chunks == 9
    result = pack(src, tmp_path, job_id="job_x", chunk_size=30)
    assert result.num_chunks == 2
    assert [p.name for p in chunk_files(tmp_path, "job_x")] == ["00000.zip", "00001.zip"]
    assert not list((tmp_path / "job_x" / "chunks").glob(".*"))  # no temp files left


def test_packing_again_removes_the_temp_chunks_of_a_killed_pack(
    packed: PackedStore, tmp_path: Path
) -> None:
    """A pack killed mid-chunk leaves ``.00001.zip.<random>.tmp``: the next pack of the job
    removes it (and nothing else it did not write)."""
    chunks = tmp_path / "job_x" / "chunks"
    chunks.mkdir(parents=True)
    (chunks / ".00001.zip.k3j_x9q.tmp").write_bytes(b"half a chunk")
    (chunks / ".00123.zip.abc.tmp").write_bytes(b"")
    (chunks / "notes.txt").write_text("the operator's")
    pack(packed.sources[JOB_UNIFORM], tmp_path, job_id="job_x", chunk_size=30)
    assert sorted(p.name for p in chunks.iterdir()) == ["00000.zip", "00001.zip", "notes.txt"]


# -- archives ----------------------------------------------------------------------------


def test_manifest_is_first_and_members_follow_its_order(packed: PackedStore) -> None:
    all_paths: list[str] = []
    for index, path in enumerate(chunk_files(packed.store, JOB_MIXED)):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            manifest = json.loads(archive.read("manifest.json"))
        assert names[0] == "manifest.json"
        assert names[1:] == [image["path"] for image in manifest["images"]]
        assert (manifest["job_id"], manifest["chunk_index"]) == (JOB_MIXED, index)
        assert len(manifest["images"]) <= MIXED_CHUNK_SIZE
        all_paths += names[1:]
    labels = [path.rsplit("/", 1)[0] for path in all_paths]
    assert sorted(zip(labels, all_paths, strict=True)) == list(zip(labels, all_paths, strict=True))
    assert len(all_paths) == len(set(all_paths)) == MIXED_TOTAL
    # One stem, two formats: two images with two ids.
    assert {"cat/dup.jpg", "cat/dup.png"} <= set(all_paths)


def test_images_are_stored_byte_identical_with_manifest_fields(packed: PackedStore) -> None:
    src = packed.sources[JOB_MIXED]
    for path in chunk_files(packed.store, JOB_MIXED):
        with zipfile.ZipFile(path) as archive:
            for image in json.loads(archive.read("manifest.json"))["images"]:
                data = archive.read(image["path"])
                assert data == (src / image["path"]).read_bytes()
                assert image["id"] == image["path"] == image["metadata"]["source"]
                assert image["label"] == image["path"].rsplit("/", 1)[0]
                assert image["sha256"] == hashlib.sha256(data).hexdigest()
                assert image["metadata"]["size_bytes"] == len(data)
                with Image.open(io.BytesIO(data)) as decoded:
                    assert image["metadata"]["format"] == decoded.format
                    shown = ImageOps.exif_transpose(decoded)
                    assert (image["width"], image["height"]) == shown.size


def test_compressed_formats_are_stored_and_others_deflated(packed: PackedStore) -> None:
    methods: dict[str, set[int]] = {}
    for path in chunk_files(packed.store, JOB_MIXED):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist()[1:]:
                ext = info.filename.rsplit(".", 1)[1]
                methods.setdefault(ext, set()).add(info.compress_type)
    stored, deflated = {zipfile.ZIP_STORED}, {zipfile.ZIP_DEFLATED}
    assert methods == {
        "jpg": stored,
        "jpeg": stored,
        "png": stored,
        "gif": stored,
        "webp": stored,
        "bmp": deflated,
        "tif": deflated,
        "tiff": deflated,
    }


def test_zip_entries_carry_no_time_or_host_specific_metadata(packed: PackedStore) -> None:
    for path in chunk_files(packed.store, JOB_UNIFORM):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                assert info.date_time == (1980, 1, 1, 0, 0, 0)
                assert info.external_attr == 0o100644 << 16
                assert info.create_system == 3
                assert info.extra == b""


def test_exif_rotated_jpeg_records_its_displayed_size(packed: PackedStore) -> None:
    entries = {i["id"]: i for m in manifests(packed.store, JOB_MIXED) for i in m["images"]}
    rotated = entries[EXIF_ROTATED_ID]
    with Image.open(packed.sources[JOB_MIXED] / EXIF_ROTATED_ID) as image:
        assert image.size[::-1] == EXIF_ROTATED_STORED_SIZE  # the pixels are 20 x 30 (H x W)
    assert (rotated["height"], rotated["width"]) == EXIF_ROTATED_DISPLAY_SIZE


def test_nested_folders_give_slash_separated_labels(packed: PackedStore) -> None:
    assert packed.results[JOB_MIXED].labels == MIXED_LABELS
    nested = [
        i
        for m in manifests(packed.store, JOB_MIXED)
        for i in m["images"]
        if i["label"] == "animals/cat"
    ]
    assert len(nested) == 5
    assert all(i["path"].startswith("animals/cat/") for i in nested)


# -- job.json ----------------------------------------------------------------------------


def test_job_json_describes_the_completed_job(packed: PackedStore) -> None:
    job = read_job(packed.store, JOB_UNIFORM)
    result = packed.results[JOB_UNIFORM]
    files = chunk_files(packed.store, JOB_UNIFORM)
    assert set(job) == {
        "id", "name", "status", "progress", "created_at", "completed_at", "total_images",
        "chunk_size", "size_bytes", "labels", "version", "image_size", "chunks", "owner",
    }  # fmt: skip
    assert (job["id"], job["name"], job["owner"]) == (JOB_UNIFORM, "uniform", "default")
    assert (job["status"], job["progress"], job["version"]) == ("completed", 100, 1)
    assert TIMESTAMP.fullmatch(job["created_at"]) and TIMESTAMP.fullmatch(job["completed_at"])
    assert job["created_at"] <= job["completed_at"]
    assert job["total_images"] == result.total_images == UNIFORM_TOTAL
    assert job["labels"] == list(result.labels) == sorted(UNIFORM_LABELS)
    assert job["image_size"] == list(UNIFORM_SIZE)
    assert job["chunk_size"] == UNIFORM_CHUNK_SIZE
    assert [c["image_count"] for c in job["chunks"]] == [16, 16, 16, 12]
    assert job["size_bytes"] == result.size_bytes == sum(p.stat().st_size for p in files)
    for chunk, path in zip(job["chunks"], files, strict=True):
        data = path.read_bytes()
        assert chunk == {
            "index": int(path.stem),
            "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "image_count": chunk["image_count"],
            "expires_at": None,
        }
    assert result.num_chunks == len(files) == 4


def test_default_name_is_the_source_folder_name(packed: PackedStore) -> None:
    assert read_job(packed.store, JOB_MIXED)["name"] == "mixed"
    assert read_job(packed.store, JOB_MIXED)["image_size"] is None


# -- what is left out ----------------------------------------------------------------------


def test_bad_files_are_skipped_and_reported(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", {"cat": 3, "dog": 2})
    good = (src / "cat" / "0000.jpg").read_bytes()
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    (src / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "dog" / "empty.png").write_bytes(b"")
    (src / "dog" / "text.png").write_text("hello")
    (src / "root.jpg").write_bytes(good)
    (src / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (src / ".cache").mkdir()
    (src / ".cache" / "x.jpg").write_bytes(good)

    result = pack(src, tmp_path / "store")
    reasons = dict(result.skipped)
    assert set(reasons) == {
        ".cache/",
        "cat/.DS_Store",
        "cat/corrupt.jpg",
        "cat/notes.txt",
        "cat/truncated.jpg",
        "dog/empty.png",
        "dog/text.png",
        "root.jpg",
    }
    assert "not an image" in reasons["cat/notes.txt"]
    assert "cannot be decoded" in reasons["cat/corrupt.jpg"]
    assert "cannot be decoded" in reasons["cat/truncated.jpg"]
    assert "empty" in reasons["dog/empty.png"]
    assert "root folder" in reasons["root.jpg"]
    assert [path for path, _ in result.skipped] == sorted(reasons)
    assert result.total_images == 5
    packed_names = {
        i["path"] for m in manifests(tmp_path / "store", result.job_id) for i in m["images"]
    }
    assert packed_names == {f"cat/{i:04d}.jpg" for i in range(3)} | {
        f"dog/{i:04d}.jpg" for i in range(2)
    }


def test_a_png_damaged_in_its_pixel_data_is_skipped_and_reported(tmp_path: Path) -> None:
    """Pillow decodes some such PNGs to wrong pixels without a word: packed, their sha256
    would vouch for the damage in every reader."""
    src = make_image_folder(tmp_path / "src", {"cat": 2})
    ramp = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[data.find(b"IDAT") + 40] ^= 0x10  # in the pixel data; its CRC left as it was
    (src / "cat" / "damaged.png").write_bytes(bytes(data))
    result = pack(src, tmp_path / "store")
    reasons = dict(result.skipped)
    assert list(reasons) == ["cat/damaged.png"] and result.total_images == 2
    assert "PNG chunk 'IDAT'" in reasons["cat/damaged.png"] and "CRC" in reasons["cat/damaged.png"]


@pytest.mark.skipif(os.name != "posix", reason="names and file kinds a POSIX system allows")
def test_files_no_reader_could_take_are_skipped_and_reported(tmp_path: Path) -> None:
    """A backslash or a drive-like ':' in a path (readers refuse such members), a name
    that is not UTF-8, a FIFO named like an image (reading it would never end), and a
    symlinked label folder (not followed) are each reported, never packed or waited on."""
    src = make_image_folder(tmp_path / "src", {"cat": 2})
    good = (src / "cat" / "0000.jpg").read_bytes()
    (src / "cat" / "a\\b.jpg").write_bytes(good)
    (src / "a:b").mkdir()
    (src / "a:b" / "x.jpg").write_bytes(good)
    (src / "cat" / os.fsdecode(b"bad\xff.jpg")).write_bytes(good)
    os.mkfifo(src / "cat" / "pipe.jpg")
    make_image_folder(tmp_path / "elsewhere", {"dog": 1})
    (src / "dog").symlink_to(tmp_path / "elsewhere" / "dog")

    result = pack(src, tmp_path / "store", job_id="job_odd")
    reasons = dict(result.skipped)
    assert "not portable" in reasons["cat/a\\b.jpg"]
    assert "not portable" in reasons["a:b/x.jpg"]
    assert "not valid UTF-8" in reasons["cat/" + os.fsdecode(b"bad\xff.jpg")]
    assert reasons["cat/pipe.jpg"] == "not a regular file"
    assert reasons["dog/"] == "symbolic link to a folder, not followed"
    assert result.total_images == 2 and result.labels == ("cat",)
    store = tmp_path / "store"
    for chunk in chunk_files(store, "job_odd"):
        assert len(ChunkArchive(chunk.read_bytes())) == 2  # what was packed reads back


def test_a_file_larger_than_a_reader_accepts_is_skipped_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers refuse a member over ``MAX_MEMBER_BYTES`` (512 MiB), so the packer leaves
    such a file out rather than write a chunk no one can read. (The limit is lowered here:
    the test need not write half a gigabyte.)"""
    src = make_image_folder(tmp_path / "src", {"cat": 2}, size=(16, 16))
    save_image(make_image("cat", (64, 64), index=5), src / "cat" / "big.bmp")
    limit = (src / "cat" / "0000.jpg").stat().st_size
    assert (src / "cat" / "big.bmp").stat().st_size > limit
    monkeypatch.setattr(config, "MAX_MEMBER_BYTES", limit)
    result = pack(src, tmp_path / "store", job_id="job_big")
    reasons = dict(result.skipped)
    assert set(reasons) == {"cat/big.bmp"}
    assert "a reader accepts" in reasons["cat/big.bmp"]
    for chunk in chunk_files(tmp_path / "store", "job_big"):
        ChunkArchive(chunk.read_bytes(), max_member_bytes=limit)  # what was packed reads back


def test_chunk_size_is_capped_by_the_members_a_reader_accepts(
    packed: PackedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk holds its manifest and its images: at most ``MAX_MEMBERS - 1`` images, or
    readers refuse it. (The limit is lowered here: 100,000 images would take minutes.)"""
    monkeypatch.setattr(config, "MAX_MEMBERS", 8)
    src = packed.sources[JOB_UNIFORM]
    with pytest.raises(ValueError, match="chunk_size must be at most 7"):
        pack(src, tmp_path / "store", chunk_size=8)
    result = pack(src, tmp_path / "store", job_id="job_cap", chunk_size=7)
    chunks = chunk_files(tmp_path / "store", "job_cap")
    assert result.num_chunks == len(chunks) == -(-UNIFORM_TOTAL // 7)
    assert sum(len(ChunkArchive(c.read_bytes(), max_members=8)) for c in chunks) == UNIFORM_TOTAL


def test_a_job_too_long_for_the_server_to_read_is_refused_before_anything_is_written(
    packed: PackedStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    live_server: LiveServer,
    server_factory: Any,
) -> None:
    """A job.json past config.MAX_JOB_BYTES is "not there" to the server: a pack of some
    175,000 chunks said "Packed" and every client got 404. (The cap is lowered here.)"""
    src = packed.sources[JOB_UNIFORM]
    pack(src, tmp_path / "measure", job_id="job_long", chunk_size=1)
    length = (tmp_path / "measure" / "job_long" / "job.json").stat().st_size
    monkeypatch.setattr(config, "MAX_JOB_BYTES", length - 1)
    with pytest.raises(
        ValueError,
        match=r"would list 60 chunks in a job\.json of about .* "
        "a server reads: pack with a larger chunk size",
    ):
        pack(src, tmp_path / "store", job_id="job_long", chunk_size=1)
    assert not (tmp_path / "store" / "job_long").exists()
    # With room for the chunks' sizes at any length, it packs, and the server reads it.
    monkeypatch.setattr(config, "MAX_JOB_BYTES", length * 6 // 5)
    pack(src, tmp_path / "store", job_id="job_long", chunk_size=1)
    job = ApiClient(live_server.api_key, server_factory(tmp_path / "store")).get_job("job_long")
    assert (job.status, len(job.chunks)) == ("completed", UNIFORM_TOTAL)


def test_a_label_folder_named_like_an_images_export_file_is_skipped_and_reported(
    tmp_path: Path,
) -> None:
    """``download --format images`` writes ``metadata.jsonl`` (and its ``.part``) at the top
    of its folder and refuses a label of that name: such a folder is left out at pack time,
    while it can still be renamed, not found out at download time. A nested folder of that
    name is a label's inner part, no clash."""
    src = make_image_folder(tmp_path / "src", {"cat": 1, "cat/metadata.jsonl": 1})
    visible = sorted(name for name in export.RESERVED_NAMES if not name.startswith("."))
    assert visible == ["metadata.jsonl", "metadata.jsonl.part"]  # hidden ones: never labels
    for name in ("metadata.jsonl", "Metadata.JSONL.part"):  # compared casefolded, as there
        make_image_folder(src, {name: 2})
    result = pack(src, tmp_path / "store")
    assert result.labels == ("cat", "cat/metadata.jsonl")
    reasons = dict(result.skipped)
    assert set(reasons) == {"metadata.jsonl/", "Metadata.JSONL.part/"}
    assert all("--format images" in reason for reason in reasons.values())


def _crash_on_chunk(monkeypatch: pytest.MonkeyPatch, name: str, error: BaseException) -> None:
    real = packer_module._write_chunk

    def crash(path: Path, *args: Any) -> Any:
        if path.name == name:
            raise error
        return real(path, *args)

    monkeypatch.setattr(packer_module, "_write_chunk", crash)


def test_packing_the_same_images_again_never_unpublishes_the_job(
    packed: PackedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients reading the job meanwhile got 404s ("running, no chunks yet") and their
    DownloadError, for a re-pack that changed nothing: now no chunk is written at all."""
    src = packed.sources[JOB_UNIFORM]
    pack(src, tmp_path, job_id="job_x", chunk_size=7)
    before = {p.name: p.stat().st_mtime_ns for p in chunk_files(tmp_path, "job_x")}
    statuses: list[str] = []
    real = packer_module._write_json_atomic

    def noting(path: Path, value: Any) -> None:
        statuses.append(value["status"])
        real(path, value)

    monkeypatch.setattr(packer_module, "_write_json_atomic", noting)
    _crash_on_chunk(monkeypatch, "00000.zip", AssertionError("no chunk is written"))
    pack(src, tmp_path, job_id="job_x", chunk_size=7)
    assert statuses == ["completed"]
    assert {p.name: p.stat().st_mtime_ns for p in chunk_files(tmp_path, "job_x")} == before
    assert read_job(tmp_path, "job_x")["version"] == 1
    monkeypatch.undo()
    # A chunk file that is not the one listed is written again, not kept under the old
    # checksum: one byte of an image flipped (its size and manifest unchanged), or another
    # size.
    first, last = chunk_files(tmp_path, "job_x")[0], chunk_files(tmp_path, "job_x")[-1]
    with zipfile.ZipFile(last) as archive:
        member = archive.infolist()[1]  # the first image, after the manifest
    at = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra) + 10
    damaged = bytearray(last.read_bytes())
    damaged[at] ^= 0xFF
    for path, change in ((last, bytes(damaged)), (first, first.read_bytes() + b"\0")):
        path.write_bytes(change)
        pack(src, tmp_path, job_id="job_x", chunk_size=7)
        job = read_job(tmp_path, "job_x")
        assert job["chunks"] == [
            {**entry, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for entry, data in zip(
                job["chunks"], (p.read_bytes() for p in chunk_files(tmp_path, "job_x")), strict=True
            )
        ]
        assert hashlib.sha256(path.read_bytes()).hexdigest() != hashlib.sha256(change).hexdigest()


def test_a_re_pack_that_stops_after_replacing_a_chunk_marks_the_job_failed(
    packed: PackedStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    live_server: LiveServer,
    server_factory: Any,
) -> None:
    """Chunks are replaced in place: meanwhile the job is listed as running with no chunks,
    never as the old job over the new bytes; a pack that stops then leaves it failed (it
    stayed "running, 0%" for good: clients polled for ever). Packing the old images again
    gives back their version (the failed job.json keeps the chunks it compares with)."""
    src = packed.sources[JOB_UNIFORM]
    pack(src, tmp_path, job_id="job_x", chunk_size=7)
    _crash_on_chunk(monkeypatch, "00001.zip", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        pack(src, tmp_path, job_id="job_x", chunk_size=30)  # other chunks: a new version
    assert read_job(tmp_path, "job_x")["status"] == "failed"
    job = ApiClient(live_server.api_key, server_factory(tmp_path)).get_job("job_x")
    assert (job.status, job.chunks) == ("failed", ())
    monkeypatch.undo()
    pack(src, tmp_path, job_id="job_x", chunk_size=7)
    job = read_job(tmp_path, "job_x")
    assert (job["status"], job["version"]) == ("completed", 1)
    pack(src, tmp_path, job_id="job_x", chunk_size=30)
    assert read_job(tmp_path, "job_x")["version"] == 2


def test_a_re_pack_that_stops_before_replacing_any_chunk_leaves_the_job_as_it_was(
    packed: PackedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = packed.sources[JOB_UNIFORM]
    pack(src, tmp_path, job_id="job_x", chunk_size=7)
    before = (tmp_path / "job_x" / "job.json").read_bytes()
    _crash_on_chunk(monkeypatch, "00000.zip", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        pack(src, tmp_path, job_id="job_x", chunk_size=30)
    assert (tmp_path / "job_x" / "job.json").read_bytes() == before  # published as it was


def test_a_re_pack_stopped_just_after_replacing_a_chunk_is_failed_not_the_old_job(
    packed: PackedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped between a chunk's rename and its being counted as replaced, the pack put
    the old job.json back: its sha256 for that chunk no longer matched the file."""
    src = packed.sources[JOB_UNIFORM]
    pack(src, tmp_path, job_id="job_x", chunk_size=7)
    real = packer_module._write_chunk

    def renamed_then_stopped(path: Path, *args: Any) -> Any:
        real(path, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(packer_module, "_write_chunk", renamed_then_stopped)
    with pytest.raises(KeyboardInterrupt):
        pack(src, tmp_path, job_id="job_x", chunk_size=30)
    assert read_job(tmp_path, "job_x")["status"] == "failed"


@pytest.mark.parametrize("job", ["new", "packed again"])
def test_a_pack_stopped_once_its_job_json_is_in_place_keeps_the_job_it_published(
    packed: PackedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job: str
) -> None:
    """Stopped while the folder synced after the final rename: the undo removed a new
    job's chunks under its completed job.json, or marked a whole new version failed."""
    src = packed.sources[JOB_UNIFORM]
    if job == "packed again":
        pack(src, tmp_path, job_id="job_x", chunk_size=7)
    real = packer_module._sync_folder

    def stopped_once_completed(folder: Path) -> None:
        real(folder)
        if folder == tmp_path / "job_x" and read_job(tmp_path, "job_x")["status"] == "completed":
            raise KeyboardInterrupt

    monkeypatch.setattr(packer_module, "_sync_folder", stopped_once_completed)
    with pytest.raises(KeyboardInterrupt):
        pack(src, tmp_path, job_id="job_x", chunk_size=30)
    published = read_job(tmp_path, "job_x")
    assert published["status"] == "completed" and len(published["chunks"]) == 2
    for entry, path in zip(published["chunks"], chunk_files(tmp_path, "job_x"), strict=True):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]


def test_a_new_job_whose_pack_stops_leaves_no_chunk_behind(
    packed: PackedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk stopped the pack: the chunks it wrote kept the disk full (a pack of
    fewer images, under another default id, failed for want of their room)."""
    _crash_on_chunk(monkeypatch, "00002.zip", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        pack(packed.sources[JOB_UNIFORM], tmp_path, job_id="job_x", chunk_size=7)
    assert not (tmp_path / "job_x" / "job.json").exists()
    assert not (tmp_path / "job_x" / "chunks").exists()


def test_a_job_packed_again_with_other_images_is_a_new_version(
    packed: PackedStore, tmp_path: Path
) -> None:
    """Readers tell versions apart by it where a chunk lists no sha256; it stayed 1."""
    src = make_image_folder(tmp_path / "src", {"cat": 3})
    pack(src, tmp_path / "store", job_id="job_v")
    pack(src, tmp_path / "store", job_id="job_v")  # the same bytes: the same version
    assert read_job(tmp_path / "store", "job_v")["version"] == 1
    (src / "cat" / "0000.jpg").unlink()
    pack(src, tmp_path / "store", job_id="job_v")
    assert read_job(tmp_path / "store", "job_v")["version"] == 2
    # Another producer's 7.0 is version 7: kept for the same bytes, never set back to 1.
    job_path = tmp_path / "store" / "job_v" / "job.json"
    job_path.write_text(json.dumps({**read_job(tmp_path / "store", "job_v"), "version": 7.0}))
    pack(src, tmp_path / "store", job_id="job_v")
    assert read_job(tmp_path / "store", "job_v")["version"] == 7


def test_a_job_without_an_owner_is_defaults_and_not_taken_over(
    packed: PackedStore, tmp_path: Path
) -> None:
    src = packed.sources[JOB_UNIFORM]
    pack(src, tmp_path, job_id="job_shared")
    job_path = tmp_path / "job_shared" / "job.json"
    job = json.loads(job_path.read_text())
    del job["owner"]  # as older stores and other producers write it
    job_path.write_text(json.dumps(job))
    with pytest.raises(ValueError, match="another owner"):
        pack(src, tmp_path, job_id="job_shared", owner="mallory")
    assert "owner" not in read_job(tmp_path, "job_shared")


def test_an_unreadable_job_json_is_packed_over(packed: PackedStore, tmp_path: Path) -> None:
    """A job.json the server could not read either (here nested past the JSON parser's
    limit) is not a job: packing under its id replaces it."""
    (tmp_path / "job_deep").mkdir()
    (tmp_path / "job_deep" / "job.json").write_text("[" * 100_000 + "]" * 100_000)
    pack(packed.sources[JOB_UNIFORM], tmp_path, job_id="job_deep")
    assert read_job(tmp_path, "job_deep")["status"] == "completed"


def test_extensions_are_case_insensitive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_image(make_image("cat", (16, 16)), src / "cat" / "A.JPG")
    save_image(make_image("cat", (16, 16), index=1), src / "cat" / "b.PnG")
    save_image(make_image("cat", (16, 16), index=2), src / "cat" / "c.TIFF")
    assert pack(src, tmp_path / "store").total_images == 3


def test_a_folder_without_valid_images_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_image(make_image("x", (16, 16)), src / "at_root.jpg")
    (src / "cat").mkdir()
    (src / "cat" / "notes.txt").write_text("no")
    with pytest.raises(ValueError, match="no valid image"):
        pack(src, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_a_missing_source_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        pack(tmp_path / "nope", tmp_path / "store")


@pytest.mark.parametrize("job_id", ["", "../evil", "a/b", "job id", "x" * 65, "job.1", "é"])
def test_invalid_job_id_is_rejected(packed: PackedStore, tmp_path: Path, job_id: str) -> None:
    assert not re.fullmatch(JOB_ID_PATTERN, job_id)
    with pytest.raises(ValueError, match="invalid job id"):
        pack(packed.sources[JOB_UNIFORM], tmp_path / "store", job_id=job_id)
    with pytest.raises(ValueError, match="invalid job id"):
        write_job(tmp_path / "store", job_id, status="pending", progress=0)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True])
def test_invalid_chunk_size_is_rejected(
    packed: PackedStore, tmp_path: Path, chunk_size: Any
) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        pack(packed.sources[JOB_UNIFORM], tmp_path, chunk_size=chunk_size)


def test_another_owners_job_id_is_not_overwritten(packed: PackedStore, tmp_path: Path) -> None:
    src = packed.sources[JOB_UNIFORM]
    pack(src, tmp_path, job_id="job_taken", owner="alice")
    with pytest.raises(ValueError, match="another owner"):
        pack(src, tmp_path, job_id="job_taken", owner="bob")
    assert read_job(tmp_path, "job_taken")["owner"] == "alice"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_another_owners_job_json_is_read_as_the_server_reads_it(
    packed: PackedStore, tmp_path: Path, encoding: str
) -> None:
    """A job.json saved with a byte-order mark (or in UTF-16) is served, so it is a job:
    not another owner's to take, nor to be written over without being marked unfinished."""
    src = packed.sources[JOB_UNIFORM]
    pack(src, tmp_path, job_id="job_taken", owner="alice")
    job_path = tmp_path / "job_taken" / "job.json"
    job_path.write_text(json.dumps(read_job(tmp_path, "job_taken")), encoding=encoding)
    for write in (
        lambda: pack(src, tmp_path, job_id="job_taken", owner="bob"),
        lambda: write_job(tmp_path, "job_taken", status="running", progress=0, owner="bob"),
    ):
        with pytest.raises(ValueError, match="another owner"):
            write()
    assert json.loads(job_path.read_bytes())["owner"] == "alice"


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_a_job_being_packed_is_not_written_by_a_second_pack(
    packed: PackedStore, tmp_path: Path
) -> None:
    """Two packs of one job at once would publish one's checksums over the other's chunks:
    the second is refused while the first holds the job."""
    import fcntl

    src = packed.sources[JOB_UNIFORM]
    (tmp_path / "job_busy").mkdir()
    fd = os.open(tmp_path / "job_busy" / ".pack.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another descriptor: as another process's hold
        for write in (
            lambda: pack(src, tmp_path, job_id="job_busy"),
            lambda: write_job(tmp_path, "job_busy", status="running", progress=0),
        ):
            with pytest.raises(ValueError, match="being written by another pack"):
                write()
        assert not (tmp_path / "job_busy" / "job.json").exists()
    finally:
        os.close(fd)
    assert pack(src, tmp_path, job_id="job_busy").job_id == "job_busy"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_chunks_and_job_json_are_on_disk_before_their_names_are(
    packed: PackedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is synced before it is renamed into place, and the chunks' folder before
    job.json lists them: after a power cut, a completed job's chunks are whole."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(src: Any, dst: Any) -> None:
        events.append(("name", str(Path(dst).resolve())))
        replace(src, dst)

    monkeypatch.setattr(packer_module.os, "fsync", logged_fsync)
    monkeypatch.setattr(packer_module.os, "replace", logged_replace)
    result = pack(packed.sources[JOB_MIXED], tmp_path, job_id="job_synced", chunk_size=4)
    monkeypatch.undo()
    job_dir = (tmp_path / "job_synced").resolve()
    chunks = [str(job_dir / "chunks" / f"{i:05d}.zip") for i in range(result.num_chunks)]
    assert result.num_chunks > 1
    named = [path for kind, path in events if kind == "name"]
    assert named == [*chunks, str(job_dir / "job.json")]
    for path in named:
        at = events.index(("name", path))
        synced = events[at - 1]  # its temp file, just before
        assert synced[0] == "sync" and Path(synced[1]).parent == Path(path).parent, events
    job_named = events.index(("name", str(job_dir / "job.json")))
    assert ("sync", str(job_dir / "chunks")) in events[
        events.index(("name", chunks[-1])) : job_named
    ]
    assert events[job_named + 1] == ("sync", str(job_dir))


def test_a_file_system_that_refuses_fsync_still_takes_a_pack(
    packed: PackedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def refused(fd: int) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(packer_module.os, "fsync", refused)
    result = pack(packed.sources[JOB_UNIFORM], tmp_path, job_id="job_nosync")
    assert read_job(tmp_path, "job_nosync")["status"] == "completed" and result.num_chunks


def test_images_readers_cannot_convert_are_skipped_and_reported(tmp_path: Path) -> None:
    """Pillow opens a LAB TIFF but converts it to other colours (and not at all to L)."""
    src = make_image_folder(tmp_path / "src", {"cat": 1})
    Image.new("LAB", (8, 8), (50, 10, 20)).save(src / "cat" / "lab.tif")
    Image.new("F", (8, 8), 0.5).save(src / "cat" / "float.tif")  # clipped to 0..255
    result = pack(src, tmp_path / "store")
    assert dict(result.skipped) == {
        "cat/lab.tif": "unsupported image mode LAB (readers cannot convert it)",
        "cat/float.tif": "unsupported image mode F (readers cannot convert it)",
    }
    assert result.total_images == 1


def test_images_readers_refuse_as_too_costly_are_skipped_before_they_cost_it(
    tmp_path: Path,
) -> None:
    from test_decode import tiled_tiff

    src = make_image_folder(tmp_path / "src", {"cat": 1})
    (src / "cat" / "tiles.tif").write_bytes(tiled_tiff(8, 8, 4112))
    progressive = io.BytesIO()
    make_image("cat", (64, 64)).save(progressive, "JPEG", progressive=True)
    data = progressive.getvalue()
    last = data.rfind(b"\xff\xda")
    (src / "cat" / "scans.jpg").write_bytes(data[:-2] + data[last:-2] * 300 + b"\xff\xd9")
    result = pack(src, tmp_path / "store")
    reasons = dict(result.skipped)
    assert set(reasons) == {"cat/scans.jpg", "cat/tiles.tif"}
    assert reasons["cat/tiles.tif"].startswith("refused as readers refuse it: ")
    assert "tiles of 16,908,544 pixels" in reasons["cat/tiles.tif"]
    assert "progressive JPEG of" in reasons["cat/scans.jpg"]


def test_pillows_warnings_about_an_image_it_decodes_stay_quiet(tmp_path: Path) -> None:
    import warnings

    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    bad_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03"
    Image.new("RGB", (40, 10), 128).save(src / "cat" / "bad_exif.jpg", exif=bad_exif)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Image.open(src / "cat" / "bad_exif.jpg").getexif()  # Pillow does warn of it
        assert caught
        caught.clear()
        result = pack(src, tmp_path / "store")
    assert result.total_images == 1 and caught == []


# -- unfinished jobs -----------------------------------------------------------------------


def test_write_job_creates_an_unfinished_job_without_chunks(tmp_path: Path) -> None:
    path = write_job(tmp_path, "job_r", status="running", progress=42.5, labels=["b", "a", "b"])
    job = json.loads(path.read_text())
    assert path == tmp_path / "job_r" / "job.json"
    assert (job["id"], job["name"], job["owner"]) == ("job_r", "job_r", "default")
    assert (job["status"], job["progress"], job["chunks"]) == ("running", 42.5, [])
    assert job["labels"] == ["a", "b"]
    assert job["completed_at"] is None and TIMESTAMP.fullmatch(job["created_at"])
    assert write_job(tmp_path, "job_p", status="pending", progress=0).exists()


@pytest.mark.parametrize(
    ("status", "progress"),
    [
        ("completed", 100),
        ("done", 50),
        ("running", 101),
        ("running", -1),
        ("running", float("nan")),
    ],
)
def test_write_job_rejects_bad_status_or_progress(
    tmp_path: Path, status: str, progress: float
) -> None:
    with pytest.raises(ValueError):
        write_job(tmp_path, "job_w", status=status, progress=progress)


def test_mixed_source_builder_is_reusable(tmp_path: Path) -> None:
    # Other test modules build their own copy of job_mixed's source; it must pack cleanly.
    result = pack(build_mixed_source(tmp_path / "m"), tmp_path / "s", job_id=JOB_MIXED)
    assert (result.total_images, result.skipped) == (MIXED_TOTAL, ())


# -- what a reader could not take is refused before anything is written ----------------------


def test_a_folder_that_cannot_be_listed_is_reported_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.walk passes over a folder it cannot list (no permission, removed meanwhile)
    unless asked: it is in the skipped list with the reason, never left out in silence."""
    src = tmp_path / "src"
    save_image(make_image("cat", (16, 16)), src / "cat" / "a.png")
    save_image(make_image("dog", (16, 16)), src / "dog" / "b.png")
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path).name == "dog":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = pack(src, tmp_path / "store")
    assert result.labels == ("cat",)
    assert result.skipped == (("dog/", "folder cannot be listed: Permission denied"),)


def test_a_manifest_longer_than_a_reader_takes_is_refused_before_any_write(
    packed: PackedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = packed.sources[JOB_UNIFORM]
    pack(src, tmp_path, job_id="job_m", chunk_size=4)
    before = {p: p.read_bytes() for p in (tmp_path / "job_m").rglob("*") if p.is_file()}
    monkeypatch.setattr(config, "MANIFEST_BASE_BYTES", 100)
    monkeypatch.setattr(config, "MANIFEST_BYTES_PER_MEMBER", 100)
    with pytest.raises(ValueError, match=r"chunk 0's manifest would be [\d,]+ bytes.*smaller"):
        pack(src, tmp_path, job_id="job_m", chunk_size=4)
    after = {p: p.read_bytes() for p in (tmp_path / "job_m").rglob("*") if p.is_file()}
    assert after == before  # the completed job is still there, as it was
    monkeypatch.undo()
    for path in chunk_files(tmp_path, "job_m"):  # and what pack writes, a reader takes
        assert len(ChunkArchive(path.read_bytes(), chunk_id=0)) > 0


def test_names_a_job_json_cannot_hold_are_refused_before_any_write(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_image(make_image("cat", (16, 16)), src / "cat" / "a.png")
    bad = os.fsdecode(b"caf\xe9")  # a command-line argument of Latin-1 bytes
    with pytest.raises(ValueError, match="name 'caf\\\\udce9' is not valid UTF-8"):
        pack(src, tmp_path / "store", name=bad)
    with pytest.raises(ValueError, match="owner 'caf\\\\udce9' is not valid UTF-8"):
        pack(src, tmp_path / "store", owner=bad)
    with pytest.raises(ValueError, match="without surrounding spaces"):
        pack(src, tmp_path / "store", owner="bob ")  # the server reads keys' owners stripped
    with pytest.raises(ValueError, match="labels must be a list"):
        write_job(tmp_path / "store", "job_w", status="running", progress=1, labels="cat")
    assert not (tmp_path / "store").exists()


def test_a_source_folder_named_in_other_bytes_than_utf8_is_packed(tmp_path: Path) -> None:
    src = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9")))
    save_image(make_image("cat", (16, 16)), src / "cat" / "a.png")
    result = pack(src, tmp_path / "store")
    assert read_job(tmp_path / "store", result.job_id)["name"] == "caf\ufffd"


def test_a_stray_file_named_with_other_digits_is_left_in_the_chunks_folder(
    packed: PackedStore, tmp_path: Path
) -> None:
    src = packed.sources[JOB_UNIFORM]
    pack(src, tmp_path, job_id="job_d", chunk_size=4)
    for name in ("².zip", "\u0667.zip"):  # "²".isdigit() is true; int() refuses it
        (tmp_path / "job_d" / "chunks" / name).write_bytes(b"x")
    pack(src, tmp_path, job_id="job_d", chunk_size=4)
    assert read_job(tmp_path, "job_d")["status"] == "completed"
    assert (tmp_path / "job_d" / "chunks" / "².zip").exists()
    assert (tmp_path / "job_d" / "chunks" / "\u0667.zip").exists()
