"""The installed ``pixcrawler`` console script, run as a subprocess against a real server.

Each test runs the console script of this interpreter (``pip install -e .`` puts it next to
``sys.executable``) with ``PYTHONPATH`` pointing at this checkout's ``src``, a private
config dir, and no ``PIXCRAWLER_*`` variables from the caller's environment.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import urllib3

from conftest import LiveServer, PackedStore
from constants import (
    EXIF_ROTATED_DISPLAY_SIZE,
    EXIF_ROTATED_ID,
    INFO_FIELDS,
    JOB_MIXED,
    JOB_OTHER,
    JOB_UNIFORM,
    MIXED_TOTAL,
    TEST_KEY,
    TEST_KEYS,
    UNFINISHED_JOBS,
    UNIFORM_CHUNK_SIZE,
    UNIFORM_LABELS,
    UNIFORM_SIZE,
    UNIFORM_TOTAL,
)
from helpers import (
    CannedHost,
    _LoopbackHost,
    _QuietHandler,
    copy_without_counts,
    corrupt_copy,
    drop_counts,
    edited_copy,
    rewrite_chunk,
)
from imagegen import make_image, make_image_folder, save_image
from pixcrawler import load_dataset
from pixcrawler.config import MAX_ERROR_MESSAGE, MAX_MEMBERS, READ_BLOCK
from pixcrawler.exceptions import AuthenticationError
from pixcrawler.packer import pack, write_job
from pixcrawler.testing.faults import Fault, FaultProxy, FaultSchedule

SRC = Path(__file__).resolve().parents[1] / "src"
# A key that would stand out anywhere it leaked.
SECRET = "sk-live-CANARY-7f3a9c2e51d04b86"

pytestmark = pytest.mark.timeout(60)


def _console_script() -> str | None:
    beside = Path(sys.executable).parent / "pixcrawler"
    if beside.exists():
        return str(beside)
    return shutil.which("pixcrawler")


@dataclass
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return (
            f"pixcrawler {' '.join(self.args)} -> {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


@dataclass
class Cli:
    """Runs the console script in ``cwd`` with a private config dir."""

    script: str
    cwd: Path
    config_dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIXCRAWLER_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
        env["PIXCRAWLER_CONFIG_DIR"] = str(self.config_dir)
        env.update(self.env_extra)
        env.update(extra)
        return env

    def run(self, *args: str, input: str | None = None, timeout: float = 50, **env: str) -> Result:
        done = subprocess.run(
            [self.script, *args],
            cwd=self.cwd,
            env=self.env(**env),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Result(tuple(args), done.returncode, done.stdout, done.stderr)

    def start(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [self.script, *args],
            cwd=self.cwd,
            env=self.env(**env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    script = _console_script()
    if script is None:
        pytest.fail("the pixcrawler console script is not installed: pip install -e . --no-deps")
    work = tmp_path / "work"
    work.mkdir()
    return Cli(script=script, cwd=work, config_dir=tmp_path / "config")


def api(server: LiveServer | str, key: str | None = None) -> list[str]:
    """``--base-url`` (and ``--api-key``) arguments for a server."""
    if isinstance(server, LiveServer):
        return ["--base-url", server.base_url, "--api-key", key or server.api_key]
    return ["--base-url", server] + (["--api-key", key] if key else [])


def wait_for(condition: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def sdk_samples(server: LiveServer | str, job_id: str, key: str, **kwargs: object) -> list:
    base_url = server.base_url if isinstance(server, LiveServer) else server
    with load_dataset(job_id, api_key=key, base_url=base_url) as dataset:
        return list(dataset.iter_samples(**kwargs))  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def image_files(root: Path) -> dict[str, bytes]:
    """Every non-hidden file under ``root`` except ``metadata.jsonl``, by relative path."""
    files = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if path.is_file() and rel != "metadata.jsonl" and not hidden:
            files[rel] = path.read_bytes()
    return files


# -- help, usage -------------------------------------------------------------------------------

COMMANDS = ["download", "list", "info", "login", "pack", "serve", "demo"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_command_has_help_with_an_example(cli: Cli, command: str) -> None:
    args = [command, "--help"] if command else ["--help"]
    result = cli.run(*args, PIXCRAWLER_API_KEY=SECRET)
    assert result.returncode == 0, result
    assert "Usage: pixcrawler" in result.stdout
    assert "Example" in result.stdout
    assert "pixcrawler " + (command or "download") in result.stdout.split("Example")[1]
    assert SECRET not in result.output


def test_top_level_help_lists_commands_and_exit_codes(cli: Cli) -> None:
    result = cli.run("--help")
    for command in COMMANDS:
        assert command in result.stdout
    assert "130 interrupted" in result.stdout
    assert cli.run("--version").stdout.startswith("pixcrawler, version ")


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        ["download"],
        ["download", JOB_UNIFORM, "--format", "parquet"],
        ["download", JOB_UNIFORM, "--max-workers", "0"],
        ["download", JOB_UNIFORM, "--image-size", "32"],
        ["download", JOB_UNIFORM, "-o", ""],  # ($OUT unset) it wrote into the working folder
        ["download", JOB_UNIFORM, "--api-key"],
        ["info", "../etc/passwd"],
        ["list", "--base-url", "ftp://example.com"],
        ["list", "--base-url", "example.com"],
        ["list", "--base-url", "http://127.0.0.1:99999"],  # was exit 1, "ValueError: ..."
        ["info", JOB_UNIFORM, "--base-url", "http://"],  # was retried, then exit 6
        ["pack", "/nonexistent-folder", "--store", "s"],
    ],
)
def test_usage_errors_exit_2(cli: Cli, args: list[str]) -> None:
    result = cli.run(*args)
    assert result.returncode == 2, result
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result
    assert result.stderr.rstrip().endswith("--help`)"), result  # where to read on
    assert "Traceback" not in result.stderr


def test_no_command_shows_the_help_not_an_error_line(cli: Cli) -> None:
    result = cli.run()
    assert result.returncode == 2, result
    assert result.stderr.startswith("Usage: pixcrawler [OPTIONS] COMMAND")
    assert "Error:" not in result.stderr and "download" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["download", JOB_UNIFORM, f"--format={SECRET}", "--api-key", SECRET],
        ["list", SECRET, f"--api-key={SECRET}"],
        ["login", SECRET],  # the key pasted as an argument: login reads it from a prompt
    ],
)
def test_a_usage_error_met_before_the_key_is_read_never_shows_it(cli: Cli, args: list[str]) -> None:
    result = cli.run(*args)
    assert result.returncode == 2, result
    assert SECRET not in result.output
    assert "***" in result.stderr or "(not shown: it may be a key)" in result.stderr, result


@pytest.mark.parametrize(
    "args",
    [
        ["info", JOB_UNIFORM, SECRET],  # `--api-key` forgotten before the key
        ["list", SECRET],
        ["download", JOB_UNIFORM, SECRET, "--output-dir", "out"],
    ],
)
def test_an_unexpected_argument_is_counted_not_shown(cli: Cli, args: list[str]) -> None:
    """Click's error echoed every extra argument: a key typed without its flag was shown."""
    result = cli.run(*args)
    assert result.returncode == 2, result
    assert SECRET[:8] not in result.output, result
    assert "Got unexpected extra argument (not shown" in result.stderr, result


def test_only_the_login_command_takes_its_arguments_for_keys(cli: Cli) -> None:
    """A folder named login is not a command: what follows it was scrubbed as a key."""
    make_image_folder(cli.cwd / "login", {"cat": 2})
    result = cli.run("pack", "login", "--store", "store", "--job-id", "job_login")
    assert result.returncode == 0, result
    assert result.stdout.startswith("Packed job_login: 2 images, 1 label, 1 chunk ("), result


def test_image_size_is_for_numpy_only(cli: Cli, live_server: LiveServer) -> None:
    result = cli.run(
        "download", JOB_UNIFORM, "--format", "zip", "--image-size", "8", "8", *api(live_server)
    )
    assert result.returncode == 2, result
    assert "--image-size" in result.stderr


def test_an_image_size_past_the_pixel_limit_is_a_usage_error(
    cli: Cli, live_server: LiveServer
) -> None:
    """Exit 2 before anything is written: not exit 1 with an OverflowError. (Nor, for
    100000 x 100000, a 1.8 TB X.npy.part reserved on disk until the disk was full: that
    size is left out here, since a regression would fill the disk the suite runs on.)"""
    size = ("99999999999999999999", "3")
    result = cli.run("download", JOB_UNIFORM, "--image-size", *size, "-o", "out", *api(live_server))
    assert result.returncode == 2, result
    assert "--image-size" in result.stderr and "over the limit" in result.stderr
    assert not (cli.cwd / "out" / JOB_UNIFORM / "X.npy.part").exists()


# -- download: each format against the packed source ---------------------------------------


def test_zip_download_is_the_store_chunks_byte_for_byte(cli: Cli, live_server: LiveServer) -> None:
    result = cli.run("download", JOB_UNIFORM, "--format", "zip", "-o", "out", *api(live_server))
    assert result.returncode == 0, result
    assert result.stderr == ""  # no progress bar off a terminal
    served = sorted((live_server.store / JOB_UNIFORM / "chunks").glob("*.zip"))
    got_dir = cli.cwd / "out" / JOB_UNIFORM / "chunks"
    assert [p.name for p in served] == sorted(p.name for p in got_dir.iterdir())
    assert served[0].name == "00000.zip"
    for path in served:
        assert (got_dir / path.name).read_bytes() == path.read_bytes()
    assert f"Downloaded {JOB_UNIFORM}: {UNIFORM_TOTAL} images in {len(served)} chunks" in (
        result.stdout
    )


