"""The retry policy on its own: backoff with jitter, Retry-After in both its forms."""

from __future__ import annotations

import email.utils
import statistics
import time

import pytest

from pixcrawler import load_dataset
from pixcrawler.retry import RetryPolicy, parse_retry_after, status_cause


def test_backoff_doubles_per_failure_with_full_jitter_up_to_its_cap() -> None:
    policy = RetryPolicy(retries=10, backoff_base=0.5, backoff_max=4.0)
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (9, 4.0)]:
        delays = [policy.delay(failures) for _ in range(2_000)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # Spread over the whole window (jitter), not bunched: clients retrying together
        # do not hit a rate-limited API together again.
        assert max(delays) > 0.95 * ceiling and min(delays) < 0.05 * ceiling
        assert statistics.mean(delays) == pytest.approx(ceiling / 2, rel=0.1)


def test_backoff_after_a_thousand_failures_is_its_cap_not_an_overflow() -> None:
    """backoff_base * 2**1024 raised OverflowError after 1,025 failures (retries=2000)."""
    policy = RetryPolicy(retries=5000, backoff_base=0.5, backoff_max=4.0)
    assert all(0.0 <= policy.delay(failures) <= 4.0 for failures in (1025, 5000, 10**9))


def test_a_numpy_int_is_a_number_of_retries() -> None:
    import numpy as np

    policy = RetryPolicy(retries=np.int64(3))  # type: ignore[arg-type]
    assert policy.retries == 3 and type(policy.retries) is int


def test_retry_after_is_the_least_wait_and_the_backoff_still_applies() -> None:
    policy = RetryPolicy(backoff_base=0.5, backoff_max=30.0)
    delays = [policy.delay(1, retry_after=2.5) for _ in range(200)]
    assert all(2.5 <= d <= 2.75 for d in delays)  # what was asked, and up to a tenth more
    assert len(set(delays)) > 100  # jittered: clients told the same come back apart
    # "Retry-After: 0" (a rate limiter rounding its wait down) is no reason to hammer it:
    # every retry went at once, four requests in 3 ms, and the chunk failed.
    waits = [policy.delay(3, retry_after=0.0) for _ in range(200)]
    assert all(0.0 <= d <= 2.0 for d in waits) and sum(waits) / len(waits) > 0.5
    slow = RetryPolicy(backoff_base=100.0, backoff_max=100.0)
    assert all(2.5 <= slow.delay(1, retry_after=2.5) <= 100.0 for _ in range(50))
    capped = RetryPolicy(max_retry_after=60.0)  # the jitter never sleeps past the cap
    assert all(60.0 <= capped.delay(1, retry_after=60.0) <= 60.0 for _ in range(50))
    assert all(59.0 <= capped.delay(1, retry_after=59.0) <= 60.0 for _ in range(50))


def test_retry_after_as_seconds_or_as_an_http_date() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(" 0.5 ", now=now) == 0.5
    # No delta-seconds (RFC 9110: digits), so no wait to honour: the backoff applies. As
    # floats, "-3" and "nan" were retries at once, with no backoff at all.
    for invalid in ("-3", "nan", "-inf", "inf", "1e9", "1_0", "+5", "0x10", "٣"):
        assert parse_retry_after(invalid, now=now) is None, invalid
    later = email.utils.formatdate(now + 90, usegmt=True)  # "Fri, 15 Jan 2027 08:01:30 GMT"
    assert parse_retry_after(later, now=now) == pytest.approx(90.0)
    earlier = email.utils.formatdate(now - 90, usegmt=True)
    assert parse_retry_after(earlier, now=now) == 0.0  # already past: retry now
    for absent in (None, "", "soon", "Fri, 99 Foo 2027"):
        assert parse_retry_after(absent, now=now) is None
    # A year past any calendar was an OverflowError out of load_dataset and iteration.
    absurd = "Sun, 06 Nov 99999999999999999999 08:49:37 GMT"
    assert parse_retry_after(absurd, now=now) is None


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset")
@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Tokyo"])
def test_every_http_date_form_is_gmt_whatever_the_local_zone(
    zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9110's three date forms; the asctime one carries no zone, and was read as local
    time (New York waited five hours more, Tokyo not at all)."""
    now = 1_800_000_000.0
    later = time.gmtime(now + 90)
    forms = [
        email.utils.formatdate(now + 90, usegmt=True),  # IMF-fixdate
        time.strftime("%A, %d-%b-%y %H:%M:%S GMT", later),  # RFC 850
        f"{time.strftime('%a %b', later)} {later.tm_mday:2d} "
        + time.strftime("%H:%M:%S %Y", later),  # asctime: "Fri Jan 15 08:01:30 2027"
        email.utils.formatdate(now + 90).replace("+0000", "-0000"),
    ]
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        for form in forms:
            assert parse_retry_after(form, now=now) == pytest.approx(90.0), form
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_retry_after_longer_than_the_limit_is_not_waited() -> None:
    policy = RetryPolicy(max_retry_after=60.0)
    assert policy.retry_after_too_long(61.0)
    assert not policy.retry_after_too_long(60.0) and not policy.retry_after_too_long(None)
    assert status_cause(429, 30.0) == "HTTP 429 (Retry-After 30 s)"
    assert status_cause(503, None) == "HTTP 503"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "retries must be a whole number >= 0, got -1"),
        ({"backoff_base": -0.1}, "backoff_base must be a number of seconds >= 0"),
        ({"backoff_max": -1.0}, "backoff_max must be a number of seconds >= 0"),
        # Of the wrong type: a raw TypeError from a comparison, or 1.5 retries taken.
        ({"retries": "3"}, "retries must be a whole number >= 0, got '3'"),
        ({"retries": 1.5}, "retries must be a whole number >= 0, got 1.5"),
        ({"retries": True}, "retries must be a whole number >= 0, got True"),
        ({"backoff_base": "x"}, "backoff_base must be a number of seconds >= 0, got 'x'"),
        ({"backoff_base": float("nan")}, "backoff_base must be a number of seconds >= 0"),
        ({"backoff_max": float("inf")}, "backoff_max must be a number of seconds >= 0"),
    ],
)
def test_a_negative_setting_is_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**options)  # type: ignore[arg-type]


def test_load_dataset_refuses_negative_retries_before_any_request() -> None:
    # Port 9 (discard) is never contacted: the argument is refused first.
    with pytest.raises(ValueError, match="retries must be a whole number >= 0"):
        load_dataset("job_x", "k", "http://127.0.0.1:9", retries=-1)
    with pytest.raises(ValueError, match="backoff"):
        load_dataset("job_x", "k", "http://127.0.0.1:9", backoff=-1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # None turned certificate checks off; "false" or a CA bundle's path checked them
        # against the system's store.
        ({"verify_ssl": None}, "verify_ssl must be True or False, got None"),
        ({"verify_ssl": "false"}, "verify_ssl must be True or False, got 'false'"),
        ({"verify_ssl": "/etc/ca.pem"}, "verify_ssl must be True or False"),
        ({"retries": "3"}, "retries must be a whole number >= 0, got '3'"),
        ({"backoff": "x"}, "backoff_base must be a number of seconds >= 0, got 'x'"),
        # A key of another type: AttributeError; never shown (it may be the key, as bytes).
        ({"api_key": b"sk-bytes-key"}, "api_key must be a string, got bytes"),
        ({"api_key": 12345}, "api_key must be a string, got int"),
    ],
)
def test_load_dataset_refuses_arguments_of_the_wrong_type_before_any_request(
    options: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"api_key": "k", **options}
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("job_x", base_url="http://127.0.0.1:9", **arguments)  # type: ignore[arg-type]
    assert "sk-bytes-key" not in str(info.value)
