"""``pixcrawler serve`` as an operator runs it: a subprocess that binds, announces, stops.

Each test runs the console script of this interpreter with ``PYTHONPATH`` pointing at this
checkout's ``src``, a private config dir, and no ``PIXCRAWLER_*`` variables of the caller.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import urllib3

from pixcrawler.config import ENV_SERVER_KEYS

pytestmark = pytest.mark.timeout(60)

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = "serve-test-key"
BIG_CHUNK = 64 << 20  # more than the loopback socket buffers of both ends can hold
STOP_BOUND = 10.0  # seconds: the graceful shutdown (2 s) plus a slow start on a busy machine
Start = Callable[..., tuple[subprocess.Popen[str], int]]
SERVING = re.compile(r"Serving .* on http://(?:127\.0\.0\.1|\[::1\]):(\d+) \(Ctrl\+C to stop\)$")


def _script() -> str:
    beside = Path(sys.executable).parent / "pixcrawler"
    found = str(beside) if beside.exists() else shutil.which("pixcrawler")
    if found is None:
        pytest.fail("the pixcrawler console script is not installed: pip install -e . --no-deps")
    return found


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXCRAWLER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["PIXCRAWLER_CONFIG_DIR"] = str(tmp_path / "config")
    env.update(extra)
    return env


def run_serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``pixcrawler serve ARGS`` expected to exit by itself (killed after 20 s)."""
    return subprocess.run(
        [_script(), "serve", *args],
        env=_env(tmp_path, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
    )


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Start]:
    """``start(*args) -> (process, port)``: once it announced the port it listens on."""
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str) -> tuple[subprocess.Popen[str], int]:
        process = subprocess.Popen(
            [_script(), *args],
            env=_env(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        match = SERVING.match(line)
        assert match, line
        return process, int(match.group(1))

    yield start
    for process in processes:
        process.kill()
        process.communicate()


@pytest.fixture
def big_store(tmp_path: Path) -> Path:
    """A store with one completed job whose only chunk is ``BIG_CHUNK`` bytes (sparse)."""
    store = tmp_path / "store"
    (store / "job_big" / "chunks").mkdir(parents=True)
    job = {"id": "job_big", "status": "completed", "progress": 100, "chunks": [{"index": 0}]}
    (store / "job_big" / "job.json").write_text(json.dumps(job))
    with open(store / "job_big" / "chunks" / "00000.zip", "wb") as f:
        f.truncate(BIG_CHUNK)
    (store / "keys.json").write_text(json.dumps({KEY: "default"}))
    return store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connect(port: int) -> socket.socket:
    """A connection to the server, retried while it is not accepting yet."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("where", ["busy port", "foreign address"])
def test_serve_that_cannot_listen_exits_2_with_one_error_line(
    tmp_path: Path, big_store: Path, where: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        # 192.0.2.1 is TEST-NET-1, documentation only: never an address of this machine.
        host, port = ("127.0.0.1", holder.getsockname()[1])
        if where == "foreign address":
            host = "192.0.2.1"
        result = run_serve(tmp_path, "--store", str(big_store), "--host", host, "--port", str(port))
    assert result.returncode == 2, result
    assert result.stdout == ""  # nothing announced: it never served
    assert re.fullmatch(rf"Error: cannot listen on {re.escape(host)}:{port}: \S.*\n", result.stderr)


def test_serve_on_port_0_announces_the_port_it_listens_on(
    start_serve: Start, big_store: Path
) -> None:
    _, port = start_serve("serve", "--store", str(big_store), "--port", "0")
    assert port != 0
    response = urllib3.request("GET", f"http://127.0.0.1:{port}/health", retries=False, timeout=10)
    assert response.status == 200


@pytest.mark.parametrize("with_env_keys", [False, True])
def test_serve_refuses_a_store_that_does_not_exist(tmp_path: Path, with_env_keys: bool) -> None:
    """A typo in --store must not become a fresh, empty store with a newly minted key."""
    typo = tmp_path / "stroe"
    env = {ENV_SERVER_KEYS: f"{KEY}:default"} if with_env_keys else {}
    result = run_serve(tmp_path, "--store", str(typo), "--port", "0", **env)
    assert result.returncode == 2, result
    assert result.stderr == f"Error: store {str(typo)!r} does not exist or is not a folder\n"
    assert result.stdout == ""
    assert not typo.exists()


@pytest.mark.parametrize("interrupts", [1, 2])
def test_ctrl_c_stops_serve_soon_and_quietly_while_a_download_stalls(
    start_serve: Start, big_store: Path, interrupts: int
) -> None:
    """A client that stopped reading mid-chunk must not keep the server up after Ctrl+C,
    and neither one Ctrl+C nor an impatient second one prints a traceback."""
    process, port = start_serve("serve", "--store", str(big_store), "--port", str(free_port()))
    with connect(port) as client:
        request = (
            f"GET /api/v1/jobs/job_big/chunks/0 HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n"
        )
        client.sendall(request.encode())
        assert client.recv(100).startswith(b"HTTP/1.1 200")
        time.sleep(0.5)  # the server fills the socket buffers and waits on this client
        started = time.monotonic()
        for _ in range(interrupts):
            process.send_signal(signal.SIGINT)
            time.sleep(0.3)
        _, err = process.communicate(timeout=STOP_BOUND)
        stopped_after = time.monotonic() - started
    assert process.returncode == 0, err
    assert stopped_after < STOP_BOUND
    assert "Traceback" not in err
    assert err == ""


def test_ctrl_c_right_after_the_announcement_stops_serve_quietly(
    start_serve: Start, big_store: Path
) -> None:
    """ "Serving" is printed once uvicorn handles Ctrl+C: a SIGINT during its start-up
    could be swallowed in a logging callback and leave the server running."""
    for _ in range(3):
        process, _ = start_serve("serve", "--store", str(big_store), "--port", "0")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=STOP_BOUND)
        assert (process.returncode, err) == (0, "")


def ipv6_loopback() -> bool:
    """Whether this machine can listen on ::1 (containers often have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except (OSError, AttributeError):
        return False
    return True


def test_serve_listens_on_an_ipv6_host_in_brackets(start_serve: Start, big_store: Path) -> None:
    """``--host [::1]``, the host as a URL writes it (and as serve announces it), was
    refused: "Name or service not known"."""
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    _, port = start_serve("serve", "--store", str(big_store), "--host", "[::1]", "--port", "0")
    response = urllib3.request("GET", f"http://[::1]:{port}/health", retries=False, timeout=10)
    assert response.status == 200


def test_an_ipv6_host_is_bracketed_once_in_messages() -> None:
    from pixcrawler.server.runner import _url_host

    assert _url_host("::1") == _url_host("[::1]") == "[::1]"
    assert _url_host("127.0.0.1") == "127.0.0.1"
