"""The worker pool behind Engine.run(): a producer triages jobs onto a queue, workers send them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from .dispatch import Stopped
from .manifest import Job
from .results import Result
from .triage import SENT, Triage, Work


class WorkerPool:
    """run()'s producer and workers, and which of them hold a sent (maybe paid-for) request."""

    def __init__(
        self,
        *,
        triage: Triage,
        execute: Callable[[Work], Awaitable[Result]],
        stopping: Callable[[], bool],
        fail: Callable[[Exception], None],
    ) -> None:
        self.triage = triage
        self._execute = execute
        self._stopping = stopping
        # Told the first error that ends the run (the engine stops and raises it later).
        self._fail = fail
        # Pool workers, and those of them not holding a sent request (safe to cancel on stop).
        self._workers: set[asyncio.Task[Any]] = set()
        self._idle: set[asyncio.Task[Any]] = set()

    @property
    def holding_sent(self) -> int:
        """Workers holding a request that was sent (maybe paid for) and is not recorded yet."""
        return len(self._workers - self._idle)

    def cancel_idle(self) -> None:
        """Cancel the producer and the workers that hold no sent request."""
        for task in list(self._idle):
            task.cancel()

    def mark_busy(self, busy: bool) -> None:
        """Workers holding a sent request are not cancelled on stop: their images are paid for."""
        task = asyncio.current_task()
        if task not in self._workers:
            return
        assert task is not None
        if busy:
            self._idle.discard(task)
        else:
            self._idle.add(task)

    async def run(
        self,
        jobs: Iterable[Job] | AsyncIterable[Job],
        results: asyncio.Queue[Result | None],
        width: int,
        *,
        counting: bool,
    ) -> None:
        """Triage `jobs`, send their requests with `width` workers; put each Result, then None."""
        queue: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=width * 2)
        try:
            async with asyncio.TaskGroup() as group:
                producer = group.create_task(self._produce(jobs, queue, width, counting))
                self._idle.add(producer)
                for _ in range(width):
                    worker = group.create_task(self._work(queue, results))
                    self._workers.add(worker)
                    self._idle.add(worker)
        finally:
            self._idle.clear()
            self._workers.clear()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The consumer is gone: nobody will read the end marker, so never wait on it.
                with contextlib.suppress(asyncio.QueueFull):
                    results.put_nowait(None)
            else:
                await results.put(None)

    async def _produce(
        self,
        jobs: Iterable[Job] | AsyncIterable[Job],
        queue: asyncio.Queue[Work | None],
        width: int,
        counting: bool,
    ) -> None:
        try:
            async for job in _aiter(jobs):
                if self._stopping():
                    return
                for verdict, request, state in self.triage.verdicts(job):
                    self.triage.count(verdict, request, planned=counting)
                    if verdict in SENT:
                        await queue.put(Work(request, verdict, state))
        except Exception as exc:
            # A changed or impossible job, or a broken job source: stop cleanly; requests
            # already sent still land, then run() raises this error.
            self._fail(exc)
            return
        # Stopping workers are cancelled or leave on their own; only a finished producer
        # tells each worker that the queue is done.
        for _ in range(width):
            await queue.put(None)

    async def _work(
        self, queue: asyncio.Queue[Work | None], results: asyncio.Queue[Result | None]
    ) -> None:
        while not self._stopping():
            work = await queue.get()
            if work is None:
                return
            try:
                result = await self._execute(work)
            except Stopped:
                return
            except Exception as exc:
                # Upstream down, a rejected key, an unwritable folder (or a bug): every request
                # would fail alike, so stop cleanly and leave the rest for the next run.
                self._fail(exc)
                return
            finally:
                self.mark_busy(False)
            await results.put(result)


async def _aiter(jobs: Iterable[Job] | AsyncIterable[Job]) -> AsyncIterator[Job]:
    if isinstance(jobs, AsyncIterable):
        async for job in jobs:
            yield job
    else:
        for count, job in enumerate(jobs):
            yield job
            if count % 256 == 255:
                # Reading and validating a large manifest must not starve the workers.
                await asyncio.sleep(0)
