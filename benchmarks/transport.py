"""Transport benchmark: receive chunk-sized bodies over loopback with each HTTP client.

Prints MB/s and the client's CPU seconds per GB (the server runs in another process, so
its CPU is not counted) for urllib3 (what the SDK uses: ``read1`` into a preallocated
buffer, sha256 as blocks arrive) and, when installed, httpx streaming the same way.

Usage: python benchmarks/transport.py [--size-mb 64] [--files 6] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SERVER = """
import sys, time
from pathlib import Path
from pixcrawler.testing.static import StaticServer
server = StaticServer(Path(sys.argv[1])).start()
print(server.base_url, flush=True)
time.sleep(1e9)
"""


def with_urllib3(url: str, size: int) -> None:
    import urllib3

    from pixcrawler.config import READ_BLOCK

    pool = with_urllib3.__dict__.setdefault("pool", urllib3.PoolManager())
    buffer = bytearray(size)
    view = memoryview(buffer)
    hasher = hashlib.sha256()
    response = pool.request("GET", url, preload_content=False)
    pos = 0
    while block := response.read1(READ_BLOCK):
        view[pos : pos + len(block)] = block
        hasher.update(block)
        pos += len(block)
    response.release_conn()


def with_httpx(url: str, size: int) -> None:
    import httpx

    from pixcrawler.config import READ_BLOCK

    client = with_httpx.__dict__.setdefault("client", httpx.Client())
    buffer = bytearray(size)
    view = memoryview(buffer)
    hasher = hashlib.sha256()
    pos = 0
    with client.stream("GET", url) as response:
        for block in response.iter_raw(READ_BLOCK):
            view[pos : pos + len(block)] = block
            hasher.update(block)
            pos += len(block)


def measure(fetch: Callable[[str, int], None], urls: list[str], size: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for url in urls:
        fetch(url, size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = size * len(urls)
    return total / wall / 1e6, cpu / (total / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mb << 20
    clients: dict[str, Callable[[str, int], None]] = {"urllib3 (the SDK)": with_urllib3}
    try:
        import httpx  # noqa: F401

        clients["httpx stream"] = with_httpx
    except ImportError:
        print("httpx not installed: only urllib3 is measured")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.files):
            (root / f"{i}.bin").write_bytes(os.urandom(size))
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, tmp], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            base = server.stdout.readline().strip()
            urls = [f"{base}/{i}.bin" for i in range(args.files)]
            print(f"{args.files} bodies of {args.size_mb} MB over loopback, {args.repeat} runs")
            for name, fetch in clients.items():
                fetch(urls[0], size)  # warm the connection
                results = [measure(fetch, urls, size) for _ in range(args.repeat)]
                rate = statistics.median(r[0] for r in results)
                cost = statistics.median(r[1] for r in results)
                print(f"{name:<20} {rate:8,.0f} MB/s   {cost:5.2f} CPU s/GB (incl. sha256)")
        finally:
            server.kill()


if __name__ == "__main__":
    main()
