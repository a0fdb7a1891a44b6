"""The shared limit as a named async Ray actor: callers wait for slots and tokens inside it."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from typing import Any

from ..settings import Settings
from .sharedlimit import Lease, LimitConfig, Report, SharedLimit

__all__ = ["NAMESPACE", "LimitActor", "limit_name", "start_limit_actor"]

NAMESPACE = "cometbatch"
# Calls the actor runs at once (async, so each costs a coroutine, not a thread).
_MOST_CALLS = 100_000


def limit_name(run_id: str) -> str:
    """The actor's name for one cluster run."""
    return f"cometbatch-limit-{run_id}"


class LimitActor:
    """Wraps SharedLimit; waits (for a slot, tokens, a restart's recovery) happen here."""

    def __init__(self, config: LimitConfig, restarted: bool | None = None) -> None:
        if restarted is None:
            import ray

            # Ray builds a restarted actor from the same arguments: its state is gone, so it
            # starts slow (empty buckets, concurrency at its floor), relearns what workers hold.
            restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self._limit = SharedLimit(
            config, time.monotonic, restarted=restarted, instance=uuid.uuid4().hex
        )
        self._changed = asyncio.Event()
        # FIFO: one waiter at a time per kind, the others queue behind it in arrival order.
        self._slots = asyncio.Lock()
        self._tokens = asyncio.Lock()
        self._budget = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<LimitActor {self._limit!r}>"

    def _poke(self) -> None:
        """Something changed (a slot came back, a halt): waiters look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, seconds: float) -> None:
        changed = self._changed
        timeout = None if math.isinf(seconds) else max(seconds, 0.001)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    async def acquire(self, worker: str) -> bool:
        """Wait for a global slot; False when the cluster is stopping or `worker` was forgotten."""
        async with self._slots:
            while not self._limit.halted and not self._limit.gone(worker):
                wait = self._limit.acquire(worker)
                if wait is None:
                    return True
                await self._wait(wait)
            return False

    def release(
        self,
        worker: str,
        outcome: str | None = None,
        latency: float | None = None,
        retry_after: float | None = None,
        rate_limited: bool = False,
    ) -> None:
        """Give a slot back with the attempt's outcome (None: never answered)."""
        self._limit.release(
            worker, outcome, latency=latency, retry_after=retry_after, rate_limited=rate_limited
        )
        self._poke()

    async def lease(self, worker: str, requests: int = 1, images: int = 0) -> Lease:
        """Wait for rate tokens: at least `requests` and `images` (halted: none)."""
        async with self._tokens:
            while True:
                lease = self._limit.lease(worker, requests, images)
                if lease.halted or not lease.wait:
                    return lease
                await self._wait(lease.wait)

    def give_back(self, lease: Lease, requests: int, images: int) -> None:
        """Unused tokens of a lease come back."""
        self._limit.give_back(lease, requests, images)

    async def reserve(self, worker: str, images: int, cost: float | None) -> str | None:
        """Hold budget for a request: None, or the cap ("max_images", "max_cost") it crosses."""
        async with self._budget:
            while True:
                answer = self._limit.reserve(worker, images, cost)
                if not isinstance(answer, float):
                    return answer
                await self._wait(answer)

    def settle(self, worker: str, images: int, cost: float | None, made: int, spent: float) -> None:
        """A reservation replaced by what its request made and spent."""
        self._limit.settle(worker, images, cost, made, spent)

    def heartbeat(self, worker: str, report: Report) -> bool:
        """A worker's figures; False once the cluster is stopping."""
        going = self._limit.heartbeat(worker, report)
        self._poke()  # a restarted limit may have learnt of fewer slots held
        return going

    def forget(self, worker: str, dead: bool = True) -> int:
        """A dead (or finished) worker's slots come back, its reservations stay spent."""
        freed = self._limit.forget(worker, dead=dead)
        self._poke()
        return freed

    def ended(self, images: int, cost: float) -> None:
        """What this run's ended attempts made and spent (the driver's count, for a restart)."""
        self._limit.ended(images, cost)
        self._poke()

    def halt(self) -> None:
        """Stop the cluster: every worker's next call answers that it is stopping."""
        self._limit.halt()
        self._poke()

    def stats(self) -> dict[str, Any]:
        """The limit's figures for the driver's display."""
        return self._limit.stats()


def start_limit_actor(
    settings: Settings,
    *,
    name: str,
    namespace: str = NAMESPACE,
    max_images_per_request: int = 10,
    earlier_images: int = 0,
    earlier_cost: float = 0.0,
) -> Any:
    """The named limit actor for a run (made, or the running one of that name)."""
    import ray

    config = LimitConfig.from_settings(
        settings,
        max_images_per_request=max_images_per_request,
        earlier_images=earlier_images,
        earlier_cost=earlier_cost,
    )
    remote = ray.remote(LimitActor)
    return remote.options(
        name=name,
        namespace=namespace,
        get_if_exists=True,
        # Restarted whenever its process dies; calls in flight are sent again to the new one.
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
        # Every worker may wait for as many slots as the cap holds: releases must never queue
        # behind those waits.
        max_concurrency=_MOST_CALLS,
    ).remote(config)
