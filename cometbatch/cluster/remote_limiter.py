"""A worker's Limiter whose slots, rate tokens and back-off come from the cluster's limit actor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextvars import ContextVar, Token
from typing import Any

from ..engine.attempts import CapReached
from ..errors import APIError
from ..net.admission import SENT_AT
from ..net.gate import CLOSED
from ..net.limits import Limiter, Outcome
from ..settings import Settings
from .actor import NAMESPACE
from .remote_budget import SharedBudget
from .sharedlimit import HEARTBEAT, LEASE_TTL, Lease, Report

__all__ = ["Halted", "SharedLimiter"]

log = logging.getLogger(__name__)

# What the current task's attempt came to, told by record() and sent with its slot's release.
_ANSWER: ContextVar[dict[str, Any] | None] = ContextVar("cometbatch_answer", default=None)
# Local tokens are sent within this part of LEASE_TTL: the rest covers the lease's trip back.
_FRESH = 0.5
# A call to the actor that took longer than this waited (for a slot, for tokens).
_SLOW = 0.01


class Halted(CapReached):
    """The cluster is stopping: no new request starts (the engine drains, as at a cap)."""

    def __init__(self) -> None:
        super().__init__("interrupted")


class SharedLimiter(Limiter):
    """Each attempt takes a global slot and a leased rate token; outcomes go to the actor."""

    def __init__(
        self,
        actor: Any,
        settings: Settings,
        *,
        worker: str,
        max_images_per_request: int = 10,
    ) -> None:
        # The local part keeps the retry budget and outage clock; the cap, the rate and the
        # AIMD back-off are the actor's, for the whole cluster.
        super().__init__(
            concurrency=settings.max_in_flight,
            max_images_per_request=max_images_per_request,
            outage_limit=settings.outage_limit,
            adaptive=False,
        )
        self.actor = actor
        self.worker = worker
        # Tokens each request takes: one of rpm, its images of ipm (0: that limit is not set).
        self._per_request = int(settings.rpm is not None)
        self._uses_ipm = settings.ipm is not None
        self._paced = bool(self._per_request) or self._uses_ipm
        self._slots_held = 0
        self._lease: Lease | None = None
        self._lease_at = 0.0
        self._stock = self._stock_images = 0
        self._tokens = asyncio.Lock()
        self._beat: asyncio.Task[None] | None = None
        self.halted = False
        self.images_done = self.images_planned = 0
        self.budget: SharedBudget | None = None

    @classmethod
    def attach(
        cls,
        name: str,
        settings: Settings,
        *,
        worker: str,
        namespace: str = NAMESPACE,
        max_images_per_request: int = 10,
    ) -> SharedLimiter:
        """The limiter of a worker process, on the named limit actor of its run."""
        import ray

        actor = ray.get_actor(name, namespace=namespace)
        return cls(actor, settings, worker=worker, max_images_per_request=max_images_per_request)

    def shared_budget(self, settings: Settings) -> SharedBudget | None:
        """The Budget to give this worker's Engine (`budget=`): the cluster's caps; None: none."""
        if settings.max_images is None and settings.max_cost is None:
            return None
        if self.budget is None:
            self.budget = SharedBudget(
                self.actor, self.worker, max_images=settings.max_images, max_cost=settings.max_cost
            )
        return self.budget

    def tell(self, images_done: int, images_planned: int) -> None:
        """This worker's progress, sent with its next heartbeat (for the driver's display)."""
        self.images_done, self.images_planned = images_done, images_planned

    async def __aenter__(self) -> SharedLimiter:
        await super().__aenter__()
        if self._beat is None:
            self._beat = asyncio.get_running_loop().create_task(self._heartbeats())
        return self

    async def _heartbeats(self) -> None:
        while not self._closed:
            # A restarted actor counts this worker's part of the caps again from these.
            b = self.budget
            held = (
                (0, 0.0, 0, 0.0)
                if b is None
                else (b.images, b.cost, b.reserved_images, b.reserved_cost)
            )
            report = Report(self._slots_held, *held, self.images_done, self.images_planned)
            try:
                if not await self.actor.heartbeat.remote(self.worker, report):
                    self.halted = True
            except Exception as exc:  # the actor restarting: the next beat finds it
                log.debug("heartbeat to the limit actor failed: %r", exc)
            await asyncio.sleep(HEARTBEAT)

    async def _enter(self, images: int) -> tuple[bool, bool]:
        """A local place, a global slot from the actor, then this attempt's rate tokens."""
        if images < 0:
            raise ValueError(f"images must be >= 0, got {images}")
        if self._closed:
            raise RuntimeError(CLOSED)
        if self.halted:
            raise Halted
        self.check_outage()
        if self.budget is not None:
            # A request the cluster's caps refuse is never sent (nor takes a slot).
            await self.budget.answer()
        self._waiting += 1
        try:
            waited_slot = False if self._gate.take_free() else await self._gate.acquire()
            try:
                waited_slot = await self._global_slot() or waited_slot
                try:
                    waited_rate = await self._take_tokens(images)
                except BaseException:
                    self._give_slot(None)
                    raise
            except BaseException:
                self._gate.release()
                raise
        finally:
            self._waiting -= 1
        return waited_slot, waited_rate

    async def _global_slot(self) -> bool:
        """Wait for a slot of the cluster's cap; whether that took a while."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        call = asyncio.ensure_future(self.actor.acquire.remote(self.worker))
        try:
            granted = await asyncio.shield(call)
        except asyncio.CancelledError:
            # A stop cancelled this waiter; the actor may still grant it: give that slot back.
            call.add_done_callback(self._give_back_granted)
            raise
        if not granted:
            self.halted = True
            raise Halted
        self._slots_held += 1
        return loop.time() - started > _SLOW

    def _give_back_granted(self, call: asyncio.Future[bool]) -> None:
        if not call.cancelled() and call.exception() is None and call.result():
            self.actor.release.remote(self.worker)

    def _give_slot(self, answer: dict[str, Any] | None) -> None:
        """Release a global slot with its attempt's answer (not awaited: nothing waits on it)."""
        self._slots_held -= 1
        self.actor.release.remote(self.worker, **(answer or {}))

    async def _take_tokens(self, images: int) -> bool:
        """One rpm token and `images` ipm tokens from the local lease, leasing more when short."""
        if not self._paced:
            return False
        need = min(images, self.max_images_per_request) if self._uses_ipm else 0
        async with self._tokens:
            loop = asyncio.get_running_loop()
            if self._lease is not None and loop.time() - self._lease_at > _FRESH * LEASE_TTL:
                # Sent this late, a token could land in a minute its lease did not count.
                self._return_tokens()
            waited = False
            one = self._per_request
            if self._lease is None or self._stock < one or self._stock_images < need:
                self._return_tokens()
                asked = loop.time()
                lease: Lease = await self.actor.lease.remote(self.worker, one, need)
                if lease.halted:
                    self.halted = True
                    raise Halted
                self._lease, self._lease_at = lease, loop.time()
                self._stock, self._stock_images = lease.rpm, lease.ipm
                waited = self._lease_at - asked > _SLOW
            self._stock -= one
            self._stock_images -= need
            return waited

    def _return_tokens(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None and (self._stock > 0 or self._stock_images > 0):
            self.actor.give_back.remote(lease, self._stock, self._stock_images)
        self._stock = self._stock_images = 0

    async def _open_slot(self, images: int, retry: bool) -> tuple[float, Token[float | None]]:
        _ANSWER.set(None)
        return await super()._open_slot(images, retry)

    def _close_slot(self, sent_at: float, sent: Token[float | None]) -> None:
        answer = _ANSWER.get()
        _ANSWER.set(None)
        super()._close_slot(sent_at, sent)
        self._give_slot(answer)

    def record(
        self,
        outcome: Outcome,
        detail: str | None = None,
        *,
        latency: float | None = None,
        error: APIError | None = None,
    ) -> None:
        """Count the outcome here (retry budget) and send it to the actor with the slot."""
        super().record(outcome, detail, latency=latency, error=error)
        limited = error is not None and error.kind == "rate_limit"
        if latency is None and outcome == "ok" and detail is None:
            # Only real answers are timed (a refused prompt comes back fast), as Limiter does.
            sent = SENT_AT.get()
            latency = None if sent is None else asyncio.get_running_loop().time() - sent
        _ANSWER.set(
            {
                "outcome": outcome,
                "latency": latency,
                "retry_after": error.retry_after if limited and error is not None else None,
                "rate_limited": limited,
            }
        )
        if limited:
            # Tokens leased before the 429 wait with everyone else's.
            self._return_tokens()

    def close(self) -> None:
        """Refuse new slots; tokens and any slot still counted go back to the actor."""
        if self._closed:
            return
        super().close()
        if self._beat is not None:
            self._beat.cancel()
        with contextlib.suppress(Exception):
            self._return_tokens()
            self.actor.forget.remote(self.worker, False)

    def __repr__(self) -> str:
        return (
            f"<SharedLimiter worker={self.worker!r} held={self._slots_held} "
            f"stock={self._stock} halted={self.halted}>"
        )
