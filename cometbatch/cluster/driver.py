"""One manifest on a Ray cluster: the shard plan, one task per unfinished shard, one summary."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..costs.budget import earlier_totals
from ..costs.prices import PriceTable, builtin_prices
from ..errors import CometBatchError, ConfigError, LedgerError
from ..ledger.events import LEDGER_NAME, ledger_path
from ..manifest.reader import Manifest, load_manifest
from ..models.registry import load_registry
from ..settings import KEY_ENV, Settings
from ..store.interface import Store
from ..store.urls import is_url, open_store, rooted_at
from .actor import start_limit_actor
from .connect import check_nodes, connect, import_ray
from .plan import Shards, append_run, now_text, plan_shards, read_plan, shard_out
from .reports import ShardReport, ask_halt, read_report
from .summaries import exit_code, summed
from .worker import ERROR_KINDS, ShardTask, run_shard

__all__ = ["ClusterOutcome", "ClusterProgress", "failure_line", "run_on_ray"]

# A dead process is retried (its shard resumes from the ledger); an error of ours is not.
MAX_RETRIES = 3
# How often the driver looks at the running shards' reports.
POLL_S = 1.0
# A worker whose report has not changed for this long is not counted alive.
ALIVE_S = 10.0


@dataclass(frozen=True, slots=True)
class ClusterProgress:
    """The whole cluster at one moment, for the driver's one display."""

    images_done: int
    images_failed: int
    images_planned: int
    # Written or failed by this run (not found done): what a rate counts.
    images_processed: int
    in_flight: int
    limit: int
    rate_limited: int
    retries: int
    workers: int
    workers_alive: int
    shards: int
    shards_done: int
    worker_restarts: int


@dataclass(frozen=True, slots=True)
class ClusterOutcome:
    """A cluster run's summary (the shards' added up), its cluster figures and its exit code."""

    summary: dict[str, Any]
    # {"workers", "shards", "shards_done", "worker_restarts"}
    cluster: dict[str, int]
    exit_code: int
    # The first error a shard ended in (the run stopped starting shards then).
    error: CometBatchError | None = None


def cluster_store(out: str | os.PathLike[str], options: Mapping[str, Any] | None) -> Store:
    """OUT's store for a cluster run: memory:// is refused (each process has its own), and
    so is a one-machine run's OUT."""
    if is_url(out) and str(out).lower().startswith("memory://"):
        raise ConfigError(
            "--ray cannot write to memory://: each Ray worker process has its own memory; "
            "give a folder or an object store's URL"
        )
    store = open_store(out, options)
    # A one-machine run's OUT: the shards would not see its ledger and would pay again.
    if store.has_log(LEDGER_NAME):
        raise ConfigError(
            f"{store.root} holds a one-machine run's ledger: run it again without --ray, or "
            "give --ray another --out"
        )
    return store


