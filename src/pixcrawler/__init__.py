"""PixCrawler SDK: load PixCrawler image datasets lazily, chunk by chunk.

Example:
    >>> from pixcrawler import load_dataset
    >>> dataset = load_dataset("job_abc123", api_key="your_api_key")
    >>> for image, label in dataset:
    ...     print(image.shape, label)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .exceptions import (
    AuthenticationError,
    DecompressionError,
    DownloadError,
    JobNotCompleteError,
    NetworkError,
    NotFoundError,
    PixCrawlerError,
)

if TYPE_CHECKING:
    from .dataset import Dataset, DatasetInfo, load_dataset

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

# Imported on first use: numpy, Pillow and urllib3 take a few hundred milliseconds, which
# `import pixcrawler.exceptions`, `python -m pixcrawler --help` and a Ctrl-C pressed while
# a command starts need not wait for.
_FROM_DATASET = frozenset({"Dataset", "DatasetInfo", "load_dataset"})


def __getattr__(name: str) -> Any:
    if name in _FROM_DATASET:
        from . import dataset

        value = getattr(dataset, name)
        globals()[name] = value
        return value
    try:  # a submodule, as eager imports used to leave them: pixcrawler.config.X = ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":  # the submodule is there; what it needs is not
            raise
    raise AttributeError(f"module 'pixcrawler' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _FROM_DATASET)
