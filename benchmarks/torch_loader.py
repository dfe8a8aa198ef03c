"""Map-style ``to_torch`` against WebDataset, same images, same server, same DataLoader.

Generates photo-like JPEG crops (240-480 px, from scikit-learn's sample photos), packs them
into a job (chunks of 500) and writes the same files as WebDataset ``.tar`` shards (500 per
shard). One :class:`~pixcrawler.testing.StaticServer` serves both the chunk archives (the
reference API server hands out absolute chunk URLs on it, as it would for a CDN) and the
shards. Then, in one run, each pipeline is read through
``DataLoader(num_workers=2, batch_size=64)``:

- pixcrawler: ``dataset.to_torch()`` with ``shuffle=True`` (epoch 1 downloads the chunks and
  fills a fresh disk cache; epoch 2 reads the cache: its request count is printed);
- webdataset: ``WebDataset(urls).decode("rgb8").to_tuple("jpg", "cls")`` (its epochs stream).

Images keep their sizes, so both loaders use the same ``collate_fn``: the batch's images
flattened into one shared uint8 tensor plus their shapes (a list of 64 tensors would cost
64 shared-memory segments per batch and measure only IPC). Prints images/s per epoch, the
ratio, peak RSS (main process and largest worker), and the second-epoch request count::

    pip install -e '.[dev]' torch   # the dev extra brings webdataset
    python benchmarks/torch_loader.py                 # ~1-2 minutes on 2 cores
    python benchmarks/torch_loader.py --images 5000 --epochs 3
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

JOB_ID = "bench_photos"
API_KEY = "bench-key"


# -- data ------------------------------------------------------------------------------------


def sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def make_images(root: Path, count: int, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """``count`` JPEG crops 240-480 px, q90, labelled by source photo; written under root."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    labels = ["china", "flower"]
    items: list[tuple[str, str, bytes]] = []
    for i in range(count):
        which = i % len(photos)
        photo = photos[which]
        height, width = (int(v) for v in rng.integers(240, 481, size=2))
        height, width = min(height, photo.shape[0]), min(width, photo.shape[1])
        top = int(rng.integers(0, photo.shape[0] - height + 1))
        left = int(rng.integers(0, photo.shape[1] - width + 1))
        crop = photo[top : top + height, left : left + width]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buffer, "JPEG", quality=90)
        label = labels[which]
        name = f"{i:06d}.jpg"
        path = root / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
        items.append((label, name, buffer.getvalue()))
    return items


