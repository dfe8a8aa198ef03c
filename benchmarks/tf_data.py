"""``to_tensorflow()`` against a per-element ``from_generator``, same job, same server, one run.

Generates photo-like JPEG crops of one fixed size (crops of scikit-learn's sample photos,
resized to ``--size`` x ``--size``, q90), packs them into a job (chunks of 500; the job then
lists its uniform image size, so ``to_tensorflow()`` has a fixed shape) and serves it: the
reference API server hands out absolute chunk URLs on a
:class:`~pixcrawler.testing.StaticServer` run in a child process (so the CPU measured below
is the client's alone). Every pass streams the chunks from that server: the streaming
iterators keep no disk cache. Three pipelines read the same dataset object, in batches of 64:

- per-element: ``tf.data.Dataset.from_generator`` over ``dataset.iter_samples()``, one
  ``(image, np.int64(label_id))`` per call, fixed ``(H, W, 3)`` signature, then
  ``.batch(64).prefetch(AUTOTUNE)`` (what a user writes by hand, and what ``to_tensorflow``
  did before it streamed whole batches);
- to_tensorflow: ``dataset.to_tensorflow().batch(64).prefetch(tf.data.AUTOTUNE)``;
- iter_batches: ``dataset.iter_batches(64)``, numpy only (the ceiling: no TensorFlow).

One untimed warm-up pass of each first (TensorFlow's tracing and thread pools, the SDK's
decode buffers), then ``--repeats`` rounds, each running the three in turn. Prints each
pass's images/s, CPU-ms per image (this process, user + system) and how long its end (the
iterator torn down) took after the last batch; the medians; the ratios to_tensorflow /
per-element and to_tensorflow / iter_batches (medians of the rounds' own ratios: other
processes on a shared machine move the three of a round together, and the rounds apart);
peak RSS and the load average before and after::

    pip install -e '.[server,tensorflow]' scikit-learn
    python benchmarks/tf_data.py                       # ~1-2 minutes on 2 cores
    python benchmarks/tf_data.py --images 5000 --size 128 --repeats 7
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

JOB_ID = "bench_tf"
API_KEY = "bench-key"
BATCH = 64

# -- data ------------------------------------------------------------------------------------


def make_images(root: Path, count: int, size: int, seed: int = 0) -> float:
    """``count`` JPEGs of ``size`` x ``size``, q90: random square crops of the sample photos
    (``size`` px up to the photo's height), half mirrored, resized; labelled by source
    photo. Returns their mean size in bytes."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    labels = ("china", "flower")
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        which = i % len(photos)
        photo = photos[which]
        height, width = photo.shape[:2]
        side = int(rng.integers(min(size, height), min(height, width) + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        image = Image.fromarray(np.ascontiguousarray(crop))
        if side != size:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        folder = root / labels[which]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
        total += buffer.tell()
    return total / max(count, 1)


# -- measurement -----------------------------------------------------------------------------


def cpu_seconds() -> float:
    """This process's CPU time, every thread (TensorFlow's included), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / (1 << 20)


def load_avg() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


@dataclass
class Pass:
    images: int
    seconds: float
    cpu_seconds: float
    requests: int  # chunk requests this pass made (the dataset's transfer counters)
    received: int  # bytes received this pass
    tail: float  # seconds from the last batch to the end of the pass (iterator torn down)

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def rate_to_last(self) -> float:
        """Images/s up to the last batch: without the end, where TensorFlow's iterator can
        wait (the passes that end exactly 0.31 or 2.55 s after they start: 10 ms, doubled,
        summed; seemingly its autotuning thread's sleep) for as long as the pass took."""
        return self.images / (self.seconds - self.tail)

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_seconds / self.images


def run_pass(batches: Callable[[], Iterator[Any]], count: Callable[[Any], int], ds: Any) -> Pass:
    """One pass over ``batches()``: images, wall time, CPU time, what crossed the network."""
    transfer = ds.stats.transfer
    requests, received = transfer.requests, transfer.bytes_received
    cpu = cpu_seconds()
    started = time.perf_counter()
    iterator = batches()
    images = 0
    last = started
    for batch in iterator:
        images += count(batch)
        last = time.perf_counter()
    del iterator  # its teardown (TensorFlow's iterator, the SDK's threads) is part of the pass
    ended = time.perf_counter()
    return Pass(
        images,
        ended - started,
        cpu_seconds() - cpu,
        transfer.requests - requests,
        transfer.bytes_received - received,
        ended - last,
    )


def report(name: str, label: str, result: Pass) -> None:
    print(
        f"  {name:<14} {label:<8} {result.images:,} images in {result.seconds:5.2f} s = "
        f"{result.rate:6,.0f} img/s, {result.cpu_ms:4.2f} CPU-ms/img, end {result.tail:4.2f} s "
        f"after the last batch, {result.requests} chunk requests, "
        f"{result.received / (1 << 20):,.1f} MiB received",
        flush=True,
    )


def listed(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224, help="side of every image, in px")
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args(argv)
    if args.images < 1 or args.size < 1 or args.repeats < 1 or args.chunk_size < 1:
        parser.error("--images, --size, --chunk-size and --repeats must be at least 1")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    import tensorflow as tf

    from pixcrawler import load_dataset
    from pixcrawler.decode import ImageDecoder
    from pixcrawler.packer import pack
    from pixcrawler.server import create_app, run_in_thread
    from stream import static_host  # benchmarks/stream.py, beside this script

    print(f"load average before: {load_avg()} on {os.cpu_count()} CPUs", flush=True)
    with ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pxc-bench-tf-")))
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        average = make_images(work / "src", args.images, args.size)
        store = work / "store"
        result = pack(work / "src", store, job_id=JOB_ID, chunk_size=args.chunk_size)

        blob_url, _ = static_host(stack, store)
        api = stack.enter_context(
            run_in_thread(create_app(store, {API_KEY: "default"}, chunk_base_url=blob_url))
        )
        dataset = stack.enter_context(load_dataset(JOB_ID, api_key=API_KEY, base_url=api))
        print(
            f"{result.total_images:,} JPEGs {args.size}x{args.size} q90 ({average / 1024:.0f} KB "
            f"avg), {dataset.num_chunks} chunks of {args.chunk_size}, job image_size "
            f"{dataset.job.image_size}, prepared in {time.perf_counter() - started:.1f} s; "
            f"decoder {ImageDecoder().backend} on {dataset.decode_threads} threads; "
            f"TensorFlow {tf.__version__}; batches of {BATCH}",
            flush=True,
        )

        label_ids = {name: i for i, name in enumerate(dataset.labels)}
        shape = (args.size, args.size, 3)

        def per_element() -> Iterator[tuple[np.ndarray, np.int64]]:
            for sample, image in dataset.iter_samples():
                yield image, np.int64(label_ids[sample.label])

        by_hand = (
            tf.data.Dataset.from_generator(
                per_element,
                output_signature=(
                    tf.TensorSpec(shape=shape, dtype=tf.uint8),
                    tf.TensorSpec(shape=(), dtype=tf.int64),
                ),
            )
            .batch(BATCH)
            .prefetch(tf.data.AUTOTUNE)
        )
        ours = dataset.to_tensorflow()
        print(f"to_tensorflow() element spec: {ours.element_spec}")
        ours = ours.batch(BATCH).prefetch(tf.data.AUTOTUNE)

        def tf_count(batch: Any) -> int:
            return int(batch[1].shape[0])

        def numpy_count(batch: Any) -> int:
            return len(batch[1])

        pipelines: dict[str, tuple[Callable[[], Iterator[Any]], Callable[[Any], int]]] = {
            "per-element": (lambda: iter(by_hand), tf_count),
            "to_tensorflow": (lambda: iter(ours), tf_count),
            "iter_batches": (lambda: dataset.iter_batches(BATCH), numpy_count),
        }
        print(
            "every pass streams the chunks from the static server over loopback (the streaming "
            "iterators keep no disk cache), the same for all three; one untimed warm-up pass "
            "each, then the rounds:"
        )
        for name, (batches, count) in pipelines.items():
            report(name, "warm-up", run_pass(batches, count, dataset))
        passes: dict[str, list[Pass]] = {name: [] for name in pipelines}
        for round_ in range(1, args.repeats + 1):
            for name, (batches, count) in pipelines.items():
                passes[name].append(run_pass(batches, count, dataset))
                report(name, f"round {round_}", passes[name][-1])
        rss = peak_rss_mb()

        for name, results in passes.items():
            if any(p.images != result.total_images for p in results):
                raise RuntimeError(f"{name} did not yield the job's {result.total_images} images")
        print("medians:")
        for name, results in passes.items():
            print(
                f"  {name:<14} {statistics.median(p.rate for p in results):6,.0f} img/s, "
                f"{statistics.median(p.cpu_ms for p in results):4.2f} CPU-ms/img; "
                f"{statistics.median(p.rate_to_last for p in results):6,.0f} img/s up to the "
                f"last batch"
            )

        def ratios(
            ours_name: str, theirs_name: str
        ) -> tuple[list[float], list[float], list[float]]:
            pairs = list(zip(passes[ours_name], passes[theirs_name], strict=True))
            return (
                [o.rate / t.rate for o, t in pairs],
                [t.cpu_ms / o.cpu_ms for o, t in pairs],
                [o.rate_to_last / t.rate_to_last for o, t in pairs],
            )

        summary: dict[str, Any] = {
            "images": result.total_images,
            "size": args.size,
            **{f"{n}_img_s": [round(p.rate) for p in r] for n, r in passes.items()},
            **{f"{n}_cpu_ms": [round(p.cpu_ms, 3) for p in r] for n, r in passes.items()},
        }
        for theirs_name in ("per-element", "iter_batches"):
            wall, cpu, to_last = ratios("to_tensorflow", theirs_name)
            print(
                f"to_tensorflow / {theirs_name}: {statistics.median(wall):.2f}x wall img/s "
                f"(rounds: {listed(wall)}); CPU per image {theirs_name} / to_tensorflow "
                f"{statistics.median(cpu):.2f} (rounds: {listed(cpu)}); "
                f"{statistics.median(to_last):.2f}x img/s up to the last batch "
                f"(rounds: {listed(to_last)})"
            )
            summary[f"to_tensorflow_over_{theirs_name}_wall"] = round(statistics.median(wall), 3)
            summary[f"to_tensorflow_over_{theirs_name}_cpu"] = round(statistics.median(cpu), 3)
            summary[f"to_tensorflow_over_{theirs_name}_to_last_batch"] = round(
                statistics.median(to_last), 3
            )
        print(f"peak RSS of this process (API server thread included): {rss:,.0f} MB")
        print(f"load average after: {load_avg()} (other processes on this machine skew wall time)")
        summary["peak_rss_mb"] = round(rss)
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
