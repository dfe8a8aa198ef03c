"""The reference API server: wire contract v1 over a store on disk, as a FastAPI app.

Endpoints (all but the health check need a key, as ``Authorization: Bearer`` or ``X-API-Key``)::

    GET /api/v1/health (and /health)             {"status": "healthy"}
    GET /api/v1/jobs?page=1&size=50              the caller's jobs, paginated
    GET /api/v1/jobs/{job_id}                    one job; chunk urls once completed
    GET /api/v1/jobs/{job_id}/chunks/{index}     a chunk archive; Range, ETag

Each also answers HEAD with the same status and headers and no body.
Every error is ``{"error": {"type", "message", "status_code"}}``. A job of another owner
is a 404, exactly as a job that does not exist, so ids cannot be probed. Answers to a key
are ``Cache-Control: private`` (no shared cache keeps them) and, but for chunks,
``no-store``. A server out of file descriptors answers 503, which clients retry.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import API_PREFIX, DEFAULT_OWNER, DEFAULT_PAGE_SIZE, MAX_API_ANSWER
from .store import (
    OUT_OF_FILES,
    JobStore,
    KeyRing,
    existing_store,
    load_server_keys,
    open_regular,
)

__all__ = ["MAX_PAGE_SIZE", "create_app"]

log = logging.getLogger("pixcrawler.server")

MAX_PAGE_SIZE = 1000
# Bytes per read when streaming a chunk: large enough that the per-block cost (a thread
# hop and an ASGI message) is small next to the copy, small enough to bound memory.
_SEND_BLOCK = 1 << 20
# A chunk index has at most this many digits; longer ones cannot name a chunk.
_MAX_INDEX_DIGITS = 9
# A Range bound this long is past the end of any file; int() of it would only cost time.
_MAX_RANGE_DIGITS = 18
# Seconds a client out of luck for a file descriptor waits: downloads end all the time.
_OUT_OF_FILES_RETRY_AFTER = 1

# What a key unlocks is the caller's own: no shared cache may keep it, and the answer
# differs by key. Job JSON changes as a job runs, so it is not kept at all; a chunk is
# bytes of one sha256 (its ETag), which the caller's own cache may keep.
_VARY = {"Vary": "Authorization, X-API-Key"}
_NO_STORE = {"Cache-Control": "private, no-store", **_VARY}
_PRIVATE = {"Cache-Control": "private", **_VARY}

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    416: "RangeNotSatisfiable",
    422: "ValidationError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
_INDEX_RE = re.compile(rf"[0-9]{{1,{_MAX_INDEX_DIGITS}}}", re.ASCII)
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII | re.IGNORECASE)
_UNSATISFIABLE = (-1, -1)
_Endpoint = Callable[..., Any]  # async, or plain (run on a worker thread)

# The OpenAPI document describes what the endpoints really send (a fuzzer checks it): the
# error JSON for every error status, and the chunk endpoint's zip bodies.
_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message", "status_code"],
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "status_code": {"type": "integer"},
            },
        }
    },
}
_CHUNK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["index", "url"],
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "url": {"type": "string"},
        "size_bytes": {"type": ["integer", "null"]},
        "sha256": {"type": ["string", "null"]},
        "image_count": {"type": ["integer", "null"]},
        "expires_at": {"type": ["string", "null"]},
    },
}
_JOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "status"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": ["string", "null"]},
        "status": {"enum": ["pending", "running", "completed", "failed", "cancelled"]},
        "progress": {"type": "number", "minimum": 0, "maximum": 100},
        "labels": {"type": "array", "items": {"type": "string"}},
        "chunks": {"type": "array", "items": _CHUNK_SCHEMA},
    },
}
_JOB_LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["items", "total", "page", "size", "pages"],
    "properties": {
        "items": {"type": "array", "items": _JOB_SCHEMA},
        "total": {"type": "integer", "minimum": 0},
        "page": {"type": "integer", "minimum": 1},
        "size": {"type": "integer", "minimum": 1},
        "pages": {"type": "integer", "minimum": 0},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: _json(_ERROR_SCHEMA, _ERROR_TYPES[code]) for code in codes}


def _zip(description: str) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary"}
    return {"description": description, "content": {"application/zip": {"schema": binary}}}


# Documentation only: _caller reads both headers itself, so the 401 stays the contract's.
_BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")
_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False)
_AUTHENTICATED = [Depends(_BEARER), Depends(_KEY_HEADER)]


class ApiError(StarletteHTTPException):
    """An error answered as the contract's error JSON; ``message`` is safe to show."""

    def __init__(
        self, status_code: int, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status_code, detail=message, headers=dict(headers or {}))