def write_shards(
    items: Iterable[tuple[str, str, bytes]], folder: Path, labels: list[str], per_shard: int
) -> list[str]:
    """WebDataset shards of the same files, in the packer's order (label, then name)."""
    folder.mkdir(parents=True, exist_ok=True)
    ordered = sorted(items, key=lambda item: (item[0], item[1]))
    names = []
    for start in range(0, len(ordered), per_shard):
        name = f"shard-{start // per_shard:05d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for label, file_name, data in ordered[start : start + per_shard]:
                key = f"{label}_{file_name.rsplit('.', 1)[0]}"
                for suffix, payload in (
                    ("jpg", data),
                    ("cls", str(labels.index(label)).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(payload))
        names.append(name)
    return names


# -- measurement -----------------------------------------------------------------------------


def flat_collate(batch: list[tuple[Any, int]]) -> tuple[Any, Any, Any]:
    """Mixed sizes cannot stack: every image of the batch, flattened into one uint8 tensor
    (in shared memory when in a worker, as ``default_collate`` does), with the shapes and
    labels. One shared segment per batch, not one per image (which would cost more than
    decoding and hide both loaders behind IPC)."""
    import torch

    shapes = torch.tensor([image.shape for image, _ in batch], dtype=torch.int64)
    sizes = [int(np.prod(image.shape)) for image, _ in batch]
    total = sum(sizes)
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(total)
        flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    else:
        flat = torch.empty(total, dtype=torch.uint8)
    target = flat.numpy()
    offset = 0
    for (image, _), size in zip(batch, sizes, strict=True):
        target[offset : offset + size] = np.asarray(image).reshape(-1)
        offset += size
    return flat, shapes, torch.tensor([int(label) for _, label in batch])


def unflatten(flat: Any, shapes: Any) -> list[Any]:
    """The batch's images as (H, W, C) views of the flat tensor."""
    images, offset = [], 0
    for height, width, channels in shapes.tolist():
        size = height * width * channels
        images.append(flat[offset : offset + size].view(height, width, channels))
        offset += size
    return images


def pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """WebDataset's side of the resized row: what a user would map after ``rgb8``."""
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.array(resized)


def worker_peak_rss_mb(iterator: Any) -> float:
    """The largest peak RSS (VmHWM) among a live DataLoader iterator's worker processes."""
    peaks = [0.0]
    for worker in getattr(iterator, "_workers", []):
        try:
            status = Path(f"/proc/{worker.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


@dataclass
class Epoch:
    images: int
    seconds: float
    cpu_seconds: float  # main process (servers included) + every worker, user + system
    worker_peak_mb: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_seconds / self.images


def cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):  # children: once joined
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run_epoch(loader: Any) -> Epoch:
    """One pass over ``loader``: wall time, CPU time and the workers' peak RSS."""
    cpu = cpu_seconds()
    started = time.perf_counter()
    iterator = iter(loader)
    count = 0
    peak = 0.0
    for number, batch in enumerate(iterator):
        if len(batch) == 3:
            unflatten(batch[0], batch[1])
        count += len(batch[-1])
        if number % 4 == 0:  # workers exit with the epoch: sample their high-water mark now
            peak = max(peak, worker_peak_rss_mb(iterator))
    elapsed = time.perf_counter() - started
    del iterator  # exhausted: its workers are joined, so their CPU time is counted
    return Epoch(count, elapsed, cpu_seconds() - cpu, peak)


def main_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / (1 << 20)


def report(name: str, label: str, epoch: Epoch) -> None:
    print(
        f"  {name:<11} {label:<8} {epoch.images:,} images in {epoch.seconds:5.2f} s = "
        f"{epoch.rate:6,.0f} img/s, {epoch.cpu_ms:4.2f} CPU-ms/img, "
        f"largest worker peak RSS {epoch.worker_peak_mb:,.0f} MB",
        flush=True,
    )


def ratio_line(what: str, ours: Epoch, theirs: Epoch) -> str:
    return (
        f"{what}: {ours.rate:,.0f} vs {theirs.rate:,.0f} img/s = {ours.rate / theirs.rate:.2f}x "
        f"wall; {theirs.cpu_ms:.2f} vs {ours.cpu_ms:.2f} CPU-ms/img = "
        f"{theirs.cpu_ms / ours.cpu_ms:.2f}x less CPU per image"
    )


def load_avg() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resize", type=int, default=224, help="side of the resized row")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args(argv)

    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader

    from pixcrawler import load_dataset
    from pixcrawler.decode import ImageDecoder
    from pixcrawler.packer import pack
    from pixcrawler.server import create_app, run_in_thread
    from pixcrawler.testing import StaticServer

    torch.set_num_threads(1)
    with ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pxc-bench-")))
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        items = make_images(work / "src", args.images)
        result = pack(
            work / "src", work / "www" / "store", job_id=JOB_ID, chunk_size=args.chunk_size
        )
        labels = sorted({label for label, _, _ in items})
        shards = write_shards(items, work / "www" / "shards", labels, args.chunk_size)
        average_kb = sum(len(data) for _, _, data in items) / len(items) / 1024
        print(
            f"{result.total_images:,} JPEG crops 240-480 px ({average_kb:.0f} KB avg), "
            f"{len(shards)} chunks / {len(shards)} shards of {args.chunk_size}, "
            f"prepared in {time.perf_counter() - started:.1f} s; decoder: "
            f"{ImageDecoder().backend}; DataLoader(num_workers={args.workers}, "
            f"batch_size={args.batch_size}); {os.cpu_count()} CPUs",
            flush=True,
        )

        blobs = stack.enter_context(StaticServer(work / "www"))
        api = stack.enter_context(
            run_in_thread(
                create_app(
                    work / "www" / "store",
                    {API_KEY: "default"},
                    chunk_base_url=f"{blobs.base_url}/store",
                )
            )
        )
        shard_urls = [f"{blobs.base_url}/shards/{name}" for name in shards]
        dataset = load_dataset(JOB_ID, api_key=API_KEY, base_url=api)
        cache_dir = work / "cache"

        def pixcrawler_loader(
            image_size: tuple[int, int] | None = None, workers: int = args.workers
        ) -> Any:
            return DataLoader(
                dataset.to_torch(cache_dir=cache_dir, image_size=image_size),
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=workers,
                collate_fn=flat_collate if image_size is None else None,
            )

        def webdataset_loader(image_size: tuple[int, int] | None = None) -> Any:
            pipeline = (
                wds.WebDataset(shard_urls, shardshuffle=False, empty_check=False)
                .decode("rgb8")
                .to_tuple("jpg", "cls")
            )
            if image_size is not None:
                pipeline = pipeline.map_tuple(functools.partial(pil_resize, size=image_size), int)
            return DataLoader(
                pipeline,
                batch_size=args.batch_size,
                num_workers=args.workers,
                collate_fn=flat_collate if image_size is None else None,
            )

        print(f"load average before: {load_avg()} (other processes on this machine skew wall time)")
        print("native sizes, epochs interleaved, each pipeline first in turn (webdataset streams")
        print("every epoch; pixcrawler's epoch 1 downloads into a fresh disk cache, later epochs")
        print("read it):")
        ours: list[Epoch] = []
        theirs: list[Epoch] = []
        requests: list[int] = []

        def webdataset_epoch(epoch: int) -> None:
            theirs.append(run_epoch(webdataset_loader()))
            report("webdataset", f"epoch {epoch}", theirs[-1])

        def pixcrawler_epoch(epoch: int) -> None:
            blobs.reset_stats()
            ours.append(run_epoch(pixcrawler_loader()))
            requests.append(blobs.stats.requests)
            report("pixcrawler", f"epoch {epoch}", ours[-1])

        for epoch in range(1, args.epochs + 1):
            # Which pipeline goes first alternates, so neither always runs on a machine
            # the other has just warmed (or loaded).
            pair = (webdataset_epoch, pixcrawler_epoch)
            for run in pair if epoch % 2 else pair[::-1]:
                run(epoch)
        size = (args.resize, args.resize)
        print(f"resized to {size[0]}x{size[1]} (pixcrawler image_size=, webdataset PIL resize):")
        theirs_resized = run_epoch(webdataset_loader(size))
        report("webdataset", "resized", theirs_resized)
        ours_resized = run_epoch(pixcrawler_loader(size))
        report("pixcrawler", "resized", ours_resized)
        print("in the main process, no workers (DataLoader num_workers=0: the batch decodes on")
        print(f"the dataset's {dataset.decode_threads} decode threads, nothing crosses processes):")
        in_process = run_epoch(pixcrawler_loader(workers=0))
        report("pixcrawler", "0 wkrs", in_process)
        rss = main_rss_mb()

        print(ratio_line("epoch 1 (both download)", ours[0], theirs[0]))
        if args.epochs > 1:
            print(ratio_line(f"epoch {args.epochs} (cache warm)", ours[-1], theirs[-1]))
            # Each cache-warm epoch against the WebDataset epoch run beside it: other jobs on
            # a shared machine move the two together, and the epochs apart.
            warm = [o.rate / t.rate for o, t in zip(ours[1:], theirs[1:], strict=True)]
            print(
                f"cache-warm epochs: median ratio {statistics.median(warm):.2f}x wall "
                f"(per epoch: {', '.join(f'{r:.2f}' for r in warm)}; target >= 1.5)"
            )
        print(ratio_line(f"resized {size[0]}x{size[1]}", ours_resized, theirs_resized))
        print(
            "chunk requests per pixcrawler epoch: "
            + ", ".join(f"epoch {e} {n}" for e, n in enumerate(requests, 1))
            + " (epoch 2 on: served by the disk cache, no network transfer)"
        )
        print(f"peak RSS of the main process (servers included): {rss:,.0f} MB")
        print(f"load average after: {load_avg()}")
        summary = {
            "images": result.total_images,
            "webdataset_img_s": [round(e.rate) for e in theirs],
            "pixcrawler_img_s": [round(e.rate) for e in ours],
            "webdataset_cpu_ms": [round(e.cpu_ms, 2) for e in theirs],
            "pixcrawler_cpu_ms": [round(e.cpu_ms, 2) for e in ours],
            "resized_img_s": [round(theirs_resized.rate), round(ours_resized.rate)],
            "pixcrawler_num_workers_0_img_s": round(in_process.rate),
            "chunk_requests_per_epoch": requests,
            "main_peak_rss_mb": round(rss),
        }
        print(json.dumps(summary))
        dataset.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
