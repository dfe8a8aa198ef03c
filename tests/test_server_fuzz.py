"""The reference server under hostile clients: its OpenAPI fuzzed with schemathesis, path
traversal in every path parameter, malformed ``Range`` headers (listed and generated), and
50 clients downloading random ranges of one chunk at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constants import JOB_MIXED, JOB_UNIFORM, OTHER_KEY, TEST_KEY, TEST_KEYS
from helpers import raw_get
from imagegen import make_image_folder
from pixcrawler.packer import pack
from pixcrawler.server import create_app, run_in_thread
from pixcrawler.server.store import KEYS_FILE

schemathesis = pytest.importorskip("schemathesis")

pytestmark = pytest.mark.timeout(90)

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
SECRET = "SECRET-BESIDE-THE-STORE"
KEYFILE_SECRET = "KEYFILE-SECRET-KEY"
BIG = "job_big"
BIG_SIZE = 3 << 20  # 3 MiB: three of the server's 1 MiB send blocks
FUZZ = settings(
    max_examples=int(os.environ.get("PIXCRAWLER_FUZZ_EXAMPLES", 25)),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# -- schemathesis: every operation, positive and negative data -------------------------------


@pytest.fixture(scope="module")
def api_schema(store: Path) -> Any:
    """The app's own OpenAPI document, served in-process (ASGI) over the shared store."""
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(store, TEST_KEYS))


def run_cases(strategy: Any, headers: dict[str, str] | None = AUTH) -> list[int]:
    """Send every generated case; schemathesis's checks raise on the first violation
    (a 5xx, an undocumented status or content type, a body off its schema, auth not
    enforced where it is declared). Returns the statuses seen."""
    statuses: list[int] = []

    @FUZZ
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call_and_validate(headers=headers)
        statuses.append(response.status_code)

    check()
    return statuses


HEALTH = ("/health", "/api/v1/health")
OPERATIONS = [
    *HEALTH,
    "/api/v1/jobs",
    "/api/v1/jobs/{job_id}",
    "/api/v1/jobs/{job_id}/chunks/{index}",
]


