"""The engine: one folder's shared parts and run; jobs go through triage, the pool, the sender."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from .. import __version__
from ..costs.budget import BUDGET_REASONS, CapReason, cap_text, open_budget
from ..costs.prices import CostEstimate, PriceTable, builtin_prices
from ..errors import AuthenticationError, BudgetExceededError, CometBatchError
from ..ledger.events import LEDGER_NAME, now_iso
from ..ledger.writer import Ledger
from ..manifest.jobs import Job, Manifest
from ..models.registry import ModelRegistry, load_registry
from ..net.client import Client
from ..net.limits import Limiter
from ..net.retry import RetryPolicy
from ..results import Result, Summary
from ..settings import KEY_ENV, Settings
from ..store.interface import Store
from ..store.local import LocalStore
from ..store.sink import Sink
from .dispatch import Dispatcher, Stopped, interruptible_sleep
from .inflight import InFlight
from .origin import NewWork, other_manifest, other_manifest_text
from .pool import WorkerPool
from .sender import Sender
from .triage import SENT, Triage, Work

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
        prices: PriceTable | None = None,
        store: Store | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.out_dir = Path(out_dir)
        # Where images and the ledger are written; default: the local folder out_dir.
        self.store: Store = store if store is not None else LocalStore(self.out_dir)
        # A caller's registry is used as given; the default one is built from the settings
        # (models_file merged over the built-in models, then model_overrides).
        self.registry = registry or load_registry(
            self.settings.models_file, self.settings.model_overrides
        )
        self.simulated = simulated
        # Prices each result's cost and, with Settings.max_cost, each request's estimate.
        self.prices = prices or builtin_prices()
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
        # Every task carrying a request (run()'s workers, generate()'s requests): the engine
        # owns them, so a caller's cancellation never drops a request that was sent.
        self._inflight = InFlight()
        self._triage = Triage(
            settings=self.settings,
            registry=self.registry,
            out_dir=self.out_dir,
            run_id=self._run_id,
            summary=self.summary,
            recorded=lambda: self._open_ledger().state,
        )
        self._pool = WorkerPool(
            triage=self._triage,
            execute=self._execute,
            stopping=self._stop_event.is_set,
            fail=self._fail,
            inflight=self._inflight,
        )
        self._fatal: Exception | None = None
        self._started_at = 0.0
        self._client: Client | None = None
        self._limiter: Limiter | None = None
        self._ledger: Ledger | None = None
        self._sink: Sink | None = None
        self._dispatcher: Dispatcher | None = None
        self._sender: Sender | None = None
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
        return self._dispatcher.waiting if self._dispatcher is not None else 0

    @property
    def holding_sent_requests(self) -> int:
        """Requests that were sent (maybe paid for) and are not recorded yet."""
        return self._inflight.holding_sent

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
            _require_key(self.settings)
            max_n = self._max_images or max((spec.max_n for spec in self.registry), default=10)
            self._limiter = await self._stack.enter_async_context(
                Limiter.from_settings(self.settings, max_images_per_request=max_n)
            )
            # Work the pool has no free worker for: with one worker a slot, the slots are
            # what holds it back even while a worker stores images outside its slot.
            self._limiter.backlog = self._pool.backlog
            self._client = await self._stack.enter_async_context(
                Client.from_settings(self.settings, session=self._session)
            )
            fsync = self.settings.fsync
            self._ledger = await self._stack.enter_async_context(
                Ledger(self.out_dir, fsync=fsync, store=self.store)
            )
            self._sink = Sink(self.store, fsync=fsync == "always")
            # A large images folder takes a while to scan: keep the event loop free meanwhile.
            removed = await asyncio.to_thread(self._sink.remove_stale_temp_files)
            if removed:
                log.info("removed %d unfinished image file(s) left by an interrupted run", removed)
            budget = self.summary.budget = await open_budget(
                self.settings, self.out_dir / LEDGER_NAME, self.prices
            )
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
                busy=self._inflight.mark_busy,
                lend=self._pool.lend,
            )
            self._sender = Sender(
                dispatcher=self._dispatcher,
                triage=self._triage,
                ledger=self._recording_ledger,
                out_dir=self.out_dir,
                run_id=self._run_id,
                summary=self.summary,
                base_url=self.settings.base_url,
                prices=self.prices,
                budget=budget,
                refused=self._cap_reached,
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
        try:
            try:
                await self._land_sent_requests()
            except asyncio.CancelledError as exc:
                # Cancelled while waiting: what is still out is cut off (and counted) now;
                # the end line is still written, then the cancellation goes on.
                cancelled = exc
                await self._cut_off()
            if self._limiter is not None:
                self.summary.pace = self._limiter.pace(whole=True)
            if self._run_started and self._ledger is not None:
                self.summary.elapsed_s = asyncio.get_running_loop().time() - self._started_at
                with contextlib.suppress(Exception):
                    await self._ledger.append(
                        {
                            "event": "end",
                            "run_id": self._run_id,
                            "finished_at": now_iso(),
                            "stopped": _budget_stop(self.summary),
                            "summary": self.summary.to_dict(),
                        }
                    )
        finally:
            self._state = "closed"
            await self._stack.aclose()
        if cancelled is not None:
            raise cancelled

    def _cap_reached(self, reason: CapReason) -> None:
        """A request would cross a cap: take no new work; requests already budgeted (in
        flight, waiting for a slot or to retry) are still sent and recorded."""
        budget = self.summary.budget
        if self.summary.stopped is None and not self.summary.interrupted:
            self.summary.stopped = reason
            if budget is not None:
                log.info("%s; no new requests start", cap_text(budget))
        self._pool.drain()

    def _let_go(self) -> None:
        """run()'s consumer went away (a break, a cancellation, a dropped generator): take no
        new work; requests already sent finish under the engine and are recorded."""
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
        """Stop at once: cancel every request, counting the sent ones cut off (they may have
        been billed; nothing records them, so the next run sends them again)."""
        self.stop()
        cut = self._inflight.cut_off()
        self.summary.cut_off_requests += cut
        return cut

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
        self._pool.cancel_idle()

    def _fail(self, exc: Exception) -> None:
        """Remember the first error that ends the run, and stop."""
        if self._fatal is None:
            self._fatal = exc
            self.stop(str(exc))

    def _open_ledger(self) -> Ledger:
        """The open ledger; raises when the engine is not open."""
        if self._state != "open":
            raise RuntimeError("the engine is not open: use 'async with Engine(...)'")
        assert self._client and self._limiter and self._ledger and self._sink
        return self._ledger

    def _recording_ledger(self) -> Ledger:
        """The ledger for the sender: also while closing, when sent requests still land."""
        if self._state == "closing":
            assert self._ledger is not None
            return self._ledger
        return self._open_ledger()

    async def _start_run(self, manifest: Manifest | None) -> None:
        if self._run_started:
            return
        ledger = self._open_ledger()
        self._run_started = True
        settings = self.settings.public()
        settings["simulated"] = self.simulated
        self.summary.run_id = self._run_id
        await ledger.append(
            {
                "event": "run",
                "run_id": self._run_id,
                "started_at": now_iso(),
                # Absolute, so that status, export and gallery find it from any folder; and
                # as it was given (typed on the command line, or passed to load_manifest).
                "manifest": str(manifest.path.resolve()) if manifest is not None else None,
                "manifest_given": str(manifest.path) if manifest is not None else None,
                "manifest_sha256": manifest.sha256 if manifest is not None else None,
                "version": __version__,
                "settings": settings,
                # --model/--size/--n, so that status and gallery can read the manifest as run.
                "defaults": dataclasses.asdict(manifest.defaults) if manifest is not None else None,
            },
        )

    def _preflight(
        self, jobs: Iterable[Job], manifest: Manifest | None, last_run: dict[str, Any] | None
    ) -> None:
        """Count the jobs before sending; when the folder's last run recorded another manifest,
        warn with what this one adds (also when changed jobs then refuse the run)."""
        if (
            manifest is None
            or (other := other_manifest(last_run, manifest.path, manifest.sha256)) is None
        ):
            self._triage.preflight(jobs)
            return
        new = NewWork(CostEstimate(self.prices))
        try:
            self._triage.preflight(jobs, new)
        finally:
            counts = (new.jobs, new.requests, new.images)
            text = other_manifest_text(self.out_dir, other, manifest.path, counts, new.cost.total)
            log.warning("%s", text)

    async def _execute(self, work: Work) -> Result:
        """Hand one request to the sender (made when the engine opens)."""
        assert self._sender is not None
        return await self._sender.execute(work)

    # -- public entry points ---------------------------------------------------------------

    async def generate(self, job: Job) -> list[Result]:
        """Generate one job's images under the engine's shared limits; one Result per request."""
        await self._start_run(None)
        # The job's recorded files are looked at off the event loop, as run() does.
        triaged = [item async for verdicts in self._triage.looked([job]) for item in verdicts]
        calls: list[asyncio.Future[Result]] = []
        sending = []
        for verdict, request, state in triaged:
            self._triage.count(verdict, request, planned=True)
            if verdict in SENT:
                # The request runs in a task the engine owns; this call only waits for it.
                task = self._inflight.start(self._execute(Work(request, verdict, state)))
                sending.append(task)
                calls.append(asyncio.shield(task))
            elif verdict == "reuse" and state is not None:
                calls.append(_resolved(self._triage.reused(request, state)))
            else:
                calls.append(_resolved(self._triage.kept(request, state)))
        try:
            return list(await asyncio.gather(*calls))
        except asyncio.CancelledError:
            # The caller went away: a request not sent yet is cancelled; one that was sent
            # finishes under the engine and is recorded (leaving the engine waits for it).
            self._inflight.cancel_idle(sending)
            raise
        except Stopped:
            budget = self.summary.budget
            if budget is not None and budget.stopped is not None:
                raise BudgetExceededError(
                    f"{cap_text(budget)}; the job was not sent", reason=budget.stopped
                ) from None
            raise CometBatchError("the engine is stopping; the job was not sent") from None

    async def run(self, jobs: Iterable[Job] | AsyncIterable[Job]) -> AsyncIterator[Result]:
        """Send every job's pending requests; yield one Result per request as it lands.

        Keys the ledger already has as ok are skipped without a request (not yielded).
        """
        ledger = self._open_ledger()
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
            self._preflight(jobs, manifest, ledger.state.last_run)
        else:
            counted = False
        await self._start_run(manifest)
        width = self.settings.max_in_flight
        results: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=width * 4)
        runner = self._runner = asyncio.create_task(
            self._pool.run(jobs, results, width, counting=not counted)
        )
        try:
            while True:
                item = await results.get()
                if item is None:
                    break
                yield item
            await runner
        finally:
            # Left early: stop taking work, but never wait here (a cancelled caller's wait
            # ends now); leaving the engine waits for the requests already sent.
            self._let_go()
        if self._fatal is not None:
            raise self._fatal


def _require_key(settings: Settings) -> None:
    """Refuse to open without a key: every request would come back 401 (the simulated API
    too takes a key, any key, so `run --simulate` and tests pass one)."""
    if settings.resolved_key() is None:
        raise AuthenticationError(
            f"no API key: pass Settings(api_key=...) or set {KEY_ENV}; nothing was sent"
        )


def _budget_stop(summary: Summary) -> str | None:
    """The cap that stopped a run, if one did (the `end` event's `stopped`)."""
    return summary.stopped if summary.stopped in BUDGET_REASONS else None


def _resolved(result: Result) -> asyncio.Future[Result]:
    future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future
