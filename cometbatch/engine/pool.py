"""The worker pool behind Engine.run(): a producer triages jobs onto a queue, workers send them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

from ..manifest.job import Job
from ..results import Result
from .attempts import CapReached, Stopped
from .inflight import Halt, InFlight
from .request import RequestLife
from .triage import SENT, Work

# Jobs of a manifest triaged together, their files looked at in one thread call.
_BATCH = 256


class WorkerPool:
    """run()'s producer and workers; the engine's InFlight knows which hold a sent request."""

    def __init__(self, *, inflight: InFlight, halt: Halt) -> None:
        # Workers are tracked there: those holding a sent request are never cancelled on stop.
        self._inflight = inflight
        self._halt = halt
        # The first error that ended the run (it stops; the engine raises it after).
        self.error: Exception | None = None
        self._workers: set[asyncio.Task[Any]] = set()
        # Draining (a budget cap was reached): no new work is taken, work in hand finishes.
        self._draining = False
        self._producer: asyncio.Task[Any] | None = None
        # The consumer of run() went away: results are dropped, never waited on (sticky: a
        # stopped engine starts no new run).
        self._abandoned = False
        self._results: asyncio.Queue[Result | None] | None = None
        # Workers waiting for their next piece of work (let go at once when draining).
        self._getting: set[asyncio.Task[Any]] = set()
        # While a request waits out a retry delay (a 429's Retry-After), its worker is lent
        # out: a spare worker takes the next request, so one throttled request does not idle a
        # whole slot of `width`. Spares leave once the waiters are back (at most 2 x width).
        self._width = 0
        self._waiting = 0
        self._spawn: Callable[[], None] | None = None
        self._queue: asyncio.Queue[Work | None] | None = None

    def __repr__(self) -> str:
        return f"<WorkerPool workers={len(self._workers)} waiting={self._waiting}>"

    def backlog(self) -> bool:
        """Whether triaged work waits for a worker (so every worker is busy)."""
        return self._queue is not None and not self._queue.empty()

    def cancel_idle(self) -> None:
        """Cancel the producer and the workers that hold no sent request."""
        if self._producer is not None:
            self._producer.cancel()
        self._inflight.cancel_idle(list(self._workers))

    def abandon(self) -> None:
        """run()'s consumer left: drop its results from now on (sent requests still record)."""
        # So that no worker, and not the end marker, waits for a reader.
        self._abandoned = True
        results = self._results
        while results is not None and not results.empty():
            results.get_nowait()

    def drain(self) -> None:
        """Take no new work: the producer and the workers waiting for work are let go."""
        # The requests in hand (budgeted already) are sent, retried and recorded as usual.
        self._draining = True
        if self._producer is not None:
            self._producer.cancel()
        for task in list(self._getting):
            task.cancel()

    def lend(self, waiting: bool) -> None:
        """A worker starts (True) or ends (False) a retry wait; starting one may add a spare."""
        if not waiting:
            self._waiting -= 1
            return
        self._waiting += 1
        if (
            self._spawn is not None
            and not self._draining
            and not self._halt.is_set()
            and len(self._workers) < self._width + min(self._waiting, self._width)
        ):
            self._spawn()

    def _fail(self, exc: Exception) -> None:
        """Keep the first error that ends the run, and stop taking new work."""
        if self.error is None:
            self.error = exc
        if self._halt.set(str(exc)):
            self.cancel_idle()

    async def run(
        self,
        life: RequestLife,
        jobs: Iterable[Job] | AsyncIterable[Job],
        results: asyncio.Queue[Result | None],
        width: int,
        *,
        counting: bool,
    ) -> None:
        """Triage `jobs`, send their requests with `width` workers; put each Result, then None."""
        queue: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=width * 2)
        self._queue = queue
        self._width = width
        self._results = results
        try:
            async with asyncio.TaskGroup() as group:

                def spawn() -> None:
                    worker = group.create_task(self._work(life, queue, results))
                    self._workers.add(worker)
                    self._inflight.track(worker)

                producer = group.create_task(self._produce(life, jobs, queue, counting))
                self._producer = producer
                if self._draining:
                    producer.cancel()
                for _ in range(width):
                    spawn()
                self._spawn = spawn
        finally:
            self._spawn = None
            self._workers.clear()
            self._producer = None
            self._results = None
            task = asyncio.current_task()
            if self._abandoned or (task is not None and task.cancelling()):
                # The consumer is gone: nobody will read the end marker, so never wait on it.
                with contextlib.suppress(asyncio.QueueFull):
                    results.put_nowait(None)
            else:
                await results.put(None)

    async def _produce(
        self,
        life: RequestLife,
        jobs: Iterable[Job] | AsyncIterable[Job],
        queue: asyncio.Queue[Work | None],
        counting: bool,
    ) -> None:
        try:
            async for batch in _batches(jobs):
                # Their files are looked at in a thread, a batch at a time (Triage.looked).
                async for verdicts in life.triage.looked(batch):
                    if self._halt.is_set():
                        return
                    for verdict, request, state in verdicts:
                        life.triage.count(verdict, request, planned=counting)
                        if verdict in SENT:
                            await queue.put(life.admit(Work(request, verdict, state)))
        except Exception as exc:
            # A changed or impossible job, or a broken job source: stop cleanly; requests
            # already sent still land, then run() raises this error.
            self._fail(exc)
            return
        # Stopping workers are cancelled or leave on their own; only a finished producer
        # tells the workers that the queue is done: each passes the marker on as it leaves.
        await queue.put(None)

    async def _work(
        self,
        life: RequestLife,
        queue: asyncio.Queue[Work | None],
        results: asyncio.Queue[Result | None],
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            await self._serve(life, task, queue, results)
        finally:
            self._workers.discard(task)

    async def _serve(
        self,
        life: RequestLife,
        task: asyncio.Task[Any],
        queue: asyncio.Queue[Work | None],
        results: asyncio.Queue[Result | None],
    ) -> None:
        while not self._halt.is_set() and not self._draining:
            if len(self._workers) - self._waiting > self._width:
                return  # a spare whose waiter is back
            self._getting.add(task)
            try:
                work = await queue.get()
            finally:
                self._getting.discard(task)
            if work is None:
                queue.put_nowait(None)  # for the next worker
                return
            try:
                result = await life.execute(work)
            except CapReached:
                # A budget cap: take no new work; requests under way still land.
                self.drain()
                return
            except Stopped:
                return
            except Exception as exc:
                # Upstream down, a rejected key, an unwritable folder (or a bug): every request
                # would fail alike, so stop cleanly and leave the rest for the next run.
                self._fail(exc)
                return
            finally:
                self._inflight.mark_busy(False)
            if not self._abandoned:
                await results.put(result)


async def _batches(jobs: Iterable[Job] | AsyncIterable[Job]) -> AsyncIterator[list[Job]]:
    """The jobs a batch at a time: an async source's one by one, a plain one's by _BATCH."""
    # An async source may wait between jobs: each is triaged as it comes.
    if isinstance(jobs, AsyncIterable):
        async for job in jobs:
            yield [job]
        return
    iterator = iter(jobs)
    while True:
        batch: list[Job] = []
        try:
            for job in iterator:
                batch.append(job)
                if len(batch) == _BATCH:
                    break
        except Exception:
            # A bad manifest line: the jobs before it are triaged first, as one by one.
            if batch:
                yield batch
            raise
        if not batch:
            return
        yield batch
        # Reading and validating a large manifest must not starve the workers.
        await asyncio.sleep(0)
