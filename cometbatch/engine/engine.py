"""The engine: a folder's parts wired once; jobs go through triage, the pool, a request's life."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol

import aiohttp

from ..costs.budget import BUDGET_REASONS, Budget, cap_text, open_budget
from ..costs.prices import PriceTable, builtin_prices
from ..errors import BudgetExceededError, CometBatchError
from ..layouts import RunLayout, open_layout
from ..ledger.runlines import end_line, run_line
from ..ledger.writer import Ledger
from ..manifest.job import Job
from ..manifest.reader import Manifest
from ..models.registry import ModelRegistry, load_registry
from ..net.client import Client
from ..net.limits import Limiter
from ..net.retry import RetryPolicy
from ..results import Result
from ..settings import Settings
from ..store.interface import Store
from ..store.sink import Sink
from ..store.urls import open_store, rooted_at
from .attempts import Attempts, CapReached, Stopped
from .inflight import Halt, InFlight
from .origin import refuse_to_open
from .pool import WorkerPool
from .request import RequestLife
from .summary import Summary
from .triage import SENT, Triage, Work

log = logging.getLogger(__name__)


class _Counted(Protocol):
    requests: int


class SimulatedAPI(Protocol):
    """A simulated API the engine sends to (a cometbatch.Simulator): nothing is billed."""

    @property
    def stats(self) -> _Counted: ...


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
        prices: PriceTable | None = None,
        limiter: Limiter | None = None,
        simulator: SimulatedAPI | None = None,
        store: Store | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.settings = settings or Settings()
        # Where images and the ledger go: by default the folder or object-store URL out_dir names.
        self.store: Store = store if store is not None else open_store(out_dir)
        self.out_dir: Path | str = rooted_at(self.store, out_dir)
        # A caller's registry as given; else models_file over the built-in ones, then overrides.
        self.registry = registry or load_registry(
            self.settings.models_file, self.settings.model_overrides
        )
        # A simulated API's runs say so, and its request count is in the end line's summary.
        self._simulator = simulator
        self.simulated = simulator is not None
        # Prices each result's cost and, with Settings.max_cost, each request's estimate.
        self.prices = prices or builtin_prices()
        self.summary = Summary(simulated=self.simulated)
        self.policy = RetryPolicy.from_settings(self.settings)
        self._session = session
        self._sleep = sleep
        self._state = "new"
        self._run_id = uuid.uuid4().hex[:12]
        self._run_started = False
        self._halt = Halt(self.summary)
        # Every task carrying a request: owned here, so a caller's cancel never drops a sent one.
        self._inflight = InFlight()
        self._pool = WorkerPool(inflight=self._inflight, halt=self._halt)
        self._started_at = 0.0
        # A caller's limiter (opened and closed with the engine) and budget (a cluster's caps).
        self._given_limiter, self._given_budget = limiter, budget
        self._limiter: Limiter | None = None
        self._ledger: Ledger | None = None
        self._attempts: Attempts | None = None
        self._triage: Triage | None = None
        self._life: RequestLife | None = None
        self._layout: RunLayout | None = None
        self._runner: asyncio.Task[None] | None = None
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
        return self._attempts.waiting if self._attempts is not None else 0

    @property
    def holding_sent_requests(self) -> int:
        """Requests that were sent (maybe paid for) and are not recorded yet."""
        return self._inflight.holding_sent

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked: no new requests start."""
        return self._halt.is_set()

    async def __aenter__(self) -> Engine:
        if self._state != "new":
            raise RuntimeError("an Engine can be opened only once; make a new one")
        self._state = "open"
        self._started_at = asyncio.get_running_loop().time()
        try:
            # Settings or an OUT that cannot work fail here, before OUT is created or locked.
            await asyncio.to_thread(refuse_to_open, self.settings, self.store)
            most = max((spec.max_n for spec in self.registry), default=10)  # sizes --ipm pacing
            limiter = self._given_limiter or Limiter.from_settings(
                self.settings, max_images_per_request=most
            )
            self._limiter = await self._stack.enter_async_context(limiter)
            # Work the pool has no free worker for (with one worker a slot, the slots hold it).
            limiter.backlog = self._pool.backlog
            client = await self._stack.enter_async_context(
                Client.from_settings(self.settings, session=self._session)
            )
            fsync = self.settings.fsync
            ledger = await self._stack.enter_async_context(
                Ledger(self.out_dir, fsync=fsync, store=self.store)
            )
            self._ledger = ledger
            layout = self._layout = await open_layout(
                self.store, self.settings, ledger, self._run_id, self.registry
            )
            sink = Sink(self.store, fsync=fsync == "always")
            self._stack.callback(sink.staging.remove_folder)
            removed = await asyncio.to_thread(sink.remove_stale_temp_files)
            if removed:
                log.info("removed %d unfinished image file(s) left by an interrupted run", removed)
            budget = self.summary.budget = self._given_budget or await open_budget(
                self.settings, ledger.path, self.prices
            )
            self._triage = Triage(
                settings=self.settings,
                registry=self.registry,
                out_dir=self.out_dir,
                run_id=self._run_id,
                summary=self.summary,
                recorded=ledger.state,
                store=self.store,
            )
            self._triage.count_unanswered()
            self._attempts = Attempts(
                client=client,
                limiter=limiter,
                sink=sink,
                policy=self.policy,
                summary=self.summary,
                inflight=self._inflight,
                halt=self._halt,
                sleep=self._sleep,
                lend=self._pool.lend,
                ledger=ledger,
                run_id=self._run_id,
            )
            self._life = RequestLife(
                attempts=self._attempts,
                triage=self._triage,
                ledger=ledger,
                out_dir=self.out_dir,
                run_id=self._run_id,
                summary=self.summary,
                base_url=self.settings.base_url,
                prices=self.prices,
                budget=budget,
                layout=layout,
            )
        except BaseException:
            self._state = "closed"
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._state in ("closing", "closed"):
            return
        # Closing: nothing new starts, requests already sent are still recorded.
        self._state = "closing"
        cancelled: asyncio.CancelledError | None = None
        packing: Exception | None = None
        try:
            try:
                await self._land_sent_requests()
            except asyncio.CancelledError as exc:
                # Cancelled while waiting: the rest is cut off (counted), the end line written.
                cancelled = exc
                await self._cut_off()
            if self._layout is not None and self._run_started and cancelled is None:
                packing = await self._layout.finish_run()  # the last shard; metadata.jsonl
            if self._limiter is not None:
                self.summary.pace = self._limiter.pace(whole=True)
            if self._simulator is not None:
                self.summary.simulator_requests = self._simulator.stats.requests
            if self._run_started and self._ledger is not None:
                self.summary.elapsed_s = asyncio.get_running_loop().time() - self._started_at
                stopped = self.summary.stopped
                with contextlib.suppress(Exception):
                    await self._ledger.append(
                        # The cap that stopped the run, if one did.
                        end_line(
                            self._run_id,
                            stopped if stopped in BUDGET_REASONS else None,
                            self.summary.to_dict(),
                        )
                    )
        finally:
            self._state = "closed"
            await self._stack.aclose()
        if cancelled is not None:
            raise cancelled
        if packing is not None and exc_info[1] is None:
            raise packing

    def _let_go(self) -> None:
        """run()'s consumer went away: take no new work; sent requests land and are recorded."""
        runner = self._runner
        if runner is not None and not runner.done():
            self.stop()
            self._pool.abandon()

    async def _land_sent_requests(self) -> None:
        """Let requests still out land within the grace period, then cut off the rest."""
        self._let_go()
        await self._inflight.wait(self.settings.grace_period)
        await self._cut_off()

    async def _cut_off(self) -> None:
        """Cancel whatever still runs, counting the sent requests it drops (maybe billed)."""
        if self._inflight.running:
            self.stop()
        self.summary.cut_off_requests += await self._inflight.abort()
        runner, self._runner = self._runner, None
        if runner is not None:
            # Its workers have ended; only the producer (stopped) may still be finishing.
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner

    def abort(self) -> int:
        """Stop at once: cancel every request; how many sent ones were cut off (maybe billed)."""
        # Nothing records those: the next run sends them again.
        self.stop()
        cut = self._inflight.cut_off()
        self.summary.cut_off_requests += cut
        return cut

    def stop(self, reason: str = "interrupted") -> None:
        """Stop taking new work; requests already sent finish and are recorded."""
        if self._halt.set(reason):
            # Workers waiting for a slot, a queue item or a retry hold nothing paid for.
            self._pool.cancel_idle()

    def _parts(self) -> tuple[Ledger, Triage, RequestLife]:
        """The open ledger, triage and request's life; raises when the engine is not open."""
        if self._state != "open":
            raise RuntimeError("the engine is not open: use 'async with Engine(...)'")
        assert self._ledger and self._triage and self._life
        return self._ledger, self._triage, self._life

    async def _start_run(self, manifest: Manifest | None) -> None:
        if self._run_started:
            return
        ledger = self._parts()[0]
        self._run_started = True
        self.summary.run_id = self._run_id
        await ledger.append(
            run_line(self._run_id, manifest, self.settings.public(), simulated=self.simulated)
        )

    async def generate(self, job: Job) -> list[Result]:
        """Generate one job's images under the engine's shared limits; one Result per request."""
        await self._start_run(None)
        _, triage, life = self._parts()
        life.layout.seen(job)
        # The job's recorded files are looked at off the event loop, as run() does.
        triaged = [item async for verdicts in triage.looked([job]) for item in verdicts]
        calls: list[asyncio.Future[Result]] = []
        sending = []
        for verdict, request, state in triaged:
            triage.count(verdict, request, planned=True)
            if verdict in SENT:
                # The request runs in a task the engine owns; this call only waits for it.
                work = life.admit(Work(request, verdict, state))
                task = self._inflight.start(life.execute(work))
                sending.append(task)
                calls.append(asyncio.shield(task))
            elif verdict == "reuse" and state is not None:
                calls.append(_resolved(triage.reused(request, state)))
            elif verdict == "hold":
                calls.append(_resolved(triage.held(request)))
            else:
                calls.append(_resolved(triage.kept(request, state)))
        try:
            return list(await asyncio.gather(*calls))
        except asyncio.CancelledError:
            # The caller went away: an unsent request is cancelled; a sent one is recorded.
            self._inflight.cancel_idle(sending)
            raise
        except Stopped as exc:
            if isinstance(exc, CapReached):
                self._pool.drain()  # a later run() takes no new work either
            budget = self.summary.budget
            if budget is not None and budget.stopped is not None:
                raise BudgetExceededError(
                    f"{cap_text(budget)}; the job was not sent", reason=budget.stopped
                ) from None
            raise CometBatchError("the engine is stopping; the job was not sent") from None

    async def run(self, jobs: Iterable[Job] | AsyncIterable[Job]) -> AsyncIterator[Result]:
        """Send every job's pending requests; yield one Result per request as it lands."""
        # Keys the ledger already has as ok are skipped without a request (not yielded).
        ledger, triage, life = self._parts()
        manifest = jobs if isinstance(jobs, Manifest) else None
        counted = True
        if manifest is not None and not len(ledger.state) and manifest.registry is self.registry:
            # A fresh folder: validation's totals are exact; a large manifest is not read again.
            self.summary.planned_requests += manifest.stats.requests
            self.summary.planned_images += manifest.stats.images
        elif isinstance(jobs, Manifest | list | tuple):
            # Re-iterable inputs are counted (and checked) up front; one-shot ones as they stream.
            triage.preflight_run(jobs, manifest, ledger.state.last_run, self.prices)
        else:
            counted = False
        await self._start_run(manifest)
        layout = life.layout  # earlier runs' staging: packed as its jobs are seen
        jobs = layout.awatch(jobs) if isinstance(jobs, AsyncIterable) else layout.watch(jobs)
        width = self.settings.max_in_flight
        results: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=width * 4)
        runner = self._runner = asyncio.create_task(
            self._pool.run(life, jobs, results, width, counting=not counted)
        )
        try:
            while True:
                item = await results.get()
                if item is None:
                    break
                yield item
            await runner
        finally:
            # Left early: stop taking work, never wait here (leaving the engine waits).
            self._let_go()
        if self._pool.error is not None:
            raise self._pool.error


def _resolved(result: Result) -> asyncio.Future[Result]:
    future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future
