"""rpm/ipm pacing: the token buckets each request takes its rate tokens from, single file."""

from __future__ import annotations

import asyncio
import logging

from aiolimiter import AsyncLimiter

from ..errors import ConfigError
from .gate import CLOSED, Gate
from .throttle import WINDOW, pacing_bucket, pacing_capacity

__all__ = ["Pacer"]

log = logging.getLogger(__name__)


class Pacer:
    """Rate tokens for requests, in arrival order: one rpm token, then `images` ipm tokens."""

    def __init__(
        self,
        *,
        rpm: float | None,
        ipm: float | None,
        max_images_per_request: int,
        margin: float,
        burst: float,
    ) -> None:
        self.max_images_per_request = max_images_per_request
        self._rpm: AsyncLimiter | None = None
        self._ipm: AsyncLimiter | None = None
        # Seconds of sending the buckets let go at once at the start (their room).
        self.lead = 0.0
        window = WINDOW + margin
        if rpm is not None:
            # With both limits the rpm token is taken first and may be held while the ipm bucket
            # drains, so a window can see the request it paid for plus a full rpm of later
            # ones. Pacing is single file, so at most one token is held at a time: one request
            # of slack keeps what is actually sent within rpm.
            slack = 1 if ipm is not None else 0
            # Settings refuses it first, with its other bounds; a Limiter built by hand, here.
            if rpm <= 1 + slack:
                raise ConfigError(f"rpm must be more than {1 + slack}, got {rpm:g}")
            size = pacing_capacity(rpm - slack, 1, burst)
            self._rpm = AsyncLimiter(*pacing_bucket(rpm - slack, size, window=window))
            self.lead = size / (rpm - slack) * WINDOW
        if ipm is not None:
            if ipm <= max_images_per_request:
                raise ConfigError(
                    f"ipm ({ipm:g}) must be more than the most images one request can carry "
                    f"({max_images_per_request}): no minute could hold a whole request "
                    "otherwise; raise ipm"
                )
            size = pacing_capacity(ipm, max_images_per_request, burst)
            self._ipm = AsyncLimiter(*pacing_bucket(ipm, size, window=window))
            self.lead = max(self.lead, size / ipm * WINDOW)
        # Single file, in arrival order: aiolimiter alone serves small amounts first, which
        # could starve 10-image requests behind 1-image ones.
        self._line = Gate(lambda: 1)
        self._task: asyncio.Task[object] | None = None
        self._cancelled_by_close: asyncio.Task[object] | None = None
        self._warned_clamp = False

    @property
    def active(self) -> bool:
        """Whether there is a rate to keep (rpm or ipm set)."""
        return self._rpm is not None or self._ipm is not None

    @property
    def busy(self) -> bool:
        """Whether a request holds or waits for rate tokens now."""
        return bool(self._line.holders or self._line.waiting)

    async def take(self, images: int) -> bool:
        """Take the rate tokens for a request of `images`; True when they had to be waited for."""
        if not self.active:
            return False
        waited = await self._line.acquire()
        task = asyncio.current_task()
        self._task = task
        try:
            # A cancellation while waiting here costs nothing: aiolimiter adds to its level
            # only once the capacity is there. One between the two acquisitions forfeits the
            # rpm token, since a bucket cannot give capacity back; sending less is the safe side.
            if self._rpm is not None:
                waited = waited or not self._rpm.has_capacity()
                await self._rpm.acquire()
            if self._ipm is not None:
                amount = min(images, self.max_images_per_request)
                waited = waited or not self._ipm.has_capacity(amount)
                if amount < images and not self._warned_clamp:
                    self._warned_clamp = True
                    log.warning(
                        "a request for %d images counts as %d against ipm (the bucket size); "
                        "pass the largest request size as max_images_per_request",
                        images,
                        amount,
                    )
                await self._ipm.acquire(amount)
        except asyncio.CancelledError:
            # close() cancels the one task waiting on the buckets; give it the same error as
            # the queued waiters, unless someone else cancelled it too.
            if task is not None and self._cancelled_by_close is task and task.uncancel() == 0:
                raise RuntimeError(CLOSED) from None
            raise
        finally:
            self._task = None
            self._line.release()
        return waited

    def close(self) -> None:
        """Wake every waiter with RuntimeError (the one on the buckets is cancelled)."""
        self._line.close()
        task = self._task
        if task is not None and not task.done():
            self._cancelled_by_close = task
            task.cancel()
