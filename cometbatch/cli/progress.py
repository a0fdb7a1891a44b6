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

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from ..streams import stream_gone
from .snapshot import ESSENTIAL, Snapshot
from .statusline import fit, rich_text, width_of

if TYPE_CHECKING:
    from ..engine.engine import Engine

log = logging.getLogger(__name__)

Mode = Literal["rich", "plain", "off"]


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


# The bar's cells: it gives room to the essential counters down to BAR_MIN, never to the rest.
BAR_MIN = 10
BAR_MAX = 30


def bar_width(width: int, essential: int) -> int:
    """The bar's cells beside `essential` cells of counters (a narrower pane is all bar)."""
    return min(width, max(BAR_MIN, min(BAR_MAX, width - 1 - essential)))


@dataclass(frozen=True, slots=True)
class LiveView:
    """One frame of the live display, laid out for the width it is drawn in: a bar and the
    counters that fit beside it, then the pace on a line of its own."""

    snap: Snapshot
    rate: float
    elapsed: float | None = None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        parts = self.snap.parts(self.rate, self.elapsed)
        bar = bar_width(width, width_of(part for part in parts if part.rank < ESSENTIAL))
        counters = fit(parts, width - bar - 1)
        done = self.snap.done + self.snap.failed
        row = Table.grid(padding=(0, 1))
        row.add_column(width=bar, no_wrap=True)
        row.add_row(
            ProgressBar(total=self.snap.total or None, completed=done, width=bar),
            *([rich_text(counters)] if counters else []),
        )
        yield row
        pace = fit(self.snap.pace_parts(), width)
        if pace:
            yield rich_text(pace)


class ProgressDisplay:
    """Shows an engine's progress (or what `engine` returns when called) until closed; an async
    context manager."""

    def __init__(
        self,
        engine: Engine | Callable[[], Snapshot],
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
        self._live: Live | None = None
        self._meter = RateMeter()
        self._rate = 0.0
        self._elapsed: float | None = None

    def __repr__(self) -> str:
        return f"<ProgressDisplay mode={self.mode} running={self._task is not None}>"

    async def __aenter__(self) -> ProgressDisplay:
        if self.mode == "rich":
            # Redrawn by the loop below (no thread of its own), at the console's width then.
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()
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
        self._stop_drawing()

    def refresh(self) -> None:
        """Draw the current state once (rich mode), with the last measured rate."""
        if self._live is None:
            return
        try:
            snap = self._snapshot()
        except RuntimeError:
            return
        self._draw(snap)

    def _snapshot(self) -> Snapshot:
        """The state now; RuntimeError while there is none yet."""
        source = self.engine
        return source() if callable(source) else Snapshot.of(source)

    def _draw(self, snap: Snapshot) -> None:
        if self._live is not None:
            self._live.update(LiveView(snap, self._rate, self._elapsed), refresh=True)

    def _stop_drawing(self) -> None:
        """Stop the live display for good (its terminal or pipe has no reader any more)."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        every = 0.25 if self.mode == "rich" else self.plain_every
        # A pipe gets its first line soon, so a log shows the run has started.
        first = min(every, 2.0)
        # Once the reader went away (`| head`, a closed terminal) the display ends; the run
        # goes on.
        while not stream_gone(self.console.file):
            try:
                snap = self._snapshot()
            except RuntimeError:
                snap = None
            if snap is not None:
                now = loop.time()
                self._rate = self._meter.add(now, snap.processed)
                self._elapsed = now - started
                try:
                    if self.mode == "rich":
                        # The snapshot just read (its pace sums the last 30 s), not a second one.
                        self._draw(snap)
                    elif first == every:
                        line = snap.line(self._rate, self._elapsed)
                        self.console.print(line, highlight=False, soft_wrap=True)
                except OSError:
                    # A stream the CLI did not guard (a library caller's console).
                    break
            await self._sleep(first)
            first = every
        self._stop_drawing()
