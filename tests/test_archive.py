"""Hostile and broken chunk archives: each is refused with a DecompressionError that names
the problem, or, where only one sample is bad, handled by the ``on_error`` policy.

Archives are built in-test with :mod:`zipfile` and then edited byte by byte where zipfile
would refuse to write the hostile form (flags, sizes, names in the central directory).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constants import TEST_KEY
from imagegen import make_image
from pixcrawler import config, load_dataset
from pixcrawler.archive import MANIFEST, ChunkArchive
from pixcrawler.decode import ImageDecoder
from pixcrawler.exceptions import DecompressionError, PixCrawlerError

pytestmark = pytest.mark.timeout(60)

_DATE = (2020, 1, 1, 0, 0, 0)
_CENTRAL = b"PK\x01\x02"
_CENTRAL_FIXED = 46  # bytes of a central directory header before the name


# -- building chunks ------------------------------------------------------------------------


def encode(fmt: str, *, index: int = 0, size: tuple[int, int] = (12, 16)) -> bytes:
    """A small real image in ``fmt`` (a Pillow format name)."""
    image = make_image("cat", size, seed=3, index=index)
    if fmt == "GIF":
        image = image.convert("P")
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_chunk(
    images: Sequence[tuple[str, bytes]],
    *,
    entries: list[dict[str, Any]] | None = None,
    extra: Sequence[tuple[zipfile.ZipInfo | str, bytes]] = (),
    compression: int = zipfile.ZIP_STORED,
    manifest: bytes | None = None,
) -> bytes:
    """A chunk as the packer writes it: manifest.json first, then the images.

    ``images`` is (member path, bytes); the manifest lists each with its label (the folder)
    and sha256 unless ``entries`` or raw ``manifest`` bytes are given. ``extra`` members
    are written after the images and not listed.
    """
    if entries is None:
        entries = [
            {"path": path, "label": path.rpartition("/")[0], "id": path, "sha256": sha(data)}
            for path, data in images
        ]
    if manifest is None:
        manifest = json.dumps({"job_id": "job_x", "chunk_index": 0, "images": entries}).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(zipfile.ZipInfo(MANIFEST, _DATE), manifest)
        for path, data in images:
            zf.writestr(zipfile.ZipInfo(path, _DATE), data, compress_type=compression)
        for info, data in extra:
            if isinstance(info, str):
                info = zipfile.ZipInfo(info, _DATE)
            zf.writestr(info, data)
    return out.getvalue()


def standard_images() -> list[tuple[str, bytes]]:
    return [
        ("cat/0.jpg", encode("JPEG")),
        ("cat/1.png", encode("PNG", index=1)),
        ("dog/2.jpg", encode("JPEG", index=2)),
    ]


def patch_central(data: bytes, name: str, **fields: int | bytes) -> bytes:
    """Rewrite fields of ``name``'s central directory header, as a hostile packer could.

    Fields: ``flags``, ``method``, ``crc``, ``compress_size``, ``file_size``,
    ``external_attr``, ``extract_version``; ``name_bytes`` (same length) replaces the
    stored name.
    """
    raw = bytearray(data)
    encoded = name.encode()
    pos = raw.find(_CENTRAL)
    while pos != -1:
        name_len = struct.unpack_from("<H", raw, pos + 28)[0]
        start = pos + _CENTRAL_FIXED
        if bytes(raw[start : start + name_len]) == encoded:
            break
        pos = raw.find(_CENTRAL, pos + 4)
    else:
        raise AssertionError(f"no central directory entry for {name!r}")
    layout = {
        "flags": (8, "<H"),
        "method": (10, "<H"),
        "crc": (16, "<I"),
        "compress_size": (20, "<I"),
        "file_size": (24, "<I"),
        "external_attr": (38, "<I"),
        "extract_version": (6, "<H"),
        "header_offset": (42, "<I"),
    }
    for key, value in fields.items():
        if key == "name_bytes":
            if not isinstance(value, bytes) or len(value) != len(encoded):
                raise AssertionError("a replacement name must be bytes of the same length")
            raw[start : start + len(value)] = value
            continue
        offset, fmt = layout[key]
        struct.pack_into(fmt, raw, pos + offset, value)
    return bytes(raw)


def refused(data: bytes, **kwargs: Any) -> DecompressionError:
    with pytest.raises(DecompressionError) as info:
        ChunkArchive(data, chunk_id=7, **kwargs)
    assert info.value.chunk_id == 7
    assert str(info.value).startswith("chunk 7: ")
    return info.value


# -- the archive as a whole ------------------------------------------------------------------


def test_a_well_formed_chunk_opens_and_every_sample_decodes() -> None:
    images = standard_images()
    archive = ChunkArchive(build_chunk(images), chunk_id=0)
    assert [s.id for s in archive.samples] == [path for path, _ in images]
    decoder = ImageDecoder()
    for sample, (_, data) in zip(archive.samples, images, strict=True):
        assert bytes(archive.payload(sample)) == data
        assert decoder.decode(archive.payload(sample)).shape == (12, 16, 3)


@pytest.mark.parametrize(
    "name",
    [
        "../x.jpg",
        "cat/../../x.jpg",
        "/x.jpg",
        "/etc/passwd",
        "..\\x.jpg",
        "cat\\x.jpg",
        "C:/x.jpg",
        "c:x.jpg",
        "cat//x.jpg",
        "..",
    ],
)
def test_member_paths_that_escape_or_are_ambiguous_are_refused(name: str) -> None:
    data = build_chunk(standard_images(), extra=[(name, b"evil")])
    error = refused(data)
    assert "unsafe member path" in str(error)


def test_a_member_name_with_a_nul_byte_is_refused() -> None:
    # zipfile cuts a name at NUL when writing, so the byte goes in afterwards.
    data = build_chunk(standard_images(), extra=[("cat/x.jpgX.png", b"evil")])
    data = patch_central(data, "cat/x.jpgX.png", name_bytes=b"cat/x.jpg\x00.png")
    assert "unsafe member path" in str(refused(data))


def test_a_manifest_naming_an_unsafe_path_never_reaches_the_file_system(tmp_path: Path) -> None:
    entries = [{"path": "../escaped.jpg", "label": "cat"}]
    data = build_chunk([], entries=entries, extra=[("../escaped.jpg", encode("JPEG"))])
    refused(data)
    assert not (tmp_path.parent / "escaped.jpg").exists()


def test_symlink_members_are_refused() -> None:
    link = zipfile.ZipInfo("cat/link.jpg", _DATE)
    link.create_system = 3  # unix, so the mode bits mean what they say
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    data = build_chunk(standard_images(), extra=[(link, b"/etc/passwd")])
    assert "symbolic link" in str(refused(data))


def test_a_deflated_zip_bomb_is_refused_before_inflating() -> None:
    bomb = b"\0" * (20 << 20)  # 20 MiB of zeros deflate to about 20 KB
    data = build_chunk([("cat/bomb.bmp", bomb)], compression=zipfile.ZIP_DEFLATED)
    assert len(data) < 100_000
    error = refused(data, max_member_bytes=1 << 20)
    assert "declares 20971520 bytes, over the limit of 1048576" in str(error)


def test_members_that_share_bytes_are_refused() -> None:
    """Entries pointing at one local entry: a deflated stream would be inflated once per
    entry, so a few KB could make gigabytes however small each member's limit."""
    jpeg = encode("JPEG")
    data = build_chunk([("cat/0.jpg", jpeg), ("cat/1.jpg", jpeg)])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        first = zf.getinfo("cat/0.jpg").header_offset
    error = refused(patch_central(data, "cat/1.jpg", header_offset=first))
    assert "its local header names another file" in str(error)  # cat/0.jpg's header
    ChunkArchive(data, chunk_id=7)  # the same members, each in its own bytes


