"""The ``pixcrawler`` command line: download, list, info, login, pack, serve and demo.

Every failure maps to one exit code per class (:data:`EXIT_CODES`) and one line on stderr,
``Error: ...``; a traceback only under ``pixcrawler --debug``. No command prints a client
API key: the key is never formatted into output, and every message is also scrubbed of
any key this process knows of, as a last line of defence.

``download`` writes under ``<output-dir>/<job_id>/`` and is resumable: every chunk is
received into a ``.part`` file (resumed with ``Range``), verified, then renamed; a
``.progress.json`` sidecar records which chunks are already written, so a rerun after an
interruption transfers only what is missing. Final names appear only when complete.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click
import numpy as np

from . import __version__, config
from .archive import ChunkArchive, Sample
from .auth import credentials_path, resolve_api_key, resolve_base_url, save_api_key
from .client import ApiClient, api_root, job_path
from .dataset import Dataset, DatasetInfo, human_size, load_dataset, num_images_of, parse_time
from .decode import ImageDecoder
from .downloader import ChunkDownloader, TransferStats
from .exceptions import (
    AuthenticationError,
    DecompressionError,
    DownloadError,
    JobNotCompleteError,
    MixedImageSizesError,
    NetworkError,
    NotFoundError,
    PixCrawlerError,
)
from .models import Chunk, Job

__all__ = ["EXIT_CODES", "cli", "main", "run"]

log = logging.getLogger("pixcrawler")

# -- exit codes ------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_NOT_COMPLETE = 5
EXIT_NETWORK = 6
EXIT_INTEGRITY = 7
EXIT_BAD_DATA = 8
EXIT_INTERRUPTED = 130

#: Exception class -> exit code, most specific first.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (AuthenticationError, EXIT_AUTH),
    (NotFoundError, EXIT_NOT_FOUND),
    (JobNotCompleteError, EXIT_NOT_COMPLETE),
    (NetworkError, EXIT_NETWORK),
    (DownloadError, EXIT_INTEGRITY),
    (DecompressionError, EXIT_BAD_DATA),
    (MixedImageSizesError, EXIT_BAD_DATA),
)

FORMATS = ("numpy", "images", "zip")
SIDECAR = ".progress.json"
STAGING_DIR = ".partial"  # chunk archives in transit for the numpy and images formats
_HASH_BLOCK = 1 << 20
_PROGRESS_REFRESH = 0.2  # seconds between refreshes of the bytes bar
_MIN_REDACTED_KEY = 4  # shorter "keys" would garble every message if scrubbed
_NAME_WIDTH = 40  # the widest NAME column of `pixcrawler list`


class CliError(click.ClickException):
    """A failure the user can act on: one ``Error: ...`` line and ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_UNEXPECTED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Session:
    """Per-invocation state: the --debug flag and the keys to scrub from any output."""

    def __init__(self) -> None:
        self.debug = False
        self.keys: set[str] = set()

    def remember(self, key: str | None) -> None:
        if key:
            self.keys.add(key)


_session = _Session()


# -- keeping keys off the screen -------------------------------------------------------------


