"""Where the API key and base URL come from: argument, environment, then the login file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from . import config
from .exceptions import AuthenticationError

CREDENTIALS_FILE = "credentials.json"


def config_dir() -> Path:
    """The per-user config directory (``PIXCRAWLER_CONFIG_DIR`` overrides the platform's)."""
    override = os.environ.get(config.ENV_CONFIG_DIR)
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir("pixcrawler", appauthor=False))


def credentials_path() -> Path:
    return config_dir() / CREDENTIALS_FILE


def save_api_key(api_key: str) -> Path:
    """Write the key for later commands, readable by the user only (mode 0600): a new file
    of a name no one else can have planted (a link to their file, say), synced, then renamed
    over the old one. A config folder this creates is the user's only (0700)."""
    path = credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".credentials-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:  # mkstemp: O_EXCL, mode 0600
            json.dump({"api_key": api_key}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def stored_api_key() -> str | None:
    """The key ``pixcrawler login`` saved, or None (no file, or one that cannot be read)."""
    try:  # utf-8-sig: a file an editor saved with a byte-order mark reads as well
        data = json.loads(credentials_path().read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, RecursionError):  # RecursionError: absurd nesting
        return None
    key = data.get("api_key") if isinstance(data, dict) else None
    return key if isinstance(key, str) and key else None


def other_api_keys() -> set[str]:
    """The keys ``PIXCRAWLER_API_KEY`` and the ``pixcrawler login`` file hold (cleaned)."""
    values = (os.environ.get(config.ENV_API_KEY), stored_api_key())
    return {clean for value in values if value and (clean := clean_key(value))}


def clean_key(text: str) -> str:
    """A key as pasted or saved, without what surrounds it: white space, an editor's
    byte-order mark, and one pair of quotes around it (a value copied from a .env or JSON
    file: Docker's --env-file keeps them)."""
    key = text.lstrip("\ufeff").strip()
    if len(key) >= 2 and key[0] == key[-1] and key[0] in "\"'":
        key = key[1:-1].strip()
    return key


def key_problem(key: str) -> str | None:
    """What makes ``key`` unusable in an ``Authorization`` header, or None."""
    if not key:
        return "it is empty"
    if not key.isascii() or any(c.isspace() or not c.isprintable() for c in key):
        return "it contains whitespace, control characters or non-ASCII characters"
    return None


NO_KEY_MESSAGE = (
    "No API key given: pass api_key=..., set the PIXCRAWLER_API_KEY environment variable, "
    "or run `pixcrawler login`."
)


def resolve_api_key(api_key: str | None) -> str:
    """The explicit key, else ``PIXCRAWLER_API_KEY``, else the ``pixcrawler login`` file."""
    if api_key is not None and not isinstance(api_key, str):  # (never shown: it may be one)
        raise ValueError(f"api_key must be a string, got {type(api_key).__name__}")
    sources = (api_key, os.environ.get(config.ENV_API_KEY), stored_api_key())
    # A blank value is no key, as an empty one is: PIXCRAWLER_API_KEY=$'\r' from a CRLF
    # .env file must not hide the key `pixcrawler login` saved.
    key = next((clean for value in sources if value and (clean := clean_key(value))), "")
    if not key:
        path = credentials_path()
        try:
            there = path.exists()  # there, but not a key: not the same as never logged in
        except OSError:  # a config folder this user may not look into
            there = False
        if there:
            raise AuthenticationError(
                f"No API key given, and the `pixcrawler login` file {path} holds none that "
                "can be read: run `pixcrawler login` again, or pass api_key=... or set "
                "PIXCRAWLER_API_KEY."
            )
        raise AuthenticationError(NO_KEY_MESSAGE)
    problem = key_problem(key)
    if problem:
        # Refused here, unquoted: the HTTP layer would put the key, escaped, in its error.
        raise AuthenticationError(
            f"The API key cannot be used: {problem} inside it; check the value given "
            "(api_key=..., PIXCRAWLER_API_KEY or the `pixcrawler login` file)."
        )
    return key


def resolve_base_url(base_url: str | None) -> str:
    """The explicit URL, else ``PIXCRAWLER_BASE_URL``, else the production API. A blank
    value is none (as a blank key is); the variable's value loses what surrounds it as a
    key does (quotes kept by Docker's --env-file), and a malformed one is a ValueError
    that names the variable, not ``base_url``."""
    if base_url and base_url.strip():
        return base_url
    env = clean_key(os.environ.get(config.ENV_BASE_URL) or "")
    if not env:
        return config.DEFAULT_BASE_URL
    from .client import api_root  # (client imports this module)

    try:
        api_root(env)
    except ValueError as exc:
        raise ValueError(f"${config.ENV_BASE_URL}: {exc}") from None
    return env
