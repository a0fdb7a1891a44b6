"""Writer threads: a few threads that write files for every local store in the process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


class Trip:
    """One file's trip through a writer thread, which its caller may call off meanwhile."""

    __slots__ = ("called_off", "finished", "folder_known", "placed", "waiter")

    def __init__(self, folder_known: bool) -> None:
        # Whether the job's folder was there a moment ago (then it is not made again).
        self.folder_known = folder_known
        self.called_off = False
        # Set on the event loop once the thread is done with it; a cancelled caller waits
        # for that on `waiter`.
        self.finished = False
        self.waiter: asyncio.Future[None] | None = None
        # The final path, once the file was renamed there.
        self.placed: str | None = None

    def report(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        """Hand the thread's outcome to `future` (on the event loop), unless it was cancelled."""
        self.finished = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if future.cancelled():
            return
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)

    def place(self, temp: str, final: str) -> None:
        """Rename `temp` onto `final` unless the write was called off (in the worker thread)."""
        if self.called_off:
            raise CalledOff
        # Replacing is deliberate: a regenerated request overwrites its earlier image.
        os.replace(temp, final)
        self.placed = final


class CalledOff(Exception):
    """The write was called off before its rename (its caller was cancelled)."""


# A write handed to the writer threads: the loop to report to, what to call, and the
# callback (run on that loop) that takes its result or its exception.
_Report = Callable[[Any, "BaseException | None"], None]
_Work = tuple[asyncio.AbstractEventLoop, Callable[..., Any], tuple[Any, ...], _Report, int]


class Writers:
    """A few threads that write files for every local store in the process."""

    # Cheaper per write than a thread-pool future, and each thread wakes the event loop once
    # per batch of finished writes rather than once per write (each wake-up is a system call
    # on the loop's thread, which then has to win the GIL back). Threads start on demand and
    # leave after a few idle seconds; they are daemons, so an idle one never holds up exit
    # (every write is awaited by its request, and an interrupted one leaves only a temp file).

    def __init__(self, size: int, idle: float) -> None:
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._size = size
        self._idle_timeout = idle
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def __repr__(self) -> str:
        return f"<Writers threads={self._threads}/{self._size} idle={self._idle}>"

    def forget_threads(self) -> None:
        """In a forked child: the parent's threads (and its queued writes) did not come along."""
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = 0

    def submit(
        self, func: Callable[..., Any], args: tuple[Any, ...], report: _Report, weight: int = 0
    ) -> None:
        """Run `func(*args)` in a writer thread, then `report(result, exc)` on this loop;
        `weight`: the bytes it writes."""
        self._queue.put((asyncio.get_running_loop(), func, args, report, weight))
        with self._lock:
            if self._idle == 0 and self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._serve, name="cometbatch-writer", daemon=True).start()

    def _serve(self) -> None:
        left = False
        try:
            while (batch := self._take()) is not None:
                self._run(batch)
            left = True
        finally:
            if not left:
                # Leaving on an unexpected error: make room for a new thread.
                with self._lock:
                    self._threads -= 1

    def _take(self) -> list[_Work] | None:
        """The next writes (up to _BATCH, or _BATCH_BYTES, at once); None when idle long
        enough to leave."""
        work = self._queue
        while True:
            with self._lock:
                self._idle += 1
            try:
                first = work.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    # Checked under the lock that submit() takes after queueing: a write
                    # queued after this check finds no idle thread and starts one.
                    if work.empty():
                        self._threads -= 1
                        return None
                continue
            with self._lock:
                self._idle -= 1
            batch = [first]
            weight = first[4]
            with contextlib.suppress(queue.Empty):
                while len(batch) < _BATCH and weight < _BATCH_BYTES:
                    batch.append(work.get_nowait())
                    weight += batch[-1][4]
            return batch

    def _run(self, batch: list[_Work]) -> None:
        """Do the writes of `batch`, then wake each event loop once with their outcomes."""
        done: dict[asyncio.AbstractEventLoop, list[tuple[_Report, Any, Any]]] = {}
        for loop, func, args, report, _ in batch:
            try:
                outcome: tuple[_Report, Any, Any] = (report, func(*args), None)
            except BaseException as exc:
                outcome = (report, None, exc)
            done.setdefault(loop, []).append(outcome)
        for loop, outcomes in done.items():
            # A loop already closed has nobody left waiting.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_report_all, outcomes)


def _report_all(outcomes: list[tuple[_Report, Any, Any]]) -> None:
    """Hand finished writes their outcomes (on the event loop)."""
    for report, result, exc in outcomes:
        report(result, exc)


# Writes at most one thread takes at a time (so the others get some of a burst).
_BATCH = 8
# Bytes a batch stops growing at: a large file's caller is not kept waiting for the writes
# behind it in its batch (they are reported together).
_BATCH_BYTES = 256 * 1024
WRITERS = Writers(size=4, idle=5.0)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=WRITERS.forget_threads)


async def in_writer(
    func: Callable[..., _T], args: tuple[Any, ...], trip: Trip, weight: int = 0
) -> _T:
    """Run `func(*args)` in a writer thread; a cancelled call leaves no file of it."""
    # A thread cannot be interrupted: a cancelled call tells it to drop its temporary file
    # instead of renaming it (`trip`), waits for it, and removes the file if it was renamed
    # anyway, so no file of the write is left once the cancellation is through.
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()
    WRITERS.submit(func, args, functools.partial(trip.report, future), weight)
    try:
        # Awaited directly, not through asyncio.shield: a shield costs the caller an extra
        # turn of the event loop on every write.
        return await future
    except asyncio.CancelledError:
        trip.called_off = True
        if not trip.finished:
            trip.waiter = loop.create_future()
            await _wait_out(trip.waiter)
        if trip.placed is not None:
            # Complete, but its request will not be recorded: it must not stay behind.
            with contextlib.suppress(OSError):
                os.unlink(trip.placed)
        raise


async def _wait_out(done: asyncio.Future[Any]) -> None:
    """Wait until `done` is settled, through any further cancellations (re-raised by the
    caller afterwards), and mark its outcome as seen."""
    while not done.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({done})
    if not done.cancelled():
        done.exception()