def test_a_member_whose_data_runs_over_the_next_header_is_refused() -> None:
    jpeg = encode("JPEG")
    data = build_chunk([("cat/0.jpg", jpeg), ("cat/1.jpg", jpeg)])
    longer = len(jpeg) + 5  # into cat/1.jpg's local header: its first 5 bytes
    error = refused(patch_central(data, "cat/0.jpg", file_size=longer, compress_size=longer))
    assert "members 'cat/0.jpg' and 'cat/1.jpg' overlap" in str(error)


def test_a_declared_size_over_the_default_limit_is_refused() -> None:
    data = build_chunk(standard_images())
    data = patch_central(data, "cat/1.png", file_size=0xFFFF_FFF0, compress_size=0xFFFF_FFF0)
    error = refused(data)
    assert "over the limit of 536870912" in str(error)


def test_a_member_that_lies_about_its_size_inflates_no_further_than_declared() -> None:
    bomb = b"\0" * (50 << 20)
    images = [("cat/bomb.bmp", bomb)]
    data = build_chunk(images, compression=zipfile.ZIP_DEFLATED)
    data = patch_central(data, "cat/bomb.bmp", file_size=1000)
    archive = ChunkArchive(data, chunk_id=3)  # 1000 bytes declared: within every limit
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionError, match="inflates to the wrong size"):
            archive.payload(archive.samples[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # never the 50 MiB the stream holds


@pytest.mark.parametrize("limit", [1, 3])
def test_too_many_members_are_refused(limit: int) -> None:
    data = build_chunk(standard_images())  # manifest + 3 images = 4 members
    error = refused(data, max_members=limit)
    assert f"4 members, more than the limit of {limit}" in str(error)


def test_a_manifest_naming_missing_members_is_refused() -> None:
    images = standard_images()
    entries = [{"path": p, "label": "cat"} for p, _ in images] + [
        {"path": "cat/missing.jpg", "label": "cat"}
    ]
    error = refused(build_chunk(images, entries=entries))
    assert "manifest names 'cat/missing.jpg', which is not in the archive" in str(error)
    assert error.sample_id == "cat/missing.jpg"


def test_a_manifest_naming_itself_is_refused() -> None:
    error = refused(build_chunk([], entries=[{"path": MANIFEST, "label": "x"}]))
    assert "manifest.json" in str(error)


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),  # a RecursionError inside json
        (b"[]", "no 'images' list"),
        (b'{"images": {}}', "no 'images' list"),
        (b'{"images": [42]}', "entry 0 has no 'path'"),
        (b'{"images": [{"label": "x"}]}', "entry 0 has no 'path'"),
        (b'{"images": [{"path": "cat/0.jpg", "label": 5}]}', "must be strings"),
    ],
    ids=[
        "empty",
        "not-json",
        "not-utf8",
        "deeply-nested",
        "a-list",
        "images-not-a-list",
        "entry-not-an-object",
        "entry-without-path",
        "label-not-a-string",
    ],
)
def test_a_malformed_manifest_is_refused(manifest: bytes, problem: str) -> None:
    error = refused(build_chunk(standard_images(), manifest=manifest))
    assert problem in str(error)


