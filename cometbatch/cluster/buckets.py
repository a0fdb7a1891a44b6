"""Rate tokens leased out of a leaky bucket, and given back while they are still in it."""

from __future__ import annotations

from ..net.throttle import PACING_BURST, pacing_bucket, pacing_capacity

__all__ = ["TokenBucket"]


class TokenBucket:
    """A leaky bucket letting at most `limit` tokens through any window of `window` s."""

    def __init__(self, limit: float, unit: int, *, window: float, now: float) -> None:
        self.capacity = pacing_capacity(limit, unit, PACING_BURST)
        size, period = pacing_bucket(limit, self.capacity, window=window)
        self.drain = size / period
        # Starts full of spent tokens: a new (or restarted) limit owes the last window nothing.
        self.level = self.capacity
        self.taken = self.capacity
        self._at = now

    def _leak(self, now: float) -> None:
        self.level = max(0.0, self.level - (now - self._at) * self.drain)
        self._at = max(self._at, now)

    def wait(self, now: float, amount: float) -> float:
        """Seconds until `amount` tokens fit (0.0: now)."""
        self._leak(now)
        excess = self.level + min(amount, self.capacity) - self.capacity
        # Float drain leaves crumbs: a wait too short to move a clock is no wait.
        return excess / self.drain if excess > 1e-9 else 0.0

    def free(self, now: float) -> float:
        """Tokens that could be taken now."""
        self._leak(now)
        return self.capacity - self.level + 1e-9

    def take(self, now: float, amount: float) -> float:
        """Take `amount` tokens; the mark that `give_back` needs for them."""
        self._leak(now)
        self.level += amount
        self.taken += amount
        return self.taken

    def give_back(self, now: float, amount: float, mark: float) -> float:
        """Return unused tokens taken up to `mark`; how many could be taken back."""
        # Only tokens still in the bucket (FIFO: taken after the ones drained out) come back:
        # one already drained would let its window see it twice.
        self._leak(now)
        still = mark - (self.taken - self.level)
        back = max(0.0, min(amount, still, self.level))
        self.level -= back
        return back
