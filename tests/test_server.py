"""The reference server speaks wire contract v1 over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import logging
import os
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from conftest import LiveServer
from constants import (
    JOB_MIXED,
    JOB_OTHER,
    JOB_UNIFORM,
    OTHER_KEY,
    TEST_KEY,
    TEST_KEYS,
    UNFINISHED_JOBS,
    UNIFORM_CHUNK_SIZE,
    UNIFORM_LABELS,
    UNIFORM_SIZE,
    UNIFORM_TOTAL,
)
from helpers import raw_get
from imagegen import make_image_folder
from pixcrawler import config
from pixcrawler.config import DEFAULT_OWNER, ENV_SERVER_KEYS
from pixcrawler.models import Job
from pixcrawler.packer import pack, write_job
from pixcrawler.server import create_app, run_in_thread, runner
from pixcrawler.server.store import (
    KEYS_FILE,
    JobStore,
    KeyRing,
    ensure_server_keys,
    load_server_keys,
)

pytestmark = pytest.mark.timeout(30)

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
SECRET = "TOP-SECRET-OUTSIDE"
MY_JOBS = {JOB_UNIFORM, JOB_MIXED} | {job_id for job_id, _, _ in UNFINISHED_JOBS}


def get(
    http: urllib3.PoolManager, url: str, headers: dict[str, str] | None = None
) -> urllib3.BaseHTTPResponse:
    return http.request("GET", url, headers=headers if headers is not None else AUTH)


def assert_error(response: urllib3.BaseHTTPResponse, status: int, error_type: str) -> str:
    """The response is the contract's error JSON; return its message."""
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == error_type
    assert body["error"]["status_code"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return str(body["error"]["message"])


def job_json(store: Path, job_id: str) -> dict[str, Any]:
    return dict(json.loads((store / job_id / "job.json").read_text()))


EMPTY_ZIP = b"PK\x05\x06" + bytes(18)


def write_completed_job(
    store: Path, job_id: str, chunk: bytes | None = EMPTY_ZIP, **fields: Any
) -> Path:
    """A completed job of one chunk, ``fields`` added to its entry; returns the chunk's
    path, where ``chunk`` is written unless it is None."""
    (store / job_id / "chunks").mkdir(parents=True)
    job = {"id": job_id, "status": "completed", "progress": 100}
    job["chunks"] = [{"index": 0, **fields}]
    (store / job_id / "job.json").write_text(json.dumps(job))
    path = store / job_id / "chunks" / "00000.zip"
    if chunk is not None:
        path.write_bytes(chunk)
    return path


def unblock(fifo: Path) -> None:
    """Let a reader blocked opening ``fifo`` go on (it reads an end of file), so a server
    that opened it blocking is not left stuck when a test fails."""
    with contextlib.suppress(OSError):  # ENXIO: no reader waits, nothing to do
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


# -- health and auth ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/health", "/health"])
def test_health_needs_no_key(live_server: LiveServer, http: urllib3.PoolManager, path: str) -> None:
    response = get(http, live_server.base_url + path, headers={})
    assert response.status == 200
    assert response.json() == {"status": "healthy"}


def test_missing_key_is_401_with_error_json(
    live_server: LiveServer, http: urllib3.PoolManager
) -> None:
    response = get(http, f"{live_server.base_url}/api/v1/jobs/{JOB_UNIFORM}", headers={})
    message = assert_error(response, 401, "AuthenticationError")
    assert "Bearer" in message
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong-key"},
        {"X-API-Key": "wrong-key"},
        {"Authorization": f"Basic {TEST_KEY}"},
        {"Authorization": "Bearer"},
    ],
)
def test_wrong_key_is_401_and_never_echoed(
    live_server: LiveServer, http: urllib3.PoolManager, headers: dict[str, str]
) -> None:
    response = get(http, f"{live_server.base_url}/api/v1/jobs", headers=headers)
    assert_error(response, 401, "AuthenticationError")
    assert b"wrong-key" not in response.data
    assert TEST_KEY.encode() not in response.data


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {TEST_KEY}"},
        {"Authorization": f"bearer {TEST_KEY}"},
        {"X-API-Key": TEST_KEY},
        {"Authorization": "Bearer wrong-key", "X-API-Key": TEST_KEY},
    ],
)
def test_bearer_and_x_api_key_both_authenticate(
    live_server: LiveServer, http: urllib3.PoolManager, headers: dict[str, str]
) -> None:
    response = get(http, f"{live_server.base_url}/api/v1/jobs/{JOB_UNIFORM}", headers=headers)
    assert response.status == 200
    assert response.json()["id"] == JOB_UNIFORM


def test_another_owners_job_is_404_like_a_missing_one(
    live_server: LiveServer, http: urllib3.PoolManager
) -> None:
    base = live_server.base_url
    mine = get(http, f"{base}/api/v1/jobs/{JOB_OTHER}", {"Authorization": f"Bearer {OTHER_KEY}"})
    assert mine.status == 200
    assert mine.json()["id"] == JOB_OTHER

    theirs = get(http, f"{base}/api/v1/jobs/{JOB_OTHER}")
    missing = get(http, f"{base}/api/v1/jobs/job_does_not_exist")
    assert_error(theirs, 404, "NotFoundError")
    assert_error(missing, 404, "NotFoundError")
    chunk = get(http, f"{base}/api/v1/jobs/{JOB_OTHER}/chunks/0")
    assert_error(chunk, 404, "NotFoundError")
    assert not chunk.data.startswith(b"PK")
    # The other owner cannot see ours either.
    ours = get(http, f"{base}/api/v1/jobs/{JOB_UNIFORM}", {"X-API-Key": OTHER_KEY})
    assert_error(ours, 404, "NotFoundError")


