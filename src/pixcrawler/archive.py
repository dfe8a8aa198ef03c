"""A chunk's zip, opened in memory: manifest, members sliced without copies, guards.

The central directory is read once; a stored member's bytes are a ``memoryview`` slice of
the downloaded buffer, so opening a 500-image chunk costs about a millisecond. Anything
hostile or malformed about the archive itself (paths that escape, symlinks, zip bombs,
too many members, a manifest naming members that are not there) raises
:class:`DecompressionError`; a single bad member's *content* is left to the decoder and
the ``on_error`` policy.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import config
from .exceptions import DecompressionError

MANIFEST = "manifest.json"
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_MAGIC = b"PK\x03\x04"
_S_IFMT = 0o170000
_S_IFLNK = 0o120000
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Member:
    """Where one member's bytes lie in the chunk buffer."""

    name: str
    offset: int
    compress_size: int
    file_size: int
    crc: int
    deflated: bool


@dataclass(frozen=True, slots=True)
class Sample:
    """One image of a chunk as the manifest describes it, with its still-encoded bytes."""

    id: str
    label: str
    path: str
    member: Member
    chunk_id: int | None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


class _BufferReader(io.RawIOBase):
    """A seekable read-only file over a buffer, so zipfile never copies the whole chunk."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        data = bytes(self._view[self._pos : end])
        self._pos += len(data)
        return data


class ChunkArchive:
    """The samples of one chunk, in manifest order, over the chunk's bytes."""

    def __init__(
        self,
        buffer: Buffer,
        *,
        chunk_id: int | None = None,
        max_members: int = config.MAX_MEMBERS,
        max_member_bytes: int = config.MAX_MEMBER_BYTES,
    ) -> None:
        self.chunk_id = chunk_id
        self.buffer = buffer
        self.view = memoryview(buffer).cast("B")
        self.max_member_bytes = max_member_bytes
        self.members = self._read_directory(max_members)
        self.manifest = self._read_manifest()
        self.samples = self._read_samples()
        # Members whose bytes matched their sha256 or CRC: a map-style dataset reads an
        # archive it keeps in memory again every epoch, and need not hash it again.
        self._checked: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def close(self) -> bytearray | None:
        """Release this archive's view of the chunk bytes; return them if reusable.

        None when something still views the bytes (they must not be overwritten then) or
        they are not a bytearray.
        """
        try:
            self.view.release()
        except BufferError:
            return None
        return self.buffer if isinstance(self.buffer, bytearray) else None

    def _error(self, message: str, sample_id: str | None = None) -> DecompressionError:
        where = f"chunk {self.chunk_id}" if self.chunk_id is not None else "chunk"
        return DecompressionError(
            f"{where}: {message}", chunk_id=self.chunk_id, sample_id=sample_id
        )

    def _read_directory(self, max_members: int) -> dict[str, Member]:
        try:
            with zipfile.ZipFile(_BufferReader(self.view)) as zf:
                infos = zf.infolist()
        except UnicodeDecodeError as exc:  # a ValueError too: it must come first
            raise self._error("a member name is not valid UTF-8") from exc
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            OSError,
            ValueError,
            EOFError,
            NotImplementedError,  # "zip file version": an extract version zipfile lacks
        ) as exc:
            raise self._error(f"not a valid zip archive ({exc})") from exc
        if len(infos) > max_members:
            raise self._error(f"{len(infos)} members, more than the limit of {max_members}")
        members: dict[str, Member] = {}
        for info in infos:
            member = self._check_member(info)
            if member.name in members:
                raise self._error(f"member {member.name!r} appears twice")
            members[member.name] = member
        return members

    def _check_member(self, info: zipfile.ZipInfo) -> Member:
        name = info.orig_filename
        if not _safe_name(name):
            raise self._error(f"unsafe member path {name!r}")
        if (info.external_attr >> 16) & _S_IFMT == _S_IFLNK:
            raise self._error(f"member {name!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise self._error(f"member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise self._error(f"member {name!r} uses unsupported compression {info.compress_type}")
        if info.file_size > self.max_member_bytes:
            raise self._error(
                f"member {name!r} declares {info.file_size} bytes, over the limit of "
                f"{self.max_member_bytes}"
            )
        deflated = info.compress_type == zipfile.ZIP_DEFLATED
        if not deflated and info.compress_size != info.file_size:
            raise self._error(f"member {name!r}: stored sizes disagree")
        start = info.header_offset
        header = bytes(self.view[start : start + _LOCAL_HEADER.size])
        if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_MAGIC:
            raise self._error(f"member {name!r}: bad local header")
        fields = _LOCAL_HEADER.unpack(header)
        name_len, extra_len = fields[-2], fields[-1]
        offset = start + _LOCAL_HEADER.size + name_len + extra_len
        if offset + info.compress_size > len(self.view):
            raise self._error(f"member {name!r} runs past the end of the archive (truncated?)")
        return Member(name, offset, info.compress_size, info.file_size, info.CRC, deflated)

    def _read_manifest(self) -> dict[str, Any]:
        member = self.members.get(MANIFEST)
        if member is None:
            raise self._error(f"no {MANIFEST}")
        if member.file_size > config.MAX_MANIFEST_BYTES:
            raise self._error(f"{MANIFEST} is larger than {config.MAX_MANIFEST_BYTES} bytes")
        data = self.read(member)
        # Labels and ids come from here: a changed byte must not pass unnoticed even when
        # the API listed no chunk sha256 (read() checks a deflated manifest itself).
        if not member.deflated and zlib.crc32(data) != member.crc:
            raise self._error(f"{MANIFEST} does not match its CRC (corrupt?)")
        try:
            manifest = json.loads(bytes(data))
        except (ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
            raise self._error(f"{MANIFEST} is not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("images"), list):
            raise self._error(f"{MANIFEST} has no 'images' list")
        return manifest

    def _read_samples(self) -> list[Sample]:
        samples: list[Sample] = []
        seen: set[str] = set()
        for position, entry in enumerate(self.manifest["images"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise self._error(f"manifest entry {position} has no 'path'")
            path = entry["path"]
            member = self.members.get(path)
            if member is None or path == MANIFEST:
                raise self._error(f"manifest names {path!r}, which is not in the archive", path)
            label = entry.get("label")
            if label is None:
                label = path.rpartition("/")[0]
            sample_id = entry.get("id", path)
            if not isinstance(label, str) or not isinstance(sample_id, str):
                raise self._error(f"manifest entry {path!r}: label and id must be strings", path)
            if sample_id in seen:
                raise self._error(f"manifest lists id {sample_id!r} twice", sample_id)
            seen.add(sample_id)
            metadata = entry.get("metadata")
            samples.append(
                Sample(
                    id=sample_id,
                    label=label,
                    path=path,
                    member=member,
                    chunk_id=self.chunk_id,
                    sha256=_opt(entry.get("sha256"), str),
                    width=_opt(entry.get("width"), int),
                    height=_opt(entry.get("height"), int),
                    metadata=metadata if isinstance(metadata, dict) else {},
                )
            )
        return samples

    def read(self, member: Member) -> memoryview | bytes:
        """A member's bytes: a slice of the buffer if stored, inflated (bounded) if deflated."""
        raw = self.view[member.offset : member.offset + member.compress_size]
        if not member.deflated:
            return raw
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(raw, member.file_size + 1)
        except zlib.error as exc:
            raise self._error(f"member {member.name!r} does not inflate ({exc})") from exc
        if len(data) != member.file_size or zlib.crc32(data) != member.crc:
            raise self._error(f"member {member.name!r} inflates to the wrong size or CRC")
        return data

    def payload(self, sample: Sample) -> memoryview | bytes:
        """The sample's encoded image, checked against its sha256 (or the zip CRC)."""
        data = self.read(sample.member)
        if sample.member.offset in self._checked:  # read before, from these same bytes
            return data
        if sample.sha256 is not None:
            if hashlib.sha256(data).hexdigest() != sample.sha256.lower():
                raise self._error(f"{sample.id}: sha256 does not match the manifest", sample.id)
        elif not sample.member.deflated and zlib.crc32(data) != sample.member.crc:
            raise self._error(f"{sample.id}: CRC does not match the zip directory", sample.id)
        self._checked.add(sample.member.offset)
        return data


def _safe_name(name: str) -> bool:
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return False
    if len(name) > 1 and name[1] == ":":
        return False
    return all(part not in ("..", "") for part in name.rstrip("/").split("/"))


def _opt(value: Any, kind: type) -> Any:
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError, OverflowError):  # int(1e999) overflows
        return None
