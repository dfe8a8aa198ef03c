"""Typed values of the wire contract: a job and its chunks, parsed from JSON."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import JOB_ID_PATTERN, SHA256_PATTERN
from .exceptions import DecompressionError, PixCrawlerError
from .redaction import shown

JOB_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
# Another status a service may write ("in_progress", "queued"): a short word, never text.
_STATUS_WORD = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# Both name files on disk (the chunk cache, downloads), so the API's word is checked: a
# "sha256" of "/../x" or a job id of "../../y" must not reach a path.
_SHA256_RE = re.compile(SHA256_PATTERN)
_JOB_ID_RE = re.compile(JOB_ID_PATTERN)


@dataclass(frozen=True)
class Chunk:
    """One chunk archive of a job, as the API lists it."""

    index: int
    url: str
    size_bytes: int | None = None
    sha256: str | None = None
    image_count: int | None = None
    expires_at: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Chunk:
        try:
            _require_object(data)
            return cls(
                index=_count(data["index"], "index", required=True),
                url=_url(data["url"]),
                size_bytes=_opt_size(data.get("size_bytes")),
                sha256=_opt_match(data.get("sha256"), _SHA256_RE, "sha256"),
                image_count=_opt_count(data.get("image_count"), "image_count"),
                expires_at=_opt_str(data.get("expires_at")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise PixCrawlerError(f"the API returned a malformed chunk entry: {exc!r}") from exc


@dataclass(frozen=True)
class Job:
    """A PixCrawler job (dataset) as ``GET /jobs/{id}`` returns it."""

    id: str
    name: str
    status: str
    progress: float = 0.0
    created_at: str | None = None
    completed_at: str | None = None
    total_images: int = 0
    chunk_size: int = 0
    size_bytes: int = 0
    labels: tuple[str, ...] = ()
    version: int = 1
    image_size: tuple[int, int] | None = None
    chunks: tuple[Chunk, ...] = field(default=())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        try:
            _require_object(data)
            job_id = _job_id(data["id"])
            chunks = tuple(Chunk.from_json(c) for c in data.get("chunks") or ())
            job = cls(
                id=job_id,
                name=str(data.get("name") or job_id),
                status=_status(data.get("status")),
                progress=_progress(data.get("progress")),
                created_at=_opt_str(data.get("created_at")),
                completed_at=_opt_str(data.get("completed_at")),
                total_images=_count(data.get("total_images"), "total_images"),
                chunk_size=_count(data.get("chunk_size"), "chunk_size"),
                size_bytes=_count(data.get("size_bytes"), "size_bytes"),
                labels=_labels(data.get("labels")),
                version=_count(data.get("version"), "version") or 1,
                image_size=_image_size(data.get("image_size")),
                chunks=chunks,
            )
            _check_chunks(job)
            return job
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise PixCrawlerError(f"the API returned a malformed job: {exc!r}") from exc


def _job_id(value: Any) -> str:
    """A string id, or an int one (as the real service's are) in its decimal form."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise TypeError(f"id {shown(value)} is neither a string nor an int")
    if not _JOB_ID_RE.fullmatch(value):
        raise ValueError(f"id {shown(value)} does not match {JOB_ID_PATTERN}")
    return value


def _status(value: Any) -> str:
    """The job's status, required: a job that does not say it is completed is never read
    as one. Case and the American "canceled" are forgiven. A word outside
    :data:`JOB_STATUSES` (the real service writes "in_progress") is kept: like any status
    but "completed", it means not complete (DESIGN.md), not a malformed job."""
    if not isinstance(value, str):
        raise TypeError(f"status {shown(value)} is not a string")
    status = value.strip().lower()
    status = "cancelled" if status == "canceled" else status
    if status not in JOB_STATUSES and not _STATUS_WORD.fullmatch(status):
        raise ValueError(
            f"status {shown(value)} is neither one of {', '.join(JOB_STATUSES)} nor a word"
        )
    return status


def _image_size(value: Any) -> tuple[int, int] | None:
    """The job's one image size, ``[height, width]`` of positive ints, or None."""
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(_whole(v) and v > 0 for v in value)
    ):
        raise ValueError(f"image_size {shown(value)} is not [height, width] (ints >= 1)")
    return int(value[0]), int(value[1])


