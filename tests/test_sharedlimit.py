"""The cluster's one limit, pure: leased rate tokens, global slots, back-off and budget."""

from __future__ import annotations

import bisect
import math

import pytest

from cometbatch.cluster.buckets import TokenBucket
from cometbatch.cluster.sharedlimit import (
    LEASE_TTL,
    Lease,
    LimitConfig,
    Report,
    SharedLimit,
)
from cometbatch.net.throttle import WINDOW


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def max_in_window(times: list[float], window: float = WINDOW) -> int:
    """The most events any window of `window` seconds holds."""
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def drive(
    limit: SharedLimit, clock: Clock, workers: int, seconds: float, *, images: int = 0
) -> list[float]:
    """Workers sending as fast as their leased tokens allow; when each request was sent."""
    need = 1 if limit.config.rpm is not None else 0
    sent: list[float] = []
    next_at = [0.0] * workers
    stock = [0] * workers
    stock_i = [0] * workers
    leased: list[Lease | None] = [None] * workers
    leased_at = [0.0] * workers
    while True:
        w = min(range(workers), key=next_at.__getitem__)
        clock.now = t = next_at[w]
        if t >= seconds:
            return sent
        lease = leased[w]
        if lease is not None and t - leased_at[w] > LEASE_TTL:
            # Too old to send on: the unused tokens go back.
            limit.give_back(lease, stock[w], stock_i[w])
            leased[w], stock[w], stock_i[w] = None, 0, 0
        if leased[w] is not None and stock[w] >= need and stock_i[w] >= images:
            stock[w] -= 1
            stock_i[w] -= images
            sent.append(t)
            next_at[w] = t + 0.002
            continue
        if lease is not None:
            limit.give_back(lease, stock[w], stock_i[w])
        got = limit.lease(f"w{w}", need, images)
        if got.wait:
            leased[w], stock[w], stock_i[w] = None, 0, 0
            next_at[w] = t + got.wait
        else:
            leased[w], stock[w], stock_i[w] = got, got.rpm, got.ipm
            leased_at[w] = t


def test_three_workers_leasing_keep_rpm_in_every_minute_and_use_most_of_it() -> None:
    """Three workers leasing at rpm 1200 never exceed 1200 in any 60 s and use >= 0.9 of it."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=64, rpm=1200), clock)
    for w in range(3):
        limit.heartbeat(f"w{w}", Report())
    sent = drive(limit, clock, 3, 240.0)
    assert max_in_window(sent) <= 1200
    assert max_in_window(sent) >= 0.9 * 1200
    # Smooth: no second sends much more than a second of the rate.
    assert max_in_window(sent, 1.0) <= 1200 / 60 * 1.6


def test_ipm_leases_keep_images_per_minute() -> None:
    """Leases of image tokens keep ipm in every minute too."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=64, ipm=2000, max_images_per_request=4), clock)
    sent = drive(limit, clock, 3, 180.0, images=4)
    assert max_in_window(sent) * 4 <= 2000
    assert max_in_window(sent) * 4 >= 0.9 * 2000


def test_a_new_limit_starts_with_empty_buckets() -> None:
    """A fresh (or restarted) limit hands out no token at once: it owes the last minute."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=8, rpm=1200), clock)
    assert limit.lease("w", 1).wait > 0


def test_tokens_given_back_are_leased_again() -> None:
    """Unused tokens returned at once go to the next worker; ones long drained do not."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=8, rpm=1200), clock)
    clock.now = 10.0
    lease = limit.lease("a", 1)
    assert lease.rpm > 1
    assert limit.lease("b", 1).wait > 0
    assert limit.give_back(lease, lease.rpm, 0) == lease.rpm
    again = limit.lease("b", 1)
    assert again.wait == 0 and again.rpm >= lease.rpm - 1
    clock.now = 100.0
    late = limit.lease("a", 1)
    clock.now = 160.0
    assert limit.give_back(late, late.rpm, 0) == 0


