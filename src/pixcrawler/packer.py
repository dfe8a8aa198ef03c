"""Turn a folder of labelled images into a job in a server store (``pixcrawler pack``).

The input is the layout PixCrawler's crawler writes, one sub-folder per label::

    <src>/cat/0001.jpg
    <src>/animals/dog/0002.png      # nested folders give the label "animals/dog"

The output is ``<store>/<job_id>/chunks/00000.zip ...`` plus ``<store>/<job_id>/job.json``
(see "Store on disk" in the design). Packing is deterministic: the same input gives the
same chunk bytes and the same checksums, so re-packing never invalidates a client's cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from . import config
from .archive import _safe_name, manifest_limit
from .cache import _file_digest, _identity, folder_lock
from .config import DEFAULT_CHUNK_SIZE, DEFAULT_OWNER, IMAGE_EXTENSIONS, JOB_ID_PATTERN
from .decode import check_opened, unsupported_mode
from .exceptions import DecompressionError
from .models import JOB_STATUSES, count_or_none

__all__ = ["PackResult", "pack", "write_job"]

# Fixed zip metadata: the same input must give the same bytes on any day, and on any
# machine whose zlib deflates as this one's (zlib-ng's output differs: the manifest and
# BMP/TIFF members are deflated).
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_ZIP_CREATE_SYSTEM = 3  # Unix, so external_attr below reads as permission bits
_ZIP_EXTERNAL_ATTR = (0o100644 & 0xFFFF) << 16  # a regular file, rw-r--r--
_ZIP_DEFLATE_LEVEL = 6
_MANIFEST_NAME = "manifest.json"

# Pillow format name -> compression. Formats that are already compressed gain nothing from
# deflate and would cost the reader a decompression, so they are stored.
_STORED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP"})
_DEFLATED_FORMATS = frozenset({"BMP", "TIFF"})
_ACCEPTED_FORMATS = _STORED_FORMATS | _DEFLATED_FORMATS
# Pillow's JPEG plugin opens MPO files itself; "MPO" is not a plugin name it accepts here.
_OPEN_FORMATS = tuple(sorted(_ACCEPTED_FORMATS - {"MPO"}))

_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # ImageOps.exif_transpose swaps w and h

_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
_CHUNK_TEMP_RE = re.compile(r"\.\d+\.zip\..+\.tmp")  # _write_chunk's, of a pack that died
# Names `pixcrawler download --format images` keeps for itself at the top of its folder
# (its hidden ones are never labels here): it refuses a label named like one, so a folder
# of that name is not packed.
_RESERVED_LABELS = frozenset({config.IMAGES_LISTING, config.IMAGES_LISTING + ".part"})
_NOT_COMPLETED_STATUSES = tuple(s for s in JOB_STATUSES if s != "completed")
_NO_SYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
_PACK_LOCK = ".pack.lock"  # inside a job's folder, held while the job is written


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack` wrote: the job id, its size, and the files it left out (and why)."""

    job_id: str
    total_images: int
    num_chunks: int
    size_bytes: int
    labels: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (path relative to SRC, reason)


@dataclass(frozen=True)
class _Image:
    """One accepted source image, as measured by the validation pass."""

    source: Path
    rel: str  # POSIX path relative to SRC; also the member path and the image id
    label: str
    width: int  # displayed size, after EXIF orientation
    height: int
    sha256: str
    size_bytes: int
    format: str


Job = dict[str, Any]  # a job.json


