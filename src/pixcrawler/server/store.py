"""Read a dataset store on disk: jobs, chunk files and API keys.

Layout (see "Store on disk" in the design)::

    <store>/<job_id>/job.json            # the Job, minus chunk urls, plus "owner"
    <store>/<job_id>/chunks/00000.zip    # chunk archives
    <store>/keys.json                    # {"<api key>": "<owner>"}

Every lookup takes a job id that must match ``JOB_ID_PATTERN`` and an integer chunk
index, so no request can name a path outside the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import DEFAULT_OWNER, ENV_SERVER_KEYS, JOB_ID_PATTERN
from ..units import parse_time

__all__ = [
    "KEYS_FILE",
    "JobStore",
    "KeyRing",
    "ensure_server_keys",
    "load_server_keys",
    "valid_job_id",
]

KEYS_FILE = "keys.json"
_JOB_FILE = "job.json"
_JOB_ID_RE = re.compile(JOB_ID_PATTERN)


def existing_store(store: Path) -> Path:
    """``store`` as a Path, or a ValueError when it is not a folder (a typo must not
    become a fresh, empty store)."""
    store = Path(store)
    if not store.is_dir():
        raise ValueError(f"store {str(store)!r} does not exist or is not a folder")
    return store


def valid_job_id(job_id: str) -> bool:
    """Whether ``job_id`` is a well-formed job id (and so a safe folder name)."""
    return _JOB_ID_RE.fullmatch(job_id) is not None


@dataclass(frozen=True)
class _Cached:
    signature: tuple[int, int, int]  # (inode, size, mtime_ns) of the job.json read
    job: dict[str, Any]


class JobStore:
    """Jobs and chunk files of one store folder, with job.json reads cached.

    A job.json is re-read only when its inode, size or mtime changes, so a job rewritten
    by ``pack``/``write_job`` (always via rename) is seen on the next request.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[str, _Cached] = {}

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's job.json as a dict, or None when there is no such (valid) job."""
        if not valid_job_id(job_id):
            return None
        path = self.root / job_id / _JOB_FILE
        try:
            st = os.stat(path)
        except OSError:
            self._cache.pop(job_id, None)
            return None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._cache.get(job_id)
        if cached is not None and cached.signature == signature:
            return cached.job
        try:
            job = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):  # RecursionError: absurd nesting
            # A job.json being replaced or hand-edited badly is "not there", not a crash.
            return None
        if not _well_formed(job, job_id):
            return None
        job = {"id": job_id, **job}  # a job.json may leave its id to its folder's name
        self._cache[job_id] = _Cached(signature, job)
        return job

    def jobs_of(self, owner: str) -> list[dict[str, Any]]:
        """Every job of ``owner``, newest first (ties by id, so pages are stable)."""
        try:
            names = [entry.name for entry in os.scandir(self.root) if entry.is_dir()]
        except OSError:
            return []
        jobs = []
        for name in names:
            job = self.get(name)
            if job is not None and job.get("owner", DEFAULT_OWNER) == owner:
                jobs.append(job)
        jobs.sort(key=lambda job: str(job.get("id", "")))
        # By the time, not its text: "13:00+02:00" is older than "12:30Z". Undated: last.
        jobs.sort(key=lambda job: _created(job) or _UNDATED, reverse=True)
        return jobs

    def chunk_path(self, job_id: str, index: int) -> Path:
        """Where chunk ``index`` of ``job_id`` lives (the caller has validated both)."""
        if not valid_job_id(job_id) or index < 0:
            raise ValueError("invalid job id or chunk index")
        return self.root / job_id / "chunks" / f"{index:05d}.zip"


_UNDATED = datetime.min.replace(tzinfo=timezone.utc)


def _created(job: dict[str, Any]) -> datetime | None:
    value = job.get("created_at")
    return parse_time(value) if isinstance(value, str) else None


def _well_formed(job: Any, job_id: str) -> bool:
    """Whether a parsed job.json can be served: an object of this id, that a JSON answer
    can carry, whose chunks, if any, are objects with an integer ``index`` >= 0 (what the
    endpoints rely on)."""
    if not isinstance(job, dict) or job.get("id", job_id) != job_id:
        return False
    try:  # what a JSON response must encode: no NaN or Infinity, no lone surrogate
        json.dumps(job, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, RecursionError):  # (UnicodeEncodeError is a ValueError)
        return False
    chunks = job.get("chunks")
    if chunks is None:
        return True
    return isinstance(chunks, list) and all(
        isinstance(chunk, dict) and _is_index(chunk.get("index")) for chunk in chunks
    )


def _is_index(value: Any) -> bool:
    # bool is an int subclass, but "index": true is a hand-editing slip, not chunk 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class KeyRing:
    """API key -> owner, compared by sha256 digest so lookups leak no timing of the key."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._owners = {_digest(key): owner for key, owner in keys.items() if key}

    def __len__(self) -> int:
        return len(self._owners)

    def owner_of(self, key: str | None) -> str | None:
        """The owner of ``key``, or None for a missing or unknown key."""
        if not key:
            return None
        return self._owners.get(_digest(key))

    def __repr__(self) -> str:  # never show keys, even hashed, in logs or tracebacks
        return f"KeyRing({len(self)} keys)"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_server_keys(store: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The API keys of a store: ``<store>/keys.json`` merged with ``PIXCRAWLER_SERVER_KEYS``.

    The variable holds comma-separated ``key:owner`` pairs and wins over the file for a key
    in both. Raises ValueError (naming the source, never a key) when either is malformed.
    """
    env = os.environ if environ is None else environ
    keys: dict[str, str] = {}
    path = Path(store) / KEYS_FILE
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise ValueError(f"cannot read {path}: {type(exc).__name__}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip()
            for k, v in data.items()
        ):
            raise ValueError(f'{path} must be a JSON object {{"<api key>": "<owner>", ...}}')
        # Stripped as the request headers are (and the SDK's keys): a key pasted with its
        # newline would otherwise never match.
        keys.update({k.strip(): v.strip() for k, v in data.items()})
    keys.update(_parse_env_keys(env.get(ENV_SERVER_KEYS, "")))
    return keys


def _parse_env_keys(value: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for number, entry in enumerate(value.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        # rpartition: owners are plain names, a key might contain ':'.
        key, sep, owner = entry.rpartition(":")
        if not sep or not key.strip() or not owner.strip():
            raise ValueError(f"entry {number} of {ENV_SERVER_KEYS} is not of the form key:owner")
        keys[key.strip()] = owner.strip()
    return keys


def ensure_server_keys(
    store: Path, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, str], str | None]:
    """The store's keys; when there are none, create one for ``default`` first.

    Returns ``(keys, created)`` where ``created`` is the new key (to announce once) or
    None. The new key is written to ``<store>/keys.json`` with mode 0600, so a
    self-hosted server is never open to anyone, nor locked to everyone.
    """
    keys = load_server_keys(store, environ)
    if keys:
        return keys, None
    key = secrets.token_urlsafe(32)
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{KEYS_FILE}.", suffix=".tmp", dir=store)
    try:
        # mkstemp creates the file 0600 from the start: the key is never world-readable.
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({key: DEFAULT_OWNER}, f, indent=2)
            f.write("\n")
        os.chmod(tmp_name, 0o600)
        os.replace(tmp_name, store / KEYS_FILE)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return {key: DEFAULT_OWNER}, key
