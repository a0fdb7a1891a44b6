"""Tests for the shared limiter, on an event loop whose clock jumps instead of sleeping."""

from __future__ import annotations

import asyncio
import bisect
import random
import re
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from aiolimiter import AsyncLimiter

from cometbatch import ConfigError, Settings, UpstreamDownError
from cometbatch.net.limits import Limiter

T = TypeVar("T")
LATE = 1e-9


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that, instead of blocking, moves its loop's clock to the next timer."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop
        self._stalled = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events:
            return events
        if timeout is None:
            raise AssertionError("deadlock: every task waits and no timer is set")
        # Timers fire a nanosecond late, as on a real clock: a bucket woken exactly on time can
        # find a float-rounding crumb of level left and reschedule itself at "now" forever.
        self._stalled = self._stalled + 1 if timeout == 0 else 0
        if timeout > 0 or self._stalled > 1000:
            self._loop.now += timeout + self._loop.late
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (aiolimiter's MockLoopTime idea, driven by the loop)."""

    # How late every timer fires.
    late = LATE

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self.now


class SluggishLoop(VirtualTimeLoop):
    """Virtual time on a busy machine: every timer fires 2 ms late."""

    late = 0.002


def run(
    main: Callable[[], Coroutine[Any, Any, T]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = VirtualTimeLoop,
) -> T:
    """Run a coroutine on a fresh virtual-time loop."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def now() -> float:
    return asyncio.get_running_loop().time()


def max_in_window(
    times: list[float], weights: list[int] | None = None, *, span: float = 60.0
) -> int:
    """The largest total weight of events in any closed `span` window (give or take late timers)."""
    weights = weights or [1] * len(times)
    order = sorted(range(len(times)), key=times.__getitem__)
    ts = [times[i] for i in order]
    prefix = [0]
    for i in order:
        prefix.append(prefix[-1] + weights[i])
    # Widened by a microsecond so that events the late timers pushed a few nanoseconds past
    # the window's end still count.
    span += 1e-6
    return max(prefix[bisect.bisect_right(ts, t + span)] - prefix[k] for k, t in enumerate(ts))


async def drive(
    limiter: Limiter, sizes: list[int], *, workers: int, hold: float = 0.5
) -> list[float]:
    """Send one request per size through `workers` tasks; return the time each got its slot."""
    todo = iter(sizes)
    times: list[float] = []

    async def worker() -> None:
        for images in todo:
            async with limiter.slot(images=images):
                times.append(now())
                await asyncio.sleep(hold)
            limiter.record("ok")

    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())
    return times


# -- pacing -----------------------------------------------------------------------------


def test_plain_aiolimiter_bursts_twice_the_rate_in_the_first_minute() -> None:
    """AsyncLimiter(R, 60) lets 2R through in the first minute: the reason for the small bucket."""

    async def main() -> int:
        bucket = AsyncLimiter(10, 60)
        times = []
        for _ in range(30):
            await bucket.acquire()
            times.append(now())
        return sum(t <= 60.0 + 1e-6 for t in times)

    assert run(main) == 20


def test_rpm_holds_in_every_window_at_near_full_rate() -> None:
    """2000 requests at rpm=600 never put more than 600 in any 60 s window, at >= 97 % of it."""

    async def main() -> list[float]:
        async with Limiter(concurrency=50, rpm=600) as limiter:
            return await drive(limiter, [1] * 2000, workers=50)

    times = run(main)
    assert len(times) == 2000
    assert max_in_window(times) <= 600
    assert (len(times) - 1) / (max(times) - min(times)) * 60 >= 0.97 * 600


def test_late_wake_ups_are_made_up_within_the_limit() -> None:
    """With every timer 2 ms late on a 10 ms pace, 6000 rpm still reaches 97 % and never more."""

    async def main(burst: float) -> list[float]:
        async with Limiter(concurrency=100, rpm=6000, pacing_burst=burst) as limiter:
            return await drive(limiter, [1] * 6_000, workers=100)

    def rate(times: list[float]) -> float:
        return (len(times) - 1) / (max(times) - min(times)) * 60

    made_up = run(lambda: main(0.5), SluggishLoop)
    assert max_in_window(made_up) <= 6000
    assert rate(made_up) >= 0.97 * 6000
    # A one-request bucket loses every late wake-up for good: 10 ms becomes 12 ms.
    assert rate(run(lambda: main(0.0), SluggishLoop)) <= 0.85 * 6000


def test_a_margin_keeps_any_60_5_s_window_within_rpm() -> None:
    """Requests that reach the server up to 0.5 s later than others still fit its minute."""

    async def main() -> list[float]:
        async with Limiter(concurrency=50, rpm=600) as limiter:
            return await drive(limiter, [1] * 2000, workers=50)

    times = run(main)
    # Pacing holds at most rpm in any 60.5 s: arrivals delayed by 0 to 0.5 s then hold at most
    # rpm in any 60 s window of the server's.
    assert max_in_window(times, span=60.5) <= 600


def test_no_initial_burst_above_rpm() -> None:
    """The first minute of a run holds at most rpm requests, however many tasks wait at start."""

    async def main() -> list[float]:
        async with Limiter(concurrency=100, rpm=10) as limiter:
            return await drive(limiter, [1] * 40, workers=40, hold=0)

    times = run(main)
    assert sum(t <= 60.0 for t in times) <= 10
    assert max_in_window(times) <= 10


def test_ipm_holds_in_every_window_with_four_image_requests() -> None:
    """4-image requests at ipm=600 never put more than 600 images in a window, at >= 97 % of it."""

    async def main() -> list[float]:
        async with Limiter(concurrency=50, ipm=600) as limiter:
            return await drive(limiter, [4] * 500, workers=50)

    times = run(main)
    assert max_in_window(times, [4] * len(times)) <= 600
    assert 4 * (len(times) - 1) / (max(times) - min(times)) * 60 >= 0.97 * 600


def test_rpm_and_ipm_together_hold_both_limits() -> None:
    """With mixed request sizes under both limits, neither is exceeded in any window."""
    rnd = random.Random(7)
    sizes = [rnd.choice([1, 1, 2, 10]) for _ in range(600)]

    async def main() -> list[float]:
        async with Limiter(concurrency=20, rpm=60, ipm=150) as limiter:
            return await drive(limiter, sizes, workers=20, hold=0.1)

    times = run(main)
    by_time = sorted(zip(times, sizes, strict=True))
    assert max_in_window([t for t, _ in by_time]) <= 60
    assert max_in_window([t for t, _ in by_time], [n for _, n in by_time]) <= 150


def test_an_rpm_token_held_while_ipm_fills_still_keeps_rpm() -> None:
    """A request whose rpm token waited for ipm capacity does not let rpm + 1 into a window."""
    # Request 2 takes its rpm token early and waits for ipm until 20 s, when the rpm bucket has
    # drained: without a request of slack, the 1-image requests behind it would put 8 requests
    # into [20 s, 80 s].
    sizes = [10, 10] + [1] * 20

    async def main() -> list[float]:
        async with Limiter(concurrency=4, rpm=7, ipm=40) as limiter:
            return await drive(limiter, sizes, workers=4, hold=0)

    times = run(main)
    assert max_in_window(times) <= 7
    assert max_in_window(times, sizes) <= 40


def test_ipm_serves_requests_in_arrival_order() -> None:
    """A 10-image request is not overtaken by 1-image requests that came after it."""

    async def main() -> list[int]:
        order: list[int] = []
        async with Limiter(concurrency=10, ipm=30) as limiter:

            async def one(i: int, images: int) -> None:
                async with limiter.slot(images=images):
                    order.append(i)

            async with asyncio.TaskGroup() as tg:
                for i, images in enumerate([10, 10, 1, 1, 1]):
                    tg.create_task(one(i, images))
                    await asyncio.sleep(0)
        return order

    assert run(main) == [0, 1, 2, 3, 4]


def test_a_request_larger_than_the_bucket_is_clamped_not_deadlocked() -> None:
    """A request for more images than the ipm bucket holds still gets through."""

    async def main() -> float:
        limiter = Limiter(concurrency=2, ipm=100, max_images_per_request=4)
        async with limiter, limiter.slot(images=9):
            return now()

    assert run(main) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"rpm": 1}, "rpm must be more than 1"),
        ({"rpm": 2, "ipm": 100}, "rpm must be more than 2"),
        ({"ipm": 10}, "most images one request can carry (10)"),
        ({"concurrency": 2, "min_concurrency": 3}, "min_concurrency"),
        ({"throttle_threshold": 1.0}, "throttle_threshold"),
    ],
)
def test_impossible_settings_raise_config_error(kwargs: dict[str, Any], words: str) -> None:
    """Limits that cannot work are refused with a message naming the setting."""
    kwargs.setdefault("concurrency", 4)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Limiter(**kwargs)


def test_from_settings_takes_limits_from_settings() -> None:
    """from_settings copies concurrency, rpm, ipm and outage limit."""
    limiter = Limiter.from_settings(
        Settings(concurrency=8, rpm=120, ipm=300, outage_limit=30), max_images_per_request=4
    )
    assert (limiter.concurrency, limiter.limit, limiter.rpm, limiter.ipm) == (8, 8, 120, 300)
    assert (limiter.max_images_per_request, limiter.outage_limit) == (4, 30)


# -- concurrency ------------------------------------------------------------------------


def test_concurrency_never_exceeds_the_limit() -> None:
    """Many tasks with varied request times never hold more slots than the limit."""

    async def main() -> int:
        active = peak = 0
        rnd = random.Random(3)
        async with Limiter(concurrency=5) as limiter:

            async def one() -> None:
                nonlocal active, peak
                async with limiter.slot():
                    active += 1
                    peak = max(peak, active)
                    await asyncio.sleep(rnd.uniform(0.1, 2.0))
                    active -= 1

            async with asyncio.TaskGroup() as tg:
                for _ in range(200):
                    tg.create_task(one())
            assert limiter.in_flight == 0
        return peak

    assert run(main) == 5


def test_waiters_are_served_in_arrival_order() -> None:
    """When slots free up, waiting tasks enter in the order they arrived."""

    async def main() -> list[int]:
        order: list[int] = []
        async with Limiter(concurrency=2) as limiter:

            async def one(i: int) -> None:
                async with limiter.slot():
                    order.append(i)
                    await asyncio.sleep(1)

            async with asyncio.TaskGroup() as tg:
                for i in range(8):
                    tg.create_task(one(i))
                    await asyncio.sleep(0.01)
        return order

    assert run(main) == list(range(8))


def test_decrease_keeps_in_flight_requests_and_delays_new_ones() -> None:
    """Lowering the limit never cancels holders; new slots wait until in_flight < limit."""

    async def main() -> None:
        async with Limiter(concurrency=4, min_round=10) as limiter:
            release = asyncio.Event()
            entered: list[float] = []

            async def hold() -> None:
                async with limiter.slot():
                    await release.wait()

            async def late() -> None:
                async with limiter.slot():
                    entered.append(now())

            async with asyncio.TaskGroup() as tg:
                for _ in range(4):
                    tg.create_task(hold())
                await asyncio.sleep(0)
                limiter.record("throttled")
                limiter.record("throttled")  # 2 of a 10-outcome round: 4 -> 2
                assert (limiter.limit, limiter.in_flight) == (2, 4)
                tg.create_task(late())
                await asyncio.sleep(1)
                assert (entered, limiter.waiting) == ([], 1)
                release.set()
            assert entered == [pytest.approx(1.0)]

    run(main)


# -- AIMD -------------------------------------------------------------------------------


def fixed_clock() -> float:
    return 0.0


def test_a_throttled_round_multiplies_the_limit_by_0_7() -> None:
    """More than 10 % throttled in a round cuts the limit to floor(limit x 0.7) at once."""
    limiter = Limiter(concurrency=16, clock=fixed_clock, budget_tokens=1e9)
    for _ in range(20):
        limiter.record("throttled")
    assert limiter.limit == 16
    limiter.record("throttled")  # 21 of a 200-outcome round is over 10 %, whatever comes next
    assert (limiter.limit, limiter.decreases, limiter.throttled_total) == (11, 1, 21)


def test_random_five_percent_throttles_seldom_back_off_at_all() -> None:
    """At 5 % random 429s, fewer than one 200-outcome round in 300 crosses 10 % throttled."""
    rnd = random.Random(9)
    limiter = Limiter(concurrency=50, clock=fixed_clock, budget_tokens=1e9)
    for _ in range(100_000):  # 500 rounds
        limiter.record("throttled" if rnd.random() < 0.05 else "ok")
    assert limiter.decreases <= 2


def test_the_limit_stays_within_its_bounds() -> None:
    """A storm of throttles stops at min_concurrency; recovery stops at concurrency."""
    limiter = Limiter(concurrency=20, min_concurrency=3, clock=fixed_clock, budget_tokens=1e9)
    for _ in range(500):
        limiter.record("throttled")
    assert limiter.limit == 3
    for _ in range(10_000):
        limiter.record("ok")
    assert (limiter.limit, limiter.increases) == (20, 17)


def test_five_percent_random_throttles_keep_the_limit_near_max() -> None:
    """Random 5 % 429s over many rounds keep the limit at >= 80 % of its maximum on average."""
    rnd = random.Random(42)
    for ceiling in (8, 16, 64):
        limiter = Limiter(concurrency=ceiling, clock=fixed_clock)
        total = 0
        for _ in range(20_000):
            limiter.record("throttled" if rnd.random() < 0.05 else "ok")
            total += limiter.limit
        assert total / 20_000 >= 0.8 * ceiling


def test_a_server_limit_is_converged_on() -> None:
    """When requests above a server's capacity are throttled, the limit settles near it."""
    rnd = random.Random(1)
    limiter = Limiter(concurrency=64, clock=fixed_clock, budget_tokens=1e9)
    limits = []
    for _ in range(20_000):
        over = max(0.0, (limiter.limit - 10) / limiter.limit)
        limiter.record("throttled" if rnd.random() < over else "ok")
        limits.append(limiter.limit)
    tail = limits[5000:]
    assert min(tail) >= 7 and max(tail) <= 13


def test_not_adaptive_keeps_the_limit() -> None:
    """With adaptive=False the limit never moves."""
    limiter = Limiter(concurrency=8, adaptive=False, clock=fixed_clock)
    for _ in range(40):
        limiter.record("throttled")
    assert (limiter.limit, limiter.decreases) == (8, 0)


def test_unknown_outcome_is_refused() -> None:
    """record() accepts only ok, throttled and failed."""
    limiter = Limiter(concurrency=2, clock=fixed_clock)
    with pytest.raises(ValueError, match="outcome"):
        limiter.record("maybe")  # type: ignore[arg-type]


# -- retry budget and outage ------------------------------------------------------------


def test_failures_enter_probe_mode_with_one_request_at_a_time() -> None:
    """After the budget is half spent only one request is in flight, until successes refill it."""

    async def main() -> None:
        async with Limiter(concurrency=8, adaptive=False, budget_ratio=0.1) as limiter:
            for _ in range(49):
                limiter.record("failed")
            assert not limiter.probing
            limiter.record("failed")
            assert (limiter.probing, limiter.effective_limit, limiter.tokens) == (True, 1, 50)
            outcomes = iter(["throttled"] * 3 + ["ok"] * 60)
            active = 0
            seen: list[tuple[bool, int]] = []

            async def one() -> None:
                nonlocal active
                async with limiter.slot():
                    active += 1
                    seen.append((limiter.probing, active))
                    await asyncio.sleep(1)
                    active -= 1
                    limiter.record(next(outcomes))  # type: ignore[arg-type]

            async with asyncio.TaskGroup() as tg:
                for _ in range(63):
                    tg.create_task(one())
            probes = [active for probing, active in seen if probing]
            # 47 tokens after the failed probes: 30 successes or so climb back above 50.
            assert len(probes) > 30 and set(probes) == {1}
            assert max(active for _, active in seen) == 8
            assert (limiter.probing, limiter.effective_limit) == (False, 8)

    run(main)


def test_outage_stops_the_run_after_the_limit() -> None:
    """Probing with no success for outage_limit seconds makes slot() raise UpstreamDownError."""
    clock = [0.0]

    async def main() -> None:
        limiter = Limiter(concurrency=4, outage_limit=300, clock=lambda: clock[0])
        async with limiter.slot():
            pass
        for _ in range(60):
            limiter.record("throttled", detail="503 Service Unavailable")
        clock[0] = 299.0
        async with limiter.slot():
            pass
        clock[0] = 300.0
        with pytest.raises(UpstreamDownError) as info:
            async with limiter.slot():
                pass
        assert str(info.value) == (
            "the API has failed every request for 300 s (last error: 503 Service Unavailable); "
            "stopping — run the same command again to resume"
        )
        assert limiter.in_flight == 0

    run(main)


def test_no_outage_without_probe_mode() -> None:
    """A long time with no success is not an outage while the retry budget holds."""
    clock = [0.0]

    async def main() -> None:
        limiter = Limiter(concurrency=4, outage_limit=300, clock=lambda: clock[0])
        limiter.record("throttled")
        clock[0] = 10_000.0
        limiter.check_outage()
        async with limiter.slot():
            pass

    run(main)


# -- cancellation and closing -----------------------------------------------------------


def test_cancelled_waiter_leaks_no_slot() -> None:
    """A task cancelled while queued for a slot leaves no trace; the next one gets the slot."""

    async def main() -> None:
        async with Limiter(concurrency=1) as limiter:
            async with limiter.slot():
                waiter = asyncio.create_task(limiter.slot().__aenter__())
                await asyncio.sleep(0)
                assert limiter.waiting == 1
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                assert (limiter.in_flight, limiter.waiting) == (1, 0)
            assert limiter.in_flight == 0
            async with limiter.slot():
                assert limiter.in_flight == 1

    run(main)


def test_cancelled_rate_waiter_spends_no_token() -> None:
    """A task cancelled while waiting for an rpm token leaves that token to the next task."""

    async def main() -> float:
        # rpm=61: a 1-request bucket draining one request per second (no margin, no burst).
        async with Limiter(concurrency=5, rpm=61, pacing_margin=0, pacing_burst=0) as limiter:
            async with limiter.slot():
                pass
            first = asyncio.create_task(limiter.slot().__aenter__())
            await asyncio.sleep(0.5)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert limiter.in_flight == 0
            async with limiter.slot():
                return now()

    assert run(main) == pytest.approx(1.0, abs=1e-6)


def test_cancelled_inside_the_slot_releases_it() -> None:
    """A task cancelled while holding a slot gives it back."""

    async def main() -> None:
        async with Limiter(concurrency=3) as limiter:

            async def hold() -> None:
                async with limiter.slot():
                    await asyncio.sleep(100)

            task = asyncio.create_task(hold())
            await asyncio.sleep(1)
            assert limiter.in_flight == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert limiter.in_flight == 0

    run(main)


def test_slot_after_close_is_refused() -> None:
    """slot() and reopening fail with RuntimeError once the limiter is closed."""

    async def main() -> None:
        async with Limiter(concurrency=1) as limiter:
            pass
        with pytest.raises(RuntimeError, match="closed"):
            async with limiter.slot():
                pass
        with pytest.raises(RuntimeError, match="reopened"):
            await limiter.__aenter__()

    run(main)


def test_close_wakes_every_waiter() -> None:
    """Closing wakes tasks queued for a slot and the one waiting for a rate token."""

    async def main() -> None:
        limiter = Limiter(concurrency=2, rpm=2)  # one request per minute after the first
        async with limiter.slot():
            queued = [asyncio.create_task(limiter.slot().__aenter__()) for _ in range(3)]
            await asyncio.sleep(1)
            assert (limiter.in_flight, limiter.waiting) == (2, 3)
            limiter.close()
            results = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results), results
        assert (limiter.in_flight, limiter.waiting) == (0, 0)
        assert now() == pytest.approx(1.0)

    run(main)


def test_repr_shows_live_state() -> None:
    """The repr shows the limits, slots in flight, waiters, tokens and probe mode."""

    async def main() -> str:
        async with Limiter(concurrency=4, rpm=600, clock=fixed_clock) as limiter:
            for _ in range(50):
                limiter.record("failed")
            async with limiter.slot():
                return repr(limiter)

    text = run(main)
    assert text.startswith("<Limiter(concurrency=4, rpm=600, ipm=None) at 0x")
    assert text.endswith("[limit: 1/4, in flight: 1, waiting: 0, tokens: 50.0, probing]>")


# -- auto concurrency -------------------------------------------------------------------


async def load(limiter: Limiter, count: int, *, workers: int, hold: float) -> list[int]:
    """Send `count` requests of `hold` seconds each through `workers` tasks; record the limit
    after each answer and check that no more than the limit are ever in flight."""
    todo = iter(range(count))
    active = 0
    limits: list[int] = []

    async def worker() -> None:
        nonlocal active
        for _ in todo:
            async with limiter.slot():
                active += 1
                assert active <= limiter.limit
                await asyncio.sleep(hold)
                active -= 1
                limiter.record("ok")
            limits.append(limiter.limit)

    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())
    return limits


