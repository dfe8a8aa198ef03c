"""Streaming benchmark: end-to-end images/s against the in-memory decode ceiling, and RSS.

Builds a job of photo-like JPEGs (random 240–480 px crops of scikit-learn's sample
photos, quality 90, 500 per chunk), serves the chunk bytes from a static server in another
process (absolute chunk URLs, as a blob store would give) with the reference API server
answering metadata, and prints in one run:

- end-to-end images/s of ``for image, label in dataset`` (median of ``--repeat`` runs);
- the ceiling: the same chunk bytes decoded from memory by the same decoder on the same
  number of threads, in the same run, just before each end-to-end run, as DESIGN.md's
  performance model measures it (``pool.map``, one task per image), and the median of the
  runs' ratios (the target: >= 0.85);
- the physical limit beside it (the same decodes in groups of ``DECODE_GROUP``, no per-image
  task: DESIGN.md's prototype reached 0.82-0.90 of it) and the ratio to that;
- the same end-to-end figure with chunk bytes served by the reference server itself;
- the same iteration with every chunk handed over from memory (no transfer), which splits
  the gap to the ceiling into what the pipeline costs and what the transfer costs;
- the CPU of what the end-to-end run does and the ceiling does not: receiving the chunks
  with their sha256, and checking each image's sha256 from the manifest, each as a share
  of the ceiling's own decoding CPU;
- where one more end-to-end run's CPU goes, thread by thread (decode, download, the
  consuming thread, the static server), against what the machine had (wall x cores);
- peak RSS while iterating 10 and 40 chunks (median of fresh processes), against the bound
  baseline + (prefetch + 2) x chunk bytes + one batch;
- peak RSS of ``to_arrays()`` against 1.2 x the arrays' bytes + 2 chunks.

Usage: python benchmarks/stream.py [--images-per-chunk 500] [--chunks 10] [--repeat 5]
       [--rss-runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

KEY = "bench-key"
JOB = "job_bench"
JOB_40 = "job_bench40"


def make_photos(root: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEG crops of the sample photos under three label folders."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    labels = ("china", "flower", "mixed")
    for i in range(count):
        photo = photos[i % 2]
        h, w = photo.shape[:2]
        ch = int(rng.integers(240, min(h, 480) + 1))
        cw = int(rng.integers(240, min(w, 480) + 1))
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        crop = photo[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        label = labels[i % 3]
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:06d}.jpg", quality=90)


def build_store(work: Path, per_chunk: int, chunks: int) -> Path:
    """A store with JOB (``chunks`` chunks) and JOB_40 (the same chunks repeated to 40)."""
    from pixcrawler.packer import pack

    store = work / "store"
    marker = store / f".built-{per_chunk}-{chunks}-{_FORMAT}"
    if marker.exists() and _checked(store):
        return store
    shutil.rmtree(store, ignore_errors=True)
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    make_photos(src, per_chunk * chunks)
    pack(src, store, job_id=JOB, chunk_size=per_chunk)
    job = json.loads((store / JOB / "job.json").read_text())
    big = store / JOB_40 / "chunks"
    big.mkdir(parents=True)
    entries = []
    for i in range(40):
        source = job["chunks"][i % chunks]
        os.link(store / JOB / "chunks" / f"{i % chunks:05d}.zip", big / f"{i:05d}.zip")
        entries.append({**source, "index": i})
    job.update(
        id=JOB_40,
        chunks=entries,
        total_images=sum(e["image_count"] for e in entries),
        size_bytes=sum(e["size_bytes"] for e in entries),
    )
    (store / JOB_40 / "job.json").write_text(json.dumps(job))
    (store / "keys.json").write_text(json.dumps({KEY: "default"}))
    if not _checked(store):
        raise RuntimeError("the packed job lists no chunk or image sha256: nothing to measure")
    marker.touch()
    return store


_FORMAT = "v2"  # of the store build_store makes: a store of an older build is made again


def _checked(store: Path) -> bool:
    """Whether the job lists every chunk's sha256 and its first chunk every image's: the
    checks the end-to-end runs must pay for, as a user's do."""
    import zipfile

    job = json.loads((store / JOB / "job.json").read_text())
    if not job["chunks"] or not all(c.get("sha256") for c in job["chunks"]):
        return False
    with zipfile.ZipFile(store / JOB / "chunks" / "00000.zip") as archive:
        manifest = json.loads(archive.read("manifest.json"))
    return all(image.get("sha256") for image in manifest["images"])


