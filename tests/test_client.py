"""The API client against the real server: credentials, errors, retries, key hygiene."""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import LiveServer
from constants import JOB_OTHER, JOB_UNIFORM, OTHER_KEY, UNFINISHED_JOBS, UNIFORM_TOTAL
from helpers import CannedHost, RecordingHost, digest
from pixcrawler import config, load_dataset, redaction
from pixcrawler.client import ApiClient, api_root
from pixcrawler.exceptions import (
    AuthenticationError,
    JobNotCompleteError,
    NetworkError,
    NotFoundError,
    PixCrawlerError,
)
from pixcrawler.models import Job
from pixcrawler.retry import RetryPolicy
from pixcrawler.testing.faults import Fault, FaultProxy, FaultSchedule
from pixcrawler.units import parse_time

pytestmark = pytest.mark.timeout(60)
FAST = {"retries": 3, "backoff": 0.01}


def test_wrong_key_raises_authentication_error(live_server: LiveServer) -> None:
    with pytest.raises(AuthenticationError) as info:
        load_dataset(JOB_UNIFORM, api_key="not-a-key", base_url=live_server.base_url)
    assert info.value.status_code == 401
    assert "not-a-key" not in str(info.value)


def test_missing_key_everywhere_says_how_to_give_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PIXCRAWLER_API_KEY", raising=False)
    monkeypatch.setenv("PIXCRAWLER_CONFIG_DIR", str(tmp_path))
    with pytest.raises(AuthenticationError, match="PIXCRAWLER_API_KEY"):
        load_dataset(JOB_UNIFORM, base_url="http://127.0.0.1:9")


@pytest.mark.parametrize("content", ["{not json", "[" * 100_000 + "]" * 100_000, "[1]"])
def test_an_unreadable_login_file_is_no_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str
) -> None:
    """A damaged credentials file (even JSON nested past the parser's limit) is read as
    no key, with the message that says how to give one, not a bare RecursionError."""
    monkeypatch.delenv("PIXCRAWLER_API_KEY", raising=False)
    monkeypatch.setenv("PIXCRAWLER_CONFIG_DIR", str(tmp_path))
    (tmp_path / "credentials.json").write_text(content)
    with pytest.raises(AuthenticationError, match="PIXCRAWLER_API_KEY"):
        load_dataset(JOB_UNIFORM, base_url="http://127.0.0.1:9")


