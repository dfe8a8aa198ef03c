"""The ``pixcrawler`` command line: download, list, info, login, pack, serve and demo.

Every failure maps to one exit code per class (:data:`EXIT_CODES`) and one line on stderr,
``Error: ...``; a traceback only under ``pixcrawler --debug``. No command prints a client
API key: the key is never formatted into output, and every message is also scrubbed of
any key this process knows of, as a last line of defence.

``download`` writes with :mod:`pixcrawler.export`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import getpass
import io
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click

from . import __version__, config, export, redaction
from .auth import (
    NO_KEY_MESSAGE,
    clean_key,
    key_problem,
    other_api_keys,
    resolve_api_key,
    resolve_base_url,
    save_api_key,
)
from .client import ApiClient, api_root, job_path
from .dataset import DatasetInfo, above_bars, load_dataset, num_images_of
from .decode import validate_image_size
from .exceptions import (
    AuthenticationError,
    DecompressionError,
    DownloadError,
    JobNotCompleteError,
    MissingDependencyError,
    MixedImageSizesError,
    NetworkError,
    NotFoundError,
    PixCrawlerError,
)
from .models import Job, count_or_none
from .units import counted, human_size, parse_time

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
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process the signal ended


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop) raised in the main thread: it unwinds as
    Ctrl-C does, so what was received is kept for a rerun and the error says so."""


def _interrupted(exc: BaseException) -> tuple[int, str]:
    """The exit code and word of a Ctrl-C or a SIGTERM (click wraps either in Abort)."""
    if isinstance(exc, _Terminated) or isinstance(exc.__cause__, _Terminated):
        return EXIT_TERMINATED, "terminated"
    return EXIT_INTERRUPTED, "interrupted"


#: Exception class -> exit code, most specific first.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (AuthenticationError, EXIT_AUTH),
    (NotFoundError, EXIT_NOT_FOUND),
    (JobNotCompleteError, EXIT_NOT_COMPLETE),
    (NetworkError, EXIT_NETWORK),
    (DownloadError, EXIT_INTEGRITY),
    (DecompressionError, EXIT_BAD_DATA),
    (MixedImageSizesError, EXIT_BAD_DATA),
    (MissingDependencyError, EXIT_USAGE),  # an extra to install: not a bug (1)
)

_NAME_WIDTH = 40  # the widest NAME column of `pixcrawler list`


class CliError(click.ClickException):
    """A failure the user can act on: one ``Error: ...`` line and ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_UNEXPECTED) -> None:
        super().__init__(message)
        # Click declares exit_code a class variable; this error's code is per instance.
        setattr(self, "exit_code", exit_code)  # noqa: B010


class _Session:
    """Per-invocation state: the --debug flag and the keys to scrub from any output."""

    def __init__(self) -> None:
        self.debug = False
        self.keys: set[str] = set()

    def remember(self, key: str | None) -> None:
        if key:
            self.keys.add(key)


_session = _Session()
# click 8.2+ raises this (a UsageError whose message is the whole help) for a bare group.
_NO_ARGS_IS_HELP: type[click.UsageError] | tuple[()] = getattr(
    click.exceptions, "NoArgsIsHelpError", ()
)


# -- keeping keys off the screen -------------------------------------------------------------


def redact(text: str) -> str:
    """``text`` with every API key this process knows of replaced by ``***``."""
    return redaction.redact(text, _session.keys | redaction.known_keys() | other_api_keys())


def _echo(message: str = "", *, err: bool = False) -> None:
    """A line on stdout (stderr with ``err``), scrubbed like every other message: job
    fields come from a server."""
    click.echo(redact(message), err=err)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (never a stale stream).
    While progress bars are drawn there, a line goes above them, not into the bar's line."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        with above_bars():
            super().emit(record)


def _log_to_stderr(debug: bool) -> None:
    """The library's warnings (a retry and its delay, a wait on a slow chunk, a corrupt
    chunk fetched again) as ``Warning: ...`` lines before any ``Error:`` line, so a command
    that takes long says why; with ``--debug``, every record with its level and logger."""
    handler = next((h for h in log.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        log.addHandler(handler)
    if debug:
        handler.setFormatter(_RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
        log.setLevel(logging.DEBUG)
    else:
        handler.setFormatter(_RedactingFormatter("Warning: %(message)s"))
        log.setLevel(logging.WARNING)


def _printable(text: str, *, lines: bool = True) -> str:
    """Server-supplied text with control characters (terminal escapes) neutralised; its
    line breaks too without ``lines``."""
    return "".join(ch if (lines and ch == "\n") or ch.isprintable() else "?" for ch in text)


# -- the entry point -------------------------------------------------------------------------


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of an exception raised by a command. A chunk the API
    refused for its key (revoked mid-download) is an authentication failure (3), though
    the library raises it as the chunk's DownloadError."""
    if isinstance(exc, DownloadError) and isinstance(exc.__cause__, AuthenticationError):
        return EXIT_AUTH
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return EXIT_UNEXPECTED


