"""A worker's Budget whose caps are the cluster's: the limit actor answers each reservation."""

from __future__ import annotations

import asyncio
from typing import Any

from ..costs.budget import Budget, CapReason
from ..engine.attempts import CapReached

__all__ = ["SharedBudget"]


class SharedBudget(Budget):
    """Reserves through the actor; the request's slot waits for the answer before it is sent."""

    # The engine reserves without awaiting (RequestLife._send): the call to the actor starts
    # there and SharedLimiter awaits its answer when the same task asks for its slot, so a
    # refused request is never sent. Figures here are this worker's; the caps are checked
    # against the cluster's (and the output's earlier) figures, in the actor.

    def __init__(
        self, actor: Any, worker: str, *, max_images: int | None, max_cost: float | None
    ) -> None:
        super().__init__(max_images=max_images, max_cost=max_cost)
        self._actor = actor
        self._worker = worker
        # Each task's reservation: the actor's answer (None, or the cap it would cross).
        self._answers: dict[asyncio.Task[Any] | None, asyncio.Future[Any]] = {}
        self._unread: set[asyncio.Task[Any] | None] = set()

    def reserve(self, images: int, cost: float | None) -> CapReason | None:
        if self.stopped is not None:
            return self.stopped
        if self.max_cost is not None and cost is None:
            # A request without a price cannot be kept under a dollar cap (as Budget says).
            return super().reserve(images, cost)
        task = asyncio.current_task()
        self._answers[task] = asyncio.ensure_future(
            self._actor.reserve.remote(self._worker, images, cost)
        )
        self._unread.add(task)
        self.reserved_images += images
        self.reserved_cost += cost or 0.0
        return None

    async def answer(self) -> None:
        """Wait for the actor's answer to this task's reservation; CapReached when refused."""
        task = asyncio.current_task()
        if task not in self._unread:
            return  # a retry or a follow-up: its reservation was answered already
        self._unread.discard(task)
        cap = await asyncio.shield(self._answers[task])
        if cap is not None:
            self.stopped = cap
            raise CapReached(cap)

    def settle(self, images: int, cost: float | None, made: int, spent: float) -> None:
        super().settle(images, cost, made, spent)
        task = asyncio.current_task()
        self._unread.discard(task)
        answer = self._answers.pop(task, None)
        if answer is None:
            return

        def tell(done: asyncio.Future[Any]) -> None:
            # A refused reservation holds nothing at the actor: nothing to settle.
            if not done.cancelled() and done.exception() is None and done.result() is None:
                self._actor.settle.remote(self._worker, images, cost, made, spent)

        if answer.done():
            tell(answer)
        else:
            answer.add_done_callback(tell)