@pytest.mark.parametrize(
    ("path", "mode"),
    # The health check takes no parameters, so no request to it can be invalid.
    [
        (p, m)
        for p in OPERATIONS
        for m in ("positive", "negative")
        if not (p in HEALTH and m == "negative")
    ],
)
def test_every_operation_conforms_to_its_schema_and_never_errs(
    api_schema: Any, path: str, mode: str
) -> None:
    operation = api_schema[path]["GET"]
    statuses = run_cases(operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    assert statuses and max(statuses) < 500


@pytest.mark.parametrize("job_id", [JOB_UNIFORM, JOB_MIXED])
def test_chunk_endpoint_with_a_real_job_and_generated_indexes(api_schema: Any, job_id: str) -> None:
    operation = api_schema["/api/v1/jobs/{job_id}/chunks/{index}"]["GET"]
    statuses = run_cases(operation.as_strategy(path_parameters={"job_id": job_id}))
    assert set(statuses) <= {200, 404}
    for index in ("0", "1"):  # and the indexes that exist, with their zip bodies checked
        run_cases(operation.as_strategy(path_parameters={"job_id": job_id, "index": index}))


def test_the_schema_documents_auth_errors_and_zip_bodies(api_schema: Any) -> None:
    document = api_schema.raw_schema
    schemes = document["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    chunk = document["paths"]["/api/v1/jobs/{job_id}/chunks/{index}"]["get"]
    assert set(chunk["responses"]) == {"200", "206", "401", "404", "416", "422", "503"}
    assert set(chunk["responses"]["200"]["content"]) == {"application/zip"}
    error = document["paths"]["/api/v1/jobs"]["get"]["responses"]["401"]
    assert error["content"]["application/json"]["schema"]["required"] == ["error"]


def test_another_key_sees_none_of_these_jobs(api_schema: Any) -> None:
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    for path in ("/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/chunks/{index}"):
        for job_id in (JOB_UNIFORM, JOB_MIXED):
            strategy = api_schema[path]["GET"].as_strategy(path_parameters={"job_id": job_id})
            assert set(run_cases(strategy, other)) == {404}
    listed = api_schema["/api/v1/jobs"]["GET"].as_strategy(query={"page": 1, "size": 1000})
    statuses = run_cases(listed, other)
    assert set(statuses) == {200}


def test_without_a_key_every_api_operation_is_401(api_schema: Any) -> None:
    for path in OPERATIONS[len(HEALTH) :]:
        strategy = api_schema[path]["GET"].as_strategy(path_parameters={"job_id": JOB_UNIFORM})
        assert set(run_cases(strategy, headers=None)) <= {401}


# -- path traversal in every path parameter ---------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server over a store with things worth stealing: a file beside the store, the
    keys file in it, and another owner's job. Keys come from keys.json."""
    root = tmp_path_factory.mktemp("fuzz-guarded")
    store = root / "store"
    pack(make_image_folder(root / "src", {"a": 2}, seed=6), store, job_id="job_a")
    pack(make_image_folder(root / "other", {"b": 2}, seed=7), store, job_id="job_b", owner="x")
    (root / "secret.txt").write_text(SECRET)
    (store / KEYS_FILE).write_text(json.dumps({TEST_KEY: "default", KEYFILE_SECRET: "x"}))
    with run_in_thread(create_app(store, None)) as base_url:
        yield base_url


PAYLOADS = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "%252e%252e",  # double-encoded
    "..%2F..%2Fsecret.txt",
    "..%2Fkeys.json",
    "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "%2Fetc%2Fpasswd",
    "%2F",
    "..%5C..%5Csecret.txt",  # backslashes
    "job_b",  # another owner's job
    "job_a%2F..%2Fjob_b",
    "job_a%00",
    "%00",
    "job_a%0d%0aX-Injected:%201",
    "C:%5Cwindows",
    "%C0%AE%C0%AE",  # overlong UTF-8 dots
    "%EF%BC%8E%EF%BC%8E",  # full-width dots
    "~",
    "*",
    "a" * 65,  # one past the longest job id
    "9" * 4000,
    "x" * 12_000,
]


def targets(payload: str) -> list[str]:
    return [
        f"/api/v1/jobs/{payload}",
        f"/api/v1/jobs/{payload}/chunks/0",
        f"/api/v1/jobs/job_a/chunks/{payload}",
    ]


@pytest.mark.parametrize("payload", PAYLOADS, ids=[p[:30] for p in PAYLOADS])
def test_hostile_path_parameters_are_404_never_file_contents(guarded: str, payload: str) -> None:
    for target in targets(payload):
        status, body = raw_get(guarded, target, AUTH)
        assert status == 404, (target[:80], status, body[:200])
        assert json.loads(body)["error"]["status_code"] == 404
        assert SECRET.encode() not in body
        assert KEYFILE_SECRET.encode() not in body
        assert b'"owner"' not in body and not body.startswith(b"PK")


def test_absolute_and_dot_segment_targets_are_404(guarded: str) -> None:
    for target in [
        "/api/v1/jobs/../../secret.txt",
        "/api/v1/jobs/job_a/chunks/../../job_b/chunks/0",
        "/api/v1/jobs//etc/passwd",
        "/api/v1/../../../secret.txt",
        "//api/v1/jobs/job_a",
        "/keys.json",
        "/store/keys.json",
    ]:
        status, body = raw_get(guarded, target, AUTH)
        assert status == 404, target
        assert SECRET.encode() not in body and KEYFILE_SECRET.encode() not in body


@FUZZ
@given(st.text(min_size=1, max_size=80))
def test_generated_path_parameters_never_leak_or_err(guarded: str, text: str) -> None:
    payload = quote(text, safe="")
    job, chunk_of_job, chunk = targets(payload)
    for target, allowed in (
        (job, text == "job_a"),
        (chunk_of_job, text == "job_a"),
        # "0", "00" ... name chunk 0; only ASCII digits do.
        (chunk, text.isascii() and text.isdigit() and len(text) <= 9 and int(text) == 0),
    ):
        status, body = raw_get(guarded, target, AUTH)
        assert status == (200 if allowed else 404), (target, status)
        assert SECRET.encode() not in body and KEYFILE_SECRET.encode() not in body


def test_the_owners_own_job_still_answers(guarded: str) -> None:
    assert raw_get(guarded, "/api/v1/jobs/job_a", AUTH)[0] == 200
    status, body = raw_get(guarded, "/api/v1/jobs/job_a/chunks/0", AUTH)
    assert status == 200 and body.startswith(b"PK")


# -- Range headers ----------------------------------------------------------------------------


class BigChunk(NamedTuple):
    url: str
    data: bytes

    def __repr__(self) -> str:  # hypothesis prints fixtures of a failing example
        return f"BigChunk({self.url!r}, <{len(self.data)} bytes>)"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigChunk]:
    """A server with one completed job whose single chunk is 3 MiB of random bytes."""
    store = tmp_path_factory.mktemp("fuzz-big")
    data = random.Random(5).randbytes(BIG_SIZE)
    (store / BIG / "chunks").mkdir(parents=True)
    (store / BIG / "chunks" / "00000.zip").write_bytes(data)
    job = {
        "id": BIG,
        "name": BIG,
        "status": "completed",
        "progress": 100,
        "owner": "default",
        "chunks": [{"index": 0, "size_bytes": len(data), "sha256": sha(data)}],
    }
    (store / BIG / "job.json").write_text(json.dumps(job))
    with run_in_thread(create_app(store, TEST_KEYS)) as base_url:
        yield BigChunk(f"{base_url}/api/v1/jobs/{BIG}/chunks/0", data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def pool() -> Iterator[urllib3.PoolManager]:
    with urllib3.PoolManager(maxsize=60, retries=False, timeout=30) as manager:
        yield manager


def ranged(pool: urllib3.PoolManager, url: str, value: str) -> urllib3.BaseHTTPResponse:
    return pool.request("GET", url, headers={**AUTH, "Range": value})


def check_sane(response: urllib3.BaseHTTPResponse, data: bytes) -> tuple[int, int] | None:
    """200 (the whole chunk), 206 (exactly the range announced) or 416: nothing else.
    Returns the [start, end) sent for a 206."""
    size = len(data)
    status = response.status
    assert status in (200, 206, 416), status
    if status == 200:
        assert response.data == data and "Content-Range" not in response.headers
        return None
    if status == 416:
        assert response.headers["Content-Range"] == f"bytes */{size}"
        assert response.json()["error"]["status_code"] == 416
        return None
    unit, _, spec = response.headers["Content-Range"].partition(" ")
    span, _, total = spec.partition("/")
    first, _, last = span.partition("-")
    start, end = int(first), int(last) + 1
    assert (unit, int(total)) == ("bytes", size) and 0 <= start < end <= size
    assert int(response.headers["Content-Length"]) == end - start
    assert response.data == data[start:end]
    return start, end


MALFORMED_RANGES = [
    ("garbage", "nonsense", 200),
    ("empty", "", 200),
    ("only-unit", "bytes=", 200),
    ("no-numbers", "bytes=-", 200),
    ("letters", "bytes=a-b", 200),
    ("negative", "bytes=-5-10", 200),
    ("plus-sign", "bytes=+5-10", 200),
    ("two-ranges", "bytes=0-1,5-9", 200),
    ("trailing-comma", "bytes=0-1,", 200),
    ("reversed", "bytes=500-100", 200),
    ("other-unit", "items=0-10", 200),
    ("float", "bytes=1.5-2", 200),
    ("hex", "bytes=0x10-0x20", 200),
    ("superscript-digits", "bytes=\u00b2-\u00b3", 200),  # str.isdigit() says yes
    ("inner-space", "bytes=0 - 10", 200),
    ("zero-suffix", "bytes=-0", 416),
    ("start-at-size", f"bytes={BIG_SIZE}-", 416),
    ("huge-start", "bytes=99999999999999999999999999999999-", 416),
    ("huge-both", "bytes=99999999999999999999-999999999999999999999", 416),
    ("huge-end", "bytes=0-99999999999999999999999999999999", 206),
    ("huge-suffix", "bytes=-99999999999999999999999999999999", 206),
    ("hundred-digits", "bytes=" + "9" * 100 + "-", 416),
    ("zero-padded", "bytes=000000000000000000000000010-00000000000000000000019", 206),
    ("last-byte", f"bytes={BIG_SIZE - 1}-", 206),
    ("first-byte", "bytes=0-0", 206),
    ("upper-case", "BYTES=1-2", 206),
    ("outer-spaces", "  bytes=1-2  ", 206),
]


@pytest.mark.parametrize(
    ("value", "status"),
    [(v, s) for _, v, s in MALFORMED_RANGES],
    ids=[name for name, _, _ in MALFORMED_RANGES],
)
def test_malformed_and_extreme_ranges_get_a_sane_answer(
    big: BigChunk, pool: urllib3.PoolManager, value: str, status: int
) -> None:
    url, data = big
    response = ranged(pool, url, value)
    assert response.status == status
    check_sane(response, data)


def test_a_range_header_too_long_for_the_server_is_refused_cleanly(
    big: BigChunk, pool: urllib3.PoolManager
) -> None:
    url, _ = big
    response = ranged(pool, url, "bytes=" + "1" * 20_000 + "-")
    assert response.status in (400, 416, 431)


range_values = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"\A(bytes|BYTES|items)=[0-9-]{0,12}(,[0-9-]{0,6})?\Z", fullmatch=True),
    st.builds(
        "bytes={}-{}".format,
        st.one_of(st.just(""), st.integers(0, 10**25).map(str)),
        st.one_of(st.just(""), st.integers(0, 10**25).map(str)),
    ),
)