def pack(
    src: Path,
    store: Path,
    *,
    job_id: str | None = None,
    name: str | None = None,
    owner: str = DEFAULT_OWNER,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PackResult:
    """Pack the labelled image folder ``src`` into a completed job in ``store``.

    Every image under a sub-folder of ``src`` is packed, labelled with its folder's path
    relative to ``src`` (``cat``, ``animals/cat``). Files in ``src`` itself, non-images,
    images Pillow cannot decode, files larger than a reader accepts
    (``config.MAX_MEMBER_BYTES``) and folders named like the files ``pixcrawler download
    --format images`` writes (``metadata.jsonl``) are left out and listed in
    ``PackResult.skipped``. A chunk holds at most ``config.MAX_MEMBERS - 1`` images (the
    manifest is a member too).

    Example::

        result = pack(Path("crawl/cats_vs_dogs"), Path("store"), chunk_size=500)
        print(result.job_id, result.total_images, result.skipped)

    Raises:
        ValueError: ``src`` is not a folder, ``job_id`` or ``chunk_size`` is invalid, the
            job id belongs to another owner, or no valid image was found.
    """
    src = Path(src)
    store = Path(store)
    started = _utc_now()
    if not src.is_dir():
        raise ValueError(f"source folder {str(src)!r} does not exist or is not a folder")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if chunk_size > config.MAX_MEMBERS - 1:  # read now: tests lower the limit
        raise ValueError(
            f"chunk_size must be at most {config.MAX_MEMBERS - 1:,}, got {chunk_size:,}: "
            f"readers refuse a chunk of more than {config.MAX_MEMBERS:,} members, its "
            "manifest included"
        )
    _check_owner(owner)
    if name is not None:
        _check_name(name)
    if job_id is not None:
        _check_job_id(job_id)

    images, skipped = _scan(src)
    if not images:
        raise ValueError(
            f"no valid image found under {str(src)!r}: put images in one sub-folder per "
            f"label (<src>/<label>/0001.jpg); skipped {len(skipped)} file(s)"
        )
    groups = [images[i : i + chunk_size] for i in range(0, len(images), chunk_size)]
    if job_id is None:
        job_id = _default_job_id(images, owner=owner, chunk_size=chunk_size)
    for index, group in enumerate(groups):  # before anything is written
        _check_manifest_size(_manifest(job_id, index, group), index, len(group))
    _check_job_size(
        _completed_job(job_id, src, name, owner, chunk_size, started, images, [], 1), groups
    )

    def completed(entries: list[dict[str, Any]], existing: dict[str, Any] | None) -> Job:
        version = _version(existing, entries)
        return _completed_job(
            job_id, src, name, owner, chunk_size, started, images, entries, version
        )

    job_dir = store / job_id
    with _job_lock(job_dir, job_id):
        existing = _check_not_foreign(job_dir / "job.json", job_id=job_id, owner=owner)
        kept = _unchanged_chunks(existing, job_dir / "chunks", job_id, groups)
        if kept is not None:
            # The same images in the same chunks: the files and their checksums stay, so
            # clients reading the job meanwhile never see it unpublished.
            job = completed(kept, existing)
            _write_json_atomic(job_dir / "job.json", job)
        else:
            job = _publish(job_dir, existing, job_id, groups, completed)
    return PackResult(
        job_id=job_id,
        total_images=len(images),
        num_chunks=len(groups),
        size_bytes=job["size_bytes"],
        labels=tuple(job["labels"]),
        skipped=tuple(skipped),
    )


def _publish(
    job_dir: Path,
    existing: dict[str, Any] | None,
    job_id: str,
    groups: list[list[_Image]],
    completed: Callable[[list[dict[str, Any]], dict[str, Any] | None], Job],
) -> Job:
    """Write the chunks of ``groups``, then the job.json ``completed(entries)`` makes.

    A job packed again with other images is unpublished while its chunks are replaced: the
    server lists no chunk of it, so no one is served new bytes under the old checksums. A
    pack that stops (an error, a full disk, Ctrl-C) leaves no job waiting for ever: one
    that replaced no chunk yet puts the old job.json back; one that did marks the job
    ``failed`` (readers are told it will not complete; packing again publishes it); a new
    job's chunks are removed.
    """
    chunks_dir = job_dir / "chunks"
    written: list[Path] = []  # the chunk files this pack renamed into place
    # The one being written, and the file there before (its rename may be all that ran).
    writing: tuple[Path, tuple[int, ...] | None] | None = None
    job: Job | None = None
    try:
        if existing is not None:
            unpacked = {**existing, "status": "running", "progress": 0, "total_images": 0}
            _write_json_atomic(job_dir / "job.json", unpacked)
        chunks_dir.mkdir(parents=True, exist_ok=True)
        entries: list[dict[str, Any]] = []
        for index, group in enumerate(groups):
            path = chunks_dir / f"{index:05d}.zip"
            writing = (path, _file_identity(path))
            size, digest = _write_chunk(path, job_id, index, group)
            written.append(path)
            writing = None
            entries.append(_chunk_entry(index, size, digest, len(group)))
        _remove_stale_chunks(chunks_dir, keep=len(groups))
        _sync_folder(chunks_dir)  # the chunks' names are on disk before job.json lists them
        job = completed(entries, existing)
        # job.json last: a job is listed as completed only once every chunk is in place.
        _write_json_atomic(job_dir / "job.json", job)
    except BaseException:
        if writing is not None and _file_identity(writing[0]) != writing[1]:
            written.append(writing[0])  # renamed, then stopped before it was counted
        if job is None or not _is_published(job_dir / "job.json", job):
            _unwind(job_dir, existing, written)
        # (else it stopped while the folder synced: the new job is out, whole)
        raise
    return job


def _file_identity(path: Path) -> tuple[int, ...] | None:
    """What tells a file from the one renamed over it; None where there is none."""
    try:
        return _identity(path.stat())
    except OSError:
        return None


def _is_published(path: Path, job: Job) -> bool:
    """Whether ``path`` holds ``job``, as :func:`_write_json_atomic` writes it."""
    try:
        return path.read_bytes() == _json_bytes(job) + b"\n"
    except OSError:
        return False


def _unwind(job_dir: Path, existing: dict[str, Any] | None, written: list[Path]) -> None:
    """After a pack stopped: what the store served before, else a job marked ``failed``;
    a new job's chunks removed (best effort: the disk may be full)."""
    with contextlib.suppress(OSError):
        if existing is None:
            for path in written:
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (job_dir / "chunks").rmdir()  # only if empty
        elif not written:  # nothing replaced: the job as it was, published again
            _write_json_atomic(job_dir / "job.json", existing)
        else:
            failed = {**existing, "status": "failed", "progress": 0, "total_images": 0}
            _write_json_atomic(job_dir / "job.json", failed)


def _unchanged_chunks(
    existing: dict[str, Any] | None, chunks_dir: Path, job_id: str, groups: list[list[_Image]]
) -> list[dict[str, Any]] | None:
    """The chunk entries of the completed job already in the store, if its chunks hold
    exactly ``groups`` (each chunk's manifest, which names every image's sha256, is the
    one this pack would write) and each file is the one listed (its size and sha256: a
    file damaged since is written again, not kept under its old checksum); else None."""
    if existing is None or existing.get("status") != "completed":
        return None
    listed = existing.get("chunks")
    if not isinstance(listed, list) or len(listed) != len(groups):
        return None
    entries: list[dict[str, Any]] = []
    for index, (entry, group) in enumerate(zip(listed, groups, strict=True)):
        if not isinstance(entry, dict) or entry.get("index") != index:
            return None
        path = chunks_dir / f"{index:05d}.zip"
        sha256 = entry.get("sha256")
        if not isinstance(sha256, str):
            return None
        try:
            if path.stat().st_size != entry.get("size_bytes"):
                return None
            with zipfile.ZipFile(path) as archive:
                manifest = archive.read(_MANIFEST_NAME)
            if manifest != _manifest(job_id, index, group):
                return None
            if _file_digest(path) != (entry["size_bytes"], sha256.lower()):
                return None
        except (OSError, zipfile.BadZipFile, zlib.error, KeyError, ValueError):
            return None
        entries.append(_chunk_entry(index, entry["size_bytes"], sha256, len(group)))
    return entries


def _chunk_entry(index: int, size: int, sha256: str, images: int) -> dict[str, Any]:
    """A chunk as job.json lists it."""
    return {
        "index": index,
        "size_bytes": size,
        "sha256": sha256,
        "image_count": images,
        "expires_at": None,
    }


def _version(existing: dict[str, Any] | None, chunks: list[dict[str, Any]]) -> int:
    """The packed job's version: the one there if its chunks are the same bytes, else one
    more (readers tell versions apart by it, where a chunk's sha256 does not say)."""
    if existing is None:
        return 1
    version = count_or_none(existing.get("version")) or 1  # as readers read it (7.0: 7)
    listed = existing.get("chunks")
    listed = listed if isinstance(listed, list) else []
    before = [c.get("sha256") for c in listed if isinstance(c, dict)]
    return version if before == [c["sha256"] for c in chunks] else version + 1


def _completed_job(
    job_id: str,
    src: Path,
    name: str | None,
    owner: str,
    chunk_size: int,
    started: str,
    images: Sequence[_Image],
    chunk_entries: list[dict[str, Any]],
    version: int,
) -> dict[str, Any]:
    """The job.json of a packed job."""
    labels = sorted({image.label for image in images})
    sizes = {(image.height, image.width) for image in images}
    total_bytes = sum(entry["size_bytes"] for entry in chunk_entries)
    return {
        "id": job_id,
        "name": name if name is not None else _folder_name(src),
        "status": "completed",
        "progress": 100,
        "created_at": started,
        "completed_at": _utc_now(),
        "total_images": len(images),
        "chunk_size": chunk_size,
        "size_bytes": total_bytes,
        "labels": labels,
        "version": version,
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "chunks": chunk_entries,
        "owner": owner,
    }


def write_job(
    store: Path,
    job_id: str,
    *,
    status: str,
    progress: float,
    owner: str = DEFAULT_OWNER,
    name: str | None = None,
    labels: Iterable[str] = (),
) -> Path:
    """Write a job that is not completed (no chunks) to ``store``; return its job.json path.

    For testing clients against unfinished jobs: ``status`` is one of ``pending``,
    ``running``, ``failed`` or ``cancelled`` (a completed job comes from :func:`pack`).

    Example::

        write_job(Path("store"), "job_running", status="running", progress=42.5)
    """
    _check_job_id(job_id)
    _check_owner(owner)
    if name is not None:
        _check_name(name)
    if isinstance(labels, str):  # "cat" would be the labels a, c and t
        raise ValueError(f"labels must be a list of label names, got the string {labels!r}")
    if status not in _NOT_COMPLETED_STATUSES:
        raise ValueError(
            f"status must be one of {', '.join(_NOT_COMPLETED_STATUSES)}, got {status!r} "
            "(a completed job is made with pack())"
        )
    if isinstance(progress, bool) or not isinstance(progress, (int, float)):
        raise ValueError(f"progress must be a number from 0 to 100, got {progress!r}")
    if not 0 <= progress <= 100:  # also rejects NaN
        raise ValueError(f"progress must be a number from 0 to 100, got {progress!r}")
    job_dir = Path(store) / job_id
    job = {
        "id": job_id,
        "name": name if name is not None else job_id,
        "status": status,
        # An integral progress is written as an int, as the wire contract's examples are.
        "progress": int(progress) if float(progress).is_integer() else float(progress),
        "created_at": _utc_now(),
        "completed_at": None,
        "total_images": 0,
        "chunk_size": 0,
        "size_bytes": 0,
        "labels": sorted(set(labels)),
        "version": 1,
        "image_size": None,
        "chunks": [],
        "owner": owner,
    }
    path = job_dir / "job.json"
    with _job_lock(job_dir, job_id):
        _check_not_foreign(path, job_id=job_id, owner=owner)
        _write_json_atomic(path, job)
    return path


def _job_lock(job_dir: Path, job_id: str) -> contextlib.AbstractContextManager[None]:
    """Held while a job's files are written: two packs of one job at once would publish
    one's checksums over the other's chunks."""
    return folder_lock(
        job_dir,
        _PACK_LOCK,
        lambda: ValueError(
            f"job {job_id!r} is being written by another pack in this store; wait for it to end"
        ),
    )


# -- scanning ----------------------------------------------------------------------------


def _scan(src: Path) -> tuple[list[_Image], list[tuple[str, str]]]:
    """Walk ``src``; return the valid images sorted by (label, path) and the skipped files."""
    images: list[_Image] = []
    skipped: list[tuple[str, str]] = []

    def unlisted(exc: OSError) -> None:  # a folder os.walk could not list, never in silence
        where = Path(exc.filename if exc.filename is not None else src)
        rel = where.relative_to(src).as_posix() if where != src else "."
        skipped.append((rel + "/", f"folder cannot be listed: {exc.strerror or exc}"))

    # followlinks=False: a symlinked folder could loop or pull in files from anywhere.
    for dirpath, dirnames, filenames in os.walk(src, onerror=unlisted, followlinks=False):
        folder = Path(dirpath)
        rel_folder = folder.relative_to(src).as_posix()
        hidden = sorted(d for d in dirnames if d.startswith("."))
        for d in hidden:
            skipped.append((_join(rel_folder, d) + "/", "hidden folder, not scanned"))
        for d in sorted(dirnames):
            if not d.startswith(".") and (folder / d).is_symlink():
                skipped.append(
                    (_join(rel_folder, d) + "/", "symbolic link to a folder, not followed")
                )
        reserved: set[str] = set()
        if rel_folder == ".":  # a top-level folder is the first part of its images' labels
            reserved = {
                d
                for d in dirnames
                if d.casefold() in _RESERVED_LABELS and not (folder / d).is_symlink()
            }
        for d in sorted(reserved):
            skipped.append(
                (
                    d + "/",
                    "folder name kept by `pixcrawler download --format images` for its own "
                    "file, which refuses it as a label; rename the folder",
                )
            )
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in reserved)
        for filename in sorted(filenames):
            rel = _join(rel_folder, filename)
            reason = _reject_reason(filename, at_root=rel_folder == ".") or _name_problem(rel)
            if reason is None:
                measured = _measure(folder / filename, rel, label=rel_folder)
                if isinstance(measured, str):
                    reason = measured
                else:
                    images.append(measured)
            if reason is not None:
                skipped.append((rel, reason))
    images.sort(key=lambda image: (image.label, image.rel))
    skipped.sort()
    return images, skipped


