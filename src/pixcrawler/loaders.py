"""Bridges to ML frameworks; each framework is imported only when its bridge is used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .exceptions import MissingDependencyError

if TYPE_CHECKING:
    from collections.abc import Callable

    from .dataset import Dataset


def require(module: str, extra: str) -> Any:
    """Import an optional framework, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f'{module} is required for this; install it with: pip install "pixcrawler-sdk[{extra}]"'
        ) from exc


def to_torch(
    dataset: Dataset, transform: Callable[[Any], Any] | None = None, **options: Any
) -> Any:
    require("torch", "torch")
    raise NotImplementedError("to_torch is not available yet")


def to_tensorflow(dataset: Dataset, **options: Any) -> Any:
    require("tensorflow", "tensorflow")
    raise NotImplementedError("to_tensorflow is not available yet")