def test_a_chunk_without_manifest_is_refused() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("cat/0.jpg", encode("JPEG"))
    assert "no manifest.json" in str(refused(out.getvalue()))


def test_optional_manifest_fields_of_the_wrong_type_are_ignored() -> None:
    (path, data), *_ = standard_images()
    entry = {"path": path, "label": "cat", "width": 1e999, "height": "tall", "metadata": [1]}
    manifest = json.dumps({"images": [entry]}).encode()  # 1e999 is written as Infinity
    archive = ChunkArchive(build_chunk([(path, data)], manifest=manifest))
    sample = archive.samples[0]
    assert (sample.width, sample.height, dict(sample.metadata)) == (None, None, {})
    assert bytes(archive.payload(sample)) == data  # no sha256: the zip CRC is checked


def test_duplicate_ids_are_refused() -> None:
    images = standard_images()
    entries = [{"path": p, "label": "cat", "id": "same"} for p, _ in images]
    error = refused(build_chunk(images, entries=entries))
    assert "lists id 'same' twice" in str(error)


def test_a_manifest_naming_one_member_twice_is_refused() -> None:
    """Under two ids, one deflated member would be inflated once per entry (and checked
    against whichever sha256 came first): a bomb the directory checks cannot see."""
    images = [("cat/bomb.bmp", b"\0" * 4096)]
    entries = [{"path": "cat/bomb.bmp", "label": "cat", "id": f"copy-{i}"} for i in range(3)]
    data = build_chunk(images, entries=entries, compression=zipfile.ZIP_DEFLATED)
    assert "manifest names 'cat/bomb.bmp' twice" in str(refused(data))


