"""A chunk's zip, opened in memory: manifest, members sliced without copies, guards.

The central directory is read once; a stored member's bytes are a ``memoryview`` slice of
the downloaded buffer, so opening a 500-image chunk costs a few milliseconds. Anything
hostile or malformed about the archive itself (paths that escape, symlinks, zip bombs,
too many members, a manifest naming members that are not there) raises
:class:`DecompressionError`; a single bad member's *content* is left to the decoder and
the ``on_error`` policy.
"""

from __future__ import annotations

# Member names not flagged UTF-8 are decoded with cp437: imported now, not on first use
# (see decode.import_decoders).
import encodings.cp437  # noqa: F401
import hashlib
import json
import struct
import zlib
from collections.abc import Callable, Mapping
from operator import itemgetter
from typing import Any, NamedTuple, TypeVar

from . import config
from .exceptions import DecompressionError

MANIFEST = "manifest.json"
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_MAGIC = b"PK\x03\x04"
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_CENTRAL_MAGIC = b"PK\x01\x02"
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_MAGIC = b"PK\x05\x06"
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64_LOCATOR_MAGIC = b"PK\x06\x07"
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_EOCD64_MAGIC = b"PK\x06\x06"
_MAX_EXTRACT_VERSION = 63  # what Python's zipfile reads
_UTF8_FLAG = 0x800
_STORED, _DEFLATED = 0, 8
_S_IFMT = 0o170000
_S_IFLNK = 0o120000
Buffer = bytes | bytearray | memoryview
T = TypeVar("T")


def manifest_limit(members: int) -> int:
    """The most bytes a reader takes for the manifest of a chunk of ``members`` members
    (the manifest one of them), read from ``config`` when called."""
    return min(
        config.MAX_MANIFEST_BYTES,
        config.MANIFEST_BASE_BYTES + config.MANIFEST_BYTES_PER_MEMBER * members,
    )


class Member(NamedTuple):
    """Where one member's bytes lie in the chunk buffer.

    Named tuples, this and :class:`Sample`: a chunk opens with ~500 of each, built while
    its opener holds the GIL and the decode threads wait for it, and a tuple builds in a
    fifth of a frozen dataclass's time.
    """

    name: str
    offset: int
    compress_size: int
    file_size: int
    crc: int
    deflated: bool