def test_answers_to_a_key_are_kept_by_no_shared_cache(
    live_server: LiveServer, http: urllib3.PoolManager
) -> None:
    """A proxy or CDN in front of the server must not hand one caller's jobs or chunks to
    the next, nor a job's old status to its owner: answers depend on the key (Vary), job
    JSON and errors are never stored, chunks only by the caller's own cache."""
    base = live_server.base_url
    vary = "Authorization, X-API-Key"
    for path, headers in [
        ("/api/v1/jobs", AUTH),
        (f"/api/v1/jobs/{JOB_UNIFORM}", AUTH),
        ("/api/v1/jobs/job_does_not_exist", AUTH),
        (f"/api/v1/jobs/{JOB_UNIFORM}/chunks/99", AUTH),
        ("/api/v1/jobs", {}),  # 401
    ]:
        response = get(http, base + path, headers)
        assert response.headers["Cache-Control"] == "private, no-store", path
        assert response.headers["Vary"] == vary, path
    for headers in (AUTH, {**AUTH, "Range": "bytes=0-9"}):
        chunk = get(http, f"{base}/api/v1/jobs/{JOB_UNIFORM}/chunks/0", headers)
        assert chunk.status in (200, 206)
        assert (chunk.headers["Cache-Control"], chunk.headers["Vary"]) == ("private", vary)
    # A "healthy" from a cache would say nothing about the server.
    health = get(http, base + "/api/v1/health", {})
    assert health.headers["Cache-Control"] == "no-store"


# -- listing -----------------------------------------------------------------------------


def test_list_shows_only_the_callers_jobs_without_chunks(
    live_server: LiveServer, http: urllib3.PoolManager
) -> None:
    body = get(http, f"{live_server.base_url}/api/v1/jobs").json()
    assert (body["total"], body["page"], body["size"], body["pages"]) == (len(MY_JOBS), 1, 50, 1)
    assert {item["id"] for item in body["items"]} == MY_JOBS
    for item in body["items"]:
        assert "chunks" not in item
        assert "owner" not in item
        assert item["status"] in ("pending", "running", "completed", "failed", "cancelled")

    theirs = get(http, f"{live_server.base_url}/api/v1/jobs", {"X-API-Key": OTHER_KEY}).json()
    assert [item["id"] for item in theirs["items"]] == [JOB_OTHER]
    assert theirs["total"] == 1


def test_list_paginates_without_overlap(live_server: LiveServer, http: urllib3.PoolManager) -> None:
    url = f"{live_server.base_url}/api/v1/jobs"
    pages = [get(http, f"{url}?page={page}&size=4").json() for page in (1, 2, 3)]
    assert [len(p["items"]) for p in pages] == [4, len(MY_JOBS) - 4, 0]
    assert all(p["total"] == len(MY_JOBS) and p["pages"] == 2 and p["size"] == 4 for p in pages)
    assert [p["page"] for p in pages] == [1, 2, 3]
    seen = [item["id"] for p in pages for item in p["items"]]
    assert sorted(seen) == sorted(MY_JOBS)
    # The order is stable from one request to the next.
    assert get(http, f"{url}?page=1&size=4").json()["items"] == pages[0]["items"]


def test_jobs_are_listed_newest_first_by_their_time_not_its_text(tmp_path: Path) -> None:
    """13:00+02:00 is 11:00 UTC: as text it sorted before 12:30Z."""
    created = {
        "job_a": "2026-01-01T13:00:00+02:00",
        "job_b": "2026-01-01T12:30:00Z",
        "job_c": "2026-01-01T12:00:00.500Z",
        "job_d": None,  # undated: last
    }
    for job_id, when in created.items():
        path = write_job(tmp_path, job_id, status="pending", progress=0)
        path.write_text(json.dumps({**json.loads(path.read_text()), "created_at": when}))
    listed = [job["id"] for job in JobStore(tmp_path).jobs_of(DEFAULT_OWNER)]
    assert listed == ["job_b", "job_c", "job_a", "job_d"]


@pytest.mark.parametrize(
    "query", ["page=0", "page=-1", "size=0", "size=1001", "page=abc", "size=1.5"]
)
def test_bad_pagination_is_422_validation_error(
    live_server: LiveServer, http: urllib3.PoolManager, query: str
) -> None:
    response = get(http, f"{live_server.base_url}/api/v1/jobs?{query}")
    message = assert_error(response, 422, "ValidationError")
    assert query.split("=")[0] in message


# -- job shapes --------------------------------------------------------------------------


def test_completed_job_lists_chunks_with_api_urls(
    live_server: LiveServer, http: urllib3.PoolManager
) -> None:
    body = get(http, f"{live_server.base_url}/api/v1/jobs/{JOB_UNIFORM}").json()
    on_disk = job_json(live_server.store, JOB_UNIFORM)
    assert body["status"] == "completed"
    assert body["progress"] == 100
    assert body["total_images"] == UNIFORM_TOTAL
    assert body["chunk_size"] == UNIFORM_CHUNK_SIZE
    assert body["labels"] == sorted(UNIFORM_LABELS)
    assert body["image_size"] == list(UNIFORM_SIZE)
    assert body["version"] == 1
    assert "owner" not in body
    assert [c["index"] for c in body["chunks"]] == [0, 1, 2, 3]
    for chunk, stored in zip(body["chunks"], on_disk["chunks"], strict=True):
        assert chunk["url"] == f"/api/v1/jobs/{JOB_UNIFORM}/chunks/{chunk['index']}"
        assert {k: v for k, v in chunk.items() if k != "url"} == stored
    # Everything but urls and owner is job.json as written.
    assert {k: v for k, v in body.items() if k != "chunks"} == {
        k: v for k, v in on_disk.items() if k not in ("chunks", "owner")
    }
    job = Job.from_json(body)
    assert job.image_size == UNIFORM_SIZE
    assert sum(c.image_count or 0 for c in job.chunks) == UNIFORM_TOTAL