def _report(exc: BaseException, code: int, message: str) -> int:
    if _session.debug:
        sys.stderr.write(_printable(redact("".join(traceback.format_exception(exc)))))
    line = " ".join(message.split())
    sys.stderr.write(_printable(redact(f"Error: {line}"), lines=False) + "\n")
    sys.stderr.flush()
    return code


_EXTRA_ARGUMENTS = "Got unexpected extra argument"  # click's words, then the arguments


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    global _session
    _session = _Session()
    args = list(sys.argv[1:] if argv is None else argv)
    for at, arg in enumerate(args):  # scrubbed from a usage error, met before it is parsed
        if arg == "--api-key" and at + 1 < len(args):
            _session.remember(args[at + 1])
        elif arg.startswith("--api-key="):
            _session.remember(arg.partition("=")[2])
    command = next((at for at, arg in enumerate(args) if not arg.startswith("-")), None)
    if command is not None and args[command] == "login":  # a key pasted where none is taken
        for arg in args[command + 1 :]:
            if not arg.startswith("-"):
                _session.remember(arg)
    try:
        result = cli.main(
            args=args,
            prog_name="pixcrawler",
            standalone_mode=False,
        )
    except SystemExit as exc:  # click's answer to a reader gone (EPIPE): exit 1, said here
        return exc.code if isinstance(exc.code, int) else EXIT_UNEXPECTED
    except click.exceptions.Abort as exc:  # click's wrapper of a Ctrl-C
        return _report(exc, *_interrupted(exc))
    except click.ClickException as exc:
        if _session.debug and exc.__cause__ is not None:
            sys.stderr.write(_printable(redact("".join(traceback.format_exception(exc)))))
        if isinstance(exc, _NO_ARGS_IS_HELP):  # `pixcrawler` alone: the help, as it is
            sys.stderr.write(redact(exc.format_message() + "\n"))
            return exc.exit_code
        # One line, as every other error (not click's usage block and hint before it).
        message = exc.format_message()
        if message.startswith(_EXTRA_ARGUMENTS):  # `info <key> ...`, --api-key forgotten
            words = message.partition(" (")[0]
            message = f"{words} (not shown: {'one' if words.endswith('s') else 'it'} may be a key)"
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            message += f" (see `{exc.ctx.command_path} --help`)"
        sys.stderr.write(_printable(redact(f"Error: {message}\n")))
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _report(exc, *_interrupted(exc))
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
    if isinstance(sys.stdout, io.TextIOWrapper):  # (stderr has backslashreplace already)
        sys.stdout.reconfigure(errors="replace")  # what a cp1252 file cannot hold: "?"
    sys.exit(run())


