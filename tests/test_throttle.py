"""Tests for the limiter's pure decisions: pacing buckets, AIMD rounds, auto concurrency, budget."""

from __future__ import annotations

import random
from typing import Any

import pytest

from cometbatch.net.throttle import (
    AimdLimit,
    AutoLimit,
    RateLimit,
    RetryBudget,
    auto_start,
    pacing_bucket,
    pacing_capacity,
)

# -- pacing bucket ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "capacity", "expected"),
    [(600, 1, (1, 60 / 599)), (61, 1, (1, 1.0)), (600, 10, (10, 600 / 590)), (70, 10, (10, 10.0))],
)
def test_pacing_bucket_shape(limit: float, capacity: float, expected: tuple[float, float]) -> None:
    """The bucket holds one request and drains (limit - capacity) per minute."""
    assert pacing_bucket(limit, capacity) == pytest.approx(expected)


@pytest.mark.parametrize(("limit", "capacity"), [(1, 1), (10, 10), (5, 10), (10, 0)])
def test_pacing_bucket_rejects_a_limit_not_above_capacity(limit: float, capacity: float) -> None:
    """A limit that a single request would fill is refused."""
    with pytest.raises(ValueError):
        pacing_bucket(limit, capacity)


# -- AIMD -------------------------------------------------------------------------------


def test_a_round_at_or_under_the_threshold_adds_one() -> None:
    """A round with at most 10 % throttled raises the limit by 1, up to the maximum."""
    aimd = AimdLimit(floor=1, ceiling=16, threshold=0.1, min_round=100)
    aimd.limit = 11
    changes = [aimd.record(throttled=i < 10) for i in range(100)]
    assert (changes[-1], sum(changes), aimd.limit) == (1, 1, 12)
    for _ in range(1000):
        aimd.record(throttled=False)
    assert aimd.limit == 16


# -- retry budget -----------------------------------------------------------------------


def test_retry_budget_spends_on_failure_and_earns_on_success() -> None:
    """Failures cost 1, successes earn the ratio, capped at capacity; half spent is probing."""
    budget = RetryBudget(capacity=10, ratio=0.5)
    for _ in range(5):
        budget.record(ok=False)
    assert (budget.tokens, budget.probing) == (5, True)
    budget.record(ok=True)
    assert (budget.tokens, budget.probing) == (5.5, False)
    for _ in range(20):
        budget.record(ok=True)
    assert budget.tokens == 10


@pytest.mark.parametrize(
    ("limit", "capacity", "window", "expected"),
    [(600, 1, 60.5, (1, 60.5 / 599)), (6000, 50, 60.5, (50, 60.5 * 50 / 5950))],
)
def test_pacing_bucket_over_a_longer_window(
    limit: float, capacity: float, window: float, expected: tuple[float, float]
) -> None:
    """Pacing over 60 s plus a margin drains (limit - capacity) per that longer window."""
    assert pacing_bucket(limit, capacity, window=window) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("limit", "size", "burst", "expected"),
    [
        (6000, 1, 0.5, 50),
        (600, 1, 0.5, 5),
        (60, 1, 0.5, 1),
        (6000, 10, 0.5, 50),
        (600, 10, 0.5, 10),
    ],
)
def test_pacing_capacity_is_burst_seconds_of_the_limit_but_one_request_at_least(
    limit: float, size: float, burst: float, expected: float
) -> None:
    """The bucket holds `burst` seconds of the limit, never less than one whole request."""
    assert pacing_capacity(limit, size, burst) == pytest.approx(expected)


# -- auto concurrency --------------------------------------------------------------------


def auto(**overrides: Any) -> AutoLimit:
    values: dict[str, Any] = {
        "floor": 1,
        "ceiling": 500,
        "threshold": 0.1,
        "min_round": 100,
        "start": 16,
    }
    values.update(overrides)
    return AutoLimit(**values)