def test_mixed_size_job_has_no_image_size(
    live_server: LiveServer, http: urllib3.PoolManager
) -> None:
    body = get(http, f"{live_server.base_url}/api/v1/jobs/{JOB_MIXED}").json()
    assert body["image_size"] is None
    assert "animals/cat" in body["labels"]


@pytest.mark.parametrize(("job_id", "status", "progress"), UNFINISHED_JOBS)
def test_unfinished_job_reports_status_and_progress_and_no_chunks(
    live_server: LiveServer,
    http: urllib3.PoolManager,
    job_id: str,
    status: str,
    progress: float,
) -> None:
    body = get(http, f"{live_server.base_url}/api/v1/jobs/{job_id}").json()
    assert (body["id"], body["status"], body["progress"]) == (job_id, status, progress)
    assert body["chunks"] == []
    response = get(http, f"{live_server.base_url}/api/v1/jobs/{job_id}/chunks/0")
    message = assert_error(response, 404, "NotFoundError")
    assert status in message


# -- chunks ------------------------------------------------------------------------------


def test_chunk_download_is_the_file_and_matches_etag_and_job_json(
    live_server: LiveServer, http: urllib3.PoolManager
) -> None:
    on_disk = job_json(live_server.store, JOB_UNIFORM)
    for chunk in on_disk["chunks"]:
        index = chunk["index"]
        response = get(http, f"{live_server.base_url}/api/v1/jobs/{JOB_UNIFORM}/chunks/{index}")
        expected = (live_server.store / JOB_UNIFORM / "chunks" / f"{index:05d}.zip").read_bytes()
        assert response.status == 200
        assert response.data == expected
        digest = hashlib.sha256(response.data).hexdigest()
        assert response.headers["ETag"] == f'"{digest}"'
        assert digest == chunk["sha256"]
        assert int(response.headers["Content-Length"]) == len(expected) == chunk["size_bytes"]
        assert response.headers["Content-Type"] == "application/zip"
        assert response.headers["Accept-Ranges"] == "bytes"


def chunk_url(server: LiveServer, index: int = 0) -> str:
    return f"{server.base_url}/api/v1/jobs/{JOB_UNIFORM}/chunks/{index}"


def chunk_bytes(server: LiveServer, index: int = 0) -> bytes:
    return (server.store / JOB_UNIFORM / "chunks" / f"{index:05d}.zip").read_bytes()


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-99", 0, 100),  # the first bytes
        ("bytes=100-299", 100, 300),  # the middle
        ("bytes=500-", 500, None),  # resume: open-ended
        ("bytes=-100", -100, None),  # the last bytes
        ("bytes=10-999999999", 10, None),  # an end past the file is clamped
        ("bytes=-999999999", 0, None),  # a suffix longer than the file is all of it
        ("BYTES=0-0", 0, 1),  # unit names are case-insensitive
    ],
)
def test_single_range_is_206_with_content_range(
    live_server: LiveServer, http: urllib3.PoolManager, header: str, start: int, stop: int | None
) -> None:
    data = chunk_bytes(live_server)
    expected = data[start:stop]
    response = get(http, chunk_url(live_server), {**AUTH, "Range": header})
    assert response.status == 206
    assert response.data == expected
    positions = range(len(data))[start:stop]
    expected_range = f"bytes {positions[0]}-{positions[-1]}/{len(data)}"
    assert response.headers["Content-Range"] == expected_range
    assert int(response.headers["Content-Length"]) == len(expected)
    assert response.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'


def test_resumed_download_reassembles_the_chunk(
    live_server: LiveServer, http: urllib3.PoolManager
) -> None:
    data = chunk_bytes(live_server, 1)
    head = get(http, chunk_url(live_server, 1), {**AUTH, "Range": "bytes=0-1233"}).data
    tail = get(http, chunk_url(live_server, 1), {**AUTH, "Range": f"bytes={len(head)}-"}).data
    assert head + tail == data


@pytest.mark.parametrize("header", ["bytes={size}-", "bytes={size}-{size}", "bytes=-0"])
def test_unsatisfiable_range_is_416(
    live_server: LiveServer, http: urllib3.PoolManager, header: str
) -> None:
    size = len(chunk_bytes(live_server))
    response = get(http, chunk_url(live_server), {**AUTH, "Range": header.format(size=size)})
    assert_error(response, 416, "RangeNotSatisfiable")
    assert response.headers["Content-Range"] == f"bytes */{size}"


@pytest.mark.parametrize(
    "header",
    [
        "bytes=abc",
        "bytes=10-5",
        "bytes=-",
        "bytes=0-10,20-30",  # multiple ranges: answered with the whole file
        "items=0-10",
        "0-10",
        "bytes=+1-5",
    ],
)
def test_malformed_or_multiple_range_sends_the_whole_chunk(
    live_server: LiveServer, http: urllib3.PoolManager, header: str
) -> None:
    response = get(http, chunk_url(live_server), {**AUTH, "Range": header})
    assert response.status == 200
    assert response.data == chunk_bytes(live_server)
    assert "Content-Range" not in response.headers


def test_if_range_with_another_etag_sends_the_whole_chunk(
    live_server: LiveServer, http: urllib3.PoolManager
) -> None:
    data = chunk_bytes(live_server)
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    same = get(http, chunk_url(live_server), {**AUTH, "Range": "bytes=5-9", "If-Range": etag})
    assert (same.status, same.data) == (206, data[5:10])
    other = get(http, chunk_url(live_server), {**AUTH, "Range": "bytes=5-9", "If-Range": '"x"'})
    assert (other.status, other.data) == (200, data)