def test_a_bucket_gives_back_only_tokens_still_in_it() -> None:
    """Tokens that drained out of the bucket cannot come back (their window saw them)."""
    bucket = TokenBucket(600, 1, window=60.0, now=0.0)
    bucket.level = 0.0
    mark = bucket.take(0.0, 5)
    assert bucket.give_back(0.2, 5, mark) == pytest.approx(5 - 0.2 * bucket.drain)


def test_global_slots_hold_the_cap_across_workers() -> None:
    """Slots are counted across workers: the cap is the cluster's, not each worker's."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=3), clock)
    assert limit.acquire("a") is None
    assert limit.acquire("b") is None
    assert limit.acquire("c") is None
    assert limit.acquire("a") == math.inf
    limit.release("b", "ok")
    assert limit.acquire("a") is None
    assert limit.in_flight == 3


def test_a_forgotten_worker_gives_its_slots_back() -> None:
    """A dead worker's slots come back when it is forgotten."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=2), clock)
    assert limit.acquire("dead") is None
    assert limit.acquire("dead") is None
    assert limit.acquire("live") == math.inf
    assert limit.forget("dead") == 2
    assert limit.acquire("live") is None
    assert limit.stats()["workers_forgotten"] == 1


def test_a_429_retry_after_pauses_every_worker() -> None:
    """One worker's 429 with Retry-After pauses leases and slots for all until then."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=8, rpm=1200), clock)
    clock.now = 5.0
    assert limit.acquire("a") is None
    limit.release("a", "throttled", retry_after=7.0, rate_limited=True)
    for worker in ("b", "c"):
        assert limit.acquire(worker) == pytest.approx(7.0)
        assert limit.lease(worker, 1).wait == pytest.approx(7.0)
    clock.now = 12.0
    assert limit.acquire("b") is None
    lease = limit.lease("b", 1)
    assert lease.rpm >= 1 and lease.pauses == 1
    assert limit.stats()["rate_limited"] == 1


def test_throttled_rounds_lower_the_cap_for_everyone() -> None:
    """AIMD: a storm of throttled outcomes from one worker lowers the global cap."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=10, min_round=20), clock)
    for _ in range(3):
        assert limit.acquire("a") is None
        limit.release("a", "throttled")
    assert limit.limit == 7
    assert [limit.acquire("b") for _ in range(8)][-1] == math.inf


def test_auto_and_restarted_limits_start_at_the_floor_and_climb() -> None:
    """Auto concurrency, and any restarted limit, start at the minimum and grow when busy."""
    clock = Clock()
    for limit in (
        SharedLimit(LimitConfig(concurrency=16, min_concurrency=2, auto=True), clock),
        SharedLimit(LimitConfig(concurrency=16, min_concurrency=2), clock, restarted=True),
    ):
        assert limit.limit == 2
        for _ in range(40):
            while limit.acquire("a") is None:
                pass
            limit.release("a", "ok", latency=1.0)
        assert limit.limit == 16
    assert SharedLimit(LimitConfig(concurrency=16), clock).limit == 16


def test_budget_caps_hold_across_workers() -> None:
    """max_images counts every worker's reservations and what the output made before."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=8, max_images=10, earlier_images=4), clock)
    assert limit.reserve("a", 3, None) is None
    assert limit.reserve("b", 3, None) is None
    assert limit.reserve("c", 1, None) == "max_images"
    limit.settle("a", 3, None, 3, 0.0)
    assert limit.stats()["budget"]["images"] == 7


def test_cost_cap_counts_a_dead_workers_reservation_as_spent() -> None:
    """max_cost: what a dead worker had reserved stays spent (it may have been billed)."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=8, max_cost=1.0), clock)
    assert limit.reserve("dead", 2, 0.5) is None
    limit.forget("dead")
    assert limit.reserve("live", 2, 0.4) is None
    assert limit.reserve("live", 1, 0.2) == "max_cost"
    assert limit.stats()["budget"]["cost_usd"] == pytest.approx(0.5)


