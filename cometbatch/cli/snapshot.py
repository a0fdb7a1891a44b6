"""What the progress display shows at one moment, as parts ranked by what it keeps longest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..costs.prices import format_usd
from ..net.pace import HOLDBACK_SEP, Pace
from .statusline import SEP, Part, join

if TYPE_CHECKING:
    from ..engine.engine import Engine


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the display shows at one moment (pure data, easy to test)."""

    done: int
    failed: int
    total: int
    in_flight: int
    limit: int
    retries: int
    rate_limited: int
    probing: bool
    waiting: int = 0
    # Images finished by this run (written or failed): what the rate counts.
    processed: int = 0
    # Auto concurrency, or a level that follows the rate: `limit` is the level it chose,
    # `ceiling` the most it may grow to.
    auto: bool = False
    follows_rate: bool = False
    ceiling: int = 0
    # The rate sent against rpm/ipm and what holds it back (the last 30 s).
    pace: Pace | None = None
    # This run's spend so far; with a cap, the folder's figures against it.
    spent: float = 0.0
    images_cap: int | None = None
    images_counted: int = 0
    cost_cap: float | None = None
    cost_counted: float = 0.0
    # On a cluster: its workers, and those running a shard that still reports.
    workers: int = 0
    workers_alive: int = 0

    @classmethod
    def of(cls, engine: Engine) -> Snapshot:
        """Read the engine's live counters."""
        s = engine.summary
        limiter = engine.limiter
        budget = s.budget
        return cls(
            done=s.images_written + s.skipped_images,
            failed=s.failed_images,
            total=s.planned_images,
            in_flight=limiter.sending,
            limit=limiter.limit,
            retries=s.retries,
            rate_limited=s.rate_limited,
            probing=limiter.probing,
            waiting=engine.waiting_to_retry,
            processed=s.images_written + s.failed_images,
            auto=limiter.auto,
            follows_rate=limiter.mode == "rate",
            ceiling=limiter.concurrency,
            pace=limiter.pace(),
            spent=s.spent_usd,
            images_cap=budget.max_images if budget is not None else None,
            images_counted=budget.images + budget.reserved_images if budget is not None else 0,
            cost_cap=budget.max_cost if budget is not None else None,
            cost_counted=budget.cost + budget.reserved_cost if budget is not None else 0.0,
        )

    def parts(self, rate: float, elapsed: float | None = None) -> tuple[Part, ...]:
        """The counters in the order shown, each ranked by what the display keeps longest."""
        more = () if elapsed is None else (_part("elapsed", f"elapsed {eta_text(elapsed)}"),)
        return (*self._progress_parts(rate), *self._trouble_parts(), *self._spend_parts(), *more)

    def _progress_parts(self, rate: float) -> list[Part]:
        eta = self.eta(rate)
        parts = [
            _part("done", f"images {self.done}/{self.total}", style="bold"),
            _part("rate", f"{rate:.1f}/s", style="cyan"),
        ]
        if eta is not None:
            parts.append(_part("eta", f"eta {eta_text(eta)}"))
        parts.append(_part("in_flight", f"in flight {self.in_flight}/{self.limit}"))
        if self.auto or self.follows_rate:
            how = "auto" if self.auto else "follows the rate"
            parts.append(_part("level", f"({how}, max {self.ceiling})", sep=" "))
        if self.workers:
            parts.append(_part("workers", f"workers {self.workers_alive}/{self.workers} alive"))
        return parts

    def _trouble_parts(self) -> list[Part]:
        parts = [_part("failed", f"failed {self.failed}", style="red" if self.failed else "")]
        if self.probing:
            parts.append(_part("probing", "probing: the API is failing", style="yellow"))
        if self.waiting:
            parts.append(_part("waiting", f"waiting to retry {self.waiting}"))
        parts.append(_part("retries", f"retries {self.retries}"))
        parts.append(_part("429s", f"429s {self.rate_limited}"))
        return parts

    def _spend_parts(self) -> list[Part]:
        parts = [_part("spent", f"spent {format_usd(self.spent)}")]
        if self.cost_cap is not None:
            folder = f"(folder {format_usd(self.cost_counted)} of max {format_usd(self.cost_cap)})"
            parts.append(_part("cost_cap", folder, sep=" "))
        if self.images_cap is not None:
            folder = f"folder images {self.images_counted} of max {self.images_cap}"
            parts.append(_part("images_cap", folder))
        return parts

    def pace_parts(self) -> tuple[Part, ...]:
        """The rate against --rpm/--ipm, then what holds it back (none until the rate is known)."""
        return pace_parts(self.pace) if self.pace is not None else ()

    def eta(self, rate: float) -> float | None:
        """Seconds left at `rate` (0 when all is done), or None while nothing is moving."""
        left = self.total - self.done - self.failed
        if self.total and left <= 0:
            return 0.0
        return left / rate if rate > 0 else None

    def line(self, rate: float, elapsed: float | None = None) -> str:
        """A plain progress line for logs and pipes: every part, in the display's order."""
        return join((*self.parts(rate, elapsed), *self.pace_parts()))


# The counters by what the live display keeps longest as the terminal narrows. The first
# ESSENTIAL may take room from the bar (they fit beside it at 80 columns); the rest get only
# what is left.
KEEP: tuple[str, ...] = (
    "done", "failed", "eta", "rate", "in_flight",
    "workers", "probing", "waiting", "spent", "retries", "429s", "elapsed", "level", "cost_cap",
    "images_cap",
)  # fmt: skip
ESSENTIAL = 5


def _part(name: str, text: str, *, sep: str = SEP, style: str = "") -> Part:
    return Part(text, rank=KEEP.index(name), sep=sep, style=style)


def eta_text(seconds: float | None) -> str:
    """A short time left: '42 s', '3:05', '2:03:05', or '?' when unknown."""
    if seconds is None:
        return "?"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def pace_parts(pace: Pace) -> tuple[Part, ...]:
    """The rates, then what holds them back, as status-line parts (none until rates are known)."""
    # What holds the run back is the half a person acts on: it outlasts the figures when the
    # line narrows.
    rates = pace.rates_text()
    if not rates:
        return ()
    holdback = pace.holdback_text()
    return (Part(rates, rank=1), *([Part(holdback, rank=0, sep=HOLDBACK_SEP)] if holdback else []))
