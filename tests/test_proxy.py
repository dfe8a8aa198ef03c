"""Proxies from the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY), as requests
and httpx take them: a real forward proxy on loopback relays the API's and the chunks'
requests. (The proxy seeing an HTTPS API only as a tunnel is in test_keys.py.)"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from conftest import LiveServer
from constants import JOB_UNIFORM, UNIFORM_TOTAL
from helpers import ForwardProxy
from pixcrawler import load_dataset
from pixcrawler.client import proxy_for
from pixcrawler.exceptions import NetworkError, PixCrawlerError

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
    monkeypatch.setenv("ALL_PROXY", "socks5://bob:socks-pw-55ae01@127.0.0.1:1080")
    with pytest.raises(NetworkError, match=r"socks5 proxy; only http:// and https://") as info:
        pixels(live_server, retries=0)
    assert "socks-pw-55ae01" not in str(info.value)
    assert f"NO_PROXY={NAME}" in str(info.value)


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
        ("http://10.2.3.4/a", {"all": "http://q:2", "no": "10.0.0.0/8"}, None),
        ("http://11.2.3.4/a", {"all": "http://q:2", "no": "10.0.0.0/8"}, "http://q:2"),
    ],
)
def test_the_proxy_for_a_url_is_chosen_as_requests_chooses_it(
    url: str, proxies: dict[str, str], expected: str | None
) -> None:
    assert proxy_for(url, proxies) == expected
