"""FIFO admission of at most a changing number of holders: the limiter's slots and its pacer."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from contextlib import suppress

__all__ = ["CLOSED", "Gate"]

CLOSED = "the limiter is closed"


class Gate:
    """FIFO admission of at most `capacity()` holders; the capacity may change at any time."""

    def __init__(self, capacity: Callable[[], int]) -> None:
        self._capacity = capacity
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.holders = 0
        self.closed = False

    def take_free(self) -> bool:
        """Take a place if one is free now and nobody queues for it (no wait, no task switch)."""
        if self.closed or self._waiters or self.holders >= self._capacity():
            return False
        self.holders += 1
        return True

    async def acquire(self) -> bool:
        """Take a place; True when it had to be waited for."""
        if self.closed:
            raise RuntimeError(CLOSED)
        # Queue behind earlier waiters even when there is room, so arrival order is kept.
        if not self._waiters and self.holders < self._capacity():
            self.holders += 1
            return False
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Admitted just before the cancellation landed: pass the place on.
                self.release()
            else:
                with suppress(ValueError):
                    self._waiters.remove(fut)
            raise
        return True

    @property
    def waiting(self) -> int:
        """Tasks queued for a place."""
        return len(self._waiters)

    def release(self) -> None:
        """Give a place back and let the next waiter in."""
        self.holders -= 1
        self.wake()

    def wake(self) -> None:
        """Admit waiters in order while there is room (after a release or a raised capacity)."""
        # The holder count is raised here, not by the woken task, so no newcomer can take the
        # place between the wake-up and the moment the waiter runs.
        while self._waiters and self.holders < self._capacity():
            fut = self._waiters.popleft()
            if not fut.done():
                self.holders += 1
                fut.set_result(None)

    def close(self) -> None:
        self.closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(RuntimeError(CLOSED))