def test_auto_grows_from_sixteen_to_its_maximum_doubling_every_round_trip() -> None:
    """With work waiting and steady latency, auto goes 16 -> 32 -> 64 -> 128 in 3 round trips."""

    async def main() -> tuple[list[int], float, Limiter]:
        async with Limiter(concurrency=128, auto=True) as limiter:
            assert limiter.limit == 16
            start = now()
            limits = await load(limiter, 2000, workers=128, hold=2.0)
            return limits, now() - start, limiter

    limits, took, limiter = run(main)
    assert limits[15] == 32 and limits[47] == 64 and max(limits) == 128
    assert limiter.latency == pytest.approx(2.0)
    # 16 + 32 + 64 in the first 3 round trips (6 s), then 128 per 2 s for the remaining 1888.
    assert took == pytest.approx(6 + 2 * 15, abs=0.1)


def test_auto_does_not_grow_when_the_rate_limit_binds() -> None:
    """Requests queued for rpm tokens show more slots would not help: the limit stays put."""

    async def main() -> list[int]:
        async with Limiter(concurrency=128, auto=True, rpm=600) as limiter:
            return await load(limiter, 300, workers=128, hold=0.5)

    assert set(run(main)) == {16}


def test_auto_does_not_grow_without_enough_work() -> None:
    """With only 10 tasks sending, a limit of 16 is never in full use and does not grow."""

    async def main() -> list[int]:
        async with Limiter(concurrency=128, auto=True) as limiter:
            return await load(limiter, 500, workers=10, hold=1.0)

    assert set(run(main)) == {16}