@dataclass(slots=True)
class _Run:
    """One cluster run's state while its shards go through the cluster."""

    ray: ModuleType
    root: Store
    out: Path | str
    run_id: str
    shards: Shards
    workers: int
    limit: int
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The shared limit's actor (None until the first shard starts).
    actor: Any = None
    # Images and dollars every shard's ledger records from earlier runs (for the caps).
    earlier: tuple[int, float] = (0, 0.0)
    # The same, shard by shard (a retried shard counts what its dead attempts made).
    shard_earlier: dict[str, tuple[int, float]] = field(default_factory=dict)

    async def halt(self) -> None:
        """Every worker stops taking new work (sent requests land and are recorded)."""
        if self.actor is not None:
            self.actor.halt.remote()
        await ask_halt(self.root, self.run_id)

    def report(self, shard: str) -> ShardReport | None:
        found = read_report(self.root, shard)
        return found if found is not None and found.run_id == self.run_id else None

    def progress(self, running: set[str]) -> ClusterProgress:
        """The display's figures: done shards, finished tasks, and running shards' reports."""
        cuts = self.shards.cuts
        done = sum(cuts[s].images for s in self.shards.done)
        failed = processed = in_flight = rate_limited = retries = 0
        # A running task is alive until its report goes stale (a new one has none yet).
        alive = len(running)
        for data in self.results.values():
            summary = data.get("summary") or {}
            done += summary.get("images_written", 0) + summary.get("skipped_images", 0)
            failed += summary.get("failed_images", 0)
            processed += summary.get("images_written", 0) + summary.get("failed_images", 0)
            rate_limited += summary.get("rate_limited", 0)
            retries += summary.get("retries", 0)
        now = time.time()
        restarts = self.restarts()
        for shard in running:
            report = self.report(shard)
            if report is None:
                continue
            restarts += report.attempt - 1
            alive -= now - report.updated_at >= ALIVE_S
            done += report.done_images
            failed += report.failed_images
            processed += report.processed_images
            in_flight += report.in_flight
            rate_limited += report.rate_limited
            retries += report.retries
        return ClusterProgress(
            images_done=done, images_failed=failed,
            images_planned=sum(cut.images for cut in cuts.values()), images_processed=processed,
            in_flight=in_flight, limit=self.limit, rate_limited=rate_limited, retries=retries,
            workers=self.workers, workers_alive=alive, shards=len(cuts),
            shards_done=self.shards_done(), worker_restarts=restarts,
        )  # fmt: skip

    def shards_done(self) -> int:
        """Shards done before this run, and those this run completed."""
        finished = sum(
            1
            for data in self.results.values()
            if data.get("error") is None and (data.get("summary") or {}).get("complete")
        )
        return len(self.shards.done) + finished

    def ended(self) -> tuple[int, float]:
        """What this run's ended shard tasks made and spent, as their budgets counted it."""
        images, cost = 0, 0.0
        for data in self.results.values():
            summary = data.get("summary") or {}
            budget = summary.get("budget") or {}
            images += int(budget.get("images", summary.get("images_written", 0)))
            cost += float(budget.get("cost_usd", summary.get("spent_usd", 0.0)))
        return images, cost

    def restarts(self) -> int:
        """Attempts after the first, of the shards whose tasks have ended."""
        return sum(max(int(data.get("attempt") or 1) - 1, 0) for data in self.results.values())


async def run_on_ray(
    manifest: Manifest | str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: Settings,
    *,
    address: str | None = None,
    workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: Callable[[ClusterProgress], None] | None = None,
    prices: PriceTable | None = None,
    stop: asyncio.Event | None = None,
) -> ClusterOutcome:
    """Run a manifest's pending work on Ray, a task per unfinished shard; one outcome."""
    # `stop` set: the driver's Ctrl-C (workers take no new work, sent requests land within the
    # grace period, then the rest is cancelled). Cancelling the coroutine stops at once.
    ray = import_ray()
    root = cluster_store(out, storage_options)
    named = rooted_at(root, out)
    if not isinstance(manifest, Manifest):
        registry = load_registry(settings.models_file, settings.model_overrides)
        manifest = load_manifest(manifest, registry=registry)
    if settings.resolved_key() is None:
        raise ConfigError(f"no API key: set {KEY_ENV} (every Ray node needs it)")
    started = False
    try:
        width = workers
        if await asyncio.to_thread(read_plan, root) is None:
            # Joined before the plan and the shards' manifests are written (a bad address
            # leaves OUT as it was); a first run cuts four shards per worker: the cluster's
            # CPUs, when not given.
            started = connect(ray, address, workers, settings)
            width = width or _cpus(ray)
        shards = await plan_shards(manifest, root, named, width or 1, storage_options)
        if shards.to_run():
            # Joined or started on the loop's thread: Ray sets its signal handlers there.
            started = connect(ray, address, workers, settings) or started
            width = width or _cpus(ray)
            await check_nodes(ray, root)
        run = _Run(ray, root, named, uuid.uuid4().hex[:12], shards, width or 1,
                   settings.max_in_flight)  # fmt: skip
        if settings.max_images is not None or settings.max_cost is not None:
            run.shard_earlier = await asyncio.to_thread(
                _earlier, named, shards, storage_options, prices or builtin_prices()
            )
            found = run.shard_earlier.values()
            run.earlier = (sum(i for i, _ in found), sum(c for _, c in found))
        return await _run(run, manifest, settings, storage_options, on_progress, prices, stop)
    finally:
        if started:
            ray.shutdown()


