"""Shared fixtures: a packed store of test jobs and a real HTTP server over it.

- ``packed`` / ``store``: a store (session-scoped, built once) holding the jobs named in
  ``constants.py``: ``job_uniform``, ``job_mixed``, four unfinished jobs and ``job_other``
  (another owner's). Treat it as read-only; copy it to change it.
- ``live_server``: ``create_app(store, TEST_KEYS)`` on 127.0.0.1 (session-scoped).
- ``server_factory``: start a server over any store, stopped when the test ends.
- ``http``: a ``urllib3.PoolManager`` with no retries and no redirects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import urllib3

import pixcrawler
from constants import (
    EXIF_ROTATED_ID,
    EXIF_ROTATED_STORED_SIZE,
    JOB_MIXED,
    JOB_OTHER,
    JOB_UNIFORM,
    MIXED_CHUNK_SIZE,
    MIXED_TOTAL,
    OTHER_OWNER,
    OTHER_TOTAL,
    TEST_KEY,
    TEST_KEYS,
    TEST_OWNER,
    UNFINISHED_JOBS,
    UNIFORM_CHUNK_SIZE,
    UNIFORM_FORMATS,
    UNIFORM_LABELS,
    UNIFORM_PER_LABEL,
    UNIFORM_SIZE,
)
from imagegen import make_image, make_image_folder, save_image
from pixcrawler import config
from pixcrawler.packer import PackResult, pack, write_job

# This checkout's code, in the tests (pyproject's pythonpath) and in every process they
# start, whatever copy of the package the environment has installed.
SRC = Path(__file__).resolve().parents[1] / "src"
if not Path(pixcrawler.__file__).resolve().is_relative_to(SRC):
    raise ImportError(f"the tests import pixcrawler from {pixcrawler.__file__}, not from {SRC}")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
# The SDK takes a proxy and a CA bundle from the environment, as requests does: those of
# the machine running the tests (set for a package index, say) are not the tests' own
# (test_proxy.py and test_keys.py set theirs).
for _name in [name for name in os.environ if name.lower().endswith("_proxy")]:
    del os.environ[_name]
os.environ.pop("REQUESTS_CA_BUNDLE", None)
os.environ.pop("CURL_CA_BUNDLE", None)

__all__ = ["TEST_KEY", "LiveServer", "PackedStore"]

_DEFAULT_KEYS: Any = object()  # "keys not given" for server_factory; None means "from store"


@dataclass(frozen=True)
class PackedStore:
    """The shared store, the source folder of each packed job, and what pack() returned."""

    store: Path
    sources: Mapping[str, Path]
    results: Mapping[str, PackResult]


@dataclass(frozen=True)
class LiveServer:
    """A running test server: where it listens, a valid key (owner ``default``), its store."""

    base_url: str
    api_key: str
    store: Path


def build_mixed_source(root: Path) -> Path:
    """The source folder of ``job_mixed``: every accepted format and colour mode.

    bird/: 6 JPEGs of 3 sizes; cat/: RGB, RGBA and palette PNGs plus ``dup.jpg`` and
    ``dup.png`` (one stem, two images); dog/: GIF, BMP, WebP, .tif and .tiff; animals/cat/:
    L-mode JPEGs and a JPEG with EXIF orientation 6 (``EXIF_ROTATED_ID``).
    """
    sizes = [(24, 32), (40, 30), (32, 32)]
    make_image_folder(root, {"bird": 6}, size=sizes, formats=("jpg", "jpeg"), seed=1)
    make_image_folder(root, {"cat": 3}, size=sizes, formats=("png",), seed=2)
    save_image(make_image("cat", (28, 36), seed=2, index=10, mode="RGBA"), root / "cat/rgba.png")
    save_image(make_image("cat", (30, 30), seed=2, index=11, mode="P"), root / "cat/palette.png")
    save_image(make_image("cat", (24, 24), seed=2, index=12), root / "cat/dup.jpg")
    save_image(make_image("cat", (24, 24), seed=2, index=13), root / "cat/dup.png")
    dog_formats = ("gif", "bmp", "webp", "tif", "tiff", "gif")
    make_image_folder(root, {"dog": 6}, size=sizes, formats=dog_formats, seed=3)
    for i in range(2):
        image = make_image("animals/cat", (36, 28), seed=4, index=i, mode="L")
        save_image(image, root / f"animals/cat/gray{i}.jpg")
    make_image_folder(root, {"animals/cat": 2}, size=(26, 34), formats=("jpg",), seed=4)
    rotated = make_image("animals/cat", EXIF_ROTATED_STORED_SIZE, seed=4, index=99)
    save_image(rotated, root / EXIF_ROTATED_ID, exif_orientation=6)
    return root


@pytest.fixture(scope="session")
def packed(tmp_path_factory: pytest.TempPathFactory) -> PackedStore:
    """Build the shared store once per session (about a second)."""
    store = tmp_path_factory.mktemp("store")
    sources_root = tmp_path_factory.mktemp("sources")
    sources: dict[str, Path] = {}
    results: dict[str, PackResult] = {}

    uniform = make_image_folder(
        sources_root / "uniform",
        dict.fromkeys(UNIFORM_LABELS, UNIFORM_PER_LABEL),
        size=UNIFORM_SIZE,
        formats=UNIFORM_FORMATS,
    )
    sources[JOB_UNIFORM] = uniform
    results[JOB_UNIFORM] = pack(
        uniform, store, job_id=JOB_UNIFORM, name="uniform", chunk_size=UNIFORM_CHUNK_SIZE
    )

    mixed = build_mixed_source(sources_root / "mixed")
    sources[JOB_MIXED] = mixed
    results[JOB_MIXED] = pack(mixed, store, job_id=JOB_MIXED, chunk_size=MIXED_CHUNK_SIZE)
    if results[JOB_MIXED].total_images != MIXED_TOTAL or results[JOB_MIXED].skipped:
        raise RuntimeError(f"job_mixed source is not as documented: {results[JOB_MIXED]}")

    other = make_image_folder(sources_root / "other", {"x": OTHER_TOTAL}, seed=9)
    sources[JOB_OTHER] = other
    results[JOB_OTHER] = pack(other, store, job_id=JOB_OTHER, owner=OTHER_OWNER)

    for job_id, status, progress in UNFINISHED_JOBS:
        write_job(store, job_id, status=status, progress=progress, owner=TEST_OWNER)
    return PackedStore(store=store, sources=sources, results=results)


@pytest.fixture(scope="session")
def store(packed: PackedStore) -> Path:
    """The shared store folder (read-only by convention)."""
    return packed.store


@pytest.fixture(scope="session")
def live_server(store: Path) -> Iterator[LiveServer]:
    """The reference server over the shared store, keys ``TEST_KEYS``, on 127.0.0.1."""
    from pixcrawler.server import create_app, run_in_thread

    with run_in_thread(create_app(store, TEST_KEYS)) as base_url:
        yield LiveServer(base_url=base_url, api_key=TEST_KEY, store=store)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., str]]:
    """``start(store, keys=TEST_KEYS, **create_app_kwargs) -> base_url``; stopped at teardown.

    ``keys=None`` makes the server read ``keys.json`` / ``PIXCRAWLER_SERVER_KEYS``.
    """
    from pixcrawler.server import create_app, run_in_thread

    with ExitStack() as stack:

        def start(
            store: Path, keys: Mapping[str, str] | None = _DEFAULT_KEYS, **kwargs: Any
        ) -> str:
            chosen = TEST_KEYS if keys is _DEFAULT_KEYS else keys
            return stack.enter_context(run_in_thread(create_app(store, chosen, **kwargs)))

        yield start


@pytest.fixture(scope="session")
def http() -> Iterator[urllib3.PoolManager]:
    """An HTTP client for tests: fails fast; retries=False also means no redirect following."""
    manager = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=10))
    yield manager
    manager.clear()


@pytest.fixture
def slow_waits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Callable[[], list[str]]:
    """A consumer kept waiting on a chunk logs after 0.2 s, not 10 s (the pixcrawler
    logger's warnings captured); returns a reader of the ``waited ...`` lines so far."""
    monkeypatch.setattr(config, "SLOW_WAIT_SECONDS", 0.2)
    caplog.set_level(logging.WARNING, logger="pixcrawler")
    return lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("waited")]