def test_auto_starts_at_its_start_and_doubles_every_round_trip() -> None:
    """Slow start: every success with the limit in full use adds 1, so a round trip doubles it."""
    limit = auto()
    assert limit.limit == 16
    for _ in range(16):  # one round trip: the 16 requests in flight come back
        limit.observe(2.0)
        limit.record(throttled=False)
    assert (limit.limit, limit.slow_start) == (32, True)
    for _ in range(32 + 64 + 128 + 256):
        limit.observe(2.0)
        limit.record(throttled=False)
    assert limit.limit == 500  # capped at the ceiling


def test_auto_does_not_grow_a_limit_that_is_not_in_use() -> None:
    """Successes while fewer requests than the limit are in flight (or rate-bound) add nothing."""
    limit = auto()
    for _ in range(1000):
        limit.observe(1.0)
        limit.record(throttled=False, busy=False)
    assert limit.limit == 16


def test_a_latency_rise_ends_slow_start_and_holds_the_limit() -> None:
    """A block median over tolerance x the lowest one stops growth without cutting the limit."""
    limit = auto(samples=8, tolerance=2.0)
    for _ in range(16):  # two blocks at 1.0 s
        limit.observe(1.0)
        limit.record(throttled=False)
    assert (limit.limit, limit.baseline, limit.slow_start) == (32, 1.0, True)
    for latency in [1.5, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0]:
        limit.observe(latency)
        limit.record(throttled=False)
    assert (limit.limit, limit.slow_start) == (39, True)  # the block is not whole yet
    limit.observe(3.0)
    limit.record(throttled=False)
    # The block's median is 2.5: above 2 x 1.0.
    assert (limit.latency, limit.slow_start, limit.latency_holds) == (2.5, False, False)
    assert limit.limit == 39
    for _ in range(1000):
        limit.observe(3.0)
        limit.record(throttled=False)
    assert limit.limit == 39


def test_noisy_but_steady_latency_does_not_end_slow_start() -> None:
    """Latencies spread 4x (0.2-0.8 s) but not rising keep slow start going to the ceiling."""
    rnd = random.Random(3)
    limit = auto(ceiling=10_000)
    for _ in range(20_000):
        limit.observe(rnd.uniform(0.2, 0.8))
        limit.record(throttled=False)
    assert (limit.slow_start, limit.limit) == (True, 10_000)


def test_after_slow_start_a_clean_busy_round_adds_one() -> None:
    """Once slow start is over, growth is one per round of max(limit, min_round) outcomes."""
    limit = auto(start=40)
    for _ in range(11):  # 11 throttled of a 100-outcome round: x0.7, slow start over
        limit.record(throttled=True)
    assert (limit.limit, limit.slow_start) == (28, False)
    for _ in range(99):
        limit.observe(1.0)
        limit.record(throttled=False)
    assert limit.limit == 28
    limit.record(throttled=False)
    assert limit.limit == 29
    for _ in range(100):  # a round mostly not in full use: no growth
        limit.record(throttled=False, busy=False)
    assert limit.limit == 29


def test_auto_stays_within_its_bounds() -> None:
    """A storm stops at the floor; growth stops at the ceiling."""
    limit = auto(floor=4, ceiling=64, start=16)
    for _ in range(1000):
        limit.record(throttled=True)
    assert limit.limit == 4
    for _ in range(100_000):
        limit.observe(1.0)
        limit.record(throttled=False)
    assert limit.limit == 64


def test_auto_with_random_five_percent_throttles_still_reaches_its_ceiling() -> None:
    """Random 5 % 429s neither end slow start early nor keep auto far below its maximum."""
    rnd = random.Random(5)
    limit = auto(ceiling=200)
    levels = []
    for _ in range(50_000):
        throttled = rnd.random() < 0.05
        if not throttled:
            limit.observe(1.0)
        limit.record(throttled=throttled)
        levels.append(limit.limit)
    assert max(levels) == 200
    assert sum(levels[-20_000:]) / 20_000 >= 0.8 * 200