def _stored_key() -> str | None:
    try:
        data = json.loads(credentials_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    key = data.get("api_key") if isinstance(data, dict) else None
    return key if isinstance(key, str) else None


def redact(text: str) -> str:
    """``text`` with every API key this process knows of replaced by ``***``."""
    keys = set(_session.keys)
    keys.update(k for k in (os.environ.get(config.ENV_API_KEY), _stored_key()) if k)
    for key in sorted(keys, key=len, reverse=True):
        if len(key) >= _MIN_REDACTED_KEY:
            text = text.replace(key, "***")
    return text


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _printable(text: str) -> str:
    """Server-supplied text with control characters (terminal escapes) neutralised."""
    return "".join(ch if ch == "\n" or ch.isprintable() else "?" for ch in text)


# -- the entry point -------------------------------------------------------------------------


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of an exception raised by a command."""
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return EXIT_UNEXPECTED


def _report(exc: BaseException, code: int, message: str) -> int:
    if _session.debug:
        sys.stderr.write(redact("".join(traceback.format_exception(exc))))
    line = " ".join(message.split())
    sys.stderr.write(redact(f"Error: {line}") + "\n")
    sys.stderr.flush()
    return code


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    global _session
    _session = _Session()
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="pixcrawler",
            standalone_mode=False,
        )
    except click.exceptions.Abort as exc:  # click's wrapper of Ctrl-C and EOF at a prompt
        if isinstance(exc.__cause__, EOFError):
            return _report(exc, EXIT_USAGE, "no input (end of file at a prompt)")
        return _report(exc, EXIT_INTERRUPTED, "interrupted")
    except click.ClickException as exc:
        if _session.debug and exc.__cause__ is not None:
            sys.stderr.write(redact("".join(traceback.format_exception(exc))))
        buffer = io.StringIO()
        exc.show(file=buffer)
        sys.stderr.write(redact(buffer.getvalue()))
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _report(exc, EXIT_INTERRUPTED, "interrupted")
    except (PixCrawlerError, OSError) as exc:  # expected failures: their message says it all
        return _report(exc, exit_code_for(exc), str(exc))
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        if not _session.debug:
            message += " (run `pixcrawler --debug ...` for the traceback)"
        return _report(exc, EXIT_UNEXPECTED, message)
    return result if isinstance(result, int) else EXIT_OK


def main() -> NoReturn:
    """The ``pixcrawler`` console script."""
    _interruptible()
    sys.exit(run())


def _interruptible() -> None:
    """Make SIGINT stop this process (exit 130; a download resumes on a rerun) even when it
    was started with SIGINT ignored.

    A shell without job control (a script, a CI runner, ``cmd &`` from a tool) starts
    background commands with SIGINT ignored, and Python keeps an inherited SIG_IGN, so
    Ctrl-C or ``kill -INT`` would be dropped in silence and a download would run on. Only
    the console script does this: :func:`run` leaves a host process's signals alone.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# -- shared options ----------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def _remember_key(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    _session.remember(value)
    return value


def _validate_url(url: str) -> str:
    api_root(url)
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ValueError(f"the API host must start with http:// or https://, got {url!r}")
    return url


def _check_base_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            _validate_url(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _check_job_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        job_path(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def api_options(command: F) -> F:
    """``--api-key`` and ``--base-url``, resolved as the SDK does (flag, env, login file)."""
    command = click.option(
        "--base-url",
        metavar="URL",
        callback=_check_base_url,
        help=f"API host. [default: ${config.ENV_BASE_URL}, else {config.DEFAULT_BASE_URL}]",
    )(command)
    command = click.option(
        "--api-key",
        metavar="KEY",
        callback=_remember_key,
        help=(
            f"Your API key. [default: ${config.ENV_API_KEY}, else the key saved by "
            "`pixcrawler login`]"
        ),
    )(command)
    return command


def _resolve_key(api_key: str | None) -> str:
    """The key from the flag, the environment or the login file, in the CLI's words."""
    try:
        key = resolve_api_key(api_key)
    except AuthenticationError:
        raise AuthenticationError(
            f"no API key: pass --api-key, set ${config.ENV_API_KEY}, or run `pixcrawler login`"
        ) from None
    _session.remember(key)
    return key


def _resolve_url(base_url: str | None) -> str:
    """The host from the flag (checked already), the environment, or the default."""
    try:
        return _validate_url(resolve_base_url(base_url))
    except ValueError as exc:  # a malformed PIXCRAWLER_BASE_URL
        raise CliError(f"${config.ENV_BASE_URL}: {exc}", EXIT_USAGE) from None


def _connect(api_key: str | None, base_url: str | None) -> ApiClient:
    return ApiClient(_resolve_key(api_key), _resolve_url(base_url))


# -- the group ---------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs (keys stay hidden).")
@click.version_option(__version__, "--version", prog_name="pixcrawler")
def cli(debug: bool) -> None:
    """PixCrawler: download, inspect and serve image datasets.

    \b
    The API key comes from --api-key, else $PIXCRAWLER_API_KEY, else the
    file `pixcrawler login` writes; the API host from --base-url, else
    $PIXCRAWLER_BASE_URL, else https://api.pixcrawler.com.

    \b
    Examples:
      pixcrawler login
      pixcrawler list
      pixcrawler info job_123
      pixcrawler download job_123 --format images --output-dir ./my_dataset

    \b
    Exit codes: 0 ok, 1 unexpected, 2 usage, 3 authentication, 4 not found,
    5 job not complete, 6 network, 7 integrity, 8 bad data, 130 interrupted.
    """
    _session.debug = debug
    if debug and not any(isinstance(h.formatter, _RedactingFormatter) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)


# -- download ----------------------------------------------------------------------------------


@cli.command()
@click.argument("job_id", callback=_check_job_id)
@api_options
@click.option(
    "--output-dir",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default="./datasets",
    show_default=True,
    help="Where to write; the dataset goes to OUTPUT_DIR/JOB_ID/.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="numpy",
    show_default=True,
    help="numpy arrays, the original image files, or the chunk archives as served.",
)
@click.option(
    "--max-workers",
    type=click.IntRange(1, 64),
    default=config.DEFAULT_MAX_WORKERS,
    show_default=True,
    help="Chunks downloaded in parallel.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    nargs=2,
    default=None,
    metavar="H W",
    help="Resize every image to H x W (numpy only; needed when the job's sizes differ).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (none off a terminal anyway).")
def download(
    job_id: str,
    api_key: str | None,
    base_url: str | None,
    output_dir: Path,
    fmt: str,
    max_workers: int,
    image_size: tuple[int, int] | None,
    no_progress: bool,
) -> None:
    """Download a completed job to OUTPUT_DIR/JOB_ID/.

    \b
    Formats:
      numpy   X.npy (N, H, W, C) uint8 written through a memory map,
              y.npy (int64 label ids) and labels.json (id -> name);
              load with: X = np.load("X.npy", mmap_mode="r"); y = np.load("y.npy")
      images  LABEL/FILE byte-identical to what was packed, plus metadata.jsonl
      zip     chunks/00000.zip ... as served, sha256-verified

    Interrupted (Ctrl-C, killed, network down)? Run the same command again:
    only what is missing is downloaded, partial chunks resume with Range.

    \b
    Examples:
      pixcrawler download job_123 --api-key mykey
      pixcrawler download job_123 --format images --output-dir ./my_dataset
      pixcrawler download job_123 --max-workers 8
      pixcrawler download job_123 --image-size 224 224
    """
    if image_size is not None and fmt != "numpy":
        raise CliError("--image-size applies to --format numpy only", EXIT_USAGE)
    key, url = _resolve_key(api_key), _resolve_url(base_url)
    with load_dataset(job_id, key, url, max_workers=max_workers) as dataset:
        root = output_dir / job_id
        writer = _make_writer(fmt, dataset, root, image_size)  # numpy checks the size here
        stats = dataset.stats.transfer
        try:
            todo = writer.prepare()
            if not todo and writer.complete:
                click.echo(f"{job_id} is already complete in {root} ({fmt}); nothing to download.")
                return
            show = not no_progress and sys.stderr.isatty()
            with _Progress(show, job_id, writer, todo, stats) as progress:
                _transfer(dataset, writer, todo, max_workers, progress)
                writer.finish()
        except KeyboardInterrupt:
            raise CliError(
                "interrupted; run the same command again to resume", EXIT_INTERRUPTED
            ) from None
        finally:
            writer.close()
        click.echo(
            f"Downloaded {job_id}: {writer.total_images:,} images in {len(dataset.job.chunks):,} "
            f"chunks to {root} ({writer.describe()}); received {human_size(stats.bytes_received)}."
        )


def _transfer(
    dataset: Dataset,
    writer: _Writer,
    todo: list[Chunk],
    window: int,
    progress: _Progress,
) -> None:
    """Fetch ``todo`` with up to ``window`` chunks in flight; process them in order."""
    downloader = dataset.downloader()
    pool = ThreadPoolExecutor(window, thread_name_prefix="pixcrawler-fetch")
    pending = iter(todo)
    inflight: deque[tuple[Chunk, Future[Path]]] = deque()

    def submit_next() -> None:
        chunk = next(pending, None)
        if chunk is not None:
            inflight.append((chunk, pool.submit(_obtain, downloader, writer, chunk)))

    try:
        for _ in range(window):
            submit_next()
        while inflight:
            chunk, future = inflight.popleft()
            path = future.result()
            submit_next()
            writer.process(chunk, path, progress.add_images)
            writer.release(path)
    except BaseException:
        downloader.close()  # unblocks the other transfers at once
        for _, future in inflight:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _obtain(downloader: ChunkDownloader, writer: _Writer, chunk: Chunk) -> Path:
    """The chunk's verified archive on disk: kept from an earlier run, or downloaded."""
    path = writer.chunk_path(chunk)
    if path.exists():
        if _intact(path, chunk):
            return path
        log.warning("%s is corrupt or stale; downloading it again", path)
        path.unlink()
    return downloader.fetch_to_file(chunk.index, path)


def _intact(path: Path, chunk: Chunk) -> bool:
    """Whether ``path`` holds exactly the chunk the API lists (size, then sha256)."""
    try:
        if chunk.size_bytes is not None and path.stat().st_size != chunk.size_bytes:
            return False
        if chunk.sha256 is None:
            return True
        hasher = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                hasher.update(block)
    except OSError:
        return False
    return hasher.hexdigest() == chunk.sha256.lower()


class _Progress:
    """Two tqdm bars (bytes received, images written) on a terminal; otherwise nothing."""

    def __init__(
        self,
        enabled: bool,
        job_id: str,
        writer: _Writer,
        todo: list[Chunk],
        stats: TransferStats,
    ) -> None:
        self.enabled = enabled
        self._stats = stats
        self._start = stats.bytes_received
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._bytes_bar: Any = None
        self._images_bar: Any = None
        self._thread: threading.Thread | None = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        remaining = sum(writer.bytes_to_receive(chunk) for chunk in todo)
        self._bytes_bar = tqdm(
            total=remaining,
            desc=f"{job_id} bytes",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            position=0,
            dynamic_ncols=True,
        )
        self._images_bar = tqdm(
            total=writer.total_images,
            initial=writer.done_images,
            desc=f"{job_id} images",
            unit="img",
            position=1,
            dynamic_ncols=True,
        )
        self._thread = threading.Thread(
            target=self._refresh_loop, name="pixcrawler-progress", daemon=True
        )
        self._thread.start()

    def add_images(self, count: int) -> None:
        if self._images_bar is not None:
            self._images_bar.update(count)

    def _refresh(self) -> None:
        with self._lock:
            received = self._stats.bytes_received - self._start
            bar = self._bytes_bar
            if bar is not None and received > bar.n:
                bar.update(received - bar.n)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(_PROGRESS_REFRESH):
            self._refresh()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.enabled:
            self._refresh()
            self._bytes_bar.close()
            self._images_bar.close()


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- the three output formats ---------------------------------------------------------------


class _Writer:
    """One output format: which chunks are still to do, where their archives go, and what
    to write once a chunk's archive is on disk and verified."""

    name = ""

    def __init__(self, dataset: Dataset, root: Path) -> None:
        self.dataset = dataset
        self.job: Job = dataset.job
        self.root = root
        self.total_images = num_images_of(self.job)
        self.done_images = 0
        self.complete = False

    def prepare(self) -> list[Chunk]:
        """Create what is needed, read what an earlier run left; the chunks still to do."""
        raise NotImplementedError

    def chunk_path(self, chunk: Chunk) -> Path:
        raise NotImplementedError

    def bytes_to_receive(self, chunk: Chunk) -> int:
        """Bytes of ``chunk`` not yet on disk (an estimate: a stale file is fetched again)."""
        path = self.chunk_path(chunk)
        if path.exists():
            return 0
        return max(0, (chunk.size_bytes or 0) - _size_of(path.with_name(path.name + ".part")))

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        raise NotImplementedError

    def release(self, path: Path) -> None:
        """The chunk's archive is no longer needed."""

    def finish(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        """Release files and threads (after success or failure)."""

    def fingerprint(self) -> dict[str, Any]:
        """What a partial download must match to be resumed: the job's exact chunks."""
        return {
            "job_id": self.job.id,
            "version": self.job.version,
            "chunks": [[c.index, c.sha256, c.size_bytes] for c in self.job.chunks],
        }


class _ZipWriter(_Writer):
    """``chunks/00000.zip`` ...: the archives as served. A verified file is kept as is."""

    name = "zip"

    def prepare(self) -> list[Chunk]:
        (self.root / "chunks").mkdir(parents=True, exist_ok=True)
        todo: list[Chunk] = []
        for chunk in sorted(self.job.chunks, key=_index):
            path = self.chunk_path(chunk)
            if path.exists() and _intact(path, chunk):
                self.done_images += chunk.image_count or 0
            else:
                todo.append(chunk)
        self.complete = not todo
        return todo

    def chunk_path(self, chunk: Chunk) -> Path:
        return self.root / "chunks" / f"{chunk.index:05d}.zip"

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        advance(chunk.image_count or 0)

    def finish(self) -> None:
        self.complete = True

    def describe(self) -> str:
        return "zip: chunks/00000.zip ..."


class _Sidecar:
    """``.progress.json``: per format, the fingerprint of the job and the chunks written."""

    def __init__(self, root: Path, section: str) -> None:
        self.path = root / SIDECAR
        self.section = section

    def load(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        state = data.get(self.section) if isinstance(data, dict) else None
        return state if isinstance(state, dict) else None

    def save(self, state: dict[str, Any]) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        data[self.section] = state
        _write_atomic(self.path, json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def _index(chunk: Chunk) -> int:
    return chunk.index


def _valid_state(state: dict[str, Any] | None) -> bool:
    """A sidecar section as this module writes it (a hand-edited one starts over)."""
    if state is None or not isinstance(state.get("fingerprint"), dict):
        return False
    done, counts = state.get("done"), state.get("counts")
    if not isinstance(done, list) or not isinstance(counts, dict):
        return False
    return all(isinstance(i, int) and isinstance(counts.get(str(i)), int) for i in done)


def _reserve(path: Path) -> None:
    """Allocate a sparse file's blocks now, so a full disk is a clean error here rather than
    a SIGBUS when a memory-mapped page is first written."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:  # pragma: no cover - macOS, Windows
        return
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            allocate(fh.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise OSError(
                    exc.errno, f"no room for {human_size(size)} in {path}: {exc.strerror}"
                ) from None
            # EOPNOTSUPP and the like: the file system cannot say; carry on.


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _StagedWriter(_Writer):
    """A format built from the archives: they are staged in ``.partial/`` while in transit
    and removed once their content is written."""

    def __init__(self, dataset: Dataset, root: Path) -> None:
        super().__init__(dataset, root)
        self.sidecar = _Sidecar(root, self.name)
        self.state: dict[str, Any] = {}
        self.staging = root / STAGING_DIR

    def chunk_path(self, chunk: Chunk) -> Path:
        return self.staging / f"{chunk.index:05d}.zip"

    def release(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def prepare(self) -> list[Chunk]:
        self.root.mkdir(parents=True, exist_ok=True)
        fingerprint = self.fingerprint()
        state = self.sidecar.load()
        if _valid_state(state) and state is not None and state["fingerprint"] == fingerprint:
            if state.get("complete") and self.outputs_present():
                self.complete = True
                return []
            if self.resume(state):
                self.state = state
            else:
                self.start_over(fingerprint)
        else:
            self.start_over(fingerprint)
        self.staging.mkdir(exist_ok=True)
        done = set(self.state["done"])
        counts = self.state["counts"]
        self.done_images = sum(int(counts[str(i)]) for i in done)
        # Index order, as the SDK iterates: X's rows and metadata.jsonl's lines follow it.
        return sorted((c for c in self.job.chunks if c.index not in done), key=_index)

    def start_over(self, fingerprint: dict[str, Any]) -> None:
        self.state = {"fingerprint": fingerprint, "done": [], "counts": {}, "complete": False}
        shutil.rmtree(self.staging, ignore_errors=True)
        self.reset()
        self.sidecar.save(self.state)

    def mark_done(self, chunk: Chunk, count: int, **extra: Any) -> None:
        self.state["done"].append(chunk.index)
        self.state["counts"][str(chunk.index)] = count
        self.state.update(extra)
        self.sidecar.save(self.state)

    def mark_complete(self) -> None:
        missing = [c.index for c in self.job.chunks if c.index not in set(self.state["done"])]
        if missing:  # pragma: no cover - the transfer loop processes every chunk
            raise RuntimeError(f"chunks {missing} were not written")
        written = sum(int(n) for n in self.state["counts"].values())
        if written != self.total_images:
            raise DecompressionError(
                f"job {self.job.id} lists {self.total_images:,} images but its chunks hold "
                f"{written:,}"
            )
        self.state["complete"] = True
        self.sidecar.save(self.state)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.complete = True

    def offset_of(self, chunk: Chunk) -> int:
        """Images before ``chunk``: chunks are written in order, so all earlier ones are
        done and their counts recorded."""
        counts = self.state["counts"]
        return sum(
            int(counts.get(str(c.index), c.image_count or 0))
            for c in self.job.chunks
            if c.index < chunk.index
        )

    # Format-specific parts.
    def outputs_present(self) -> bool:
        raise NotImplementedError

    def resume(self, state: dict[str, Any]) -> bool:
        """Reopen the partial outputs of ``state``; False when they cannot be resumed."""
        raise NotImplementedError

    def reset(self) -> None:
        """Discard partial outputs and start them afresh."""
        raise NotImplementedError


class _NumpyWriter(_StagedWriter):
    """``X.npy`` (N, H, W, C) uint8 filled chunk by chunk through a memory map, ``y.npy``
    (int64 label ids) and ``labels.json``; ``*.npy.part`` until every chunk is in."""

    name = "numpy"
    mode = "RGB"

    def __init__(self, dataset: Dataset, root: Path, image_size: tuple[int, int] | None) -> None:
        super().__init__(dataset, root)
        size = image_size or self.job.image_size
        if size is None:
            raise CliError(
                f"the images of job {self.job.id} differ in size, and numpy arrays need one: "
                "pass --image-size H W to resize them all (e.g. --image-size 224 224), or use "
                "--format images to keep the original files",
                EXIT_USAGE,
            )
        self.decoder = ImageDecoder(self.mode, size)
        self.shape = (self.total_images, size[0], size[1], self.decoder.channels)
        self.label_ids = {label: i for i, label in enumerate(self.job.labels)}
        self.x_path, self.y_path = root / "X.npy", root / "y.npy"
        self.labels_path = root / "labels.json"
        self.x_part = self.x_path.with_name("X.npy.part")
        self.y_part = self.y_path.with_name("y.npy.part")
        self.X: np.memmap[Any, Any] | None = None
        self.y: np.memmap[Any, Any] | None = None
        self.pool = ThreadPoolExecutor(
            config.DEFAULT_DECODE_THREADS, thread_name_prefix="pixcrawler-decode"
        )

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "shape": list(self.shape), "mode": self.mode}

    def outputs_present(self) -> bool:
        return all(p.exists() for p in (self.x_path, self.y_path, self.labels_path))

    def resume(self, state: dict[str, Any]) -> bool:
        try:
            X = np.lib.format.open_memmap(self.x_part, mode="r+")
            y = np.lib.format.open_memmap(self.y_part, mode="r+")
        except (OSError, ValueError):
            return False
        if X.shape != self.shape or X.dtype != np.uint8 or y.shape != self.shape[:1]:
            return False
        if y.dtype != np.int64:
            return False
        self.X, self.y = X, y
        return True

    def reset(self) -> None:
        self.X = np.lib.format.open_memmap(self.x_part, mode="w+", dtype=np.uint8, shape=self.shape)
        self.y = np.lib.format.open_memmap(
            self.y_part, mode="w+", dtype=np.int64, shape=self.shape[:1]
        )
        _reserve(self.x_part)
        _reserve(self.y_part)

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        if self.X is None or self.y is None:  # pragma: no cover - prepare() opened them
            raise RuntimeError("prepare() was not called")
        archive = ChunkArchive(path.read_bytes(), chunk_id=chunk.index)
        samples = archive.samples
        offset = self.offset_of(chunk)
        if offset + len(samples) > self.total_images:
            raise DecompressionError(
                f"job {self.job.id} lists {self.total_images:,} images but chunk {chunk.index} "
                f"ends at image {offset + len(samples):,}",
                chunk_id=chunk.index,
            )
        ids = [self._label_id(sample) for sample in samples]
        groups = [
            range(start, min(len(samples), start + config.DECODE_GROUP))
            for start in range(0, len(samples), config.DECODE_GROUP)
        ]
        futures = [
            self.pool.submit(self._decode_rows, self.X, archive, samples, rows, offset)
            for rows in groups
        ]
        try:
            for rows, future in zip(groups, futures, strict=True):
                future.result()
                advance(len(rows))
        finally:
            for future in futures:
                future.cancel()
        self.y[offset : offset + len(samples)] = ids
        self.X.flush()
        self.y.flush()
        self.mark_done(chunk, len(samples))

    def _label_id(self, sample: Sample) -> int:
        try:
            return self.label_ids[sample.label]
        except KeyError:
            raise DecompressionError(
                f"chunk {sample.chunk_id}: image {sample.id!r} has label {sample.label!r}, "
                "which the job does not list",
                chunk_id=sample.chunk_id,
                sample_id=sample.id,
            ) from None

    def _decode_rows(
        self,
        X: np.memmap[Any, Any],
        archive: ChunkArchive,
        samples: list[Sample],
        rows: range,
        offset: int,
    ) -> None:
        want = self.shape[1:]
        for row in rows:
            sample = samples[row]
            try:
                image = self.decoder.decode(archive.payload(sample))
            except DecompressionError as exc:
                if sample.id in exc.message:
                    raise
                raise DecompressionError(
                    f"chunk {sample.chunk_id}, image {sample.id!r}: {exc.message}",
                    chunk_id=sample.chunk_id,
                    sample_id=sample.id,
                ) from exc
            if image.shape != want:
                raise DecompressionError(
                    f"chunk {sample.chunk_id}: image {sample.id!r} is {image.shape[1]}x"
                    f"{image.shape[0]}, not {want[1]}x{want[0]} as the job says; pass "
                    "--image-size H W to resize every image",
                    chunk_id=sample.chunk_id,
                    sample_id=sample.id,
                )
            X[offset + row] = image

    def finish(self) -> None:
        if self.X is not None and self.y is not None:
            self.X.flush()
            self.y.flush()
        self.X = self.y = None  # unmapped before the rename
        self.mark_complete()
        labels = json.dumps(list(self.job.labels), indent=1, ensure_ascii=False) + "\n"
        _write_atomic(self.labels_path, labels.encode("utf-8"))
        os.replace(self.y_part, self.y_path)
        os.replace(self.x_part, self.x_path)

    def describe(self) -> str:
        shape = ", ".join(str(n) for n in self.shape)
        return f"numpy: X.npy ({shape}) uint8, y.npy, labels.json"

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.X = self.y = None


class _ImagesWriter(_StagedWriter):
    """``<label>/<file>`` byte-identical to what was packed, plus ``metadata.jsonl``."""

    name = "images"

    def __init__(self, dataset: Dataset, root: Path) -> None:
        super().__init__(dataset, root)
        self.metadata_path = root / "metadata.jsonl"
        self.metadata_part = root / "metadata.jsonl.part"
        self.used: set[str] = set()

    def outputs_present(self) -> bool:
        return self.metadata_path.exists()

    def resume(self, state: dict[str, Any]) -> bool:
        length = int(state.get("metadata_bytes", 0))
        try:
            with open(self.metadata_part, "r+b") as fh:
                if fh.seek(0, os.SEEK_END) < length:
                    return False
                fh.truncate(length)  # lines of a chunk that was not finished
                fh.seek(0)
                lines = fh.read().decode("utf-8").splitlines()
            self.used = {json.loads(line)["file"] for line in lines}
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return True

    def reset(self) -> None:
        self.metadata_part.write_bytes(b"")
        self.state["metadata_bytes"] = 0
        self.used = set()

    def process(self, chunk: Chunk, path: Path, advance: Callable[[int], None]) -> None:
        archive = ChunkArchive(path.read_bytes(), chunk_id=chunk.index)
        lines: list[str] = []
        for position, sample in enumerate(archive.samples):
            data = archive.payload(sample)
            rel = self._target(sample, position)
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.part")
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
            record = {
                "id": sample.id,
                "label": sample.label,
                "file": rel,
                "path": sample.path,
                "chunk": chunk.index,
                "width": sample.width,
                "height": sample.height,
                "sha256": sample.sha256 or hashlib.sha256(data).hexdigest(),
                "metadata": dict(sample.metadata),
            }
            lines.append(json.dumps(record, ensure_ascii=False, sort_keys=True))
            advance(1)
        with open(self.metadata_part, "ab") as fh:
            fh.write("".join(line + "\n" for line in lines).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            length = fh.tell()
        self.mark_done(chunk, len(archive.samples), metadata_bytes=length)

    def _target(self, sample: Sample, position: int) -> str:
        """``<label>/<name>``: the member path when it lies under the label folder, as the
        packer's do, else its file name; never outside the output folder."""
        label = _safe_relative(sample.label, sample)
        prefix = sample.label + "/"
        if sample.path.startswith(prefix):
            name = _safe_relative(sample.path[len(prefix) :], sample)
        else:
            name = PurePosixPath(_safe_relative(sample.path, sample)).name
        rel = f"{label}/{name}"
        if rel in self.used:  # another producer's two paths with one file name
            pure = PurePosixPath(name)
            rel = f"{label}/{pure.stem}~{sample.chunk_id}-{position}{pure.suffix}"
        self.used.add(rel)
        return rel

    def finish(self) -> None:
        self.mark_complete()
        os.replace(self.metadata_part, self.metadata_path)

    def describe(self) -> str:
        return "images: <label>/<file>, metadata.jsonl"


def _safe_relative(text: str, sample: Sample) -> str:
    """``text`` as a relative POSIX path that cannot leave the folder it is joined to."""
    parts = text.split("/")
    unsafe = (
        not text
        or text.startswith("/")
        or "\\" in text
        or "\x00" in text
        or (len(text) > 1 and text[1] == ":")
        or any(part in ("", ".", "..") for part in parts)
    )
    if unsafe:
        raise DecompressionError(
            f"chunk {sample.chunk_id}: image {sample.id!r} names the unsafe path or label {text!r}",
            chunk_id=sample.chunk_id,
            sample_id=sample.id,
        )
    return text


def _make_writer(
    fmt: str, dataset: Dataset, root: Path, image_size: tuple[int, int] | None
) -> _Writer:
    if fmt == "numpy":
        return _NumpyWriter(dataset, root, image_size)
    if fmt == "images":
        return _ImagesWriter(dataset, root)
    return _ZipWriter(dataset, root)


# -- list and info ---------------------------------------------------------------------------


@cli.command(name="list")
@api_options
def list_jobs(api_key: str | None, base_url: str | None) -> None:
    """List your datasets (every page), newest first.

    \b
    Sizes are 1024-based; times are UTC.

    \b
    Examples:
      pixcrawler list
      pixcrawler list --api-key mykey --base-url http://127.0.0.1:8000
    """
    client = _connect(api_key, base_url)
    try:
        jobs = list(_all_jobs(client))
    finally:
        client.close()
    if not jobs:
        click.echo("No datasets.")
        return
    click.echo(format_table(jobs))


def _all_jobs(client: ApiClient) -> Iterator[Job]:
    page = 1
    while True:
        data = client.list_jobs(page=page, size=config.DEFAULT_PAGE_SIZE)
        items = data["items"]
        for item in items:
            if isinstance(item, dict):
                yield Job.from_json(item)
        try:
            pages = int(data.get("pages") or 1)
        except (TypeError, ValueError):
            pages = 1
        if not items or page >= pages:
            return
        page += 1


def format_table(jobs: Sequence[Job]) -> str:
    """The ``pixcrawler list`` table: id, name, status, images, size, created (UTC)."""
    header = ("ID", "NAME", "STATUS", "IMAGES", "SIZE", "CREATED")
    right = (False, False, False, True, True, False)
    rows: list[tuple[str, ...]] = [header]
    for job in jobs:
        completed = job.status == "completed"
        status = job.status if completed else f"{job.status} ({job.progress:g}%)"
        images = num_images_of(job)
        created = parse_time(job.created_at)
        name = " ".join(job.name.split())
        if len(name) > _NAME_WIDTH:
            name = name[: _NAME_WIDTH - 1] + "…"
        rows.append(
            (
                job.id,
                name,
                status,
                f"{images:,}" if completed or images else "-",
                human_size(job.size_bytes) if completed or job.size_bytes else "-",
                created.strftime("%Y-%m-%d %H:%M:%S") if created else "-",
            )
        )
    rows = [tuple(_printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if align else cell.ljust(width)
            for cell, width, align in zip(row, widths, right, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@cli.command()
@click.argument("job_id", callback=_check_job_id)
@api_options
def info(job_id: str, api_key: str | None, base_url: str | None) -> None:
    """Show a job's metadata, whatever its status.

    \b
    Example:
      pixcrawler info job_123
    \b
      Dataset: job_123
      Status: completed
      Images: 10,000
      Chunks: 20
      Size: 2.5 GB
      Created: 2025-10-30 12:00:00
      Labels: cat, dog, bird (3 classes)
    """
    client = _connect(api_key, base_url)
    try:
        job = client.get_job(job_id)
    finally:
        client.close()
    click.echo(format_info(job))


def format_info(job: Job) -> str:
    """``str(DatasetInfo)``; a job not completed shows its progress on the Status line."""
    lines = str(DatasetInfo.from_job(job)).split("\n")
    if job.status != "completed":
        lines = [
            f"Status: {job.status} ({job.progress:g}%)" if line.startswith("Status: ") else line
            for line in lines
        ]
    return _printable("\n".join(lines))


# -- login -------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--api-key",
    metavar="KEY",
    callback=_remember_key,
    help="The key to save. [default: read from the terminal, hidden, or from stdin]",
)
def login(api_key: str | None) -> None:
    """Save your API key for later commands (a file only you can read).

    The key is never printed. $PIXCRAWLER_API_KEY and --api-key still take
    precedence over the saved key.

    \b
    Examples:
      pixcrawler login
      pixcrawler login < my_key.txt
    """
    if api_key is None:
        if sys.stdin.isatty():
            api_key = click.prompt("PixCrawler API key", hide_input=True, err=True)
        else:
            api_key = sys.stdin.readline()
    api_key = (api_key or "").strip()
    _session.remember(api_key)
    if not api_key:
        raise CliError("no API key given", EXIT_USAGE)
    path = save_api_key(api_key)
    click.echo(f"API key saved to {path} (readable by you only).")
    if os.environ.get(config.ENV_API_KEY):
        click.echo(
            f"Note: ${config.ENV_API_KEY} is set here and takes precedence over the saved key.",
            err=True,
        )


# -- pack, serve, demo -------------------------------------------------------------------------


@cli.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--store",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The server's dataset store (created if missing).",
)
@click.option("--job-id", help="Job id. [default: derived from the content]")
@click.option("--name", help="Display name. [default: the folder's name]")
@click.option("--owner", default=config.DEFAULT_OWNER, show_default=True, help="Owner of the job.")
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=config.DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Images per chunk archive.",
)
def pack(
    src: Path,
    store: Path,
    job_id: str | None,
    name: str | None,
    owner: str,
    chunk_size: int,
) -> None:
    """Pack a folder of labelled images (SRC/<label>/<image>) into a job in a store.

    Packing is deterministic: the same folder gives the same chunks and checksums.
    Files that are not usable images are skipped and listed with the reason.

    \b
    Examples:
      pixcrawler pack ./crawl/cats_vs_dogs --store ./store
      pixcrawler pack ./photos --store ./store --job-id job_123 --chunk-size 200
    """
    from .packer import pack as pack_folder

    try:
        result = pack_folder(
            src, store, job_id=job_id, name=name, owner=owner, chunk_size=chunk_size
        )
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    labels = len(result.labels)
    click.echo(
        f"Packed {result.job_id}: {result.total_images:,} images, {labels:,} "
        f"label{'s' if labels != 1 else ''}, {result.num_chunks:,} "
        f"chunk{'s' if result.num_chunks != 1 else ''} ({human_size(result.size_bytes)}) "
        f"into {store}"
    )
    if result.skipped:
        count = len(result.skipped)
        click.echo(f"Skipped {count:,} file{'s' if count != 1 else ''}:")
        for path, reason in result.skipped:
            click.echo(f"  {_printable(path)}: {reason}")


@cli.command()
@click.option(
    "--store",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The dataset store to serve.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
def serve(store: Path, host: str, port: int) -> None:
    """Serve a store over the PixCrawler API (needs the [server] extra).

    With no key configured (STORE/keys.json or $PIXCRAWLER_SERVER_KEYS) a key for
    owner `default` is created, saved to STORE/keys.json (0600) and printed once.

    \b
    Examples:
      pixcrawler serve --store ./store
      pixcrawler serve --store ./store --host 0.0.0.0 --port 8080
    """
    from .server import serve as serve_store

    try:
        serve_store(store, host, port)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


@cli.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the images, store and arrays here. [default: a temporary folder]",
)
@click.option(
    "--images-per-class",
    type=click.IntRange(min=10),
    default=100,
    show_default=True,
    help="Digits per class (0-9), at most 174.",
)
def demo(workdir: Path | None, images_per_class: int) -> None:
    """Run the whole path on real data in seconds (needs [server] and [demo]).

    scikit-learn's handwritten digits become labelled PNG and JPEG files,
    are packed, served on a loopback port with a fresh key, loaded back with
    load_dataset, and used to train a classifier whose accuracy is printed.

    \b
    Examples:
      pixcrawler demo
      pixcrawler demo --workdir ./demo --images-per-class 150
    """
    from .demo import run_demo

    try:
        run_demo(workdir, images_per_class=images_per_class, echo=click.echo)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


if __name__ == "__main__":  # pragma: no cover
    main()
