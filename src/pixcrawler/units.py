"""Sizes as people read them."""

from __future__ import annotations


def human_size(size: float) -> str:
    """1024-based, one decimal: ``2684354560`` → ``2.5 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        # Rounded first: 1,048,575 bytes is "1.0 MB", never "1024.0 KB".
        if round(size, 0 if unit == "B" else 1) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PB"  # pragma: no cover
