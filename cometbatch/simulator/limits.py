"""The simulated API's per-minute limits: rpm/ipm sliding windows and the 429s they answer."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from .faults import ApiFailure

_WINDOW_SECONDS = 60.0


def format_seconds(seconds: float) -> str:
    """A Retry-After value: whole seconds as an integer, else a short decimal."""
    if seconds == int(seconds):
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def retry_headers(seconds: float) -> dict[str, str]:
    """Both the OpenAI-style millisecond header and the standard one."""
    return {
        "Retry-After": format_seconds(seconds),
        "retry-after-ms": str(math.ceil(seconds * 1000)),
    }


class SlidingWindow:
    """Costs accepted in the last `span` seconds, and how long until more would fit."""

    def __init__(self, limit: int, span: float = _WINDOW_SECONDS) -> None:
        self.limit = limit
        self.span = span
        self._events: deque[tuple[float, int]] = deque()
        self._used = 0

    def __repr__(self) -> str:
        return f"SlidingWindow(limit={self.limit}, used={self._used})"

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] + self.span <= now:
            self._used -= self._events.popleft()[1]

    def wait_for(self, now: float, cost: int = 1) -> float:
        """Seconds until `cost` more fits in the window (0.0: it fits now)."""
        self._expire(now)
        excess = self._used + cost - self.limit
        if excess <= 0:
            return 0.0
        if cost > self.limit:
            return self.span
        freed = 0
        for stamp, used in self._events:
            freed += used
            if freed >= excess:
                return stamp + self.span - now
        return self.span

    def add(self, now: float, cost: int = 1) -> None:
        """Record an accepted cost at `now`."""
        self._events.append((now, cost))
        self._used += cost


def admit(
    checks: Sequence[tuple[SlidingWindow | None, int, str]], now: float
) -> tuple[ApiFailure, dict[str, str]] | None:
    """Record each cost in its window if all fit, else the 429 and headers of the first refusal."""
    present = [(window, cost, unit) for window, cost, unit in checks if window is not None]
    for window, cost, unit in present:
        wait = window.wait_for(now, cost)
        if wait > 0:
            return rate_limited(unit, window.limit, wait)
    for window, cost, _ in present:
        window.add(now, cost)
    return None


def rate_limited(unit: str, limit: int, wait: float) -> tuple[ApiFailure, dict[str, str]]:
    """The 429 for a full per-minute window, with its Retry-After headers."""
    failure = ApiFailure(
        429,
        f"Rate limit reached for {unit} per minute: limit {limit}. "
        f"Please try again in {wait:.3f}s.",
        "comet_api_error",
        "rate_limit_exceeded",
    )
    # Whole seconds in the standard header (never shorter than the real wait).
    headers = retry_headers(wait)
    headers["Retry-After"] = str(max(1, math.ceil(wait)))
    return failure, headers
