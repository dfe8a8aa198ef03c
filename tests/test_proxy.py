"""Proxies from the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY), as requests
and httpx take them: a real forward proxy on loopback relays the API's and the chunks'
requests. (The proxy seeing an HTTPS API only as a tunnel is in test_keys.py.)"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from conftest import LiveServer
from constants import JOB_UNIFORM, UNIFORM_TOTAL
from helpers import ForwardProxy, settles
from pixcrawler import load_dataset
from pixcrawler.client import ApiClient, proxy_for
from pixcrawler.downloader import ChunkDownloader
from pixcrawler.exceptions import (
    AuthenticationError,
    DownloadError,
    NetworkError,
    PixCrawlerError,
)
from pixcrawler.models import Chunk
from pixcrawler.retry import RetryPolicy

pytestmark = pytest.mark.timeout(60)


# A name only the proxy knows (it connects to 127.0.0.1): the SDK sends loopback hosts
# past any proxy, and cannot resolve this one itself, so an answer proves the proxy's use.
NAME = "api.pixcrawler.test"


def proxy() -> ForwardProxy:
    return ForwardProxy(hosts={NAME: "127.0.0.1"})


def pixels(live_server: LiveServer, host: str = NAME, **options: object) -> list[np.ndarray]:
    base_url = live_server.base_url.replace("127.0.0.1", host)
    with load_dataset(JOB_UNIFORM, live_server.api_key, base_url, **options) as dataset:  # type: ignore[arg-type]
        return [image.copy() for image, _ in dataset]


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_a_proxy_the_environment_names_carries_every_request(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """The SDK went straight to the host: behind a proxy, with no other way out, nothing
    loaded, where requests and httpx (the spec's transport) take the proxy."""
    direct = pixels(live_server, "127.0.0.1")
    with proxy() as forward:
        monkeypatch.setenv(variable, forward.url)
        proxied = pixels(live_server)
    assert len(proxied) == UNIFORM_TOTAL
    assert all(np.array_equal(a, b) for a, b in zip(direct, proxied, strict=True))
    api = live_server.base_url.replace("127.0.0.1", NAME) + "/api/v1"
    assert forward.requests[0] == f"GET {api}/jobs/{JOB_UNIFORM}"
    assert f"GET {api}/jobs/{JOB_UNIFORM}/chunks/0" in forward.requests
    assert all(line.startswith(f"GET {api}/") for line in forward.requests)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_loopback_host_is_reached_straight_whatever_the_proxy(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """`pixcrawler serve` and the demo on a machine whose environment names a proxy: a
    proxy elsewhere would have asked its own loopback."""
    with proxy() as forward:
        monkeypatch.setenv("HTTP_PROXY", forward.url)
        assert len(pixels(live_server, host)) == UNIFORM_TOTAL
    assert forward.requests == []


@pytest.mark.parametrize("listed", ["0.0.0.0", "localhost, 0.0.0.0", "*", "0.0.0.0/8"])
def test_a_host_no_proxy_lists_is_reached_straight(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, listed: str
) -> None:
    # (0.0.0.0 is no loopback address, and Linux connects it to the local host.)
    with proxy() as forward:
        monkeypatch.setenv("HTTP_PROXY", forward.url)
        assert len(pixels(live_server, "0.0.0.0")) == UNIFORM_TOTAL
        assert len(forward.requests) > 2  # not listed: through the proxy
        del forward.requests[:]
        monkeypatch.setenv("NO_PROXY", listed)
        assert len(pixels(live_server, "0.0.0.0")) == UNIFORM_TOTAL
    assert forward.requests == []


def test_the_proxys_credentials_go_as_proxy_authorization_and_into_no_message(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "proxy-pw-9f3b2c71"
    with proxy() as forward:
        port = forward.url.rpartition(":")[2]
        monkeypatch.setenv("HTTP_PROXY", f"http://alice:{password}@127.0.0.1:{port}")
        assert len(pixels(live_server)) == UNIFORM_TOTAL
        expected = "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()
        assert forward.auth and set(forward.auth) == {expected}
        forward.refuse = True  # the credentials refused: 407
        with pytest.raises(PixCrawlerError) as info:
            pixels(live_server, retries=0)
    assert "407" in str(info.value)
    assert password not in str(info.value) and password not in repr(info.value)


def test_a_socks_proxy_is_refused_by_name_not_gone_around(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://bob:socks/pw-55ae01@127.0.0.1:1080")
    with pytest.raises(NetworkError, match=r"socks5 proxy; only http:// and https://") as info:
        pixels(live_server, retries=0)
    assert "pw-55ae01" not in str(info.value)  # (a '/' in it ended urlsplit's netloc)
    assert f"NO_PROXY={NAME}" in str(info.value)


@pytest.mark.parametrize("what", ["API call", "chunk"])
@pytest.mark.parametrize("stage", ["proxy's tunnel", "TLS handshake"])
def test_close_ends_a_request_waiting_on_a_tunnel_or_a_handshake(
    monkeypatch: pytest.MonkeyPatch, what: str, stage: str
) -> None:
    """An HTTPS request waits for a proxy's tunnel, then the TLS handshake, before it sends
    anything: its connection was made known only after both, so close() left it waiting
    for its timeout (300 s by default); then the socket it knew was the one TLS detaches
    for the handshake, and a shutdown of it cut nothing."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel), never answers
    with proxy() as forward, silent:
        forward.stall = True  # CONNECT is never answered
        if stage == "proxy's tunnel":
            monkeypatch.setenv("HTTPS_PROXY", forward.url)
            host = f"{NAME}:9"
            waiting = lambda: bool(forward.requests)  # noqa: E731
        else:
            host = f"127.0.0.1:{silent.getsockname()[1]}"
            waiting = lambda: True  # noqa: E731 - (connected at once: the backlog)
        client = ApiClient("k" * 24, f"https://{host}", timeout=30, retry=RetryPolicy(0))
        downloader = ChunkDownloader(client, [Chunk(0, f"https://{host}/c.zip", 10, None)])
        errors: list[BaseException] = []

        def wait() -> None:
            call: Callable[[], object] = (
                (lambda: client.get_job("job_x"))
                if what == "API call"
                else lambda: downloader.fetch(0)
            )
            try:
                call()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        assert settles(waiting, 10)
        time.sleep(0.3)  # well into its wait
        started = time.monotonic()
        (client.close if what == "API call" else downloader.close)()
        thread.join(10)
        ended = time.monotonic() - started
        client.close()
    assert not thread.is_alive() and ended < 5, f"close() took {ended:.1f} s to end it"
    assert errors and isinstance(errors[0], PixCrawlerError)


@pytest.mark.parametrize(
    "given",
    [
        "http://alice:Pa55/w0rd9x#2024@proxy.corp:3128",
        "http://alice:1234/w0rd9x@proxy.corp:3128",  # parses, as host alice and port 1234
    ],
)
def test_a_proxy_url_that_does_not_parse_is_said_at_once_without_its_password(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    """A '/' or '#' left in the password: urllib3's error quoted the URL up to it, password
    and all, and the call was retried as if the network had failed."""
    monkeypatch.setenv("HTTP_PROXY", given)
    started = time.monotonic()
    with pytest.raises(NetworkError, match="is not a URL") as info:
        pixels(live_server, retries=3, backoff=30)
    assert time.monotonic() - started < 5  # not retried
    assert "w0rd9x" not in str(info.value) and "HTTP_PROXY or ALL_PROXY" in str(info.value)


def test_a_proxy_asking_to_wait_is_asked_again_and_its_words_are_shown_safe(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 4xx to CONNECT was taken as final: a 429 too, which the retries are for."""
    with proxy() as forward:
        forward.refuse = True
        forward.refusal = (429, "Slow \x1b[2Jdown")
        monkeypatch.setenv("HTTPS_PROXY", forward.url)
        base_url = f"https://{NAME}:9"
        with pytest.raises(NetworkError, match="after 2 attempts") as info:
            load_dataset(JOB_UNIFORM, "k" * 24, base_url, retries=1, backoff=0.01)
        assert len(forward.requests) == 2
        forward.refusal = (407, "Who \x1b[2Jare you")
        with pytest.raises(NetworkError, match="the proxy refused") as refused:
            load_dataset(JOB_UNIFORM, "k" * 24, base_url, retries=1, backoff=0.01)
    assert "\x1b" not in str(refused.value) and "Who ?[2Jare you" in str(refused.value)
    assert "429" in str(info.value)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_refusing_says_so_at_once_naming_where_it_was_set(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    """A 407 from a proxy relaying plain HTTP read as the API's own answer (exit 1, "a
    bug"); one refusing a tunnel was retried, then reported in urllib3's words."""
    with proxy() as forward:
        forward.refuse = True
        monkeypatch.setenv(f"{scheme.upper()}_PROXY", forward.url)
        base_url = live_server.base_url.replace("http://127.0.0.1", f"{scheme}://{NAME}")
        started = time.monotonic()
        with pytest.raises(NetworkError, match="the proxy refused") as info:
            load_dataset(JOB_UNIFORM, live_server.api_key, base_url, retries=3, backoff=30)
    assert time.monotonic() - started < 5 and len(forward.requests) == 1  # not retried
    assert "407 Proxy Authentication Required" in str(info.value)
    assert f"{scheme.upper()}_PROXY or ALL_PROXY" in str(info.value)


@pytest.mark.parametrize("refusal", [(405, "Method Not Allowed"), (403, "Forbidden")])
def test_a_tunnel_refused_is_not_asked_for_again(
    monkeypatch: pytest.MonkeyPatch, refusal: tuple[int, str]
) -> None:
    """(A web server named as the proxy answers CONNECT with 405.)"""
    with proxy() as forward:
        forward.refuse, forward.refusal = True, refusal
        monkeypatch.setenv("HTTPS_PROXY", forward.url)
        with pytest.raises(NetworkError, match=f"the proxy refused to open a tunnel .{refusal[0]}"):
            load_dataset(JOB_UNIFORM, "k" * 24, f"https://{NAME}:9", retries=1, backoff=0.01)
    assert len(forward.requests) == 1


def test_a_proxy_url_with_a_path_is_used_without_it(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As requests and curl do; it was refused as "not a URL"."""
    with proxy() as forward:
        monkeypatch.setenv("HTTP_PROXY", f"{forward.url}/corp/proxy/")
        assert len(pixels(live_server)) == UNIFORM_TOTAL
    assert forward.requests


def test_a_403_relayed_by_a_proxy_says_the_proxy_may_have_given_it(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy's policy page (403) read as the API refusing the key, and nothing more."""
    with proxy() as forward:
        forward.refuse, forward.refusal = True, (403, "Forbidden")
        monkeypatch.setenv("HTTP_PROXY", forward.url)
        with pytest.raises(AuthenticationError, match="may have refused it itself") as info:
            pixels(live_server, retries=0)
    assert "HTTP 403" in str(info.value) and info.value.status_code == 403
    with pytest.raises(AuthenticationError) as direct:  # no proxy: no word of one
        load_dataset(JOB_UNIFORM, "k" * 24, live_server.base_url, retries=0)
    assert "proxy" not in str(direct.value)
    with proxy() as forward:  # a chunk's, too
        forward.refuse, forward.refusal = True, (403, "Forbidden")
        forward.refused_paths = r"/chunks/"
        monkeypatch.setenv("HTTP_PROXY", forward.url)
        with pytest.raises(DownloadError, match="may have refused it itself") as chunk:
            pixels(live_server, retries=0)
    assert isinstance(chunk.value.__cause__, AuthenticationError)


def test_a_chunk_whose_tunnel_the_proxy_refuses_fails_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with proxy() as forward:
        forward.refuse = True
        monkeypatch.setenv("HTTPS_PROXY", forward.url)
        client = ApiClient("k" * 24, f"https://{NAME}:9", retry=RetryPolicy(3, backoff_base=30))
        downloader = ChunkDownloader(client, [Chunk(0, f"https://{NAME}:9/c.zip", 10, None)])
        try:
            with pytest.raises(DownloadError, match="proxy refused to open a tunnel") as info:
                downloader.fetch(0)
        finally:
            downloader.close()
            client.close()
    assert info.value.chunk_id == 0 and len(forward.requests) == 1  # not retried


@pytest.mark.parametrize(
    ("url", "proxies", "expected"),
    [
        ("http://api.x/a", {"http": "proxy:3128"}, "http://proxy:3128"),
        ("https://api.x/a", {"http": "http://p:1"}, None),
        ("https://api.x/a", {"https": "http://p:1", "all": "http://q:2"}, "http://p:1"),
        ("https://api.x/a", {"all": "http://q:2"}, "http://q:2"),
        ("https://api.x/a", {"all": "http://q:2", "no": ".x"}, None),
        ("https://api.x/a", {"all": "http://q:2", "no": "api.x"}, None),
        ("https://badapi.x/a", {"all": "http://q:2", "no": "api.x"}, "http://q:2"),
        ("https://api.x:8443/a", {"all": "http://q:2", "no": "api.x:443"}, "http://q:2"),
        ("https://api.x:8443/a", {"all": "http://q:2", "no": "api.x:8443"}, None),
        ("http://[fe80::1]:80/a", {"all": "http://q:2", "no": "fe80::1"}, None),
        ("http://[::1]:80/a", {"all": "http://q:2"}, None),  # loopback: never proxied
        ("http://127.8.0.1/a", {"all": "http://q:2"}, None),
        ("http://localhost:8000/a", {"all": "http://q:2"}, None),
        ("http://0.0.0.0:8000/a", {"all": "http://q:2"}, "http://q:2"),
        # urllib3 connects to cdn.example: the proxy is judged for it, not for 127.0.0.1
        ("http://cdn.example\\@127.0.0.1/c.zip", {"all": "http://q:2"}, "http://q:2"),
        ("http://10.2.3.4/a", {"all": "http://q:2", "no": "10.0.0.0/8"}, None),
        ("http://11.2.3.4/a", {"all": "http://q:2", "no": "10.0.0.0/8"}, "http://q:2"),
    ],
)
def test_the_proxy_for_a_url_is_chosen_as_requests_chooses_it(
    url: str, proxies: dict[str, str], expected: str | None
) -> None:
    assert proxy_for(url, proxies) == expected
