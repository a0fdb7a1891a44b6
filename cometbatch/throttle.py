"""Pure decisions for the shared limiter: pacing bucket shape, AIMD concurrency, retry budget."""

from __future__ import annotations

WINDOW = 60.0


def pacing_bucket(limit: float, capacity: float) -> tuple[float, float]:
    """`(max_rate, time_period)` for an AsyncLimiter that lets at most `limit` through per window.

    `AsyncLimiter(limit, 60)` starts full of room: a burst of `limit`, then `limit` more as it
    drains, so 2 x limit in the first minute. A bucket of `capacity` (one whole request) that
    drains (limit - capacity) per window holds at most capacity + (limit - capacity) = limit
    in any 60 s window, the first one included, and costs only `capacity` of throughput.
    """
    if capacity <= 0 or limit <= capacity:
        raise ValueError(f"limit {limit!r} must exceed the bucket capacity {capacity!r}")
    return capacity, WINDOW * capacity / (limit - capacity)


class AimdLimit:
    """Additive-increase/multiplicative-decrease of a concurrency limit, decided once per round.

    A round is `max(limit, min_round)` outcomes: fewer are too noisy to tell random 5 % 429s
    from a server limit (a 16-outcome round holds 2+ throttled ones 19 % of the time, which
    keeps concurrency at about half its maximum). A round whose throttled fraction exceeds
    `threshold` multiplies the limit by 0.7; any other round adds 1.
    """

    def __init__(self, *, floor: int, ceiling: int, threshold: float, min_round: int) -> None:
        self.floor = floor
        self.ceiling = ceiling
        self.threshold = threshold
        self.min_round = min_round
        self.limit = ceiling
        self._seen = 0
        self._throttled = 0

    def record(self, throttled: bool) -> int:
        """Count one outcome; return the change made to the limit (0 while a round runs)."""
        self._seen += 1
        self._throttled += throttled
        size = max(self.limit, self.min_round)
        # Decide as soon as the round's verdict is certain, so a storm of 429s is answered
        # after a few of them rather than after a whole round.
        if self._throttled > self.threshold * size:
            new = max(self.floor, self.limit * 7 // 10)
        elif self._seen >= size:
            new = min(self.ceiling, self.limit + 1)
        else:
            return 0
        change, self.limit = new - self.limit, new
        self._seen = self._throttled = 0
        return change


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