def test_a_restarted_limit_waits_for_workers_before_granting_budget() -> None:
    """After a restart, budget waits until live workers re-reported what they made."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=8, max_images=10), clock, restarted=True)
    assert isinstance(limit.reserve("a", 1, None), float)
    limit.heartbeat("b", Report(made=6, reserved_images=2))
    limit.ended(0, 0.0)
    clock.now = 3.5
    assert limit.reserve("a", 2, None) is None
    assert limit.reserve("a", 1, None) == "max_images"


def test_a_restarted_limit_adopts_the_slots_workers_hold() -> None:
    """Slots a worker held before the restart still count against the cap."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=4), clock, restarted=True)
    limit.heartbeat("a", Report(held=4))
    assert limit.acquire("b") == math.inf
    # Calls sent before the restart arrive again: the worker's reports set its count right.
    limit.heartbeat("a", Report(held=1))
    assert limit.in_flight == 1


def test_stats_sum_the_workers_reports() -> None:
    """stats() sums images done and planned over the workers, and counts the live ones."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=4), clock)
    assert limit.heartbeat("a", Report(images_done=3, images_planned=10))
    limit.heartbeat("b", Report(images_done=1, images_planned=5))
    clock.now = 2.0
    limit.heartbeat("b", Report(images_done=2, images_planned=5))
    stats = limit.stats()
    assert (stats["images_done"], stats["images_planned"]) == (5, 15)
    assert stats["workers_alive"] == 2
    limit.forget("a", dead=False)
    limit.forget("b")
    stats = limit.stats()
    assert (stats["images_done"], stats["workers_forgotten"]) == (3, 1)
    limit.halt()
    assert not limit.heartbeat("b", Report())


def test_stale_calls_of_a_forgotten_worker_take_nothing() -> None:
    """Calls a dead attempt queued before it died, run after its forget, hold no slot or budget."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=2, max_images=10), clock)
    assert limit.acquire("s1.1") is None
    assert limit.reserve("s1.1", 3, None) is None
    assert limit.forget("s1.1") == 1
    assert limit.gone("s1.1")
    # Its queued calls arrive now: nothing granted, no state made for the dead id.
    for _ in range(3):
        assert limit.acquire("s1.1") == math.inf
    assert limit.reserve("s1.1", 3, None) is not None
    assert limit.lease("s1.1", 1).halted
    assert not limit.heartbeat("s1.1", Report(held=2))
    limit.release("s1.1", "ok")
    limit.settle("s1.1", 3, None, 0, 0.0)
    assert limit.in_flight == 0
    assert limit.stats()["budget"]["images"] == 3
    # The retry, under its own id, gets both slots and the rest of the budget.
    assert limit.acquire("s1.2") is None
    assert limit.acquire("s1.2") is None
    assert limit.reserve("s1.2", 7, None) is None


def test_a_silent_worker_expires_and_its_slots_come_back() -> None:
    """A worker silent for three heartbeats is gone: its slots free, its reservations spent."""
    clock = Clock()
    limit = SharedLimit(LimitConfig(concurrency=2, max_images=10), clock)
    assert limit.acquire("dead") is None
    assert limit.acquire("dead") is None
    assert limit.reserve("dead", 4, None) is None
    limit.heartbeat("live", Report())
    assert limit.acquire("live") == math.inf
    for second in range(1, 5):
        clock.now = float(second)
        limit.heartbeat("live", Report())
    assert limit.acquire("live") is None
    assert limit.in_flight == 1
    assert limit.stats()["budget"]["images"] == 4
    assert limit.reserve("live", 7, None) == "max_images"


def test_a_restarted_limit_counts_what_finished_shards_made() -> None:
    """Cap 10, a shard made 6 and finished, the limit restarts: at most 4 more are granted."""
    clock = Clock()
    config = LimitConfig(concurrency=8, max_images=10)
    limit = SharedLimit(config, clock)
    assert limit.reserve("s1.1", 6, None) is None
    limit.settle("s1.1", 6, None, 6, 0.0)
    limit.forget("s1.1", dead=False)
    # The actor's process dies; Ray builds it again from the same config.
    restarted = SharedLimit(config, clock, restarted=True)
    clock.now = 10.0
    # No budget until the driver told it what ended shards made.
    assert isinstance(restarted.reserve("s2.1", 1, None), float)
    restarted.ended(6, 0.0)
    granted = 0
    while restarted.reserve("s2.1", 1, None) is None:
        granted += 1
    assert granted == 4