def test_a_manifest_larger_than_its_images_can_need_is_refused_before_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A few KB of deflated ``[{}, {}, ...]`` parse into millions of objects: the
    manifest is bounded by the members it can name, before json.loads runs."""
    monkeypatch.setattr(config, "MANIFEST_BASE_BYTES", 1000)
    monkeypatch.setattr(config, "MANIFEST_BYTES_PER_MEMBER", 100)
    images = [("cat/0.jpg", encode("JPEG"))]  # two members: room for 1200 bytes
    padding = [{} for _ in range(400)]
    manifest = json.dumps({"images": [{"path": "cat/0.jpg"}], "padding": padding}).encode()
    error = refused(build_chunk(images, manifest=manifest, compression=zipfile.ZIP_DEFLATED))
    assert f"manifest.json is {len(manifest)} bytes, over the limit of 1200 for 1 images" in str(
        error
    )
    small = json.dumps({"images": [{"path": "cat/0.jpg"}], "padding": padding[:100]}).encode()
    ChunkArchive(build_chunk(images, manifest=small))


def test_duplicate_member_names_are_refused() -> None:
    images = standard_images()
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = build_chunk(images, extra=[("cat/0.jpg", b"another body")])
    assert "member 'cat/0.jpg' appears twice" in str(refused(data))


def test_a_name_flagged_utf8_that_is_not_utf8_is_refused() -> None:
    data = build_chunk(standard_images())
    data = patch_central(data, "cat/0.jpg", flags=0x800, name_bytes=b"cat/\xff.jpg")
    assert "not valid UTF-8" in str(refused(data))


def test_a_non_utf8_name_without_the_flag_is_just_another_name() -> None:
    # cp437 decodes any byte, so such a name is a member the manifest does not list.
    data = build_chunk(standard_images())
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        name_at = zf.getinfo("cat/0.jpg").header_offset + 30
    data = data[:name_at] + b"cat/\xff.jpg" + data[name_at + 9 :]  # the local header's name
    data = patch_central(data, "cat/0.jpg", name_bytes=b"cat/\xff.jpg")  # and the directory's
    assert "not in the archive" in str(refused(data))


def test_a_local_header_naming_another_file_than_the_directory_is_refused() -> None:
    """Other unzip tools (and anyone unpacking a zip export) go by the local header: it
    must name the file the directory names, which the path checks were made on."""
    data = build_chunk(standard_images())
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        name_at = zf.getinfo("cat/0.jpg").header_offset + 30
    data = data[:name_at] + b"../../0.jpg"[:9] + data[name_at + 9 :]
    assert "its local header names another file" in str(refused(data))


@pytest.mark.parametrize("keep", [0, 1, 21, 100, 0.5, -1, -22])
def test_a_truncated_chunk_is_refused(keep: float) -> None:
    data = build_chunk(standard_images())
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    error = refused(data[:cut])
    assert "not a valid zip archive" in str(error)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"PK",
        b"<html><body>503 Service Unavailable</body></html>",
        b'{"error": {"type": "NotFoundError"}}',
        b"PK\x05\x06" + b"\0" * 18,  # an empty zip: no manifest
    ],
    ids=["empty", "magic-only", "html", "json", "empty-zip"],
)
def test_bytes_that_are_not_a_chunk_are_refused(data: bytes) -> None:
    error = refused(data)
    assert "not a valid zip archive" in str(error) or "no manifest.json" in str(error)


def as_zip64(data: bytes, *, saturate: bool = True) -> bytes:
    """The same archive with a ZIP64 end record (as a writer of > 65,535 members makes);
    ``saturate=False`` leaves the classic record's counts as they were (APPNOTE 4.4.1.4
    only says they SHOULD read 0xFFFF)."""
    eocd = data.rfind(b"PK\x05\x06")
    _, _, _, _, count, cd_size, cd_offset, comment = struct.unpack_from("<4s4H2LH", data, eocd)
    record = struct.pack(
        "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_offset
    )
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd, 1)
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, comment
    )
    if not saturate:
        end = data[eocd : eocd + 22]
    return data[:eocd] + record + locator + end + data[eocd + 22 :]


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    archive = ChunkArchive(data)
    return [(s.path, bytes(archive.payload(s))) for s in archive.samples]


def test_a_zip64_end_record_and_a_comment_are_read() -> None:
    data = build_chunk(standard_images())
    expected = members_of(data)
    assert members_of(as_zip64(data)) == expected
    out = io.BytesIO(data)
    with zipfile.ZipFile(out, "a") as zf:
        zf.comment = b"x" * 1000  # the end record is no longer the last 22 bytes
    assert members_of(out.getvalue()) == expected
    assert members_of(as_zip64(out.getvalue())) == expected
    assert members_of(as_zip64(data, saturate=False)) == expected  # as zipfile reads it


def test_a_comment_that_ends_like_a_zip64_locator_does_not_refuse_a_plain_archive() -> None:
    """The 20 bytes before the end record are the directory's last bytes: they may look
    like a locator. With the classic counts not saturated, they are the counts."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"images": [{"path": "cat/0.png", "label": "c"}]}))
        info = zipfile.ZipInfo("cat/0.png")
        info.comment = b"PK\x06\x07" + bytes(16)  # a member's comment may hold any bytes
        zf.writestr(info, encode("PNG"))
    assert [s.path for s in ChunkArchive(out.getvalue()).samples] == ["cat/0.png"]


def test_exactly_65535_members_without_a_zip64_record_are_read() -> None:
    """zipfile writes 65,535 members (pack's chunk of 65,534 images) with the count field
    at 0xFFFF and no ZIP64 record: the count is the count."""
    paths = [f"cat/{i}.png" for i in range(65_534)]
    manifest = {"images": [{"path": path, "label": "cat"} for path in paths]}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for path in paths:
            zf.writestr(path, b"x")
    data = out.getvalue()
    assert b"PK\x06\x06" not in data  # no ZIP64 record, and the count field saturated
    assert struct.unpack_from("<H", data, data.rfind(b"PK\x05\x06") + 10) == (0xFFFF,)
    assert len(ChunkArchive(data)) == 65_534


