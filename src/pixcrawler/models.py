"""Typed values of the wire contract: a job and its chunks, parsed from JSON."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import JOB_ID_PATTERN
from .exceptions import PixCrawlerError

JOB_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
# Both name files on disk (the chunk cache, downloads), so the API's word is checked: a
# "sha256" of "/../x" or a job id of "../../y" must not reach a path.
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
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
                index=int(data["index"]),
                url=str(data["url"]),
                size_bytes=_opt_size(data.get("size_bytes")),
                sha256=_opt_match(data.get("sha256"), _SHA256_RE, "sha256"),
                image_count=_opt_int(data.get("image_count")),
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
            image_size = data.get("image_size")
            if not isinstance(data["id"], str):
                raise TypeError(f"id {data['id']!r} is not a string")
            job_id = data["id"]
            if not _JOB_ID_RE.fullmatch(job_id):
                raise ValueError(f"id {job_id[:80]!r} does not match {JOB_ID_PATTERN}")
            return cls(
                id=job_id,
                name=str(data.get("name") or data["id"]),
                status=str(data.get("status", "completed")),
                progress=float(data.get("progress") or 0),
                created_at=_opt_str(data.get("created_at")),
                completed_at=_opt_str(data.get("completed_at")),
                total_images=_count(data.get("total_images"), "total_images"),
                chunk_size=_count(data.get("chunk_size"), "chunk_size"),
                size_bytes=_count(data.get("size_bytes"), "size_bytes"),
                labels=_labels(data.get("labels")),
                version=int(data.get("version") or 1),
                image_size=(int(image_size[0]), int(image_size[1])) if image_size else None,
                chunks=tuple(Chunk.from_json(c) for c in data.get("chunks") or ()),
            )
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise PixCrawlerError(f"the API returned a malformed job: {exc!r}") from exc


def _require_object(data: Any) -> None:
    if not isinstance(data, Mapping):
        raise TypeError(f"a JSON object was expected, not {type(data).__name__}")


def _labels(value: Any) -> tuple[str, ...]:
    """The job's label names: a list of strings (a bare string is not a list of letters)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"labels {str(value)[:80]!r} is not a list of strings")
    return tuple(value)


def _count(value: Any, name: str) -> int:
    count = int(value or 0)
    if count < 0:
        raise ValueError(f"{name} {count} is negative")
    return count


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


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
        raise ValueError(f"{name} {text[:80]!r} is not of the form {pattern.pattern}")
    return text