async def _caller(request: Request) -> str:
    """The owner behind the request's key; 401 without a valid one."""
    ring: KeyRing = request.app.state.keyring
    headers = request.headers
    scheme, _, token = headers.get("authorization", "").partition(" ")
    owner = None
    if scheme.lower() == "bearer":
        owner = ring.owner_of(token.strip())
    if owner is None:
        owner = ring.owner_of(headers.get("x-api-key", "").strip())
    if owner is None:
        given = "authorization" in headers or "x-api-key" in headers
        raise ApiError(
            401,
            "invalid API key"
            if given
            else "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            {"WWW-Authenticate": "Bearer"},
        )
    return owner


# A module-level alias: FastAPI resolves the endpoints' (string) annotations in this module.
Owner = Annotated[str, Depends(_caller)]


def create_app(
    store: Path,
    keys: Mapping[str, str] | None = None,
    *,
    chunk_base_url: str | None = None,
) -> FastAPI:
    """Build the API app serving the jobs in ``store``.

    ``keys`` maps API key -> owner; None reads ``<store>/keys.json`` and
    ``PIXCRAWLER_SERVER_KEYS`` once, now. With ``chunk_base_url`` a completed job lists
    absolute chunk urls ``{chunk_base_url}/{job_id}/chunks/{index:05d}.zip`` (for a static
    host or CDN serving the chunks) instead of this server's chunk endpoint. Publish only
    the ``*/chunks/`` folders there: the store also holds ``keys.json`` and every owner's
    ``job.json``, which a static host would serve to anyone.

    Example::

        app = create_app(Path("store"), {"my-key": "default"})
        uvicorn.run(app, port=8000)
    """
    store = existing_store(store)
    jobs = JobStore(store)
    ring = KeyRing(load_server_keys(store) if keys is None else keys)
    base_url = chunk_base_url.rstrip("/") if chunk_base_url else None

    # No redirect_slashes: "/jobs/" must be a 404 like any other unknown path, not a 307.
    app = FastAPI(
        title="PixCrawler reference server",
        version="1",
        redirect_slashes=False,
    )
    app.state.keyring = ring
    _install_error_handlers(app)

    def owned_job(job_id: str, owner: str) -> dict[str, Any]:
        with _store_errors():
            job = jobs.get(job_id)
        # A job.json without "owner" belongs to "default", as jobs_of() lists it.
        if job is None or job.get("owner", DEFAULT_OWNER) != owner:
            raise ApiError(404, f"job {job_id!r} not found")
        return job

    def chunk_url(job_id: str, index: int) -> str:
        if base_url is not None:
            return f"{base_url}/{job_id}/chunks/{index:05d}.zip"
        return f"{API_PREFIX}/jobs/{job_id}/chunks/{index}"

    def get_and_head(path: str, **options: Any) -> Callable[[_Endpoint], _Endpoint]:
        """Route GET ``path`` to the endpoint, and HEAD too (kept out of the OpenAPI schema,
        which lists each operation once): curl -I, link checkers and download managers ask
        for the headers alone."""

        def register(endpoint: _Endpoint) -> _Endpoint:
            app.get(path, **options)(endpoint)
            app.add_api_route(
                path,
                endpoint,
                methods=["HEAD"],
                include_in_schema=False,
                dependencies=options.get("dependencies"),
                response_class=options.get("response_class", JSONResponse),
            )
            return endpoint

        return register

    async def health(response: Response) -> dict[str, str]:
        # A cached "healthy" would say nothing about the server.
        response.headers["Cache-Control"] = "no-store"
        return {"status": "healthy"}

    # The contract puts every path under /api/v1; /health stays for probes that expect it.
    get_and_head(API_PREFIX + "/health")(health)
    get_and_head("/health")(health)

    # The endpoints that read the store are plain functions: FastAPI runs them on worker
    # threads, so a cold listing of thousands of jobs, or a slow disk, holds up no other
    # request (a health check, the blocks of a download).
    @get_and_head(
        API_PREFIX + "/jobs",
        dependencies=_AUTHENTICATED,
        responses={200: _json(_JOB_LIST_SCHEMA, "The caller's jobs"), **_errors(401, 422, 503)},
    )
    def list_jobs(
        owner: Owner,
        page: Annotated[int, Query(ge=1)] = 1,
        size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    ) -> JSONResponse:
        with _store_errors():
            mine = jobs.jobs_of(owner)
        start = (page - 1) * size
        items = [_public(job) for job in mine[start : start + size]]
        return JSONResponse(
            {
                "items": items,
                "total": len(mine),
                "page": page,
                "size": size,
                "pages": math.ceil(len(mine) / size),
            },
            headers=_NO_STORE,
        )

    @get_and_head(
        API_PREFIX + "/jobs/{job_id}",
        dependencies=_AUTHENTICATED,
        responses={200: _json(_JOB_SCHEMA, "The job"), **_errors(401, 404, 422, 503)},
    )
    def get_job(job_id: str, owner: Owner) -> JSONResponse:
        job = owned_job(job_id, owner)
        body = _public(job)
        chunks = (job.get("chunks") or []) if job.get("status") == "completed" else []
        body["chunks"] = [{**c, "url": chunk_url(job_id, int(c["index"]))} for c in chunks]
        response = JSONResponse(body, headers=_NO_STORE)
        if len(response.body) > MAX_API_ANSWER:
            # More than the SDK reads of an answer (each chunk's URL added to job.json):
            # "not there", as a job.json past the store's cap is.
            log.warning(
                "job %s is not served: its answer would be over %d bytes", job_id, MAX_API_ANSWER
            )
            raise ApiError(404, f"job {job_id!r} not found")
        return response

    @get_and_head(
        API_PREFIX + "/jobs/{job_id}/chunks/{index}",
        dependencies=_AUTHENTICATED,
        response_class=Response,
        responses={
            200: _zip("The chunk archive"),
            206: _zip("The requested byte range of the chunk archive"),
            **_errors(401, 404, 416, 422, 503),
        },
    )
    def get_chunk(job_id: str, index: str, owner: Owner, request: Request) -> Response:
        job = owned_job(job_id, owner)
        if job.get("status") != "completed":
            raise ApiError(
                404,
                f"job {job_id!r} is {job.get('status')} ({job.get('progress', 0)}%) "
                "and has no chunks yet",
            )
        chunk = _find_chunk(job, index)
        if chunk is None:
            raise ApiError(404, f"job {job_id!r} has no chunk {index!r}")
        # Opened here, not in the body iterator, so a missing file is a clean 404. Other
        # errors are no answer about the chunk: a 503 (_store_errors) or a 500, both retried.
        with _store_errors():
            opened = open_regular(jobs.chunk_path(job_id, int(chunk["index"])))
        if opened is None:
            raise ApiError(404, f"chunk {index} of job {job_id!r} is missing")
        f, st = opened
        try:
            return _chunk_response(f, st.st_size, chunk, request)
        except BaseException:
            f.close()
            raise

    return app