def _cpus(ray: ModuleType) -> int:
    """The cluster's CPUs: the default number of workers."""
    return max(int(ray.cluster_resources().get("CPU", 1)), 1)


async def _run(
    run: _Run, manifest: Manifest, settings: Settings, storage_options: Mapping[str, Any] | None,
    on_progress: Callable[[ClusterProgress], None] | None, prices: PriceTable | None,
    stop: asyncio.Event | None,
) -> ClusterOutcome:  # fmt: skip
    started_at = now_text()
    began = asyncio.get_running_loop().time()
    task = ShardTask(
        out=str(run.out), local=isinstance(run.out, Path), shard="", run_id=run.run_id,
        settings=settings.public(), storage_options=dict(storage_options or {}), prices=prices,
        limit_name=f"cometbatch-limit-{run.run_id}",
    )  # fmt: skip
    errors: list[CometBatchError] = []
    try:
        if run.shards.to_run():
            run.actor = _start_limit(settings, task.limit_name, manifest, run)
            await _schedule(run, task, settings.grace_period, errors, on_progress, stop)
    finally:
        await append_run(run.root, {
            "run_id": run.run_id, "manifest": str(manifest.path),
            "manifest_sha256": manifest.sha256, "started_at": started_at,
            "finished_at": now_text(), "shards": run.shards.plan.shards,
            "workers": run.workers, "worker_restarts": run.restarts(),
        })  # fmt: skip
    total = summed((data.get("summary") or {} for data in run.results.values()), run_id=run.run_id)
    cuts = [run.shards.cuts[shard] for shard in run.shards.done]
    total.planned_requests += sum(cut.requests for cut in cuts)
    total.skipped_requests += sum(cut.requests for cut in cuts)
    total.planned_images += sum(cut.images for cut in cuts)
    total.skipped_images += sum(cut.images for cut in cuts)
    # Shards never started (a stop, an error) or cut off whole: their work is pending.
    summed_shards = {s for s, data in run.results.items() if data.get("summary")}
    left = [run.shards.cuts[s] for s in run.shards.to_run() if s not in summed_shards]
    total.planned_requests += sum(cut.requests for cut in left)
    total.planned_images += sum(cut.images for cut in left)
    total.elapsed_s = asyncio.get_running_loop().time() - began
    if stop is not None and stop.is_set():
        total.interrupted = True
    cluster = {"workers": run.workers, "shards": run.shards.plan.shards,
               "shards_done": run.shards_done(), "worker_restarts": run.restarts()}  # fmt: skip
    error = errors[0] if errors else None
    return ClusterOutcome(total.to_dict(), cluster, exit_code(total, failed=bool(errors)), error)


def _earlier(
    out: Path | str, shards: Shards, options: Mapping[str, Any] | None, prices: PriceTable
) -> dict[str, tuple[int, float]]:
    """What each shard's ledger records as generated and spent: --max-images and --max-cost
    count the whole output's earlier runs, as on one machine."""
    found: dict[str, tuple[int, float]] = {}
    for shard in shards.cuts:
        try:
            ledger = ledger_path(open_store(shard_out(out, shard), options))
        except LedgerError:
            continue  # never run
        found[shard] = earlier_totals(ledger, prices)
    return found


def _start_limit(settings: Settings, name: str, manifest: Manifest, run: _Run) -> Any:
    """The named actor holding the cluster's one limit: rate, in-flight cap, back-off, caps."""
    images, cost = run.earlier
    return start_limit_actor(
        settings, name=name, max_images_per_request=max(manifest.stats.max_request_images, 1),
        earlier_images=images, earlier_cost=cost,
    )  # fmt: skip


