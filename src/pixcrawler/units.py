"""Sizes as people read them; times as the wire writes them."""

from __future__ import annotations

import re
from datetime import datetime, timezone

_FRACTION = re.compile(r"[.,](\d+)")
_EXTENDED_DATE = re.compile(r"\d{4}-\d\d-\d\d")
_BASIC_TIME = re.compile(r"\d{3}")  # hhmm, not hh or hh:mm
_ODD_OFFSET = re.compile(r"[+-]\d\d:?\d\d[.,]")  # an offset with a fraction
# A UTC offset at the end of a time: "+0530", "+05" and "+05:30" are all ISO 8601.
_OFFSET = re.compile(r"([+-])(\d\d):?(\d\d)?$")


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
    # Python 3.10's fromisoformat takes neither "Z", nor fractions of other than 3 or 6
    # digits (".5", Go's nanoseconds) or after a comma, nor an offset but "+05:30" ("+00",
    # as Postgres writes it): each in the one form it takes, then, in every version.
    text = value.strip()
    date, sep, time = text[:10], text[10:11], text[11:]
    # The extended forms alone: 3.11 takes the basic ones ("20240102T030405Z") and week
    # dates too, which 3.10 does not.
    if not _EXTENDED_DATE.fullmatch(date) or _BASIC_TIME.match(time) or _ODD_OFFSET.search(time):
        return None
    if time and sep not in ("T", "t", " "):  # (3.10 read any character there, 3.11 too)
        return None
    if time:
        time = _FRACTION.sub(lambda m: "." + m[1][:6].ljust(6, "0"), time, count=1)
        time = _OFFSET.sub(lambda m: f"{m[1]}{m[2]}:{m[3] or '00'}", time, count=1)
        text = date + sep + time
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.astimezone(timezone.utc)
    except (ValueError, OverflowError):  # not a date, or past year 9999 once in UTC
        return None
