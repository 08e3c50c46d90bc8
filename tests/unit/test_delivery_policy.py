"""Delivery policy without I/O: how long an owed delivery waits between passes, the per-URL
request rate limit, and the breaker that leaves a failing URL alone for the rest of a pass."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from syncer.delivery import (
    BREAKER_MIN_FAILURES,
    MAX_PASS_DELAY_SECONDS,
    TRIES_PER_PASS,
    Outcome,
    RateLimit,
    _Breaker,
    pass_delay,
)
from syncer.models import DELIVERY_FAILED, DELIVERY_PENDING, DELIVERY_SENT
from syncer.settings import TraySettings

TRAY = TraySettings(backoff_max_seconds=30.0)
HOUR = timedelta(seconds=3600)


# pass_delay ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "seconds"),
    [
        (0, 30),  # never tried yet (a breaker postponed it): one pass delay
        (1, 30),
        (TRIES_PER_PASS, 30),  # end of the first pass
        (TRIES_PER_PASS + 1, 60),  # one try into the second pass
        (2 * TRIES_PER_PASS, 60),
        (2 * TRIES_PER_PASS + 1, 120),
        (3 * TRIES_PER_PASS, 120),
        (4 * TRIES_PER_PASS, 240),
        (5 * TRIES_PER_PASS, 480),
        (6 * TRIES_PER_PASS, 960),
        (7 * TRIES_PER_PASS, 1920),
        (8 * TRIES_PER_PASS, 3600),  # 3840 capped
    ],
)
def test_pass_delay_doubles_with_every_pass_from_backoff_max(attempts: int, seconds: int) -> None:
    assert pass_delay(attempts, TRAY) == timedelta(seconds=seconds)


def test_pass_delay_is_the_same_within_one_pass() -> None:
    for first in range(1, 40, TRIES_PER_PASS):
        same_pass = {pass_delay(first + i, TRAY) for i in range(TRIES_PER_PASS)}
        assert len(same_pass) == 1, first


def test_pass_delay_never_shrinks_and_never_exceeds_an_hour() -> None:
    delays = [pass_delay(attempts, TRAY) for attempts in range(0, 1_000)]
    assert delays == sorted(delays)
    assert max(delays) == HOUR == timedelta(seconds=MAX_PASS_DELAY_SECONDS)
    # the default cap of 100 tries across runs stays within the hour too
    assert pass_delay(100, TraySettings()) == HOUR
    # huge counts (a long outage) and huge backoff_max settings do not overflow
    assert pass_delay(10**9, TRAY) == HOUR
    assert pass_delay(1, TraySettings(backoff_max_seconds=86_400.0)) == HOUR


def test_pass_delay_follows_backoff_max_seconds() -> None:
    fast = TraySettings(backoff_max_seconds=0.2)
    assert pass_delay(TRIES_PER_PASS, fast) == timedelta(seconds=0.2)
    assert pass_delay(TRIES_PER_PASS + 1, fast) == timedelta(seconds=0.4)
    assert pass_delay(3 * TRIES_PER_PASS + 1, fast) == timedelta(seconds=1.6)


# RateLimit -------------------------------------------------------------------------------------


def _time_calls(calls: int, rate: float) -> tuple[float, list[float]]:
    """Seconds taken by ``calls`` sequential waits on one bucket, and when each was let through."""

    async def run() -> tuple[float, list[float]]:
        limit = RateLimit(rate)
        started = time.monotonic()
        times = []
        for _ in range(calls):
            await limit.wait()
            times.append(time.monotonic() - started)
        return time.monotonic() - started, times

    return asyncio.run(run())


def _time_concurrent_calls(calls: int, rate: float, tasks: int) -> float:
    async def run() -> float:
        limit = RateLimit(rate)
        left = calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await limit.wait()

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(tasks)))
        return time.monotonic() - started

    return asyncio.run(run())


# What these check is the lower bound: the limit holds. The upper one only catches a limiter that
# stalls; it leaves room for a shared, loaded machine (1.5 s was missed by 36 ms under CI).
SLOWEST_SECONDS = 5.0


def test_rate_limit_spaces_calls_at_the_rate() -> None:
    # about (30 - 20) / 20 = 0.5 s with a burst of 20; 29 / 20 = 1.45 s without one
    seconds, _ = _time_calls(30, 20)
    assert 0.3 <= seconds <= SLOWEST_SECONDS, seconds


def test_rate_limit_holds_when_many_tasks_wait_at_once() -> None:
    seconds = _time_concurrent_calls(30, 20, tasks=16)
    assert 0.3 <= seconds <= SLOWEST_SECONDS, seconds


def test_rate_limit_no_wait_within_the_burst() -> None:
    seconds, _ = _time_calls(5, 100)
    assert seconds < 0.2, seconds


def test_rate_limit_long_run_average_is_the_rate() -> None:
    _, times = _time_calls(80, 50)
    # past the burst, calls come 1/rate apart on average
    steady = times[-1] - times[-21]
    assert 0.3 <= steady <= 0.7, times


# _Breaker --------------------------------------------------------------------------------------


def _outcome(status: str, delivery_id: int = 1) -> Outcome:
    return Outcome(
        delivery_id=delivery_id,
        status=status,
        attempts=TRIES_PER_PASS,
        status_code=500 if status == DELIVERY_PENDING else 200,
        error="HTTP 500" if status == DELIVERY_PENDING else None,
        at=datetime.now(UTC),
    )


def test_breaker_opens_once_after_threshold_owed_outcomes_in_a_row() -> None:
    breaker = _Breaker(threshold=BREAKER_MIN_FAILURES)
    opened = [
        breaker.record(_outcome(DELIVERY_PENDING, i)) for i in range(3 * BREAKER_MIN_FAILURES)
    ]
    assert opened.index(True) == BREAKER_MIN_FAILURES - 1
    assert opened.count(True) == 1  # it says so once, not on every later failure
    assert breaker.open


def test_breaker_streak_is_reset_by_a_sent_outcome() -> None:
    breaker = _Breaker(threshold=4)
    for _ in range(5):  # 3 owed, then one sent, over and over: never 4 in a row
        for i in range(3):
            assert not breaker.record(_outcome(DELIVERY_PENDING, i))
        assert not breaker.record(_outcome(DELIVERY_SENT))
        assert breaker.streak == 0
    assert not breaker.open
    assert [breaker.record(_outcome(DELIVERY_PENDING, i)) for i in range(4)] == [
        False,
        False,
        False,
        True,
    ]


def test_breaker_counts_only_still_owed_outcomes() -> None:
    """A permanent failure (a 400 for one user) says nothing about the URL being down."""
    breaker = _Breaker(threshold=3)
    for _ in range(10):
        assert not breaker.record(_outcome(DELIVERY_FAILED))
    assert breaker.record(_outcome(DELIVERY_PENDING)) is False
    assert breaker.record(_outcome(DELIVERY_PENDING)) is False
    assert breaker.record(_outcome(DELIVERY_FAILED)) is False  # resets the streak
    assert not breaker.open
    assert [breaker.record(_outcome(DELIVERY_PENDING)) for _ in range(3)] == [False, False, True]


def test_an_open_breaker_stays_open() -> None:
    breaker = _Breaker(threshold=2)
    breaker.record(_outcome(DELIVERY_PENDING))
    assert breaker.record(_outcome(DELIVERY_PENDING))
    assert not breaker.record(_outcome(DELIVERY_SENT))
    assert breaker.open