@pytest.mark.parametrize("range_header", [None, "bytes=100-299"])
def test_head_of_a_chunk_is_the_gets_headers_without_a_body(
    live_server: LiveServer, http: urllib3.PoolManager, range_header: str | None
) -> None:
    headers = {**AUTH, **({"Range": range_header} if range_header else {})}
    got = get(http, chunk_url(live_server), headers)
    head = http.request("HEAD", chunk_url(live_server), headers=headers)
    assert head.status == got.status == (206 if range_header else 200)
    assert head.data == b""
    for name in ("Content-Length", "Content-Range", "ETag", "Accept-Ranges", "Content-Type"):
        assert head.headers.get(name) == got.headers.get(name)
    assert int(head.headers["Content-Length"]) == len(got.data)


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/health", {}, 200),
        ("/api/v1/health", {}, 200),
        (f"/api/v1/jobs/{JOB_UNIFORM}", AUTH, 200),
        ("/api/v1/jobs", AUTH, 200),
        (f"/api/v1/jobs/{JOB_UNIFORM}", {}, 401),
        (f"/api/v1/jobs/{JOB_OTHER}", AUTH, 404),
        (f"/api/v1/jobs/{JOB_UNIFORM}/chunks/999", AUTH, 404),
    ],
)
def test_head_answers_every_get_route_with_its_status_and_no_body(
    live_server: LiveServer,
    http: urllib3.PoolManager,
    path: str,
    headers: dict[str, str],
    status: int,
) -> None:
    head = http.request("HEAD", live_server.base_url + path, headers=headers)
    assert (head.status, head.data) == (status, b"")
    assert head.headers["Content-Type"].startswith("application/json")
    schema = get(http, live_server.base_url + "/openapi.json", {}).json()
    assert all("head" not in operations for operations in schema["paths"].values())


def test_large_chunk_streams_in_blocks_and_ranges_cross_blocks(
    tmp_path: Path, server_factory: Any, http: urllib3.PoolManager
) -> None:
    # A 2.5 MiB file spans three of the server's 1 MiB send blocks.
    data = os.urandom(5 << 19)
    write_job(tmp_path, "job_big", status="running", progress=99)
    job = job_json(tmp_path, "job_big")
    job.update(status="completed", progress=100)
    job["chunks"] = [
        {"index": 0, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ]
    (tmp_path / "job_big" / "chunks").mkdir()
    (tmp_path / "job_big" / "chunks" / "00000.zip").write_bytes(data)
    (tmp_path / "job_big" / "job.json").write_text(json.dumps(job))
    url = server_factory(tmp_path) + "/api/v1/jobs/job_big/chunks/0"

    assert get(http, url).data == data
    start, end = (1 << 20) - 10, (2 << 20) + 10
    part = get(http, url, {**AUTH, "Range": f"bytes={start}-{end - 1}"})
    assert (part.status, part.data) == (206, data[start:end])


# -- path safety -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server over a store with a secret beside it and a keys.json in it; its base URL."""
    root = tmp_path_factory.mktemp("guarded")
    store = root / "store"
    src = make_image_folder(root / "src", {"a": 3}, seed=5)
    pack(src, store, job_id="job_a")
    (root / "secret.txt").write_text(SECRET)
    (store / KEYS_FILE).write_text(json.dumps({TEST_KEY: "default", "KEYFILE-SECRET": "x"}))
    # keys=None: the server reads the store's keys.json (one more file worth stealing).
    with run_in_thread(create_app(store, None)) as base_url:
        yield base_url


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/jobs/..%2F..%2Fsecret.txt",
        "/api/v1/jobs/..%2Fkeys.json",
        "/api/v1/jobs/../keys.json",
        "/api/v1/jobs/%2e%2e",
        "/api/v1/jobs/..",
        "/api/v1/jobs/.",
        "/api/v1/jobs/%2Fetc%2Fpasswd",
        "/api/v1/jobs//etc/passwd",
        "/api/v1/jobs/job_a%2F..%2F..%2Fsecret.txt/chunks/0",
        "/api/v1/jobs/job_a/chunks/..%2F..%2Fjob.json",
        "/api/v1/jobs/job_a/chunks/..%2F..%2F..%2Fsecret.txt",
        "/api/v1/jobs/job_a/chunks/%2Fetc%2Fpasswd",
        "/api/v1/jobs/job_a/chunks/-1",
        "/api/v1/jobs/job_a/chunks/1",
        "/api/v1/jobs/job_a/chunks/99999999999999999999999",
        "/api/v1/jobs/job_a/chunks/0x0",
        "/api/v1/jobs/job_a/chunks/%EF%BC%90",  # a full-width zero, which int() accepts
        "/api/v1/jobs/job_a/chunks/+0",
        "/api/v1/jobs/job_a/chunks/0.0",
        "/api/v1/jobs/job_a/chunks/00000.zip",
        "/api/v1/jobs/job_a%00/chunks/0",
        "/api/v1/jobs/job_a/chunks/",
        "/api/v1/jobs/",
        "/api/v1/../../secret.txt",
        "/keys.json",
    ],
)
def test_path_traversal_is_404_and_never_file_contents(guarded: str, target: str) -> None:
    status, body = raw_get(guarded, target, AUTH)
    assert status == 404
    error = json.loads(body)["error"]
    assert (error["type"], error["status_code"]) == ("NotFoundError", 404)
    assert SECRET.encode() not in body
    assert b"KEYFILE-SECRET" not in body
    assert not body.startswith(b"PK")


def test_guarded_store_still_serves_its_job(guarded: str) -> None:
    status, body = raw_get(guarded, "/api/v1/jobs/job_a/chunks/0", AUTH)
    assert status == 200
    assert body.startswith(b"PK")


def test_unknown_route_is_404_error_json(
    live_server: LiveServer, http: urllib3.PoolManager
) -> None:
    response = get(http, f"{live_server.base_url}/api/v2/jobs")
    assert_error(response, 404, "NotFoundError")
    post = http.request("POST", f"{live_server.base_url}/api/v1/jobs", headers=AUTH)
    assert_error(post, 405, "MethodNotAllowedError")
    assert post.headers["Allow"] == "GET, HEAD"  # every route answers HEAD too


