"""The rate a run achieves against its limits, and what holds it back (pure: times are given)."""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Literal

from .throttle import WINDOW, binding, needed, request_rate

# What held one request back before it left, and so, over many, what holds a run back:
# - "server": the failing API was being probed one request at a time, or the request waited
#   for a slot while 429s, 5xx or timeouts kept concurrency backed off;
# - "rate": it waited for an rpm/ipm token (the limit is in full use);
# - "concurrency": it waited for a slot (the concurrency limit is in full use);
# - "retries": it was a retry (a token or slot spent on a request sent before);
# - "jobs": nothing: it left at once (fewer requests were ready than there was room for).
Cause = Literal["rate", "server", "concurrency", "retries", "jobs"]
CAUSES: tuple[Cause, ...] = ("rate", "server", "concurrency", "retries", "jobs")
Mode = Literal["fixed", "auto", "rate"]
# Retries hold a run back once they are this share of what was sent, whatever else binds.
RETRY_SHARE = 0.2
# The display's rates are over this many recent seconds, and shown once this many have passed.
RECENT = 30.0
SETTLE = 5.0
# What holds the run back is told from the last this many seconds: a change shows soon.
CAUSE_SPAN = 10.0

# Between the rates and what holds them back, in the summary and the live display.
HOLDBACK_SEP = "; "


def cause_of(
    *, retry: bool, probing: bool, waited_rate: bool, waited_slot: bool, backed_off: bool
) -> Cause:
    """What held one request back (see Cause)."""
    if probing:
        return "server"
    if retry:
        return "retries"
    if waited_rate:
        return "rate"
    if waited_slot:
        return "server" if backed_off else "concurrency"
    return "jobs"


def main_cause(counts: Counter[Cause]) -> Cause | None:
    """What held most requests back: retries once they are RETRY_SHARE of them, else the
    commonest other cause (ties go in CAUSES order)."""
    total = sum(counts.values())
    if not total:
        return None
    if counts["retries"] >= RETRY_SHARE * total:
        return "retries"
    others = [cause for cause in CAUSES if cause != "retries" and counts[cause]]
    if not others:
        return "retries"
    return max(others, key=counts.__getitem__)


