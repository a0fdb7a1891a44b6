"""The shared limiter: adaptive concurrency, rpm/ipm pacing and a retry budget for every request."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from types import TracebackType
from typing import Literal

from aiolimiter import AsyncLimiter

from ..errors import ConfigError, UpstreamDownError
from ..settings import ConcurrencyMode, Settings
from .pace import Measured, Pace, PaceMeter, cause_of
from .throttle import (
    MIN_ROUND,
    PACING_BURST,
    PACING_MARGIN,
    WINDOW,
    AimdLimit,
    AutoLimit,
    RateLimit,
    RetryBudget,
    auto_start,
    pacing_bucket,
    pacing_capacity,
    request_rate,
)

log = logging.getLogger(__name__)

Outcome = Literal["ok", "throttled", "failed"]
OUTCOMES: frozenset[str] = frozenset({"ok", "throttled", "failed"})
_CLOSED = "the limiter is closed"
# When the current task's request left (its slot was granted and its rate tokens taken): what
# record() times a success from. A task holds one slot at a time, so one value per task.
_SENT_AT: ContextVar[float | None] = ContextVar("cometbatch_sent_at", default=None)


class _Gate:
    """FIFO admission of at most `capacity()` holders; the capacity may change at any time."""

    def __init__(self, capacity: Callable[[], int]) -> None:
        self._capacity = capacity
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.holders = 0
        self.closed = False

    async def acquire(self) -> bool:
        """Take a place; True when it had to be waited for."""
        if self.closed:
            raise RuntimeError(_CLOSED)
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
                fut.set_exception(RuntimeError(_CLOSED))


class Limiter:
    """One shared gate for every request attempt: concurrency, rpm/ipm pacing and retry budget."""

    def __init__(
        self,
        *,
        concurrency: int,
        min_concurrency: int = 1,
        rpm: float | None = None,
        ipm: float | None = None,
        max_images_per_request: int = 10,
        throttle_threshold: float = 0.1,
        budget_tokens: float = 100,
        budget_ratio: float = 0.5,
        outage_limit: float = 300.0,
        clock: Callable[[], float] | None = None,
        adaptive: bool = True,
        auto: bool = False,
        follow_rate: bool = False,
        start: int | None = None,
        min_round: int = MIN_ROUND,
        pacing_margin: float = PACING_MARGIN,
        pacing_burst: float = PACING_BURST,
    ) -> None:
        if concurrency < 1 or not 1 <= min_concurrency <= concurrency:
            raise ConfigError(
                f"concurrency must be at least min_concurrency (>= 1); "
                f"got concurrency={concurrency}, min_concurrency={min_concurrency}"
            )
        if max_images_per_request < 1 or min_round < 1:
            raise ConfigError("max_images_per_request and min_round must be at least 1")
        if not 0 <= throttle_threshold < 1:
            raise ConfigError(f"throttle_threshold must be in [0, 1), got {throttle_threshold}")
        if budget_tokens <= 0 or budget_ratio < 0 or outage_limit <= 0:
            raise ConfigError("budget_tokens and outage_limit must be > 0, budget_ratio >= 0")
        if pacing_margin < 0 or pacing_burst < 0:
            raise ConfigError("pacing_margin and pacing_burst must be >= 0")
        self.concurrency = concurrency
        self.rpm = rpm
        self.ipm = ipm
        self.max_images_per_request = max_images_per_request
        self.outage_limit = outage_limit
        if auto and not adaptive:
            raise ConfigError("auto concurrency adapts the limit: it needs adaptive=True")
        self.adaptive = adaptive
        self.auto = auto
        self._clock = clock
        self._auto: AutoLimit | None = None
        self._rate: RateLimit | None = None
        self._aimd: AimdLimit
        if follow_rate and (auto or (rpm is None and ipm is None)):
            raise ConfigError("following the rate needs rpm or ipm, and not auto concurrency")
        self.mode: ConcurrencyMode = "auto" if auto else "rate" if follow_rate else "fixed"
        if follow_rate:
            self._aimd = self._rate = RateLimit(
                floor=min_concurrency,
                ceiling=concurrency,
                threshold=throttle_threshold,
                min_round=min_round,
                rate=_rate_of(rpm, ipm, 1.0),
            )
        elif auto:
            begin = auto_start(min_concurrency, concurrency) if start is None else start
            if not min_concurrency <= begin <= concurrency:
                raise ConfigError(
                    f"start must be within [min_concurrency, concurrency] = "
                    f"[{min_concurrency}, {concurrency}], got {begin}"
                )
            self._aimd = self._auto = AutoLimit(
                floor=min_concurrency,
                ceiling=concurrency,
                threshold=throttle_threshold,
                min_round=min_round,
                start=begin,
            )
        else:
            self._aimd = AimdLimit(
                floor=min_concurrency,
                ceiling=concurrency,
                threshold=throttle_threshold,
                min_round=min_round,
            )
        self._budget = RetryBudget(budget_tokens, budget_ratio)
        self._rpm = self._ipm = None
        # Seconds of sending the buckets let go at once at the start (their room).
        lead = 0.0
        window = WINDOW + pacing_margin
        if rpm is not None:
            # With both limits the rpm token is taken first and may be held while the ipm bucket
            # drains, so a window can see the request it paid for plus a full rpm of later
            # ones. Pacing is single file, so at most one token is held at a time: one request
            # of slack keeps what is actually sent within rpm.
            # Settings refuses an rpm this slack leaves nothing to pace with.
            slack = 1 if ipm is not None else 0
            size = pacing_capacity(rpm - slack, 1, pacing_burst)
            self._rpm = AsyncLimiter(*pacing_bucket(rpm - slack, size, window=window))
            lead = size / (rpm - slack) * WINDOW
        if ipm is not None:
            if ipm <= max_images_per_request:
                raise ConfigError(
                    f"ipm ({ipm:g}) must be more than the most images one request can carry "
                    f"({max_images_per_request}): no minute could hold a whole request "
                    "otherwise; raise ipm"
                )
            size = pacing_capacity(ipm, max_images_per_request, pacing_burst)
            self._ipm = AsyncLimiter(*pacing_bucket(ipm, size, window=window))
            lead = max(lead, size / ipm * WINDOW)
        self._gate = _Gate(lambda: self.effective_limit)
        # Pacing is single file, in arrival order: aiolimiter alone serves small amounts first,
        # which could starve 10-image requests behind 1-image ones.
        self._pacer = _Gate(lambda: 1)
        self._pacing_task: asyncio.Task[object] | None = None
        self._cancelled_by_close: asyncio.Task[object] | None = None
        self._waiting = 0
        self._closed = False
        self._last_ok: float | None = None
        self._last_error: str | None = None
        self._warned_clamp = False
        self._meter = PaceMeter(lead=lead)
        # Slots whose request has left (past the pacer), as opposed to slots still waiting
        # for their rate tokens.
        self.sending = 0
        # Told by the engine's worker pool: whether work waits for a worker.
        self.backlog: Callable[[], bool] | None = None
        self.ok_total = self.throttled_total = self.failed_total = 0
        self.decreases = self.increases = 0

    @classmethod
    def from_settings(cls, settings: Settings, *, max_images_per_request: int = 10) -> Limiter:
        """A limiter with the engine settings' concurrency (fixed or auto), rpm, ipm and outage
        limit."""
        return cls(
            concurrency=settings.max_in_flight,
            min_concurrency=settings.min_concurrency,
            auto=settings.auto_concurrency,
            follow_rate=settings.concurrency_mode == "rate",
            rpm=settings.rpm,
            ipm=settings.ipm,
            max_images_per_request=max_images_per_request,
            outage_limit=settings.outage_limit,
        )

    @property
    def limit(self) -> int:
        """The adaptive concurrency limit, within [min_concurrency, concurrency]."""
        return self._aimd.limit

    @property
    def min_concurrency(self) -> int:
        """The floor the limit never goes below."""
        return self._aimd.floor

    @property
    def slow_start(self) -> bool:
        """True while auto concurrency still doubles its limit every round trip."""
        return self._auto is not None and self._auto.slow_start

    @property
    def latency(self) -> float | None:
        """Auto concurrency's median latency of its last block of successes, in seconds."""
        return self._auto.latency if self._auto is not None else None

    @property
    def effective_limit(self) -> int:
        """How many requests may be in flight now: 1 while probing, else `limit`."""
        return 1 if self._budget.probing else self._aimd.limit

    @property
    def level(self) -> int:
        """The current level: how many requests may be in flight now (`effective_limit`)."""
        return self.effective_limit

    @property
    def backed_off(self) -> bool:
        """True while 429s, 5xx or timeouts keep the limit below where it was."""
        return self._aimd.backed_off

    def pace(self, *, whole: bool = False) -> Pace:
        """The rate achieved against rpm/ipm, and what holds it back: over the last 30 s,
        or over the whole run (`whole`)."""
        meter = self._meter
        if whole:
            seen: Measured = meter.whole()
        else:
            try:
                now = self._time()
            except RuntimeError:  # read off the event loop (a finished engine's display)
                now = meter.last or 0.0
            seen = meter.latest(now)
            # A failing API holds everything back; so do 429s or errors that backed the limit
            # off, when the limit binds or their retries are what is sent.
            backed = seen.cause in ("concurrency", "retries") and self.backed_off
            server = self.probing or backed
            if seen.cause is not None and server:
                seen = dataclasses.replace(seen, cause="server")
        return Pace(
            requests_per_min=seen.requests_per_min,
            images_per_min=seen.images_per_min,
            rpm=self.rpm,
            ipm=self.ipm,
            latency=seen.latency,
            images_per_request=seen.images_per_request,
            mode=self.mode,
            level=self.effective_limit,
            ceiling=self.concurrency,
            cause=seen.cause,
            retry_share=seen.retry_share,
            probing=self.probing,
            backed_off=self.backed_off,
        )

    @property
    def in_flight(self) -> int:
        """Slots held, counting a holder that still waits for its rate tokens."""
        return self._gate.holders

    @property
    def waiting(self) -> int:
        """Tasks inside `slot()` that have not been let through yet."""
        return self._waiting

    @property
    def probing(self) -> bool:
        """True while the retry budget is spent down: one request at a time probes the API."""
        return self._budget.probing

    @property
    def tokens(self) -> float:
        """Retry budget tokens left."""
        return self._budget.tokens

    @property
    def closed(self) -> bool:
        """True once closed: no new slots."""
        return self._closed

    def _time(self) -> float:
        """The limiter's clock (the event loop's unless one was given)."""
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _now(self) -> float:
        now = self._time()
        if self._last_ok is None:
            # The outage clock starts at first use, not at construction.
            self._last_ok = now
        return now

    def check_outage(self) -> None:
        """Raise UpstreamDownError when probing has found no success for `outage_limit` s."""
        now = self._now()
        down = now - (now if self._last_ok is None else self._last_ok)
        if self._budget.probing and down >= self.outage_limit:
            last = f" (last error: {self._last_error})" if self._last_error else ""
            raise UpstreamDownError(
                f"the API has failed every request for {down:.0f} s{last}; "
                "stopping — run the same command again to resume"
            )

    def record(
        self, outcome: Outcome, detail: str | None = None, *, latency: float | None = None
    ) -> None:
        """Feed one attempt's outcome to the retry budget and the adaptive limit.

        An answer with no `detail` is a success; with auto concurrency its latency (by default
        the time since the current task's slot let its request go) feeds the growth decision.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")
        now = self._now()
        was_probing = self._budget.probing
        if outcome == "ok":
            self.ok_total += 1
            self._last_ok = now
        else:
            if outcome == "throttled":
                self.throttled_total += 1
            else:
                self.failed_total += 1
            if detail:
                self._last_error = detail
        self._budget.record(outcome == "ok")
        if self.adaptive:
            self._adapt(outcome, detail, latency, now)
        if self._budget.probing != was_probing:
            if was_probing:
                log.info("the API answers again: leaving probe mode")
            else:
                log.warning("most requests fail: probing the API with one request at a time")
        # A raised limit or the end of probing makes room for waiters.
        self._gate.wake()

    def _adapt(
        self, outcome: Outcome, detail: str | None, latency: float | None, now: float
    ) -> None:
        auto = self._auto
        slow_start = auto is not None and auto.slow_start
        # Only real answers are timed and may grow the limit: an error answer (a refused
        # prompt) comes back fast and says nothing about generation time or capacity.
        success = outcome == "ok" and detail is None
        if auto is not None and success:
            if latency is None:
                sent = _SENT_AT.get()
                latency = None if sent is None else now - sent
            if latency is not None:
                auto.observe(latency)
        change = self._aimd.record(
            outcome == "throttled", busy=success and self._busy(), flight=self.sending
        )
        if change < 0:
            self.decreases += 1
            log.info("backing off: concurrency limit %d -> %d", self.limit - change, self.limit)
        elif change > 0:
            self.increases += 1
            log.debug("concurrency limit %d -> %d", self.limit - change, self.limit)
        if slow_start and auto is not None and not auto.slow_start and change >= 0:
            log.info(
                "auto concurrency: latency rose to %.2f s (lowest %.2f s); growing slowly from %d",
                auto.latency or 0.0,
                auto.baseline or 0.0,
                self.limit,
            )

    def _busy(self) -> bool:
        """Whether the concurrency limit, not pacing or a lack of work, holds requests back."""
        if self._pacer.holders or self._pacer.waiting:
            # Someone waits for rate tokens: more slots would only wait with it.
            return False
        return self._gate.holders >= self.effective_limit

    @asynccontextmanager
    async def slot(self, images: int = 1, *, retry: bool = False) -> AsyncIterator[None]:
        """Wait for a concurrency slot, then 1 rpm token and `images` ipm tokens; hold the slot.

        `retry`: the request was sent before (what holds a run back counts it apart).
        """
        waited_slot, waited_rate = await self._enter(images)
        now = self._now()
        sent = _SENT_AT.set(now)
        self.sending += 1
        try:
            # Taking the last free slot counts as waiting for one (a worker that came a moment
            # sooner would have waited), and so does work waiting for a worker: with one
            # worker a slot, a worker storing images keeps its slot's next request waiting.
            full = (
                waited_slot
                or self._gate.holders >= self.effective_limit
                or (self.backlog is not None and self.backlog())
            )
            self._sent(now, images, retry=retry, waited_slot=full, waited_rate=waited_rate)
            yield
        finally:
            self.sending -= 1
            _SENT_AT.reset(sent)
            self._gate.release()
            self._held(now, self._now())

    def _sent(
        self, now: float, images: int, *, retry: bool, waited_slot: bool, waited_rate: bool
    ) -> None:
        cause = cause_of(
            retry=retry,
            probing=self.probing,
            waited_rate=waited_rate,
            waited_slot=waited_slot,
            backed_off=self._aimd.backed_off,
        )
        meter = self._meter
        meter.sent(now, images, cause)
        if self._rate is not None:
            self._rate.rate = _rate_of(self.rpm, self.ipm, meter.images / meter.requests)

    def _held(self, sent: float, now: float) -> None:
        seconds = now - sent
        self._meter.held(now, seconds)
        if self._rate is not None:
            self._rate.observe(seconds)
            # A longer latency raises the level: make room for waiters.
            self._gate.wake()

    async def _enter(self, images: int) -> tuple[bool, bool]:
        """Wait for a slot, then for rate tokens; whether each had to be waited for."""
        if images < 0:
            raise ValueError(f"images must be >= 0, got {images}")
        if self._closed:
            raise RuntimeError(_CLOSED)
        self.check_outage()
        self._waiting += 1
        try:
            # The concurrency slot comes first and the rate tokens last, right before the
            # request goes out. Taken the other way round, a token would be spent while its
            # task still queues for a slot: the request leaves later than its token, tokens
            # bunch up behind busy slots and a window could see more than the limit (and a
            # task cancelled in the queue throws its token away). A slot held while waiting
            # for a token is not wasted: while anyone waits for a token, the rate, not the
            # concurrency, is what bounds throughput.
            waited_slot = await self._gate.acquire()
            try:
                # Queued waiters may have been let in after the upstream went down.
                self.check_outage()
                waited_rate = await self._pace(images)
            except BaseException:
                self._gate.release()
                raise
        finally:
            self._waiting -= 1
        return waited_slot, waited_rate

    async def _pace(self, images: int) -> bool:
        """Take the rate tokens; True when they had to be waited for."""
        if self._rpm is None and self._ipm is None:
            return False
        waited = await self._pacer.acquire()
        task = asyncio.current_task()
        self._pacing_task = task
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
                raise RuntimeError(_CLOSED) from None
            raise
        finally:
            self._pacing_task = None
            self._pacer.release()
        return waited

    def close(self) -> None:
        """Refuse new slots and wake every waiter with RuntimeError; slots held stay valid."""
        if self._closed:
            return
        self._closed = True
        self._gate.close()
        self._pacer.close()
        task = self._pacing_task
        if task is not None and not task.done():
            self._cancelled_by_close = task
            task.cancel()

    async def __aenter__(self) -> Limiter:
        if self._closed:
            raise RuntimeError("a Limiter cannot be reopened after close; make a new one")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        args = f"concurrency={self.concurrency!r}, rpm={self.rpm!r}, ipm={self.ipm!r}"
        if self.auto:
            args += ", auto=True"
        if self._rate is not None:
            args += ", follow_rate=True"
        state = (
            f"limit: {self.effective_limit}/{self.limit}, in flight: {self.in_flight}, "
            f"waiting: {self.waiting}, tokens: {self.tokens:.1f}"
        )
        if self.probing:
            state += ", probing"
        if self._closed:
            state += ", closed"
        return f"<Limiter({args}) at {id(self):#x} [{state}]>"


def _rate_of(rpm: float | None, ipm: float | None, images_per_request: float) -> float:
    rate = request_rate(rpm, ipm, images_per_request)
    assert rate is not None, "following the rate needs rpm or ipm"
    return rate
