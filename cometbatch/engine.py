"""The engine: plan, skip what the ledger has, send under shared limits, store, record."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from . import __version__
from .aside import REPLACED_DIR, set_aside
from .client import Client
from .dispatch import Dispatcher, Sent, Stopped, fatal_error, interruptible_sleep
from .errors import APIError, ChangedJobsError, CometBatchError, OutputError
from .events import now_iso
from .ledger import Ledger
from .limits import Limiter
from .manifest import Job, Manifest
from .models import ModelRegistry
from .plan import Request, plan_job
from .results import DOWNLOAD_FAILED, PendingDownload, Result, Summary
from .resume import Verdict, decide
from .retry import RetryPolicy
from .settings import Settings
from .sink import ImageRecord, Sink
from .state import KeyState

log = logging.getLogger(__name__)


class Engine:
    """Runs jobs under one set of limits into one output folder; an async context manager."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        out_dir: str | os.PathLike[str],
        session: aiohttp.ClientSession | None = None,
        registry: ModelRegistry | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        simulated: bool = False,
        max_images_per_request: int | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.out_dir = Path(out_dir)
        # A caller's registry is used as given; the default one takes settings.model_overrides.
        self.registry = registry or ModelRegistry().with_overrides(self.settings.model_overrides)
        self.simulated = simulated
        # Sizes --ipm pacing; default: the most any model in the registry takes per request.
        self._max_images = max_images_per_request
        self.summary = Summary(simulated=simulated)
        self.policy = RetryPolicy.from_settings(self.settings)
        self._session = session
        self._sleep = sleep
        self._state = "new"
        self._run_id = uuid.uuid4().hex[:12]
        self._run_started = False
        self._stop_event = asyncio.Event()
        # Pool workers, and those of them not holding a sent request (safe to cancel on stop).
        self._workers: set[asyncio.Task[Any]] = set()
        self._idle: set[asyncio.Task[Any]] = set()
        self._fatal: Exception | None = None
        self._started_at = 0.0
        self._client: Client | None = None
        self._limiter: Limiter | None = None
        self._ledger: Ledger | None = None
        self._sink: Sink | None = None
        self._dispatcher: Dispatcher | None = None
        self._runner: asyncio.Task[None] | None = None
        # Requests being sent now, by key: a second caller of the same key shares the result.
        self._inflight: dict[str, asyncio.Future[Result]] = {}
        self._stack = contextlib.AsyncExitStack()

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"<Engine out_dir={str(self.out_dir)!r} state={self._state} ok={s.ok_requests} "
            f"failed={s.failed_requests} skipped={s.skipped_requests} limiter={self._limiter!r}>"
        )

    @property
    def run_id(self) -> str:
        """This engine session's id, as written on every ledger line."""
        return self._run_id

    @property
    def limiter(self) -> Limiter:
        """The shared limiter (live concurrency, in-flight count, probing)."""
        if self._limiter is None:
            raise RuntimeError("the engine is not open: use 'async with Engine(...)'")
        return self._limiter

    @property
    def waiting_to_retry(self) -> int:
        """Requests sleeping out a Retry-After or backoff before their next attempt."""
        return self._dispatcher.waiting if self._dispatcher is not None else 0

    @property
    def holding_sent_requests(self) -> int:
        """Workers holding a request that was sent (maybe paid for) and is not recorded yet."""
        return len(self._workers - self._idle)

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked: no new requests start."""
        return self._stop_event.is_set()

    async def __aenter__(self) -> Engine:
        if self._state != "new":
            raise RuntimeError("an Engine can be opened only once; make a new one")
        self._state = "open"
        self._started_at = asyncio.get_running_loop().time()
        try:
            # Settings that cannot work fail here, before the output folder is created or locked.
            max_n = self._max_images or max((spec.max_n for spec in self.registry), default=10)
            self._limiter = await self._stack.enter_async_context(
                Limiter.from_settings(self.settings, max_images_per_request=max_n)
            )
            self._client = await self._stack.enter_async_context(
                Client.from_settings(self.settings, session=self._session)
            )
            self._ledger = await self._stack.enter_async_context(Ledger(self.out_dir))
            self._sink = Sink(self.out_dir)
            # A large images folder takes a while to scan: keep the event loop free meanwhile.
            removed = await asyncio.to_thread(self._sink.remove_stale_temp_files)
            if removed:
                log.info("removed %d unfinished image file(s) left by an interrupted run", removed)
            self._dispatcher = Dispatcher(
                client=self._client,
                limiter=self._limiter,
                sink=self._sink,
                policy=self.policy,
                summary=self.summary,
                sleep=(
                    self._sleep
                    if self._sleep is not None
                    else interruptible_sleep(self._stop_event)
                ),
                stopping=self._stop_event.is_set,
                busy=self._mark_busy,
            )
        except BaseException:
            self._state = "closed"
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        try:
            await self._end_runner()
            if self._run_started and self._ledger is not None:
                self.summary.elapsed_s = asyncio.get_running_loop().time() - self._started_at
                with contextlib.suppress(Exception):
                    await self._ledger.append(
                        {
                            "event": "end",
                            "run_id": self._run_id,
                            "finished_at": now_iso(),
                            "summary": self.summary.to_dict(),
                        }
                    )
        finally:
            await self._stack.aclose()

    async def _end_runner(self) -> None:
        """Stop a run whose consumer went away (a break, a dropped generator) and wait for it."""
        runner, self._runner = self._runner, None
        if runner is None or runner.done():
            return
        self.stop()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await runner

    def stop(self, reason: str = "interrupted") -> None:
        """Stop taking new work; requests already sent finish and are recorded."""
        if self._stop_event.is_set():
            return
        self._stop_event.set()
        if reason == "interrupted":
            self.summary.interrupted = True
        else:
            self.summary.stopped = reason
        # Workers waiting for a slot, a queue item or a retry hold nothing paid for: cancel them.
        for task in list(self._idle):
            task.cancel()

    def _fail(self, exc: Exception) -> None:
        """Remember the first error that ends the run, and stop."""
        if self._fatal is None:
            self._fatal = exc
            self.stop(str(exc))

    def _open_parts(self) -> tuple[Client, Limiter, Ledger, Sink]:
        if self._state != "open":
            raise RuntimeError("the engine is not open: use 'async with Engine(...)'")
        assert self._client and self._limiter and self._ledger and self._sink
        return self._client, self._limiter, self._ledger, self._sink

    async def _start_run(self, manifest: Manifest | None) -> None:
        if self._run_started:
            return
        _, _, ledger, _ = self._open_parts()
        self._run_started = True
        settings = self.settings.public()
        settings["simulated"] = self.simulated
        self.summary.run_id = self._run_id
        await ledger.append(
            {
                "event": "run",
                "run_id": self._run_id,
                "started_at": now_iso(),
                "manifest": str(manifest.path) if manifest is not None else None,
                "manifest_sha256": manifest.sha256 if manifest is not None else None,
                "version": __version__,
                "settings": settings,
            },
        )

    # -- deciding what to send ------------------------------------------------------------

    def _triage(self, job: Job) -> Iterator[tuple[Verdict, Request, KeyState | None]]:
        """Each request of a job with its verdict (see resume.decide); "changed" is yielded
        only when the settings allow regenerating changed jobs."""
        _, _, ledger, _ = self._open_parts()
        spec = self.registry.get(job.model)
        spec.check(job.params(), job.prompt)
        changed = []
        for request in plan_job(job, spec):
            state = ledger.state.get(request.key)
            verdict = decide(request.fingerprint, state, retry_failed=self.settings.retry_failed)
            if verdict == "changed" and not self.settings.regenerate_changed:
                changed.append(request.key)
            else:
                yield verdict, request, state
        if changed:
            raise ChangedJobsError(self.out_dir, [job.id])

    def _count(self, verdict: str, request: Request, *, planned: bool) -> None:
        s = self.summary
        if planned:
            s.planned_requests += 1
            s.planned_images += request.n
        if verdict == "reuse":
            s.skipped_requests += 1
            s.skipped_images += request.n
        elif verdict == "keep":
            s.kept_failures += 1
        elif verdict == "changed":
            s.regenerated_requests += 1

    def _reused(self, request: Request, state: KeyState) -> Result:
        """The ledger's ok result for a request, reported again without sending it."""
        images = tuple(ImageRecord(**image) for image in state.images)
        return Result.of(request, self._run_id, "ok", images=images, reused=True)

    def _kept(self, request: Request, state: KeyState | None) -> Result:
        """A permanent failure from an earlier run, reported again without a request."""
        if state is not None and state.status == DOWNLOAD_FAILED:
            message = (
                "generated in an earlier run, but its image link no longer works (see the "
                "ledger); set retry_failed to generate it again (paid again)"
            )
        else:
            message = (
                "failed permanently in an earlier run (see the ledger); "
                "set retry_failed to try again"
            )
        error = {
            "kind": "earlier_failure",
            "status": None,
            "code": None,
            "message": message,
            "request_id": None,
            "retryable": False,
        }
        return Result.of(request, self._run_id, "failed", error=error, reused=True)

    def _preflight(self, jobs: Iterable[Job]) -> None:
        """Count planned work and refuse changed jobs (all named) before anything is sent."""
        changed: list[str] = []
        for job in jobs:
            try:
                for _, request, _ in self._triage(job):
                    self.summary.planned_requests += 1
                    self.summary.planned_images += request.n
            except ChangedJobsError:
                changed.append(job.id)
        if changed:
            raise ChangedJobsError(self.out_dir, changed)

    def _mark_busy(self, busy: bool) -> None:
        """Workers holding a sent request are not cancelled on stop: their images are paid for."""
        task = asyncio.current_task()
        if task not in self._workers:
            return
        assert task is not None
        if busy:
            self._idle.discard(task)
        else:
            self._idle.add(task)

    async def _execute(self, work: Work) -> Result:
        """Send a request, or share the result of the same request already being sent."""
        request = work.request
        while (pending := self._inflight.get(request.key)) is not None:
            # Two generate() calls for one job must not pay twice; wait without taking over
            # the first caller's error (if it fails, this caller sends the request itself).
            await asyncio.wait({pending})
            if not pending.cancelled():
                shared = pending.result()
                self._count("reuse" if shared.ok else "keep", request, planned=False)
                return dataclasses.replace(shared, reused=True)
        _, _, ledger, _ = self._open_parts()
        state = ledger.state.get(request.key)
        if state is not None and decide(request.fingerprint, state, retry_failed=False) == "reuse":
            # Done since it was queued (the same job twice in a caller's list): reuse it.
            self._count("reuse", request, planned=False)
            return self._reused(request, state)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._inflight[request.key] = future
        try:
            result = await self._send_and_record(work)
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[request.key]

    async def _send_and_record(self, work: Work) -> Result:
        """One request from send to ledger line; API failures become a failed Result."""
        _, _, ledger, _ = self._open_parts()
        dispatcher = self._dispatcher
        assert dispatcher is not None
        request, recorded = work.request, work.recorded
        loop = asyncio.get_running_loop()
        started = loop.time()
        if work.verdict == "fetch" and recorded is not None:
            # Generated (and paid for) in an earlier run: only its downloads are tried again.
            sent = Sent(images=[ImageRecord(**image) for image in recorded.images])
            pending = [PendingDownload(*item) for item in recorded.downloads]
            await dispatcher.refetch(request.job.id, pending, sent)
        else:
            if work.verdict == "changed" and recorded is not None:
                await self._set_aside(recorded)
            try:
                sent = await dispatcher.send(request)
            except APIError as exc:
                raise fatal_error(exc, self.settings.base_url) from exc
        result = Result.of(
            request,
            self._run_id,
            sent.status,
            images=tuple(sent.images),
            downloads=tuple(sent.pending),
            attempts=sent.attempts,
            ambiguous_retries=sent.ambiguous,
            error=sent.error.to_record() if sent.error else None,
            latency_s=loop.time() - started,
            finished_at=now_iso(),
            usage=sent.usage,
        )
        await ledger.append(result.to_event())
        self.summary.add(result)
        return result

    async def _set_aside(self, recorded: KeyState) -> None:
        """Move a changed job's recorded images out of the way before regenerating them."""
        relpaths = [image["path"] for image in recorded.images]
        try:
            moved = await asyncio.to_thread(set_aside, self.out_dir, self._run_id, relpaths)
        except OSError as exc:
            raise OutputError(
                f"cannot move the old images of job {recorded.job_id!r} aside in "
                f"{self.out_dir}: {exc.strerror or exc}"
            ) from exc
        if moved:
            log.info(
                "job %r changed: %d old image(s) moved to %s",
                recorded.job_id,
                moved,
                self.out_dir / REPLACED_DIR / self._run_id,
            )

    # -- public entry points ---------------------------------------------------------------

    async def generate(self, job: Job) -> list[Result]:
        """Generate one job's images under the engine's shared limits; one Result per request."""
        await self._start_run(None)
        triaged = list(self._triage(job))
        calls = []
        for verdict, request, state in triaged:
            self._count(verdict, request, planned=True)
            if verdict in _SENT:
                calls.append(self._execute(Work(request, verdict, state)))
            elif verdict == "reuse" and state is not None:
                calls.append(_done(self._reused(request, state)))
            else:
                calls.append(_done(self._kept(request, state)))
        try:
            return list(await asyncio.gather(*calls))
        except Stopped:
            raise CometBatchError("the engine is stopping; the job was not sent") from None

    async def run(self, jobs: Iterable[Job] | AsyncIterable[Job]) -> AsyncIterator[Result]:
        """Send every job's pending requests; yield one Result per request as it lands.

        Keys the ledger already has as ok are skipped without a request (not yielded).
        """
        _, _, ledger, _ = self._open_parts()
        manifest = jobs if isinstance(jobs, Manifest) else None
        counted = True
        if manifest is not None and not len(ledger.state) and manifest.registry is self.registry:
            # A fresh folder has nothing to skip or contradict: the totals that validation
            # counted are exact, so a large manifest is not read an extra time.
            self.summary.planned_requests += manifest.stats.requests
            self.summary.planned_images += manifest.stats.images
        elif isinstance(jobs, Manifest | list | tuple):
            # Re-iterable inputs are counted (and checked for changed jobs) before anything is
            # sent; one-shot iterators are counted as they stream.
            self._preflight(jobs)
        else:
            counted = False
        await self._start_run(manifest)
        width = self.settings.concurrency
        queue: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=width * 2)
        results: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=width * 4)
        runner = self._runner = asyncio.create_task(
            self._run_all(jobs, queue, results, width, counting=not counted)
        )
        try:
            while True:
                item = await results.get()
                if item is None:
                    break
                yield item
            await runner
        finally:
            await self._end_runner()
        if self._fatal is not None:
            raise self._fatal

    async def _run_all(
        self,
        jobs: Iterable[Job] | AsyncIterable[Job],
        queue: asyncio.Queue[Work | None],
        results: asyncio.Queue[Result | None],
        width: int,
        *,
        counting: bool,
    ) -> None:
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
                if self.stopping:
                    return
                for verdict, request, state in self._triage(job):
                    self._count(verdict, request, planned=counting)
                    if verdict in _SENT:
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
        while not self.stopping:
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
                self._mark_busy(False)
            await results.put(result)


# Verdicts that put a request on the work queue (the rest are answered from the ledger).
_SENT = frozenset({"send", "fetch", "changed"})


@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    """A request for a worker: send it, fetch its pending downloads, or regenerate it."""

    request: Request
    verdict: Verdict = "send"
    recorded: KeyState | None = None


async def _done(result: Result) -> Result:
    return result


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
