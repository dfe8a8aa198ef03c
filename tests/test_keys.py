"""The API key never leaks: not in logs at DEBUG (ours, urllib3's, the root logger's), not
in exception text or tracebacks, not in any repr, not in a file the SDK or the CLI writes,
not on the CLI's stdout or stderr, and never to a host other than the API's, redirects
included. TLS is verified unless the user turns it off, and then they are warned.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import logging
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import LiveServer
from constants import JOB_UNIFORM, OTHER_KEY, OTHER_OWNER, UNIFORM_TOTAL
from helpers import ForwardProxy, RecordingHost, digest
from pixcrawler import Dataset, load_dataset
from pixcrawler.client import ApiClient
from pixcrawler.dataset import ClientSettings
from pixcrawler.downloader import ChunkDownloader
from pixcrawler.exceptions import (
    AuthenticationError,
    DownloadError,
    JobNotCompleteError,
    NetworkError,
    NotFoundError,
    PixCrawlerError,
)
from pixcrawler.models import Chunk, Job
from pixcrawler.retry import RetryPolicy
from pixcrawler.server import create_app, run_in_thread
from pixcrawler.testing import Fault, FaultProxy, FaultSchedule

pytestmark = pytest.mark.timeout(90)

# Distinctive, so that finding it anywhere cannot be a coincidence.
KEY = "pxk-" + secrets.token_hex(16)
WRONG_KEY = "pxk-wrong-" + secrets.token_hex(8)  # a key the user mistyped: just as private
FAST: dict[str, Any] = {"retries": 2, "backoff": 0.01, "timeout": 5.0}


@pytest.fixture(scope="module")
def api(store: Path) -> Iterator[str]:
    """The reference server over the shared store; KEY belongs to the test owner."""
    with run_in_thread(create_app(store, {KEY: "default", OTHER_KEY: OTHER_OWNER})) as url:
        yield url


@pytest.fixture(scope="module")
def clean(api: str) -> tuple[int, str]:
    return digest(load_dataset(JOB_UNIFORM, KEY, api))


def assert_no_key(text: str, where: str) -> None:
    for secret in (KEY, WRONG_KEY):
        assert secret not in text, f"the key appears in {where}"


def exception_texts(exc: BaseException) -> str:
    """Everything an exception shows: str, repr, its fields, the whole chained traceback."""
    parts = [str(exc), repr(exc), repr(vars(exc))]
    parts += traceback.format_exception(type(exc), exc, exc.__traceback__)
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        parts += [str(cause), repr(cause)]
        cause = cause.__cause__ or cause.__context__
    return "\n".join(parts)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record at DEBUG: root, ours and urllib3's."""
    caplog.set_level(logging.DEBUG)
    for name in ("pixcrawler", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog
    for record in caplog.records:
        text = record.getMessage() + repr(record.args)
        if record.exc_info and record.exc_info[1] is not None:
            text += exception_texts(record.exc_info[1])
        assert_no_key(text, f"log record {record.name}:{record.lineno}")
    assert_no_key(caplog.text, "the captured log")


@pytest.fixture
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Temp, cache and config dirs of this test; every file left in them is grepped."""
    for name in ("tmp", "cache", "config", "home"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIXCRAWLER_CACHE_DIR", str(tmp_path / "cache" / "pixcrawler"))
    monkeypatch.setenv("PIXCRAWLER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PIXCRAWLER_API_KEY", raising=False)
    yield tmp_path
    assert_files_clean(tmp_path)


def assert_files_clean(root: Path, *, allow: tuple[str, ...] = ()) -> None:
    for path in root.rglob("*"):
        if path.is_file() and path.name not in allow:
            data = path.read_bytes()
            assert KEY.encode() not in data and WRONG_KEY.encode() not in data, path


# -- a whole session through the SDK ----------------------------------------------------------


def test_a_full_session_with_every_kind_of_error_never_shows_the_key(
    api: str,
    clean: tuple[int, str],
    debug_logs: pytest.LogCaptureFixture,
    private_dirs: Path,
    live_server: LiveServer,
) -> None:
    errors: list[BaseException] = []
    shown: list[str] = []

    def expect(kind: type[BaseException], call: Callable[[], object]) -> None:
        with pytest.raises(kind) as info:
            call()
        errors.append(info.value)

    # The happy path: metadata, iteration, batches, arrays, chunk files on disk.
    with load_dataset(JOB_UNIFORM, KEY, api, **FAST) as dataset:
        assert digest(dataset) == clean
        assert sum(len(labels) for _, labels in dataset.iter_batches(batch_size=16)) == 60
        dataset.to_arrays()
        downloader = dataset.downloader()
        downloader.fetch_to_file(0, private_dirs / "tmp" / "00000.zip")
        shown += [repr(dataset), str(dataset.info), str(dataset.stats), repr(dataset.settings)]
        shown += [repr(dataset.client()), repr(vars(dataset)), repr(downloader)]
        shown += [repr(dataset.job), repr(dataset.stats)]

    # Every error the API can answer with.
    expect(NotFoundError, lambda: load_dataset("job_nope", KEY, api, **FAST))
    expect(NotFoundError, lambda: load_dataset("job_other", KEY, api, **FAST))
    expect(JobNotCompleteError, lambda: load_dataset("job_failed", KEY, api, **FAST))
    expect(JobNotCompleteError, lambda: load_dataset("job_running", KEY, api, **FAST))
    expect(AuthenticationError, lambda: load_dataset(JOB_UNIFORM, WRONG_KEY, api, **FAST))
    expect(NetworkError, lambda: load_dataset(JOB_UNIFORM, KEY, "http://127.0.0.1:9", **FAST))

    # And every failure of the transport, through a fault-injecting proxy.
    faults = [
        Fault("status", status=503),
        Fault("status", status=503),
        Fault("status", status=503),
    ]
    with FaultProxy(api, schedule=FaultSchedule.script(faults, match="/jobs/")) as proxy:
        expect(NetworkError, lambda: load_dataset(JOB_UNIFORM, KEY, proxy.base_url, **FAST))
    chunk_faults = [Fault("corrupt", offset=100)] * 2 + [Fault("reset", after_bytes=100)] * 3
    schedule = FaultSchedule.script(chunk_faults, match="/chunks/")
    with FaultProxy(api, schedule=schedule) as proxy:
        dataset = load_dataset(JOB_UNIFORM, KEY, proxy.base_url, prefetch=1, **FAST)
        expect(DownloadError, lambda: list(dataset))  # corrupt twice
        expect(DownloadError, lambda: list(dataset))  # reset past the retries
        shown.append(str(dataset.stats))
    with FaultProxy(
        api, schedule=FaultSchedule.script([Fault("rate_limit", retry_after=3600)])
    ) as proxy:
        expect(NetworkError, lambda: load_dataset(JOB_UNIFORM, KEY, proxy.base_url, **FAST))
    with pytest.warns(UserWarning) as caught:
        ApiClient(KEY, "https://127.0.0.1:9", verify_ssl=False)
    shown += [str(w.message) for w in caught]

    assert len(errors) == 10 and all(isinstance(e, PixCrawlerError) for e in errors)
    for error in errors:
        assert_no_key(exception_texts(error), f"{type(error).__name__}: {error}")
    for text in shown:
        assert_no_key(text, text[:60])
    # The capture did see the transport's own debug lines, so their silence means something.
    names = {record.name for record in debug_logs.records}
    assert any(name.startswith("urllib3") for name in names)
    assert "pixcrawler" in names


def test_nothing_the_sdk_writes_holds_the_key(api: str, private_dirs: Path) -> None:
    dataset = load_dataset(JOB_UNIFORM, KEY, api)
    out = private_dirs / "tmp" / "chunks"
    out.mkdir()
    downloader = dataset.downloader()
    for index in downloader.indexes:
        downloader.fetch_to_file(index, out / f"{index:05d}.zip")
    list(dataset)
    dataset.close()
    written = [p for p in private_dirs.rglob("*") if p.is_file()]
    assert len(written) == dataset.num_chunks  # plain iteration wrote nothing at all


def test_the_settings_a_worker_needs_do_not_print_the_key(api: str) -> None:
    settings = ClientSettings(KEY, api, 5.0, True, RetryPolicy(), 2)
    assert_no_key(repr(settings) + str(settings), "ClientSettings")
    assert_no_key(repr(settings.connect()), "a worker's client")


# -- the key stays on the API's origin --------------------------------------------------------


def hosts_saw_no_key(*hosts: RecordingHost) -> None:
    for host in hosts:
        for headers in host.headers:
            assert "authorization" not in headers and "x-api-key" not in headers
            assert_no_key(" ".join(headers.values()), f"headers sent to {host.base_url}")


def test_chunk_urls_on_the_api_origin_that_redirect_elsewhere_lose_the_key(
    live_server: LiveServer, clean: tuple[int, str]
) -> None:
    """The API host answers a chunk with a 302 to a blob host: the key goes to the first
    request only, never to the blob host, and the bytes arrive verified."""
    store = live_server.store
    job_data = json.loads((store / JOB_UNIFORM / "job.json").read_text())
    for chunk in job_data["chunks"]:
        chunk["url"] = f"/{JOB_UNIFORM}/chunks/{chunk['index']:05d}.zip"  # on the API host
    with RecordingHost(store, host="127.0.0.2") as blob, RecordingHost(store) as api_host:
        api_host.redirect_to = blob.base_url
        settings = ClientSettings(KEY, api_host.base_url, 5.0, True, RetryPolicy(), 2)
        dataset = Dataset(Job.from_json(job_data), settings)
        assert digest(dataset) == clean
        assert len(api_host.headers) == len(blob.headers) == dataset.num_chunks
        assert all(h["authorization"] == f"Bearer {KEY}" for h in api_host.headers)
        hosts_saw_no_key(blob)
        dataset.close()


def test_a_redirect_to_another_port_of_the_same_host_loses_the_key(
    live_server: LiveServer, tmp_path: Path
) -> None:
    store = live_server.store
    job_data = json.loads((store / JOB_UNIFORM / "job.json").read_text())
    chunk = job_data["chunks"][0]
    with RecordingHost(store, host="127.0.0.1") as other_port, RecordingHost(store) as api_host:
        api_host.redirect_to = other_port.base_url  # same host, another port: another origin
        client = ApiClient(KEY, api_host.base_url, timeout=5)
        on_api_host = Chunk(
            0, f"/{JOB_UNIFORM}/chunks/00000.zip", chunk["size_bytes"], chunk["sha256"]
        )
        downloader = ChunkDownloader(client, [on_api_host])
        target = downloader.fetch_to_file(0, tmp_path / "00000.zip")
        assert target.read_bytes() == (store / JOB_UNIFORM / "chunks" / "00000.zip").read_bytes()
        assert bytes(downloader.fetch(0)) == target.read_bytes()
        assert "authorization" in api_host.headers[0]
        hosts_saw_no_key(other_port)
        downloader.close()
        client.close()


def test_absolute_chunk_urls_on_a_blob_host_that_redirects_again_never_get_the_key(
    live_server: LiveServer, server_factory: Callable[..., str], clean: tuple[int, str]
) -> None:
    with (
        RecordingHost(live_server.store, host="127.0.0.3") as final,
        RecordingHost(live_server.store, host="127.0.0.2") as first,
    ):
        first.redirect_to = final.base_url
        api = server_factory(
            live_server.store, keys={KEY: "default"}, chunk_base_url=first.base_url
        )
        dataset = load_dataset(JOB_UNIFORM, KEY, api)
        assert digest(dataset) == clean
        assert len(first.headers) == len(final.headers) == dataset.num_chunks
        hosts_saw_no_key(first, final)


def test_a_url_two_parsers_read_differently_never_takes_the_key_to_the_blob_host(
    live_server: LiveServer,
) -> None:
    """``http://blob\\@api/x``: Python's ``urlsplit`` names the API's host, urllib3
    connects to the blob host. The key follows the connection: the blob host, redirecting
    to such URLs, never sees it."""
    api_netloc = live_server.base_url.split("://", 1)[1].rstrip("/")
    with RecordingHost(live_server.store, host="127.0.0.2") as blob:
        blob.redirect_to = f"{blob.base_url}\\@{api_netloc}"
        client = ApiClient(KEY, live_server.base_url, timeout=5)
        assert not client.sends_key_to(f"{blob.base_url}\\@{api_netloc}/x")
        with pytest.raises(NetworkError, match="too many redirects"):
            client.request(blob.base_url + "/x")
        assert len(blob.headers) > 1  # the redirects were followed to the blob host
        hosts_saw_no_key(blob)
        client.close()


def test_a_chunk_url_no_request_can_take_is_a_download_error_naming_the_chunk() -> None:
    client = ApiClient(KEY, "http://127.0.0.1:9", timeout=5)
    for url in ("http://127.0.0.1:99999/c.zip", "http://127.0.0.1:port/c.zip", "http://[::1/c"):
        downloader = ChunkDownloader(client, [Chunk(index=3, url=url)])
        with pytest.raises(
            DownloadError, match=r"Chunk 3 .*(malformed|no request can take)"
        ) as info:
            downloader.fetch(3)
        assert info.value.chunk_id == 3
        assert_no_key(exception_texts(info.value), "the malformed URL error")
        downloader.close()
    client.close()


def test_a_redirect_no_request_can_follow_is_a_network_error(live_server: LiveServer) -> None:
    with RecordingHost(live_server.store, host="127.0.0.2") as host:
        host.redirect_to = "http://[::1/x"  # an IPv6 literal never closed
        client = ApiClient(KEY, "http://127.0.0.1:9", timeout=5)
        with pytest.raises(NetworkError, match="redirect to a URL no request can take"):
            client.request(host.base_url + "/x")
        client.close()


def test_a_redirect_loop_ends_in_a_typed_error_without_the_key(live_server: LiveServer) -> None:
    with RecordingHost(live_server.store, host="127.0.0.2") as loop:
        loop.redirect_to = loop.base_url  # every request is sent back to itself
        client = ApiClient(KEY, "http://127.0.0.1:9", timeout=5)
        with pytest.raises(NetworkError, match="too many redirects") as info:
            client.request(loop.base_url + "/x?signature=SECRET-SIG")
        assert "SECRET-SIG" not in str(info.value)  # a presigned query string stays private
        assert_no_key(exception_texts(info.value), "the redirect error")
        hosts_saw_no_key(loop)


# -- TLS ------------------------------------------------------------------------------------


def test_tls_verification_is_on_by_default(live_server: LiveServer) -> None:
    client = ApiClient(KEY, "https://api.example.com")
    assert client._pool.connection_pool_kw["cert_reqs"] == "CERT_REQUIRED"
    with load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url) as dataset:
        assert dataset.settings.verify_ssl is True
        assert dataset.client()._pool.connection_pool_kw["cert_reqs"] == "CERT_REQUIRED"


def test_verify_ssl_false_warns_once_and_says_what_it_risks() -> None:
    with pytest.warns(UserWarning, match="verify_ssl=False") as caught:
        client = ApiClient(KEY, "https://api.example.com", verify_ssl=False)
    assert len(caught) == 1 and "API key" in str(caught[0].message)
    assert client._pool.connection_pool_kw["cert_reqs"] == "CERT_NONE"
    settings = ClientSettings(KEY, "https://api.example.com", 5.0, False, RetryPolicy(), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a worker reconnecting does not warn again
        settings.connect()


@pytest.fixture
def self_signed_api(tmp_path: Path) -> Iterator[tuple[str, list[str], list[int]]]:
    """An HTTPS server with a self-signed certificate; yields its URL, the paths it got and
    one entry per connection it accepted."""
    pytest.importorskip("cryptography")
    cert, key = self_signed_pem("127.0.0.1", address="127.0.0.1")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    seen: list[str] = []
    job = {"id": "job_tls", "name": "tls", "status": "completed", "progress": 100, "chunks": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            body = json.dumps(job).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    connections: list[int] = []

    class Server(http.server.ThreadingHTTPServer):
        def get_request(self) -> tuple[Any, Any]:
            connections.append(1)  # (the handshake runs in accept, and may fail there)
            return super().get_request()

    server = Server(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", seen, connections
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_an_unverifiable_certificate_is_refused_before_the_key_is_sent(
    self_signed_api: tuple[str, list[str], list[int]],
) -> None:
    url, seen, _ = self_signed_api
    with pytest.raises(NetworkError, match="SSL") as info:
        load_dataset("job_tls", KEY, url, retries=0)
    assert seen == []  # the handshake failed: no request, so no key, ever reached it
    assert_no_key(exception_texts(info.value), "the TLS error")
    with pytest.warns(UserWarning, match="verify_ssl=False"):
        dataset = load_dataset("job_tls", KEY, url, verify_ssl=False, retries=0)
    assert dataset.job.id == "job_tls" and seen == ["/api/v1/jobs/job_tls"]


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"])
def test_a_ca_bundle_the_environment_names_verifies_the_api(
    self_signed_api: tuple[str, list[str], list[int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    """A company's TLS-inspecting proxy signs with its own CA, which its users name in
    REQUESTS_CA_BUNDLE (requests, so Hugging Face and kagglehub) or SSL_CERT_FILE
    (OpenSSL, so httpx): the SDK read only the system's store, and refused the API."""
    url, seen, _ = self_signed_api
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)  # (a machine may name its system's store)
    monkeypatch.setenv(variable, str(tmp_path / "cert.pem"))  # (the fixture's certificate)
    with load_dataset("job_tls", KEY, url, retries=0) as dataset:
        assert dataset.job.id == "job_tls" and seen == ["/api/v1/jobs/job_tls"]