async def _schedule(
    run: _Run, task: ShardTask, grace: float, errors: list[CometBatchError],
    on_progress: Callable[[ClusterProgress], None] | None, stop: asyncio.Event | None,
) -> None:  # fmt: skip
    """A task per unfinished shard, at most `run.workers` at once, until all have ended."""
    ray = run.ray
    remote = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(run_shard)
    queue = run.shards.to_run()
    running: dict[asyncio.Future[Any], tuple[str, Any]] = {}
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    cancelled: set[str] = set()
    try:
        while queue or running:
            halted = deadline is not None
            while queue and len(running) < run.workers and not halted and not errors:
                shard = queue.pop(0)
                earlier = run.shard_earlier.get(shard, (0, 0.0))
                ref = remote.remote({**task.to_dict(), "shard": shard, "earlier": earlier})
                running[asyncio.wrap_future(ref.future())] = (shard, ref)
            if not running:
                break
            ended, _ = await asyncio.wait(running, timeout=POLL_S, return_when="FIRST_COMPLETED")
            for future in ended:
                shard, _ref = running.pop(future)
                _collect(run, shard, future, errors)
            if run.actor is not None:
                # A restarted actor knows only the running workers: it waits for this count.
                run.actor.ended.remote(*run.ended())
            if deadline is None and stop is not None and stop.is_set():
                await run.halt()
                deadline = loop.time() + grace
            elif deadline is not None and loop.time() > deadline:
                # The grace period is over: what still runs is cut off (maybe billed).
                for shard, ref in running.values():
                    if shard not in cancelled:
                        ray.cancel(ref, force=True)
                        cancelled.add(shard)
            if on_progress is not None:
                shards = {shard for shard, _ in running.values()}
                on_progress(await asyncio.to_thread(run.progress, shards))
    except asyncio.CancelledError:
        # Stopped at once: what is running is cancelled (its sent requests may be billed).
        with contextlib.suppress(Exception):
            await run.halt()
        for _, ref in running.values():
            ray.cancel(ref, force=True)
        raise


def _collect(
    run: _Run, shard: str, future: asyncio.Future[Any], errors: list[CometBatchError]
) -> None:
    """A shard's task ended: its summary, or the error it ended in."""
    ray = run.ray
    try:
        data: dict[str, Any] = future.result()
    except ray.exceptions.RayError as exc:
        # Its attempts, as far as its report tells (the task returned nothing).
        report = run.report(shard)
        ended = {"summary": None, "attempt": report.attempt if report is not None else 1}
        if isinstance(exc, ray.exceptions.TaskCancelledError):
            run.results[shard] = {**ended, "error": None, "cancelled": True}
            return
        # The worker died more often than retried, or a bug of ours in the task.
        message = failure_line(exc)
        errors.append(CometBatchError(f"shard {shard}: {message}"))
        run.results[shard] = {**ended, "error": {"kind": "error", "message": message}}
        return
    run.results[shard] = data
    error = data.get("error")
    if error is not None:
        kind = ERROR_KINDS.get(str(error.get("kind")), CometBatchError)
        errors.append(kind(f"shard {shard}: {error.get('message', '')}"))


# Ray colours its task names (ray::run_shard() in cyan) also when nothing reads a terminal.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def failure_line(exc: BaseException) -> str:
    """A failed task in one clean line: what the worker raised (a RayTaskError's cause, not
    Ray's `ray::run_shard() (pid=..., ip=...)` heading), with no colour codes."""
    cause = getattr(exc, "cause", None)
    shown = cause if isinstance(cause, BaseException) else exc
    lines = [_ANSI.sub("", line).strip() for line in str(shown).splitlines()]
    text = next((line for line in lines if line), "")
    name = type(shown).__name__
    if shown is exc:
        return text or name
    return f"{name}: {text}" if text else name
