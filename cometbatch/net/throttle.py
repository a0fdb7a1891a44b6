"""Pure decisions for the shared limiter: pacing buckets, AIMD, auto concurrency, concurrency
that follows a rate, retry budget."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Literal

WINDOW = 60.0
# Adaptive concurrency starts here (the default fixed concurrency) unless the floor is higher.
AUTO_START = 16
# The fewest outcomes in a round of AIMD. At 5 % random 429s a 100-outcome round holds over
# 10 % throttled 1.1 % of the time: a needless back-off about once per 2,000 requests, which
# then takes many rounds to win back. A 200-outcome round does so 0.1 % of the time, and a
# real storm is still answered after 21 throttled outcomes.
MIN_ROUND = 200
# A request reaches the server a little after it leaves the pacer (the event loop, a
# connection, the network), and not always equally late: one held up by 0.3 s lands 0.3 s
# closer to the requests of the next minute. Pacing over a window this much longer than the
# server's keeps every server-side minute within the limit as long as those delays differ by
# less than this (without it, 2-minute runs at 6,000 rpm drew a few 429s). It costs 0.8 %.
PACING_MARGIN = 0.5
# Room in the bucket for this many seconds of requests. A one-request bucket forgets any
# lateness: each wake-up that comes 1 ms late on a 10 ms pace loses 10 % of the rate for
# good (6,000 rpm reached only 87 % of the limit). With room for half a second, late wake-ups
# are made up at once, still within the limit; it costs 0.8 % of it.
PACING_BURST = 0.5
# Concurrency that follows a rate keeps this many times rate x latency slots: Little's law
# gives the mean number in flight, answers vary around their mean, and a slot more than needed
# costs nothing (its task waits for a rate token before anything is sent).
HEADROOM = 1.5
# Slot hold times averaged for that latency: enough to smooth one slow answer out, few enough
# to follow a change within a few dozen answers.
HOLD_SAMPLES = 32


def pacing_bucket(limit: float, capacity: float, *, window: float = WINDOW) -> tuple[float, float]:
    """`(max_rate, time_period)` for an AsyncLimiter letting at most `limit` through a window."""
    # AsyncLimiter(limit, 60) starts full of room: a burst of `limit`, then `limit` more as it
    # drains, so 2 x limit in the first minute. A bucket of `capacity` that drains
    # (limit - capacity) per `window` holds at most limit in any window, the first included,
    # and costs only `capacity` of throughput (plus the window's part beyond 60 s).
    if capacity <= 0 or limit <= capacity:
        raise ValueError(f"limit {limit!r} must exceed the bucket capacity {capacity!r}")
    if window <= 0:
        raise ValueError(f"window must be > 0, got {window!r}")
    return capacity, window * capacity / (limit - capacity)


def pacing_capacity(limit: float, request: float, burst: float = PACING_BURST) -> float:
    """The bucket size for `limit` per minute: `burst` seconds of it, at least one `request`."""
    return max(request, limit * burst / WINDOW)


class AimdLimit:
    """Additive-increase/multiplicative-decrease of a concurrency limit, decided once per round."""

    # A round is `max(limit, min_round)` outcomes: fewer are too noisy to tell random 5 % 429s
    # from a server limit (a 16-outcome round holds 2+ throttled ones 19 % of the time, which
    # keeps concurrency at about half its maximum). A round whose throttled fraction exceeds
    # `threshold` multiplies the limit by 0.7; any other round adds 1.

    def __init__(self, *, floor: int, ceiling: int, threshold: float, min_round: int) -> None:
        self.floor = floor
        self.ceiling = ceiling
        self.threshold = threshold
        self.min_round = min_round
        self.limit = ceiling
        self._seen = 0
        self._throttled = 0
        # The limit before the back-off now in force, if one is.
        self._before: int | None = None

    @property
    def backed_off(self) -> bool:
        """True while a back-off (429s, 5xx) keeps the limit below where it was before it."""
        return self._before is not None

    def record(self, throttled: bool, *, busy: bool = True, flight: int = 0) -> int:
        """Count one outcome; return the change made to the limit (0 while a round runs)."""
        # `busy` (the limit was in full use) matters only to AutoLimit: a fixed maximum is
        # recovered to whether or not it is needed; `flight` (requests in flight now) only to
        # RateLimit, whose back-off starts from what was in use.
        self._count(throttled)
        if self._storm():
            return self._set(self._decreased())
        if self._round_over():
            return self._set(self._increased())
        return 0

    def _count(self, throttled: bool) -> None:
        self._seen += 1
        self._throttled += throttled

    def _storm(self) -> bool:
        # Decided as soon as the round's verdict is certain, so a storm of 429s is answered
        # after a few of them rather than after a whole round.
        return self._throttled > self.threshold * max(self.limit, self.min_round)

    def _round_over(self) -> bool:
        return self._seen >= max(self.limit, self.min_round)

    def _decreased(self) -> int:
        return max(self.floor, self.limit * 7 // 10)

    def _increased(self) -> int:
        return min(self.ceiling, self.limit + 1)

    def _set(self, new: int) -> int:
        """Set the limit and start a new round; return the change."""
        old = self.limit
        self.limit = new
        # Read back: a limit that follows a target may not be what was asked.
        change = self.limit - old
        if change < 0 and self._before is None:
            self._before = old
        elif self._before is not None and self.limit >= self._before:
            self._before = None
        self._new_round()
        return change

    def _new_round(self) -> None:
        self._seen = self._throttled = 0


class AutoLimit(AimdLimit):
    """AIMD that finds its own level: starts at `start`, grows while latency and errors hold."""

    # Slow start, as in TCP: each success that finds the limit in full use adds 1, so the limit
    # doubles every round trip, until a throttled round or a latency rise ends it. Successes are
    # timed in blocks of `samples`; latency holds while the last block's median stays within
    # `tolerance` x the baseline, the lowest block median seen: more requests in flight still
    # buy throughput, not a queue at the server. (Whole blocks, not a rolling median checked at
    # every answer: thousands of overlapping medians would put the lowest far below the typical
    # one and the highest far above it, and noise alone would end slow start.)
    # After slow start, AIMD: a round (as in AimdLimit) that was mostly in full use, with latency
    # holding, adds 1; a throttled round multiplies the limit by 0.7 at once. Latency beyond the
    # tolerance stops growth but never lowers the limit: a slower mix of jobs looks the same.

    def __init__(
        self,
        *,
        floor: int,
        ceiling: int,
        threshold: float,
        min_round: int,
        start: int,
        tolerance: float = 2.0,
        samples: int = 32,
    ) -> None:
        super().__init__(floor=floor, ceiling=ceiling, threshold=threshold, min_round=min_round)
        if not floor <= start <= ceiling:
            raise ValueError(f"start {start} must be within [{floor}, {ceiling}]")
        if tolerance < 1 or samples < 1:
            raise ValueError("tolerance must be >= 1 and samples >= 1")
        self.limit = start
        self.tolerance = tolerance
        self.samples = samples
        self.slow_start = True
        # The median latency of the last whole block, and the lowest such median seen.
        self.latency: float | None = None
        self.baseline: float | None = None
        self._block: list[float] = []
        self._busy = 0

    @property
    def latency_holds(self) -> bool:
        """True until the last block's median latency exceeds tolerance x the baseline."""
        if self.baseline is None or self.latency is None:
            return True
        return self.latency <= self.tolerance * self.baseline

    def observe(self, latency: float) -> None:
        """Time one success (seconds from sending to the answer)."""
        self._block.append(latency)
        if len(self._block) >= self.samples:
            self.latency = statistics.median(self._block)
            self._block.clear()
            self.baseline = (
                self.latency if self.baseline is None else min(self.baseline, self.latency)
            )

    def record(self, throttled: bool, *, busy: bool = True, flight: int = 0) -> int:
        """Count one outcome (`busy`: the limit was in full use); return the change made."""
        self._count(throttled)
        self._busy += busy
        if self._storm():
            self.slow_start = False
            return self._set(self._decreased())
        holds = self.latency_holds
        if self.slow_start and not holds:
            self.slow_start = False
        if self.slow_start:
            change = 0
            if busy and not throttled and self.limit < self.ceiling:
                self.limit += 1
                change = 1
            if self._round_over():
                self._new_round()
            return change
        if self._round_over():
            busy_round = 2 * self._busy >= self._seen
            if not busy_round:
                # The limit was not what held requests back: no back-off is in force.
                self._before = None
            grow = holds and busy_round
            return self._set(min(self.ceiling, self.limit + 1) if grow else self.limit)
        return 0

    def _new_round(self) -> None:
        super()._new_round()
        self._busy = 0