def _interruptible() -> None:
    """Make SIGINT stop this process (exit 130; a download resumes on a rerun) even when it
    was started with SIGINT ignored, and SIGTERM stop it the same way (exit 143, one line
    saying so; it died of the signal in silence).

    A shell without job control (a script, a CI runner, ``cmd &`` from a tool) starts
    background commands with SIGINT ignored, and Python keeps an inherited SIG_IGN, so
    Ctrl-C or ``kill -INT`` would be dropped in silence and a download would run on. Only
    the console script does this: :func:`run` leaves a host process's signals alone. An
    ignored SIGTERM stays ignored: whoever started us chose that.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends us at once
    raise _Terminated


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


def _check_output_dir(ctx: click.Context, param: click.Parameter, value: str) -> Path:
    # As a Path, "" is "." : an empty --output-dir (-o "$OUT" with OUT unset) wrote into
    # the working directory without a word.
    if not value.strip():
        raise click.BadParameter("is empty: name a folder (. for this one)")
    return Path(value)


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
    except AuthenticationError as exc:
        if exc.message != NO_KEY_MESSAGE:
            raise
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
        message = str(exc)
        if not message.startswith(f"${config.ENV_BASE_URL}"):
            message = f"${config.ENV_BASE_URL}: {message}"
        raise CliError(message, EXIT_USAGE) from None


def _connect(api_key: str | None, base_url: str | None) -> ApiClient:
    return ApiClient(_resolve_key(api_key), _resolve_url(base_url))


# -- the group ---------------------------------------------------------------------------------


_DEBUG_HELP = "Show tracebacks and debug logs (keys stay hidden)."


def _debug_after_the_command(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``pixcrawler download job_123 --debug`` as ``pixcrawler --debug download job_123``."""
    if value:
        _session.debug = True
        _log_to_stderr(True)


class _Command(click.Command):
    """A command whose usage errors all know it, so each names its ``--help``; each takes
    ``--debug`` after its name too, where users type it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self, click.Group):
            self.params.append(
                click.Option(
                    ["--debug"],
                    is_flag=True,
                    expose_value=False,
                    is_eager=True,
                    callback=_debug_after_the_command,
                    help=_DEBUG_HELP,
                )
            )

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            # click's option parser raises some (an option short of its values) bare.
            exc.ctx = exc.ctx or ctx
            raise


class _Group(_Command, click.Group):
    command_class = _Command


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("--debug", is_flag=True, help=_DEBUG_HELP)
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
    5 job not complete, 6 network, 7 integrity, 8 bad data, 130 interrupted,
    143 terminated (SIGTERM).
    """
    _session.debug = debug
    _log_to_stderr(debug)


# -- download ----------------------------------------------------------------------------------


