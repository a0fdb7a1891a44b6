"""The shared limiter: adaptive concurrency, rpm/ipm pacing and a retry budget for every request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Literal

from ..errors import APIError, UpstreamDownError
from ..settings import ConcurrencyMode, Settings
from .admission import SENT_AT, Admission
from .gate import Gate
from .levels import check_limits, concurrency_level
from .pace import Pace, PaceMeter
from .pacer import Pacer
from .throttle import MIN_ROUND, PACING_BURST, PACING_MARGIN, AutoLimit, RateLimit, RetryBudget

log = logging.getLogger(__name__)

Outcome = Literal["ok", "throttled", "failed"]
OUTCOMES: frozenset[str] = frozenset({"ok", "throttled", "failed"})


class Limiter(Admission):
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
        check_limits(
            concurrency=concurrency,
            min_concurrency=min_concurrency,
            max_images_per_request=max_images_per_request,
            min_round=min_round,
            throttle_threshold=throttle_threshold,
            budget_tokens=budget_tokens,
            budget_ratio=budget_ratio,
            outage_limit=outage_limit,
            pacing_margin=pacing_margin,
            pacing_burst=pacing_burst,
        )
        self.concurrency = concurrency
        self.rpm = rpm
        self.ipm = ipm
        self.max_images_per_request = max_images_per_request
        self.outage_limit = outage_limit
        self.adaptive = adaptive
        self.auto = auto
        self._clock = clock
        self.mode: ConcurrencyMode = "auto" if auto else "rate" if follow_rate else "fixed"
        self._aimd = concurrency_level(
            auto=auto,
            follow_rate=follow_rate,
            floor=min_concurrency,
            ceiling=concurrency,
            threshold=throttle_threshold,
            min_round=min_round,
            adaptive=adaptive,
            start=start,
            rpm=rpm,
            ipm=ipm,
        )
        self._auto = self._aimd if isinstance(self._aimd, AutoLimit) else None
        self._rate = self._aimd if isinstance(self._aimd, RateLimit) else None
        self._budget = RetryBudget(budget_tokens, budget_ratio)
        self._pacer = Pacer(
            rpm=rpm,
            ipm=ipm,
            max_images_per_request=max_images_per_request,
            margin=pacing_margin,
            burst=pacing_burst,
        )
        self._gate = Gate(lambda: self.effective_limit)
        self._waiting = 0
        self._closed = False
        self._last_ok: float | None = None
        self._last_error: str | None = None
        self._meter = PaceMeter(lead=self._pacer.lead)
        # Slots whose request has left (past the pacer), as opposed to slots still waiting
        # for their rate tokens.
        self.sending = 0
        # Told by the engine's worker pool: whether work waits for a worker.
        self.backlog: Callable[[], bool] | None = None
        self.ok_total = self.throttled_total = self.failed_total = 0
        self.decreases = self.increases = 0

    @classmethod
    def from_settings(cls, settings: Settings, *, max_images_per_request: int = 10) -> Limiter:
        """A limiter with the engine settings' concurrency, rpm, ipm and outage limit."""
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
        """The rate achieved against rpm/ipm and what holds it back: the last 30 s, or the
        whole run (`whole`)."""
        meter = self._meter
        if whole:
            seen = meter.whole()
        else:
            try:
                now = self._time()
            except RuntimeError:  # read off the event loop (a finished engine's display)
                now = meter.last or 0.0
            seen = meter.latest(now)
        return Pace.of(
            seen,
            whole=whole,
            rpm=self.rpm,
            ipm=self.ipm,
            mode=self.mode,
            level=self.effective_limit,
            ceiling=self.concurrency,
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
        if self._last_ok is not None and not self._budget.probing:
            return  # the usual case, told without reading the clock
        now = self._now()
        down = now - (now if self._last_ok is None else self._last_ok)
        if self._budget.probing and down >= self.outage_limit:
            last = f" (last error: {self._last_error})" if self._last_error else ""
            raise UpstreamDownError(
                f"the API has failed every request for {down:.0f} s{last}; "
                "stopping — run the same command again to resume"
            )

    def record(
        self,
        outcome: Outcome,
        detail: str | None = None,
        *,
        latency: float | None = None,
        error: APIError | None = None,
    ) -> None:
        """Feed one attempt's outcome to the retry budget and the adaptive limit (`error`: the
        failure itself, for a limiter shared with other processes; this one needs only `detail`)."""
        # An answer with no `detail` is a success; with auto concurrency its latency (by
        # default since the current task's slot let its request go) feeds the growth decision.
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
                sent = SENT_AT.get()
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
        if self._pacer.busy:
            # Someone waits for rate tokens: more slots would only wait with it.
            return False
        return self._gate.holders >= self.effective_limit

    def close(self) -> None:
        """Refuse new slots and wake every waiter with RuntimeError; slots held stay valid."""
        if self._closed:
            return
        self._closed = True
        self._gate.close()
        self._pacer.close()

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