def ceilings(store: Path, threads: int, *, limit_first: bool = False) -> tuple[float, float]:
    """Images/s decoding every chunk's images from memory, same decoder, same threads, two
    ways: DESIGN.md's ``pool.map`` ceiling (one task per image, what a user would write) and
    its physical limit (the images in groups of ``DECODE_GROUP``, no per-image task).
    ``limit_first`` measures the limit first (callers alternate, so neither always goes
    first)."""
    from pixcrawler import config
    from pixcrawler.archive import ChunkArchive
    from pixcrawler.decode import ImageDecoder

    decoder = ImageDecoder()
    archives = [
        ChunkArchive(path.read_bytes(), chunk_id=i)
        for i, path in enumerate(sorted((store / JOB / "chunks").glob("*.zip")))
    ]
    payloads = [archive.payload(sample) for archive in archives for sample in archive.samples]
    tasks = {  # what each task of the pool decodes
        "ceiling": [[payload] for payload in payloads],
        "limit": [
            payloads[s : s + config.DECODE_GROUP]
            for s in range(0, len(payloads), config.DECODE_GROUP)
        ],
    }

    def decode(group: list[memoryview | bytes]) -> int:
        for payload in group:
            decoder.decode(payload)
        return len(group)

    rates = {}
    with ThreadPoolExecutor(threads) as pool:
        # Untimed: one chunk's images first. Without it, whichever pass was timed first
        # ran ~7% slower (the threads' first allocations, a cold cache), which flattered
        # the end-to-end ratio when the pool.map ceiling always went first.
        sum(pool.map(decode, tasks["limit"][: len(archives[0].samples) // config.DECODE_GROUP]))
        for name in ("limit", "ceiling") if limit_first else ("ceiling", "limit"):
            started, cpu = time.perf_counter(), cpu_seconds()
            count = sum(pool.map(decode, tasks[name]))
            rates[name] = count / (time.perf_counter() - started)
            if name == "ceiling":
                CEILING_CPU.append(cpu_seconds() - cpu)
    return rates["ceiling"], rates["limit"]


CEILING_CPU: list[float] = []  # CPU seconds of each ceiling pass: its decoding, measured


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def verification_costs(base_url: str, store: Path) -> tuple[float, float]:
    """CPU seconds of what the end-to-end run does and the ceiling does not: receiving every
    chunk with its sha256 (no decoding; median of 3), and checking every image's own sha256
    from the manifest right after decoding it, as the pipeline does (the decodes untimed)."""
    from pixcrawler import load_dataset
    from pixcrawler.archive import ChunkArchive
    from pixcrawler.decode import ImageDecoder

    transfer = []
    for _ in range(3):
        with load_dataset(JOB, KEY, base_url) as dataset:
            downloader = dataset.downloader()
            started = cpu_seconds()
            for _, data in downloader.iter_chunks(recycles=True):
                downloader.recycle(data)
            transfer.append(cpu_seconds() - started)
    decoder, checking = ImageDecoder(), 0.0
    for path in sorted((store / JOB / "chunks").glob("*.zip")):
        archive = ChunkArchive(path.read_bytes())
        for sample in archive.samples:
            decoder.decode(archive.read(sample.member))
            started = time.thread_time()
            archive.payload(sample)  # the sha256 check, over bytes just decoded
            checking += time.thread_time() - started
    return statistics.median(transfer), checking


def decode_lookahead_bytes(store: Path) -> float:
    """Bytes of the decoded images the pipeline holds ahead of its consumer, on average."""
    from pixcrawler import config
    from pixcrawler.archive import ChunkArchive

    archive = ChunkArchive((store / JOB / "chunks" / "00000.zip").read_bytes())
    mean = statistics.mean((s.width or 0) * (s.height or 0) * 3 for s in archive.samples)
    return mean * config.DECODE_GROUP * config.DECODE_GROUPS_IN_FLIGHT


def _thread_cpu() -> dict[int, float]:
    """CPU seconds of each live thread of this process, by native thread id (Linux
    ``/proc``: ``schedstat`` counts nanoseconds where the kernel keeps it, else ``stat``)."""
    seconds = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                seconds[int(tid)] = int(fh.read().split()[0]) / 1e9
                continue
        except (OSError, ValueError, IndexError):
            pass
        try:
            seconds[int(tid)] = _stat_cpu(f"/proc/self/task/{tid}/stat")
        except OSError:
            continue  # the thread has ended
    return seconds


def _stat_cpu(path: str) -> float:
    """utime + stime of a ``/proc`` stat file, in seconds (a process's counts its ended
    threads too)."""
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_thread(
    base_url: str, job: str, threads: int, server_pid: int
) -> tuple[dict[str, float], float]:
    """One end-to-end run: CPU seconds per kind of thread (threads named ``prefix_N`` are
    summed under ``prefix``; the static server is one entry), and the run's wall time.
    Threads end with the iteration, so a sampler reads them every 10 ms while they live."""
    if not os.path.isdir("/proc/self/task"):
        return {}, 0.0
    names: dict[int, str] = {}
    last: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while True:
            for thread in threading.enumerate():
                if thread.native_id is not None:
                    names.setdefault(thread.native_id, thread.name.rstrip("0123456789_"))
            last.update(_thread_cpu())
            if stop.wait(0.01):
                return

    server = f"/proc/{server_pid}/stat"
    before, server_before = _thread_cpu(), _stat_cpu(server)
    sampler = threading.Thread(target=sample, name="cpu-sampler")
    sampler.start()
    started = time.perf_counter()
    try:
        end_to_end(base_url, job, threads, record=False)
    finally:
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
    kinds = {"static server": _stat_cpu(server) - server_before}
    for tid, seconds in last.items():
        name = names.get(tid, "other")
        if name != "cpu-sampler":
            kinds[name] = kinds.get(name, 0.0) + seconds - before.get(tid, 0.0)
    return kinds, wall


FIRST_IMAGE: list[float] = []  # seconds to the first image of each end-to-end run


def end_to_end(base_url: str, job: str, threads: int, *, record: bool = False) -> float:
    """Images/s of ``for image, label in dataset``; with ``record``, its time to the first
    image goes to FIRST_IMAGE (the static-host runs': one server's figure)."""
    from pixcrawler import load_dataset

    with load_dataset(job, KEY, base_url, decode_threads=threads) as dataset:
        started = time.perf_counter()
        count = sum(1 for _ in dataset)
        rate = count / (time.perf_counter() - started)
        if record:
            FIRST_IMAGE.append(dataset.stats.first_image_seconds or 0.0)
        return rate


def from_memory(base_url: str, chunks: list[bytearray], threads: int) -> float:
    """Images/s of the same ``for image, label in dataset`` with every chunk handed over
    from memory at once: the pipeline (chunk opens, each image's sha256 check, decode
    groups, the consumer) without the transfer. A diagnostic: it stands in for
    ``ChunkDownloader.iter_chunks`` for the run (nothing writes into ``chunks``), every
    next chunk ready at once."""
    from pixcrawler.downloader import ChunkDownloader

    def iter_chunks(
        self: ChunkDownloader, order: Iterable[int] | None = None, *, recycles: bool = False
    ) -> Iterator[tuple[Any, bytearray]]:
        for index in self.indexes if order is None else list(order):
            yield self.chunk(index), chunks[index]

    with (
        mock.patch.object(ChunkDownloader, "iter_chunks", iter_chunks),
        mock.patch.object(ChunkDownloader, "next_chunk_ready", lambda self: True),
    ):
        return end_to_end(base_url, JOB, threads, record=False)


RSS_CHILD = """
import json, sys
from pixcrawler import load_dataset

def vm(field):  # this process's own figures (ru_maxrss would include the parent's)
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

job, key, url, what = sys.argv[1:5]
ds = load_dataset(job, key, url)
out = {"baseline": vm("VmRSS")}
if what == "iterate":
    n = sum(1 for _ in ds)
else:
    X, y = ds.to_arrays(image_size=(128, 128))
    n = len(X)
    out["array_bytes"] = X.nbytes + y.nbytes
out["peak"] = vm("VmHWM")
out["images"] = n
print(json.dumps(out))
"""


def rss_child(base_url: str, job: str, what: str) -> dict[str, float]:
    """Peak RSS of a fresh process that iterates (or ``to_arrays``) ``job``."""
    done = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, job, KEY, base_url, what],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


STATIC_CHILD = """
import sys, time
from pathlib import Path
from pixcrawler.testing.static import StaticServer
server = StaticServer(Path(sys.argv[1])).start()
print(server.base_url, flush=True)
time.sleep(1e9)
"""


def static_host(stack: ExitStack, root: Path) -> tuple[str, int]:
    """The base URL and process id of a static host of ``root`` in a process of its own
    (its serving CPU stays out of this process's figures), stopped when ``stack`` closes."""
    static = subprocess.Popen(
        [sys.executable, "-c", STATIC_CHILD, str(root)], stdout=subprocess.PIPE, text=True
    )
    stack.callback(static.wait)
    stack.callback(static.kill)
    assert static.stdout is not None
    url = static.stdout.readline().strip()
    if not url:
        raise RuntimeError("the static server did not start")
    return url, static.pid


def row(name: str, value: str, note: str = "") -> None:
    print(f"{name:<34}{value:>14}   {note}")


def runs(values: list[float]) -> str:
    return "runs: " + ", ".join(f"{v:,.0f}" for v in values)


def ratios(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images-per-chunk", type=int, default=500)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-runs", type=int, default=3, help="fresh processes per RSS row")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pixcrawler-bench"
    )
    args = parser.parse_args()

    from pixcrawler.decode import ImageDecoder
    from pixcrawler.server import create_app, run_in_thread

    args.workdir.mkdir(parents=True, exist_ok=True)
    store = build_store(args.workdir, args.images_per_chunk, args.chunks)
    chunk_bytes = statistics.mean(p.stat().st_size for p in (store / JOB / "chunks").glob("*.zip"))
    print(
        f"dataset: {args.chunks} chunks x {args.images_per_chunk} JPEGs, {mib(chunk_bytes)} "
        f"per chunk; decoder {ImageDecoder().backend} on {args.threads} threads; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )

    with ExitStack() as stack:
        blob_url, static_pid = static_host(stack, store)
        keys = {KEY: "default"}
        api_static = stack.enter_context(
            run_in_thread(create_app(store, keys, chunk_base_url=blob_url))
        )
        api_self = stack.enter_context(run_in_thread(create_app(store, keys)))

        in_memory = [
            bytearray(path.read_bytes()) for path in sorted((store / JOB / "chunks").glob("*.zip"))
        ]
        pool_map, physical, e2e, e2e_self, memory = [], [], [], [], []
        for rep in range(args.repeat):
            # Each run's order alternates (ceilings first, then the pipeline; then the
            # other way round), so no order effect leans every ratio one way.
            ceilings_first = rep % 2 == 0
            if ceilings_first:
                c, p = ceilings(store, args.threads, limit_first=rep % 4 == 2)
            e2e.append(end_to_end(api_static, JOB, args.threads, record=True))
            e2e_self.append(end_to_end(api_self, JOB, args.threads))
            memory.append(from_memory(api_static, in_memory, args.threads))
            if not ceilings_first:
                c, p = ceilings(store, args.threads, limit_first=rep % 4 == 3)
            pool_map.append(c)
            physical.append(p)
        del in_memory
        # Each run's own ratios (its ceilings measured just before it): other processes on a
        # shared machine move both figures of a run together, and the runs apart.
        paired = [x / y for x, y in zip(e2e, pool_map, strict=True)]
        paired_limit = [x / y for x, y in zip(e2e, physical, strict=True)]
        paired_self = [x / y for x, y in zip(e2e_self, pool_map, strict=True)]
        paired_memory = [x / y for x, y in zip(memory, pool_map, strict=True)]
        transfer_share = [1 - x / y for x, y in zip(e2e, memory, strict=True)]
        for name, values in (
            ("decode ceiling (pool.map)", pool_map),
            ("physical limit (groups)", physical),
            ("end to end (static chunk host)", e2e),
        ):
            row(name, f"{statistics.median(values):,.0f} img/s", runs(values))
        row(
            "  ratio to the ceiling",
            f"{statistics.median(paired):.2f}",
            f"median of the runs' ratios ({ratios(paired)}); target >= 0.85",
        )
        row(
            "  ratio to the physical limit",
            f"{statistics.median(paired_limit):.2f}",
            f"median of the runs' ratios ({ratios(paired_limit)})",
        )
        row(
            "  time to the first image",
            f"{1000 * statistics.median(FIRST_IMAGE):,.0f} ms",
            "median over these runs (dataset.stats.first_image_seconds)",
        )
        if statistics.median(physical) < statistics.median(pool_map):
            print(
                "  (the physical limit measured below the ceiling: other processes took CPU "
                "during the runs; the ratios are noisier than usual)"
            )
        row(
            "end to end (reference server)",
            f"{statistics.median(e2e_self):,.0f} img/s",
            f"ratio to the ceiling {statistics.median(paired_self):.2f}",
        )
        row(
            "the pipeline, chunks from memory",
            f"{statistics.median(memory):,.0f} img/s",
            f"ratio to the ceiling {statistics.median(paired_memory):.2f}; no transfer: "
            "chunk opens, per-image sha256, decode groups, the consumer",
        )
        row(
            "  the transfer's cost",
            f"{statistics.median(transfer_share):.0%}",
            "of the from-memory rate, median of the runs' (static chunk host)",
        )
        # What the ceiling leaves out, against the CPU its own decoding took (measured: on a
        # busy machine, wall time x threads would count other processes' time as its own).
        transfer, members = verification_costs(api_static, store)
        decode_cpu = statistics.median(CEILING_CPU)
        for name, seconds in (
            ("  receive + chunk sha256", transfer),
            ("  per-image sha256", members),
        ):
            share = f"{seconds / decode_cpu:.0%} of the ceiling's decode CPU"
            row(name, f"{seconds:.2f} CPU s", share)

        kinds, wall = cpu_by_thread(api_static, JOB, args.threads, static_pid)
        if kinds:
            busy = sorted(kinds.items(), key=lambda kv: -kv[1])
            row(
                "CPU of one end-to-end run",
                f"{sum(kinds.values()):.2f} CPU s",
                f"of {wall * (os.cpu_count() or 1):.2f} (wall x cores): "
                + ", ".join(f"{name} {seconds:.2f}" for name, seconds in busy if seconds >= 0.005),
            )

        prefetch = 2
        batch = decode_lookahead_bytes(store)
        print(f"bound = baseline + (prefetch + 2) x chunk + one batch ({mib(batch)}: the decoded")
        print("images held ahead of the consumer)")
        peaks = {}
        for job, n in ((JOB, args.chunks), (JOB_40, 40)):
            # The peak moves by a few MiB from one fresh process to the next (glibc's
            # arenas), so: the median of several, and their max.
            results = [rss_child(api_static, job, "iterate") for _ in range(args.rss_runs)]
            peaks[n] = statistics.median(r["peak"] for r in results)
            baseline = statistics.median(r["baseline"] for r in results)
            bound = baseline + (prefetch + 2) * chunk_bytes + batch
            note = (
                f"median of {len(results)}, max {mib(max(r['peak'] for r in results))}; "
                f"baseline {mib(baseline)}, bound {mib(bound)}"
            )
            row(f"peak RSS iterating {n} chunks", mib(peaks[n]), note)
        row(
            f"  40 chunks / {args.chunks} chunks",
            f"{peaks[40] / peaks[args.chunks]:.2f}",
            "target <= 1.10",
        )
        r = rss_child(api_static, JOB, "arrays")
        bound = r["baseline"] + 1.2 * r["array_bytes"] + 2 * chunk_bytes
        note = f"arrays {mib(r['array_bytes'])}, bound {mib(bound)} (with the baseline)"
        row("peak RSS to_arrays(128x128)", mib(r["peak"]), note)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