def _public(job: Mapping[str, Any]) -> dict[str, Any]:
    """The job as the API shows it: no owner, no chunks (added by the caller if due)."""
    return {k: v for k, v in job.items() if k not in ("owner", "chunks")}


def _find_chunk(job: Mapping[str, Any], index: str) -> Mapping[str, Any] | None:
    if not _INDEX_RE.fullmatch(index):
        return None  # negative, signed, non-ASCII digits, huge: never a chunk
    number = int(index)
    chunks = job.get("chunks") or []
    # Packed jobs list chunk i at position i; other producers may not, hence the scan.
    if number < len(chunks) and int(chunks[number].get("index", -1)) == number:
        return chunks[number]  # type: ignore[no-any-return]
    for chunk in chunks:
        if int(chunk.get("index", -1)) == number:
            return chunk  # type: ignore[no-any-return]
    return None


def _chunk_response(
    f: IO[bytes], size: int, chunk: Mapping[str, Any], request: Request
) -> Response:
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{int(chunk["index"]):05d}.zip"',
        **_PRIVATE,
    }
    sha256 = chunk.get("sha256")  # 64 hex digits or None (the store checked it)
    # Lower case, as hexdigest() writes it: one file has one ETag however job.json spells it.
    etag = f'"{sha256.lower()}"' if isinstance(sha256, str) else None
    if etag is not None:
        headers["ETag"] = etag
    start, end, status = 0, size, 200
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    # If-Range that does not match the current ETag: the client's partial bytes are of
    # another file, so it must get the whole new one (RFC 9110 13.1.5).
    if range_header is not None and (if_range is None or (etag is not None and if_range == etag)):
        parsed = _parse_range(range_header, size)
        if parsed == _UNSATISFIABLE:
            f.close()
            raise ApiError(
                416,
                f"range {range_header!r} is outside the chunk's {size} bytes",
                {"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"},
            )
        if parsed is not None:
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        f.close()
        return Response(status_code=status, headers=headers, media_type="application/zip")
    return StreamingResponse(
        _file_blocks(f, start, end),
        status_code=status,
        headers=headers,
        media_type="application/zip",
    )


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as [start, end), ``_UNSATISFIABLE``, or None to ignore it.

    Malformed headers, other units and multiple ranges are ignored (a 200 with the whole
    file), as RFC 9110 14.2 allows; multipart/byteranges buys a chunk client nothing.
    """
    match = _RANGE_RE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first:
        start = _bounded_int(first, size)
        if last:
            stop = _bounded_int(last, size)
            if stop < start:
                return None  # "500-100" is invalid syntax, not an empty range
            end = min(stop + 1, size)
        else:
            end = size
        return (start, end) if start < size else _UNSATISFIABLE
    if last:
        suffix = _bounded_int(last, size)
        if suffix == 0 or size == 0:
            return _UNSATISFIABLE
        return max(0, size - suffix), size
    return None  # "bytes=-"


def _bounded_int(digits: str, size: int) -> int:
    digits = digits.lstrip("0") or "0"  # "000…010" is 10, however many zeros lead it
    return int(digits) if len(digits) <= _MAX_RANGE_DIGITS else max(size, 10**_MAX_RANGE_DIGITS)


async def _file_blocks(f: IO[bytes], start: int, end: int) -> AsyncIterator[bytes]:
    """Yield ``f[start:end]`` in blocks, reading on a worker thread; closes ``f``."""
    try:
        f.seek(start)  # only moves the offset: no I/O to wait for
        remaining = end - start
        while remaining > 0:
            block = await anyio.to_thread.run_sync(f.read, min(_SEND_BLOCK, remaining))
            if not block:
                break  # file shrank under us; the short body tells the client
            remaining -= len(block)
            yield block
    finally:
        f.close()


# -- errors ------------------------------------------------------------------------------


@contextmanager
def _store_errors() -> Iterator[None]:
    """Out of file descriptors, reading the store: a 503 to retry shortly (downloads end and
    free theirs), not a missing job or chunk, which the SDK would take as final. Any other
    error reading it is the server's: a 500, logged (no path sent)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in OUT_OF_FILES:
            raise ApiError(
                503,
                "the server is out of file descriptors; retry shortly",
                {"Retry-After": str(_OUT_OF_FILES_RETRY_AFTER)},
            ) from exc
        raise


def _error_response(
    status_code: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    error_type = _ERROR_TYPES.get(status_code, "HTTPError")
    body = {"error": {"type": error_type, "message": message, "status_code": status_code}}
    return JSONResponse(body, status_code=status_code, headers={**_NO_STORE, **(headers or {})})


def _install_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, StarletteHTTPException):  # pragma: no cover - registration
            raise exc
        if isinstance(exc, ApiError):
            message = str(exc.detail)
        elif exc.status_code == 404:
            message = f"no endpoint at {request.url.path!r}"
        else:
            message = str(exc.detail)
        headers = exc.headers
        if exc.status_code == 405:  # every route answers HEAD too (get_and_head)
            headers = {**(headers or {}), "Allow": "GET, HEAD"}
        return _error_response(exc.status_code, message, headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, RequestValidationError):  # pragma: no cover - registration
            raise exc
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return _error_response(422, "; ".join(problems) or "invalid request")

    async def internal_error(request: Request, exc: Exception) -> Response:
        # The details go to the server log (uvicorn), never to the client.
        return _error_response(500, "internal server error")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
