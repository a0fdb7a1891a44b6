"""Live progress: a rich bar on a terminal, periodic plain lines otherwise, nothing when quiet."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
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
    TimeRemainingColumn,
)

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

    @classmethod
    def of(cls, engine: Engine) -> Snapshot:
        """Read the engine's live counters."""
        s = engine.summary
        limiter = engine.limiter
        return cls(
            done=s.images_written + s.skipped_images,
            failed=s.failed_images,
            total=s.planned_images,
            in_flight=limiter.in_flight,
            limit=limiter.limit,
            retries=s.retries,
            rate_limited=s.rate_limited,
            probing=limiter.probing,
            waiting=engine.waiting_to_retry,
        )

    def detail(self) -> str:
        """The counters after the bar, one short line."""
        parts = [f"in flight {self.in_flight}/{self.limit}"]
        if self.waiting:
            parts.append(f"waiting to retry {self.waiting}")
        parts += [
            f"retries {self.retries}",
            f"429s {self.rate_limited}",
            f"failed {self.failed}",
        ]
        if self.probing:
            parts.append("probing: the API is failing")
        return " · ".join(parts)

    def line(self, rate: float) -> str:
        """A plain progress line for logs and pipes."""
        eta = ""
        left = self.total - self.done - self.failed
        if rate > 0 and left > 0:
            eta = f", eta {int(left / rate)} s"
        return f"images {self.done}/{self.total} ({rate:.1f}/s{eta}) · {self.detail()}"


def choose_mode(*, quiet: bool, json_output: bool, stream: TextIO | None = None) -> Mode:
    """Rich on a terminal, plain lines on a pipe, nothing with --quiet or --json."""
    if quiet or json_output:
        return "off"
    stream = stream or sys.stderr
    return "rich" if stream.isatty() else "plain"


class ProgressDisplay:
    """Shows an engine's progress until closed; an async context manager."""

    def __init__(
        self,
        engine: Engine,
        *,
        mode: Mode,
        console: Console | None = None,
        plain_every: float = 10.0,
    ) -> None:
        self.engine = engine
        self.mode = mode
        self.console = console or Console(stderr=True)
        self.plain_every = plain_every
        self._task: asyncio.Task[None] | None = None
        self._progress: Progress | None = None
        self._bar: TaskID | None = None

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
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[detail]}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._bar = self._progress.add_task("images", total=None, rate="", detail="")
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
        """Draw the current state once."""
        if self.mode == "off":
            return
        try:
            snap = Snapshot.of(self.engine)
        except RuntimeError:
            return
        if self._progress is not None and self._bar is not None:
            task = self._progress.tasks[0]
            speed = task.speed or 0.0
            self._progress.update(
                self._bar,
                total=snap.total or None,
                completed=snap.done + snap.failed,
                rate=f"{speed:.1f}/s",
                detail=snap.detail(),
            )

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        # Images skipped from the ledger are not throughput: rate counts from here on.
        last_time, last_done = loop.time(), Snapshot.of(self.engine).done
        every = 0.25 if self.mode == "rich" else self.plain_every
        # A pipe gets its first line soon, so a log shows the run has started.
        first = min(every, 2.0)
        while True:
            await asyncio.sleep(first)
            first = every
            if self.mode == "rich":
                self.refresh()
                continue
            try:
                snap = Snapshot.of(self.engine)
            except RuntimeError:
                continue
            now = loop.time()
            rate = (snap.done - last_done) / max(now - last_time, 1e-9)
            last_time, last_done = now, snap.done
            self.console.print(snap.line(rate), highlight=False, soft_wrap=True)
