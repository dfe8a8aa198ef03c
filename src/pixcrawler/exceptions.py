"""The one exception hierarchy of the SDK.

Every error the SDK raises on purpose is a :class:`PixCrawlerError`; each carries the
fields a caller needs to react (``status_code``, ``progress``, ``chunk_id`` ...) and a
message that says what to do. No message ever contains an API key.
"""

from __future__ import annotations


class PixCrawlerError(Exception):
    """Base class of every error raised by the SDK."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class AuthenticationError(PixCrawlerError):
    """The API key is missing, invalid, or not allowed to do this (HTTP 401/403)."""


class NotFoundError(PixCrawlerError):
    """The job (or one of its chunks) does not exist for this API key (HTTP 404)."""


class JobNotCompleteError(PixCrawlerError):
    """The job exists but is not ``completed``; ``status`` and ``progress`` say where it is."""

    # (Defaults only so that pickle, which calls __init__ with the message alone and then
    # restores the fields, can bring one back from a worker process.)
    def __init__(self, message: str, *, status: str = "unknown", progress: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.progress = progress


class DownloadError(PixCrawlerError):
    """A chunk could not be downloaded intact after the retries."""

    def __init__(
        self, message: str, *, chunk_id: int | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.chunk_id = chunk_id


class DecompressionError(PixCrawlerError):
    """A chunk archive or an image in it is malformed, hostile or cannot be decoded."""

    def __init__(
        self, message: str, *, chunk_id: int | None = None, sample_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.chunk_id = chunk_id
        self.sample_id = sample_id


class NetworkError(PixCrawlerError):
    """The API could not be reached, timed out, or kept failing after the retries."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class MissingDependencyError(PixCrawlerError, ImportError):
    """An optional framework is needed; the message names the extra to install."""


class MixedImageSizesError(PixCrawlerError, ValueError):
    """Images of different sizes cannot be stacked into one array without ``image_size``."""


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