# -- options and store changes -----------------------------------------------------------


def test_chunk_base_url_gives_absolute_chunk_urls(
    store: Path, server_factory: Any, http: urllib3.PoolManager
) -> None:
    base_url = server_factory(store, chunk_base_url="http://cdn.example/store/")
    body = get(http, f"{base_url}/api/v1/jobs/{JOB_UNIFORM}").json()
    assert [c["url"] for c in body["chunks"]] == [
        f"http://cdn.example/store/{JOB_UNIFORM}/chunks/{i:05d}.zip" for i in range(4)
    ]
    # Each url names the file a static host serving the store folder would send.
    for chunk in body["chunks"]:
        relative = chunk["url"].removeprefix("http://cdn.example/store/")
        assert hashlib.sha256((store / relative).read_bytes()).hexdigest() == chunk["sha256"]


def test_rewritten_job_json_is_seen_on_the_next_request(
    tmp_path: Path, server_factory: Any, http: urllib3.PoolManager
) -> None:
    write_job(tmp_path, "job_live", status="pending", progress=0)
    url = server_factory(tmp_path) + "/api/v1/jobs/job_live"
    assert get(http, url).json()["status"] == "pending"
    write_job(tmp_path, "job_live", status="running", progress=55.5)
    assert (get(http, url).json()["status"], get(http, url).json()["progress"]) == ("running", 55.5)