def test_zip64_member_sizes_are_read_from_the_extra_field() -> None:
    images = standard_images()
    data = build_chunk(images)
    name = "dog/2.jpg"
    # Rewrite dog/2.jpg's central entry: sizes and offset say 0xFFFFFFFF, a ZIP64 extra field
    # holds them (APPNOTE 4.5.3), and the directory grows by the field's 28 bytes.
    pos = data.find(b"PK\x01\x02")
    while True:
        fields = struct.unpack_from("<4s4B4HL2L5H2L", data, pos)
        name_len, extra_len, comment_len = fields[12:15]
        if data[pos + 46 : pos + 46 + name_len] == name.encode():
            break
        pos += 46 + name_len + extra_len + comment_len
    entry_end = pos + 46 + name_len + extra_len + comment_len
    values = list(fields)
    size, csize, offset = values[11], values[10], values[18]
    values[10] = values[11] = values[18] = 0xFFFFFFFF
    values[13] = extra_len + 28
    extra = struct.pack("<2H3Q", 1, 24, size, csize, offset)
    entry = (
        struct.pack("<4s4B4HL2L5H2L", *values)
        + data[pos + 46 : pos + 46 + name_len + extra_len]
        + extra
        + data[pos + 46 + name_len + extra_len : entry_end]
    )
    eocd = data.rfind(b"PK\x05\x06")
    end = bytearray(data[eocd:])
    (cd_size,) = struct.unpack_from("<L", end, 12)
    struct.pack_into("<L", end, 12, cd_size + 28)
    patched = data[:pos] + entry + data[entry_end:eocd] + bytes(end)
    assert members_of(patched) == members_of(data)
    broken = patched.replace(extra, struct.pack("<2H3Q", 2, 24, size, csize, offset))
    assert "ZIP64" in str(refused(broken))


def test_bytes_before_the_archive_are_refused() -> None:
    # zipfile would shift every offset to read a self-extracting archive; a chunk is just a zip.
    assert "not a valid zip archive" in str(
        refused(b"#!/bin/sh\n" + build_chunk(standard_images()))
    )


def test_an_end_record_claiming_more_directory_than_its_entries_fill_is_refused() -> None:
    # One entry, and a "directory" spanning the whole 300 KB archive: refused before it is
    # read (the directory is copied once to be parsed; this one would copy the chunk).
    data = build_chunk(standard_images(), extra=[("pad.bin", os.urandom(300_000))])
    eocd = data.rfind(b"PK\x05\x06")
    end = bytearray(data[eocd:])
    struct.pack_into("<2H2L", end, 8, 1, 1, eocd, 0)  # entries, total, size, offset
    assert "holds more than its end record counts" in str(refused(data[:eocd] + bytes(end)))


def test_a_png_is_not_a_chunk() -> None:
    assert "not a valid zip archive" in str(refused(encode("PNG")))


def test_a_member_past_the_end_of_the_buffer_is_refused() -> None:
    data = build_chunk(standard_images())
    data = patch_central(data, "dog/2.jpg", file_size=10**6, compress_size=10**6)
    assert "runs past the end" in str(refused(data))


def test_a_stored_member_whose_sizes_disagree_is_refused() -> None:
    data = patch_central(build_chunk(standard_images()), "cat/0.jpg", compress_size=10)
    assert "stored sizes disagree" in str(refused(data))


def test_a_zip_version_zipfile_cannot_read_is_refused() -> None:
    data = patch_central(build_chunk(standard_images()), "cat/0.jpg", extract_version=0xFF)
    assert "not a valid zip archive (zip file version 25.5)" in str(refused(data))


def test_encrypted_members_are_refused() -> None:
    data = patch_central(build_chunk(standard_images()), "cat/1.png", flags=0x1)
    assert "member 'cat/1.png' is encrypted" in str(refused(data))


@pytest.mark.parametrize(
    ("compression", "method"), [(zipfile.ZIP_BZIP2, 12), (zipfile.ZIP_LZMA, 14)]
)
def test_unsupported_compression_is_refused(compression: int, method: int) -> None:
    data = build_chunk(standard_images(), compression=compression)
    assert f"unsupported compression {method}" in str(refused(data))


def test_an_unknown_compression_method_is_refused() -> None:
    data = patch_central(build_chunk(standard_images()), "cat/0.jpg", method=99)
    assert "unsupported compression 99" in str(refused(data))