def test_a_config_folder_this_user_cannot_look_into_is_no_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Asking whether the login file exists (to say it is unreadable) raised the bare
    PermissionError of a folder the user may not enter (a container's HOME=/root)."""
    monkeypatch.delenv("PIXCRAWLER_API_KEY", raising=False)
    monkeypatch.setenv("PIXCRAWLER_CONFIG_DIR", str(tmp_path / "private"))
    real_stat = Path.stat

    def refused(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.parent == tmp_path / "private":
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", refused)
    with pytest.raises(AuthenticationError, match="PIXCRAWLER_API_KEY"):
        load_dataset(JOB_UNIFORM, base_url="http://127.0.0.1:9")


def test_environment_supplies_key_and_url_and_arguments_win(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIXCRAWLER_API_KEY", live_server.api_key)
    monkeypatch.setenv("PIXCRAWLER_BASE_URL", live_server.base_url)
    assert len(load_dataset(JOB_UNIFORM)) == UNIFORM_TOTAL
    with pytest.raises(AuthenticationError):
        load_dataset(JOB_UNIFORM, api_key="explicit-wrong-key")
    monkeypatch.setenv("PIXCRAWLER_BASE_URL", "http://127.0.0.1:9")
    assert len(load_dataset(JOB_UNIFORM, base_url=live_server.base_url)) == UNIFORM_TOTAL


def test_the_key_and_job_id_swapped_sends_the_key_nowhere(live_server: LiveServer) -> None:
    """``load_dataset(KEY, "job_1")`` with the key also in the environment: the key is the
    job id, so it went into the URL's path (access logs) and the error."""
    key = "sk-live-SWAPPED-4e9b0c7d13a2f586"
    with FaultProxy(live_server.base_url) as proxy:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PIXCRAWLER_API_KEY", key)
            with pytest.raises(ValueError, match="job_id is an API key") as info:
                load_dataset(key, JOB_UNIFORM, proxy.base_url)
        assert proxy.stats.requests == 0
    assert key[:8] not in str(info.value)


def test_a_base_url_from_the_environment_is_read_as_a_key_is(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blank is unset, quotes (Docker's --env-file keeps them) go, and a bad one is named
    as the variable: it was "base_url must start with http://…, got ''"."""
    from pixcrawler.auth import resolve_base_url

    for blank in ("", "  ", "\n"):
        monkeypatch.setenv("PIXCRAWLER_BASE_URL", blank)
        assert resolve_base_url(None) == config.DEFAULT_BASE_URL
    monkeypatch.setenv("PIXCRAWLER_BASE_URL", f'"{live_server.base_url}"\r\n')
    assert len(load_dataset(JOB_UNIFORM, live_server.api_key)) == UNIFORM_TOTAL
    monkeypatch.setenv("PIXCRAWLER_BASE_URL", "127.0.0.1:8000?api_key=SECRETQUERY")
    with pytest.raises(ValueError, match=r"^\$PIXCRAWLER_BASE_URL: base_url must start") as info:
        load_dataset(JOB_UNIFORM, live_server.api_key)
    assert "'127.0.0.1:8000'" in str(info.value) and "SECRETQUERY" not in str(info.value)
    assert resolve_base_url(" http://x.test ") == " http://x.test "  # an argument wins as given


def test_login_file_is_the_last_fallback(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pixcrawler.auth import save_api_key

    monkeypatch.delenv("PIXCRAWLER_API_KEY", raising=False)
    monkeypatch.setenv("PIXCRAWLER_CONFIG_DIR", str(tmp_path))
    path = save_api_key(live_server.api_key)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(load_dataset(JOB_UNIFORM, base_url=live_server.base_url)) == UNIFORM_TOTAL


def test_unknown_and_foreign_jobs_are_not_found(live_server: LiveServer) -> None:
    for job_id in ("job_nope", JOB_OTHER):
        with pytest.raises(NotFoundError) as info:
            load_dataset(job_id, live_server.api_key, live_server.base_url)
        assert info.value.status_code == 404
    # the other owner does see it
    assert len(load_dataset(JOB_OTHER, OTHER_KEY, live_server.base_url)) > 0


@pytest.mark.parametrize(("job_id", "status", "progress"), UNFINISHED_JOBS)
def test_unfinished_jobs_raise_with_status_and_progress(
    live_server: LiveServer, job_id: str, status: str, progress: float
) -> None:
    with pytest.raises(JobNotCompleteError) as info:
        load_dataset(job_id, live_server.api_key, live_server.base_url)
    error = info.value
    assert (error.status, error.progress) == (status, progress)
    assert f"{error.progress}%" == f"{progress}%"  # "63%", as the spec's example prints it
    if status in ("failed", "cancelled"):
        assert "will not complete" in str(error) and "still processing" not in str(error)
    else:
        assert "still processing" in str(error) and f"{progress:g}%" in str(error)


def test_job_ids_are_validated_and_ints_accepted(live_server: LiveServer) -> None:
    for bad in ("../etc/passwd", True):  # True is an int to Python, never a job id
        with pytest.raises(ValueError, match="job_id"):
            load_dataset(bad, live_server.api_key, live_server.base_url)
    with pytest.raises(NotFoundError):
        load_dataset(12345, live_server.api_key, live_server.base_url)


def test_base_url_with_api_prefix_is_tolerated(live_server: LiveServer) -> None:
    assert api_root("http://h:1/") == api_root("http://h:1/api/v1") == "http://h:1/api/v1"
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url + "/api/v1/")
    assert len(dataset) == UNIFORM_TOTAL
    with pytest.raises(ValueError, match="base_url"):
        load_dataset(JOB_UNIFORM, live_server.api_key, "api.example.com")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_api_raises_network_error_after_bounded_retries() -> None:
    started = time.monotonic()
    with pytest.raises(NetworkError, match="4 attempts") as info:
        load_dataset(JOB_UNIFORM, "k", f"http://127.0.0.1:{closed_port()}", timeout=1, **FAST)
    assert isinstance(info.value.__cause__, Exception)
    assert time.monotonic() - started < 10


def test_unreachable_api_without_retries_says_one_attempt() -> None:
    with pytest.raises(NetworkError, match="after 1 attempt: ") as info:
        load_dataset(JOB_UNIFORM, "k", f"http://127.0.0.1:{closed_port()}", timeout=1, retries=0)
    assert isinstance(info.value.__cause__, Exception)


def test_every_5xx_of_a_burst_is_retried(live_server: LiveServer) -> None:
    burst = [Fault("status", status=code) for code in (500, 502, 503, 507, 520)]
    schedule = FaultSchedule.script(burst, match="/jobs/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        options = {**FAST, "retries": 5}
        dataset = load_dataset(JOB_UNIFORM, live_server.api_key, proxy.base_url, **options)
        assert len(dataset) == UNIFORM_TOTAL
        assert proxy.stats.requests == 6  # every 5xx retried, as DESIGN.md says


def test_each_retry_of_an_api_call_waits_twice_as_long_as_the_last(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy's backoff is the one the client sleeps (a client retrying at once passed
    every test of the policy)."""
    import random

    caplog.set_level(logging.WARNING, logger="pixcrawler")
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # full jitter's longest
    schedule = FaultSchedule.script([Fault("status", status=503)] * 3, match="/jobs/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        started = time.monotonic()
        load_dataset(JOB_UNIFORM, live_server.api_key, proxy.base_url, retries=3, backoff=0.1)
        assert time.monotonic() - started >= 0.1 + 0.2 + 0.4
    messages = [r.getMessage() for r in caplog.records]
    for retry, delay in ((1, 0.1), (2, 0.2), (3, 0.4)):
        line = f"GET /jobs/{JOB_UNIFORM}: HTTP 503; retry {retry} of 3 in {delay:.1f} s"
        assert line in messages, messages


def test_5xx_after_retries_is_a_network_error_with_the_status(live_server: LiveServer) -> None:
    schedule = FaultSchedule.script([Fault("status", status=503)] * 10, match="/jobs/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        with pytest.raises(NetworkError) as info:
            load_dataset(JOB_UNIFORM, live_server.api_key, proxy.base_url, retries=2, backoff=0.01)
        assert info.value.status_code == 503
        assert proxy.stats.requests == 3  # 2 retries = 3 attempts, never more


def test_429_waits_for_retry_after_and_says_so(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pixcrawler")
    schedule = FaultSchedule.script([Fault("rate_limit", retry_after=1)], match="/jobs/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        started = time.monotonic()
        load_dataset(JOB_UNIFORM, live_server.api_key, proxy.base_url, **FAST)
        assert time.monotonic() - started >= 0.9
    # The wait is visible as it starts, with its cause, and without the key.
    [message] = [r.getMessage() for r in caplog.records]
    asked = rf"GET /jobs/{JOB_UNIFORM}: HTTP 429 \(Retry-After 1 s\); retry 1 of 3 in 1\.[01] s"
    assert re.fullmatch(asked, message), message  # (up to a tenth more: jitter)
    assert live_server.api_key not in caplog.text


def test_429_with_a_long_retry_after_is_raised_not_slept(live_server: LiveServer) -> None:
    schedule = FaultSchedule.script([Fault("rate_limit", retry_after=3600)], match="/jobs/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        started = time.monotonic()
        with pytest.raises(NetworkError, match="retry in 3600 s") as info:
            load_dataset(JOB_UNIFORM, live_server.api_key, proxy.base_url, **FAST)
        assert info.value.retry_after == 3600 and info.value.status_code == 429
        assert time.monotonic() - started < 5


def test_4xx_other_than_429_is_never_retried(live_server: LiveServer) -> None:
    with FaultProxy(live_server.base_url) as proxy:
        with pytest.raises(AuthenticationError):
            load_dataset(JOB_UNIFORM, "not-a-key-of-this-server", proxy.base_url, **FAST)
        assert proxy.stats.requests == 1


def test_key_is_not_sent_to_a_chunk_host_on_another_origin(
    live_server: LiveServer, server_factory: object
) -> None:
    with RecordingHost(live_server.store, host="127.0.0.2") as blob:
        api = server_factory(live_server.store, chunk_base_url=blob.base_url)  # type: ignore[operator]
        dataset = load_dataset(JOB_UNIFORM, live_server.api_key, api)
        assert dataset.job.chunks[0].url.startswith(blob.base_url)
        assert digest(dataset)[0] == UNIFORM_TOTAL
    assert len(blob.headers) == dataset.num_chunks
    for headers in blob.headers:
        assert "authorization" not in headers and "x-api-key" not in headers
        assert headers["user-agent"] == config.USER_AGENT  # (not urllib3's, beside ranges and keys)
        assert live_server.api_key not in " ".join(headers.values())


def test_key_is_not_forwarded_through_a_redirect_to_another_host(live_server: LiveServer) -> None:
    with RecordingHost(live_server.store, host="127.0.0.2") as target:
        with RecordingHost(live_server.store, host="127.0.0.1") as api_side:
            api_side.redirect_to = target.base_url
            client = ApiClient(live_server.api_key, api_side.base_url)
            response = client.request(api_side.base_url + "/job_uniform/job.json")
            assert response.status == 200
        assert "authorization" in api_side.headers[0]
        assert "authorization" not in target.headers[0]
        agents = {api_side.headers[0]["user-agent"], target.headers[0]["user-agent"]}
        assert agents == {config.USER_AGENT}


def test_a_key_with_characters_no_header_can_carry_is_refused_unquoted() -> None:
    with pytest.raises(AuthenticationError, match="non-ASCII") as info:
        load_dataset(JOB_UNIFORM, api_key="sk-live-k€y-1234", base_url="http://127.0.0.1:9")
    assert "k€y" not in str(info.value)


def test_every_sdk_error_survives_pickling_with_its_fields() -> None:
    """Errors cross process boundaries (DataLoader workers, process pools) by pickle."""
    from pixcrawler import exceptions

    errors = [
        exceptions.JobNotCompleteError("not yet", status="running", progress=42.5),
        exceptions.DownloadError("lost", chunk_id=3, status_code=503),
        exceptions.DecompressionError("bad", chunk_id=1, sample_id="cat/1.jpg"),
        exceptions.NetworkError("down", status_code=429),
        exceptions.AuthenticationError("who", status_code=401),
        exceptions.NotFoundError("no such job", status_code=404),
        exceptions.MissingDependencyError("pip install 'pixcrawler-sdk[torch]'"),
        exceptions.MixedImageSizesError("pass image_size=(H, W)"),
    ]
    # The spec's hierarchy: one except clause catches every SDK error.
    public = {getattr(exceptions, name) for name in exceptions.__all__}
    assert {type(error) for error in errors} == public - {exceptions.PixCrawlerError}
    for error in errors:
        assert isinstance(error, exceptions.PixCrawlerError)
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error) and str(clone) == str(error)
        assert vars(clone) == vars(error)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="fields travel in an exception note")
def test_an_error_rebuilt_from_its_traceback_text_gets_its_own_fields_back() -> None:
    """A DataLoader re-raises a worker's error as ``type(e)("Caught ... " + traceback)``: the
    fields are read back from the raised error's own note, never from one it chains."""
    import traceback

    from pixcrawler import exceptions

    def rebuilt(error: BaseException) -> Any:
        text = "".join(traceback.format_exception(error))
        return type(error)(f"Caught {type(error).__name__} in DataLoader worker process 0.\n{text}")

    try:
        try:
            raise exceptions.DownloadError("lost", chunk_id=3, status_code=503, retry_after=2.5)
        except exceptions.DownloadError as cause:
            assert vars(rebuilt(cause)).items() >= {"chunk_id": 3, "retry_after": 2.5}.items()
            raise exceptions.PixCrawlerError("the dataset is closed") from cause
    except exceptions.PixCrawlerError as chained:
        assert rebuilt(chained).status_code is None  # not the cause's 503
    error = exceptions.JobNotCompleteError("not yet", status="failed", progress=12.5)
    assert (rebuilt(error).status, rebuilt(error).progress) == ("failed", 12.5)
    clone = pickle.loads(pickle.dumps(error))
    assert clone.__notes__ == error.__notes__ and len(clone.__notes__) == 1


def test_verify_ssl_false_warns() -> None:
    with pytest.warns(UserWarning, match="verify_ssl=False"):
        ApiClient("k", "https://127.0.0.1:9", verify_ssl=False)


def test_a_closed_client_sends_nothing(live_server: LiveServer) -> None:
    """close() used to clear the pools only, which the next request built again."""
    client = ApiClient(live_server.api_key, live_server.base_url)
    assert client.get_job(JOB_UNIFORM).id == JOB_UNIFORM
    client.close()
    with pytest.raises(NetworkError, match="the client was closed"):
        client.get_job(JOB_UNIFORM)


@pytest.mark.parametrize(
    "fault",
    [Fault("hang", seconds=30), Fault("stall", after_bytes=100, seconds=30)],
    ids=["no-headers-yet", "mid-body"],
)
def test_close_ends_an_api_call_under_way_on_another_thread_at_once(
    live_server: LiveServer, fault: Fault
) -> None:
    """close() cleared the idle connections only: a call in flight (a re-read of the
    job's URLs on its own thread, say) ran on to its timeout and retries, 300 s each by
    default, holding the dataset all that time."""
    schedule = FaultSchedule.script([fault], match=r"/jobs/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        client = ApiClient(live_server.api_key, proxy.base_url, timeout=60)
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                client.get_job(JOB_UNIFORM)
            except BaseException as exc:  # what escapes is the point
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        assert proxy.wait_for_fault(fault.kind, timeout=10)
        started = time.monotonic()
        client.close()
        caller.join(10)
        assert not caller.is_alive() and time.monotonic() - started < 3
    assert len(outcome) == 1 and isinstance(outcome[0], NetworkError), outcome
    assert "the client was closed" in str(outcome[0])


def test_close_reaches_a_call_on_a_connection_another_call_used_before() -> None:
    """Call A got a 503 and backed off, its kept-alive connection back in the pool; call B
    took it; A retried on a new one and, ending, stopped tracking both: close() no longer
    reached B, which ran on to its timeout."""
    from http.server import ThreadingHTTPServer

    from pixcrawler.testing.static import _QuietHandler

    refused: list[str] = []
    released = threading.Event()

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            status, extra = 200, {}
            if self.path.endswith("/jobs/a") and not refused:
                refused.append(self.path)
                status, extra = 503, {"Retry-After": "1"}
            elif self.path.endswith("/jobs/b"):
                released.wait(15)  # slow: close() must cut it
            self.send_response(status)
            for name, value in {"Content-Length": "2", **extra}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = ApiClient("k" * 20, f"http://127.0.0.1:{server.server_address[1]}", timeout=60)
    outcome: dict[str, object] = {}

    def call(name: str) -> None:
        try:
            outcome[name] = client.get_json(f"/jobs/{name}")
        except BaseException as exc:  # what escapes is the point
            outcome[name] = exc

    try:
        first = threading.Thread(target=call, args=("a",))
        first.start()
        time.sleep(0.3)  # A has its 503 and backs off 1 s; its connection is in the pool
        second = threading.Thread(target=call, args=("b",))
        second.start()  # B takes that connection
        first.join(10)
        assert outcome["a"] == {} and refused  # A retried on a new connection
        started = time.monotonic()
        client.close()
        second.join(10)
        assert not second.is_alive() and time.monotonic() - started < 3
        assert isinstance(outcome["b"], NetworkError), outcome
    finally:
        released.set()
        server.shutdown()
        server.server_close()


def test_client_repr_hides_the_key() -> None:
    assert "secret-key" not in repr(ApiClient("secret-key", "http://127.0.0.1:9"))


def test_malformed_job_json_is_a_clear_error(live_server: LiveServer) -> None:
    with RecordingHost(live_server.store) as host:
        client = ApiClient("k", host.base_url)
        with pytest.raises(PixCrawlerError):
            client.get_json("/nope")


_NESTED = b"[" * 100_000 + b"]" * 100_000  # past the JSON parser's recursion limit


@pytest.mark.parametrize(
    ("status", "error"), [(200, PixCrawlerError), (404, NotFoundError), (400, PixCrawlerError)]
)
def test_json_nested_past_the_parsers_limit_is_the_sdks_error(
    status: int, error: type[PixCrawlerError]
) -> None:
    """Was a bare RecursionError, out of load_dataset and the CLI."""
    host = CannedHost(status, _NESTED, {"Content-Type": "application/json"})
    with host, pytest.raises(error) as info:
        ApiClient("k", host.base_url).get_json("/jobs/job_x")
    assert info.value.status_code == status


@pytest.mark.parametrize("length", [50_000, 5_000_000])
def test_a_huge_error_message_is_cut_to_one_short_line(length: int) -> None:
    """A 5 MB error message went whole into the exception and the CLI's one line. Only
    the head of an error's body is read: a message past it gives way to the HTTP reason."""
    words = "no such job\n" + "x" * length
    body = json.dumps({"error": {"type": "NotFoundError", "message": words}}).encode()
    host = CannedHost(404, body, {"Content-Type": "application/json"})
    with host, pytest.raises(NotFoundError) as info:
        ApiClient("k", host.base_url).get_json("/jobs/job_x")
    message = str(info.value)
    assert "\n" not in message and len(message) < 2 * config.MAX_ERROR_MESSAGE
    if len(body) <= config.MAX_ERROR_BODY:
        assert "no such job x" in message and message.endswith("…)")
    else:
        assert message == "GET /jobs/job_x: not found (HTTP 404: Not Found)"


def test_only_the_head_of_an_error_body_is_read() -> None:
    """A proxy's endless error page was read whole into memory (twice) for a message of
    300 characters."""
    import tracemalloc

    host = CannedHost(502, b"<html>" + b"x" * (50 << 20), {"Content-Type": "text/html"})
    with host:
        client = ApiClient("k", host.base_url, retry=RetryPolicy(retries=0))
        tracemalloc.start()
        try:
            with pytest.raises(NetworkError, match=r"HTTP 502: Bad Gateway after 1 attempt"):
                client.get_json("/jobs/job_x")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 4 << 20, peak


@pytest.mark.timeout(30)
def test_a_redirect_with_an_endless_body_is_followed_not_read_to_its_end() -> None:
    """A 302 whose chunked body never ends was drained for ever (data kept coming, so no
    timeout fired): 16 GB read in 10 s."""
    import socketserver

    class Endless(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            head = b"HTTP/1.1 302 Found\r\nLocation: /next\r\nTransfer-Encoding: chunked\r\n\r\n"
            block = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
            with contextlib.suppress(OSError):
                self.request.sendall(head)
                while True:
                    self.request.sendall(block)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Endless)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = ApiClient("k", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(NetworkError, match="too many redirects"):
            client.get_json("/jobs/job_a")
    finally:
        server.shutdown()
        server.server_close()


def test_a_refusal_from_the_host_a_redirect_led_to_does_not_blame_the_key() -> None:
    """The API's host sends callers on to another origin, which the key never goes to: its
    401 is not the key's rejection, and logging in again would never help."""
    refusal = json.dumps({"error": {"type": "AuthenticationError", "message": "no key"}})
    canonical = CannedHost(401, refusal.encode(), {"Content-Type": "application/json"})
    with canonical:
        moved = {"Location": canonical.base_url + "/api/v1/jobs/job_a"}
        with CannedHost(301, b"", moved) as front, pytest.raises(AuthenticationError) as info:
            ApiClient(_ECHOED_KEY, front.base_url).get_json("/jobs/job_a")
    message = str(info.value)
    assert f"the API redirected to {canonical.base_url}, another origin, which the API key" in (
        message
    )
    assert "HTTP 401: no key" in message and "pass it as base_url" in message
    assert "pixcrawler login" not in message and _ECHOED_KEY not in message
    assert info.value.status_code == 401


def test_a_refusal_after_a_redirect_to_plain_http_never_advises_sending_the_key_there() -> None:
    import urllib3

    from pixcrawler.client import _Answer

    client = ApiClient(_ECHOED_KEY, "https://api.example.com")
    refusal = urllib3.HTTPResponse(body=b'{"error": {"message": "no key"}}', status=401)
    error = client._refused_elsewhere(
        _Answer(refusal, refusal.data, "http://api.example.com/api/v1/jobs"), "GET /jobs"
    )
    assert "a redirect from https to plain http, where the key would travel unencrypted" in (
        str(error)
    )
    assert "pass it as base_url" not in str(error)


_ECHOED_KEY = "SECRETKEY_abcdefghijklmnopqrstuvwxyz0123456789"


def _echoing(status: int, words: str) -> CannedHost:
    body = json.dumps({"detail": words}).encode()
    return CannedHost(status, body, {"Content-Type": "application/json"})


@pytest.mark.parametrize("status", [401, 404, 400, 503])
@pytest.mark.parametrize("pad", [0, config.MAX_ERROR_MESSAGE - 20])
def test_a_server_echoing_the_key_never_puts_it_or_its_head_in_an_error(
    status: int, pad: int
) -> None:
    """The key was scrubbed only by the CLI, after the message was cut: a key at the cut
    left 45 of its 46 characters on screen, and a library user's ``str(exc)`` held it all."""
    words = "x" * pad + f" invalid API key Bearer {_ECHOED_KEY} for this request"
    with _echoing(status, words) as host, pytest.raises(PixCrawlerError) as info:
        ApiClient(
            _ECHOED_KEY, host.base_url, retry=RetryPolicy(retries=1, backoff_base=0.01)
        ).get_json("/jobs/job_x")
    assert info.value.status_code == status
    message = str(info.value)
    assert _ECHOED_KEY[:12] not in message and _ECHOED_KEY[:12] not in repr(info.value)
    assert ("Bearer ***" in message) == (pad == 0), message


@pytest.mark.parametrize("status", [401, 404, 503])
def test_a_servers_error_words_reach_no_terminal_as_escape_sequences(status: int) -> None:
    words = "no such \x1b]0;OWNED\x07\x1b[2Jjob \x1b[31mRED\u202e"
    with _echoing(status, words) as host, pytest.raises(PixCrawlerError) as info:
        ApiClient("k", host.base_url, retry=RetryPolicy(retries=0)).get_json("/jobs/job_x")
    message = str(info.value)
    assert "no such ?]0;OWNED??[2Jjob ?[31mRED?" in message, message
    assert all(ch.isprintable() for ch in message)


_DONE = {"id": "job_x", "status": "completed"}


@pytest.mark.parametrize(
    "body",
    [
        [],
        None,
        "job_x",
        {"id": None},
        {"id": True, "status": "completed"},
        {**_DONE, "total_images": float("inf")},
        {**_DONE, "version": 1e400},
        {**_DONE, "image_size": [1e400, 1]},
        {**_DONE, "size_bytes": -5},
        {**_DONE, "labels": "cat"},
        {**_DONE, "labels": [None, 1]},
        {**_DONE, "chunks": [{"index": float("nan"), "url": "x"}]},
        {**_DONE, "chunks": [{"index": 0, "url": "x", "size_bytes": float("inf")}]},
        {**_DONE, "chunks": ["x"]},
        # No status, or none of the contract's, is never read as a completed job.
        {"id": "job_x"},
        {"id": "job_x", "status": None},
        {"id": "job_x", "status": ""},
        {"id": "job_x", "status": "in progress, see https://x"},  # text, not a status word
        # image_size "16" was read as (1, 6): every image squashed, exit 0.
        *({**_DONE, "image_size": size} for size in ("16", [0, 0], [-3, 5], [1, 2, 3], [1.5, 2])),
        # Two chunks listed as one index: half the images were lost without a word.
        {**_DONE, "chunks": [{"index": 0, "url": "a"}, {"index": 0, "url": "b"}]},
        {**_DONE, "chunks": [{"index": -1, "url": "a"}]},
        {**_DONE, "chunks": [{"index": 0, "url": "a", "image_count": -1}]},
        # Counts that are no counts were cut (10.7 images: 10; index 1.5 or true: 1) or
        # past any index (2**63 images: len() raised OverflowError).
        *({**_DONE, "total_images": n} for n in (10.7, 2**63, 10**30, True, "ten")),
        *({**_DONE, "version": v} for v in (2.9, -3)),
        *({**_DONE, "chunks": [{"index": i, "url": "a"}]} for i in (1.5, True, None)),
        # A null url was fetched, with the key, as the path "None".
        *({**_DONE, "chunks": [{"index": 0, "url": u}]} for u in (None, 5, {}, "", " ")),
        # A label listed twice: "3 classes", and an id no image has.
        {**_DONE, "labels": ["cat", "dog", "cat"]},
    ],
)
def test_an_api_answer_of_the_wrong_shape_is_the_sdks_error(body: Any) -> None:
    """Whatever JSON the API returns (Python's json reads Infinity and NaN), a job that
    does not fit the contract is a PixCrawlerError, never AttributeError or OverflowError."""
    with pytest.raises(PixCrawlerError, match="the API returned a malformed"):
        Job.from_json(body)


def test_a_key_a_server_echoes_in_a_job_field_is_scrubbed_before_it_is_cut() -> None:
    """A field quoted in an error is cut to 80 characters: scrubbed after the cut, a key
    at the cut kept its head."""
    key = "sk-live-ECHOED-8c2d41f0a9e35b17"
    redaction.remember(key)  # as the client using it does
    with pytest.raises(PixCrawlerError) as info:
        Job.from_json({"id": "job_x", "status": "s" * 62 + key})
    assert key[:8] not in str(info.value) and "***" in str(info.value)
    assert key[:8] not in str(info.value.__cause__)


@pytest.mark.parametrize("status", ["in_progress", "Queued", "done"])
def test_a_status_outside_the_contracts_five_is_a_job_not_complete(status: str) -> None:
    """DESIGN.md: any status but completed is JobNotCompleteError (with .status and
    .progress), never a completed job, nor a "malformed job" (the real service writes
    "in_progress", which made the spec's error-handling example say "Unexpected error")."""
    job = {"id": "job_x", "status": status, "progress": 30}
    host = CannedHost(200, json.dumps(job).encode())
    with host, pytest.raises(JobNotCompleteError) as info:
        load_dataset("job_x", "k-1234", host.base_url, **FAST)
    assert (info.value.status, info.value.progress) == (status.lower(), 30)
    assert f"status {status.lower()!r}, 30% complete" in str(info.value)


def test_a_job_is_read_as_the_real_service_writes_it() -> None:
    """Int ids (the service's), its status in any case or spelling, a summary's total."""
    job = Job.from_json({"id": 12345, "status": "COMPLETED", "image_size": [32, 48]})
    assert (job.id, job.status, job.image_size) == ("12345", "completed", (32, 48))
    assert Job.from_json({"id": "j", "status": "canceled"}).status == "cancelled"
    assert Job.from_json({"id": "j", "status": "running", "image_size": [32.0, 48]}).image_size
    # Counts as other serialisers write them; a missing or null version is the first.
    counted = Job.from_json({**_DONE, "total_images": 60.0, "chunk_size": "20", "version": None})
    assert (counted.total_images, counted.chunk_size, counted.version) == (60, 20, 1)
    exact = Job.from_json({**_DONE, "size_bytes": "9007199254740992", "chunk_size": ""})
    assert (exact.size_bytes, exact.chunk_size) == (2**53, 0)  # digits exactly; "" as none
    unlisted = Job.from_json({**_DONE, "chunks": [{"index": 0, "url": "a", "image_count": ""}]})
    assert unlisted.chunks[0].image_count is None  # not 0 images
    with pytest.raises(PixCrawlerError, match="size_bytes 9007199254740993 is past 2"):
        Job.from_json({**_DONE, "size_bytes": "9007199254740993"})  # not rounded to 2**53
    # A summary (GET /jobs) lists no chunks, whichever way a server leaves them out.
    for chunks in ({}, {"chunks": []}, {"chunks": None}):
        summary = Job.from_json({"id": "j", "status": "completed", "total_images": 60, **chunks})
        assert summary.total_images == 60 and summary.chunks == ()


@pytest.mark.parametrize("created", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"])
def test_a_date_past_the_calendar_once_in_utc_reads_as_unknown(created: str) -> None:
    assert parse_time(created) is None


@pytest.mark.parametrize(
    ("written", "utc"),
    [
        ("2025-10-30T12:00:00+0530", "2025-10-30 06:30:00"),
        ("2025-10-30T12:00:00+05", "2025-10-30 07:00:00"),  # an hour-only offset
        ("2025-10-30 12:00:00+00", "2025-10-30 12:00:00"),  # as Postgres writes it
        ("2025-10-30T12:00:00,5Z", "2025-10-30 12:00:00.500000"),
        ("2025-10-30T12:00:00.123456789-05:00", "2025-10-30 17:00:00.123456"),
        ("2025-10-30", "2025-10-30 00:00:00"),  # its "-30" is the day, not an offset
    ],
)
def test_every_iso_time_form_reads_alike_on_every_python(written: str, utc: str) -> None:
    """Python 3.10's fromisoformat took none of the first four: "Created: -"."""
    parsed = parse_time(written)
    assert parsed is not None and str(parsed) == utc + "+00:00"


@pytest.mark.parametrize(
    "written",
    [
        "20240102T030405Z",
        "2024-01-02T030405Z",
        "2024-W01-2T03:04:05Z",
        "2024-002",
        "2025-10-30X12:00:00+0530",
        "2025-10-30T12:00:00+05:30.5",
    ],
)
def test_a_basic_or_week_form_reads_as_unknown_on_every_python(written: str) -> None:
    """Python 3.11 took these and 3.10 did not: a job's times read differently by version."""
    assert parse_time(written) is None


def test_a_base_url_holding_a_password_is_refused_without_showing_it() -> None:
    """It was dropped without a word (only the key is sent), and shown by repr()."""
    with pytest.raises(ValueError, match="must not hold a user name or password") as info:
        ApiClient("k", "http://user:hunter2@127.0.0.1:9")
    assert "hunter2" not in str(info.value)


def test_a_redirect_to_a_url_no_request_can_take_is_not_retried() -> None:
    moved = {"Location": "ftp://127.0.0.1/api/v1/jobs/job_a"}
    with CannedHost(302, b"", moved) as front, pytest.raises(NetworkError) as info:
        ApiClient("k", front.base_url, retry=RetryPolicy(retries=3, backoff_base=5.0)).get_json(
            "/jobs/job_a"
        )
    assert "no request can take (scheme 'ftp')" in str(info.value)  # at once: no backoff


def test_a_retry_after_no_one_would_wait_is_said_as_such() -> None:
    host = CannedHost(429, b"", {"Retry-After": "9" * 400})  # (1e308 is no delta-seconds)
    with host, pytest.raises(NetworkError) as info:
        ApiClient("k", host.base_url).get_json("/jobs/job_a")
    first_line = str(info.value).splitlines()[0]
    assert first_line.endswith("the server asks to retry in more than a year")


def test_base_url_must_be_http_or_https() -> None:
    for url in ("ftp://example.com", "file:///etc", "example.com"):
        with pytest.raises(ValueError, match="http"):
            api_root(url)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:99999", "malformed URL"),
        ("http://127.0.0.1:abc", "malformed URL"),
        ("http://", "names no host"),
        ("http://api.example.com/?x=1", "no query"),
        ("http://api.example.com/#frag", "no query or fragment"),
    ],
)
def test_a_base_url_no_request_could_use_is_refused_up_front(url: str, problem: str) -> None:
    """Not retried as a network error (no host), nor raised later as a bare ValueError
    (a bad port), nor sent to another path (a fragment sent GET /)."""
    with pytest.raises(ValueError, match=problem):
        api_root(url)
    with pytest.raises(ValueError, match=problem):
        ApiClient("k", url)


def test_a_base_url_is_read_without_the_newline_a_file_gave_it() -> None:
    assert api_root(" http://api.example.com/\n") == "http://api.example.com/api/v1"


@pytest.mark.timeout(30)
def test_an_api_that_does_not_answer_is_said_to_be_waited_for(
    live_server: LiveServer, slow_waits: Callable[[], list[str]]
) -> None:
    """load_dataset waited in silence for an API that sent nothing: up to its timeout
    (300 s by default) per attempt, with nothing logged. Now the wait says what it is on,
    every SLOW_WAIT_SECONDS (0.2 s here), and stops saying so once the answer came."""
    schedule = FaultSchedule.script([Fault("hang", seconds=1.0)], match=r"/jobs/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        dataset = load_dataset(JOB_UNIFORM, live_server.api_key, proxy.base_url)
    assert dataset.num_images == UNIFORM_TOTAL
    waits = slow_waits()
    assert len(waits) >= 2, waits  # repeated while the wait goes on
    expected = rf"waited [\d.]+ s for GET /jobs/{JOB_UNIFORM}: no answer yet"
    assert all(re.fullmatch(expected, m) for m in waits), waits
    time.sleep(0.5)
    assert slow_waits() == waits  # the answer came: nothing more is said
    dataset.close()
    assert not [t for t in threading.enumerate() if t.name.endswith("api-wait")]


@pytest.mark.timeout(30)
def test_an_api_call_waiting_out_a_retry_says_so_not_that_no_answer_came(
    live_server: LiveServer, slow_waits: Callable[[], list[str]]
) -> None:
    """The wait went on saying "no answer yet" while it slept out a 429's Retry-After,
    under the retry line that said the server had answered."""
    schedule = FaultSchedule.script([Fault("rate_limit", retry_after=1)], match=r"/jobs/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        load_dataset(JOB_UNIFORM, live_server.api_key, proxy.base_url).close()
    waits = slow_waits()
    expected = (
        rf"waited [\d.]+ s for GET /jobs/{JOB_UNIFORM}: 1 failed attempt, the last: "
        r"HTTP 429 \(Retry-After 1 s\); the next in [\d.]+ s"
    )
    assert any(re.fullmatch(expected, m) for m in waits), waits
    assert not [m for m in waits if re.search(r"\d s: no answer yet$", m)], waits


def test_a_ctrl_c_as_an_api_calls_wait_begins_leaves_nothing_saying_it_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A KeyboardInterrupt in the watcher's start() (it waits for the thread to run) left
    the watcher running: it logged "waited ..." every 10 s for the rest of the process."""
    from types import SimpleNamespace

    from pixcrawler import client as client_module

    class Interrupted(threading.Thread):
        def start(self) -> None:
            super().start()
            raise KeyboardInterrupt

    patched = SimpleNamespace(Thread=Interrupted, Event=threading.Event)
    monkeypatch.setattr(client_module, "threading", patched)
    with pytest.raises(KeyboardInterrupt), client_module._said_while_waiting("GET /jobs/x"):
        pass
    assert not [t for t in threading.enumerate() if t.name.endswith("api-wait")]