def _join(rel_folder: str, name: str) -> str:
    return name if rel_folder == "." else f"{rel_folder}/{name}"


def _reject_reason(filename: str, *, at_root: bool) -> str | None:
    """Why a file is left out before opening it, or None when it is worth opening."""
    if filename.startswith("."):
        return "hidden file"
    if not filename.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file (extension not one of " + " ".join(IMAGE_EXTENSIONS) + ")"
    if at_root:
        return "in the root folder: images must be in a sub-folder named after their label"
    return None


def _name_problem(rel: str) -> str | None:
    """Why a path cannot name a member the SDK will read, or None."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    if not _safe_name(rel):
        return "path not portable in a zip (a backslash, or a drive-like ':'), refused by readers"
    return None


def _measure(path: Path, rel: str, *, label: str) -> _Image | str:
    """Open and fully decode one image; return its record, or why it is skipped."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would never end
            return "not a regular file"
        if info.st_size > config.MAX_MEMBER_BYTES:
            return (
                f"{info.st_size:,} bytes, over the {config.MAX_MEMBER_BYTES:,} a reader "
                "accepts for one image"
            )
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            # A large (but not bomb-sized) image is valid data, and Pillow's other warnings
            # (corrupt EXIF ...) are about an image it decodes, as readers will: noise here.
            warnings.simplefilter("ignore")
            # formats= keeps Pillow from trying other plugins (EPS would run Ghostscript).
            with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as image:
                image_format = image.format or "unknown"
                if image_format not in _ACCEPTED_FORMATS:
                    return f"unsupported image format {image_format}"
                check_opened(image, data)  # what readers refuse, before it costs the same here
                image.load()
                if unsupported_mode(image):
                    return f"unsupported image mode {image.mode} (readers cannot convert it)"
                width, height = image.size
                orientation = image.getexif().get(_ORIENTATION_TAG)
    except DecompressionError as exc:
        return f"refused as readers refuse it: {exc}"
    # Pillow signals a bad file with many exception types (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError ...); any of them means "not a usable image".
    except Exception as exc:
        # Pillow names the in-memory file object ("<_io.BytesIO object at 0x...>"): drop
        # the address so a report is the same from run to run.
        reason = re.sub(r" <[^>]* at 0x[0-9a-f]+>", "", str(exc))
        return f"cannot be decoded by Pillow: {type(exc).__name__}: {reason}"
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return _Image(
        source=path,
        rel=rel,
        label=label,
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        format=image_format,
    )


