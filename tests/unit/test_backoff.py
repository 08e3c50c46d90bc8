"""Retry timing: full-jitter exponential backoff, capped, with Retry-After as a floor."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from syncer.delivery import backoff_seconds
from syncer.settings import TraySettings

TRAY = TraySettings(backoff_base_seconds=0.5, backoff_max_seconds=30.0)
SAMPLES = 2_000


@pytest.fixture(autouse=True)
def _seeded_random() -> Iterator[None]:
    state = random.getstate()
    random.seed(20261122)
    yield
    random.setstate(state)


def sample(
    attempt: int, retry_after: float | None = None, tray: TraySettings = TRAY
) -> list[float]:
    return [backoff_seconds(attempt, tray, retry_after) for _ in range(SAMPLES)]


@pytest.mark.parametrize("attempt", [1, 2, 5, 7, 10, 30, 100, 1_000, 2_000])
def test_never_above_the_maximum(attempt: int) -> None:
    delays = sample(attempt)
    assert all(0 <= d <= TRAY.backoff_max_seconds for d in delays)


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0)])
def test_grows_with_each_attempt(attempt: int, ceiling: float) -> None:
    delays = sample(attempt)
    assert max(delays) <= ceiling
    assert max(delays) > 0.95 * ceiling  # and really reaches up to it


def test_reaches_the_maximum_and_stays_there() -> None:
    for attempt in (7, 8, 20):
        delays = sample(attempt)
        assert max(delays) > 0.95 * TRAY.backoff_max_seconds
        assert max(delays) <= TRAY.backoff_max_seconds


def test_average_wait_grows_with_attempt() -> None:
    means = [sum(sample(attempt)) / SAMPLES for attempt in range(1, 8)]
    assert means == sorted(means)
    assert means[-1] > 10 * means[0]


def test_jitter_spreads_retries_out() -> None:
    delays = sample(6)
    assert len(set(delays)) == SAMPLES
    # full jitter: retries land anywhere from now to the ceiling, not in one clump
    assert min(delays) < 0.1 * 16.0
    assert max(delays) > 0.9 * 16.0


@pytest.mark.parametrize("retry_after", [0.0, 0.25, 3.0, 29.0])
def test_retry_after_is_a_floor(retry_after: float) -> None:
    delays = sample(3, retry_after)
    assert all(retry_after <= d <= TRAY.backoff_max_seconds for d in delays)


def test_retry_after_longer_than_the_maximum_is_honoured() -> None:
    assert set(sample(1, 120.0)) == {120.0}
    assert set(sample(20, 45.5)) == {45.5}


def test_custom_settings_are_used() -> None:
    fast = TraySettings(backoff_base_seconds=0.01, backoff_max_seconds=0.2)
    assert max(sample(1, tray=fast)) <= 0.01
    assert max(sample(10, tray=fast)) <= 0.2
    assert max(sample(10, tray=fast)) > 0.19
