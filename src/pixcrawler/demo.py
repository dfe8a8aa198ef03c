"""``pixcrawler demo``: the whole path on real data, end to end, in a few seconds.

scikit-learn's handwritten digits (1,797 greyscale 8x8 scans, classes 0-9) are upscaled and
written as PNG and JPEG files in one folder per label, the layout PixCrawler's crawler
writes; the folder is packed into a store, served by the reference server on a loopback
port with a key made for this run, loaded back through :func:`pixcrawler.load_dataset`,
iterated once (images/s and the dataset's stats), and used to train a classifier (an SVM)
whose held-out accuracy is printed. Needs the ``server`` and ``demo`` extras.

Example::

    from pixcrawler.demo import run_demo

    result = run_demo(images_per_class=50)
    print(result.accuracy)
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import DEFAULT_OWNER
from .dataset import load_dataset
from .loaders import require
from .units import counted, human_size

__all__ = ["DemoResult", "run_demo", "write_digits"]

JOB_ID = "demo_digits"
IMAGE_SIZE = 32  # digits are 8x8; upscaled so the images look like images
CHUNK_SIZE = 200
TEST_FRACTION = 0.25
_MARKER = ".pixcrawler-demo"  # in a digits folder: it is ours to replace
DIGITS_PER_CLASS = 174  # load_digits' smallest class: the most images_per_class can be
# The fewest: a stratified split needs a test image of each of the 10 classes (a fifth of
# the images) and two training images of each.
MIN_IMAGES_PER_CLASS = 10
_JPEG_QUALITY = 95
_DIGIT_MAX = 16.0  # load_digits pixels are 0..16


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured."""

    job_id: str
    num_images: int
    num_chunks: int
    skipped: int
    images_per_second: float
    accuracy: float
    train_size: int
    test_size: int


def write_digits(
    root: Path, images_per_class: int, *, size: int = IMAGE_SIZE
) -> tuple[int, dict[str, int]]:
    """Write ``images_per_class`` digits per class as ``root/<digit>/<nnnn>.png|jpg``.

    Even-numbered images are PNG (lossless), odd ones JPEG. Returns the number written and
    the count per label.
    """
    datasets = require("sklearn.datasets", "demo", "scikit-learn")
    digits = datasets.load_digits()
    available = int(np.bincount(digits.target).min(axis=0))
    if not 1 <= images_per_class <= available:
        raise ValueError(f"images_per_class must be from 1 to {available}, got {images_per_class}")
    root.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for digit in range(10):
        folder = root / str(digit)
        folder.mkdir(exist_ok=True)
        indexes = np.flatnonzero(digits.target == digit)[:images_per_class]
        for n, index in enumerate(indexes):
            scaled = np.clip(digits.images[index] * (255.0 / _DIGIT_MAX), 0, 255)
            image = Image.fromarray(scaled.astype(np.uint8), "L")
            image = image.resize((size, size), Image.Resampling.BICUBIC)
            if n % 2 == 0:
                image.save(folder / f"{n:04d}.png")
            else:
                image.save(folder / f"{n:04d}.jpg", quality=_JPEG_QUALITY)
        counts[str(digit)] = len(indexes)
    return sum(counts.values()), counts


def _fresh_folder(workdir: Path, name: str) -> Path:
    """``workdir/name``, emptied if an earlier demo wrote it, created if missing; a folder
    the demo did not write is never deleted. The mark of the demo's folder lies inside it,
    so a folder of the user's made in its place later is not taken for the demo's."""
    path = workdir / name
    if path.exists() and any(path.iterdir()):
        if not (path / _MARKER).is_file():
            raise ValueError(
                f"{path} exists and was not written by the demo; choose an empty --workdir"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / _MARKER).write_text("written by pixcrawler demo; safe to delete\n")
    return path