def test_auto_backs_off_on_a_storm_of_429s_and_leaves_slow_start() -> None:
    """More than 10 % throttled in a round cuts auto by 0.7 at once and ends its doubling."""
    clock = [0.0]
    limiter = Limiter(concurrency=500, auto=True, clock=lambda: clock[0], budget_tokens=1e9)
    for _ in range(21):
        limiter.record("throttled", detail="429 Too Many Requests")
    assert (limiter.limit, limiter.decreases, limiter.slow_start) == (11, 1, False)


def test_error_answers_do_not_count_as_latency() -> None:
    """A fast 400 (an "ok" outcome with a detail) is not timed; a success with latency is."""
    limiter = Limiter(concurrency=64, auto=True, clock=fixed_clock)
    for _ in range(40):
        limiter.record("ok", detail="400 content policy", latency=0.01)
    assert limiter.latency is None
    for _ in range(32):
        limiter.record("ok", latency=3.0)
    assert limiter.latency == 3.0


def test_auto_settings_and_impossible_auto_limits() -> None:
    """from_settings turns auto_concurrency on; start outside bounds or unadaptive is refused."""
    limiter = Limiter.from_settings(Settings(concurrency=300, auto_concurrency=True))
    assert (limiter.auto, limiter.limit, limiter.concurrency, limiter.min_concurrency) == (
        True,
        16,
        300,
        1,
    )
    raised = Limiter.from_settings(
        Settings(concurrency=300, min_concurrency=40, auto_concurrency=True)
    )
    assert raised.limit == 40
    with pytest.raises(ConfigError, match="start"):
        Limiter(concurrency=10, auto=True, start=20)
    with pytest.raises(ConfigError, match="needs adaptive=True"):
        Limiter(concurrency=10, auto=True, adaptive=False)
    assert "auto=True" in repr(Limiter(concurrency=10, auto=True))