# -- one bad sample: the archive opens, that sample's payload is refused --------------------


def bmp_chunk() -> tuple[bytes, bytes]:
    bmp = encode("BMP", size=(24, 24))
    return build_chunk([("cat/0.bmp", bmp)], compression=zipfile.ZIP_DEFLATED), bmp


def test_a_deflated_member_that_does_not_inflate_is_a_sample_error() -> None:
    data, _ = bmp_chunk()
    raw = bytearray(data)
    start = ChunkArchive(data).members["cat/0.bmp"].offset
    raw[start + 5 : start + 40] = b"\xff" * 35  # garbage in the deflate stream
    archive = ChunkArchive(bytes(raw), chunk_id=1)
    with pytest.raises(DecompressionError, match="inflate"):
        archive.payload(archive.samples[0])


def test_a_deflated_member_with_a_wrong_crc_is_a_sample_error() -> None:
    data, bmp = bmp_chunk()
    data = patch_central(data, "cat/0.bmp", crc=zlib.crc32(bmp) ^ 1)
    archive = ChunkArchive(data)
    with pytest.raises(DecompressionError, match="wrong size or CRC"):
        archive.payload(archive.samples[0])


def test_a_sha256_that_disagrees_with_the_bytes_is_a_sample_error() -> None:
    images = standard_images()
    entries = [
        {"path": p, "label": "cat", "id": p, "sha256": sha(d) if i != 1 else "0" * 64}
        for i, (p, d) in enumerate(images)
    ]
    archive = ChunkArchive(build_chunk(images, entries=entries), chunk_id=2)
    archive.payload(archive.samples[0])
    with pytest.raises(DecompressionError, match="sha256 does not match") as info:
        archive.payload(archive.samples[1])
    assert (info.value.chunk_id, info.value.sample_id) == (2, "cat/1.png")


def test_a_decoded_image_is_returned_only_once_its_bytes_match_their_sha256() -> None:
    """``decoded`` decodes first and checks after: a mismatch discards the decoded image,
    and bytes that neither decode nor match raise the mismatch, which says more."""
    images = standard_images()
    entries = [
        {"path": p, "label": "cat", "id": p, "sha256": sha(d) if i != 1 else "0" * 64}
        for i, (p, d) in enumerate(images)
    ]
    archive = ChunkArchive(build_chunk(images, entries=entries), chunk_id=2)
    good, bad = archive.samples[0], archive.samples[1]
    seen: list[bytes] = []

    def decode(data: bytes | bytearray | memoryview) -> str:
        seen.append(bytes(data))
        return "pixels"

    def fails(data: bytes | bytearray | memoryview) -> str:
        raise DecompressionError("cannot decode image: broken")

    assert archive.decoded(good, decode) == "pixels"
    with pytest.raises(DecompressionError, match="sha256 does not match") as info:
        archive.decoded(bad, decode)
    assert (info.value.chunk_id, info.value.sample_id) == (2, "cat/1.png")
    assert seen == [images[0][1], images[1][1]]  # the bad one was decoded, then refused
    with pytest.raises(DecompressionError, match="sha256 does not match"):
        archive.decoded(bad, fails)
    with pytest.raises(DecompressionError, match="broken"):
        archive.decoded(good, fails)


