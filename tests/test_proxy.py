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


def pixels(live_server: LiveServer, **options: object) -> list[np.ndarray]:
    with load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, **options) as dataset:  # type: ignore[arg-type]
        return [image.copy() for image, _ in dataset]


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_a_proxy_the_environment_names_carries_every_request(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """The SDK went straight to the host: behind a proxy, with no other way out, nothing
    loaded, where requests and httpx (the spec's transport) take the proxy."""
    direct = pixels(live_server)
    with ForwardProxy() as proxy:
        monkeypatch.setenv(variable, proxy.url)
        proxied = pixels(live_server)
    assert len(proxied) == UNIFORM_TOTAL
    assert all(np.array_equal(a, b) for a, b in zip(direct, proxied, strict=True))
    api = live_server.base_url + "/api/v1"
    assert proxy.requests[0] == f"GET {api}/jobs/{JOB_UNIFORM}"
    assert f"GET {api}/jobs/{JOB_UNIFORM}/chunks/0" in proxy.requests
    assert all(line.startswith(f"GET {api}/") for line in proxy.requests)


@pytest.mark.parametrize("listed", ["127.0.0.1", "localhost,127.0.0.1", "*", "127.0.0.0/8"])
def test_a_host_no_proxy_lists_is_reached_straight(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, listed: str
) -> None:
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", listed)
        assert len(pixels(live_server)) == UNIFORM_TOTAL
    assert proxy.requests == []


def test_the_proxys_credentials_go_as_proxy_authorization_and_into_no_message(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "proxy-pw-9f3b2c71"
    with ForwardProxy() as proxy:
        port = proxy.url.rpartition(":")[2]
        monkeypatch.setenv("HTTP_PROXY", f"http://alice:{password}@127.0.0.1:{port}")
        assert len(pixels(live_server)) == UNIFORM_TOTAL
        expected = "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()
        assert proxy.auth and set(proxy.auth) == {expected}
        proxy.refuse = True  # the credentials refused: 407
        with pytest.raises(PixCrawlerError) as info:
            load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, retries=0)
    assert "407" in str(info.value)
    assert password not in str(info.value) and password not in repr(info.value)


def test_a_socks_proxy_is_refused_by_name_not_gone_around(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://bob:socks-pw-55ae01@127.0.0.1:1080")
    with pytest.raises(NetworkError, match=r"socks5 proxy; only http:// and https://") as info:
        load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url, retries=0)
    assert "socks-pw-55ae01" not in str(info.value)
    assert "NO_PROXY=127.0.0.1" in str(info.value)


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
        ("http://[::1]:80/a", {"all": "http://q:2", "no": "::1"}, None),
        ("http://10.2.3.4/a", {"all": "http://q:2", "no": "10.0.0.0/8"}, None),
        ("http://11.2.3.4/a", {"all": "http://q:2", "no": "10.0.0.0/8"}, "http://q:2"),
    ],
)
def test_the_proxy_for_a_url_is_chosen_as_requests_chooses_it(
    url: str, proxies: dict[str, str], expected: str | None
) -> None:
    assert proxy_for(url, proxies) == expected
