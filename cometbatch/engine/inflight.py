"""The engine's request tasks (a caller's cancellation never drops a sent request), and its stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from .summary import Summary

log = logging.getLogger(__name__)

T = TypeVar("T")


class InFlight:
    """Tasks carrying requests, and which of them hold one that was sent and is not recorded."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        # Tracked tasks that hold nothing paid for (not sent yet, or waiting to retry).
        self._idle: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<InFlight tasks={len(self._tasks)} holding_sent={self.holding_sent}>"

    @property
    def holding_sent(self) -> int:
        """Tasks holding a request that was sent (maybe paid for) and is not recorded yet."""
        return len(self._tasks) - len(self._idle)

    @property
    def running(self) -> bool:
        """Whether any tracked task is still running."""
        return bool(self._tasks)

    def start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coro` in a task the engine owns: it outlives the caller that awaits it."""
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(_retrieve)
        self.track(task)
        return task

    def track(self, task: asyncio.Task[Any]) -> None:
        """Track a task (idle until it sends); it is forgotten when it ends."""
        self._tasks.add(task)
        self._idle.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._idle.discard(task)

    def mark_busy(self, busy: bool) -> None:
        """The current task starts (True) or stops (False) holding a sent request."""
        task = asyncio.current_task()
        if task not in self._tasks:
            return
        assert task is not None
        if busy:
            self._idle.discard(task)
        else:
            self._idle.add(task)

    def cancel_idle(self, tasks: Iterable[asyncio.Task[Any]]) -> None:
        """Cancel those of `tasks` that hold nothing sent; the others finish and are recorded."""
        for task in tasks:
            if task in self._idle:
                task.cancel()

    def cut_off(self) -> int:
        """Cancel every task at once; how many of them held a sent request (maybe billed)."""
        # A task cancelled by an earlier cut-off is still ending: it is not counted twice.
        held = sum(1 for task in self._tasks - self._idle if not task.cancelling())
        for task in self._tasks:
            task.cancel()
        return held

    async def wait(self, grace: float) -> None:
        """Wait up to `grace` seconds for every task to finish."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)

    async def abort(self) -> int:
        """Cut off every task and wait for them to end; how many held a sent request."""
        cut = self.cut_off()
        if self._tasks:
            # Cancelled tasks end at their next await: none is left running.
            await asyncio.wait(set(self._tasks))
        return cut


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A caller that went away no longer reads its task's outcome: log it instead."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("a request whose caller went away ended with %r", exc)


class Halt:
    """Whether the run still takes new work; set once, with the reason its summary records."""

    def __init__(self, summary: Summary) -> None:
        self._event = asyncio.Event()
        self._summary = summary

    def __repr__(self) -> str:
        return f"<Halt set={self.is_set()}>"

    def is_set(self) -> bool:
        """Whether a stop was asked: no new request starts."""
        return self._event.is_set()

    def set(self, reason: str = "interrupted") -> bool:
        """Stop taking new work for `reason`; False when a stop was asked before."""
        if self._event.is_set():
            return False
        self._event.set()
        if reason == "interrupted":
            self._summary.interrupted = True
        else:
            self._summary.stopped = reason
        return True

    async def sleep(self, delay: float) -> None:
        """Sleep `delay` seconds, or less when a stop comes (Ctrl-C never waits out a backoff)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), delay)
