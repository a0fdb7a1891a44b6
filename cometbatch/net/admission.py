"""How a request attempt is let in: a concurrency slot first, then its rate tokens."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from types import TracebackType

from .gate import CLOSED, Gate
from .levels import rate_of
from .pace import PaceMeter, cause_of
from .pacer import Pacer
from .throttle import AimdLimit, RateLimit

__all__ = ["SENT_AT", "Admission"]

# When the current task's request left (its slot was granted and its rate tokens taken): what
# the limiter times a success from. A task holds one slot at a time, so one value per task.
SENT_AT: ContextVar[float | None] = ContextVar("cometbatch_sent_at", default=None)


class Admission:
    """The Limiter's half that lets attempts in: slots, pacing and what each send is counted as."""

    rpm: float | None
    ipm: float | None
    sending: int
    backlog: Callable[[], bool] | None
    _gate: Gate
    _pacer: Pacer
    _meter: PaceMeter
    _aimd: AimdLimit
    _rate: RateLimit | None
    _waiting: int
    _closed: bool

    @property
    def effective_limit(self) -> int:
        raise NotImplementedError

    @property
    def probing(self) -> bool:
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError

    def check_outage(self) -> None:
        raise NotImplementedError

    def slot(self, images: int = 1, *, retry: bool = False) -> _Slot:
        """Wait for a concurrency slot, then 1 rpm token and `images` ipm tokens; hold the slot
        (`retry`: the request was sent before, which what holds a run back counts apart)."""
        return _Slot(self, images, retry)

    async def _open_slot(self, images: int, retry: bool) -> tuple[float, Token[float | None]]:
        """Enter a slot: when its request left, and the token that marks it for record()."""
        waited_slot, waited_rate = await self._enter(images)
        now = self._now()
        sent = SENT_AT.set(now)
        self.sending += 1
        # Taking the last free slot counts as waiting for one (a worker that came a moment
        # sooner would have waited), and so does work waiting for a worker: with one worker
        # a slot, a worker storing images keeps its slot's next request waiting.
        full = (
            waited_slot
            or self._gate.holders >= self.effective_limit
            or (self.backlog is not None and self.backlog())
        )
        try:
            self._sent(now, images, retry=retry, waited_slot=full, waited_rate=waited_rate)
        except BaseException:
            self._close_slot(now, sent)
            raise
        return now, sent

    def _close_slot(self, sent_at: float, sent: Token[float | None]) -> None:
        """Leave a slot entered at `sent_at`."""
        self.sending -= 1
        SENT_AT.reset(sent)
        self._gate.release()
        self._held(sent_at, self._now())

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
            self._rate.rate = rate_of(self.rpm, self.ipm, meter.images / meter.requests)

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
            raise RuntimeError(CLOSED)
        self.check_outage()
        # The usual case, a free slot and no rate to keep, without a wait or a task switch.
        took = self._gate.take_free()
        if took and not self._pacer.active:
            return False, False
        self._waiting += 1
        try:
            # The concurrency slot comes first and the rate tokens last, right before the
            # request goes out. Taken the other way round, a token would be spent while its
            # task still queues for a slot: the request leaves later than its token, tokens
            # bunch up behind busy slots and a window could see more than the limit (and a
            # task cancelled in the queue throws its token away). A slot held while waiting
            # for a token is not wasted: while anyone waits for a token, the rate, not the
            # concurrency, is what bounds throughput.
            waited_slot = False if took else await self._gate.acquire()
            try:
                # Queued waiters may have been let in after the upstream went down.
                if waited_slot:
                    self.check_outage()
                waited_rate = await self._pacer.take(images)
            except BaseException:
                self._gate.release()
                raise
        finally:
            self._waiting -= 1
        return waited_slot, waited_rate


class _Slot:
    """One request's hold on the limiter (an async context manager; see Limiter.slot)."""

    __slots__ = ("_images", "_limiter", "_retry", "_sent", "_sent_at")

    def __init__(self, limiter: Admission, images: int, retry: bool) -> None:
        self._limiter = limiter
        self._images = images
        self._retry = retry

    async def __aenter__(self) -> None:
        self._sent_at, self._sent = await self._limiter._open_slot(self._images, self._retry)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._limiter._close_slot(self._sent_at, self._sent)