@dataclass(frozen=True, slots=True)
class Pace:
    """What was sent per minute against the limits, and what held it back."""

    # Requests (attempts, as the API counts them) and images asked for, per minute; None
    # while too little has been sent to tell.
    requests_per_min: float | None
    images_per_min: float | None
    rpm: float | None
    ipm: float | None
    # Mean seconds a request held its slot (from leaving to its answer).
    latency: float | None
    images_per_request: float | None
    mode: Mode
    level: int
    ceiling: int
    cause: Cause | None
    retry_share: float = 0.0
    probing: bool = False
    # Whether 429s or errors keep the level backed off now.
    backed_off: bool = False

    @classmethod
    def of(
        cls,
        seen: Measured,
        *,
        whole: bool,
        rpm: float | None,
        ipm: float | None,
        mode: Mode,
        level: int,
        ceiling: int,
        probing: bool,
        backed_off: bool,
    ) -> Pace:
        """What a meter `seen`, against the limits and the limiter's state now."""
        cause = seen.cause
        # Lately, a failing API holds everything back; so do 429s or errors that backed the
        # limit off, when the limit binds or their retries are what is sent.
        backed = cause in ("concurrency", "retries") and backed_off
        if not whole and cause is not None and (probing or backed):
            cause = "server"
        return cls(
            requests_per_min=seen.requests_per_min,
            images_per_min=seen.images_per_min,
            rpm=rpm,
            ipm=ipm,
            latency=seen.latency,
            images_per_request=seen.images_per_request,
            mode=mode,
            level=level,
            ceiling=ceiling,
            cause=cause,
            retry_share=seen.retry_share,
            probing=probing,
            backed_off=backed_off,
        )

    @property
    def request_rate(self) -> float | None:
        """Requests a second the rpm/ipm limits allow (the tighter one), if any is set."""
        return request_rate(self.rpm, self.ipm, self.images_per_request)

    @property
    def needs(self) -> int | None:
        """Requests in flight the limits need at the measured latency (Little's law)."""
        rate = self.request_rate
        if rate is None or self.latency is None:
            return None
        return math.ceil(needed(rate, self.latency))

    @property
    def share(self) -> float | None:
        """The achieved rate over the binding limit (rpm or ipm), once both are known."""
        if self.requests_per_min is None or self.images_per_min is None:
            return None
        if self._binding == "rpm" and self.rpm is not None:
            return self.requests_per_min / self.rpm
        if self._binding == "ipm" and self.ipm is not None:
            return self.images_per_min / self.ipm
        return None

    @property
    def _binding(self) -> Literal["rpm", "ipm"] | None:
        return binding(self.rpm, self.ipm, self.images_per_request)

    def rates_text(self) -> str:
        """'1,180 requests/min of 1,200 (98 %), 1,180 images/min', or '' before any figure."""
        if self.requests_per_min is None or self.images_per_min is None:
            return ""
        requests = f"{self.requests_per_min:,.0f} requests/min"
        if self.rpm is not None:
            requests += f" of {self.rpm:,.0f}"
        images = f"{self.images_per_min:,.0f} images/min"
        if self.ipm is not None:
            images += f" of {self.ipm:,.0f}"
        share = "" if self.share is None else f" ({self.share:.0%})"
        if self._binding == "rpm":
            requests += share
        else:
            images += share
        return f"{requests}, {images}"

    def _limit_text(self) -> str:
        """The binding limit as 'needs' text: '600/min' or '1,200 images/min'."""
        if self._binding == "rpm":
            return f"{self.rpm:,.0f}/min"
        return f"{self.ipm:,.0f} images/min"

    def _concurrency_text(self) -> str:
        if self.mode == "auto":
            name = f"auto concurrency at {self.level} (max {self.ceiling})"
        elif self.mode == "rate" and self.level >= self.ceiling:
            name = f"max concurrency {self.ceiling}"
        elif self.mode == "rate":
            name = f"concurrency {self.level} (sized from the latency)"
        else:
            name = f"concurrency {self.ceiling}"
        needs = self.needs
        if needs is None or self.latency is None:
            return f"limited by {name}"
        return (
            f"limited by {name}: at {self.latency:.1f} s per request, "
            f"{self._limit_text()} needs about {needs}"
        )

    def holdback_text(self) -> str:
        """What holds the run back, for a person; '' when nothing has been sent."""
        cause = self.cause
        if cause is None:
            return ""
        if cause == "rate":
            return "held back by the rate limit"
        if cause == "concurrency":
            return self._concurrency_text()
        if cause == "server":
            if self.probing:
                return "held back by the server: it fails most requests (probing one at a time)"
            now = f" to {self.level}" if self.backed_off else ""
            return f"held back by the server: its 429s or errors backed concurrency off{now}"
        if cause == "retries":
            return f"held back by retries: {self.retry_share:.0%} of requests sent were retries"
        return "not held back: every request left as soon as it was ready"

    def text(self) -> str:
        """Rates and what holds them back, one line ('' until the rates are known)."""
        rates = self.rates_text()
        holdback = self.holdback_text() if rates else ""
        return f"{rates}{HOLDBACK_SEP}{holdback}" if holdback else rates

    def to_dict(self) -> dict[str, Any]:
        """The summary's `pace` object (rates per minute, latency in seconds)."""
        return {
            "requests_per_min": _rounded(self.requests_per_min),
            "images_per_min": _rounded(self.images_per_min),
            "rpm": self.rpm,
            "ipm": self.ipm,
            "share_of_limit": None if self.share is None else round(self.share, 4),
            "latency_s": None if self.latency is None else round(self.latency, 3),
            "concurrency_mode": self.mode,
            "concurrency": self.level,
            "max_concurrency": self.ceiling,
            "needs": self.needs,
            "held_back_by": self.cause,
            "retry_share": round(self.retry_share, 4),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True, slots=True)
