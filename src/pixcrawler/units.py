"""Sizes as people read them; times as the wire writes them."""

from __future__ import annotations

import re
from datetime import datetime, timezone

_FRACTION = re.compile(r"\.(\d+)")


def human_size(size: float) -> str:
    """1024-based, one decimal: ``2684354560`` → ``2.5 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        # Rounded first: 1,048,575 bytes is "1.0 MB", never "1024.0 KB".
        if round(size, 0 if unit == "B" else 1) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PB"  # pragma: no cover


def counted(count: int, noun: str) -> str:
    """``1 chunk``, ``2,000 chunks``: a count and its noun, in the plural but for one."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def parse_time(value: str | None) -> datetime | None:
    """An ISO 8601 time (``Z`` or an offset; none means UTC) in UTC; None if it is not one."""
    if not value:
        return None
    # Python 3.10's fromisoformat takes neither "Z" nor fractions of other than 3 or 6
    # digits (".5", Go's nanoseconds): six digits, then, in every version.
    text = _FRACTION.sub(lambda m: "." + m[1][:6].ljust(6, "0"), value.strip(), count=1)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.astimezone(timezone.utc)
    except (ValueError, OverflowError):  # not a date, or past year 9999 once in UTC
        return None
