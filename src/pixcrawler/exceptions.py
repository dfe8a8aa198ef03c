"""The one exception hierarchy of the SDK.

Every error the SDK raises on purpose is a :class:`PixCrawlerError`; each carries the
fields a caller needs to react (``status_code``, ``progress``, ``chunk_id`` ...) and a
message that says what to do. No message ever contains an API key.
"""

from __future__ import annotations

import json
import sys
from typing import Any, ClassVar

from .redaction import redact

# A note every error with fields carries: a DataLoader re-raises a worker's error as
# ``type(error)(its traceback's text)``, and the fields come back from this line. Python
# 3.10 has no notes: there an error raised in a DataLoader worker prints the line after its
# message instead (only there: its text is all that leaves the worker).
_FIELDS_NOTE = "pixcrawler error fields: "
_NOTES = hasattr(BaseException, "add_note")
_CHAINED = (  # what a traceback prints between an error and the one it chains
    "\nThe above exception was the direct cause of the following exception:\n",
    "\nDuring handling of the above exception, another exception occurred:\n",
)


class PixCrawlerError(Exception):
    """Base class of every error raised by the SDK."""

    _FIELDS: ClassVar[tuple[str, ...]] = ("status_code",)

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        message = redact(message)  # a key a server echoed, quoted in the message
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        if message.startswith("Caught ") and _FIELDS_NOTE in message:
            self._restore_fields(message)
        elif _NOTES and hasattr(self, "add_note") and self._fields_line():
            self.add_note(self._fields_line())

    def __str__(self) -> str:
        text = super().__str__()
        if not _NOTES and _in_dataloader_worker() and self._fields_line():
            text += "\n" + self._fields_line()
        return text

    def _fields_line(self) -> str:
        """The note of this error's fields, or "" when it has none."""
        fields = {name: getattr(self, name, None) for name in self._FIELDS}
        if all(value is None for value in fields.values()):
            return ""
        return _FIELDS_NOTE + json.dumps(fields, ensure_ascii=False)

    def _restore_fields(self, text: str) -> None:
        """Fields from the note in ``text``, a worker's traceback as a DataLoader re-raises it
        (``Caught DownloadError in DataLoader worker process 0. Original Traceback ...``)."""
        for separator in _CHAINED:  # the raised error's own part: after the errors it chains
            text = text.rpartition(separator)[2]
        if _FIELDS_NOTE not in text:
            return
        line = text[text.rindex(_FIELDS_NOTE) + len(_FIELDS_NOTE) :].partition("\n")[0]
        try:
            fields: Any = json.loads(line)
        except (ValueError, RecursionError):
            return
        if isinstance(fields, dict):
            for name in self._FIELDS:
                if name in fields:
                    setattr(self, name, fields[name])


def _in_dataloader_worker() -> bool:
    data = sys.modules.get("torch.utils.data")  # (never imported here for this)
    return data is not None and data.get_worker_info() is not None


class AuthenticationError(PixCrawlerError):
    """The API key is missing, invalid, or not allowed to do this (HTTP 401/403)."""


class NotFoundError(PixCrawlerError):
    """The job does not exist for this API key (HTTP 404). A chunk that is not there is a
    :class:`DownloadError` with ``status_code=404``."""


class JobNotCompleteError(PixCrawlerError):
    """The job exists but is not ``completed``; ``status`` and ``progress`` say where it is."""

    _FIELDS = ("status", "progress")

    # (Defaults only so that pickle, which calls __init__ with the message alone and then
    # restores the fields, can bring one back from a worker process.)
    def __init__(self, message: str, *, status: str = "unknown", progress: float = 0.0) -> None:
        self.status = status  # before the base class notes the fields
        self.progress = progress
        super().__init__(message)


class DownloadError(PixCrawlerError):
    """A chunk could not be downloaded intact after the retries."""

    _FIELDS = ("chunk_id", "status_code", "retry_after")

    def __init__(
        self,
        message: str,
        *,
        chunk_id: int | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.chunk_id = chunk_id
        self.status_code = status_code
        self.retry_after = retry_after
        super().__init__(message, status_code=status_code)


class _ImageError(PixCrawlerError):
    """An error about an image (or a chunk of them): ``chunk_id`` and ``sample_id``."""

    _FIELDS = ("chunk_id", "sample_id")

    def __init__(
        self, message: str, *, chunk_id: int | None = None, sample_id: str | None = None
    ) -> None:
        self.chunk_id = chunk_id
        self.sample_id = sample_id
        super().__init__(message)


class DecompressionError(_ImageError):
    """A chunk archive or an image in it is malformed, hostile or cannot be decoded."""


class NetworkError(PixCrawlerError):
    """The API could not be reached, timed out, or kept failing after the retries."""

    _FIELDS = ("status_code", "retry_after")

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.retry_after = retry_after
        super().__init__(message, status_code=status_code)


class MissingDependencyError(PixCrawlerError, ImportError):
    """An optional framework is needed; the message names the extra to install."""


class MixedImageSizesError(_ImageError, ValueError):
    """Images of different sizes cannot be stacked into one array without ``image_size``;
    ``chunk_id`` and ``sample_id`` name the first image that differs."""


__all__ = [
    "AuthenticationError",
    "DecompressionError",
    "DownloadError",
    "JobNotCompleteError",
    "MissingDependencyError",
    "MixedImageSizesError",
    "NetworkError",
    "NotFoundError",
    "PixCrawlerError",
]