def run_demo(
    workdir: Path | None = None,
    *,
    images_per_class: int = 100,
    chunk_size: int = CHUNK_SIZE,
    echo: Callable[[str], Any] = print,
) -> DemoResult:
    """Build, pack, serve, load and learn the digits; print each step with ``echo``.

    ``workdir`` keeps the image folder and the store (default: a temporary folder, removed
    at the end). The server listens on 127.0.0.1 on a free port; its key is made for this
    run and never shown.
    """
    if not MIN_IMAGES_PER_CLASS <= images_per_class <= DIGITS_PER_CLASS:  # before any write
        raise ValueError(
            f"images_per_class must be from {MIN_IMAGES_PER_CLASS} to {DIGITS_PER_CLASS}, "
            f"got {images_per_class}"
        )
    model_selection = require("sklearn.model_selection", "demo", "scikit-learn")
    svm = require("sklearn.svm", "demo", "scikit-learn")
    for server_module in ("fastapi", "uvicorn"):  # (the demo extra brings the server's)
        require(server_module, "demo")
    from .packer import pack
    from .server import create_app, run_in_thread

    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pixcrawler-")))
        workdir = Path(workdir)
        source = _fresh_folder(workdir, "digits")
        store = workdir / "store"
        store.mkdir(parents=True, exist_ok=True)

        total, _ = write_digits(source, images_per_class)
        echo(
            f"1. Wrote {total:,} handwritten digits (scikit-learn's load_digits, 8x8 upscaled "
            f"to {IMAGE_SIZE}x{IMAGE_SIZE}) as PNG and JPEG files under {source}/0 ... /9"
        )
        packed = pack(
            source, store, job_id=JOB_ID, name="handwritten digits", chunk_size=chunk_size
        )
        echo(
            f"2. Packed {packed.job_id}: {packed.total_images:,} images in "
            f"{counted(packed.num_chunks, 'chunk')} ({human_size(packed.size_bytes)}) into "
            f"{store}"
        )

        key = secrets.token_urlsafe(24)
        base_url = stack.enter_context(run_in_thread(create_app(store, {key: DEFAULT_OWNER})))
        echo(f"3. Serving the store at {base_url} (with a key made for this run, not shown)")

        dataset = stack.enter_context(
            load_dataset(JOB_ID, api_key=key, base_url=base_url, mode="L")
        )
        echo("4. load_dataset(...).info:")
        for line in str(dataset.info).splitlines():
            echo(f"     {line}")

        started = time.perf_counter()
        count = sum(1 for _ in dataset)
        seconds = time.perf_counter() - started
        rate = count / seconds if seconds > 0 else float("inf")
        echo(f"5. Iterated {count:,} images in {seconds:.2f} s: {rate:,.0f} images/s")
        echo(f"     stats: {dataset.stats}")

        X, y = dataset.to_arrays()
        features = X.reshape(len(X), -1).astype(np.float32) / 255.0
        X_train, X_test, y_train, y_test = model_selection.train_test_split(
            features, y, test_size=TEST_FRACTION, random_state=0, stratify=y
        )
        # An RBF support vector machine: ~0.99 on these digits and a fit in a fraction of a
        # second (lbfgs logistic regression on 1,024 features took 10-30 s on 2 busy cores).
        model = svm.SVC()
        model.fit(X_train, y_train)
        accuracy = float(model.score(X_test, y_test))
        echo(
            f"6. to_arrays() -> X {X.shape} uint8; an SVM (sklearn.svm.SVC) trained on "
            f"{len(X_train):,} images: test accuracy {accuracy:.3f} on {len(X_test):,} held-out"
        )
        return DemoResult(
            job_id=JOB_ID,
            num_images=count,
            num_chunks=dataset.num_chunks,
            skipped=sum(1 for path, _ in packed.skipped if path != _MARKER),
            images_per_second=rate,
            accuracy=accuracy,
            train_size=len(X_train),
            test_size=len(X_test),
        )
    raise AssertionError("unreachable")  # pragma: no cover