class Measured:
    """What a PaceMeter saw over a span: per-minute rates, latency, causes."""

    requests_per_min: float | None
    images_per_min: float | None
    latency: float | None
    images_per_request: float | None
    cause: Cause | None
    retry_share: float


class PaceMeter:
    """Counts what the limiter lets go, over the whole run and its last `recent` seconds:
    each request sent (its images and what held it back) and each slot's hold time."""

    def __init__(self, recent: float = RECENT, settle: float = SETTLE, lead: float = 0.0) -> None:
        self.recent_span = recent
        self.settle = settle
        # The seconds of sending a pacer lets go at once at the start (its bucket's room):
        # spans that hold the first request count them, so that a short paced run does not
        # read as sending above its limit.
        self.lead = lead
        self.requests = 0
        self.images = 0
        self.first: float | None = None
        self.last: float | None = None
        self.causes: Counter[Cause] = Counter()
        self._held = 0.0
        self._holds = 0
        self._sends: deque[tuple[float, int, Cause]] = deque()
        self._recent_holds: deque[tuple[float, float]] = deque()

    def sent(self, now: float, images: int, cause: Cause) -> None:
        """One request left now, asking for `images`."""
        self.requests += 1
        self.images += images
        self.causes[cause] += 1
        if self.first is None:
            self.first = now
        self.last = now
        self._sends.append((now, images, cause))
        self._forget(now)

    def held(self, now: float, seconds: float) -> None:
        """A slot was let go `seconds` after its request left."""
        self._held += seconds
        self._holds += 1
        self._recent_holds.append((now, seconds))
        self._forget(now)

    def _forget(self, now: float) -> None:
        start = now - self.recent_span
        while self._sends and self._sends[0][0] < start:
            self._sends.popleft()
        while self._recent_holds and self._recent_holds[0][0] < start:
            self._recent_holds.popleft()

    def whole(self) -> Measured:
        """The whole run: rates from the first request sent to the last, once that spans
        `settle` seconds (a shorter run may have gone out in the pacer's first burst)."""
        span = (self.last - self.first) if self.first is not None and self.last else 0.0
        requests = images = None
        if self.requests > 1 and span >= self.settle:
            # N requests paced from the first take N - 1 intervals.
            span += self.lead
            requests = (self.requests - 1) / span * WINDOW
            images = (self.images - self.images / self.requests) / span * WINDOW
        return Measured(
            requests_per_min=requests,
            images_per_min=images,
            latency=self._held / self._holds if self._holds else None,
            images_per_request=self.images / self.requests if self.requests else None,
            cause=main_cause(self.causes),
            retry_share=self.causes["retries"] / self.requests if self.requests else 0.0,
        )

    def latest(self, now: float) -> Measured:
        """The last `recent` seconds (rates once `settle` seconds have been sent over); what
        held requests back, over the last CAUSE_SPAN seconds."""
        self._forget(now)
        sends = self._sends
        since = now - self.first if self.first is not None else 0.0
        span = min(self.recent_span, since)
        count = len(sends)
        sent_images = sum(n for _, n, _ in sends)
        requests = images = None
        if span >= self.settle:
            if since <= self.recent_span:
                span += self.lead
            requests = count / span * WINDOW
            images = sent_images / span * WINDOW
        since_cause = now - CAUSE_SPAN
        counts: Counter[Cause] = Counter(cause for t, _, cause in sends if t >= since_cause)
        holds = self._recent_holds
        return Measured(
            requests_per_min=requests,
            images_per_min=images,
            latency=sum(s for _, s in holds) / len(holds) if holds else None,
            images_per_request=sent_images / count if count else None,
            cause=main_cause(counts),
            retry_share=counts["retries"] / counts.total() if counts.total() else 0.0,
        )
