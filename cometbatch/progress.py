"""Live progress: a rich bar on a terminal, periodic plain lines otherwise, nothing when quiet."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from .pace import Pace
from .prices import format_usd
from .streams import stream_gone

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)

Mode = Literal["rich", "plain", "off"]


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

    def detail(self) -> str:
        """The counters after the bar, one short line."""
        parts = [f"in flight {self.in_flight}/{self.limit}"]
        if self.auto:
            parts[0] += f" (auto, max {self.ceiling})"
        elif self.follows_rate:
            parts[0] += f" (follows the rate, max {self.ceiling})"
        pace = self.pace.text() if self.pace is not None else ""
        if pace:
            parts.append(pace)
        if self.waiting:
            parts.append(f"waiting to retry {self.waiting}")
        parts += [
            f"retries {self.retries}",
            f"429s {self.rate_limited}",
            f"failed {self.failed}",
        ]
        if self.cost_cap is not None:
            parts.append(
                f"spent {format_usd(self.spent)} (folder {format_usd(self.cost_counted)} "
                f"of max {format_usd(self.cost_cap)})"
            )
        else:
            parts.append(f"spent {format_usd(self.spent)}")
        if self.images_cap is not None:
            parts.append(f"folder images {self.images_counted} of max {self.images_cap}")
        if self.probing:
            parts.append("probing: the API is failing")
        return " · ".join(parts)

    def eta(self, rate: float) -> float | None:
        """Seconds left at `rate` (0 when all is done), or None while nothing is moving."""
        left = self.total - self.done - self.failed
        if self.total and left <= 0:
            return 0.0
        return left / rate if rate > 0 else None

    def line(self, rate: float) -> str:
        """A plain progress line for logs and pipes."""
        eta = self.eta(rate)
        after = f", eta {eta_text(eta)}" if eta is not None else ""
        return f"images {self.done}/{self.total} ({rate:.1f}/s{after}) · {self.detail()}"


def wants_no_color(environ: Mapping[str, str] | None = None) -> bool:
    """NO_COLOR set to anything but "" (https://no-color.org) asks for no colour or styling."""
    return (os.environ if environ is None else environ).get("NO_COLOR", "") != ""


def make_console(*, stderr: bool = True, environ: Mapping[str, str] | None = None) -> Console:
    """A console that writes no colour or style codes at all when NO_COLOR is set."""
    if wants_no_color(environ):
        # color_system=None drops every style code (bold too), not only the colours.
        return Console(stderr=stderr, highlight=False, no_color=True, color_system=None)
    return Console(stderr=stderr, highlight=False)


def choose_mode(
    *,
    quiet: bool,
    json_output: bool,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> Mode:
    """Rich on a terminal, plain lines on a pipe or a dumb terminal, nothing with --quiet or
    --json (the display writes to `stream`, stderr by default)."""
    if quiet or json_output:
        return "off"
    stream = stream or sys.stderr
    term = (os.environ if environ is None else environ).get("TERM", "")
    return "rich" if stream.isatty() and term != "dumb" else "plain"


class RateMeter:
    """Images per second over a sliding window of samples; images skipped as done never count."""

    def __init__(self, window: float = 15.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, processed: int) -> float:
        """Record the processed count at `now`; the rate over the window up to now."""
        self._samples.append((now, processed))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window:
            self._samples.popleft()
        then, before = self._samples[0]
        return (processed - before) / (now - then) if now > then else 0.0


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


class ProgressDisplay:
    """Shows an engine's progress until closed; an async context manager."""

    def __init__(
        self,
        engine: Engine,
        *,
        mode: Mode,
        console: Console | None = None,
        plain_every: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.engine = engine
        self.mode = mode
        self.console = console or make_console()
        self.plain_every = plain_every
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._progress: Progress | None = None
        self._bar: TaskID | None = None
        self._meter = RateMeter()
        self._rate = 0.0

    def __repr__(self) -> str:
        return f"<ProgressDisplay mode={self.mode} running={self._task is not None}>"

    async def __aenter__(self) -> ProgressDisplay:
        if self.mode == "rich":
            self._progress = Progress(
                TextColumn("[bold]images"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("[cyan]{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]}"),
                TextColumn("{task.fields[detail]}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._bar = self._progress.add_task("images", total=None, rate="", eta="?", detail="")
        if self.mode != "off":
            self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.refresh()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def refresh(self) -> None:
        """Draw the current state once (rich mode), with the last measured rate."""
        if self._progress is None or self._bar is None:
            return
        try:
            snap = Snapshot.of(self.engine)
        except RuntimeError:
            return
        self._progress.update(
            self._bar,
            total=snap.total or None,
            completed=snap.done + snap.failed,
            rate=f"{self._rate:.1f}/s",
            eta=eta_text(snap.eta(self._rate)),
            detail=snap.detail(),
        )

    def _stop_drawing(self) -> None:
        """Stop the live display for good (its terminal or pipe has no reader any more)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        every = 0.25 if self.mode == "rich" else self.plain_every
        # A pipe gets its first line soon, so a log shows the run has started.
        first = min(every, 2.0)
        # Once the reader went away (`| head`, a closed terminal) the display ends; the run
        # goes on.
        while not stream_gone(self.console.file):
            try:
                snap = Snapshot.of(self.engine)
            except RuntimeError:
                snap = None
            if snap is not None:
                self._rate = self._meter.add(loop.time(), snap.processed)
                try:
                    if self.mode == "rich":
                        self.refresh()
                    elif first == every:
                        self.console.print(snap.line(self._rate), highlight=False, soft_wrap=True)
                except OSError:
                    # A stream the CLI did not guard (a library caller's console).
                    break
            await self._sleep(first)
            first = every
        self._stop_drawing()