@pytest.mark.parametrize(
    "chunks",
    [
        [{"no": 1}],  # no index
        [{"index": "first"}],
        [{"index": "0"}],
        [{"index": -1}],
        [{"index": True}],  # a bool is not an index, though Python calls it an int
        [{"index": 0}, "00001.zip"],  # an entry that is not an object
        {"0": {"index": 0}},  # not a list
        # A sha256 becomes the ETag header: these were a 500 or a dropped connection.
        [{"index": 0, "sha256": "\u20ac" * 64}],
        [{"index": 0, "sha256": "ab\r\nX-Evil: 1"}],
        [{"index": 0, "sha256": 'a"b'}],
        [{"index": 0, "sha256": ""}],
        [{"index": 0, "sha256": "ab" * 31}],
        [{"index": 0, "sha256": "ab" * 32 + "\n"}],
        [{"index": 0, "sha256": 12345}],
    ],
    ids=[
        "no index",
        "word",
        "digit string",
        "negative",
        "bool",
        "string entry",
        "dict",
        "sha256 not ASCII",
        "sha256 with CRLF",
        "sha256 with quote",
        "sha256 empty",
        "sha256 short",
        "sha256 with newline",
        "sha256 number",
    ],
)
def test_job_json_with_malformed_chunks_is_not_there(
    tmp_path: Path, server_factory: Any, http: urllib3.PoolManager, chunks: Any
) -> None:
    """A hand-edited job.json the server cannot answer from is a 404 like any job.json it
    cannot parse (never a 500), and the store's other jobs are still listed."""
    write_job(tmp_path, "job_ok", status="pending", progress=0)
    (tmp_path / "job_bad" / "chunks").mkdir(parents=True)
    (tmp_path / "job_bad" / "chunks" / "00000.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    bad = {"id": "job_bad", "status": "completed", "owner": "default", "chunks": chunks}
    (tmp_path / "job_bad" / "job.json").write_text(json.dumps(bad))
    base_url = server_factory(tmp_path)
    for path in ("/api/v1/jobs/job_bad", "/api/v1/jobs/job_bad/chunks/0"):
        assert_error(get(http, base_url + path), 404, "NotFoundError")
    listed = get(http, base_url + "/api/v1/jobs").json()
    assert [job["id"] for job in listed["items"]] == ["job_ok"]


@pytest.mark.parametrize(
    "text",
    [
        '{"id": "job_bad", "chunks": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"id": "job_bad", "status": "running", "progress": NaN}',
        '{"id": "job_bad", "status": "running", "progress": Infinity}',
        '{"id": "job_bad", "status": "running", "progress": 1e999}',
        '{"id": "job_bad", "status": "running", "name": "\\ud800"}',
    ],
    ids=["nested past the parser's limit", "NaN", "Infinity", "1e999", "lone surrogate"],
)
def test_job_json_a_json_answer_cannot_carry_is_not_there(
    tmp_path: Path, server_factory: Any, http: urllib3.PoolManager, text: str
) -> None:
    """Python's json reads these; a JSON answer cannot carry them (a 500 for the job, and
    for its owner's whole list). They are not there, as a job.json that does not parse."""
    write_job(tmp_path, "job_ok", status="pending", progress=0)
    (tmp_path / "job_bad").mkdir()
    (tmp_path / "job_bad" / "job.json").write_text(text)
    base_url = server_factory(tmp_path)
    assert_error(get(http, base_url + "/api/v1/jobs/job_bad"), 404, "NotFoundError")
    listed = get(http, base_url + "/api/v1/jobs").json()
    assert [job["id"] for job in listed["items"]] == ["job_ok"]


def test_job_json_without_id_is_served_with_its_folders_id(
    tmp_path: Path, server_factory: Any, http: urllib3.PoolManager
) -> None:
    (tmp_path / "job_noid").mkdir()
    job = {"name": "no id", "status": "completed", "progress": 100, "chunks": []}
    (tmp_path / "job_noid" / "job.json").write_text(json.dumps(job))
    base_url = server_factory(tmp_path)
    response = get(http, base_url + "/api/v1/jobs/job_noid")
    assert response.status == 200
    assert Job.from_json(response.json()).id == "job_noid"
    listed = get(http, base_url + "/api/v1/jobs").json()
    assert [job["id"] for job in listed["items"]] == ["job_noid"]


def test_a_sha256_in_upper_case_is_one_etag_with_its_lower_case(
    tmp_path: Path, server_factory: Any, http: urllib3.PoolManager
) -> None:
    """Hex digits of either case name one file (the SDK compares them lower-cased); its
    ETag is the one hexdigest() writes, so a resume's If-Range matches either way."""
    digest = hashlib.sha256(EMPTY_ZIP).hexdigest()
    write_completed_job(tmp_path, "job_upper", sha256=digest.upper())
    url = server_factory(tmp_path) + "/api/v1/jobs/job_upper/chunks/0"
    whole = get(http, url)
    assert (whole.status, whole.headers["ETag"]) == (200, f'"{digest}"')
    part = get(http, url, {**AUTH, "Range": "bytes=4-", "If-Range": f'"{digest}"'})
    assert (part.status, part.data) == (206, EMPTY_ZIP[4:])


def test_a_job_json_past_the_size_cap_is_not_there(
    tmp_path: Path,
    server_factory: Any,
    http: urllib3.PoolManager,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job.json is read whole on each change: one of gigabytes is "not there", as a
    malformed one is, not read into memory (the cap lowered here to keep the test small)."""
    monkeypatch.setattr(config, "MAX_JOB_BYTES", 4096)
    write_job(tmp_path, "job_ok", status="pending", progress=0)
    (tmp_path / "job_big").mkdir()
    big = {"id": "job_big", "status": "pending", "progress": 0, "name": "x" * 5000}
    (tmp_path / "job_big" / "job.json").write_text(json.dumps(big))
    base_url = server_factory(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pixcrawler.server"):
        assert_error(get(http, base_url + "/api/v1/jobs/job_big"), 404, "NotFoundError")
        listed = get(http, base_url + "/api/v1/jobs").json()
        assert_error(get(http, base_url + "/api/v1/jobs/job_big"), 404, "NotFoundError")
    assert [job["id"] for job in listed["items"]] == ["job_ok"]
    # The operator is told why, once (it said nothing: the job was simply not there).
    said = [r.getMessage() for r in caplog.records if "job_big" in r.getMessage()]
    assert said == ["job job_big is not served: its job.json is over 4096 bytes"]


# -- a store the server cannot read as it should ------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs are POSIX")
@pytest.mark.parametrize("where", ["chunk", "job.json"])
def test_a_fifo_in_the_store_is_not_there_and_holds_up_nothing(
    tmp_path: Path, server_factory: Any, http: urllib3.PoolManager, where: str
) -> None:
    """Opening a FIFO waits for a writer: one at a chunk's or a job.json's path froze the
    whole server (Ctrl+C too). It is no file: a missing chunk, or no job."""
    write_job(tmp_path, "job_ok", status="pending", progress=0)
    chunk = write_completed_job(tmp_path, "job_fifo", chunk=None)
    fifo = chunk if where == "chunk" else tmp_path / "job_fifo" / "job.json"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    base_url = server_factory(tmp_path)
    try:
        if where == "chunk":
            response = get(http, base_url + "/api/v1/jobs/job_fifo/chunks/0")
            assert "missing" in assert_error(response, 404, "NotFoundError")
        else:
            assert_error(get(http, base_url + "/api/v1/jobs/job_fifo"), 404, "NotFoundError")
            listed = get(http, base_url + "/api/v1/jobs").json()
            assert [job["id"] for job in listed["items"]] == ["job_ok"]
        assert get(http, base_url + "/health", {}).status == 200
    finally:
        unblock(fifo)


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges there")
@pytest.mark.parametrize("where", ["chunk", "job.json"])
def test_a_store_file_the_server_cannot_open_is_a_500_not_a_missing_one(
    tmp_path: Path, server_factory: Any, http: urllib3.PoolManager, where: str
) -> None:
    """Only "no such file" is a 404, which the SDK takes as final. A file that is there but
    cannot be opened (a symlink loop here; no permission, for a server not run as root) is
    the server's fault: a 500, logged there and retried by clients, naming no path."""
    chunk = write_completed_job(tmp_path, "job_loop")
    looped = chunk if where == "chunk" else tmp_path / "job_loop" / "job.json"
    looped.unlink()
    looped.symlink_to(looped.name)  # itself: ELOOP
    base_url = server_factory(tmp_path)
    path = "/api/v1/jobs/job_loop" + ("/chunks/0" if where == "chunk" else "")
    response = get(http, base_url + path)
    assert assert_error(response, 500, "InternalServerError") == "internal server error"
    assert str(tmp_path).encode() not in response.data


def test_a_job_whose_answer_the_sdk_would_refuse_is_not_served(
    tmp_path: Path,
    server_factory: Any,
    http: urllib3.PoolManager,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The answer adds each chunk's URL to job.json: a compact job.json under the store's
    cap could make an answer over what the SDK reads of one."""
    from pixcrawler.server import app as server_app

    write_completed_job(tmp_path, "job_wide")
    job_path = tmp_path / "job_wide" / "job.json"
    job = json.loads(job_path.read_text())
    job["chunks"] = [{"index": i} for i in range(100)]
    job_path.write_text(json.dumps(job, separators=(",", ":")))
    monkeypatch.setattr(server_app, "MAX_API_ANSWER", len(job_path.read_bytes()) * 2)
    base_url = server_factory(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pixcrawler.server"):
        response = get(http, base_url + "/api/v1/jobs/job_wide")
    assert_error(response, 404, "NotFoundError")
    assert "job job_wide is not served: its answer would be over" in caplog.text


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges there")
def test_a_job_json_no_one_can_read_is_left_out_of_listings_and_logged(
    tmp_path: Path,
    server_factory: Any,
    http: urllib3.PoolManager,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It may be anyone's job: it must not fail every owner's listing."""
    write_completed_job(tmp_path, "job_ok")
    write_completed_job(tmp_path, "job_loop")
    looped = tmp_path / "job_loop" / "job.json"
    looped.unlink()
    looped.symlink_to(looped.name)  # itself: ELOOP
    base_url = server_factory(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pixcrawler.server"):
        listed = get(http, base_url + "/api/v1/jobs")
    assert listed.status == 200
    assert [job["id"] for job in listed.json()["items"]] == ["job_ok"]
    assert "job job_loop left out of listings" in caplog.text


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
def test_out_of_file_descriptors_is_a_503_to_retry_not_a_missing_job_or_chunk(
    tmp_path: Path, server_factory: Any
) -> None:
    """With every descriptor in use (many downloads open), a chunk and a job not read yet
    were 404s, which the SDK takes as final, and the listing was empty; the SDK retries a
    503 after its Retry-After."""
    import resource

    write_completed_job(tmp_path, "job_a")
    write_job(tmp_path, "job_b", status="pending", progress=0)
    port = int(server_factory(tmp_path).rsplit(":", 1)[1])
    # One connection, opened while descriptors are there: the requests need no new one.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def answer(path: str) -> tuple[int, str | None]:
        conn.request("GET", path, headers=AUTH)
        response = conn.getresponse()
        response.read()
        return response.status, response.headers.get("Retry-After")

    chunk_path, job_path = "/api/v1/jobs/job_a/chunks/0", "/api/v1/jobs/job_b"
    try:
        assert answer(chunk_path) == (200, None)  # job_a read and cached
        # The same connection answers in turn: the chunk's file is closed by now.
        assert answer("/health") == (200, None)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
        try:
            with contextlib.suppress(OSError):  # EMFILE, once all are taken
                while True:
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
            out_of_files = [answer(chunk_path), answer(job_path), answer("/api/v1/jobs")]
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert out_of_files == [(503, "1")] * 3
        assert [answer(chunk_path)[0], answer(job_path)[0], answer("/api/v1/jobs")[0]] == [200] * 3
    finally:
        conn.close()


def test_a_slow_store_read_holds_up_no_other_request(
    tmp_path: Path, server_factory: Any, http: urllib3.PoolManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is read on worker threads: a listing stuck on a slow disk (thousands of
    job.json not cached yet) held the event loop, and every other request with it."""
    entered, release = threading.Event(), threading.Event()
    jobs_of = JobStore.jobs_of

    def slow_jobs_of(self: JobStore, owner: str) -> list[dict[str, Any]]:
        entered.set()
        release.wait(20)
        return jobs_of(self, owner)

    monkeypatch.setattr(JobStore, "jobs_of", slow_jobs_of)
    chunk = write_completed_job(tmp_path, "job_a")
    base_url = server_factory(tmp_path)
    listing: list[urllib3.BaseHTTPResponse] = []
    lister = threading.Thread(target=lambda: listing.append(get(http, base_url + "/api/v1/jobs")))
    lister.start()
    try:
        assert entered.wait(10)
        assert get(http, base_url + "/health", {}).status == 200
        assert get(http, base_url + "/api/v1/jobs/job_a").status == 200
        assert get(http, base_url + "/api/v1/jobs/job_a/chunks/0").data == chunk.read_bytes()
    finally:
        release.set()
        lister.join(10)
    assert [job["id"] for job in listing[0].json()["items"]] == ["job_a"]


# -- keys ----------------------------------------------------------------------------------


def test_ensure_server_keys_creates_one_private_key_for_default(tmp_path: Path) -> None:
    keys, created = ensure_server_keys(tmp_path / "new-store", environ={})
    assert created is not None and len(created) >= 32
    assert keys == {created: "default"}
    path = tmp_path / "new-store" / KEYS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {created: "default"}
    # Next start: the key is loaded, not replaced, and not announced again.
    assert ensure_server_keys(tmp_path / "new-store", environ={}) == (keys, None)


def test_ensure_server_keys_keeps_configured_keys(tmp_path: Path) -> None:
    env = {ENV_SERVER_KEYS: " k1:alice , k2:bob ,"}
    assert ensure_server_keys(tmp_path, environ=env) == ({"k1": "alice", "k2": "bob"}, None)
    assert not (tmp_path / KEYS_FILE).exists()


def test_env_keys_merge_over_keys_json(tmp_path: Path) -> None:
    (tmp_path / KEYS_FILE).write_text(json.dumps({"k1": "alice", "k2": "bob"}))
    keys = load_server_keys(tmp_path, environ={ENV_SERVER_KEYS: "k2:carol,k:3:dave"})
    assert keys == {"k1": "alice", "k2": "carol", "k:3": "dave"}


def test_keys_json_keys_are_stripped_as_request_headers_are(tmp_path: Path) -> None:
    (tmp_path / KEYS_FILE).write_text(json.dumps({"pasted-key\n": " alice "}))
    keys = load_server_keys(tmp_path, environ={})
    assert keys == {"pasted-key": "alice"}
    # The server strips the header's value, so only the stripped key can ever match.
    assert KeyRing(keys).owner_of("pasted-key") == "alice"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_keys_json_saved_as_windows_editors_save_it_is_read(tmp_path: Path, encoding: str) -> None:
    """Notepad saves UTF-8 with a byte-order mark, PowerShell 5's > UTF-16: serve refused
    such a keys.json with "cannot read …: JSONDecodeError" (or UnicodeDecodeError)."""
    (tmp_path / KEYS_FILE).write_bytes(json.dumps({"k1": "alice"}).encode(encoding))
    assert load_server_keys(tmp_path, environ={}) == {"k1": "alice"}


def test_a_keys_json_that_is_not_json_is_refused_saying_where_never_what(tmp_path: Path) -> None:
    """A trailing comma said only "JSONDecodeError": now the line and column, and never the
    text around them (a key)."""
    (tmp_path / KEYS_FILE).write_text('{\n  "secret-key": "alice",\n}\n')
    # (Where: Python 3.13 names the comma, line 2 column 24; earlier ones what follows it.)
    with pytest.raises(ValueError, match=r"not JSON \(.*, line (3 column 1|2 column 24)\)") as info:
        load_server_keys(tmp_path, environ={})
    assert "secret-key" not in str(info.value) and KEYS_FILE in str(info.value)


@pytest.mark.parametrize("entry", [{" ": "alice"}, {"secret-key": "\t"}])
def test_blank_keys_json_entries_raise_without_the_key(
    tmp_path: Path, entry: dict[str, str]
) -> None:
    (tmp_path / KEYS_FILE).write_text(json.dumps(entry))
    with pytest.raises(ValueError, match=KEYS_FILE) as info:
        load_server_keys(tmp_path, environ={})
    assert "secret-key" not in str(info.value)


@pytest.mark.parametrize("value", ["no-owner", "secret-key:", ":owner"])
def test_malformed_env_keys_raise_without_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError, match=ENV_SERVER_KEYS) as info:
        load_server_keys(tmp_path, environ={ENV_SERVER_KEYS: value})
    assert "secret-key" not in str(info.value)


@pytest.mark.parametrize(
    ("keys_json", "env"),
    [({"my secret": "alice"}, ""), ({"secret-clé": "bob"}, ""), ({}, "secret key:alice")],
)
def test_keys_no_client_can_send_are_refused_without_the_key(
    tmp_path: Path, keys_json: dict[str, str], env: str
) -> None:
    """The SDK refuses a key holding white space or non-ASCII: a server that took one
    started cleanly and nobody could ever use it."""
    (tmp_path / KEYS_FILE).write_text(json.dumps(keys_json))
    with pytest.raises(ValueError, match="cannot be used as an API key") as info:
        load_server_keys(tmp_path, environ={ENV_SERVER_KEYS: env})
    assert "secret" not in str(info.value)


def test_env_keys_quoted_whole_as_an_env_file_passes_them_are_read_without_the_quotes(
    tmp_path: Path,
) -> None:
    """Docker's --env-file keeps a value's quotes: '"mykey:default"' gave the key '"mykey'
    to the owner 'default"', and the server created no key of its own."""
    for value in ('"k1:alice,k2:bob"', "'k1:alice,k2:bob'"):
        keys = load_server_keys(tmp_path, environ={ENV_SERVER_KEYS: value})
        assert keys == {"k1": "alice", "k2": "bob"}


def test_serve_announces_a_created_key_once_and_the_port_it_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ports: list[int] = []

    def run(server: Any, sockets: list[Any]) -> None:
        """Start the app as uvicorn does (its lifespan announces it), then stop."""
        ports.append(sockets[0].getsockname()[1])

        async def start() -> None:
            app = server.config.app
            async with app.router.lifespan_context(app):
                pass

        asyncio.run(start())

    monkeypatch.delenv(ENV_SERVER_KEYS, raising=False)
    monkeypatch.setattr(runner.uvicorn.Server, "run", run)
    store = tmp_path / "store"
    store.mkdir()
    runner.serve(store, port=0)
    key = next(iter(json.loads((store / KEYS_FILE).read_text())))
    out = capsys.readouterr().out
    assert f"Created API key for owner 'default': {key}" in out
    assert ports[0] != 0
    assert (
        out.splitlines()[-1] == f"Serving {store} on http://127.0.0.1:{ports[0]} (Ctrl+C to stop)"
    )

    runner.serve(store, port=0)
    assert key not in capsys.readouterr().out


def test_run_in_thread_stops_quietly_while_a_download_stalls(tmp_path: Path) -> None:
    """Stopping cuts off the downloads still open after the graceful shutdown; uvicorn
    logged each as the traceback of a cancelled task (``serve`` already hid them)."""
    with open(write_completed_job(tmp_path, "job_big", chunk=None), "wb") as f:
        f.truncate(64 << 20)  # more than the loopback socket buffers of both ends hold
    records: list[logging.LogRecord] = []
    keep = logging.Handler()
    keep.emit = records.append  # type: ignore[method-assign]
    uvicorn_log = logging.getLogger("uvicorn.error")
    request = (
        f"GET /api/v1/jobs/job_big/chunks/0 HTTP/1.1\r\nHost: x\r\nX-API-Key: {TEST_KEY}\r\n\r\n"
    )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(uvicorn_log.removeHandler, keep)
        with run_in_thread(create_app(tmp_path, TEST_KEYS)) as base_url:
            # Added once run_in_thread has configured uvicorn's logging (dropping handlers).
            uvicorn_log.addHandler(keep)
            port = int(base_url.rsplit(":", 1)[1])
            # Closed only after the server stopped: the download is open till then.
            client = cleanup.enter_context(socket.create_connection(("127.0.0.1", port), 10))
            client.sendall(request.encode())
            assert client.recv(100).startswith(b"HTTP/1.1 200")
    assert [record.getMessage() for record in records] == []


@pytest.mark.timeout(30)
def test_the_servers_connections_send_without_waiting_for_acks() -> None:
    """Its listening socket was made with proto 0, and asyncio sets TCP_NODELAY only on
    connections of proto IPPROTO_TCP: each answer's body waited behind its headers for a
    delayed ACK, 40 ms a call on a kept-alive connection (`pixcrawler list`, page after
    page; a job re-read)."""
    from pixcrawler.server.runner import _listen

    async def nodelay_of_an_accepted_connection() -> int:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[int] = loop.create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = _listen("127.0.0.1", 0)
        server = await loop.create_server(Accept, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname())
            try:
                return await asyncio.wait_for(accepted, 10)
            finally:
                writer.close()

    assert asyncio.run(nodelay_of_an_accepted_connection()) != 0
