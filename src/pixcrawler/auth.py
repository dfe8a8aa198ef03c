"""Where the API key and base URL come from: argument, environment, then the login file."""

from __future__ import annotations

import json
import os
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
    """Write the key for later commands, readable by the user only (mode 0600)."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"api_key": api_key}, fh)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def stored_api_key() -> str | None:
    """The key ``pixcrawler login`` saved, or None (no file, or one that cannot be read)."""
    try:
        data = json.loads(credentials_path().read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: absurd nesting
        return None
    key = data.get("api_key") if isinstance(data, dict) else None
    return key if isinstance(key, str) and key else None


NO_KEY_MESSAGE = (
    "No API key given: pass api_key=..., set the PIXCRAWLER_API_KEY environment variable, "
    "or run `pixcrawler login`."
)


def resolve_api_key(api_key: str | None) -> str:
    """The explicit key, else ``PIXCRAWLER_API_KEY``, else the ``pixcrawler login`` file."""
    key = (api_key or os.environ.get(config.ENV_API_KEY) or stored_api_key() or "").strip()
    if not key:
        raise AuthenticationError(NO_KEY_MESSAGE)
    if not key.isascii() or any(c.isspace() or not c.isprintable() for c in key):
        # Refused here, unquoted: the HTTP layer would put the key, escaped, in its error.
        raise AuthenticationError(
            "The API key contains whitespace, control characters or non-ASCII characters "
            "inside it; check the value given (api_key=..., PIXCRAWLER_API_KEY or the "
            "`pixcrawler login` file)."
        )
    return key


def resolve_base_url(base_url: str | None) -> str:
    """The explicit URL, else ``PIXCRAWLER_BASE_URL``, else the production API."""
    return base_url or os.environ.get(config.ENV_BASE_URL) or config.DEFAULT_BASE_URL