def _default_job_id(images: Sequence[_Image], *, owner: str, chunk_size: int) -> str:
    """A job id that is a pure function of the packed content (and its owner).

    The chunks' own checksums cannot be used: every manifest names the job id. So the id
    hashes what determines the chunks' content (paths, labels, image checksums, chunk size)
    plus the owner, so that two owners packing the same folder get two jobs.
    """
    content = {
        "chunk_size": chunk_size,
        "owner": owner,
        "images": [[image.rel, image.label, image.sha256] for image in images],
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "job_" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


# -- writing -----------------------------------------------------------------------------


def _manifest(job_id: str, index: int, images: Sequence[_Image]) -> bytes:
    """The manifest of one chunk, as written into it."""
    manifest = {
        "job_id": job_id,
        "chunk_index": index,
        "images": [
            {
                "path": image.rel,
                "label": image.label,
                "id": image.rel,
                "width": image.width,
                "height": image.height,
                "sha256": image.sha256,
                "metadata": {
                    "format": image.format,
                    "size_bytes": image.size_bytes,
                    "source": image.rel,
                },
            }
            for image in images
        ],
    }
    return json.dumps(manifest, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _check_manifest_size(manifest: bytes, index: int, images: int) -> None:
    """A manifest longer than a reader takes would make a chunk nobody can read."""
    limit = manifest_limit(images + 1)
    if len(manifest) > limit:
        raise ValueError(
            f"chunk {index}'s manifest would be {len(manifest):,} bytes, over the {limit:,} "
            f"a reader takes for {images:,} images (long paths?): pack with a smaller "
            "chunk size"
        )


def _check_job_size(job: dict[str, Any], groups: Sequence[Sequence[_Image]]) -> None:
    """A job.json longer than the server reads (config.MAX_JOB_BYTES) would make a job
    nobody can load: the pack said "Packed" and every client got 404. Measured on the job
    as it will be written, each chunk listed at a size of as many digits as any may have."""
    most = 10**15  # bytes: more digits than any chunk's size or the job's will have
    entry = {"index": len(groups), "size_bytes": most, "sha256": "0" * 64}
    entry |= {"image_count": max(map(len, groups)), "expires_at": None}
    one = len(_json_bytes({**job, "size_bytes": most, "chunks": [entry]}))
    two = len(_json_bytes({**job, "size_bytes": most, "chunks": [entry, entry]}))
    length = one + (len(groups) - 1) * (two - one) + 1  # + 1: its last newline
    if length > config.MAX_JOB_BYTES:
        raise ValueError(
            f"the job would list {len(groups):,} chunks in a job.json of about {length:,} "
            f"bytes, over the {config.MAX_JOB_BYTES:,} a server reads: pack with a larger "
            "chunk size"
        )


def _write_chunk(path: Path, job_id: str, index: int, images: Sequence[_Image]) -> tuple[int, str]:
    """Write one chunk archive atomically; return its size and sha256."""
    manifest_bytes = _manifest(job_id, index, images)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            with zipfile.ZipFile(raw, "w") as archive:
                _add_member(archive, _MANIFEST_NAME, manifest_bytes, zipfile.ZIP_DEFLATED)
                for image in images:
                    data = image.source.read_bytes()
                    # The validation pass hashed these bytes; a file edited since then
                    # would make the manifest lie, so stop instead of packing it.
                    if hashlib.sha256(data).hexdigest() != image.sha256:
                        raise RuntimeError(
                            f"{image.rel!r} changed while it was being packed; pack again"
                        )
                    stored = image.format in _STORED_FORMATS
                    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
                    _add_member(archive, image.rel, data, method)
            raw.flush()
            _sync(raw.fileno())  # whole on disk before its name is
        size, digest = _file_digest(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; chunks are meant to be served
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, digest


def _add_member(archive: zipfile.ZipFile, name: str, data: bytes, method: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
    info.compress_type = method
    info.create_system = _ZIP_CREATE_SYSTEM
    info.external_attr = _ZIP_EXTERNAL_ATTR
    level = _ZIP_DEFLATE_LEVEL if method == zipfile.ZIP_DEFLATED else None
    archive.writestr(info, data, compress_type=method, compresslevel=level)


def _remove_stale_chunks(chunks_dir: Path, *, keep: int) -> None:
    """Delete chunk files left by an earlier, larger packing of the same job id, and the
    temp files of a packing that was killed (its own are renamed or removed by now)."""
    for entry in chunks_dir.iterdir():
        stem = entry.name.removesuffix(".zip")
        # (isascii: "²".isdigit() is true, and int() refuses it)
        if entry.name.endswith(".zip") and stem.isascii() and stem.isdigit() and int(stem) >= keep:
            entry.unlink()
        elif _CHUNK_TEMP_RE.fullmatch(entry.name):
            entry.unlink(missing_ok=True)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _write_json_atomic(path: Path, value: Any) -> None:
    data = _json_bytes(value)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data + b"\n")
            f.flush()
            _sync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync(fd: int) -> None:
    """fsync, where the file system has it (some refuse it: EINVAL, ENOTSUP)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_SYNC:
            raise


def _sync_folder(folder: Path) -> None:
    """Make the names just given in ``folder`` last through a power cut (where the system
    can: Windows opens no folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


# -- validation --------------------------------------------------------------------------


def _check_job_id(job_id: object) -> None:
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise ValueError(
            f"invalid job id {job_id!r}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )


def _check_owner(owner: object) -> None:
    # The server reads owners from its keys with surrounding spaces dropped: "bob " would
    # name an owner no key can ever be.
    if not isinstance(owner, str) or not owner.strip() or owner != owner.strip():
        raise ValueError(
            f"owner must be a non-empty string without surrounding spaces, got {owner!r}"
        )
    _check_name(owner, what="owner")


def _check_name(name: object, *, what: str = "name") -> None:
    """A name job.json can hold: text, in UTF-8 (a command-line argument of other bytes
    arrives with lone surrogates, which no JSON writer encodes)."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {name!r} is not valid UTF-8") from None


def _folder_name(src: Path) -> str:
    """The source folder's name, as a job's default name; bytes that are not UTF-8 (kept
    by Python as lone surrogates) become U+FFFD."""
    name = src.resolve().name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _check_not_foreign(job_json: Path, *, job_id: str, owner: str) -> dict[str, Any] | None:
    """Refuse to overwrite a job that another owner already has under this id (one
    without an owner is ``default``'s, as the server reads it); return the job there."""
    try:
        if not job_json.is_file():  # (a FIFO would never end)
            return None
        # Read as the server reads it (bytes: a byte-order mark, UTF-16 ...): a job.json it
        # serves is one whose owner counts here.
        existing = json.loads(job_json.read_bytes())
    except (OSError, ValueError, RecursionError):  # RecursionError: absurd nesting
        return None
    if not isinstance(existing, dict):
        return None
    if existing.get("owner", DEFAULT_OWNER) != owner:
        raise ValueError(
            f"job {job_id!r} already exists in this store and belongs to another owner; "
            "choose another --job-id"
        )
    return existing


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