def test_the_concurrency_mode_follows_from_the_settings() -> None:
    """A rate without a concurrency follows it (up to 1,000 by default); a number is a hard
    cap with or without a rate; auto is bounded by 256 unless told otherwise; else 16."""
    assert (Settings().concurrency_mode, Settings().max_in_flight) == ("fixed", 16)
    rate = Settings(rpm=600)
    assert (rate.concurrency_mode, rate.max_in_flight) == ("rate", 1000)
    assert Settings(ipm=600, max_concurrency=50).max_in_flight == 50
    fixed = Settings(rpm=600, concurrency=16)
    assert (fixed.concurrency_mode, fixed.max_in_flight) == ("fixed", 16)
    auto = Settings(auto_concurrency=True, rpm=600)
    assert (auto.concurrency_mode, auto.max_in_flight) == ("auto", 256)
    with pytest.raises(ValueError, match="is its own maximum"):
        Settings(concurrency=8, max_concurrency=40)
    with pytest.raises(ValueError, match="above the maximum concurrency"):
        Settings(min_concurrency=20)


# -- concurrency that follows the rate ----------------------------------------------------


async def follow(
    limiter: Limiter, phases: list[tuple[float, float, float]], *, workers: int = 400
) -> list[tuple[float, int, int]]:
    """Keep `workers` tasks sending through the limiter, each request answered after the
    latency of the phase it was sent in (`(seconds, latency, share answered 429)`, one after
    another); every second, sample (time, level, requests in flight)."""
    start = now()
    ends = []
    total = 0.0
    for seconds, latency, throttled in phases:
        total += seconds
        ends.append((start + total, latency, throttled))
    rng = random.Random(7)
    samples: list[tuple[float, int, int]] = []

    def phase() -> tuple[float, float] | None:
        for end, latency, throttled in ends:
            if now() < end:
                return latency, throttled
        return None

    async def worker() -> None:
        retry = False
        while phase() is not None:
            async with limiter.slot(retry=retry):
                # The server's latency and its 429s are those of the moment the request left.
                current = phase()
                latency, throttled = current if current is not None else (0.0, 0.0)
                # A throttled request is sent again, as the engine does.
                retry = rng.random() < throttled
                if retry:
                    await asyncio.sleep(0.2)
                    limiter.record("throttled", "429")
                else:
                    await asyncio.sleep(latency)
                    limiter.record("ok")

    async def sample() -> None:
        while phase() is not None:
            samples.append((now() - start, limiter.level, limiter.sending))
            await asyncio.sleep(1.0)

    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())
        tg.create_task(sample())
    return samples