def test_images_download_is_byte_identical_to_the_packed_files(
    cli: Cli, live_server: LiveServer, packed: PackedStore
) -> None:
    result = cli.run("download", JOB_MIXED, "--format", "images", "-o", "out", *api(live_server))
    assert result.returncode == 0, result
    root = cli.cwd / "out" / JOB_MIXED
    source = image_files(packed.sources[JOB_MIXED])
    assert image_files(root) == source  # nested labels, dup.jpg + dup.png, every format
    records = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == MIXED_TOTAL
    assert [r["chunk"] for r in records] == sorted(r["chunk"] for r in records)
    for record in records:
        data = (root / record["file"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["file"] == record["id"] == record["path"]
        assert record["file"].startswith(record["label"] + "/")
        assert set(record) >= {"id", "label", "path", "chunk", "width", "height", "metadata"}
    rotated = next(r for r in records if r["id"] == EXIF_ROTATED_ID)
    assert (rotated["height"], rotated["width"]) == EXIF_ROTATED_DISPLAY_SIZE
    assert not (root / ".partial").exists()
    assert not list(root.rglob("*.part"))


def test_images_export_never_lets_one_image_overwrite_another_or_its_own_files(
    cli: Cli, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """Another producer's paths: two with one file name under one label get distinct files,
    the renamed one never taking the name of a real file; a label named like the export's
    own staging folder is refused (the folder is deleted when the export ends)."""
    from test_archive import build_chunk, encode, write_crafted_job

    def chunk(paths: list[str], label: str) -> bytes:
        images = [(path, encode("PNG", index=i)) for i, path in enumerate(paths)]
        entries = [
            {"path": p, "label": label, "id": p, "sha256": hashlib.sha256(d).hexdigest()}
            for p, d in images
        ]
        return build_chunk(images, entries=entries)

    store = tmp_path / "store"
    write_crafted_job(store, "job_names", [chunk(["cat/x.png", "cat/x~0-2.png", "o/x.png"], "cat")])
    write_crafted_job(store, "job_staging", [chunk([".partial/a.png"], ".partial")])
    url = server_factory(store)
    result = cli.run(
        "download", "job_names", "--format", "images", "-o", "out", *api(url, TEST_KEY)
    )
    assert result.returncode == 0, result
    root = cli.cwd / "out" / "job_names"
    records = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert len({r["file"] for r in records}) == 3
    for record in records:
        assert hashlib.sha256((root / record["file"]).read_bytes()).hexdigest() == record["sha256"]

    result = cli.run(
        "download", "job_staging", "--format", "images", "-o", "out", *api(url, TEST_KEY)
    )
    assert result.returncode == 8, result
    assert "'.partial', a name this folder keeps for the export itself" in result.stderr

    # A file named as another image's folder: renamed when the folder came first; where
    # the file came first, no name serves the folder's image: refused, never an OS error.
    folder_first = [chunk(["a/b.png/c.png"], "a/b.png"), chunk(["a/b.png"], "a")]
    write_crafted_job(store, "job_folder_first", folder_first)
    write_crafted_job(store, "job_file_first", folder_first[::-1])
    result = cli.run(
        "download", "job_folder_first", "--format", "images", "-o", "out", *api(url, TEST_KEY)
    )
    assert result.returncode == 0, result
    root = cli.cwd / "out" / "job_folder_first"
    files = sorted(record["file"] for record in metadata_records(root))
    assert files == ["a/b.png/c.png", "a/b~1-0.png"]
    for record in metadata_records(root):
        assert hashlib.sha256((root / record["file"]).read_bytes()).hexdigest() == record["sha256"]
    result = cli.run(
        "download", "job_file_first", "--format", "images", "-o", "out", *api(url, TEST_KEY)
    )
    assert result.returncode == 8, result
    assert "where another image of the job is a file of that name" in result.stderr


@pytest.mark.parametrize("change", ["file-to-folder", "folder-to-file"])
def test_a_new_version_naming_a_folder_as_an_old_file_or_back_is_downloaded(
    cli: Cli, server_factory: Callable[..., str], tmp_path: Path, change: str
) -> None:
    """The earlier version's files stay until the new listing takes its name: a label of
    the new version named as an image of the old was an OS error (exit 1) on every rerun,
    and an image named as an old folder too."""
    from test_archive import build_chunk, encode, write_crafted_job

    def chunk(images: list[tuple[str, str]]) -> bytes:
        files = [(path, encode("PNG", index=i)) for i, (path, _) in enumerate(images)]
        entries = [
            {"path": path, "label": label, "id": path, "sha256": hashlib.sha256(d).hexdigest()}
            for (path, label), (_, d) in zip(images, files, strict=True)
        ]
        return build_chunk(files, entries=entries)

    as_file, as_folder = [("cat/a.png", "cat")], [("cat/a.png/b.png", "cat/a.png")]
    versions = [as_file, as_folder] if change == "file-to-folder" else [as_folder, as_file]
    store = tmp_path / "store"
    store.mkdir()
    url = server_factory(store)
    args = ["download", "job_v", "--format", "images", "-o", "out", *api(url, TEST_KEY)]
    root = cli.cwd / "out" / "job_v"
    for images in versions:
        shutil.rmtree(store / "job_v", ignore_errors=True)
        write_crafted_job(store, "job_v", [chunk(images)])
        result = cli.run(*args)
        assert result.returncode == 0, result
        records = metadata_records(root)
        assert len(records) == 1
        file = root / records[0]["file"]
        assert hashlib.sha256(file.read_bytes()).hexdigest() == records[0]["sha256"]
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert on_disk - {"metadata.jsonl", ".progress.json", ".download.lock"} == {records[0]["file"]}


def metadata_records(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def test_images_export_writes_names_up_to_the_file_system_limit_and_renames_within_it(
    cli: Cli, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """A file name of 255 bytes, the most a name may have, packed (the file system took it)
    is exported as it is: the temp file an image goes through is not named after it. Two
    such names under one label: the second is renamed within the limit, keeping its
    extension."""
    from test_archive import build_chunk, encode, write_crafted_job

    long = "a" * 251 + ".png"
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / long).write_bytes(encode("PNG"))
    (src / "cat" / "ok.png").write_bytes(encode("PNG", index=1))
    store = tmp_path / "store"
    pack(src, store, job_id="job_long")
    images = [(f"cat/{long}", encode("PNG", index=2)), (f"o/{long}", encode("PNG", index=3))]
    entries = [
        {"path": p, "label": "cat", "id": p, "sha256": hashlib.sha256(d).hexdigest()}
        for p, d in images
    ]
    write_crafted_job(store, "job_twice", [build_chunk(images, entries=entries)])
    url = server_factory(store)

    root, _ = download(cli, url, "job_long", "--format", "images")
    assert image_files(root) == image_files(src)
    root, _ = download(cli, url, "job_twice", "--format", "images")
    records = metadata_records(root)
    assert records[0]["file"] == f"cat/{long}"
    renamed = records[1]["file"].removeprefix("cat/")
    assert len(renamed.encode()) <= 255 and renamed.endswith("~0-1.png"), renamed
    for record in records:
        assert hashlib.sha256((root / record["file"]).read_bytes()).hexdigest() == record["sha256"]


def test_images_export_of_labels_too_long_for_a_folder_name_or_that_are_no_text(
    cli: Cli, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """A label of 90 CJK characters (270 bytes: a Windows crawl takes it) failed with
    "File name too long", exit 1, on every run; one holding a lone surrogate (valid JSON)
    with a UnicodeEncodeError. The first gets a folder cut to fit, one per label; the
    second is bad data, exit 8."""
    from test_archive import build_chunk, encode, write_crafted_job

    def chunk(labels: list[str], folder: str | None = None) -> bytes:
        paths = [f"{folder or label}/a.png" for label in labels]
        images = [(path, encode("PNG", index=i)) for i, path in enumerate(paths)]
        entries = [
            {"path": p, "label": label, "id": p, "sha256": digest(d)}
            for (p, d), label in zip(images, labels, strict=True)
        ]
        return build_chunk(images, entries=entries)

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    long = ["猫" * 90, "猫" * 89 + "犬", "猫" * 90]  # the third: the first's folder again
    store = tmp_path / "store"
    write_crafted_job(store, "job_long_labels", [chunk(long[:2]), chunk(long[2:])])
    write_crafted_job(store, "job_surrogate", [chunk(["\ud800cat"], folder="cat")])
    url = server_factory(store)
    for _ in range(2):  # and again, as complete
        root, _ = download(cli, url, "job_long_labels", "--format", "images")
    records = metadata_records(root)
    folders = [record["file"].rpartition("/")[0] for record in records]
    assert all(len(folder.encode()) <= 255 for folder in folders), folders
    assert folders[0] == folders[2] != folders[1]
    assert [record["label"] for record in records] == long
    for record in records:
        assert digest((root / record["file"]).read_bytes()) == record["sha256"]

    result = cli.run(
        "download", "job_surrogate", "--format", "images", "-o", "out", *api(url, TEST_KEY)
    )
    assert result.returncode == 8 and "unsafe path or label" in result.stderr, result

    # Folders each of a legal length, nested past any path's: bad data too (it was exit 1,
    # "File name too long", with the whole 5 KB path in the message, on every rerun).
    deep = "/".join(["d" * 200] * 25)
    write_crafted_job(store, "job_deep", [chunk([deep])])
    result = cli.run("download", "job_deep", "--format", "images", "-o", "out", *api(url, TEST_KEY))
    assert result.returncode == 8, result.stderr[:600]
    assert "longer than this file system allows" in result.stderr, result
    assert len(result.stderr) < 600, result.stderr


def test_images_export_keeps_an_image_named_like_another_ones_temp_file(
    cli: Cli, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """Another producer's ``cat/.a.png.part`` and ``cat/a.png`` are two images: each ends
    up in its own file, neither written through a temp file named like the other."""
    from test_archive import build_chunk, encode, write_crafted_job

    images = [("cat/.a.png.part", encode("PNG")), ("cat/a.png", encode("PNG", index=1))]
    write_crafted_job(tmp_path / "store", "job_part", [build_chunk(images)])
    root, _ = download(cli, server_factory(tmp_path / "store"), "job_part", "--format", "images")
    records = metadata_records(root)
    assert [r["file"] for r in records] == ["cat/.a.png.part", "cat/a.png"]
    for record, (_, data) in zip(records, images, strict=True):
        assert (root / record["file"]).read_bytes() == data


def test_numpy_download_equals_the_sdk_iteration(cli: Cli, live_server: LiveServer) -> None:
    result = cli.run("download", JOB_UNIFORM, "-o", "out", "--no-progress", *api(live_server))
    assert result.returncode == 0, result
    root = cli.cwd / "out" / JOB_UNIFORM
    X = np.load(root / "X.npy", mmap_mode="r")
    y = np.load(root / "y.npy")
    labels = json.loads((root / "labels.json").read_text())
    assert labels == list(UNIFORM_LABELS)
    assert X.shape == (UNIFORM_TOTAL, *UNIFORM_SIZE, 3) and X.dtype == np.uint8
    assert y.shape == (UNIFORM_TOTAL,) and y.dtype == np.int64
    samples = sdk_samples(live_server, JOB_UNIFORM, live_server.api_key)
    assert len(samples) == UNIFORM_TOTAL
    for row, (sample, image) in enumerate(samples):
        np.testing.assert_array_equal(X[row], image)
        assert labels[y[row]] == sample.label
    assert sorted(p.name for p in root.iterdir()) == [
        ".download.lock",
        ".progress.json",
        "X.npy",
        "labels.json",
        "y.npy",
    ]


def test_numpy_of_mixed_sizes_needs_image_size_and_writes_nothing_without_it(
    cli: Cli, live_server: LiveServer
) -> None:
    result = cli.run("download", JOB_MIXED, "-o", "out", *api(live_server))
    assert result.returncode == 2, result
    assert "--image-size" in result.stderr and "--format images" in result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert not (cli.cwd / "out").exists()  # not even the job's folder or its lock file

    result = cli.run(
        "download", JOB_MIXED, "-o", "out", "--image-size", "24", "20", *api(live_server)
    )
    assert result.returncode == 0, result
    root = cli.cwd / "out" / JOB_MIXED
    X = np.load(root / "X.npy")
    y = np.load(root / "y.npy")
    labels = json.loads((root / "labels.json").read_text())
    assert X.shape == (MIXED_TOTAL, 24, 20, 3)
    samples = sdk_samples(live_server, JOB_MIXED, live_server.api_key, image_size=(24, 20))
    for row, (sample, image) in enumerate(samples):
        np.testing.assert_array_equal(X[row], image)
        assert labels[y[row]] == sample.label


def test_numpy_of_a_job_listing_no_labels_is_refused_before_anything_is_written(
    cli: Cli, live_server: LiveServer, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """y.npy holds label ids, positions in the job's labels: a job listing none (another
    producer's) downloaded chunks and reserved X.npy.part, then failed at its first image
    (exit 8), naming no format that works. The images format still does."""

    def unlabelled(job: dict[str, Any]) -> None:
        del job["labels"]

    url = server_factory(edited_copy(live_server.store, tmp_path, JOB_UNIFORM, unlabelled))
    result = cli.run("download", JOB_UNIFORM, "-o", "out", *api(url, live_server.api_key))
    assert result.returncode == 2, result
    assert f"job {JOB_UNIFORM} lists no labels" in result.stderr
    assert "--format images" in result.stderr and result.stderr.count("\n") == 1
    assert not (cli.cwd / "out").exists()
    result = cli.run(
        "download", JOB_UNIFORM, "-o", "out", "--format", "images", *api(url, live_server.api_key)
    )
    assert result.returncode == 0, result


def _unlabelled_copy(store: Path, dest: Path, *, only_first_as: str | None = None) -> Path:
    """job_uniform as another producer may pack it: its images at the top of each chunk,
    their manifest entries without a label, the job listing none; chunk 0's first image
    named ``metadata.jsonl``, its second as a temp file of the export. With
    ``only_first_as``, only chunk 0's first image, so named, and the labels stay."""
    shutil.copytree(store / JOB_UNIFORM, dest / JOB_UNIFORM)
    job_path = dest / JOB_UNIFORM / "job.json"
    job = json.loads(job_path.read_text())
    if only_first_as is None:
        del job["labels"]
    for chunk in job["chunks"]:
        path = dest / JOB_UNIFORM / "chunks" / f"{chunk['index']:05d}.zip"
        with zipfile.ZipFile(path) as source:
            manifest = json.loads(source.read("manifest.json"))
            members = {name: source.read(name) for name in source.namelist()}
        renamed = []
        for at, entry in enumerate(manifest["images"]):
            data = members[entry["path"]]
            where = (chunk["index"], at)
            if only_first_as is None:
                del entry["label"]
                top = entry["path"].replace("/", "_")
                named = {(0, 0): "metadata.jsonl", (0, 1): ".labels.json.1-2.tmp"}
                entry["path"] = named.get(where, top)
            elif where == (0, 0):
                del entry["label"]
                entry["path"] = only_first_as
            renamed.append((entry["path"], data))
        rewrite_chunk(path, chunk, manifest, renamed)
    job_path.write_text(json.dumps(job))
    return dest


def test_images_of_no_label_download_as_images_at_the_top(
    cli: Cli, live_server: LiveServer, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """numpy says to use --format images for a job without labels; for images that have
    none it failed (exit 8, "names the unsafe path or label ''"). They lie at the top, by
    their file names, one named as the export's own file renamed."""
    url = server_factory(_unlabelled_copy(live_server.store, tmp_path))
    with load_dataset(JOB_UNIFORM, live_server.api_key, url) as dataset:
        assert {label for _, label in dataset} == {""}
    args = ["download", JOB_UNIFORM, "-o", "out", "--format", "images", "--no-progress"]
    result = cli.run(*args, *api(url, live_server.api_key))
    assert result.returncode == 0, result
    root = cli.cwd / "out" / JOB_UNIFORM
    lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == UNIFORM_TOTAL and {line["label"] for line in lines} == {""}
    assert all("/" not in line["file"] for line in lines)
    assert lines[0]["file"] == "metadata~0-0.jsonl"  # not over the listing
    assert lines[1]["file"] == ".labels.json.1-2~0-1.tmp"  # not swept away by a rerun
    assert cli.run(*args, *api(url, live_server.api_key)).returncode == 0
    assert all((root / line["file"]).exists() for line in lines)
    store_chunks = tmp_path / JOB_UNIFORM / "chunks"
    packed = {}
    for path in sorted(store_chunks.glob("*.zip")):
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("manifest.json"))
            packed.update({e["id"]: archive.read(e["path"]) for e in manifest["images"]})
    for line in lines:
        assert (root / line["file"]).read_bytes() == packed[line["id"]]


def test_an_image_of_no_label_named_as_a_label_does_not_take_its_folder(
    cli: Cli, live_server: LiveServer, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """Placed first, it took the label's folder name, and the label's images failed (exit
    8, "where another image of the job is a file of that name"); placed after, it was
    renamed: now it is renamed whichever comes first."""
    label = UNIFORM_LABELS[0]
    url = server_factory(_unlabelled_copy(live_server.store, tmp_path, only_first_as=label))
    args = ["download", JOB_UNIFORM, "-o", "out", "--format", "images", "--no-progress"]
    result = cli.run(*args, *api(url, live_server.api_key))
    assert result.returncode == 0, result
    root = cli.cwd / "out" / JOB_UNIFORM
    lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert (lines[0]["label"], lines[0]["file"]) == ("", f"{label}~0-0")
    assert (root / label).is_dir() and (root / f"{label}~0-0").is_file()


# -- resume ------------------------------------------------------------------------------------

BIG_JOB = "job_big"
BIG_CHUNK = 20
BIG_TOTAL = 60
STALL_AT = READ_BLOCK + READ_BLOCK // 4  # past the first block the downloader writes


@dataclass(frozen=True)
class BigJob:
    base_url: str
    store: Path
    source: Path
    chunk_sizes: list[int]


@pytest.fixture(scope="module")
def big_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigJob]:
    """A job of three ~2 MB chunks (256x256 PNGs) behind its own server."""
    from pixcrawler.server import create_app, run_in_thread

    root = tmp_path_factory.mktemp("big")
    source = make_image_folder(
        root / "src", {"ant": 30, "bee": 30}, size=(256, 256), formats=("png",), seed=5
    )
    store = root / "store"
    result = pack(source, store, job_id=BIG_JOB, chunk_size=BIG_CHUNK)
    chunks = sorted((store / BIG_JOB / "chunks").glob("*.zip"))
    sizes = [path.stat().st_size for path in chunks]
    assert result.num_chunks == 3 and min(sizes) > STALL_AT + READ_BLOCK // 4, sizes
    with run_in_thread(create_app(store, TEST_KEYS)) as base_url:
        yield BigJob(base_url=base_url, store=store, source=source, chunk_sizes=sizes)


def chunk_path(index: int) -> str:
    return f"/api/v1/jobs/{BIG_JOB}/chunks/{index}"


def job_json_bytes(proxy: FaultProxy, key: str) -> int:
    """Bytes of the job's JSON body, as the proxy forwards it to the CLI; the proxy's
    counters are zero on return."""
    proxy.reset_stats()
    response = urllib3.request(
        "GET", f"{proxy.base_url}/api/v1/jobs/{BIG_JOB}", headers={"X-API-Key": key}
    )
    assert response.status == 200
    size = len(response.data)
    forwarded(proxy, size)  # counted by now, so the reset below does not race it
    proxy.reset_stats()
    return size


def forwarded(proxy: FaultProxy, expected: int) -> int:
    """The proxy's byte count once it has caught up with ``expected`` (or 5 s have passed):
    it counts a response once written, which may be just after the client has it all."""
    deadline = time.monotonic() + 5
    while proxy.stats.bytes_forwarded < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # and nothing more arrives
    return proxy.stats.bytes_forwarded


def check_output(fmt: str, root: Path, big: BigJob, key: str) -> None:
    if fmt == "zip":
        for index, path in enumerate(sorted((big.store / BIG_JOB / "chunks").glob("*.zip"))):
            assert (root / "chunks" / f"{index:05d}.zip").read_bytes() == path.read_bytes()
    elif fmt == "images":
        assert image_files(root) == image_files(big.source)
        lines = (root / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == len({json.loads(line)["id"] for line in lines}) == BIG_TOTAL
    else:
        X = np.load(root / "X.npy", mmap_mode="r")
        y = np.load(root / "y.npy")
        labels = json.loads((root / "labels.json").read_text())
        samples = sdk_samples(big.base_url, BIG_JOB, key)
        assert X.shape[0] == len(samples) == BIG_TOTAL
        for row, (sample, image) in enumerate(samples):
            np.testing.assert_array_equal(X[row], image)
            assert labels[y[row]] == sample.label
    assert not list(root.rglob("*.part"))
    assert not (root / ".partial").exists()


def first_chunk_written(fmt: str, root: Path) -> bool:
    if fmt == "zip":
        return (root / "chunks" / "00000.zip").exists()
    try:
        state = json.loads((root / ".progress.json").read_text())[fmt]
    except (OSError, ValueError, KeyError):
        return False
    return 0 in state["done"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("fmt", "how"),
    [("zip", signal.SIGKILL), ("numpy", signal.SIGINT), ("images", signal.SIGKILL)],
)
def test_rerun_after_a_kill_mid_chunk_transfers_only_the_rest(
    cli: Cli, big_job: BigJob, fmt: str, how: signal.Signals
) -> None:
    key = next(iter(TEST_KEYS))
    stall = Fault("stall", after_bytes=STALL_AT, seconds=60)
    schedule = FaultSchedule.script([None, stall], match=r"/chunks/")
    root = cli.cwd / "out" / BIG_JOB
    part = (root / "chunks" if fmt == "zip" else root / ".partial") / "00001.zip.part"
    with FaultProxy(big_job.base_url, schedule=schedule) as proxy:
        args = ["download", BIG_JOB, "--format", fmt, "-o", "out", "--max-workers", "1"]
        process = cli.start(*args, *api(proxy.base_url, key))
        try:
            wait_for(lambda: size_of(part) > 0, what="chunk 1 to be partly received")
            wait_for(lambda: first_chunk_written(fmt, root), what="chunk 0 to be written")
            process.send_signal(how)
            _, stderr = process.communicate(timeout=45)
        finally:
            process.kill()
            process.wait()
        if how == signal.SIGINT:
            assert process.returncode == 130, stderr
            assert "interrupted" in stderr and "resume" in stderr
            assert "Traceback" not in stderr
        held = size_of(part)
        assert 0 < held < big_job.chunk_sizes[1]
        assert not (root / "X.npy").exists() and not (root / "metadata.jsonl").exists()

        proxy.schedule = FaultSchedule.none()
        overhead = job_json_bytes(proxy, key)
        result = cli.run(*args, *api(proxy.base_url, key))
        assert result.returncode == 0, result
        stats = proxy.stats
        assert stats.requests_by_path[chunk_path(0)] == 0
        assert stats.requests_by_path[chunk_path(1)] == 1
        assert stats.requests_by_path[chunk_path(2)] == 1
        rest = big_job.chunk_sizes[1] - held + big_job.chunk_sizes[2]
        assert forwarded(proxy, overhead + rest) == overhead + rest
    check_output(fmt, root, big_job, key)


@pytest.mark.parametrize("how", ["SIGINT, started ignored", "SIGTERM"])
def test_a_signal_stops_a_download_with_one_line(cli: Cli, big_job: BigJob, how: str) -> None:
    """A shell without job control (a script, CI, ``cmd &``) starts commands with SIGINT
    ignored; Python keeps that, so without care the download would run on. A scheduler's
    stop (SIGTERM) unwinds as Ctrl-C does (it died of the signal in silence). Either way
    what was received stays for a rerun, and one line says so."""
    key = next(iter(TEST_KEYS))
    stall = Fault("stall", after_bytes=STALL_AT, seconds=60)
    part = cli.cwd / "out" / BIG_JOB / ".partial" / "00000.zip.part"
    schedule = FaultSchedule.script([stall], match=r"/chunks/")
    with FaultProxy(big_job.base_url, schedule=schedule) as proxy:
        args = ["download", BIG_JOB, "-o", "out", "--max-workers", "1", *api(proxy.base_url, key)]
        ignoring = ["sh", "-c", 'trap "" INT; exec "$0" "$@"'] if how != "SIGTERM" else []
        process = subprocess.Popen(
            [*ignoring, cli.script, *args],
            cwd=cli.cwd,
            env=cli.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: size_of(part) > 0, what="chunk 0 to be partly received")
            process.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
            _, stderr = process.communicate(timeout=45)
        finally:
            process.kill()
            process.wait()
    code, word = (143, "terminated") if how == "SIGTERM" else (130, "interrupted")
    assert process.returncode == code, stderr
    assert stderr.endswith(f"Error: {word}; run the same command again to resume\n"), stderr
    assert "Traceback" not in stderr
    assert size_of(part) > 0  # kept: the rerun goes on from there


def test_ctrl_c_while_the_command_starts_is_one_line_and_exit_130(cli: Cli, tmp_path: Path) -> None:
    """Pressed while numpy and Pillow load (the first ~0.2 s), Ctrl-C printed a traceback
    through numpy's import and died of the signal. Here the first numpy import raises
    KeyboardInterrupt, as the signal would."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "numpy.py").write_text("raise KeyboardInterrupt\n")
    env = cli.env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env["PYTHONPATH"]])
    for command in ([sys.executable, "-m", "pixcrawler", "--version"], [cli.script, "--version"]):
        done = subprocess.run(
            command, cwd=cli.cwd, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 130, done
        assert done.stderr == "Error: interrupted\n"


def test_import_pixcrawler_loads_no_numpy() -> None:
    """The package itself is light; numpy, Pillow and urllib3 load with what needs them."""
    code = (
        "import sys, pixcrawler; print('numpy' in sys.modules, pixcrawler.load_dataset, "
        "pixcrawler.config.MAX_IMAGE_PIXELS)"  # submodules still reachable as attributes
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert done.returncode == 0, done
    assert done.stdout.startswith("False <function load_dataset")
    assert done.stdout.rstrip().endswith(" 178956970")


@pytest.mark.parametrize("fmt", ["zip", "numpy", "images"])
def test_rerun_of_a_complete_download_transfers_no_chunk(
    cli: Cli, big_job: BigJob, fmt: str
) -> None:
    key = next(iter(TEST_KEYS))
    with FaultProxy(big_job.base_url) as proxy:
        args = ["download", BIG_JOB, "--format", fmt, "-o", "out", *api(proxy.base_url, key)]
        assert cli.run(*args).returncode == 0
        proxy.reset_stats()
        result = cli.run(*args)
        assert result.returncode == 0, result
        assert "already complete" in result.stdout
        assert proxy.stats.requests == 1  # the job's metadata only
    check_output(fmt, cli.cwd / "out" / BIG_JOB, big_job, key)


def test_a_zip_download_leaves_the_users_own_files_in_its_folder(
    cli: Cli, live_server: LiveServer
) -> None:
    """Only files named as it names chunks (``00000.zip``) are its to replace or delete."""
    chunks = cli.cwd / "out" / JOB_UNIFORM / "chunks"
    chunks.mkdir(parents=True)
    mine = {"my_backup.zip": b"mine", "notes.zip.part": b"notes", "99.zip": b"short name"}
    for name, data in mine.items():
        (chunks / name).write_bytes(data)
    result = cli.run("download", JOB_UNIFORM, "--format", "zip", "-o", "out", *api(live_server))
    assert result.returncode == 0, result
    for name, data in mine.items():
        assert (chunks / name).read_bytes() == data


def test_a_zip_folder_of_a_shrunk_version_keeps_only_the_chunks_it_lists(
    cli: Cli, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """The new version's chunks are all there already (unchanged): the old version's last
    one still goes, though nothing is downloaded."""
    source = make_image_folder(tmp_path / "src", {"ant": 6}, seed=3)
    store = tmp_path / "store"
    pack(source, store, job_id="job_shrink", chunk_size=2)
    args = ["download", "job_shrink", "--format", "zip", "-o", "out"]
    args += api(server_factory(store), next(iter(TEST_KEYS)))
    assert cli.run(*args).returncode == 0
    for name in ("0004.jpg", "0005.jpg"):
        (source / "ant" / name).unlink()
    pack(source, store, job_id="job_shrink", chunk_size=2)
    result = cli.run(*args)
    assert result.returncode == 0, result
    chunks = cli.cwd / "out" / "job_shrink" / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == ["00000.zip", "00001.zip"]
    for name in ("00000.zip", "00001.zip"):
        assert (chunks / name).read_bytes() == (store / "job_shrink" / "chunks" / name).read_bytes()


@pytest.mark.parametrize("left", ["whole", "partial"])
def test_a_zip_download_of_chunks_listed_without_checksums_follows_a_new_version(
    cli: Cli, tmp_path: Path, server_factory: Callable[..., str], left: str
) -> None:
    """No sha256, no size: only the record of what this version wrote can tell a kept
    chunk (or a partial one, to resume) from the last version's."""
    store = tmp_path / "store"

    def publish(seed: int, version: int) -> None:
        source = make_image_folder(tmp_path / f"src{seed}", {"ant": 2}, seed=seed)
        pack(source, store, job_id="job_nosum", chunk_size=2)
        job_path = store / "job_nosum" / "job.json"
        job = json.loads(job_path.read_text())
        job["version"] = version
        for chunk in job["chunks"]:
            del chunk["sha256"], chunk["size_bytes"]
        job_path.write_text(json.dumps(job))

    publish(seed=1, version=1)
    args = ["download", "job_nosum", "--format", "zip", "-o", "out"]
    args += api(server_factory(store), next(iter(TEST_KEYS)))
    assert cli.run(*args).returncode == 0
    rerun = cli.run(*args)
    assert rerun.returncode == 0 and "already complete" in rerun.stdout, rerun
    publish(seed=2, version=2)
    chunk = cli.cwd / "out" / "job_nosum" / "chunks" / "00000.zip"
    if left == "partial":  # the last version's download stopped halfway through it
        chunk.with_name("00000.zip.part").write_bytes(chunk.read_bytes()[:1000])
        chunk.unlink()
    result = cli.run(*args)
    assert result.returncode == 0, result
    assert "already complete" not in result.stdout
    assert chunk.read_bytes() == (store / "job_nosum" / "chunks" / "00000.zip").read_bytes()


def test_a_zip_download_drops_another_versions_part_file_beside_a_chunk_it_keeps(
    cli: Cli, live_server: LiveServer
) -> None:
    """A .part left by another version's stopped download, beside a chunk of this version
    that is whole and kept, outlived every later run ("nothing of the earlier version
    outlives the new one")."""
    root, _ = download(cli, live_server.base_url, JOB_UNIFORM, "--format", "zip")
    part = root / "chunks" / "00001.zip.part"
    part.write_bytes(b"another version's head")
    _, stdout = download(cli, live_server.base_url, JOB_UNIFORM, "--format", "zip")
    assert "already complete" in stdout and not part.exists()


def test_a_numpy_skip_download_stopped_after_its_final_cut_downloads_nothing_again(
    cli: Cli,
    store: Path,
    tmp_path: Path,
    server_factory: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """finish() cuts the arrays to the images written (one skipped) before it records the
    renames: a run stopped in between made the next download every chunk again."""
    from pixcrawler import cli as cli_module
    from pixcrawler.export import _NumpyWriter

    url = server_factory(corrupt_copy(store, tmp_path, (3,)))
    out = cli.cwd / "out"
    args = ["download", JOB_UNIFORM, "-o", str(out), "--no-progress", "--on-error", "skip"]

    def stop(self: _NumpyWriter) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_NumpyWriter, "check_complete", stop)
    monkeypatch.setenv("PIXCRAWLER_CONFIG_DIR", str(cli.config_dir))
    assert cli_module.run([*args, *api(url, TEST_KEY)]) == 130
    monkeypatch.undo()
    assert len(np.load(out / JOB_UNIFORM / "X.npy.part", mmap_mode="r")) == UNIFORM_TOTAL - 1
    with FaultProxy(url) as proxy:
        root, _ = download(cli, proxy.base_url, JOB_UNIFORM, "--on-error", "skip")
        fetched = {p: n for p, n in proxy.stats.requests_by_path.items() if "/chunks/" in p}
    assert sum(fetched.values()) == 0, fetched
    assert np.load(root / "X.npy").shape == (UNIFORM_TOTAL - 1, *UNIFORM_SIZE, 3)
    assert np.load(root / "y.npy").shape == (UNIFORM_TOTAL - 1,)


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (errno.ENOSPC, "run the same command again to resume"),
        (errno.EFBIG, "choose another --output-dir or --format"),  # FAT32's 4 GiB, a ulimit
    ],
)
def test_a_full_disk_or_too_large_a_file_is_reported_with_where_and_what_to_do(
    cli: Cli,
    live_server: LiveServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    code: int,
    said: str,
) -> None:
    """A write's ENOSPC or EFBIG names no file ("[Errno 28] No space left on device", or
    "[Errno 27] File too large", alone)."""
    from pixcrawler import cli as cli_module
    from pixcrawler.export import _ZipWriter

    def failing(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_ZipWriter, "process", failing)
    monkeypatch.setenv("PIXCRAWLER_CONFIG_DIR", str(cli.config_dir))
    out = cli.cwd / "out"
    exit_code = cli_module.run(
        ["download", JOB_UNIFORM, "--format", "zip", "-o", str(out), *api(live_server)]
    )
    assert exit_code == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"Error: {os.strerror(code)} while writing under ")
    assert str(out / JOB_UNIFORM) in line and said in line


@pytest.mark.parametrize("there", ["file", "broken-link", "link-to-a-file"])
@pytest.mark.parametrize("where", ["the job's folder", "-o", "above -o"])
def test_a_file_where_the_download_folder_goes_is_a_usage_error(
    cli: Cli, live_server: LiveServer, there: str, where: str
) -> None:
    """Above the job's folder it was exit 1, "unexpected": "[Errno 20] Not a directory" or
    "[Errno 17] File exists" from the mkdir."""
    output = {"the job's folder": "out", "-o": "out", "above -o": "out/sub"}[where]
    target = cli.cwd / "out" / JOB_UNIFORM if where == "the job's folder" else cli.cwd / "out"
    target.parent.mkdir(exist_ok=True)
    if there == "file":
        target.write_text("mine")
    elif there == "broken-link":
        target.symlink_to(cli.cwd / "nowhere")
    else:
        (cli.cwd / "a-file").write_text("mine")
        target.symlink_to(cli.cwd / "a-file")
    result = cli.run("download", JOB_UNIFORM, "-o", output, *api(live_server))
    assert result.returncode == 2, result
    said = {
        "file": "is a file",
        "broken-link": "is a broken symbolic link",
        "link-to-a-file": "is a symbolic link to a file",
    }[there]
    job_folder = Path(output) / JOB_UNIFORM
    goes = (
        "the download's folder"
        if where == "the job's folder"
        else f"a folder on the way to {job_folder}"
    )
    shown_as = target.relative_to(cli.cwd)  # (as -o gave it)
    if where == "-o" and there != "broken-link":  # click's own check of -o
        assert "Directory 'out' is a file" in result.stderr, result
    else:
        assert f"Error: {shown_as} {said}, where {goes} goes" in result.stderr, result
    assert target.is_symlink() if there != "file" else target.read_text() == "mine"


def test_zip_rerun_replaces_only_a_corrupt_chunk(cli: Cli, big_job: BigJob) -> None:
    key = next(iter(TEST_KEYS))
    with FaultProxy(big_job.base_url) as proxy:
        args = ["download", BIG_JOB, "--format", "zip", "-o", "out", *api(proxy.base_url, key)]
        assert cli.run(*args).returncode == 0
        victim = cli.cwd / "out" / BIG_JOB / "chunks" / "00002.zip"
        data = bytearray(victim.read_bytes())
        data[1000] ^= 0xFF
        victim.write_bytes(bytes(data))
        proxy.reset_stats()
        result = cli.run(*args)
        assert result.returncode == 0, result
        assert proxy.stats.requests_by_path[chunk_path(2)] == 1
        assert proxy.stats.requests_by_path[chunk_path(0)] == 0
        assert proxy.stats.requests_by_path[chunk_path(1)] == 0
    check_output("zip", cli.cwd / "out" / BIG_JOB, big_job, key)


def stopped_after_chunk_0(root: Path) -> None:
    """A complete numpy download of the big job made into one stopped after its chunk 0
    (by hand, not by a kill)."""
    state = json.loads((root / ".progress.json").read_text())
    state["numpy"].update(done=[0], counts={"0": BIG_CHUNK}, complete=False)
    (root / ".progress.json").write_text(json.dumps(state))
    os.replace(root / "X.npy", root / "X.npy.part")
    os.replace(root / "y.npy", root / "y.npy.part")
    (root / "labels.json").unlink()


def test_numpy_resumes_from_a_partial_sidecar_and_staged_part(cli: Cli, big_job: BigJob) -> None:
    """Made by hand, not by a kill: chunk 0 written, chunk 1 half received."""
    key = next(iter(TEST_KEYS))
    with FaultProxy(big_job.base_url) as proxy:
        args = ["download", BIG_JOB, "-o", "out", *api(proxy.base_url, key)]
        assert cli.run(*args).returncode == 0
        root = cli.cwd / "out" / BIG_JOB
        stopped_after_chunk_0(root)
        half = big_job.chunk_sizes[1] // 2
        (root / ".partial").mkdir()
        served = big_job.store / BIG_JOB / "chunks" / "00001.zip"
        (root / ".partial" / "00001.zip.part").write_bytes(served.read_bytes()[:half])
        overhead = job_json_bytes(proxy, key)
        result = cli.run(*args)
        assert result.returncode == 0, result
        rest = big_job.chunk_sizes[1] - half + big_job.chunk_sizes[2]
        assert forwarded(proxy, overhead + rest) == overhead + rest
        assert proxy.stats.requests_by_path[chunk_path(0)] == 0
    check_output("numpy", root, big_job, key)


def test_a_start_over_stopped_midway_leaves_no_record_of_the_rows_it_zeroed(
    cli: Cli, big_job: BigJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with other options (same array shape) recreates the partial arrays, and is
    stopped before it records that: the first options' rerun must not keep its chunk 0."""
    from pixcrawler import cli as cli_module
    from pixcrawler.export import _NumpyWriter

    key = next(iter(TEST_KEYS))
    args = ["download", BIG_JOB, "-o", str(cli.cwd / "out"), *api(big_job.base_url, key)]
    assert cli.run(*args).returncode == 0
    root = cli.cwd / "out" / BIG_JOB
    stopped_after_chunk_0(root)

    reset = _NumpyWriter.reset

    def reset_then_stop(self: _NumpyWriter) -> None:
        reset(self)  # the partial arrays are zeros now
        raise KeyboardInterrupt

    monkeypatch.setattr(_NumpyWriter, "reset", reset_then_stop)
    monkeypatch.setenv("PIXCRAWLER_CONFIG_DIR", str(cli.config_dir))
    assert cli_module.run([*args, "--on-error", "skip"]) == 130
    monkeypatch.undo()

    result = cli.run(*args)
    assert result.returncode == 0, result
    check_output("numpy", root, big_job, key)


def test_a_sidecar_nested_past_the_parsers_limit_starts_the_download_over(
    cli: Cli, live_server: LiveServer
) -> None:
    args = ["download", JOB_UNIFORM, "-o", "out", *api(live_server)]
    assert cli.run(*args).returncode == 0
    root = cli.cwd / "out" / JOB_UNIFORM
    (root / ".progress.json").write_text("[" * 100_000 + "]" * 100_000)
    result = cli.run(*args)
    assert result.returncode == 0, result
    assert "already complete" not in result.stdout
    assert json.loads((root / ".progress.json").read_text())["numpy"]["complete"] is True


def test_a_changed_image_size_starts_the_numpy_download_over(
    cli: Cli, live_server: LiveServer
) -> None:
    args = ["download", JOB_UNIFORM, "-o", "out", *api(live_server)]
    assert cli.run(*args, "--image-size", "8", "8").returncode == 0
    result = cli.run(*args, "--image-size", "16", "12")
    assert result.returncode == 0, result
    assert "already complete" not in result.stdout
    assert np.load(cli.cwd / "out" / JOB_UNIFORM / "X.npy").shape == (UNIFORM_TOTAL, 16, 12, 3)


# -- progress bar ----------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
@pytest.mark.parametrize("no_progress", [False, True])
def test_progress_bar_only_on_a_terminal(
    cli: Cli, live_server: LiveServer, no_progress: bool
) -> None:
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    args = ["download", JOB_UNIFORM, "-o", "out", *api(live_server)]
    if no_progress:
        args.append("--no-progress")
    process = subprocess.Popen(
        [cli.script, *args],
        cwd=cli.cwd,
        env=cli.env(),
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    try:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        process.wait(timeout=30)
        os.close(leader)
    output = b"".join(chunks).decode("utf-8", "replace")
    assert process.returncode == 0, output
    assert "Downloaded" in output
    has_bar = "img/s" in output and "B/s" in output and "100%" in output
    assert has_bar != no_progress, output


# -- info and list ---------------------------------------------------------------------------


def test_info_prints_the_spec_layout(cli: Cli, live_server: LiveServer) -> None:
    job = json.loads((live_server.store / JOB_UNIFORM / "job.json").read_text())
    created = job["created_at"].replace("T", " ").removesuffix("Z")
    result = cli.run("info", JOB_UNIFORM, *api(live_server))
    assert result.returncode == 0, result
    size = job["size_bytes"]
    assert 1024 <= size < 1024**2
    expected = (
        f"Dataset: {JOB_UNIFORM}\n"
        "Status: completed\n"
        f"Images: {UNIFORM_TOTAL}\n"
        f"Chunks: {len(job['chunks'])}\n"
        f"Size: {size / 1024:.1f} KB\n"
        f"Created: {created}\n"
        "Labels: bird, cat, dog (3 classes)\n"
    )
    assert result.stdout == expected
    assert result.stderr == ""


@pytest.mark.parametrize(("job_id", "status", "progress"), UNFINISHED_JOBS)
def test_info_of_an_unfinished_job_shows_its_progress(
    cli: Cli, live_server: LiveServer, job_id: str, status: str, progress: float
) -> None:
    result = cli.run("info", job_id, *api(live_server))
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0] == f"Dataset: {job_id}"
    assert lines[1] == f"Status: {status} ({progress:g}%)"
    assert lines[2] == "Images: unknown"  # not "0": it lists no chunks, and no total yet
    assert [line.split(":")[0] for line in lines] == list(INFO_FIELDS)


def test_list_shows_a_table_of_my_jobs(cli: Cli, live_server: LiveServer) -> None:
    result = cli.run("list", *api(live_server))
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "IMAGES", "SIZE", "CREATED"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {JOB_UNIFORM, JOB_MIXED, *(j for j, _, _ in UNFINISHED_JOBS)}
    assert JOB_OTHER not in result.stdout
    uniform = json.loads((live_server.store / JOB_UNIFORM / "job.json").read_text())
    assert re.search(
        rf"^{JOB_UNIFORM}\s+uniform\s+completed\s+{UNIFORM_TOTAL}\s+"
        rf"{uniform['size_bytes'] / 1024:.1f} KB\s+\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d$",
        rows[JOB_UNIFORM],
    ), rows[JOB_UNIFORM]
    assert "running (42.5%)" in rows["job_running"]
    header = lines[0]
    for line in lines[1:]:  # columns line up: every CREATED value starts under its header
        assert line.index(re.findall(r"\d{4}-\d\d-\d\d", line)[0]) == header.index("CREATED")


def test_list_reads_every_page(
    cli: Cli, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    store = tmp_path / "many"
    for n in range(57):  # more than one page of 50
        write_job(store, f"job_{n:03d}", status="pending", progress=0)
    base_url = server_factory(store)
    result = cli.run("list", *api(base_url, next(iter(TEST_KEYS))))
    assert result.returncode == 0, result
    ids = {line.split()[0] for line in result.stdout.splitlines()[1:]}
    assert ids == {f"job_{n:03d}" for n in range(57)}


class _ListingEditor(_LoopbackHost):
    """The reference server at ``upstream``, its job listings edited by ``edit`` (as
    another API might write them)."""

    def __init__(
        self,
        upstream: str,
        edit: Callable[[dict[str, Any]], None],
        page_size: int | None = None,
    ) -> None:
        pool = urllib3.PoolManager(retries=False)

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                path = self.path
                if page_size is not None:  # a server keeping to its own page size
                    path = re.sub(r"size=\d+", f"size={page_size}", path)
                answer = pool.request("GET", upstream + path, headers=dict(self.headers))
                body = answer.data
                if self.path.startswith("/api/v1/jobs?"):
                    data = json.loads(body)
                    edit(data)
                    body = json.dumps(data).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._listen(Handler, "127.0.0.1")


@pytest.mark.parametrize("page_size", [None, 20], ids=["pages-as-asked", "pages-of-20"])
@pytest.mark.parametrize(
    "drop", [("pages",), ("pages", "total"), ("pages", "total", "size")], ids="-".join
)
def test_list_reads_every_page_of_a_listing_that_does_not_count_its_pages(
    cli: Cli,
    tmp_path: Path,
    server_factory: Callable[..., str],
    drop: tuple[str, ...],
    page_size: int | None,
) -> None:
    """Without ``pages`` the listing stopped after the first page, and exited 0; and so
    it did where the server keeps to pages smaller than asked for."""
    store = tmp_path / "many"
    for n in range(120):  # pages of 50: two full, one short
        write_job(store, f"job_{n:03d}", status="pending", progress=0)

    def edit(data: dict[str, Any]) -> None:
        data["pages"] = None
        for name in drop[1:]:
            del data[name]

    with _ListingEditor(server_factory(store), edit, page_size) as front:
        result = cli.run("list", *api(front.base_url, next(iter(TEST_KEYS))))
    assert result.returncode == 0, result
    ids = {line.split()[0] for line in result.stdout.splitlines()[1:]}
    assert ids == {f"job_{n:03d}" for n in range(120)}


def test_list_shows_every_job_but_one_the_api_listed_oddly(
    cli: Cli, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """One summary the SDK cannot read failed the whole listing."""
    store = tmp_path / "jobs"
    for n in range(3):
        write_job(store, f"job_{n}", status="pending", progress=0)

    def edit(data: dict[str, Any]) -> None:
        data["items"][0]["total_images"] = "ten"

    with _ListingEditor(server_factory(store), edit) as front:
        result = cli.run("list", *api(front.base_url, next(iter(TEST_KEYS))))
    assert result.returncode == 0, result
    assert len(result.stdout.splitlines()) == 1 + 2
    assert "Warning: a job the API listed is left out: " in result.stderr
    assert "total_images 'ten' is not a whole number" in result.stderr


def test_list_of_nothing_says_so(
    cli: Cli, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    (tmp_path / "empty").mkdir()
    base_url = server_factory(tmp_path / "empty")
    result = cli.run("list", *api(base_url, next(iter(TEST_KEYS))))
    assert (result.returncode, result.stdout) == (0, "No datasets.\n")


# -- exit codes ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["serve", "--store", "store"], ["demo"]])
def test_a_command_without_its_extra_exits_2_naming_it(
    cli: Cli, tmp_path: Path, command: list[str]
) -> None:
    """It exited 1, which the exit codes keep for a bug."""
    shadow = tmp_path / "without-fastapi"
    shadow.mkdir()
    (shadow / "fastapi.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'fastapi'\", name='fastapi')\n"
    )
    result = cli.run(*command, PYTHONPATH=os.pathsep.join([str(shadow), str(SRC)]))
    assert result.returncode == 2, result
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result
    assert 'pip install "pixcrawler-sdk[' in result.stderr, result


@pytest.mark.parametrize("command", [["list"], ["info", JOB_UNIFORM], ["download", JOB_UNIFORM]])
def test_a_rejected_key_exits_3(cli: Cli, live_server: LiveServer, command: list[str]) -> None:
    result = cli.run(*command, *api(live_server, SECRET))
    assert result.returncode == 3, result
    assert result.stderr.startswith("Error: ") and "rejected" in result.stderr
    assert SECRET not in result.output


def test_no_key_anywhere_exits_3_and_says_how_to_give_one(
    cli: Cli, live_server: LiveServer
) -> None:
    result = cli.run("list", "--base-url", live_server.base_url)
    assert result.returncode == 3, result
    assert "pixcrawler login" in result.stderr and "PIXCRAWLER_API_KEY" in result.stderr


@pytest.mark.parametrize("command", ["info", "download"])
@pytest.mark.parametrize("job_id", ["job_nope", JOB_OTHER])
def test_an_unknown_job_exits_4(
    cli: Cli, live_server: LiveServer, command: str, job_id: str
) -> None:
    result = cli.run(command, job_id, *api(live_server))
    assert result.returncode == 4, result
    assert job_id in result.stderr
    assert not (cli.cwd / "datasets").exists()


@pytest.mark.parametrize(("job_id", "status", "progress"), UNFINISHED_JOBS)
def test_downloading_an_unfinished_job_exits_5_with_status_and_progress(
    cli: Cli, live_server: LiveServer, job_id: str, status: str, progress: float
) -> None:
    result = cli.run("download", job_id, *api(live_server))
    assert result.returncode == 5, result
    message = result.stderr
    assert message.startswith("Error: ") and message.count("\n") == 1
    assert status in message and f"{progress:g}%" in message
    assert not (cli.cwd / "datasets").exists()


def test_a_download_kept_waiting_on_a_chunk_says_why_without_a_progress_bar(
    live_server: LiveServer, tmp_path: Path, slow_waits: Callable[[], list[str]]
) -> None:
    """Off a terminal (CI, a pipe) or with --no-progress, a chunk that took minutes printed
    nothing at all, even with --debug: the export waited without the downloader's word."""
    from pixcrawler import export

    stall = Fault("stall", after_bytes=1000, seconds=1.0)
    schedule = FaultSchedule.script([stall], match=r"/chunks/0$")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        dataset = load_dataset(JOB_UNIFORM, live_server.api_key, proxy.base_url)
        writer = export.make_writer("zip", dataset, tmp_path / "out", None)
        todo = writer.prepare()
        progress = export.Progress(False, JOB_UNIFORM, writer, todo, dataset.stats.transfer)
        with progress:
            export.transfer(dataset, writer, todo, 2, progress)
        writer.close()
        dataset.close()
    waits = slow_waits()
    # (The first after 0.2 s, or later on a loaded machine.)
    assert any(re.match(r"waited \d+\.\d s for chunk 0: ", w) for w in waits), waits


def test_a_chunk_the_api_refuses_for_the_key_exits_3_not_7(
    cli: Cli, live_server: LiveServer
) -> None:
    """The key revoked mid-download: the API's 403 for a chunk on its own host is an
    authentication failure (it was exit 7, "integrity")."""
    schedule = FaultSchedule.script([Fault("expired")], match=r"/chunks/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        result = cli.run(
            "download", JOB_UNIFORM, "--format", "zip", *api(proxy.base_url, live_server.api_key)
        )
    assert result.returncode == 3, result
    # Chunks are fetched in parallel: whichever reaches the proxy first gets the 403.
    assert re.match(
        r"Error: Chunk \d+ could not be downloaded: .*API key was rejected", result.stderr
    ), result
    assert live_server.api_key not in result.output


def test_nothing_listening_exits_6_after_saying_each_retry(cli: Cli) -> None:
    result = cli.run("list", *api(f"http://127.0.0.1:{free_port()}", SECRET))
    assert result.returncode == 6, result
    *retries, error = result.stderr.splitlines()
    assert error.startswith("Error: ")
    assert [line.split(" in ")[0] for line in retries] == [
        f"Warning: GET /jobs: NewConnectionError; retry {n} of 3" for n in (1, 2, 3)
    ]
    assert SECRET not in result.output


def test_a_warning_goes_above_the_progress_bars_not_into_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A retry announced mid-download must not be appended to a bar's line on the terminal."""
    from tqdm.auto import tqdm

    from pixcrawler import cli as cli_module

    cli_module._log_to_stderr(debug=False)
    with tqdm(total=10, desc="job_x images", file=sys.stderr, ascii=True) as bar:
        bar.update(3)
        logging.getLogger("pixcrawler").warning("chunk 3: HTTP 503; retry 1 of 3 in 0.4 s")
    err = capsys.readouterr().err
    above, _, below = err.partition("\n")
    assert above.split("\r")[-1] == "Warning: chunk 3: HTTP 503; retry 1 of 3 in 0.4 s", err
    assert below.lstrip("\r").startswith("job_x images:  30%"), err  # the bar, drawn below it


def test_a_chunk_corrupt_twice_exits_7(cli: Cli, live_server: LiveServer) -> None:
    corrupt = Fault("corrupt", offset=100)
    schedule = FaultSchedule.script([corrupt, corrupt], match=r"/chunks/")
    with FaultProxy(live_server.base_url, schedule=schedule) as proxy:
        args = ["download", JOB_UNIFORM, "--format", "zip", "--max-workers", "1"]
        result = cli.run(*args, *api(proxy.base_url, live_server.api_key))
    assert result.returncode == 7, result
    assert "corrupt" in result.stderr.splitlines()[-1]
    assert not (cli.cwd / "datasets" / JOB_UNIFORM / "chunks" / "00000.zip").exists()


@pytest.fixture
def bad_archive_server(tmp_path: Path, server_factory: Callable[..., str]) -> str:
    """A completed job whose only chunk is not a zip (with the right sha256)."""
    store = tmp_path / "bad"
    data = b"this is not a zip archive" * 10
    (store / "job_bad" / "chunks").mkdir(parents=True)
    (store / "job_bad" / "chunks" / "00000.zip").write_bytes(data)
    job = {
        "id": "job_bad", "name": "bad", "status": "completed", "progress": 100,
        "created_at": "2025-10-30T12:00:00Z", "total_images": 1, "chunk_size": 1,
        "size_bytes": len(data), "labels": ["x"], "image_size": [8, 8], "owner": "default",
        "chunks": [{"index": 0, "size_bytes": len(data), "image_count": 1,
                    "sha256": hashlib.sha256(data).hexdigest()}],
    }  # fmt: skip
    (store / "job_bad" / "job.json").write_text(json.dumps(job))
    return server_factory(store)


@pytest.mark.parametrize("fmt", ["numpy", "images"])
def test_a_malformed_archive_exits_8(cli: Cli, bad_archive_server: str, fmt: str) -> None:
    key = next(iter(TEST_KEYS))
    result = cli.run("download", "job_bad", "--format", fmt, *api(bad_archive_server, key))
    assert result.returncode == 8, result
    assert "not a valid zip" in result.stderr
    assert not list((cli.cwd / "datasets").rglob("X.npy")) + list(
        (cli.cwd / "datasets").rglob("metadata.jsonl")
    )


def test_a_corrupt_image_in_a_numpy_download_exits_8_naming_it(
    cli: Cli, live_server: LiveServer, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """An image that passes its sha256 but does not decode stops ``--format numpy`` with the
    chunk and the image named, and leaves no array behind."""
    store = corrupt_copy(live_server.store, tmp_path / "corrupt", (3,))
    with zipfile.ZipFile(store / JOB_UNIFORM / "chunks" / "00000.zip") as chunk:
        bad = json.loads(chunk.read("manifest.json"))["images"][3]["id"]
    key = next(iter(TEST_KEYS))
    result = cli.run("download", JOB_UNIFORM, "--format", "numpy", *api(server_factory(store), key))
    assert result.returncode == 8, result
    assert f"chunk 0, image {bad!r}: cannot decode image" in result.stderr
    assert not list((cli.cwd / "datasets").rglob("X.npy"))


def assert_arrays_hold(
    root: Path, good: list[tuple[np.ndarray, str]]
) -> tuple[np.ndarray, np.ndarray]:
    """X.npy, y.npy and labels.json in ``root`` hold exactly ``good``'s images and labels;
    returns X and y."""
    X, y = np.load(root / "X.npy"), np.load(root / "y.npy")
    labels = json.loads((root / "labels.json").read_text())
    assert X.shape == (len(good), *UNIFORM_SIZE, 3) and y.shape == (len(good),)
    for row, (image, label) in enumerate(good):
        np.testing.assert_array_equal(X[row], image)
        assert labels[y[row]] == label
    return X, y


@pytest.mark.parametrize("counts", ["listed", "not listed"])
def test_on_error_skip_leaves_corrupt_images_out_of_a_numpy_download(
    cli: Cli,
    live_server: LiveServer,
    tmp_path: Path,
    server_factory: Callable[..., str],
    counts: str,
) -> None:
    """One bad image must not cost a long download: --on-error skip writes every other
    image, in order, names the ones left out, and a rerun resumes with the same layout."""
    bad = (3, 16, 17, UNIFORM_TOTAL - 1)  # one mid-chunk, a chunk's first two, the last
    store = corrupt_copy(live_server.store, tmp_path / "corrupt", bad)
    if counts == "not listed":
        store = copy_without_counts(store, tmp_path / "uncounted")
    url = server_factory(store)
    key = next(iter(TEST_KEYS))
    args = ["download", JOB_UNIFORM, "--on-error", "skip", "--no-progress", *api(url, key)]
    reference = load_dataset(JOB_UNIFORM, key, url, on_error="skip")
    good = [(image.copy(), label) for image, label in reference]
    skipped_ids = list(reference.stats.skipped_ids)
    assert len(good) == UNIFORM_TOTAL - len(bad)

    result = cli.run(*args)
    assert result.returncode == 0, result
    root = cli.cwd / "datasets" / JOB_UNIFORM
    assert f"; {len(bad)} corrupt images left out;" in result.stdout
    for sample_id in skipped_ids:
        assert f"image {sample_id!r}: cannot decode image" in result.stderr
    X, y = assert_arrays_hold(root, good)

    if counts == "listed":  # as a run stopped after chunk 1 leaves it: rerun resumes
        done = {"0": UNIFORM_CHUNK_SIZE - 1, "1": UNIFORM_CHUNK_SIZE - 2}
        state = json.loads((root / ".progress.json").read_text())
        state["numpy"].update(done=[0, 1], counts=done, skipped={"0": 1, "1": 2}, complete=False)
        (root / ".progress.json").write_text(json.dumps(state))
        rows = sum(done.values())
        for name, array in (("X", X), ("y", y)):
            part = np.lib.format.open_memmap(
                root / f"{name}.npy.part", "w+", array.dtype, (UNIFORM_TOTAL, *array.shape[1:])
            )
            part[:rows] = array[:rows]
            part.flush()
            del part
            (root / f"{name}.npy").unlink()
        with FaultProxy(url) as proxy:
            assert cli.run(*args[:-4], *api(proxy.base_url, key)).returncode == 0
            requested = proxy.stats.requests_by_path
            assert requested[f"/api/v1/jobs/{JOB_UNIFORM}/chunks/1"] == 0
            assert requested[f"/api/v1/jobs/{JOB_UNIFORM}/chunks/2"] == 1
        np.testing.assert_array_equal(np.load(root / "X.npy"), X)
        np.testing.assert_array_equal(np.load(root / "y.npy"), y)

    # Without --on-error skip the same folder is another layout: started over, exit 8.
    assert cli.run("download", JOB_UNIFORM, *api(url, key)).returncode == 8
    assert cli.run(*args).returncode == 0
    np.testing.assert_array_equal(np.load(root / "X.npy"), X)


def test_on_error_is_for_numpy_only(cli: Cli, live_server: LiveServer) -> None:
    result = cli.run("download", JOB_UNIFORM, "--format", "zip", "--on-error", "skip")
    assert result.returncode == 2 and "--on-error applies to --format numpy only" in result.stderr


@pytest.mark.parametrize("where", ["before the command", "after it"])
def test_debug_adds_a_traceback(cli: Cli, live_server: LiveServer, where: str) -> None:
    plain = cli.run("info", "job_nope", *api(live_server))
    if where == "before the command":
        debug = cli.run("--debug", "info", "job_nope", *api(live_server))
    else:
        debug = cli.run("info", "job_nope", *api(live_server), "--debug")
    assert plain.returncode == debug.returncode == 4
    assert "Traceback" not in plain.stderr and plain.stderr.count("\n") == 1
    assert "Traceback" in debug.stderr and "NotFoundError" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.strip()


# -- the key -----------------------------------------------------------------------------------


@pytest.fixture
def secret_server(packed: PackedStore, server_factory: Callable[..., str]) -> str:
    """The shared store behind a server whose key is :data:`SECRET`."""
    return server_factory(packed.store, keys={SECRET: "default"})


def test_the_key_is_never_printed(cli: Cli, secret_server: str, live_server: LiveServer) -> None:
    url = ["--base-url", secret_server]
    runs = [
        cli.run("login", "--api-key", SECRET),
        cli.run("--debug", "list", *url),
        cli.run("--debug", "info", JOB_UNIFORM, *url),
        cli.run("--debug", "info", "job_nope", *url),
        cli.run("--debug", "download", "job_running", *url),
        cli.run("--debug", "download", JOB_UNIFORM, "--format", "zip", *url),
        cli.run("--debug", "download", JOB_MIXED, *url),  # exit 2: needs --image-size
        cli.run("--debug", "list", "--base-url", live_server.base_url),  # rejected
        cli.run("--debug", "list", "--api-key", SECRET, "--base-url", live_server.base_url),
        cli.run("--debug", "list", "--base-url", f"http://127.0.0.1:{free_port()}"),
        cli.run("--debug", "list", *url, PIXCRAWLER_API_KEY=SECRET),
        cli.run("info", JOB_UNIFORM, *url, "--debug"),
        cli.run("download", "--help", PIXCRAWLER_API_KEY=SECRET),
        cli.run("login", "--help"),
    ]
    codes = [r.returncode for r in runs]
    assert codes == [0, 0, 0, 4, 5, 0, 2, 3, 3, 6, 0, 0, 0, 0], "\n".join(map(str, runs))
    for result in runs:
        assert SECRET not in result.output, result
        assert "***" not in result.output, result  # not even redacted: never formatted in
    assert SECRET in (cli.config_dir / "credentials.json").read_text()


def test_a_key_with_a_stray_line_end_works_and_one_with_control_characters_is_refused_unquoted(
    cli: Cli, secret_server: str
) -> None:
    """A key read from a CRLF file (`$(cat key.txt)`) ends in \r: trimmed, it works. One
    with a control character inside is refused before any request, without quoting it
    (the HTTP layer's error would show it escaped, where plain redaction misses it)."""
    url = ["--base-url", secret_server]
    assert cli.run("info", JOB_UNIFORM, *url, PIXCRAWLER_API_KEY=SECRET + "\r").returncode == 0
    assert cli.run("info", JOB_UNIFORM, *url, "--api-key", SECRET + "\n").returncode == 0
    broken = SECRET[:8] + "\r" + SECRET[8:]
    for result in (
        cli.run("--debug", "info", JOB_UNIFORM, *url, PIXCRAWLER_API_KEY=broken),
        cli.run("--debug", "download", JOB_UNIFORM, *url, "--api-key", broken),
    ):
        assert result.returncode == 3, result
        assert "control characters" in result.stderr
        assert SECRET[8:] not in result.output and SECRET[:8] not in result.output, result
    with pytest.raises(AuthenticationError, match="control characters") as info:
        load_dataset(JOB_UNIFORM, api_key=broken, base_url=secret_server)
    assert SECRET[8:] not in str(info.value)


def test_job_fields_a_server_fills_with_the_key_are_scrubbed_on_stdout(
    cli: Cli, packed: PackedStore, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    shutil.copytree(packed.store / JOB_UNIFORM, tmp_path / JOB_UNIFORM)
    job_path = tmp_path / JOB_UNIFORM / "job.json"
    job = json.loads(job_path.read_text())
    job_path.write_text(json.dumps({**job, "name": SECRET, "labels": [*job["labels"], SECRET]}))
    url = ["--api-key", SECRET, "--base-url", server_factory(tmp_path, keys={SECRET: "default"})]
    for result in (cli.run("info", JOB_UNIFORM, *url), cli.run("list", *url)):
        assert result.returncode == 0, result
        assert SECRET not in result.output and "***" in result.stdout, result


def test_login_writes_a_private_file_that_later_commands_use(cli: Cli, secret_server: str) -> None:
    assert cli.run("info", JOB_UNIFORM, "--base-url", secret_server).returncode == 3
    result = cli.run("login", input=SECRET + "\n")  # stdin is not a terminal: read a line
    assert result.returncode == 0, result
    path = cli.config_dir / "credentials.json"
    assert str(path) in result.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SECRET not in result.output
    info = cli.run("info", JOB_UNIFORM, "--base-url", secret_server)
    assert info.returncode == 0, info
    assert info.stdout.startswith(f"Dataset: {JOB_UNIFORM}\n")
    # The environment still wins over the saved key, and login says so.
    result = cli.run("login", "--api-key", SECRET, PIXCRAWLER_API_KEY="another-key")
    assert "takes precedence" in result.stderr
    assert cli.run("login", input="\n").returncode == 2


def test_a_credentials_file_nested_past_the_parsers_limit_is_no_key(
    cli: Cli, secret_server: str
) -> None:
    cli.config_dir.mkdir(parents=True, exist_ok=True)
    (cli.config_dir / "credentials.json").write_text("[" * 100_000 + "]" * 100_000)
    result = cli.run("info", JOB_UNIFORM, "--base-url", secret_server)
    assert result.returncode == 3, result
    assert "PIXCRAWLER_API_KEY" in result.stderr and "Traceback" not in result.stderr


def test_login_saves_no_key_later_commands_would_refuse_and_reads_past_a_bom(
    cli: Cli, secret_server: str
) -> None:
    """``abc def`` or a non-ASCII key were saved, then refused by every command (exit 3);
    a key file a Windows editor saved with a byte-order mark was saved with it."""
    path = cli.config_dir / "credentials.json"
    for bad in ("abc def", "ключ-0123456789"):
        result = cli.run("login", input=bad + "\n")
        assert result.returncode == 2 and "not saved" in result.stderr, result
        assert bad not in result.output and not path.exists()
    assert cli.run("login", input="\ufeff" + SECRET + "\r\n").returncode == 0
    assert json.loads(path.read_text())["api_key"] == SECRET
    path.write_text(json.dumps({"api_key": SECRET}), encoding="utf-8-sig")  # BOM: read too
    assert cli.run("info", JOB_UNIFORM, "--base-url", secret_server).returncode == 0
    path.write_text("{not json")
    result = cli.run("info", JOB_UNIFORM, "--base-url", secret_server)
    assert result.returncode == 3 and "holds none that can be read" in result.stderr, result


@pytest.mark.parametrize("quoted", [f'"{SECRET}"', f"'{SECRET}'", f' " {SECRET} "\r'])
def test_login_saves_a_key_copied_with_its_quotes_without_them(
    cli: Cli, secret_server: str, quoted: str
) -> None:
    """A key copied from a .env or JSON file was saved quoted, and every command got 401."""
    assert cli.run("login", input=quoted + "\n").returncode == 0
    assert json.loads((cli.config_dir / "credentials.json").read_text())["api_key"] == SECRET
    assert cli.run("info", JOB_UNIFORM, "--base-url", secret_server).returncode == 0
    env = {"PIXCRAWLER_API_KEY": quoted}  # as Docker's --env-file passes it on
    assert cli.run("info", JOB_UNIFORM, "--base-url", secret_server, **env).returncode == 0


@pytest.mark.parametrize("blank", [" ", "\r", '""'])
def test_a_blank_key_in_the_environment_leaves_the_saved_key_in_use(
    cli: Cli, secret_server: str, blank: str
) -> None:
    """PIXCRAWLER_API_KEY=$'\\r' (a CRLF .env file) hid the saved key, and the error then
    blamed the login file, which a new login did not mend."""
    result = cli.run("login", input=SECRET + "\n", PIXCRAWLER_API_KEY=blank)
    assert result.returncode == 0 and "takes precedence" not in result.stderr, result
    result = cli.run("info", JOB_UNIFORM, "--base-url", secret_server, PIXCRAWLER_API_KEY=blank)
    assert result.returncode == 0, result


def test_run_returns_its_exit_code_when_the_reader_of_its_output_is_gone() -> None:
    """run() is documented to return the exit code; click's EPIPE handling raised
    SystemExit through it."""
    script = textwrap.dedent(
        """
        import os, sys
        read, write = os.pipe()
        os.close(read)
        os.dup2(write, 1)
        from pixcrawler.cli import run
        try:
            print("returned", run(["--version"]), file=sys.stderr)
        except SystemExit as exc:
            print("SystemExit", exc.code, file=sys.stderr)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50
    )
    assert done.stderr.splitlines()[-1] == "returned 1", done


@pytest.mark.parametrize("command", ["info", "download"])
def test_the_key_given_as_the_job_id_is_never_sent(
    cli: Cli, secret_server: str, command: str
) -> None:
    """`pixcrawler info <key>` (the job id forgotten) put the key in a URL's path, where
    access logs keep it."""
    assert cli.run("login", input=SECRET + "\n").returncode == 0
    result = cli.run(command, SECRET, "--base-url", secret_server)
    assert result.returncode == 2, result
    assert "job_id is an API key" in result.stderr and SECRET[:8] not in result.output


def test_login_with_stdin_closed_is_a_usage_error(cli: Cli) -> None:
    """Started with stdin closed (``<&-``), it failed on an AttributeError, exit 1."""
    done = subprocess.run(
        ["bash", "-c", f'"{cli.script}" login <&-'],
        cwd=cli.cwd,
        env=cli.env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 2, done
    assert "no API key given" in done.stderr and "Error" not in done.stderr[6:], done


def test_login_writes_through_no_planted_link_and_makes_its_folder_private(
    cli: Cli, tmp_path: Path
) -> None:
    """The key went to a fixed ``credentials.tmp``, through any link planted there, and the
    folder took the umask's mode (0777 under ``umask 000``)."""
    folder = tmp_path / "fresh" / "pixcrawler"
    result = cli.run("login", input=SECRET + "\n", PIXCRAWLER_CONFIG_DIR=str(folder))
    assert result.returncode == 0, result
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    victim = tmp_path / "victim.txt"
    victim.write_text("theirs")
    (folder / "credentials.tmp").symlink_to(victim)
    result = cli.run("login", input=SECRET + "\n", PIXCRAWLER_CONFIG_DIR=str(folder))
    assert result.returncode == 0, result
    assert victim.read_text() == "theirs"
    saved = folder / "credentials.json"
    assert not saved.is_symlink() and stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["api_key"] == SECRET
    assert sorted(p.name for p in folder.iterdir()) == ["credentials.json", "credentials.tmp"]


def _canned_json(status: int, data: object) -> CannedHost:
    return CannedHost(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


@pytest.mark.parametrize(("status", "code"), [(401, 3), (404, 4)])
def test_a_server_echoing_the_key_or_escapes_in_its_error_gets_neither_on_screen(
    cli: Cli, status: int, code: int
) -> None:
    """The key was scrubbed after the message was cut: a key at the cut kept its head."""
    words = "\x1b]0;OWNED\x07\x1b[2J " + "x" * (MAX_ERROR_MESSAGE - 40) + f" Bearer {SECRET}"
    with _canned_json(status, {"detail": words}) as host:
        for debug in ([], ["--debug"]):
            result = cli.run(*debug, "info", "job_x", *api(host.base_url, SECRET))
            assert result.returncode == code, result
            assert SECRET[:10] not in result.output, result
            assert "\x1b" not in result.output and "\x07" not in result.output


def test_a_status_of_the_services_own_is_a_job_not_complete_not_a_malformed_one(
    cli: Cli,
) -> None:
    """The real service writes "in_progress": DESIGN.md's "any status but completed" is
    exit 5 for download (it was 1, "malformed job"), and info shows it (exit 0)."""
    job = {"id": "job_x", "status": "in_progress", "progress": 30}
    with _canned_json(200, job) as host:
        download = cli.run("download", "job_x", *api(host.base_url, SECRET))
        info = cli.run("info", "job_x", *api(host.base_url, SECRET))
    assert download.returncode == 5, download
    assert download.stderr == (
        "Error: Job job_x is not completed (status 'in_progress', 30% complete); "
        "try again when it is completed.\n"
    )
    assert info.returncode == 0, info
    assert "Status: in_progress (30%)" in info.stdout.splitlines()


def test_a_key_a_server_echoes_in_a_jobs_name_is_scrubbed_before_the_name_is_cut(
    cli: Cli,
) -> None:
    """``list`` cuts long names to its column, then scrubbed the key: its head showed."""
    name = "n" * 20 + SECRET
    page = {"items": [{"id": "job_1", "name": name, "status": "completed", "progress": 100}]}
    with _canned_json(200, {**page, "total": 1, "page": 1, "size": 50, "pages": 1}) as host:
        result = cli.run("list", *api(host.base_url, SECRET))
    assert result.returncode == 0, result
    assert SECRET[:8] not in result.output and "n" * 20 + "***" in result.output


def test_info_shows_a_label_holding_a_line_break_on_the_labels_line(cli: Cli) -> None:
    job = {"id": "job_x", "status": "running", "progress": "nan", "labels": ["cat\nStatus: ok"]}
    with _canned_json(200, job) as host:
        result = cli.run("info", "job_x", *api(host.base_url, SECRET))
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("Status:")] == ["Status: running (0%)"]
    assert "Labels: cat?Status: ok (1 class)" in lines


def test_a_size_the_job_does_not_list_is_unknown_not_0_bytes(cli: Cli) -> None:
    """A completed job listing no size_bytes, or not for every chunk, printed ``0 B`` (or
    the listed chunks' sum) as if it were its size."""
    chunks = [{"index": 0, "url": "/c/0", "image_count": 5, "size_bytes": 2048},
              {"index": 1, "url": "/c/1", "image_count": 5}]  # fmt: skip
    job = {"id": "job_x", "status": "completed", "total_images": 10, "chunks": chunks}
    with _canned_json(200, job) as host:
        result = cli.run("info", "job_x", *api(host.base_url, SECRET))
    assert result.returncode == 0, result
    assert "Size: unknown" in result.stdout.splitlines(), result
    chunks[1]["size_bytes"] = 1024
    with _canned_json(200, job) as host:
        result = cli.run("info", "job_x", *api(host.base_url, SECRET))
    assert "Size: 3.0 KB" in result.stdout.splitlines(), result
    with _canned_json(200, {"id": "job_x", "status": "running", "progress": 40}) as host:
        result = cli.run("info", "job_x", *api(host.base_url, SECRET))
    assert "Size: unknown" in result.stdout.splitlines(), result  # not yet: not 0 B
    listing = {"items": [{"id": "job_x", "status": "completed", "total_images": 10}]}
    with _canned_json(200, listing) as host:
        result = cli.run("list", *api(host.base_url, SECRET))
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[1].split()[-3:] == ["10", "-", "-"], result


def test_list_is_newest_first_ends_on_a_page_of_nothing_new_and_fits_any_console(
    cli: Cli,
) -> None:
    """The server's order was printed under "newest first"; a server ignoring ``page`` and
    claiming 10**12 pages looped the listing; a name cp1252 cannot hold crashed it."""
    items = [
        {"id": f"job_{day}", "status": "completed", "name": name,
         "created_at": f"2026-01-0{day}T00:00:00Z"}
        for day, name in ((1, "old"), (3, "new 日本"), (2, "mid"))
    ]  # fmt: skip
    with _canned_json(200, {"items": items, "pages": 10**12, "total": 10**14}) as host:
        result = cli.run("list", *api(host.base_url, SECRET), timeout=20)
        assert result.returncode == 0, result
        assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == [
            "job_3",
            "job_2",
            "job_1",
        ]
        result = cli.run("list", *api(host.base_url, SECRET), PYTHONIOENCODING="cp1252")
        assert result.returncode == 0 and "new ??" in result.stdout, result


def test_a_base_url_of_another_scheme_is_refused_without_its_password_or_token(
    cli: Cli,
) -> None:
    result = cli.run("list", *api("ftp://user:PASSWORD@host/x?token=TOKEN", SECRET))
    assert result.returncode == 2 and "http:// or https://" in result.stderr, result
    assert "PASSWORD" not in result.output and "TOKEN" not in result.output


def at_a_terminal(cli: Cli, args: list[str], typed: bytes) -> tuple[int, bytes]:
    """Run the console script on a pseudo-terminal, type ``typed`` once it prompts; return
    its exit code and everything the terminal showed."""
    import pty
    import select

    main, secondary = pty.openpty()
    # A new session whose controlling terminal is the pty (getpass opens /dev/tty).
    takes_the_terminal = (
        "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", takes_the_terminal, cli.script, *args], cwd=cli.cwd,
        env=cli.env(), stdin=secondary, stdout=secondary, stderr=secondary,
        start_new_session=True,
    )  # fmt: skip
    os.close(secondary)
    shown = b""

    def read(until: float) -> None:
        nonlocal shown
        while time.monotonic() < until and b"key" not in shown.lower():
            if select.select([main], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):  # EIO: the process has gone
                    shown += os.read(main, 1024)

    try:
        read(time.monotonic() + 20)  # the prompt
        os.write(main, typed)
        code = process.wait(timeout=20)
        with contextlib.suppress(OSError):  # what it showed since; EIO once all is read
            while select.select([main], [], [], 0.1)[0] and (data := os.read(main, 1024)):
                shown += data
    finally:
        process.kill()
        os.close(main)
    return code, shown


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_login_at_a_terminal_hides_the_key_and_tells_ctrl_d_from_ctrl_c(cli: Cli) -> None:
    code, shown = at_a_terminal(cli, ["login"], SECRET.encode() + b"\r")
    assert code == 0 and SECRET.encode() not in shown, shown
    assert json.loads((cli.config_dir / "credentials.json").read_text())["api_key"] == SECRET
    assert at_a_terminal(cli, ["login"], b"\x03")[0] == 130  # Ctrl-C: interrupted
    code, shown = at_a_terminal(cli, ["login"], b"\x04")  # Ctrl-D: no key, was 130 too
    assert code == 2 and b"\nError: no API key given" in shown, shown


# -- pack, serve -----------------------------------------------------------------------------


def test_pack_reports_the_job_and_every_skipped_file(cli: Cli, tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "crawl", {"cat": 3, "dog": 2}, formats=("jpg", "png"))
    (src / "notes.txt").write_text("not an image")
    (src / "loose.jpg").write_bytes((src / "cat" / "0000.jpg").read_bytes())
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    if os.name == "posix":  # a name that would print as two skipped files
        (src / "dog" / "x.txt\n  fake.jpg: not an image").write_text("no")
    store = tmp_path / "store"
    args = ["pack", str(src), "--store", str(store), "--job-id", "job_cli", "--chunk-size", "2"]
    result = cli.run(*args, "--name", "my crawl")
    assert result.returncode == 0, result
    first = result.stdout.splitlines()[0]
    assert first.startswith("Packed job_cli: 5 images, 2 labels, 3 chunks (")
    skipped = 4 if os.name == "posix" else 3
    assert f"Skipped {skipped} files:" in result.stdout
    assert len(result.stdout.splitlines()) == 2 + skipped
    for path in ("notes.txt", "loose.jpg", "dog/broken.jpg"):
        assert re.search(rf"^  {re.escape(path)}: \S", result.stdout, re.MULTILINE), path
    job = json.loads((store / "job_cli" / "job.json").read_text())
    assert (job["name"], job["total_images"], len(job["chunks"])) == ("my crawl", 5, 3)

    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli.run("pack", str(empty), "--store", str(store))
    assert result.returncode == 2, result
    assert result.stderr.startswith("Error: no valid image")


@pytest.mark.parametrize("stop", ["full disk", "Ctrl-C"])
def test_a_pack_that_stops_says_nothing_is_published_and_to_run_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stop: str
) -> None:
    """It said "[Errno 28] No space left on device" (exit 1) or "interrupted": neither said
    where, nor what became of the job."""
    from pixcrawler import cli as cli_module
    from pixcrawler import packer

    src = make_image_folder(tmp_path / "crawl", {"cat": 4})
    store = tmp_path / "store"
    error = OSError(errno.ENOSPC, "No space left on device") if stop == "full disk" else None

    def stopping(*args: Any) -> Any:
        raise error if error is not None else KeyboardInterrupt

    monkeypatch.setattr(packer, "_write_chunk", stopping)
    code = cli_module.run(["pack", str(src), "--store", str(store), "--chunk-size", "2"])
    line = capsys.readouterr().err
    if stop == "full disk":
        assert code == 1 and line.startswith(
            f"Error: No space left on device while packing into {store}"
        )
    else:
        assert code == 130 and line.startswith("Error: interrupted; ")
    assert "nothing half-written is published" in line and "run the same command again" in line


@pytest.mark.parametrize("counts", ["listed", "not listed"])
def test_a_zip_download_refuses_a_chunk_without_a_sha256_that_is_no_chunk(
    cli: Cli, store: Path, tmp_path: Path, server_factory: Callable[..., str], counts: str
) -> None:
    """A CDN's login page (a captive portal) for a chunk no sha256 vouches for was kept as
    chunks/00000.zip, exit 0, and for good: it is bad data, and nothing is kept of it."""
    page = b"<html><body>Please sign in to the hotel Wi-Fi</body></html>"

    def portal(job: dict[str, Any]) -> None:
        job["chunks"][0].update(sha256=None, size_bytes=None)
        if counts == "not listed":
            drop_counts(job)

    url = server_factory(edited_copy(store, tmp_path / "portal", JOB_UNIFORM, portal))
    good = (tmp_path / "portal" / JOB_UNIFORM / "chunks" / "00000.zip").read_bytes()
    (tmp_path / "portal" / JOB_UNIFORM / "chunks" / "00000.zip").write_bytes(page)
    args = ["download", JOB_UNIFORM, "--format", "zip", "-o", "out", "--no-progress"]
    result = cli.run(*args, *api(url, TEST_KEY))
    assert result.returncode == 8, result
    assert "chunk 0" in result.stderr.lower(), result
    assert not (cli.cwd / "out" / JOB_UNIFORM / "chunks" / "00000.zip").exists()
    (tmp_path / "portal" / JOB_UNIFORM / "chunks" / "00000.zip").write_bytes(good)
    result = cli.run(*args, *api(url, TEST_KEY))
    assert result.returncode == 0, result
    assert (cli.cwd / "out" / JOB_UNIFORM / "chunks" / "00000.zip").read_bytes() == good


def test_pack_refuses_a_chunk_size_no_reader_would_take(cli: Cli, tmp_path: Path) -> None:
    """A reader takes at most MAX_MEMBERS members in a chunk, its manifest among them."""
    src = make_image_folder(tmp_path / "crawl", {"cat": 2})
    store = tmp_path / "store"
    result = cli.run("pack", str(src), "--store", str(store), "--chunk-size", str(MAX_MEMBERS))
    assert result.returncode == 2, result
    assert "--chunk-size" in result.stderr and f"1<=x<={MAX_MEMBERS - 1}" in result.stderr
    assert not store.exists()
    args = ["pack", str(src), "--store", str(store), "--chunk-size", str(MAX_MEMBERS - 1)]
    assert cli.run(*args).returncode == 0


@pytest.mark.timeout(150)
def test_serve_creates_and_announces_a_key_once_then_serves(
    cli: Cli, tmp_path: Path, packed: PackedStore
) -> None:
    store = tmp_path / "store"
    shutil.copytree(packed.store / JOB_UNIFORM, store / JOB_UNIFORM)
    port = free_port()
    process = cli.start("serve", "--store", str(store), "--port", str(port))
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.match(r"Created API key for owner 'default': (\S+)$", first.strip())
        assert match, first
        key = match.group(1)
        base_url = f"http://127.0.0.1:{port}"

        def listening() -> bool:
            try:
                return urllib3.request("GET", base_url + "/health", retries=False).status == 200
            except urllib3.exceptions.HTTPError:
                return False

        wait_for(listening, what="the server to listen")
        result = cli.run("list", *api(base_url, key))
        assert result.returncode == 0, result
        assert JOB_UNIFORM in result.stdout and key not in result.output
        assert stat.S_IMODE((store / "keys.json").stat().st_mode) == 0o600
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=15)
        finally:
            process.kill()
    # A second start finds the key and does not print it again.
    process = cli.start("serve", "--store", str(store), "--port", str(free_port()))
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("Serving ")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            out, _ = process.communicate(timeout=15)
        finally:
            process.kill()
    assert key not in out


# -- a job that changes between downloads ----------------------------------------------------


def _versioned_job(tmp_path: Path, labels: dict[str, int], seed: int, chunk_size: int) -> Path:
    """job_v in ``tmp_path/store``, (re)packed from fresh images: a new version each call."""
    src = make_image_folder(tmp_path / f"src{seed}", labels, seed=seed)
    pack(src, tmp_path / "store", job_id="job_v", chunk_size=chunk_size)
    return tmp_path / "store"


def test_numpy_of_an_image_of_another_size_than_the_job_lists_is_refused_not_stretched(
    cli: Cli, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """The job says 32x48; one image is 20x20. The decoder was told to resize to the job's
    size, so the image came out stretched into X.npy, exit 0."""
    src = make_image_folder(tmp_path / "src", {"cat": 3})
    save_image(make_image("cat", (20, 20), index=9), src / "cat" / "odd.jpg")
    pack(src, tmp_path / "store", job_id="job_v", chunk_size=2)
    job_file = tmp_path / "store" / "job_v" / "job.json"
    job = json.loads(job_file.read_text())
    assert job["image_size"] is None  # (the packer says they differ)
    job_file.write_text(json.dumps({**job, "image_size": [32, 48]}))  # another producer lies
    url = api(server_factory(tmp_path / "store"), TEST_KEY)
    result = cli.run("download", "job_v", "--format", "numpy", "-o", "out", *url)
    assert result.returncode == 8, result
    assert "image 'cat/odd.jpg' is 20x20, not 48x32 as the job says" in result.stderr
    assert not (cli.cwd / "out" / "job_v" / "X.npy").exists()
    sized = cli.run(
        "download", "job_v", "--format", "numpy", "-o", "sized", "--image-size", "32", "48", *url
    )
    assert sized.returncode == 0, sized  # resized as asked, every image
    assert np.load(cli.cwd / "sized" / "job_v" / "X.npy").shape == (4, 32, 48, 3)


def test_a_zip_part_of_an_earlier_version_is_not_resumed_by_the_next(
    cli: Cli, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """A zip download of version 1 stopped mid-chunk; version 2 re-packs that chunk. Its
    chunks list a sha256, so no record was kept, and version 2 resumed version 1's head:
    "corrupt", a download from byte 0, and the chunk's one re-download spent."""
    store = _versioned_job(tmp_path, {"cat": 3, "dog": 3}, seed=1, chunk_size=2)
    url = api(server_factory(store), TEST_KEY)
    assert cli.run("download", "job_v", "--format", "zip", *url).returncode == 0
    chunks = cli.cwd / "datasets" / "job_v" / "chunks"
    head = (chunks / "00001.zip").read_bytes()[:1000]
    (chunks / "00001.zip").unlink()
    (chunks / "00001.zip.part").write_bytes(head)  # as a stopped version 1 run leaves it
    _versioned_job(tmp_path, {"cat": 3, "dog": 3}, seed=2, chunk_size=2)
    result = cli.run("download", "job_v", "--format", "zip", *url)
    assert result.returncode == 0, result
    assert "chunk 1 corrupt" not in result.stderr, result.stderr  # (0 and 2: "stale")
    served = store / "job_v" / "chunks" / "00001.zip"
    assert (chunks / "00001.zip").read_bytes() == served.read_bytes()


@pytest.mark.parametrize("fmt", ["numpy", "images"])
def test_a_rerun_of_a_complete_download_removes_a_staging_folder_left_behind(
    cli: Cli, live_server: LiveServer, fmt: str
) -> None:
    """A run stopped after marking the download complete, before deleting .partial/,
    left it there for good: the "already complete" path never removed it."""
    url = api(live_server)
    assert cli.run("download", JOB_UNIFORM, "--format", fmt, *url).returncode == 0
    staging = cli.cwd / "datasets" / JOB_UNIFORM / ".partial"
    staging.mkdir()
    again = cli.run("download", JOB_UNIFORM, "--format", fmt, *url)
    assert again.returncode == 0 and "already complete" in again.stdout, again
    assert not staging.exists()


def test_a_complete_zip_folder_on_a_read_only_mount_is_complete(
    live_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlinking a .part that is not there fails there too (EROFS, not ENOENT): the rerun
    of a complete download said "Read-only file system" (exit 1), not "already complete"."""
    from pixcrawler import export

    def download() -> export.Writer:
        dataset = load_dataset(JOB_UNIFORM, live_server.api_key, live_server.base_url)
        writer = export.make_writer("zip", dataset, tmp_path / "out", None)
        todo = writer.prepare()
        if todo:
            progress = export.Progress(False, JOB_UNIFORM, writer, todo, dataset.stats.transfer)
            with progress:
                export.transfer(dataset, writer, todo, 2, progress)
            writer.finish()
        writer.close()
        dataset.close()
        return writer

    download()

    def read_only(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    again = download()
    assert again.complete and again.done_images == 0  # nothing to do


def test_labels_one_but_for_unicode_normalisation_never_share_a_file_name(
    cli: Cli, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """``café`` composed and decomposed are two folders here, one on APFS (and on NTFS
    ``Cat`` and ``cat`` are one): their ``0000.jpg`` must not overwrite each other."""
    import unicodedata

    labels = {"caf\u00e9": 2, "cafe\u0301": 2}
    store = _versioned_job(tmp_path, labels, seed=3, chunk_size=4)
    url = api(server_factory(store), TEST_KEY)
    assert cli.run("download", "job_v", "--format", "images", "-o", "out", *url).returncode == 0
    root = cli.cwd / "out" / "job_v"
    files = [
        json.loads(line)["file"] for line in (root / "metadata.jsonl").read_text().splitlines()
    ]
    assert len(files) == 4
    assert len({unicodedata.normalize("NFC", f).casefold() for f in files}) == 4


def test_a_new_version_of_the_job_leaves_nothing_of_the_old_one(
    cli: Cli, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """Re-packed with fewer chunks, a label gone and one renamed in case only (cat -> Cat):
    the zip folder holds only the chunks listed now, the images folder only the files its
    metadata.jsonl lists."""
    store = _versioned_job(tmp_path, {"cat": 3, "dog": 3}, seed=1, chunk_size=2)
    url = api(server_factory(store), TEST_KEY)
    for fmt in ("zip", "images"):
        assert cli.run("download", "job_v", "--format", fmt, "-o", fmt, *url).returncode == 0
    _versioned_job(tmp_path, {"Cat": 3}, seed=2, chunk_size=3)
    for fmt in ("zip", "images"):
        result = cli.run("download", "job_v", "--format", fmt, "-o", fmt, *url)
        assert result.returncode == 0, result
    chunks = sorted(p.name for p in (cli.cwd / "zip" / "job_v" / "chunks").iterdir())
    assert chunks == ["00000.zip"]
    root = cli.cwd / "images" / "job_v"
    listed = {
        json.loads(line)["file"] for line in (root / "metadata.jsonl").read_text().splitlines()
    }
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert on_disk - {"metadata.jsonl", ".progress.json", ".download.lock"} == listed
    assert not (root / "dog").exists()


def test_a_zip_rerun_of_a_new_version_that_fails_keeps_the_chunks_it_no_longer_lists(
    cli: Cli, server_factory: Callable[..., str], tmp_path: Path
) -> None:
    """Version 2 lists two chunks where version 1 had three; its chunk 1 cannot be had.
    The failed rerun leaves version 1's chunk 2 in place; the one that succeeds removes it."""
    store = _versioned_job(tmp_path, {"cat": 3, "dog": 3}, seed=1, chunk_size=2)
    url = api(server_factory(store), TEST_KEY)
    assert cli.run("download", "job_v", "--format", "zip", *url).returncode == 0
    chunks = cli.cwd / "datasets" / "job_v" / "chunks"
    old_last = (chunks / "00002.zip").read_bytes()
    _versioned_job(tmp_path, {"cat": 3, "dog": 3}, seed=2, chunk_size=3)
    missing = store / "job_v" / "chunks" / "00001.zip"
    kept = missing.read_bytes()
    missing.unlink()
    assert cli.run("download", "job_v", "--format", "zip", *url).returncode != 0
    assert (chunks / "00002.zip").read_bytes() == old_last
    missing.write_bytes(kept)
    assert cli.run("download", "job_v", "--format", "zip", *url).returncode == 0
    assert sorted(p.name for p in chunks.iterdir()) == ["00000.zip", "00001.zip"]


def test_images_written_by_a_run_stopped_inside_a_chunk_go_with_their_version(
    cli: Cli,
    server_factory: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Version 1 stopped after the first file of its second chunk; version 2 has fewer
    images. That file was named in no listing, so no later run removed it."""
    from pixcrawler import export

    store = _versioned_job(tmp_path, {"cat": 3, "dog": 3}, seed=1, chunk_size=2)
    url = server_factory(store)
    root = cli.cwd / "out" / "job_v"
    real = export._write_atomic
    written: list[Path] = []

    def stop_at_the_fourth(dest: Path, *args: Any, **kwargs: Any) -> None:
        image = dest.suffix == ".jpg"  # (the sidecar is written this way too)
        if image and len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) among chunk 1's files
        real(dest, *args, **kwargs)
        if image:
            written.append(dest)

    monkeypatch.setattr(export, "_write_atomic", stop_at_the_fourth)
    dataset = load_dataset("job_v", TEST_KEY, url)
    writer = export.make_writer("images", dataset, root, None)
    todo = writer.prepare()
    progress = export.Progress(False, "job_v", writer, todo, dataset.stats.transfer)
    with pytest.raises(KeyboardInterrupt), progress:
        export.transfer(dataset, writer, todo, 1, progress)
    writer.close()
    dataset.close()
    monkeypatch.undo()
    assert written[2].exists()  # chunk 1's first file, in no committed line

    _versioned_job(tmp_path, {"cat": 2}, seed=2, chunk_size=2)
    result = cli.run("download", "job_v", "--format", "images", "-o", "out", *api(url, TEST_KEY))
    assert result.returncode == 0, result
    files = {str(p.relative_to(root)) for p in root.rglob("*.*") if p.parent != root}
    listed = {
        json.loads(line)["file"] for line in (root / "metadata.jsonl").read_text().splitlines()
    }
    assert files == listed == {"cat/0000.jpg", "cat/0001.jpg"}


@pytest.mark.parametrize("stop_before", ["y.npy", "X.npy"])
def test_an_export_stopped_before_its_outputs_take_their_names_is_not_complete(
    live_server: LiveServer,
    server_factory: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop_before: str,
) -> None:
    """Version 1 complete, version 2 stopped just before X.npy (or y.npy) is renamed: the
    next run must not call the folder complete (X.npy is still version 1's), and the
    folder meanwhile holds no labels.json naming version 2's labels beside version 1's
    label ids (a new label sorted first made every y read as another class)."""
    from pixcrawler import export

    store = _versioned_job(tmp_path, {"cat": 2, "dog": 2}, seed=1, chunk_size=2)
    base_url = server_factory(store)
    root = tmp_path / "out" / "job_v"

    def run(crash: bool = False) -> export.Writer:
        dataset = load_dataset("job_v", TEST_KEY, base_url)
        writer = export.make_writer("numpy", dataset, root, None)
        todo = writer.prepare()
        if todo:
            progress = export.Progress(False, "job_v", writer, todo, dataset.stats.transfer)
            with progress:
                export.transfer(dataset, writer, todo, 2, progress)
            if crash:
                real = os.replace

                def stop_at_x(src: Any, dst: Any) -> None:
                    if str(dst).endswith(stop_before):
                        raise KeyboardInterrupt
                    real(src, dst)

                monkeypatch.setattr(export.os, "replace", stop_at_x)
            try:
                writer.finish()
            finally:
                monkeypatch.undo()
        writer.close()
        dataset.close()
        return writer

    run()
    _versioned_job(tmp_path, {"ant": 1, "cat": 2, "dog": 2}, seed=2, chunk_size=2)
    with pytest.raises(KeyboardInterrupt):
        run(crash=True)
    assert not (root / "labels.json").exists()  # none, rather than version 2's
    assert run().complete
    expected, _ = load_dataset("job_v", TEST_KEY, base_url).to_arrays()
    np.testing.assert_array_equal(np.load(root / "X.npy"), expected)
    assert json.loads((root / "labels.json").read_text()) == ["ant", "cat", "dog"]


def test_a_new_version_on_a_disk_without_room_for_both_replaces_the_old_arrays_early(
    server_factory: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The earlier arrays are kept until the new ones are complete, where the disk has room
    for both; where it has not, they go first (with a warning) rather than the new download
    failing on every rerun."""
    from pixcrawler import export

    store = _versioned_job(tmp_path, {"cat": 2, "dog": 2}, seed=1, chunk_size=2)
    base_url = server_factory(store)
    root = tmp_path / "out" / "job_v"

    def run() -> None:
        dataset = load_dataset("job_v", TEST_KEY, base_url)
        writer = export.make_writer("numpy", dataset, root, None)
        todo = writer.prepare()
        progress = export.Progress(False, "job_v", writer, todo, dataset.stats.transfer)
        with progress:
            export.transfer(dataset, writer, todo, 2, progress)
        writer.finish()
        writer.close()
        dataset.close()

    run()
    real = export._reserve

    def room_for_one(path: Path, start: int = 0) -> None:
        if path.name == "X.npy.part" and (root / "X.npy").exists():
            raise OSError(errno.ENOSPC, f"no room for X in {path}")
        real(path, start)

    monkeypatch.setattr(export, "_reserve", room_for_one)
    _versioned_job(tmp_path, {"cat": 2, "dog": 2}, seed=2, chunk_size=2)
    with caplog.at_level(logging.WARNING, logger="pixcrawler"):
        run()
    assert "no room to keep the earlier X.npy and y.npy" in caplog.text
    expected, _ = load_dataset("job_v", TEST_KEY, base_url).to_arrays()
    np.testing.assert_array_equal(np.load(root / "X.npy"), expected)


def test_growing_arrays_again_after_a_full_disk_reserves_all_their_growth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An uncounted job's arrays grow chunk by chunk. The try that found the disk full had
    already extended X.npy.part: the retry, with the earlier arrays gone, must still
    reserve from where the file was, or the new rows stay sparse (SIGBUS on a full disk)."""
    from pixcrawler import export

    writer = object.__new__(export._NumpyWriter)
    writer.x_path, writer.y_path = tmp_path / "X.npy", tmp_path / "y.npy"
    writer.x_part, writer.y_part = tmp_path / "X.npy.part", tmp_path / "y.npy.part"
    writer.image_shape, writer.X, writer.y = (8, 8, 3), None, None
    writer._resize(1)
    held = writer.x_part.stat().st_size
    np.save(writer.x_path, np.zeros(1, np.uint8))  # an earlier version's arrays
    np.save(writer.y_path, np.zeros(1, np.int64))
    reserved: list[tuple[str, int]] = []
    real = export._reserve

    def full_while_the_old_arrays_stay(path: Path, start: int = 0) -> None:
        reserved.append((path.name, start))
        if writer.x_path.exists():
            raise OSError(errno.ENOSPC, f"no room in {path}")
        real(path, start)

    monkeypatch.setattr(export, "_reserve", full_while_the_old_arrays_stay)
    writer._resize(100)
    assert not writer.x_path.exists() and writer.X is not None and len(writer.X) == 100
    assert reserved[-2] == ("X.npy.part", held)  # the retry: from the size before the try


@pytest.mark.parametrize("stop", ["between the renames", "after the renames"])
@pytest.mark.parametrize("fmt", ["numpy", "images"])
def test_a_download_stopped_while_its_outputs_take_their_names_is_finished_not_redone(
    live_server: LiveServer,
    packed: PackedStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    stop: str,
) -> None:
    """Every chunk written, stopped before the last output took its name (numpy: y.npy
    renamed, X.npy not) or after, before the folder was recorded complete: the next run
    finishes the renames and transfers no chunk."""
    from pixcrawler import export

    root = tmp_path / "out" / JOB_UNIFORM
    last = {"numpy": "X.npy", "images": "metadata.jsonl"}[fmt]
    real = os.replace

    def stop_at_last(src: Any, dst: Any) -> None:
        if Path(dst).name == last:
            raise KeyboardInterrupt
        real(src, dst)

    def stop_now() -> None:
        raise KeyboardInterrupt

    with load_dataset(JOB_UNIFORM, TEST_KEY, live_server.base_url) as dataset:
        writer = export.make_writer(fmt, dataset, root, None)
        todo = writer.prepare()
        with export.Progress(False, JOB_UNIFORM, writer, todo, dataset.stats.transfer) as bar:
            export.transfer(dataset, writer, todo, 2, bar)
        if stop == "between the renames":
            monkeypatch.setattr(export.os, "replace", stop_at_last)
        else:
            monkeypatch.setattr(writer, "mark_complete", stop_now)
        with pytest.raises(KeyboardInterrupt):
            writer.finish()
        monkeypatch.undo()
        writer.close()

    with FaultProxy(live_server.base_url) as proxy:
        with load_dataset(JOB_UNIFORM, TEST_KEY, proxy.base_url) as dataset:
            writer = export.make_writer(fmt, dataset, root, None)
            assert writer.prepare() == [] and writer.complete
            writer.close()
        assert proxy.stats.requests == 1  # the job's metadata only
    if fmt == "numpy":
        samples = sdk_samples(live_server, JOB_UNIFORM, TEST_KEY)
        np.testing.assert_array_equal(np.load(root / "X.npy"), np.stack([i for _, i in samples]))
        assert len(np.load(root / "y.npy")) == UNIFORM_TOTAL
    else:
        assert image_files(root) == image_files(packed.sources[JOB_UNIFORM])
        assert len(metadata_records(root)) == UNIFORM_TOTAL
    assert not list(root.rglob("*.part")) and not (root / ".partial").exists()


@pytest.mark.parametrize("fmt", ["numpy", "images"])
def test_a_rerun_that_starts_over_keeps_the_complete_download_until_it_replaces_it(
    cli: Cli, store: Path, tmp_path: Path, server_factory: Callable[..., str], fmt: str
) -> None:
    """A new version of the job (or, for numpy, another --image-size or --on-error) starts
    the download over, but the earlier complete files stay until the new ones take their
    names: a rerun that stops (here at a chunk that is not a zip) leaves what was there."""
    copy = tmp_path / "served"
    shutil.copytree(store / JOB_UNIFORM, copy / JOB_UNIFORM)
    url = server_factory(copy)
    root, _ = download(cli, url, JOB_UNIFORM, "--format", fmt)
    before = {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    assert len(before) == (3 if fmt == "numpy" else UNIFORM_TOTAL + 1)

    job_path = copy / JOB_UNIFORM / "job.json"
    job = json.loads(job_path.read_text())
    data = b"this is not a zip archive" * 10
    (copy / JOB_UNIFORM / "chunks" / "00000.zip").write_bytes(data)
    job["chunks"][0].update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    job_path.write_text(json.dumps({**job, "version": 2}))
    result = cli.run("download", JOB_UNIFORM, "--format", fmt, "-o", "out", *api(url, TEST_KEY))
    assert result.returncode == 8, result
    assert {name: (root / name).read_bytes() for name in before} == before


def test_a_file_written_atomically_leaves_no_temp_file_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or a Ctrl-C) while a sidecar or an image is written: its temp file goes."""
    from pixcrawler import export

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        export._write_atomic(tmp_path / ".progress.json", b"{}")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def interrupt(src: Any, dst: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export._write_atomic(tmp_path / "a.png", b"png", tmp_path / "image.tmp", sync=False)
    assert list(tmp_path.iterdir()) == []


def test_a_second_download_into_a_folder_in_use_is_refused(
    cli: Cli, live_server: LiveServer
) -> None:
    from pixcrawler import export

    with export.exclusive(cli.cwd / "out" / JOB_UNIFORM):
        result = cli.run("download", JOB_UNIFORM, "-o", "out", *api(live_server))
    assert result.returncode == 2, result
    assert "another download is writing to" in result.stderr
    assert cli.run("download", JOB_UNIFORM, "-o", "out", *api(live_server)).returncode == 0


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges there")
def test_the_download_lock_is_the_folders_own_whatever_the_path(tmp_path: Path) -> None:
    """Locked beside the path given, two links to one folder took two locks; beside its
    real path, a folder whose parent the user cannot write (a mount point) could not be
    locked at all. The lock is a file inside the folder (a lock on the folder itself is
    no lock on NFS, which locks only files open for writing)."""
    from pixcrawler import export

    real = tmp_path / "mnt" / "ssd"
    real.mkdir(parents=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "job").symlink_to(real)
    (tmp_path / "b" / "job").symlink_to(real)
    with export.exclusive(tmp_path / "a" / "job"):
        for other in (tmp_path / "b" / "job", real):
            refused = pytest.raises(export.ExportUsageError, match="another download")
            with refused, export.exclusive(other):
                pass
    with export.exclusive(tmp_path / "b" / "job"):  # released with the block
        pass
    assert {p.name for p in tmp_path.rglob("*")} == {
        "mnt",
        "a",
        "b",
        "ssd",
        "job",
        ".download.lock",
    }
    assert (real / ".download.lock").is_file()


@pytest.mark.parametrize("fmt", ["numpy", "images"])
def test_temp_files_a_killed_download_left_are_swept_by_the_next(
    cli: Cli, live_server: LiveServer, fmt: str
) -> None:
    """kill -9 between writing a temp file and renaming it left it for good."""
    root = cli.cwd / "out" / JOB_UNIFORM
    root.mkdir(parents=True)
    left = ["..progress.json.6055-139965553904512.tmp", ".labels.json.6106-140055007751040.tmp"]
    for name in left:
        (root / name).write_bytes(b"{")
    (root / ".mine.1-2.tmp").write_bytes(b"the user's")
    result = cli.run("download", JOB_UNIFORM, "--format", fmt, "-o", "out", *api(live_server))
    assert result.returncode == 0, result
    assert not any((root / name).exists() for name in left)
    assert (root / ".mine.1-2.tmp").read_bytes() == b"the user's"


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges there")
def test_a_folder_in_use_reached_through_a_symlink_is_refused_too(
    cli: Cli, live_server: LiveServer
) -> None:
    from pixcrawler import export

    (cli.cwd / "real" / JOB_UNIFORM).mkdir(parents=True)
    (cli.cwd / "other").mkdir()
    (cli.cwd / "other" / JOB_UNIFORM).symlink_to(cli.cwd / "real" / JOB_UNIFORM)
    with export.exclusive(cli.cwd / "real" / JOB_UNIFORM):
        result = cli.run("download", JOB_UNIFORM, "-o", "other", *api(live_server))
    assert result.returncode == 2, result
    assert "another download is writing to" in result.stderr


# -- a job that lists no image counts ---------------------------------------------------------
# The wire contract lets other producers leave out a job's total_images and every chunk's
# image_count (the SDK iterates and stacks such a job all the same): every format writes it
# in full and reports the images it holds; a job that lists its counts keeps every check.

UNIFORM_CHUNKS = -(-UNIFORM_TOTAL // UNIFORM_CHUNK_SIZE)


def drop_counts_and_size(job: dict[str, Any]) -> None:
    drop_counts(job)
    del job["image_size"]


@pytest.fixture
def uncounted_url(store: Path, tmp_path: Path, server_factory: Callable[..., str]) -> str:
    """A server of job_uniform listed without ``total_images`` and chunk ``image_count``."""
    return server_factory(copy_without_counts(store, tmp_path / "uncounted"))


def test_list_and_info_call_a_count_the_job_does_not_list_unknown(
    cli: Cli, uncounted_url: str
) -> None:
    """Not "0 images" for a job of 60 whose producer listed no counts."""
    listing = cli.run("list", *api(uncounted_url, TEST_KEY))
    assert listing.returncode == 0, listing
    row = next(line for line in listing.stdout.splitlines() if line.startswith(JOB_UNIFORM))
    assert row.split()[3] == "-", row
    info = cli.run("info", JOB_UNIFORM, *api(uncounted_url, TEST_KEY))
    assert "Images: unknown" in info.stdout.splitlines(), info


def download(cli: Cli, url: str, job_id: str, *args: str) -> tuple[Path, str]:
    result = cli.run("download", job_id, "-o", "out", "--no-progress", *args, *api(url, TEST_KEY))
    assert result.returncode == 0, result
    return cli.cwd / "out" / job_id, result.stdout


def assert_numpy_equals_sdk(
    root: Path, live_server: LiveServer, job_id: str, total: int, **kwargs: object
) -> None:
    """X.npy and y.npy as the SDK iterates the (counted) job, and nothing left over."""
    X = np.load(root / "X.npy")
    y = np.load(root / "y.npy")
    labels = json.loads((root / "labels.json").read_text())
    samples = sdk_samples(live_server, job_id, live_server.api_key, **kwargs)
    assert len(samples) == total
    assert X.shape == (total, *samples[0][1].shape) and X.dtype == np.uint8
    assert y.shape == (total,) and y.dtype == np.int64
    for row, (sample, image) in enumerate(samples):
        np.testing.assert_array_equal(X[row], image)
        assert labels[y[row]] == sample.label
    assert not list(root.rglob("*.part")) and not (root / ".partial").exists()


def test_images_download_of_a_job_without_counts_writes_and_reports_every_image(
    cli: Cli, uncounted_url: str, packed: PackedStore
) -> None:
    root, stdout = download(cli, uncounted_url, JOB_UNIFORM, "--format", "images")
    assert f"{UNIFORM_TOTAL} images in {UNIFORM_CHUNKS} chunks" in stdout
    assert image_files(root) == image_files(packed.sources[JOB_UNIFORM])
    assert len((root / "metadata.jsonl").read_text().splitlines()) == UNIFORM_TOTAL
    assert not list(root.rglob("*.part")) and not (root / ".partial").exists()


def test_zip_download_of_a_job_without_counts_reports_the_images_its_manifests_hold(
    cli: Cli, uncounted_url: str, store: Path
) -> None:
    root, stdout = download(cli, uncounted_url, JOB_UNIFORM, "--format", "zip")
    assert f"{UNIFORM_TOTAL} images in {UNIFORM_CHUNKS} chunks" in stdout
    served = sorted((store / JOB_UNIFORM / "chunks").glob("*.zip"))
    assert len(served) == UNIFORM_CHUNKS
    for path in served:
        assert (root / "chunks" / path.name).read_bytes() == path.read_bytes()

    (root / "chunks" / "00001.zip").unlink()  # a rerun counts the chunks it keeps too
    root, stdout = download(cli, uncounted_url, JOB_UNIFORM, "--format", "zip")
    assert f"{UNIFORM_TOTAL} images in {UNIFORM_CHUNKS} chunks" in stdout
    assert (root / "chunks" / "00001.zip").read_bytes() == served[1].read_bytes()


@pytest.mark.parametrize("size", [None, (8, 12)], ids=["listed-size", "image-size"])
def test_numpy_download_of_a_job_without_counts_equals_the_sdk_iteration(
    cli: Cli, uncounted_url: str, live_server: LiveServer, size: tuple[int, int] | None
) -> None:
    args = ["--image-size", *map(str, size)] if size else []
    root, stdout = download(cli, uncounted_url, JOB_UNIFORM, *args)
    height, width = size or UNIFORM_SIZE
    assert f"{UNIFORM_TOTAL} images in {UNIFORM_CHUNKS} chunks" in stdout
    assert f"X.npy ({UNIFORM_TOTAL}, {height}, {width}, 3)" in stdout
    assert json.loads((root / "labels.json").read_text()) == list(UNIFORM_LABELS)
    assert_numpy_equals_sdk(root, live_server, JOB_UNIFORM, UNIFORM_TOTAL, image_size=size)


def test_numpy_download_of_a_job_listing_neither_counts_nor_size_takes_the_images_size(
    cli: Cli,
    store: Path,
    tmp_path: Path,
    server_factory: Callable[..., str],
    live_server: LiveServer,
) -> None:
    """No ``image_size`` either: nothing says the images differ, so they are not refused."""
    url = server_factory(edited_copy(store, tmp_path / "bare", JOB_UNIFORM, drop_counts_and_size))
    root, stdout = download(cli, url, JOB_UNIFORM)
    assert f"X.npy ({UNIFORM_TOTAL}, {UNIFORM_SIZE[0]}, {UNIFORM_SIZE[1]}, 3)" in stdout
    assert_numpy_equals_sdk(root, live_server, JOB_UNIFORM, UNIFORM_TOTAL)


def test_numpy_of_mixed_sizes_without_counts_or_size_stops_at_the_first_misfit(
    cli: Cli,
    store: Path,
    tmp_path: Path,
    server_factory: Callable[..., str],
    live_server: LiveServer,
) -> None:
    url = server_factory(edited_copy(store, tmp_path / "bare", JOB_MIXED, drop_counts_and_size))
    result = cli.run("download", JOB_MIXED, "-o", "out", *api(url, TEST_KEY))
    assert result.returncode == 8, result
    assert "different sizes cannot be stacked" in result.stderr
    assert "--image-size H W" in result.stderr and "--format images" in result.stderr
    assert not list((cli.cwd / "out").rglob("X.npy"))

    root, stdout = download(cli, url, JOB_MIXED, "--image-size", "24", "20")
    assert f"X.npy ({MIXED_TOTAL}, 24, 20, 3)" in stdout
    assert_numpy_equals_sdk(root, live_server, JOB_MIXED, MIXED_TOTAL, image_size=(24, 20))


@pytest.mark.parametrize(
    "rows",
    [
        {"X": UNIFORM_CHUNK_SIZE, "y": UNIFORM_CHUNK_SIZE},
        # Stopped (or out of disk) between growing X and y for chunk 1.
        {"X": 2 * UNIFORM_CHUNK_SIZE, "y": UNIFORM_CHUNK_SIZE},
        {"X": UNIFORM_CHUNK_SIZE, "y": 2 * UNIFORM_CHUNK_SIZE},
    ],
    ids=["after chunk 0", "X grown, y not", "y grown, X not"],
)
def test_numpy_download_of_a_job_without_counts_resumes_after_its_first_chunk(
    cli: Cli, uncounted_url: str, live_server: LiveServer, rows: dict[str, int]
) -> None:
    """Made by hand: the arrays as a run stopped after chunk 0 leaves them."""
    root, _ = download(cli, uncounted_url, JOB_UNIFORM)
    state = json.loads((root / ".progress.json").read_text())
    state["numpy"].update(done=[0], counts={"0": UNIFORM_CHUNK_SIZE}, complete=False)
    (root / ".progress.json").write_text(json.dumps(state))
    for name in ("X", "y"):
        kept = np.load(root / f"{name}.npy")[: rows[name]]
        with open(root / f"{name}.npy.part", "wb") as fh:
            np.save(fh, kept)
        (root / f"{name}.npy").unlink()
    (root / "labels.json").unlink()
    with FaultProxy(uncounted_url) as proxy:
        root, stdout = download(cli, proxy.base_url, JOB_UNIFORM)
        requested = proxy.stats.requests_by_path
        assert requested[f"/api/v1/jobs/{JOB_UNIFORM}/chunks/0"] == 0
        assert requested[f"/api/v1/jobs/{JOB_UNIFORM}/chunks/1"] == 1
    assert f"{UNIFORM_TOTAL} images" in stdout and "already complete" not in stdout
    assert_numpy_equals_sdk(root, live_server, JOB_UNIFORM, UNIFORM_TOTAL)


def test_numpy_download_of_a_job_of_no_images_and_no_size_is_empty_arrays(
    cli: Cli, store: Path, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """No images cannot differ in size: not the "pass --image-size" refusal."""

    def empty(job: dict[str, Any]) -> None:
        job.update(chunks=[], total_images=0, image_size=None)

    url = server_factory(edited_copy(store, tmp_path / "empty", JOB_UNIFORM, empty))
    root, _ = download(cli, url, JOB_UNIFORM)
    assert np.load(root / "X.npy").shape == (0, 0, 0, 3) and np.load(root / "y.npy").shape == (0,)


def test_the_summary_counts_images_failing_their_sha256_as_corrupt(
    cli: Cli, store: Path, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """Not "could not be decoded": these are left out for their sha256, named in stderr."""
    url = server_factory(corrupt_copy(store, tmp_path, (2, 5), image_sha256=False))
    result = cli.run(
        "download", JOB_UNIFORM, "--on-error", "skip", "--no-progress", *api(url, TEST_KEY)
    )
    assert result.returncode == 0, result
    assert "; 2 corrupt images left out;" in result.stdout
    assert result.stderr.count("sha256 does not match the manifest") == 2, result


def test_on_error_skip_takes_the_size_from_the_first_image_that_decodes(
    cli: Cli, store: Path, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """Neither counts nor size listed: the first image sets the size, so one that cannot be
    decoded must not stop a --on-error skip download. Here chunk 0 holds no good image
    and chunk 1's first is bad too; a run stopped after chunk 0 resumes all the same."""
    bad = (*range(UNIFORM_CHUNK_SIZE), UNIFORM_CHUNK_SIZE)
    corrupt = corrupt_copy(store, tmp_path / "corrupt", bad)
    url = server_factory(edited_copy(corrupt, tmp_path / "bare", JOB_UNIFORM, drop_counts_and_size))
    with load_dataset(JOB_UNIFORM, TEST_KEY, url, on_error="skip") as reference:
        good = [(image.copy(), label) for image, label in reference]
    assert len(good) == UNIFORM_TOTAL - len(bad)

    root, stdout = download(cli, url, JOB_UNIFORM, "--on-error", "skip")
    assert f"; {len(bad)} corrupt images left out;" in stdout
    assert_arrays_hold(root, good)

    # As a run stopped after chunk 0 leaves it: no image yet to give the arrays a size.
    state = json.loads((root / ".progress.json").read_text())
    skipped = {"0": UNIFORM_CHUNK_SIZE}
    state["numpy"].update(done=[0], counts={"0": 0}, skipped=skipped, complete=False)
    (root / ".progress.json").write_text(json.dumps(state))
    for name, shape in (("X", (UNIFORM_CHUNK_SIZE, 0, 0, 3)), ("y", (UNIFORM_CHUNK_SIZE,))):
        dtype = np.uint8 if name == "X" else np.int64
        np.save(root / f"{name}.npy.part", np.zeros(shape, dtype))
        os.replace(root / f"{name}.npy.part.npy", root / f"{name}.npy.part")
    with FaultProxy(url) as proxy:
        root, stdout = download(cli, proxy.base_url, JOB_UNIFORM, "--on-error", "skip")
        assert proxy.stats.requests_by_path[f"/api/v1/jobs/{JOB_UNIFORM}/chunks/0"] == 0
    assert "already complete" not in stdout
    assert_arrays_hold(root, good)


@pytest.mark.parametrize("fmt", ["numpy", "images"])
def test_a_chunk_holding_another_count_than_listed_exits_8_as_iteration_refuses_it(
    cli: Cli, store: Path, tmp_path: Path, server_factory: Callable[..., str], fmt: str
) -> None:
    """Chunk counts swapped, the total unchanged: iteration refused the job, and a numpy
    or images download of it exited 0."""

    def swap(job: dict[str, Any]) -> None:
        first, last = job["chunks"][0], job["chunks"][-1]
        first["image_count"], last["image_count"] = last["image_count"], first["image_count"]

    url = server_factory(edited_copy(store, tmp_path / "swapped", JOB_UNIFORM, swap))
    result = cli.run("download", JOB_UNIFORM, "--format", fmt, "-o", "out", *api(url, TEST_KEY))
    assert result.returncode == 8, result
    assert re.search(r"lists \d+ images in chunk 0 but the chunk holds 16", result.stderr)
    root = cli.cwd / "out" / JOB_UNIFORM
    assert not (root / "X.npy").exists() and not (root / "metadata.jsonl").exists()


@pytest.mark.parametrize("chunk_counts", [True, False], ids=["chunks-counted", "uncounted"])
@pytest.mark.parametrize("fmt", ["numpy", "images"])
@pytest.mark.parametrize("listed", [UNIFORM_TOTAL - 1, UNIFORM_TOTAL + 1])
def test_a_job_listing_another_count_than_its_chunks_hold_still_exits_8(
    cli: Cli,
    store: Path,
    tmp_path: Path,
    server_factory: Callable[..., str],
    fmt: str,
    listed: int,
    chunk_counts: bool,
) -> None:
    def miscount(job: dict[str, Any]) -> None:
        if not chunk_counts:  # then only the chunks' manifests can tell
            drop_counts(job)
        job["total_images"] = listed

    url = server_factory(edited_copy(store, tmp_path / "miscounted", JOB_UNIFORM, miscount))
    result = cli.run("download", JOB_UNIFORM, "--format", fmt, "-o", "out", *api(url, TEST_KEY))
    assert result.returncode == 8, result
    assert f"job {JOB_UNIFORM} lists {listed} images but" in result.stderr
    root = cli.cwd / "out" / JOB_UNIFORM
    assert not (root / "X.npy").exists() and not (root / "metadata.jsonl").exists()