class Sample(NamedTuple):
    """One image of a chunk as the manifest describes it, with its still-encoded bytes."""

    id: str
    label: str
    path: str
    member: Member
    chunk_id: int | None
    sha256: str | None
    width: int | None
    height: int | None
    metadata: Mapping[str, Any]


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

        None when the view itself is still exported or the bytes are not a bytearray. A
        member's slice may outlive the view: whoever reuses the bytearray must check that
        nothing views it any more (``BufferPool`` does).
        """
        try:
            self.view.release()
        except BufferError:
            return None
        # Held no longer here: an error's traceback may keep this archive (a frame's local)
        # for as long as its caller keeps the error.
        buffer, self.buffer = self.buffer, b""
        return buffer if isinstance(buffer, bytearray) else None

    def _error(self, message: str, sample_id: str | None = None) -> DecompressionError:
        where = f"chunk {self.chunk_id}" if self.chunk_id is not None else "chunk"
        return DecompressionError(
            f"{where}: {message}", chunk_id=self.chunk_id, sample_id=sample_id
        )

    def _read_directory(self, max_members: int) -> dict[str, Member]:
        problem = None
        try:
            entries = _central_directory(self.view, max_members)
        except _TooMany as exc:
            problem = f"{exc.count} members, more than the limit of {max_members}"
        except UnicodeDecodeError as exc:
            raise self._error("a member name is not valid UTF-8") from exc
        except _BadZip as exc:
            problem = f"not a valid zip archive ({exc})"
        if problem is not None:  # raised out here: what was caught would be its context,
            raise self._error(problem)  # its frames keeping the chunk's bytes
        members: dict[str, Member] = {}
        headers: list[tuple[int, Member]] = []  # where each member's local header starts
        for entry in entries:
            member = self._check_member(entry)
            if member.name in members:
                raise self._error(f"member {member.name!r} appears twice")
            members[member.name] = member
            headers.append((entry[7], member))
        # No two members may share bytes, headers included: entries pointing at one
        # deflated stream would inflate it again for each (a bomb the per-member limit
        # alone does not bound), and a member's data must end before the next one begins.
        previous: Member | None = None
        for start, member in sorted(headers, key=itemgetter(0)):
            if previous is not None and previous.offset + previous.compress_size > start:
                raise self._error(f"members {previous.name!r} and {member.name!r} overlap")
            previous = member
        return members

    def _check_member(self, entry: _Entry) -> Member:
        name, flags, method, crc, compress_size, file_size, external_attr, start = entry
        if not _safe_name(name):
            raise self._error(f"unsafe member path {name!r}")
        if (external_attr >> 16) & _S_IFMT == _S_IFLNK:
            raise self._error(f"member {name!r} is a symbolic link")
        if flags & 0x1:
            raise self._error(f"member {name!r} is encrypted")
        if method not in (_STORED, _DEFLATED):
            raise self._error(f"member {name!r} uses unsupported compression {method}")
        if file_size > self.max_member_bytes:
            raise self._error(
                f"member {name!r} declares {file_size} bytes, over the limit of "
                f"{self.max_member_bytes}"
            )
        deflated = method == _DEFLATED
        if not deflated and compress_size != file_size:
            raise self._error(f"member {name!r}: stored sizes disagree")
        if start + _LOCAL_HEADER.size > len(self.view):
            raise self._error(f"member {name!r}: bad local header")
        fields = _LOCAL_HEADER.unpack_from(self.view, start)
        if fields[0] != _LOCAL_MAGIC:
            raise self._error(f"member {name!r}: bad local header")
        name_len, extra_len = fields[-2], fields[-1]
        name_at = start + _LOCAL_HEADER.size
        # The name a reader of local headers sees (another unzip tool, a zip export) must be
        # the one checked above: zipfile refuses the two differing, and so does this.
        if self.view[name_at : name_at + name_len] != name.encode(
            "utf-8" if flags & _UTF8_FLAG else "cp437"
        ):
            raise self._error(f"member {name!r}: its local header names another file")
        offset = name_at + name_len + extra_len
        if offset + compress_size > len(self.view):
            raise self._error(f"member {name!r} runs past the end of the archive (truncated?)")
        return Member(name, offset, compress_size, file_size, crc, deflated)

    def _read_manifest(self) -> dict[str, Any]:
        member = self.members.get(MANIFEST)
        if member is None:
            raise self._error(f"no {MANIFEST}")
        # Bounded by the members it can name: a small deflated manifest can hold millions
        # of tiny JSON values, each a Python object once parsed (~700x its bytes).
        limit = manifest_limit(len(self.members))
        if member.file_size > limit:
            raise self._error(
                f"{MANIFEST} is {member.file_size} bytes, over the limit of {limit} for "
                f"{len(self.members) - 1} images"
            )
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
        paths: set[str] = set()
        for position, entry in enumerate(self.manifest["images"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise self._error(f"manifest entry {position} has no 'path'")
            path = entry["path"]
            member = self.members.get(path)
            if member is None or path == MANIFEST:
                raise self._error(f"manifest names {path!r}, which is not in the archive", path)
            if path in paths:  # one member read as many images: inflated again for each
                raise self._error(f"manifest names {path!r} twice", path)
            paths.add(path)
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
                    sample_id,
                    label,
                    path,
                    member,
                    self.chunk_id,
                    _opt(entry.get("sha256"), str),
                    _opt(entry.get("width"), int),
                    _opt(entry.get("height"), int),
                    metadata if isinstance(metadata, dict) else {},
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
        self._check(sample, data)
        return data

    def decoded(self, sample: Sample, decode: Callable[[Buffer], T]) -> T:
        """``decode(bytes)`` of the sample's image, returned only once the bytes have been
        checked as :meth:`payload` checks them.

        The check runs after the decode, over bytes the decoder has just read into the
        CPU's cache. Hashing each image first, from a chunk long out of cache, took ~2% more
        of the decode threads' CPU and ~2% of streaming throughput (benchmarks/stream.py's
        images, interleaved runs). Bytes that do not match are decoded, then refused: the
        decoders take any bytes safely (a corrupt image is an everyday input to them), and
        a chunk whose sha256 the API lists was checked whole before any member is read.
        Bytes that fail to decode and do not match their sha256 raise the mismatch: it says
        more.
        """
        data = self.read(sample.member)
        try:
            result = decode(data)
        except DecompressionError:
            self._check(sample, data)
            raise
        self._check(sample, data)
        return result

    def _check(self, sample: Sample, data: Buffer) -> None:
        if sample.member.offset in self._checked:  # read before, from these same bytes
            return
        if sample.sha256 is not None:
            if hashlib.sha256(data).hexdigest() != sample.sha256.lower():
                raise self._error(f"{sample.id}: sha256 does not match the manifest", sample.id)
        elif not sample.member.deflated and zlib.crc32(data) != sample.member.crc:
            raise self._error(f"{sample.id}: CRC does not match the zip directory", sample.id)
        self._checked.add(sample.member.offset)


class _BadZip(Exception):
    """The bytes are not a zip archive this module reads; the text says why."""


class _TooMany(Exception):
    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


# What the central directory says of one member: (name, flags, method, crc, compress_size,
# file_size, external_attr, header_offset). A tuple: a chunk has hundreds of them.
_Entry = tuple[str, int, int, int, int, int, int, int]


def _central_directory(view: memoryview, max_members: int) -> list[_Entry]:
    """Every entry of the zip's central directory, read straight from the buffer.

    The zip format as APPNOTE 6.3 and Python's ``zipfile`` read it (ZIP64 included), with
    nothing prepended to the archive and one disk. ``zipfile`` builds a ``ZipInfo`` per
    member through a file object, at several times the cost; that time holds the GIL, and
    a chunk opens while the decode threads work on the previous one.
    """
    size = len(view)
    tail_start = max(0, size - _EOCD.size - 0xFFFF)  # the EOCD, then a comment <= 64 KiB
    tail = bytes(view[tail_start:])
    at = tail.rfind(_EOCD_MAGIC)
    if at < 0 or len(tail) - at < _EOCD.size:
        raise _BadZip("File is not a zip file")
    eocd_at = tail_start + at
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    directory_end = eocd_at
    # As zipfile reads it: a ZIP64 record found through a locator right before the end
    # record decides, whatever the classic fields say (writers need not saturate them);
    # without one they are the counts (zipfile writes exactly 65,535 members as 0xFFFF and
    # no ZIP64 record), also where bytes that only look like a locator end the directory.
    saturated = count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF
    locator_at = eocd_at - _EOCD64_LOCATOR.size
    if locator_at >= 0 and view[locator_at : locator_at + 4] == _EOCD64_LOCATOR_MAGIC:
        _, _, record_at, _ = _EOCD64_LOCATOR.unpack_from(view, locator_at)
        fields = None
        if record_at + _EOCD64.size <= locator_at:
            fields = _EOCD64.unpack_from(view, record_at)
        if fields is not None and fields[0] == _EOCD64_MAGIC:
            disk, cd_disk, _, count, cd_size, cd_offset = fields[4:10]
            directory_end = record_at
        elif saturated:
            raise _BadZip("ZIP64 end of central directory record is missing or corrupt")
    if disk or cd_disk:
        raise _BadZip("archives spanning several disks are not supported")
    if cd_offset + cd_size != directory_end:
        raise _BadZip("the central directory is not where the end record says")
    if count > max_members:
        raise _TooMany(count)
    if cd_size > count * (_CENTRAL.size + 3 * 0xFFFF):  # past what `count` entries can fill
        raise _BadZip("the central directory holds more than its end record counts")
    entries: list[_Entry] = []
    # One copy of the directory (tens of KB): slicing and unpacking bytes is cheaper than
    # going through the memoryview for every field and name.
    directory = bytes(view[cd_offset:directory_end])
    pos, end = 0, len(directory)
    unpack = _CENTRAL.unpack_from
    for _ in range(count):
        if pos + _CENTRAL.size > end:
            raise _BadZip("truncated central directory")
        (
            magic, _, _, extract_version, _, flags, method, _, _, crc,
            compress_size, file_size, name_len, extra_len, comment_len, _, _,
            external_attr, header_offset,
        ) = unpack(directory, pos)  # fmt: skip
        if magic != _CENTRAL_MAGIC:
            raise _BadZip("bad magic number for central directory")
        if extract_version > _MAX_EXTRACT_VERSION:
            raise _BadZip(f"zip file version {extract_version / 10:.1f}")
        name_at = pos + _CENTRAL.size
        pos = name_at + name_len + extra_len + comment_len
        if pos > end:
            raise _BadZip("truncated central directory")
        raw = directory[name_at : name_at + name_len]
        name = raw.decode("utf-8") if flags & _UTF8_FLAG else raw.decode("cp437")
        if 0xFFFFFFFF in (compress_size, file_size, header_offset):
            extra = directory[name_at + name_len : name_at + name_len + extra_len]
            file_size, compress_size, header_offset = _zip64_values(
                extra, file_size, compress_size, header_offset
            )
        entries.append(
            (name, flags, method, crc, compress_size, file_size, external_attr, header_offset)
        )
    if pos != end:
        raise _BadZip("the central directory holds more than its end record counts")
    return entries


def _zip64_values(
    extra: bytes, file_size: int, compress_size: int, header_offset: int
) -> tuple[int, int, int]:
    """The 64-bit sizes and offset of a ZIP64 extra field, for the fields that say 0xFFFFFFFF
    (in this order, as APPNOTE 4.5.3 lists them)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if len(body) < length:
            break
        if tag == 0x0001:
            values = [file_size, compress_size, header_offset]
            read = 0
            for i, value in enumerate(values):
                if value == 0xFFFFFFFF:
                    if read + 8 > length:
                        raise _BadZip("corrupt ZIP64 extra field")
                    (values[i],) = struct.unpack_from("<Q", body, read)
                    read += 8
            return values[0], values[1], values[2]
        pos += 4 + length
    raise _BadZip("a member says ZIP64 and has no ZIP64 extra field")


def _safe_name(name: str) -> bool:
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return False
    if len(name) > 1 and name[1] == ":":
        return False
    parts = name.rstrip("/").split("/")
    return ".." not in parts and "" not in parts


def _opt(value: Any, kind: type) -> Any:
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError, OverflowError):  # int(1e999) overflows
        return None
