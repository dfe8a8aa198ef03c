"""The PixCrawler API: HTTP requests, credentials per origin, retries, and error mapping.

Transport is urllib3: on loopback it receives one 250 MB stream at ~1,700 MB/s where httpx
streaming managed ~450 MB/s at a full core (see docs/transport.md), and a chunk is read
straight into one preallocated buffer. Users never touch this object directly.
"""

from __future__ import annotations

import contextlib

# Host names are encoded with it on a first connection: imported now, not on first use
# (see decode.import_decoders).
import encodings.idna  # noqa: F401
import ipaddress
import json
import logging
import operator
import os
import re
import socket
import ssl
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import getproxies

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url
from urllib3.util.ssl_match_hostname import CertificateError as _HostnameMismatch

from . import config, redaction
from .auth import other_api_keys
from .exceptions import (
    AuthenticationError,
    JobNotCompleteError,
    NetworkError,
    NotFoundError,
    PixCrawlerError,
)
from .models import JOB_STATUSES, Job, check_counts
from .retry import Attempts, RetryPolicy, parse_retry_after, status_cause, wait_in_words
from .units import counted

log = logging.getLogger("pixcrawler")


class _Waiting(Attempts):
    """An API call under way, as its slow-wait lines tell it (see _said_while_waiting)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.started = time.monotonic()

    def describe(self) -> str:
        now = time.monotonic()
        text = f"waited {now - self.started:.1f} s for {self.what}: "
        if not self.failures:
            return text + "no answer yet"
        next_in = self.next_in(now) or "the next under way, no answer yet"
        return text + f"{self.last_failure()}; {next_in}"


@contextlib.contextmanager
def _said_while_waiting(what: str) -> Iterator[_Waiting]:
    """Every ``config.SLOW_WAIT_SECONDS`` the body runs, log where the API call ``what``
    stands: an API that does not answer (its retries and timeouts can take minutes) holds
    up ``load_dataset`` and a first batch, and says so, as a chunk waited for does."""
    waiting = _Waiting(what)
    done = threading.Event()

    def report() -> None:
        while not done.wait(config.SLOW_WAIT_SECONDS):
            log.warning("%s", waiting.describe())

    watch = threading.Thread(target=report, name=f"{config.THREAD_PREFIX}api-wait", daemon=True)
    try:
        watch.start()  # (a Ctrl-C in here still sets done below: no thread left logging)
        yield waiting
    finally:
        done.set()
        if watch.ident is not None:  # (None: it never started, or ends at once)
            watch.join()


_JOB_ID_RE = re.compile(config.JOB_ID_PATTERN)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


class _Answer(NamedTuple):
    """An API call's answer: its response, the body read, and the URL that answered."""

    response: urllib3.BaseHTTPResponse
    body: bytes
    url: str


Origin = tuple[str, str, int]


def origin_of(url: str) -> Origin:
    """(scheme, host, port) with the default port filled in: what "the same host" means.

    Read with urllib3's parser, the one that picks the host a request connects to. Python's
    ``urlsplit`` reads some URLs otherwise: for ``http://blob\\@api/x`` it names ``api``
    where urllib3 connects to ``blob``, and the key must follow the connection. A URL
    urllib3 cannot parse (a port of 99999, say) raises ValueError.
    """
    try:
        parts = parse_url(url)
    except LocationParseError:
        raise ValueError(f"malformed URL {_safe_url(url)}") from None
    scheme = (parts.scheme or "").lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.host or "").lower(), port


