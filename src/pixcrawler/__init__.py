"""PixCrawler SDK: load PixCrawler image datasets lazily, chunk by chunk.

Example:
    >>> from pixcrawler import load_dataset
    >>> dataset = load_dataset("job_abc123", api_key="your_api_key")
    >>> for image, label in dataset:
    ...     print(image.shape, label)
"""

from __future__ import annotations

from .dataset import Dataset, DatasetInfo, load_dataset
from .exceptions import (
    AuthenticationError,
    DecompressionError,
    DownloadError,
    JobNotCompleteError,
    NetworkError,
    NotFoundError,
    PixCrawlerError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Dataset",
    "DatasetInfo",
    "DecompressionError",
    "DownloadError",
    "JobNotCompleteError",
    "NetworkError",
    "NotFoundError",
    "PixCrawlerError",
    "load_dataset",
]
