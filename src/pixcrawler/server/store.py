"""Read a dataset store on disk: jobs, chunk files and API keys.

Layout (see "Store on disk" in the design)::

    <store>/<job_id>/job.json            # the Job, minus chunk urls, plus "owner"
    <store>/<job_id>/chunks/00000.zip    # chunk archives
    <store>/keys.json                    # {"<api key>": "<owner>"}

Every lookup takes a job id that must match ``JOB_ID_PATTERN`` and an integer chunk
index, so no request can name a path outside the store.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from .. import config
from ..auth import clean_key, key_problem
from ..config import DEFAULT_OWNER, ENV_SERVER_KEYS, JOB_ID_PATTERN, SHA256_PATTERN
from ..units import parse_time

__all__ = [
    "KEYS_FILE",
    "JobStore",
    "KeyRing",
    "ensure_server_keys",
    "load_server_keys",
    "open_regular",
    "valid_job_id",
]

KEYS_FILE = "keys.json"
_JOB_FILE = "job.json"
_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
_SHA256_RE = re.compile(SHA256_PATTERN)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE})  # the process's, or the system's

log = logging.getLogger("pixcrawler.server")


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


def open_regular(path: Path) -> tuple[IO[bytes], os.stat_result] | None:
    """``path`` open for reading, with its stat; None when no regular file is there.

    Opened non-blocking: a FIFO put in the store must not block the open (and the request,
    or the whole server) until something writes to it. Other errors than "no such file"
    are raised: running out of descriptors, or no permission, says nothing about the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_BINARY", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


@dataclass(frozen=True)
class _Cached:
    signature: tuple[int, int, int]  # (inode, size, mtime_ns) of the job.json read
    job: dict[str, Any] | None  # None: too large to be served


class JobStore:
    """Jobs and chunk files of one store folder, with job.json reads cached.

    A job.json is re-read only when its inode, size or mtime changes, so a job rewritten
    by ``pack``/``write_job`` (always via rename) is seen on the next request.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[str, _Cached] = {}

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's job.json as a dict, or None when there is no such (valid) job.

        Raises OSError when a job.json is there but cannot be read (out of descriptors, no
        permission): "no such job" would be taken as final by a client.
        """
        if not valid_job_id(job_id):
            return None
        path = self.root / job_id / _JOB_FILE
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(job_id, None)
            return None
        cached = self._cache.get(job_id)
        if cached is not None and cached.signature == _signature(st):
            return cached.job
        opened = open_regular(path)
        if opened is None:  # gone since the stat, or a FIFO, a folder...
            return None
        f, st = opened  # the stat of what is read, so the cache never pairs it with another
        limit = config.MAX_JOB_BYTES
        with f:
            # + 1: it may have grown since the stat
            data = None if st.st_size > limit else f.read(limit + 1)
        if data is None or len(data) > limit:
            # Said once per version of the file (remembered as "not there"), not per request.
            log.warning("job %s is not served: its job.json is over %d bytes", job_id, limit)
            self._cache[job_id] = _Cached(_signature(st), None)
            return None
        try:
            job = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: absurd nesting
            # A job.json half-written or hand-edited badly is "not there", not a crash.
            return None
        if not _well_formed(job, job_id):
            return None
        job = {"id": job_id, **job}  # a job.json may leave its id to its folder's name
        self._cache[job_id] = _Cached(_signature(st), job)
        return job

    def jobs_of(self, owner: str) -> list[dict[str, Any]]:
        """Every job of ``owner``, newest first (ties by id, so pages are stable).

        Out of file descriptors, raises OSError (a moment's shortage: clients retry). A
        job.json that cannot be read for good (no permission ...) is left out, and the
        server log says so: it may be anyone's, and must not fail every owner's listing.
        """
        try:
            with os.scandir(self.root) as entries:
                names = [entry.name for entry in entries if entry.is_dir()]
        except (FileNotFoundError, NotADirectoryError):  # the store was removed
            return []
        jobs = []
        for name in names:
            try:
                job = self.get(name)
            except OSError as exc:
                if exc.errno in OUT_OF_FILES:
                    raise
                log.warning("job %s left out of listings: %s", name, exc.strerror or exc)
                continue
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


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _created(job: dict[str, Any]) -> datetime | None:
    value = job.get("created_at")
    return parse_time(value) if isinstance(value, str) else None


def _well_formed(job: Any, job_id: str) -> bool:
    """Whether a parsed job.json can be served: an object of this id, that a JSON answer
    can carry, whose chunks, if any, are objects with an integer ``index`` >= 0 and a
    ``sha256``, if any, of 64 hex digits (what the endpoints rely on)."""
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
        isinstance(chunk, dict)
        and _is_index(chunk.get("index"))
        and _is_sha256(chunk.get("sha256"))
        for chunk in chunks
    )


def _is_index(value: Any) -> bool:
    # bool is an int subclass, but "index": true is a hand-editing slip, not chunk 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: Any) -> bool:
    # It becomes the chunk's ETag header: anything else could break the header (a 500, or
    # a dropped connection), and the SDK refuses a job listing it anyway.
    return value is None or (isinstance(value, str) and _SHA256_RE.fullmatch(value) is not None)


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
            # Bytes: json reads UTF-8 with or without a byte-order mark (Notepad) and UTF-16
            # (what PowerShell 5's > writes), as job.json is read.
            data = json.loads(path.read_bytes())
        except json.JSONDecodeError as exc:  # where, never what (the text may hold a key)
            raise ValueError(
                f"cannot read {path}: not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
            ) from None
        except (OSError, ValueError, RecursionError) as exc:
            raise ValueError(f"cannot read {path}: {type(exc).__name__}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip()
            for k, v in data.items()
        ):
            raise ValueError(f'{path} must be a JSON object {{"<api key>": "<owner>", ...}}')
        # Stripped as the request headers are (and the SDK's keys): a key pasted with its
        # newline would otherwise never match.
        for number, (key, owner) in enumerate(data.items(), start=1):
            keys[_usable(key.strip(), f"key {number} of {path}")] = owner.strip()
    # Quoted whole, as Docker's --env-file passes a quoted value on: not a key '"k', an
    # owner 'default"'.
    keys.update(_parse_env_keys(clean_key(env.get(ENV_SERVER_KEYS, ""))))
    return keys


def _usable(key: str, where: str) -> str:
    """``key`` if a client can send it (the SDK refuses white space, control characters
    and non-ASCII), else a ValueError naming ``where``, never the key: a server that
    starts with only such keys is one nobody can use."""
    problem = key_problem(key)
    if problem:
        raise ValueError(f"{where} cannot be used as an API key: {problem}")
    return key


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
        keys[_usable(key.strip(), f"entry {number} of {ENV_SERVER_KEYS}")] = owner.strip()
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
