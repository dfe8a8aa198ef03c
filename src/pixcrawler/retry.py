"""Retry policy shared by the API client and the chunk downloader.

"3 retries" means up to 4 attempts. After ``n`` failures (n >= 1) the next attempt
waits ``uniform(0, min(backoff_max, backoff_base * 2**(n-1)))`` -- exponential backoff with
full jitter, so many clients hitting one rate-limited API spread out instead of hammering
it in lockstep. A server's ``Retry-After`` is honoured up to ``max_retry_after``, with up
to a tenth more as jitter (never past ``max_retry_after``), and never waits less than the
backoff would (``Retry-After: 0`` is no reason to retry at once); a longer one is not slept but
raised to the caller, saying when to retry. One that is neither seconds nor an HTTP date
("-5", "nan") is ignored.
"""

from __future__ import annotations

import email.utils
import logging
import math
import numbers
import random
import re
import time
from dataclasses import dataclass
from datetime import timezone

from . import config
from .units import counted

log = logging.getLogger("pixcrawler")
_MAX_DOUBLINGS = 64
_RETRY_AFTER_JITTER = 0.1
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")  # (a fraction is lenient, and harmless)


class Attempts:
    """The failed attempts of a transfer or call under way, as the lines saying why it is
    slow tell them (a chunk's, an API call's): each failure's cause, and when the next
    attempt starts."""

    failures = 0
    problem: str | None = None  # the last failure's cause
    retry_at: float | None = None  # when the next attempt starts (monotonic clock)

    def failed(self, problem: str, delay: float) -> None:
        self.problem = problem
        self.retry_at = time.monotonic() + delay
        self.failures += 1  # last: a line made meanwhile counts it with its cause

    def last_failure(self) -> str:
        """``N failed attempts, the last: CAUSE`` (once one has failed)."""
        return f"{counted(self.failures, 'failed attempt')}, the last: {self.problem}"

    def next_in(self, now: float) -> str | None:
        """``the next in N s`` while the next attempt waits; None once it is under way."""
        if self.retry_at is None or self.retry_at <= now:
            return None
        return f"the next in {self.retry_at - now:.1f} s"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed request is retried."""

    retries: int = config.DEFAULT_RETRIES
    backoff_base: float = config.DEFAULT_BACKOFF_BASE
    backoff_max: float = config.DEFAULT_BACKOFF_MAX
    max_retry_after: float = config.MAX_RETRY_AFTER

    def __post_init__(self) -> None:
        retries = self.retries
        if isinstance(retries, bool) or not isinstance(retries, numbers.Integral) or retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {retries!r}")
        object.__setattr__(self, "retries", int(retries))  # (a numpy int, as a plain one)
        for name in ("backoff_base", "backoff_max", "max_retry_after"):
            value = getattr(self, name)
            real = not isinstance(value, bool) and isinstance(value, numbers.Real)
            if not real or not 0 <= float(value) < math.inf:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait before the next attempt, after ``failures`` failed ones."""
        # (The exponent stops growing long past backoff_max: 2.0**1024 would overflow.)
        doubling = 2.0 ** min(max(0, failures - 1), _MAX_DOUBLINGS)
        ceiling = min(self.backoff_max, self.backoff_base * doubling)
        backoff = random.uniform(0.0, ceiling)
        if retry_after is None:
            return backoff
        # At least what the server asked, and up to a tenth more: clients all told
        # "Retry-After: 1" at once would otherwise all come back at once. Never less than
        # the backoff: a rate limiter rounding its wait down says "Retry-After: 0", and
        # every retry went at once (four requests in 3 ms, then the chunk failed).
        asked = max(0.0, retry_after)
        jittered = asked * random.uniform(1.0, 1.0 + _RETRY_AFTER_JITTER)
        return max(asked, min(jittered, self.max_retry_after), backoff)  # (the cap: jitter's)

    def announce(self, what: str, cause: str, failures: int, delay: float) -> None:
        """Log a retry as it starts (WARNING): what failed, why, which retry, and when."""
        log.warning("%s: %s; retry %d of %d in %.1f s", what, cause, failures, self.retries, delay)

    def retry_after_too_long(self, retry_after: float | None) -> bool:
        return retry_after is not None and retry_after > self.max_retry_after


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return float(value)
    # Else an HTTP date, or nothing: "-5", "nan", "1e9" and "1_0" are no delta-seconds (RFC
    # 9110: digits). Slept as given, "-5" and "nan" were no wait at all; now the normal
    # backoff applies.
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # asctime and "-0000" dates: HTTP dates are all GMT
            when = when.replace(tzinfo=timezone.utc)
        at = when.timestamp()
    except (TypeError, ValueError, OverflowError):  # OverflowError: a year of 20 digits
        return None
    current = time.time() if now is None else now
    return max(0.0, at - current)


_LONG_WAIT = 366 * 24 * 3600


def wait_in_words(seconds: float) -> str:
    """``30 s``; a Retry-After of 1e308 (or inf) is no time anyone waits: said as such."""
    return f"{seconds:.0f} s" if seconds < _LONG_WAIT else "more than a year"


def status_cause(status: int, retry_after: float | None) -> str:
    """A retried HTTP answer in words: ``HTTP 429 (Retry-After 30 s)``."""
    cause = f"HTTP {status}"
    return cause if retry_after is None else f"{cause} (Retry-After {retry_after:g} s)"
