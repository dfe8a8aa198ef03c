"""The API keys this process uses, scrubbed from every message the SDK makes.

The key is never formatted into a message on purpose. A server may still echo it back,
in a header, a job field or an error (a debugging proxy that prints the request it got),
and the SDK quotes such text in its errors and logs: every :class:`PixCrawlerError`
message and every record of the ``pixcrawler`` logger is scrubbed of the keys known here.
Text cut short for a message is scrubbed before the cut, or a key at the cut would keep
its head (:func:`shown`).
"""

from __future__ import annotations

import logging
import threading

from . import config

_KEYS: set[str] = set()
_LOCK = threading.Lock()


def remember(key: str | None) -> None:
    """Scrub ``key`` from every message made from now on (a key too short to scrub without
    garbling every message is not)."""
    if key and len(key.strip()) >= config.MIN_REDACTED_KEY:
        with _LOCK:
            _KEYS.update((key, key.strip()))


def known_keys() -> frozenset[str]:
    with _LOCK:
        return frozenset(_KEYS)


def redact(text: str, keys: frozenset[str] | set[str] | None = None) -> str:
    """``text`` with each of ``keys`` (default: the keys remembered) replaced by ``***``;
    also each key as a repr shows it (escaped)."""
    keys = known_keys() if keys is None else keys
    if not keys:
        return text
    forms = {form for key in keys for form in (key, key.strip(), repr(key)[1:-1])}
    for form in sorted(forms, key=len, reverse=True):
        if len(form) >= config.MIN_REDACTED_KEY and form in text:
            text = text.replace(form, "***")
    return text


def shown(value: object, limit: int = 80) -> str:
    """``value`` from a server, as a message quotes it: scrubbed, then cut to ``limit``
    characters, as a repr."""
    return repr(redact(str(value))[:limit])


class _Scrub(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _KEYS:
            message = record.getMessage()
            clean = redact(message)
            if clean != message:
                record.msg, record.args = clean, None
        return True


logging.getLogger("pixcrawler").addFilter(_Scrub())