@pytest.mark.parametrize(
    ("bundle", "said"),
    [
        ("/nonexistent/corp-ca.pem", "is no file or folder of CA certificates"),
        ("not a certificate", "holds no certificate OpenSSL could read"),  # (a file)
    ],
)
def test_a_ca_bundle_that_cannot_be_used_is_said_by_name_for_https_alone(
    live_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle: str, said: str
) -> None:
    """It failed every attempt in OpenSSL's words ("no certificate or crl found"), never
    naming the variable; and a stale one must not stop an http:// API, as in requests."""
    if not bundle.startswith("/"):
        (tmp_path / "corp-ca.cer").write_text(bundle)  # (a DER export reads no better)
        bundle = str(tmp_path / "corp-ca.cer")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", bundle)
    client = ApiClient(KEY, "https://127.0.0.1:9", retry=RetryPolicy(3, backoff_base=30))
    with pytest.raises(NetworkError, match=f"REQUESTS_CA_BUNDLE names .*, which {said}"):
        client.get_job("job_x")  # (at once: before any connection, and not retried)
    with load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url) as dataset:
        assert len(dataset) == UNIFORM_TOTAL  # http://: the bundle is not read
    with pytest.warns(UserWarning, match="verify_ssl=False"):
        ApiClient(KEY, "https://api.example.com", verify_ssl=False).close()  # unread then