class RateLimit(AimdLimit):
    """Concurrency that follows a rate: rate x latency requests in flight (Little's law)."""

    # A paced request rate R and a slot hold time W (from the request leaving to its answer)
    # need R x W slots on average; the limit is that times `headroom`, plus one, within
    # [floor, ceiling]. Until `samples` holds have been timed the limit is the ceiling: the
    # pacer alone decides what leaves, so the rate is used from the first second instead of
    # being grown to. The latency is the mean of the last `samples` holds, so the limit follows
    # a slower or faster server within as many answers.
    #
    # Under that, a back-off as in fixed mode: a throttled round (429s, 5xx, timeouts) cuts the
    # limit to 0.7 x what was in use (the most in flight this round, when below the limit:
    # cutting an unused limit would slow nothing). Each calm round then raises it by a quarter
    # (at least one) until the rate's own level is reached again: that level is known, so a
    # passing storm costs minutes, not the hour that one slot a 200-answer round would take to
    # win back a 1,200/min rate at 6 s a request. A server whose real limit is lower throttles
    # again on the way up and is converged on.

    def __init__(
        self,
        *,
        floor: int,
        ceiling: int,
        threshold: float,
        min_round: int,
        rate: float,
        headroom: float = HEADROOM,
        samples: int = HOLD_SAMPLES,
    ) -> None:
        if rate <= 0 or headroom < 1 or samples < 1:
            raise ValueError("rate must be > 0, headroom >= 1 and samples >= 1")
        self._rate = rate
        self.headroom = headroom
        self._holds: deque[float] = deque(maxlen=samples)
        self._held = 0.0
        self._observed = 0
        # The rate's own level, kept up to date as holds and the rate change (it is read on
        # every admission).
        self._target = ceiling
        # The backed-off limit while a back-off is in force; None: the rate's own level.
        self._backoff: int | None = None
        self._peak = 0
        super().__init__(floor=floor, ceiling=ceiling, threshold=threshold, min_round=min_round)

    @property
    def rate(self) -> float:
        """Requests a second the limits allow."""
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        if value != self._rate:
            self._rate = value
            self._retarget()

    @property
    def latency(self) -> float | None:
        """The mean of the last holds, once there are enough of them; None before."""
        holds = self._holds
        if len(holds) < (holds.maxlen or 1):
            return None
        return self._held / len(holds)

    @property
    def target(self) -> int:
        """The rate's own level: headroom x rate x latency + 1, within [floor, ceiling]."""
        return self._target

    def _retarget(self) -> None:
        latency = self.latency
        if latency is None:
            self._target = self.ceiling
        else:
            wanted = math.ceil(self.headroom * needed(self._rate, latency)) + 1
            self._target = max(self.floor, min(self.ceiling, wanted))
        if self._backoff is not None and self._backoff >= self._target:
            # The level fell to the back-off: it is over (it must not come back when the
            # latency rises again).
            self._backoff = None

    @property
    def limit(self) -> int:
        """The rate's level, or the back-off's when that is lower."""
        target = self._target
        return target if self._backoff is None else min(self._backoff, target)

    @limit.setter
    def limit(self, value: int) -> None:
        self._backoff = None if value >= self._target else value

    @property
    def backed_off(self) -> bool:
        return self._backoff is not None

    def observe(self, hold: float) -> None:
        """Time one slot hold (seconds from the request leaving to its slot being let go)."""
        holds = self._holds
        if len(holds) == holds.maxlen:
            self._held -= holds[0]
        holds.append(hold)
        self._observed += 1
        # Summed afresh once a window, so that rounding never builds up.
        if self._observed % (holds.maxlen or 1) == 0:
            self._held = sum(holds)
        else:
            self._held += hold
        self._retarget()

    def record(self, throttled: bool, *, busy: bool = True, flight: int = 0) -> int:
        self._peak = max(self._peak, flight)
        return super().record(throttled, busy=busy, flight=flight)

    def _decreased(self) -> int:
        used = min(self.limit, self._peak) if self._peak else self.limit
        return max(self.floor, used * 7 // 10)

    def _increased(self) -> int:
        return min(self.ceiling, max(self.limit + 1, self.limit * 5 // 4))

    def _new_round(self) -> None:
        super()._new_round()
        self._peak = 0


def needed(rate: float, latency: float) -> float:
    """Requests in flight that send `rate` a second when each takes `latency` s (Little's law),
    rounded to a millionth so that timers a nanosecond late never round a level up."""
    return round(rate * latency, 6)


def binding(
    rpm: float | None, ipm: float | None, images_per_request: float | None
) -> Literal["rpm", "ipm"] | None:
    """Which limit allows fewer requests at this many images a request (None: no limit)."""
    if ipm is None:
        return None if rpm is None else "rpm"
    if rpm is None:
        return "ipm"
    return "rpm" if rpm <= ipm / max(1.0, images_per_request or 1.0) else "ipm"


def request_rate(
    rpm: float | None, ipm: float | None, images_per_request: float | None
) -> float | None:
    """Requests a second that rpm and ipm allow (the tighter one) at this many images a
    request; None when neither is set."""
    which = binding(rpm, ipm, images_per_request)
    if which == "rpm" and rpm is not None:
        return rpm / WINDOW
    if which == "ipm" and ipm is not None:
        return ipm / WINDOW / max(1.0, images_per_request or 1.0)
    return None


def auto_start(floor: int, ceiling: int) -> int:
    """Where adaptive concurrency starts: AUTO_START, raised to the floor, within the ceiling."""
    return min(ceiling, max(floor, AUTO_START))


class RetryBudget:
    """gRPC-style retry throttling: each failure spends a token, each success earns a fraction."""

    # gRPC's usual ratio (0.1) drains the budget at ~9 % failures; here a drained budget means
    # probe mode, which should follow from "most requests fail", not a noisy minute. At 0.5 the
    # budget drains only while more than a third of requests fail.
    def __init__(self, capacity: float = 100.0, ratio: float = 0.5) -> None:
        self.capacity = capacity
        self.ratio = ratio
        self.tokens = capacity

    @property
    def probing(self) -> bool:
        """True while half the budget or more is spent: send one request at a time."""
        return self.tokens <= self.capacity / 2

    def record(self, ok: bool) -> None:
        """Earn `ratio` for a success, spend 1 for a failure."""
        if ok:
            self.tokens = min(self.capacity, self.tokens + self.ratio)
        else:
            self.tokens = max(0.0, self.tokens - 1.0)