def between(samples: list[tuple[float, int, int]], start: float, end: float) -> list[int]:
    return [level for t, level, _ in samples if start <= t < end]


def test_the_level_follows_rate_times_latency_and_backs_off_on_429s() -> None:
    """With only an rpm, the level settles at 1.5 x rate x latency + 1 (20/s x 2 s: 61), the
    requests in flight at rate x latency (40), the rate at the limit from the first seconds;
    when latency triples the level follows (181) and the rate holds; a storm of 429s backs it
    off below that; calm rounds bring it back up by a quarter each."""

    async def main() -> tuple[list[tuple[float, int, int]], list[str], Limiter]:
        limiter = Limiter(concurrency=1000, rpm=1200, follow_rate=True, budget_tokens=1e9)
        async with limiter:
            texts: list[str] = []

            async def watch() -> None:
                for at in (50.0, 110.0, 139.0):
                    await asyncio.sleep(at - now())
                    texts.append(limiter.pace().text())

            watcher = asyncio.create_task(watch())
            samples = await follow(
                limiter, [(60.0, 2.0, 0.0), (60.0, 6.0, 0.0), (20.0, 6.0, 0.3), (60.0, 6.0, 0.0)]
            )
            await watcher
            return samples, texts, limiter

    samples, texts, limiter = run(main)
    # Settled at 2 s a request: the level, what is in flight, and the rate achieved.
    assert set(between(samples, 20, 60)) == {61}
    in_flight = [sending for t, _, sending in samples if 20 <= t < 60]
    assert min(in_flight) >= 36 and max(in_flight) <= 44
    assert re.match(r"1,1[89]\d requests/min of 1,200 \(9[89]%\)", texts[0]), texts[0]
    assert "held back by the rate limit" in texts[0]
    # Three times the latency: three times the level, the rate still at the limit.
    assert set(between(samples, 80, 120)) == {181}
    assert "held back by the rate limit" in texts[1]
    assert re.match(r"1,1[89]\d requests/min", texts[1]), texts[1]
    # 30 % of answers 429s for 20 s: backed off to 0.7 x what was in use, then lower.
    assert max(between(samples, 125, 140)) < 90
    assert "held back by the server: its 429s or errors backed concurrency off to " in texts[2]
    # Calm again: each round raises it by a quarter, never past the rate's level.
    after = between(samples, 150, 200)
    assert after == sorted(after) and after[-1] >= 1.5 * after[0] and max(after) <= 181
    assert limiter.decreases >= 2