def _whole(value: Any) -> bool:
    """An int, or a float of a whole value (32.0, as some serialisers write 32)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or value.is_integer()


def _check_chunks(job: Job) -> None:
    """Each chunk listed once."""
    indexes = [chunk.index for chunk in job.chunks]
    if any(index < 0 for index in indexes) or len(set(indexes)) != len(indexes):
        raise ValueError(f"chunk indexes {indexes[:20]} are not distinct and >= 0")


def check_counts(job: Job) -> None:
    """A completed job read for its data (not a summary, which lists no chunks) whose
    ``total_images`` its chunks' ``image_count``s contradict lists a chunk too few or too
    many: refused (:class:`DecompressionError`, bad data) before ``len()`` can mislead."""
    counts = [chunk.image_count for chunk in job.chunks]
    if not job.total_images or None in counts:
        return  # what is not listed is counted from the manifests as they arrive
    held = sum(count or 0 for count in counts)
    if held != job.total_images:
        raise DecompressionError(
            f"job {job.id} lists {job.total_images:,} images but its chunks list {held:,}"
        )


def _require_object(data: Any) -> None:
    if not isinstance(data, Mapping):
        raise TypeError(f"a JSON object was expected, not {type(data).__name__}")


def _progress(value: Any) -> float:
    """Percent complete: a value past 0–100 is brought within it, and one that is no number
    (NaN) reads as 0, so no status line shows "nan%" or "-5%"."""
    progress = float(value or 0)
    return 0.0 if math.isnan(progress) else min(100.0, max(0.0, progress))


def _labels(value: Any) -> tuple[str, ...]:
    """The job's label names: a list of distinct strings (a bare string is not a list of
    letters, and a name listed twice would leave a label id no image has)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"labels {shown(value)} is not a list of strings")
    seen: set[str] = set()
    for label in value:
        if label in seen:
            raise ValueError(f"labels list {shown(label)} twice")
        seen.add(label)
    return tuple(value)


# Past any real count, and where a float stops counting by one.
_MAX_COUNT = 1 << 53


def _count(value: Any, name: str, *, required: bool = False) -> int:
    """A whole number from 0 to 2**53 (``32.0`` or ``"32"``, as some serialisers write
    32); missing (null), 0 unless ``required``. 10.7 images, or 2**63, is no count."""
    if (value is None or value == "") and not required:  # ("" == 0 is False: not 0)
        return 0
    number = value
    if isinstance(value, str):  # digits read exactly; "32.0" as a float would be
        text = value.strip()
        digits = text.isascii() and text.isdigit() and len(text) <= 20  # (past int()'s limit)
        number = int(text) if digits else _float(text)
    if not _whole(number):
        raise ValueError(f"{name} {shown(value)} is not a whole number")
    count = int(number)
    if count < 0:
        raise ValueError(f"{name} {count} is negative")
    if count > _MAX_COUNT:
        raise ValueError(f"{name} {count} is past 2**53")
    return count


def count_or_none(value: Any) -> int | None:
    """A count as a job's fields are read (``3``, ``3.0``, ``"3"``; 0 to 2**53), or None
    where there is none: missing, or not a count."""
    try:
        return _count(value, "count", required=True)
    except (TypeError, ValueError):
        return None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _url(value: Any) -> str:
    """A chunk's URL: text (a null one became the path "None", fetched with the key)."""
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"url {shown(value)} is not a URL")
    return value


def _opt_count(value: Any, name: str) -> int | None:
    return None if value is None or value == "" else _count(value, name)


def _opt_size(value: Any) -> int | None:
    """A chunk's byte count; 0 reads as not known (no zip archive is empty: an empty one
    is 22 bytes), so the chunk is read to its end rather than refused."""
    return _count(value, "size_bytes") or None


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _opt_match(value: Any, pattern: re.Pattern[str], name: str) -> str | None:
    if value is None:
        return None
    text = str(value)
    if not pattern.fullmatch(text):
        raise ValueError(f"{name} {shown(text)} is not of the form {pattern.pattern}")
    return text