def api_root(base_url: str) -> str:
    """``https://host`` → ``https://host/api/v1`` (a trailing ``/api/v1`` is tolerated)."""
    root = base_url.strip().rstrip("/")  # (a value read from a file keeps its newline)
    if root.endswith(config.API_PREFIX):
        root = root[: -len(config.API_PREFIX)]
    parts = urlsplit(root)
    if parts.scheme not in ("http", "https"):
        # (Without a scheme urlsplit finds no query: cut it, and what precedes an "@".)
        bare = root.rpartition("@")[2].split("?")[0].split("#")[0]
        shown = _safe_url(root) if "://" in root else repr(bare[:80])
        raise ValueError(f"base_url must start with http:// or https://, got {shown}")
    if parts.query or parts.fragment or "?" in root or "#" in root:
        raise ValueError(f"base_url takes no query or fragment, got {_safe_url(root)}")
    if not origin_of(root)[1]:  # origin_of: a port of 99999 is a ValueError too
        raise ValueError(f"base_url names no host, got {_safe_url(root)}")
    if "@" in parts.netloc:  # dropped, never sent: the SDK signs in with the API key alone
        raise ValueError(
            f"base_url must not hold a user name or password, got {_safe_url(root)}: the "
            "API key is the only credential sent"
        )
    return root + config.API_PREFIX


def job_path(job_id: str | int) -> str:
    # Not str() of anything: None or a float nan reads as a job id that matches the pattern.
    try:
        if isinstance(job_id, bool):  # an int to Python, never a job id
            raise TypeError
        text = job_id if isinstance(job_id, str) else str(operator.index(job_id))
    except TypeError:
        raise ValueError(f"job_id must be an int or a string, got {job_id!r}") from None
    if not _JOB_ID_RE.fullmatch(text):
        raise ValueError(
            f"job_id must be an int or match {config.JOB_ID_PATTERN}, got {text[:80]!r}"
        )
    return f"/jobs/{text}"


def error_message(
    response: urllib3.BaseHTTPResponse, body: bytes | None = None, *, secret: str | None = None
) -> str:
    """The server's own words from either error shape (on one line, cut short), else the
    HTTP reason. ``body``: what was read of a streamed response's (else its whole body).
    ``secret`` (the API key), should the server echo it, is replaced by ``***`` before the
    cut, which could otherwise leave its head; control characters (a terminal's escape
    sequences) become ``?``."""
    try:
        data = json.loads((response.data if body is None else body) or b"{}")
    except (ValueError, RecursionError):  # RecursionError: absurd nesting
        data = None
    words = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            words = str(err["message"])
        elif data.get("detail"):
            words = str(data["detail"])
    words = " ".join((words or response.reason or f"HTTP {response.status}").split())
    if secret:
        words = redaction.redact(words, {secret})
    words = "".join(ch if ch.isprintable() else "?" for ch in words)
    if len(words) > config.MAX_ERROR_MESSAGE:
        words = words[: config.MAX_ERROR_MESSAGE - 1] + "…"
    return words


def error_body(response: urllib3.BaseHTTPResponse) -> bytes:
    """The head of a streamed error response's body: enough for its message, never a
    whole body a misbehaving host may make as large as it likes."""
    return response.read(config.MAX_ERROR_BODY)


# Who wants to know, per thread, which connection a request is about to use: a request
# still waiting for its response headers can then be cancelled by shutting its socket down.
_connection_hooks = threading.local()


def _report(connection: HTTPConnection) -> None:
    hook = getattr(_connection_hooks, "hook", None)
    if hook is not None:
        hook(connection)