@FUZZ
@given(range_values)
def test_generated_range_headers_get_a_sane_answer(
    big: BigChunk, pool: urllib3.PoolManager, value: str
) -> None:
    url, data = big
    try:
        response = ranged(pool, url, value)
    except (ValueError, UnicodeEncodeError, urllib3.exceptions.HTTPError):
        return  # not sendable as a header at all (control characters, non-Latin-1)
    if not all(c == "\t" or " " <= c <= "~" for c in value):
        # Not a valid field value (RFC 9110 5.5): the HTTP layer may refuse the request.
        assert response.status in (200, 206, 400, 416)
        if response.status == 400:
            return
    check_sane(response, data)


offsets = st.one_of(st.integers(0, BIG_SIZE + 10), st.integers(0, 10**25))


@FUZZ
@given(offsets, offsets)
def test_well_formed_ranges_follow_rfc_9110(
    big: BigChunk, pool: urllib3.PoolManager, first: int, last: int
) -> None:
    url, data = big
    size = len(data)
    sent = check_sane(ranged(pool, url, f"bytes={first}-{last}"), data)
    if first > last:
        assert sent is None  # invalid syntax: the whole chunk (checked as a 200)
    elif first >= size:
        assert sent is None  # unsatisfiable (checked as a 416)
    else:
        assert sent == (first, min(last, size - 1) + 1)
    suffix = check_sane(ranged(pool, url, f"bytes=-{last}"), data)
    assert suffix == (None if last == 0 else (max(0, size - last), size))


# -- many clients at once ----------------------------------------------------------------------


def test_fifty_concurrent_clients_get_every_byte_right(big: BigChunk) -> None:
    url, data = big
    size = len(data)
    clients, per_client = 50, 4
    errors: list[BaseException] = []
    received: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with urllib3.PoolManager(retries=False, timeout=60) as manager:
                barrier.wait(30)
                for _ in range(per_client):
                    start = rng.randrange(size)
                    end = min(size, start + rng.randrange(1, 300_000))
                    response = ranged(manager, url, f"bytes={start}-{end - 1}")
                    assert response.status == 206
                    assert response.data == data[start:end], (seed, start, end)
                    with lock:
                        received.append(end - start)
                whole = manager.request("GET", url, headers=AUTH)
                assert sha(whole.data) == whole.headers["ETag"].strip('"') == sha(data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(80)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert len(received) == clients * per_client