def test_a_certificate_refused_against_a_ca_bundle_says_which(
    self_signed_api: tuple[str, list[str], list[int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bundle holding only the company's CA replaces the system's store: against any
    other host the refusal read as the host's fault."""
    url, seen, _ = self_signed_api
    other = tmp_path / "other-ca.pem"
    other.write_bytes(self_signed_pem("corp-ca")[0])  # another name and key than the API's
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other))
    said = r"checked against REQUESTS_CA_BUNDLE \(.*other-ca\.pem\), not the system's store"
    with pytest.raises(NetworkError, match=said):
        load_dataset("job_tls", KEY, url, retries=0)
    assert seen == []


def test_a_ca_folder_without_hash_names_is_said_to_need_them(
    self_signed_api: tuple[str, list[str], list[int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API's own certificate in a folder, unhashed (OpenSSL finds certificates in a
    folder by hash names only): the refusal read as the wrong CA."""
    url, seen, _ = self_signed_api
    folder = tmp_path / "corp-cas"
    folder.mkdir()
    (folder / "corp-ca.crt").write_bytes((tmp_path / "cert.pem").read_bytes())
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(folder))
    with pytest.raises(NetworkError, match="a folder is read by hash names: `openssl rehash`"):
        load_dataset("job_tls", KEY, url, retries=0)
    assert seen == []


def self_signed_pem(common_name: str, *, address: str | None = None) -> tuple[bytes, bytes]:
    """A self-signed certificate for ``common_name`` (and the IP ``address``, a name TLS
    checks), with a fresh key: both as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if address is not None:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_through_a_proxy_an_https_api_is_a_tunnel_the_proxy_cannot_read(
    self_signed_api: tuple[str, list[str], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY: the request, and the key in it, go inside a CONNECT tunnel to the API's
    host; the proxy learns only the host and port. The certificate is still the host's to
    prove: through the tunnel, an unverifiable one is refused before the key is sent."""
    url, seen, _ = self_signed_api
    url = url.replace("127.0.0.1", "api.pixcrawler.test")  # (loopback hosts go straight)
    with ForwardProxy(hosts={"api.pixcrawler.test": "127.0.0.1"}) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        with pytest.raises(NetworkError, match="certificate did not verify"):
            load_dataset("job_tls", KEY, url, retries=0)
        assert seen == []
        with pytest.warns(UserWarning, match="verify_ssl=False"):
            dataset = load_dataset("job_tls", KEY, url, verify_ssl=False, retries=0)
    assert dataset.job.id == "job_tls" and seen == ["/api/v1/jobs/job_tls"]
    host = url.removeprefix("https://")
    assert proxy.requests == [f"CONNECT {host}"] * 2


# -- the command line -----------------------------------------------------------------------


def cli_available() -> bool:
    if shutil.which("pixcrawler") is None:
        return False
    done = subprocess.run(["pixcrawler", "--help"], capture_output=True, timeout=60)
    return done.returncode == 0


@pytest.fixture(scope="module")
def cli_ok() -> None:
    if not cli_available():
        pytest.skip("the pixcrawler command line is not installed")


def run_cli(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PIXCRAWLER_CONFIG_DIR": str(home / "config"),
        "PIXCRAWLER_CACHE_DIR": str(home / "cache"),
        "XDG_CACHE_HOME": str(home / "xdg-cache"),
        "TMPDIR": str(home / "tmp"),
        "HOME": str(home / "home"),
        "NO_COLOR": "1",
    }
    env.pop("PIXCRAWLER_API_KEY", None)
    return subprocess.run(
        ["pixcrawler", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        input=stdin,
        cwd=home / "home",
    )


def test_the_cli_never_prints_or_writes_the_key(cli_ok: None, api: str, tmp_path: Path) -> None:
    for name in ("config", "cache", "xdg-cache", "tmp", "home", "out"):
        (tmp_path / name).mkdir()
    out = str(tmp_path / "out")
    key_flags = ["--api-key", KEY, "--base-url", api]
    with FaultProxy(
        api, schedule=FaultSchedule.script([Fault("corrupt", offset=50)] * 2, match="/chunks/0")
    ) as proxy:
        runs = [
            (0, ["--debug", "info", JOB_UNIFORM, *key_flags]),
            (0, ["--debug", "list", *key_flags]),
            (0, ["--debug", "download", JOB_UNIFORM, "-o", out, "--format", "zip", *key_flags]),
            (0, ["--debug", "download", JOB_UNIFORM, "-o", out, "--format", "images", *key_flags]),
            (0, ["--debug", "download", JOB_UNIFORM, "-o", out, "--format", "numpy", *key_flags]),
            (4, ["--debug", "info", "job_nope", *key_flags]),
            (5, ["--debug", "download", "job_failed", "-o", out, *key_flags]),
            (3, ["--debug", "list", "--api-key", WRONG_KEY, "--base-url", api]),
            (
                6,
                [
                    "--debug",
                    "info",
                    JOB_UNIFORM,
                    "--api-key",
                    KEY,
                    "--base-url",
                    "http://127.0.0.1:9",
                ],
            ),
            (
                7,
                [
                    "--debug",
                    "download",
                    JOB_UNIFORM,
                    "-o",
                    str(tmp_path / "tmp"),
                    "--format",
                    "zip",
                    "--api-key",
                    KEY,
                    "--base-url",
                    proxy.base_url,
                ],
            ),
        ]
        for expected, args in runs:
            done = run_cli(tmp_path, *args)
            where = " ".join(a for a in args if a not in (KEY, WRONG_KEY))
            assert done.returncode == expected, (where, done.stdout[-500:], done.stderr[-1500:])
            assert_no_key(done.stdout + done.stderr, f"the output of `pixcrawler {where}`")
    # login stores the key (its one job) and says nothing of it; later commands use it.
    done = run_cli(tmp_path, "login", stdin=KEY + "\n")
    assert done.returncode == 0 and KEY not in done.stdout + done.stderr
    done = run_cli(tmp_path, "--debug", "info", JOB_UNIFORM, "--base-url", api)
    assert done.returncode == 0 and str(UNIFORM_TOTAL) in done.stdout
    assert_no_key(done.stdout + done.stderr, "info after login")
    # Every file the commands wrote, but the credentials file, is free of the key.
    assert_files_clean(tmp_path, allow=("credentials.json",))
    assert any((tmp_path / "out" / JOB_UNIFORM).rglob("*.zip"))
    credentials = next((tmp_path / "config").rglob("credentials.json"))
    assert credentials.stat().st_mode & 0o077 == 0


def test_a_certificate_that_does_not_verify_is_not_retried(
    self_signed_api: tuple[str, list[str], list[int]],
) -> None:
    """Asking again gets the same certificate: the API call and a chunk's download fail
    at the first refusal, saying why, instead of after every retry's backoff."""
    url, seen, connections = self_signed_api
    with pytest.raises(NetworkError, match="certificate did not verify") as info:
        load_dataset("job_tls", KEY, url, retries=3, backoff=30)
    assert len(connections) == 1 and seen == []
    assert_no_key(exception_texts(info.value), "the TLS error")
    client = ApiClient(KEY, "http://127.0.0.1:9", retry=RetryPolicy(retries=3, backoff_base=30))
    downloader = ChunkDownloader(client, [Chunk(0, url + "/chunk.zip", 10, None)], prefetch=1)
    try:
        with pytest.raises(DownloadError, match="certificate did not verify") as failed:
            downloader.fetch(0)
    finally:
        downloader.close()
    assert failed.value.chunk_id == 0
    assert len(connections) == 2 and seen == []