class _ReportingHTTPConnection(HTTPConnection):
    """Reported before it sends a request, as soon as its socket exists (an HTTPS
    connection then waits on a proxy's tunnel and the TLS handshake, before any request),
    and again once it has connected, so a cancel that came while it was connecting still
    finds its socket."""

    _cut: socket.socket | None = None  # the socket's own, while it connects (see below)

    def _new_conn(self) -> socket.socket:
        self.sock = sock = super()._new_conn()  # (connect() sets it as this returns, too)
        # A handle of its own on the socket for shutdown_connection: wrapping it in TLS
        # detaches the one urllib3 holds for the whole handshake, and a shutdown of that
        # would cut nothing.
        with contextlib.suppress(OSError):  # (no descriptor left: the request goes on)
            self._cut = sock.dup()
        _report(self)
        return sock

    def connect(self) -> None:
        try:
            super().connect()  # for HTTPS: HTTPSConnection.connect, the TLS handshake included
        finally:
            cut, self._cut = self._cut, None
            if cut is not None:
                cut.close()  # (the connection is cut through its own socket from now on)
        _report(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _report(self)
        super().request(*args, **kwargs)


class _ReportingHTTPSConnection(_ReportingHTTPConnection, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _ReportingHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _ReportingHTTPSConnection


def shutdown_connection(connection: HTTPConnection) -> None:
    """Unblock whatever waits on ``connection``'s socket (a proxy's tunnel, the TLS
    handshake, a send, the response headers)."""
    for sock in (getattr(connection, "_cut", None), getattr(connection, "sock", None)):
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class ApiClient:
    """One connection pool to the API host (and any chunk host), with the key kept private."""

    def __init__(
        self,
        api_key: str,
        base_url: str,
        *,
        timeout: float = config.DEFAULT_TIMEOUT,
        verify_ssl: bool = True,
        retry: RetryPolicy | None = None,
        pool_size: int = config.DEFAULT_MAX_WORKERS,
    ) -> None:
        self._api_key = api_key
        self._remembered = False  # the key, by redaction: once it is first sent
        self.api_url = api_root(base_url)
        self.origin = origin_of(self.api_url)
        self.timeout = float(timeout)
        self.verify_ssl = verify_ssl
        self.retry = retry or RetryPolicy()
        self._closed = threading.Event()
        # The connections of API calls under way: close() shuts them down, so a call on
        # another thread (a re-read of the job's URLs, say) ends now, not at its timeout.
        # (Counted per call: a connection one call left in the pool another may be using.)
        self._calls: Counter[HTTPConnection] = Counter()
        self._calls_lock = threading.Lock()
        if not verify_ssl:
            warnings.warn(
                "verify_ssl=False: TLS certificates are not checked; anyone on the network "
                "path can read your API key and alter the data.",
                stacklevel=3,
            )
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._pool_options: dict[str, Any] = {
            "num_pools": 8,
            "maxsize": max(1, pool_size) + 2,
            "cert_reqs": "CERT_REQUIRED" if verify_ssl else "CERT_NONE",
            "timeout": urllib3.Timeout(connect=self.timeout, read=self.timeout),
            "retries": False,
            "headers": {"User-Agent": config.USER_AGENT},
        }
        # A CA bundle the environment names (see _ca_bundle), checked at the first HTTPS
        # request: a stale one must not stop an http:// or loopback API, as in requests.
        self.ca_bundle = _ca_bundle() if verify_ssl else None
        self._bundle_checked = self.ca_bundle is None
        if self.ca_bundle is not None:
            path = self.ca_bundle[1]
            self._pool_options["ca_cert_dir" if os.path.isdir(path) else "ca_certs"] = path
        self._pool = urllib3.PoolManager(**self._pool_options)
        self._pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        # HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY (any case), as requests and httpx
        # read them; read once, as the client is made.
        self._proxies = getproxies()
        self._via: dict[str, urllib3.ProxyManager] = {}  # a pool manager per proxy
        self._via_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ApiClient(api_url={self.api_url!r})"

    # -- one request -------------------------------------------------------------------

    def resolve(self, url: str) -> str:
        """A chunk URL resolved against the API URL as RFC 3986 does."""
        return _join(self.api_url + "/", url, "a URL")

    def sends_key_to(self, url: str) -> bool:
        return origin_of(url) == self.origin

    def error_message(self, response: urllib3.BaseHTTPResponse, body: bytes | None = None) -> str:
        """:func:`error_message`, the key scrubbed from it."""
        return error_message(response, body, secret=self._api_key)

    def refusal(
        self, response: urllib3.BaseHTTPResponse, what: str, body: bytes | None, url: str
    ) -> PixCrawlerError:
        """:func:`map_status` for an answer from ``url``, the key scrubbed from the
        server's words (a 403 a plain-HTTP proxy relayed says it may be the proxy's)."""
        relayed = response.status == 403 and self._relayed(url)
        return map_status(response, what, body, secret=self._api_key, relayed=relayed)

    def request(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        on_connection: Callable[[HTTPConnection], None] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """One GET, following redirects by hand so the key never leaves the API's origin.

        ``on_connection`` is told each connection the request uses before it sends, so a
        caller can cancel the request while it waits for its headers (see
        :func:`shutdown_connection`).
        """
        return self.request_answered(
            url, headers=headers, stream=stream, on_connection=on_connection
        )[0]

    def request_answered(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        on_connection: Callable[[HTTPConnection], None] | None = None,
    ) -> tuple[urllib3.BaseHTTPResponse, str]:
        """:meth:`request`, and the URL that answered it (where the redirects led)."""
        if self._closed.is_set():
            raise NetworkError("the client was closed")
        for _ in range(_MAX_REDIRECTS + 1):
            # (urllib3 takes a request's headers instead of the pool's, not beside them.)
            sent = {"User-Agent": config.USER_AGENT, **(headers or {})}
            try:
                to_api = self.sends_key_to(url)
            except ValueError as exc:  # a listed or redirected-to URL no request can take
                raise NetworkError(str(exc)) from None
            if to_api:
                if not self._remembered:  # (not before: a job id passed as the key is no secret)
                    redaction.remember(self._api_key)
                    self._remembered = True
                sent["Authorization"] = f"Bearer {self._api_key}"
            manager = self._manager_for(url)
            _connection_hooks.hook = on_connection
            try:
                response = manager.request(
                    "GET", url, headers=sent, preload_content=not stream, redirect=False
                )
            finally:
                _connection_hooks.hook = None
            if response.status == 407 and manager is not self._pool:  # the proxy's, not the API's
                response.close()
                response.release_conn()
                raise NetworkError(
                    f"the proxy refused GET {_safe_url(url)}: HTTP 407 Proxy Authentication "
                    f"Required ({_proxy_hint(url)})",
                    status_code=407,
                )
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                return response, url
            # A redirect's body is read as far as an error's, never to an end a host may
            # put off for ever; the connection is reused only if that was all of it.
            if len(response.read(config.MAX_ERROR_BODY + 1)) > config.MAX_ERROR_BODY:
                response.close()
            response.release_conn()
            url = _join(url, location, "a redirect to a URL")
        raise NetworkError(f"too many redirects fetching {_safe_url(url)}")

    def _manager_for(self, url: str) -> urllib3.PoolManager:
        """The pool manager a request for ``url`` goes through: straight to its host, or
        through the proxy the environment names for it (an HTTPS URL in a CONNECT tunnel,
        so the proxy sees neither the key nor the bytes)."""
        proxy = proxy_for(url, self._proxies)
        bundle = None if self._bundle_checked else self.ca_bundle
        if bundle is not None and "https" in (urlsplit(url).scheme, urlsplit(proxy or "").scheme):
            _check_bundle(*bundle)
            self._bundle_checked = True
        if proxy is None:
            return self._pool
        with self._via_lock:
            if self._closed.is_set():
                raise NetworkError("the client was closed")
            manager = self._via.get(proxy)
            if manager is None:
                manager = self._via[proxy] = self._proxy_manager(proxy)
        return manager

    def _relayed(self, url: str) -> bool:
        """Whether a request for ``url`` went through a proxy that could read its answer
        (a plain-HTTP one: an HTTPS answer comes through a tunnel the proxy cannot read)."""
        with contextlib.suppress(NetworkError):
            return urlsplit(url).scheme == "http" and proxy_for(url, self._proxies) is not None
        return False

    def _proxy_manager(self, proxy: str) -> urllib3.ProxyManager:
        parsed = parse_url(proxy)
        headers = None
        if parsed.auth:  # user:password@ in the proxy's URL: sent as Proxy-Authorization
            user, _, password = (unquote(part) for part in parsed.auth.partition(":"))
            redaction.remember(password)
            headers = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}")
            proxy = parsed._replace(auth=None).url
        manager = urllib3.ProxyManager(proxy, proxy_headers=headers, **self._pool_options)
        manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        return manager

    # -- the API, with retries ------------------------------------------------------------

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET an API path with retries; map failures to the SDK's exceptions. An answer is
        read up to ``config.MAX_API_ANSWER`` bytes, an error's up to its message's."""
        url = self.api_url + path
        if params:
            url += "?" + "&".join(f"{k}={v}" for k, v in params.items())
        connections: set[HTTPConnection] = set()  # this call's, each counted once

        def track(connection: HTTPConnection) -> None:
            with self._calls_lock:
                if connection not in connections:
                    connections.add(connection)
                    self._calls[connection] += 1
            if self._closed.is_set():  # closed before it was tracked
                shutdown_connection(connection)

        def attempt() -> _Answer:
            response, where = self.request_answered(url, stream=True, on_connection=track)
            limit = config.MAX_ERROR_BODY if response.status >= 300 else config.MAX_API_ANSWER
            try:
                body = response.read(limit + 1)
                if len(body) > limit:  # more may follow: the connection is not reused
                    response.close()
            finally:
                response.release_conn()
            return _Answer(response, body[:limit] if response.status >= 300 else body, where)

        what = f"GET {path}"
        try:
            with _said_while_waiting(what) as waiting:
                answer = self.call_with_retries(attempt, what=what, waiting=waiting)
        finally:
            with self._calls_lock:
                self._calls.subtract(connections)
                for connection in connections:
                    if self._calls[connection] <= 0:
                        del self._calls[connection]
        if len(answer.body) > config.MAX_API_ANSWER:
            raise PixCrawlerError(
                f"the API answered {what} with more than {config.MAX_API_ANSWER:,} bytes",
                status_code=answer.response.status,
            )
        try:
            return json.loads(answer.body)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
            raise PixCrawlerError(
                f"the API returned invalid JSON for {what}", status_code=answer.response.status
            ) from exc

    def call_with_retries(
        self, attempt: Callable[[], _Answer], *, what: str, waiting: _Waiting | None = None
    ) -> _Answer:
        failures = 0
        while True:
            retry_after: float | None = None
            try:
                answer = attempt()
            except Urllib3Error as exc:
                traceback.clear_frames(exc.__traceback__)  # (a cycle in urllib3: see downloader)
                if self._closed.is_set():  # close() cut it: no retry, no backoff
                    raise NetworkError(f"{what}: the client was closed") from exc
                if certificate_refused(exc):
                    refused = refused_certificate(exc, self.ca_bundle)
                    raise NetworkError(f"{what} failed: {refused}") from exc
                if (refusal := proxy_refusal(exc)) is not None:
                    raise NetworkError(f"{what} failed: {refusal}") from exc
                failures += 1
                if failures > self.retry.retries:
                    raise NetworkError(
                        f"{what} failed after {counted(failures, 'attempt')}: "
                        f"{exc.__class__.__name__}: {_safe_exc(exc)}"
                    ) from exc
                cause = exc.__class__.__name__
            else:
                response = answer.response
                if response.status < 300:
                    return answer
                if response.status not in config.RETRY_STATUSES:
                    if response.status in (401, 403) and not self.sends_key_to(answer.url):
                        raise self._refused_elsewhere(answer, what)
                    raise self.refusal(response, what, answer.body, answer.url)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                failures += 1
                if self.retry.retry_after_too_long(retry_after) or failures > self.retry.retries:
                    raise _network_error(
                        response, what, failures, retry_after, self._api_key, answer.body
                    )
                cause = status_cause(response.status, retry_after)
            delay = self.retry.delay(failures, retry_after)
            self.retry.announce(what, cause, failures, delay)
            if waiting is not None:
                waiting.failed(cause, delay)
            self.sleep(delay)

    def _refused_elsewhere(self, answer: _Answer, what: str) -> AuthenticationError:
        """A 401/403 from the host a redirect led to: the key is never sent there, so it
        was not the key that was refused."""
        status = answer.response.status
        parts = urlsplit(answer.url)
        there = _safe_url(f"{parts.scheme}://{parts.netloc}")
        said = f"HTTP {status}: {self.error_message(answer.response, answer.body)}"
        if self.origin[0] == "https" and parts.scheme.lower() != "https":
            advice = (  # never the advice to send the key in the clear
                "a redirect from https to plain http, where the key would travel "
                "unencrypted: check base_url, or the server's redirects"
            )
        else:
            advice = f"if {there} is the API, pass it as base_url (or PIXCRAWLER_BASE_URL)"
        return AuthenticationError(
            f"{what}: the API redirected to {there}, another origin, which the API key is "
            f"not sent to, and it answered {said}; {advice}.",
            status_code=status,
        )

    def sleep(self, seconds: float) -> None:
        """Back off, but wake at once when the client is closed."""
        if self._closed.wait(seconds):
            raise NetworkError("the client was closed")

    def get_job(self, job_id: str | int) -> Job:
        if isinstance(job_id, str) and job_id.strip() in {self._api_key, *other_api_keys()}:
            # Pasted where the job id goes (or the two arguments swapped): not into a URL.
            raise ValueError("job_id is an API key, not a job id")
        return Job.from_json(self.get_json(job_path(job_id)))

    def get_completed_job(self, job_id: str | int) -> Job:
        job = self.get_job(job_id)
        if job.status != "completed":
            raise not_complete_error(job)
        check_counts(job)
        return job

    def list_jobs(self, page: int = 1, size: int = config.DEFAULT_PAGE_SIZE) -> dict[str, Any]:
        data = self.get_json("/jobs", {"page": page, "size": size})
        if not isinstance(data, dict) or not isinstance(data.get("items"), list):
            raise PixCrawlerError("the API returned a malformed job list")
        return data

    def close(self) -> None:
        self._closed.set()
        with self._calls_lock:
            calls = list(self._calls)
        for connection in calls:
            shutdown_connection(connection)
        self._pool.clear()
        with self._via_lock:
            managers = list(self._via.values())
        for manager in managers:
            manager.clear()


def not_complete_error(job: Job) -> JobNotCompleteError:
    if job.status in ("failed", "cancelled"):
        message = (
            f"Job {job.id} {job.status} at {job.progress:g}% and will not complete; "
            "start a new crawl."
        )
    elif job.status in JOB_STATUSES:  # pending, running
        message = (
            f"Job {job.id} is still processing ({job.status}, {job.progress:g}% complete); "
            "try again when it is completed."
        )
    else:  # a status of the service's own ("in_progress"): not completed, whatever else
        message = (
            f"Job {job.id} is not completed (status {job.status!r}, {job.progress:g}% "
            "complete); try again when it is completed."
        )
    # 63, not 63.0: the specification prints it as f"{e.progress}% complete".
    progress = int(job.progress) if job.progress.is_integer() else job.progress
    return JobNotCompleteError(message, status=job.status, progress=progress)


def map_status(
    response: urllib3.BaseHTTPResponse,
    what: str,
    body: bytes | None = None,
    *,
    secret: str | None = None,
    relayed: bool = False,
) -> PixCrawlerError:
    """A non-retryable HTTP error as the SDK's exception, with the server's message
    (``body`` and ``secret``: as :func:`error_message` takes them). ``relayed``: the answer
    came through a proxy that could have given it itself."""
    status = response.status
    message = error_message(response, body, secret=secret)
    if status in (401, 403):
        proxy = (
            f" It came through a proxy ({_proxy_hint('http:')}), which may have refused it itself."
            if relayed
            else ""
        )
        return AuthenticationError(
            f"{what}: the API key was rejected (HTTP {status}: {message}). Check the key "
            f"or run `pixcrawler login`.{proxy}",
            status_code=status,
        )
    if status == 404:
        return NotFoundError(f"{what}: not found (HTTP 404: {message})", status_code=404)
    return PixCrawlerError(f"{what}: HTTP {status}: {message}", status_code=status)


def _network_error(
    response: urllib3.BaseHTTPResponse,
    what: str,
    attempts: int,
    retry_after: float | None,
    secret: str,
    body: bytes | None = None,
) -> NetworkError:
    words = error_message(response, body, secret=secret)
    message = f"{what}: HTTP {response.status}: {words} after "
    message += counted(attempts, "attempt")
    if retry_after is not None:
        message += f"; the server asks to retry in {wait_in_words(retry_after)}"
    return NetworkError(message, status_code=response.status, retry_after=retry_after)


def proxy_for(url: str, proxies: Mapping[str, str]) -> str | None:
    """The proxy a request for ``url`` goes through, chosen from ``proxies``
    (:func:`urllib.request.getproxies`) as requests does: the one for its scheme, else
    ``all``; none for a host ``no`` lists (NO_PROXY: names, ``.domain``s, ``*``), nor for
    a loopback host (``localhost``, 127.0.0.0/8, ::1: a proxy on another machine would
    reach its own), as Go's net/http has it. A proxy given without a scheme is an HTTP one."""
    if not proxies:
        return None
    parts = parse_url(url)  # the host urllib3 will connect to, whatever urlsplit says
    proxy = proxies.get(parts.scheme or "") or proxies.get("all")
    host = (parts.host or "").strip("[]").lower()
    if not proxy or _loopback(host) or _no_proxy(host, parts.port, proxies.get("no", "")):
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    scheme = proxy.partition("://")[0].lower()
    if scheme not in ("http", "https"):  # (named by its scheme alone: the URL holds passwords)
        shown = "".join(ch if ch.isalnum() or ch in "+-." else "?" for ch in scheme[:20])
        raise NetworkError(
            f"the proxy set for {parts.scheme} URLs is a {shown} proxy; only http:// and "
            f"https:// proxies are supported ({_proxy_hint(url)}: NO_PROXY={host} goes "
            "straight to the host)"
        )
    try:
        given = parse_url(proxy)
        rest = f"{given.path or ''}{given.query or ''}{given.fragment or ''}"
        # An '@' after the host: a '/' in its password ("http://alice:1234/w@host" reads
        # as host alice). Any other path is left out, as requests and curl leave it.
        if not given.host or "@" in rest:
            raise LocationParseError(proxy)
        proxy = given._replace(path=None, query=None, fragment=None).url
    except LocationParseError:  # (its message would quote the URL, password and all)
        raise NetworkError(
            f"the proxy set for {parts.scheme} URLs is not a URL ({_proxy_hint(url)}; "
            "a character such as / # ? @ in a user name or password must be percent-encoded)"
        ) from None
    return proxy


def _proxy_hint(url: str) -> str:
    """Where the proxy for ``url`` was set."""
    scheme = urlsplit(url).scheme.upper()
    return f"it is set by {scheme}_PROXY or ALL_PROXY, and NO_PROXY exempts hosts"


def proxy_refusal(exc: BaseException) -> str | None:
    """Words for a proxy that refused to open a tunnel (a 4xx, 403 and 407 the likeliest:
    asking again gets the same answer, so it is not retried); None for any other failure
    (a proxy that is down, or answered 408, 429 or 5xx, is retried)."""
    for error in _causes(exc):
        said = str(error)
        answer = said.removeprefix("Tunnel connection failed: ")
        if (
            isinstance(error, OSError)
            and answer != said
            and answer[:1] == "4"
            and not answer.startswith(("408", "429"))  # (a wait asked for: retried)
        ):
            answer = answer[:80]
            answer = "".join(ch if ch.isprintable() else "?" for ch in answer)  # (its words)
            return f"the proxy refused to open a tunnel ({answer}; {_proxy_hint('https:')})"
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every error behind it, each once: its cause, its context, and what
    urllib3 keeps in ``.reason`` (MaxRetryError) or ``args`` (SSLError, ProxyError)."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        error = pending.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        pending += [error.__cause__, error.__context__, getattr(error, "reason", None)]
        pending += error.args


def _ca_bundle() -> tuple[str, str] | None:
    """The CA certificates requests would trust instead of the system's, and the variable
    that names them: REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE (a file, or a folder of them).
    SSL_CERT_FILE and SSL_CERT_DIR, OpenSSL's own, it reads itself where these are not set."""
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if path := os.environ.get(variable, "").strip():
            return variable, path
    return None


def _check_bundle(variable: str, path: str) -> None:
    """Refuse, by name and before any connection, a bundle that cannot be used (each
    attempt would fail alike on it, in words that never say where it came from)."""
    shown = "".join(ch if ch.isprintable() else "?" for ch in path[:300])
    try:
        if os.path.isdir(path):
            ssl.create_default_context(capath=path)
        else:
            ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise NetworkError(
            f"{variable} names {shown}, which is no file or folder of CA certificates"
        ) from None
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        why = getattr(exc, "reason", None) or exc.__class__.__name__  # (OpenSSL's token)
        raise NetworkError(
            f"{variable} names {shown}, which holds no certificate OpenSSL could read "
            f"({why}): point it at your CA's certificate (PEM), or unset it"
        ) from None


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return False


def _no_proxy(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether NO_PROXY's ``no_proxy`` lists ``host`` (and ``port``): ``*``; a name, which
    covers its subdomains too, with a leading dot or without; an address; a network
    (``10.0.0.0/8``); any of them with ``:port``."""
    host = host.lower()
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        if entry == "*":
            return True
        listed, _, listed_port = entry.rpartition(":")
        bracketed = listed.startswith("[") and listed.endswith("]")
        if not listed_port.isdigit() or not (bracketed or (listed and ":" not in listed)):
            listed, listed_port = entry, ""  # no port ("::1" is an address, not ":" + "1")
        if listed_port and int(listed_port) != port:
            continue
        listed = listed.strip("[]").lstrip(".")
        if not listed:
            continue
        if "/" in listed:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(host) in ipaddress.ip_network(listed, strict=False):
                    return True
        elif host == listed or host.endswith(f".{listed}"):
            return True
    return False


def _safe_url(url: str) -> str:
    """A URL without its query string, which may hold a presigned signature, and without
    any user:password before its host."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def certificate_refused(exc: BaseException) -> bool:
    """Whether a request failed on the host's TLS certificate (self-signed, expired, for
    another name): asking again gets the same answer, so it is not retried."""
    return any(
        isinstance(error, (ssl.SSLCertVerificationError, _HostnameMismatch))
        for error in _causes(exc)
    )


def refused_certificate(exc: BaseException, bundle: tuple[str, str] | None = None) -> str:
    """Words for :func:`certificate_refused`'s failures; ``bundle``: the CA bundle from the
    environment the certificate was checked against (ApiClient.ca_bundle), if any."""
    against = ""
    if bundle is not None:
        variable, path = bundle
        against = f"; it was checked against {variable} ({path[:300]}), not the system's store"
        if os.path.isdir(path):
            against += " (a folder is read by hash names: `openssl rehash` it, or name a file)"
    return (
        f"{exc.__class__.__name__}: {_safe_exc(exc)} (the TLS certificate did not verify, "
        f"so it was not retried{against})"
    )


def _safe_exc(exc: BaseException) -> str:
    # urllib3 messages name the pool and URL, never request headers, so they hold no key.
    return str(exc)[:300]


__all__ = [
    "ApiClient",
    "api_root",
    "error_body",
    "error_message",
    "map_status",
    "not_complete_error",
    "origin_of",
]


def _join(base: str, url: str, what: str) -> str:
    """``url`` resolved against ``base`` (RFC 3986); a NetworkError for one that urljoin
    cannot parse (e.g. "Invalid IPv6 URL"), ``what`` saying where it came from."""
    try:
        joined = urljoin(base, url)
        scheme = urlsplit(joined).scheme.lower()
    except ValueError as exc:
        raise NetworkError(f"{what} no request can take ({exc})") from None
    if scheme not in ("http", "https"):  # ftp:, file: ...: no retry would ever reach it
        raise NetworkError(f"{what} no request can take (scheme {scheme[:20]!r})")
    return joined
