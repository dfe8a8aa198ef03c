"""PixCrawler SDK: load PixCrawler image datasets lazily, chunk by chunk.

Example:
    >>> from pixcrawler import load_dataset
    >>> dataset = load_dataset("job_abc123", api_key="your_api_key")
    >>> for image, label in dataset:
    ...     print(image.shape, label)
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

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
    "MissingDependencyError",
    "MixedImageSizesError",
    "NetworkError",
    "NotFoundError",
    "PixCrawlerError",
    "load_dataset",
]

# Imported on first use: numpy, Pillow and urllib3 take a few hundred milliseconds, which
# `import pixcrawler.exceptions`, `python -m pixcrawler --help` and a Ctrl-C pressed while
# a command starts need not wait for.
_FROM_DATASET = frozenset({"Dataset", "DatasetInfo", "load_dataset"})


if not TYPE_CHECKING:  # (type checkers see the names above, and flag a typo in any other)

    def __getattr__(name: str) -> Any:
        if name in _FROM_DATASET:
            from . import dataset

            value = getattr(dataset, name)
            globals()[name] = value
            return value
        # A submodule, as the eager imports used to leave them: pixcrawler.config.X = ...
        if name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'pixcrawler' has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*__all__, "__version__"})