def test_a_stored_member_altered_under_its_crc_is_a_sample_error() -> None:
    images = standard_images()
    entries = [{"path": p, "label": "cat"} for p, _ in images]  # no sha256: CRC only
    data = bytearray(build_chunk(images, entries=entries))
    first = images[0][1]
    at = bytes(data).find(first)
    data[at + len(first) // 2] ^= 0x55
    archive = ChunkArchive(bytes(data))
    with pytest.raises(DecompressionError, match="CRC does not match"):
        archive.payload(archive.samples[0])


# -- served by a real server: the sample policy ---------------------------------------------


def write_crafted_job(store: Path, job_id: str, chunks: Sequence[bytes]) -> None:
    """A completed job of owner ``default`` in ``store``, in the packer's job.json format."""
    chunk_dir = store / job_id / "chunks"
    chunk_dir.mkdir(parents=True)
    entries = []
    for index, data in enumerate(chunks):
        (chunk_dir / f"{index:05d}.zip").write_bytes(data)
        count = len(json.loads(_manifest_of(data))["images"])
        entries.append(
            {
                "index": index,
                "size_bytes": len(data),
                "sha256": sha(data),
                "image_count": count,
                "expires_at": None,
            }
        )
    job = {
        "id": job_id,
        "name": job_id,
        "status": "completed",
        "progress": 100,
        "created_at": "2025-01-01T00:00:00Z",
        "completed_at": "2025-01-01T00:01:00Z",
        "total_images": sum(e["image_count"] for e in entries),
        "chunk_size": max(e["image_count"] for e in entries),
        "size_bytes": sum(len(c) for c in chunks),
        "labels": ["cat", "dog"],
        "version": 1,
        "image_size": None,
        "chunks": entries,
        "owner": "default",
    }
    (store / job_id / "job.json").write_text(json.dumps(job))


def _manifest_of(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.read(MANIFEST)


@pytest.fixture
def crafted(tmp_path: Path, server_factory: Callable[..., str]) -> str:
    """A server over a job of two chunks; chunk 1 holds one image whose sha256 is wrong."""
    good = build_chunk(standard_images())
    images = [("cat/3.jpg", encode("JPEG", index=3)), ("dog/4.png", encode("PNG", index=4))]
    entries = [{"path": p, "label": p.split("/")[0], "id": p, "sha256": sha(d)} for p, d in images]
    entries[0]["sha256"] = sha(b"something else")
    write_crafted_job(tmp_path, "job_crafted", [good, build_chunk(images, entries=entries)])
    return server_factory(tmp_path)


def test_a_bad_sample_is_skipped_and_reported_with_on_error_skip(crafted: str) -> None:
    dataset = load_dataset("job_crafted", TEST_KEY, crafted, on_error="skip")
    ids = [sample.id for sample, _ in dataset.iter_samples()]
    assert ids == ["cat/0.jpg", "cat/1.png", "dog/2.jpg", "dog/4.png"]
    assert dataset.stats.skipped == 1 and dataset.stats.skipped_ids == ["cat/3.jpg"]
    # Every pass counts its skips; the list names each image once (not once per epoch).
    assert len(list(dataset)) == 4
    assert dataset.stats.skipped == 2 and dataset.stats.skipped_ids == ["cat/3.jpg"]


def test_a_bad_sample_warns_with_on_error_warn(crafted: str) -> None:
    dataset = load_dataset("job_crafted", TEST_KEY, crafted, on_error="warn")
    with pytest.warns(RuntimeWarning, match=r"cat/3\.jpg.*sha256") as record:
        assert len(list(dataset)) == 4
    assert dataset.stats.skipped_ids == ["cat/3.jpg"]
    assert [w.filename for w in record] == [__file__]  # the user's line, not the SDK's
    sized = load_dataset("job_crafted", TEST_KEY, crafted, on_error="warn", image_size=(8, 8))
    with pytest.warns(RuntimeWarning) as record:
        assert len(sized.to_arrays()[0]) == 4
    assert [w.filename for w in record] == [__file__]


def test_a_bad_sample_raises_by_default_naming_chunk_and_image(crafted: str) -> None:
    dataset = load_dataset("job_crafted", TEST_KEY, crafted)
    seen = []
    with pytest.raises(DecompressionError, match="sha256 does not match") as info:
        for _image, label in dataset:
            seen.append(label)
    assert (info.value.chunk_id, info.value.sample_id) == (1, "cat/3.jpg")
    assert len(seen) == 3  # every image before the bad one was yielded, none after


def test_a_hostile_archive_stops_iteration_whatever_on_error_says(
    tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    hostile = build_chunk(standard_images(), extra=[("../../evil.jpg", b"x")])
    write_crafted_job(tmp_path, "job_hostile", [build_chunk(standard_images()), hostile])
    base_url = server_factory(tmp_path)
    dataset = load_dataset("job_hostile", TEST_KEY, base_url, on_error="skip")
    with pytest.raises(DecompressionError, match="unsafe member path") as info:
        list(dataset)
    assert info.value.chunk_id == 1


# -- property-based: nothing but a PixCrawlerError ever escapes ------------------------------


def open_and_decode_everything(data: bytes) -> int:
    """What a consumer does with a chunk; returns how many samples decoded."""
    decoded = 0
    try:
        archive = ChunkArchive(data, chunk_id=0)
    except PixCrawlerError:
        return 0
    decoder = ImageDecoder()
    for sample in archive.samples:
        try:
            decoder.decode(archive.payload(sample))
            decoded += 1
        except PixCrawlerError:
            pass
    return decoded


def fuzz_base() -> bytes:
    """A valid chunk of every member kind: stored JPEG/PNG/GIF, a deflated BMP."""
    images = [*standard_images(), ("dog/3.gif", encode("GIF", index=3))]
    out = io.BytesIO(build_chunk(images))
    with zipfile.ZipFile(out, "a") as zf:
        zf.writestr(zipfile.ZipInfo("dog/4.bmp", _DATE), encode("BMP", index=4), 8)
    return out.getvalue()


FUZZ_BASE = fuzz_base()
FUZZ_SETTINGS = settings(
    # More with PIXCRAWLER_FUZZ_EXAMPLES=5000 for a longer hunt.
    max_examples=int(os.environ.get("PIXCRAWLER_FUZZ_EXAMPLES", 300)),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_the_fuzz_base_chunk_is_valid() -> None:
    assert open_and_decode_everything(FUZZ_BASE) == 4  # the BMP is not in the manifest


@FUZZ_SETTINGS
@given(st.binary(max_size=2048))
def test_any_byte_string_opens_or_raises_a_pixcrawler_error(data: bytes) -> None:
    open_and_decode_everything(data)


@FUZZ_SETTINGS
@given(st.binary(max_size=512))
def test_any_bytes_after_a_zip_magic_open_or_raise_a_pixcrawler_error(tail: bytes) -> None:
    open_and_decode_everything(b"PK\x03\x04" + tail)
    open_and_decode_everything(tail + b"PK\x05\x06" + bytes(18))


_Mutation = tuple[str, int, int, bytes]

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate", "overwrite"]),
        st.integers(0, len(FUZZ_BASE) - 1),
        st.integers(1, 64),
        st.binary(min_size=1, max_size=16),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, ops: list[_Mutation]) -> bytes:
    out = bytearray(data)
    for kind, pos, length, blob in ops:
        pos = pos % max(1, len(out))
        if kind == "flip" and out:
            out[pos] ^= 1 << (length % 8)
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = blob
        elif kind == "delete":
            del out[pos : pos + length]
        elif kind == "duplicate":
            out[pos:pos] = out[pos : pos + length]
        elif kind == "overwrite":
            out[pos : pos + len(blob)] = blob
    return bytes(out)


@FUZZ_SETTINGS
@given(mutations)
def test_mutated_chunks_open_or_raise_a_pixcrawler_error(ops: list[_Mutation]) -> None:
    open_and_decode_everything(mutate(FUZZ_BASE, ops))


@FUZZ_SETTINGS
@given(st.integers(0, len(FUZZ_BASE) - 1), st.integers(0, 255))
def test_every_single_byte_change_is_caught_or_harmless(pos: int, value: int) -> None:
    data = bytearray(FUZZ_BASE)
    data[pos] = value
    try:
        archive = ChunkArchive(bytes(data))
    except DecompressionError:
        return
    decoder = ImageDecoder()
    clean = ChunkArchive(FUZZ_BASE)
    packed = {s.path: s for s in clean.samples}
    # The manifest is CRC-checked: one changed byte never renames or relabels a sample.
    assert [(s.path, s.id, s.label) for s in archive.samples] == [
        (s.path, s.id, s.label) for s in clean.samples
    ]
    for sample in archive.samples:
        try:
            payload = bytes(archive.payload(sample))
        except DecompressionError:
            continue
        # A payload that passed its sha256 is exactly the packed image: no silent change.
        assert payload == bytes(clean.payload(packed[sample.path]))
        decoder.decode(payload)


def test_an_image_is_hashed_once_per_archive_and_a_bad_one_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = standard_images()
    entries = [{"path": p, "label": p.split("/")[0], "id": p, "sha256": sha(d)} for p, d in images]
    entries[1]["sha256"] = sha(b"something else")
    archive = ChunkArchive(build_chunk(images, entries=entries))
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(
        "pixcrawler.archive.hashlib.sha256", lambda data: calls.append(1) or real(data)
    )
    good, bad = archive.samples[0], archive.samples[1]
    for _ in range(3):  # a map-style dataset reads the archive it keeps again every epoch
        assert bytes(archive.payload(good)) == images[0][1]
        with pytest.raises(DecompressionError, match="sha256 does not match"):
            archive.payload(bad)
    assert len(calls) == 1 + 3


@pytest.mark.timeout(60)
def test_empty_chunks_between_full_ones_neither_stall_nor_lose_images(
    tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """A chunk with no images is handed back to the downloader at once, and the window that
    counts the chunks being decoded moves on past it."""
    empty = build_chunk([], entries=[])
    write_crafted_job(
        tmp_path,
        "job_gaps",
        [empty, build_chunk(standard_images()), empty, empty, build_chunk(standard_images())],
    )
    base_url = server_factory(tmp_path)
    for prefetch in (1, 2):
        dataset = load_dataset("job_gaps", TEST_KEY, base_url, prefetch=prefetch)
        labels = [label for _image, label in dataset]
        assert labels == ["cat", "cat", "dog"] * 2
        assert dataset.stats.chunks == 5