@cli.command()
@click.argument("job_id", callback=_check_job_id)
@api_options
@click.option(
    "--output-dir",
    "-o",
    type=click.Path(file_okay=False),
    callback=_check_output_dir,
    default="./datasets",
    show_default=True,
    help="Where to write; the dataset goes to OUTPUT_DIR/JOB_ID/.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(export.FORMATS),
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
@click.option(
    "--on-error",
    type=click.Choice(["raise", "skip"]),
    default="raise",
    show_default=True,
    help="An image that cannot be decoded (numpy only): stop with exit 8, or leave it out "
    "(named on stderr; X.npy then holds fewer rows).",
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
    on_error: str,
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
      pixcrawler download job_123 --on-error skip
    """
    if image_size is not None and fmt != "numpy":
        raise CliError("--image-size applies to --format numpy only", EXIT_USAGE)
    if image_size is not None:
        try:
            validate_image_size(image_size)
        except ValueError as exc:
            raise CliError(f"--image-size: {exc}", EXIT_USAGE) from None
    if on_error != "raise" and fmt != "numpy":
        # images and zip write the bytes as packed: they decode nothing to fail on.
        raise CliError("--on-error applies to --format numpy only", EXIT_USAGE)
    key, url = _resolve_key(api_key), _resolve_url(base_url)
    with contextlib.ExitStack() as stack:
        try:
            dataset = stack.enter_context(load_dataset(job_id, key, url, max_workers=max_workers))
        except ValueError as exc:  # the key given as the job id
            raise CliError(str(exc), EXIT_USAGE) from None
        root = output_dir / job_id
        _check_folder_path(root)
        try:
            # Refused (mixed sizes for numpy) before the folder or its lock is created.
            writer = export.make_writer(fmt, dataset, root, image_size, on_error)
        except export.ExportUsageError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        try:
            stack.enter_context(export.exclusive(root))  # one download into a folder at once
        except export.ExportUsageError as exc:
            writer.close()
            raise CliError(str(exc), EXIT_USAGE) from None
        stats = dataset.stats.transfer
        try:
            todo = writer.prepare()
            if not todo and writer.complete:
                _echo(f"{job_id} is already complete in {root} ({fmt}); nothing to download.")
                return
            show = not no_progress and sys.stderr.isatty()
            with export.Progress(show, job_id, writer, todo, stats) as progress:
                export.transfer(dataset, writer, todo, max_workers, progress)
                writer.finish()
        except KeyboardInterrupt as exc:
            code, word = _interrupted(exc)
            raise CliError(f"{word}; run the same command again to resume", code) from None
        except OSError as exc:
            # A write's error names no file: say where, and that a rerun resumes.
            _unless_out_of_room(exc, f"writing under {root}", " to resume")
            if exc.errno == errno.EFBIG and exc.filename is None:  # FAT32's 4 GiB, a ulimit
                raise CliError(
                    f"{exc.strerror} while writing under {root}: a file there would be larger "
                    "than that file system (or this process's limit) allows; choose another "
                    "--output-dir or --format",
                    exit_code_for(exc),
                ) from exc
            raise
        finally:
            writer.close()
        left_out = (  # (an image failing its sha256 counts, not only one Pillow refused)
            f"; {counted(writer.skipped_total, 'corrupt image')} left out"
            if writer.skipped_total
            else ""
        )
        _echo(
            f"Downloaded {job_id}: {counted(writer.total_images, 'image')} in "
            f"{counted(len(dataset.job.chunks), 'chunk')} to {root} ({writer.describe()})"
            f"{left_out}; "
            f"received {human_size(stats.bytes_received)}."
        )


def _unless_out_of_room(exc: OSError, doing: str, then: str = "") -> None:
    """The CliError of a full disk or quota (``exc`` naming no file): what was being done,
    and to make room and run the command again."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and exc.filename is None:
        raise CliError(
            f"{exc.strerror} while {doing}: make room and run the same command again{then}",
            exit_code_for(exc),
        ) from exc


def _check_folder_path(root: Path) -> None:
    """A usage error (exit 2), not an OSError (exit 1, "unexpected"), where the download's
    folder cannot be: it, or a folder above it, is a file or a broken symbolic link."""
    for path in (root, *root.parents):
        if path.is_dir():
            return  # (following links: one to a folder is a folder)
        if path.exists():
            what = "a symbolic link to a file" if path.is_symlink() else "a file"
        elif path.is_symlink():
            what = "a broken symbolic link"
        else:
            continue
        where = "the download's folder" if path == root else f"a folder on the way to {root}"
        raise CliError(f"{path} is {what}, where {where} goes", EXIT_USAGE)


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
        jobs = _newest_first(list(_all_jobs(client)))
    finally:
        client.close()
    if not jobs:
        _echo("No datasets.")
        return
    _echo(format_table(jobs))


def _all_jobs(client: ApiClient) -> Iterator[Job]:
    """Every page's jobs, each once. A page that brings no job not seen before ends the
    listing: a server that ignores ``page`` (or claims endless pages) cannot loop it."""
    page = 1
    seen: set[str] = set()
    first_page = 0  # the first page's length: the page size the server keeps to
    while True:
        data = client.list_jobs(page=page, size=config.DEFAULT_PAGE_SIZE)
        items = data["items"]
        first_page = first_page or len(items)
        new = 0
        for item in items:
            if isinstance(item, dict):
                try:
                    job = Job.from_json(item)
                except PixCrawlerError as exc:  # one odd summary must not hide the rest
                    log.warning("a job the API listed is left out: %s", exc)
                    continue
                if job.id not in seen:
                    seen.add(job.id)
                    new += 1
                    yield job
        if not new or not _more(data, page, len(seen), len(items), first_page):
            return
        page += 1


def _more(data: dict[str, Any], page: int, seen: int, listed: int, first_page: int) -> bool:
    """Whether a listing has a page after ``page``: by its ``pages``, else by its ``total``
    (jobs not seen yet), else by this page being as full as the first (a server may keep
    to a smaller page size than asked for, saying so or not)."""
    pages, total = count_or_none(data.get("pages")), count_or_none(data.get("total"))
    if pages:  # (0 pages is no count of them)
        return page < pages
    if total is not None:
        return seen < total
    return listed >= first_page > 0


def _newest_first(jobs: list[Job]) -> list[Job]:
    """By creation time, newest first (a job whose time cannot be read, last); the
    server's order among equals."""
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(jobs, key=lambda job: parse_time(job.created_at) or oldest, reverse=True)


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
        name = redact(" ".join(job.name.split()))  # before the cut, which would keep a key's head
        if len(name) > _NAME_WIDTH:
            name = name[: _NAME_WIDTH - 1] + "…"
        rows.append(
            (
                job.id,
                name,
                status,
                f"{images:,}" if images else "-",  # a summary of an uncounted job says 0
                human_size(job.size_bytes) if job.size_bytes else "-",  # 0: not listed
                created.strftime("%Y-%m-%d %H:%M:%S") if created else "-",
            )
        )
    rows = [tuple(_printable(redact(cell)) for cell in row) for row in rows]  # (aligned as shown)
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
      Labels: bird, cat, dog (3 classes)
    """
    client = _connect(api_key, base_url)
    try:
        job = client.get_job(job_id)
    except ValueError as exc:  # the key given as the job id
        raise CliError(str(exc), EXIT_USAGE) from None
    finally:
        client.close()
    _echo(format_info(job))


def format_info(job: Job) -> str:
    """``str(DatasetInfo)``; a job not completed shows its progress on the Status line.
    A field (a label, say) can add no line of its own: its line breaks are neutralised."""
    info = DatasetInfo.from_job(job)
    labels = tuple(_printable(label, lines=False) for label in info.labels)
    info = dataclasses.replace(info, labels=labels)
    lines = str(info).split("\n")
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
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise CliError("no API key given (no input to read it from)", EXIT_USAGE)
        if sys.stdin.isatty():
            try:  # (click's prompt turns end of input into Abort, which reads as Ctrl-C)
                api_key = getpass.getpass("PixCrawler API key: ", stream=sys.stderr)
            except EOFError:  # Ctrl-D
                sys.stderr.write("\n")  # (the error goes on a line of its own)
                raise CliError("no API key given (end of input)", EXIT_USAGE) from None
        else:
            api_key = sys.stdin.readline()
    api_key = clean_key(api_key or "")
    _session.remember(api_key)
    if not api_key:
        raise CliError("no API key given", EXIT_USAGE)
    problem = key_problem(api_key)
    if problem:  # saved, it would be refused by every later command
        raise CliError(f"not saved: the API key given is not one ({problem})", EXIT_USAGE)
    path = save_api_key(api_key)
    _echo(f"API key saved to {path} (readable by you only).")
    if clean_key(os.environ.get(config.ENV_API_KEY, "")):  # (a blank one is no key)
        _echo(
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
    type=click.IntRange(1, config.MAX_MEMBERS - 1),
    default=config.DEFAULT_CHUNK_SIZE,
    show_default=True,
    help=f"Images per chunk archive (readers take at most {config.MAX_MEMBERS:,} members in "
    "a chunk, its manifest among them).",
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
    except KeyboardInterrupt as exc:
        code, word = _interrupted(exc)
        raise CliError(
            f"{word}; nothing half-written is published: run the same command again", code
        ) from None
    except OSError as exc:
        _unless_out_of_room(exc, f"packing into {store}; nothing half-written is published")
        raise
    labels = len(result.labels)
    _echo(
        f"Packed {result.job_id}: {counted(result.total_images, 'image')}, "
        f"{counted(labels, 'label')}, {counted(result.num_chunks, 'chunk')} "
        f"({human_size(result.size_bytes)}) into {store}"
    )
    if result.skipped:
        count = len(result.skipped)
        _echo(f"Skipped {counted(count, 'file')}:")
        for path, reason in result.skipped:
            # One line each, whatever the name holds (a file may be named "a\n  b: ...").
            _echo(f"  {_printable(path, lines=False)}: {_printable(reason, lines=False)}")


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
        serve_store(store, host, port, debug=_session.debug)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


@cli.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the images and the store here. [default: a temporary folder]",
)
@click.option(
    "--images-per-class",
    # demo.MIN_IMAGES_PER_CLASS and DIGITS_PER_CLASS (the module is imported lazily)
    type=click.IntRange(min=10, max=174),
    default=100,
    show_default=True,
    help="Digits per class (0-9).",
)
def demo(workdir: Path | None, images_per_class: int) -> None:
    """Run the whole path on real data in seconds (needs the [demo] extra).

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
        run_demo(workdir, images_per_class=images_per_class, echo=_echo)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


if __name__ == "__main__":  # pragma: no cover
    main()
