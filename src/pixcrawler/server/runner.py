"""Run the reference server: in the foreground (``pixcrawler serve``) or in a thread (tests)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from ..config import THREAD_PREFIX
from .app import create_app
from .store import KEYS_FILE, ensure_server_keys, existing_store

__all__ = ["run_in_thread", "serve"]

_START_TIMEOUT = 10.0  # seconds for uvicorn to start listening in run_in_thread
_STOP_TIMEOUT = 5.0  # seconds to wait for the server thread at exit
_GRACEFUL_SHUTDOWN = 2  # seconds uvicorn waits for open connections before closing them


def serve(store: Path, host: str = "127.0.0.1", port: int = 8000, *, debug: bool = False) -> None:
    """Serve ``store`` over HTTP until interrupted.

    With no key configured (``<store>/keys.json`` or ``PIXCRAWLER_SERVER_KEYS``) a key for
    owner ``default`` is created, written to ``keys.json`` (mode 0600) and printed once.
    ``port=0`` picks a free port; the one bound is announced. Ctrl+C stops the server after
    at most a few seconds, cutting off downloads still open (clients resume them with
    ``Range``); only ``debug`` shows what uvicorn logs while stopping. Raises ValueError
    when ``store`` is not a folder, its keys are malformed, or ``host:port`` cannot be
    listened on.

    Example::

        serve(Path("store"), port=8000)
    """
    store = existing_store(store)  # before a key is minted for it
    try:
        sock = _listen(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"cannot listen on {_url_host(host)}:{port}: {reason}") from None
    try:
        keys, created = ensure_server_keys(store)
        if created is not None:
            # The one place a key is ever printed: the operator needs it, and it is new.
            print(f"Created API key for owner 'default': {created}", flush=True)
            print(f"(saved to {store / KEYS_FILE}; it will not be shown again)", flush=True)
        app = create_app(store, keys)
        bound = f"http://{_url_host(host)}:{sock.getsockname()[1]}"
        _announce_once_started(app, f"Serving {store} on {bound} (Ctrl+C to stop)")
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN,
            )
        )
        # uvicorn re-raises the SIGINT it handled once stopped: Ctrl+C is how a
        # foreground server ends, not an error.
        with (
            _quiet_once_stopping(server, threading.current_thread(), debug=debug),
            contextlib.suppress(KeyboardInterrupt),
        ):
            server.run(sockets=[sock])
    finally:
        sock.close()


@contextmanager
def run_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run an ASGI ``app`` with uvicorn on a daemon thread; yield its base URL.

    The socket is bound here (``port=0`` picks a free port) so the URL is known before the
    server starts; the block runs once the server accepts connections, and the server is
    stopped and joined on exit.

    Example::

        with run_in_thread(create_app(store, {"key": "default"})) as base_url:
            urllib3.request("GET", base_url + "/health")
    """
    sock = _listen(host, port)
    try:
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"{THREAD_PREFIX}server-{bound_port}",
            daemon=True,
        )
        thread.start()
        with _quiet_once_stopping(server, thread):
            deadline = time.monotonic() + _START_TIMEOUT
            while not server.started:
                if not thread.is_alive():
                    raise RuntimeError("the server thread exited before it started listening")
                if time.monotonic() > deadline:
                    server.should_exit = True
                    raise RuntimeError(f"the server did not start within {_START_TIMEOUT:.0f} s")
                time.sleep(0.005)
            try:
                yield f"http://{_url_host(host)}:{bound_port}"
            finally:
                server.should_exit = True
                thread.join(_STOP_TIMEOUT)
    finally:
        sock.close()


@contextmanager
def _quiet_once_stopping(
    server: uvicorn.Server, thread: threading.Thread, *, debug: bool = False
) -> Iterator[None]:
    """While in the block, hide what uvicorn logs on ``thread`` (the one running ``server``)
    once ``server`` is stopping: the downloads cut off at the end of the graceful shutdown
    are logged as tracebacks of cancelled tasks, expected when a server is stopped. Other
    servers' records (tests run several) pass."""

    def keep(record: logging.LogRecord) -> bool:
        return debug or record.thread != thread.ident or not server.should_exit

    log = logging.getLogger("uvicorn.error")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def _announce_once_started(app: Any, line: str) -> None:
    """Print ``line`` when the app has started, inside uvicorn: its Ctrl+C handling is in
    place by then. A SIGINT during uvicorn's start-up can be swallowed in a logging
    callback ("Exception ignored in ..."), leaving a server someone has stopped running."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with inner(app) as state:
            print(line, flush=True)
            yield state

    app.router.lifespan_context = lifespan


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening; OSError when it cannot be.

    Bound here rather than by uvicorn, which exits the process on a failed bind."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # "[::1]", as in a URL (and as announced): bind() wants "::1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets of that proto (one of
    # proto 0 Nagled each answer's body behind its headers: 40 ms a call on a kept-alive
    # connection, waiting for a delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
