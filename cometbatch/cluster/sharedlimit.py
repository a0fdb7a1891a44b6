"""One limit for many workers (pure, clock injected): leased rate tokens, global slots, budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..costs.budget import Budget, CapReason
from ..net.throttle import (
    MIN_ROUND,
    PACING_MARGIN,
    WINDOW,
    AimdLimit,
    AutoLimit,
)
from ..settings import Settings
from .buckets import TokenBucket

__all__ = ["HEARTBEAT", "LEASE_TTL", "Lease", "LimitConfig", "Report", "SharedLimit"]

# A worker sends a leased token within this many seconds or not at all. Sends then trail
# their lease by at most this much, so buckets that let `limit` through any window of
# 60 s + margin + LEASE_TTL keep every 60 s at the server within it.
LEASE_TTL = 1.0
# Workers report at least this often; one silent for three beats counts as gone.
HEARTBEAT = 1.0


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """What the shared limit holds: the cluster's concurrency, rates and caps."""

    concurrency: int
    min_concurrency: int = 1
    auto: bool = False
    rpm: float | None = None
    ipm: float | None = None
    max_images_per_request: int = 10
    max_images: int | None = None
    max_cost: float | None = None
    # What the whole output had made and spent before this run (the caps count it).
    earlier_images: int = 0
    earlier_cost: float = 0.0
    threshold: float = 0.1
    min_round: int = MIN_ROUND

    @classmethod
    def from_settings(cls, settings: Settings, **extra: Any) -> LimitConfig:
        """The limits of a run's settings (`extra`: the other fields)."""
        return cls(
            concurrency=settings.max_in_flight,
            min_concurrency=settings.min_concurrency,
            auto=settings.auto_concurrency,
            rpm=settings.rpm,
            ipm=settings.ipm,
            max_images=settings.max_images,
            max_cost=settings.max_cost,
            **extra,
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """Rate tokens handed to a worker (`rpm` requests, `ipm` images), or how long to wait."""

    rpm: int = 0
    ipm: int = 0
    wait: float = 0.0
    # Pauses (Retry-After) so far; slots wait them out, so tokens need not.
    pauses: int = 0
    # Where the tokens sit in their buckets, for give_back, and which limit leased them.
    rpm_mark: float = 0.0
    ipm_mark: float = 0.0
    instance: str = ""
    halted: bool = False


@dataclass(frozen=True, slots=True)
class Report:
    """A worker's own figures, sent with each heartbeat (a restarted limit adopts them)."""

    held: int = 0
    made: int = 0
    spent: float = 0.0
    reserved_images: int = 0
    reserved_cost: float = 0.0
    images_done: int = 0
    images_planned: int = 0


@dataclass(slots=True)
class _Worker:
    held: int = 0
    seen: float = 0.0
    report: Report = field(default_factory=Report)
    reserved_images: int = 0
    reserved_cost: float = 0.0
    adopted: bool = False


class SharedLimit:
    """The cluster's one limit: rate leases, global slots, back-off and budget per worker id."""

    def __init__(
        self,
        config: LimitConfig,
        clock: Callable[[], float],
        *,
        restarted: bool = False,
        instance: str = "",
    ) -> None:
        self.config = config
        # Leases name the limit that made them: one restarted since cannot take them back.
        self.instance = instance
        self._clock = clock
        now = clock()
        self.restarted = restarted
        window = WINDOW + PACING_MARGIN + LEASE_TTL
        self._rpm = (
            None if config.rpm is None else TokenBucket(config.rpm, 1, window=window, now=now)
        )
        self._ipm = (
            None
            if config.ipm is None
            else TokenBucket(config.ipm, config.max_images_per_request, window=window, now=now)
        )
        low, top, cut, rounds = (
            config.min_concurrency, config.concurrency, config.threshold, config.min_round
        )  # fmt: skip
        # Auto, and any restarted limit, start slow: from the floor, doubling each round trip
        # while the cap is in use.
        self._aimd = (
            AutoLimit(floor=low, ceiling=top, threshold=cut, min_round=rounds, start=low)
            if config.auto or restarted
            else AimdLimit(floor=low, ceiling=top, threshold=cut, min_round=rounds)
        )
        self.budget = Budget(
            max_images=config.max_images,
            max_cost=config.max_cost,
            earlier_images=config.earlier_images,
            earlier_cost=config.earlier_cost,
        )
        self._workers: dict[str, _Worker] = {}
        # Ids forgotten: a dead attempt's queued calls still arrive, and must take nothing.
        self._dead: set[str] = set()
        # Ids expired for silence: a heartbeat of one still alive says what it holds.
        self._expired: set[str] = set()
        # A restarted limit grants no budget before the driver told it what ended attempts made.
        self._told = not restarted
        # The last figures of workers that finished (a dead one's shard runs again instead).
        self._finished: dict[str, Report] = {}
        # A restarted limit lost what live workers hold: it grants no budget until they told it.
        self._recover_until = now + 3 * HEARTBEAT if restarted else now
        self.paused_until = now
        self.pauses = 0
        self.halted = False
        self.rate_limited = self.throttled = self.forgotten = 0
        self.leased_rpm = self.leased_ipm = 0
        self._rate_bound_at = float("-inf")

    def __repr__(self) -> str:
        return (
            f"<SharedLimit limit={self.limit} in_flight={self.in_flight} "
            f"workers={len(self._workers)} halted={self.halted}>"
        )

    @property
    def limit(self) -> int:
        """The global cap on requests in flight now (AIMD within [min, concurrency])."""
        return self._aimd.limit

    @property
    def in_flight(self) -> int:
        """Slots held across the cluster."""
        return sum(w.held for w in self._workers.values())

    def _worker(self, worker: str) -> _Worker:
        now = self._clock()
        for gone in [w for w, s in self._workers.items() if now - s.seen > 3 * HEARTBEAT]:
            # Silent for three beats (dead, or its retries ran out): its slots come back.
            self._drop(gone)
            self._expired.add(gone)
            self.forgotten += 1
        state = self._workers.get(worker)
        if state is None:
            state = self._workers[worker] = _Worker()
        state.seen = now
        return state

    def gone(self, worker: str) -> bool:
        """Whether `worker` was forgotten (its late calls are refused)."""
        return worker in self._dead

    def heartbeat(self, worker: str, report: Report) -> bool:
        """A worker's figures; False once halted (it should stop)."""
        if self.gone(worker):
            return False
        state = self._worker(worker)
        if self._clock() < self._recover_until or worker in self._expired:
            self._expired.discard(worker)
            # Restarted: calls sent to the old process arrive again, with their old figures,
            # so the slots a worker holds are what it says, until its reports have settled it.
            state.held = report.held
        if self.restarted and not state.adopted:
            # The budget this worker holds and made before the restart is counted again.
            state.reserved_images += report.reserved_images
            state.reserved_cost += report.reserved_cost
            self.budget.reserved_images += report.reserved_images
            self.budget.reserved_cost += report.reserved_cost
            self.budget.images += report.made
            self.budget.cost += report.spent
        state.adopted = True
        state.report = report
        return not self.halted

    # -- rate leases ----------------------------------------------------------------------

    def lease(self, worker: str, requests: int = 1, images: int = 0) -> Lease:
        """Tokens for at least `requests` and `images` (up to ~1 s of rate a worker), or a wait."""
        now = self._clock()
        if self.halted or self.gone(worker):
            return Lease(halted=True)
        self._worker(worker)
        if now < self.paused_until:
            return Lease(wait=self.paused_until - now, pauses=self.pauses)
        rpm, ipm = self._rpm, self._ipm
        need_r = requests if rpm is not None else 0
        need_i = min(images, self.config.max_images_per_request) if ipm is not None else 0
        wait = max(
            0.0 if rpm is None else rpm.wait(now, need_r),
            0.0 if ipm is None else ipm.wait(now, need_i),
        )
        if wait > 0:
            self._rate_bound_at = now
            return Lease(wait=wait, pauses=self.pauses)
        alive = max(1, self.workers_alive)
        got_r, rpm_mark = self._block(rpm, now, need_r, alive)
        got_i, ipm_mark = self._block(ipm, now, need_i, alive)
        self.leased_rpm += got_r
        self.leased_ipm += got_i
        return Lease(got_r, got_i, 0.0, self.pauses, rpm_mark, ipm_mark, self.instance)

    def _block(
        self, bucket: TokenBucket | None, now: float, need: int, alive: int
    ) -> tuple[int, float]:
        if bucket is None or need == 0:
            return 0, 0.0
        # About a second of the rate a worker: smooth pacing, one call a second per worker.
        share = int(bucket.drain / alive)
        got = max(need, min(share, int(bucket.free(now))))
        return got, bucket.take(now, got)

    def give_back(self, lease: Lease, requests: int, images: int) -> float:
        """Return the unused (newest) `requests` and `images` of a lease; tokens taken back."""
        if lease.instance != self.instance:
            return 0.0
        now = self._clock()
        back = 0.0
        for bucket, amount, mark in (
            (self._rpm, requests, lease.rpm_mark),
            (self._ipm, images, lease.ipm_mark),
        ):
            if bucket is not None and amount > 0:
                back += bucket.give_back(now, amount, mark)
        return back

    # -- global slots -------------------------------------------------------------------------

    def acquire(self, worker: str) -> float | None:
        """Take a global slot: None when taken, else seconds to wait (inf: until a release)."""
        now = self._clock()
        if self.gone(worker):
            return float("inf")
        state = self._worker(worker)
        if now < self.paused_until:
            return self.paused_until - now
        if self.in_flight >= self.limit:
            return float("inf")
        state.held += 1
        return None

    def release(
        self,
        worker: str,
        outcome: str | None = None,
        *,
        latency: float | None = None,
        retry_after: float | None = None,
        rate_limited: bool = False,
    ) -> int:
        """Give a slot back with its attempt's outcome (None: never answered); the cap's change."""
        now = self._clock()
        if self.gone(worker):
            return 0
        state = self._worker(worker)
        # Busy: the cap, not the rate or a lack of work, held requests back.
        busy = self.in_flight >= self.limit and now - self._rate_bound_at > HEARTBEAT
        # A slot taken before a restart is not known here: nothing to give back.
        state.held = max(0, state.held - 1)
        if outcome is None:
            return 0
        throttled = outcome == "throttled"
        self.rate_limited += rate_limited
        self.throttled += throttled
        # Every worker waits a Retry-After out: the server counts the account.
        if throttled and retry_after is not None and now + retry_after > self.paused_until:
            self.paused_until = now + retry_after
            self.pauses += 1
        aimd = self._aimd
        if isinstance(aimd, AutoLimit) and outcome == "ok" and latency is not None:
            aimd.observe(latency)
        return aimd.record(throttled, busy=busy and outcome == "ok", flight=self.in_flight)

    def forget(self, worker: str, *, dead: bool = True) -> int:
        """A worker gone (`dead`) or done: free its slots, keep its reservations spent."""
        self._dead.add(worker)
        state = self._drop(worker)
        if state is None:
            return 0
        self.forgotten += dead
        if not dead:
            self._finished[worker] = state.report
        return state.held

    def _drop(self, worker: str) -> _Worker | None:
        state = self._workers.pop(worker, None)
        if state is not None:
            # What it had in flight may have been generated and billed: kept as spent.
            images, cost = state.reserved_images, state.reserved_cost
            self.budget.settle(images, cost, images, cost)
        return state

    def ended(self, images: int, cost: float) -> None:
        """What attempts ended in this run made and spent (the driver's count, for a restart)."""
        if not self._told:
            self.budget.images += images
            self.budget.cost += cost
            self._told = True

    # -- budget -------------------------------------------------------------------------------

    def reserve(self, worker: str, images: int, cost: float | None) -> CapReason | float | None:
        """Hold a request's images and cost: None, the cap it would cross, or seconds to wait."""
        now = self._clock()
        if self.gone(worker):
            return "max_images" if self.config.max_images is not None else "max_cost"
        state = self._worker(worker)
        capped = self.config.max_images is not None or self.config.max_cost is not None
        if capped and (now < self._recover_until or not self._told):
            return max(self._recover_until - now, HEARTBEAT)
        cap = self.budget.reserve(images, cost)
        if cap is None:
            state.reserved_images += images
            state.reserved_cost += cost or 0.0
        return cap

    def settle(self, worker: str, images: int, cost: float | None, made: int, spent: float) -> None:
        """Replace a reservation by what its request made and spent."""
        state = None if self.gone(worker) else self._worker(worker)
        if state is None or state.reserved_images < images:
            return  # forgotten or expired since: its reservations count as spent
        state.reserved_images -= images
        state.reserved_cost -= cost or 0.0
        self.budget.settle(images, cost, made, spent)

    # -- the cluster --------------------------------------------------------------------------

    def halt(self) -> None:
        """Stop the cluster: every worker's next call answers "stopping"."""
        self.halted = True

    @property
    def workers_alive(self) -> int:
        """Workers heard from within three heartbeats."""
        now = self._clock()
        return sum(1 for w in self._workers.values() if now - w.seen <= 3 * HEARTBEAT)

    def stats(self) -> dict[str, Any]:
        """Plain figures for the driver's one display."""
        now = self._clock()
        reports = [*(w.report for w in self._workers.values()), *self._finished.values()]
        return {
            "in_flight": self.in_flight,
            "limit": self.limit,
            "concurrency": self.config.concurrency,
            "rate_limited": self.rate_limited,
            "pauses": self.pauses,
            "throttled": self.throttled,
            "paused_for": max(0.0, self.paused_until - now),
            "workers_alive": self.workers_alive,
            "workers_forgotten": self.forgotten,
            "images_done": sum(r.images_done for r in reports),
            "images_planned": sum(r.images_planned for r in reports),
            "leased_rpm": self.leased_rpm,
            "leased_ipm": self.leased_ipm,
            "budget": self.budget.to_dict(),
            "halted": self.halted,
            "restarted": self.restarted,
        }