def test_a_fixed_concurrency_says_when_it_holds_the_rate_back() -> None:
    """--concurrency 16 with --rpm 600 at 3 s a request: 16 in flight give 320/min, and the
    pace says concurrency is the limit and how much the rate needs."""

    async def main() -> str:
        async with Limiter(concurrency=16, rpm=600, budget_tokens=1e9) as limiter:
            sending = asyncio.create_task(follow(limiter, [(60.0, 3.0, 0.0)], workers=16))
            await asyncio.sleep(44.0)
            text = limiter.pace().text()
            await sending
            return text

    text = run(main)
    assert text.startswith("320 requests/min of 600 (53%)"), text
    assert "limited by concurrency 16: at 3.0 s per request, 600/min needs about 30" in text


def test_after_a_back_off_the_rate_limit_is_named_when_it_binds_again() -> None:
    """429s backed a fixed 16 off; with the rate what binds again (2 a second need 2 slots),
    the pace names the rate limit, not the back-off that is still in force."""

    async def main() -> tuple[str, bool]:
        async with Limiter(concurrency=16, rpm=120, min_round=20, budget_tokens=1e9) as limiter:
            await follow(limiter, [(30.0, 1.0, 0.0), (40.0, 1.0, 0.6), (60.0, 1.0, 0.0)],
                         workers=20)  # fmt: skip
            return limiter.pace().text(), limiter.backed_off

    text, backed_off = run(main)
    assert backed_off
    assert text.endswith("held back by the rate limit"), text


def test_work_waiting_for_a_worker_names_concurrency_while_workers_store_images() -> None:
    """One worker a slot, each spending 1 s outside its slot after a 3 s answer (storing its
    images): the gate never looks full, but the pool's waiting work shows that the slots are
    what holds the run back."""

    async def main(backlog: bool) -> str:
        async with Limiter(concurrency=16, rpm=600, budget_tokens=1e9) as limiter:
            limiter.backlog = (lambda: True) if backlog else None

            async def worker() -> None:
                for _ in range(12):
                    async with limiter.slot():
                        await asyncio.sleep(3.0)
                        limiter.record("ok")
                    await asyncio.sleep(1.0)

            async with asyncio.TaskGroup() as tg:
                for _ in range(16):
                    tg.create_task(worker())
            return limiter.pace(whole=True).text()

    assert "not held back" in run(lambda: main(False))
    text = run(lambda: main(True))
    assert "limited by concurrency 16: at 3.0 s per request, 600/min needs about 30" in text