def test_auto_converges_on_a_server_capacity() -> None:
    """A server that throttles whatever runs above 40 at once keeps auto near 40."""
    rnd = random.Random(2)
    limit = auto()
    levels = []
    for _ in range(40_000):
        throttled = rnd.random() < max(0.0, (limit.limit - 40) / limit.limit)
        if not throttled:
            limit.observe(1.0)
        limit.record(throttled=throttled)
        levels.append(limit.limit)
    tail = levels[10_000:]
    assert min(tail) >= 28 and max(tail) <= 48


def test_auto_stops_growing_where_the_server_starts_queueing() -> None:
    """Latency that grows with more than 60 in flight stops auto where it has doubled (~120)."""
    limit = auto()
    for _ in range(20_000):
        limit.observe(1.0 * max(1.0, limit.limit / 60))
        limit.record(throttled=False)
    # A little past 120: latency is judged once per block of 32 answers.
    assert 120 <= limit.limit <= 160
    assert not limit.slow_start


@pytest.mark.parametrize(
    ("overrides", "words"),
    [({"start": 0}, "start"), ({"start": 600}, "start"), ({"tolerance": 0.5}, "tolerance")],
)
def test_impossible_auto_settings_are_refused(overrides: dict[str, Any], words: str) -> None:
    """A start outside the bounds or a tolerance below 1 is refused."""
    with pytest.raises(ValueError, match=words):
        auto(**overrides)


@pytest.mark.parametrize(
    ("floor", "ceiling", "start"), [(1, 256, 16), (1, 8, 8), (32, 256, 32), (1, 16, 16)]
)
def test_auto_start_is_sixteen_within_the_bounds(floor: int, ceiling: int, start: int) -> None:
    """Auto concurrency starts at 16, raised to the floor and capped at the ceiling."""
    assert auto_start(floor, ceiling) == start


def rate_limit(**kwargs: float) -> RateLimit:
    """A level that follows 20 requests a second, timed over 4 holds."""
    fields = {"floor": 1, "ceiling": 1000, "threshold": 0.1, "min_round": 10, "rate": 20.0}
    return RateLimit(**{**fields, **kwargs}, samples=4)  # type: ignore[arg-type]


def test_a_rate_level_is_the_ceiling_until_timed_then_rate_times_latency() -> None:
    limit = rate_limit()
    before = (limit.limit, limit.latency)
    for _ in range(4):
        limit.observe(2.0)
    assert before == (1000, None) and (limit.latency, limit.limit) == (2.0, 61)
    limit.rate = 10.0
    assert limit.limit == 31


def test_a_calm_round_at_the_rate_level_reports_no_change() -> None:
    """Rounds that end with the level where the rate puts it change nothing, and say so."""
    limit = rate_limit()
    for _ in range(4):
        limit.observe(2.0)
    # Two rounds of 61 outcomes.
    changes = [limit.record(False, flight=40) for _ in range(130)]
    assert set(changes) == {0} and limit.limit == 61 and not limit.backed_off


def test_a_back_off_ends_when_the_level_falls_to_it_and_does_not_come_back() -> None:
    """Backed off to 28, then the latency drops the rate's level below 28: the back-off is
    over, and a later rise in latency is followed all the way."""
    limit = rate_limit()
    for _ in range(4):
        limit.observe(2.0)
    # More than 10 % of a 61-outcome round: the 7th throttle cuts 0.7 x the 40 in flight.
    changes = [limit.record(True, flight=40) for _ in range(7)]
    assert changes == [0] * 6 + [28 - 61]
    assert limit.backed_off and limit.limit == 28
    for _ in range(4):
        limit.observe(0.5)
    assert limit.limit == 16 and not limit.backed_off
    for _ in range(4):
        limit.observe(6.0)
    assert limit.limit == 181 and not limit.backed_off
