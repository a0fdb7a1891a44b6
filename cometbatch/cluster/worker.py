"""The Ray task body for one shard: an ordinary Engine run over the shard's manifest and output."""

# Imported by the driver and inside Ray's worker processes only; it needs no ray itself.
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..costs.budget import earlier_totals
from ..costs.prices import PriceTable, builtin_prices
from ..engine.engine import Engine
from ..errors import (
    AuthenticationError,
    CometBatchError,
    ConfigError,
    LedgerError,
    ManifestError,
    OutputError,
)
from ..ledger.clustered import local_copy
from ..ledger.events import ledger_path
from ..manifest.reader import Manifest, load_manifest
from ..models.registry import load_registry
from ..settings import KEY_ENV, Settings
from ..store.interface import Store
from ..store.lease import LEASE_S
from ..store.urls import open_store
from .plan import shard_manifest_name, shard_out
from .remote_limiter import SharedLimiter
from .reports import ShardReport, halt_asked, read_report, write_report

log = logging.getLogger(__name__)

# How often a worker rewrites its report and looks for the driver's halt.
REPORT_EVERY = 1.0
# A restarted shard on an object store waits out the lock lease of its dead attempt.
LOCK_WAIT_S = LEASE_S + 30.0
LOCK_RETRY_S = 5.0
# The kinds of error a worker returns, and the class the driver raises for each (usage
# errors exit 2, as in a one-machine run).
ERROR_KINDS: dict[str, type[CometBatchError]] = {
    "config": ConfigError,
    "ledger": LedgerError,
    "output": OutputError,
    "error": CometBatchError,
}


@dataclass(frozen=True, slots=True)
class ShardTask:
    """What one shard's task is given: plain data that Ray carries to any node."""

    out: str
    # Whether `out` is a local path (else a store's URL).
    local: bool
    shard: str
    run_id: str
    # Settings.public(): never the key, which each worker reads from its own environment.
    settings: dict[str, Any]
    storage_options: dict[str, Any] = field(default_factory=dict)
    prices: PriceTable | None = None
    # The shared limit's actor name (the cluster run's).
    limit_name: str = ""
    # What the shard's ledger recorded before this run: a retry counts what its dead attempts made.
    earlier: tuple[int, float] = (0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """The task as the plain dict the Ray task takes."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def output(self, shard: str | None = None) -> Path | str:
        """OUT (shard None) or a shard's output under it, as the engine names it."""
        out: Path | str = Path(self.out) if self.local else self.out
        return out if shard is None else shard_out(out, shard)


def run_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Run one shard to its end: {"shard", "attempt", "summary", "error"} as plain data."""
    return asyncio.run(_run(ShardTask(**task)))


def sees(path: str) -> bool:
    """Whether this node sees `path` (the driver's check that a local OUT is shared)."""
    return os.path.exists(path)


async def _limiter_for(
    name: str, settings: Settings, shard: str, *, largest: int, attempt: int
) -> SharedLimiter:
    """This attempt's part of the cluster's one limit, on the run's named limit actor."""
    # Each attempt has its own id: a dead one's queued calls, which Ray still runs, are refused.
    limiter = SharedLimiter.attach(
        name, settings, worker=f"{shard}.{attempt}", max_images_per_request=largest
    )
    for earlier in range(1, attempt):
        # The shard's earlier attempts died: their slots come back before this one sends.
        await limiter.actor.forget.remote(f"{shard}.{earlier}", dead=True)
    return limiter


def _node_id() -> str:
    """The Ray node this worker runs on ("" outside Ray): nodes on one host share its name."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # the report is for the display; a missing id costs nothing else
        return ""


def _error(exc: CometBatchError) -> dict[str, str]:
    """An error of ours as data (exceptions do not always survive Ray's pickling)."""
    kind = "error"
    if isinstance(exc, AuthenticationError) and exc.status is not None:
        # As a one-machine run says it; this node's key is the one refused.
        text = f"the API rejected the key ({exc.status}: {exc}); check {KEY_ENV} on every node"
        return {"kind": "config", "message": text}
    if isinstance(exc, ConfigError | ManifestError | AuthenticationError):
        kind = "config"
    elif isinstance(exc, LedgerError):
        kind = "ledger"
    elif isinstance(exc, OutputError):
        kind = "output"
    return {"kind": kind, "message": "\n".join(exc.lines())}


async def _run(task: ShardTask) -> dict[str, Any]:
    done: dict[str, Any] = {"shard": task.shard, "attempt": 0, "summary": None}
    engine: Engine | None = None
    try:
        # The key is not in the settings given: each node's worker reads it from its environment.
        settings = Settings(**task.settings)
        if settings.resolved_key() is None:
            raise ConfigError(
                f"worker node {socket.gethostname()}: its environment lacks {KEY_ENV} (the "
                f"driver's is not sent); set {KEY_ENV} on every node before `ray start`"
            )
        root = open_store(task.output(), task.storage_options)
        previous = await asyncio.to_thread(read_report, root, task.shard)
        attempt = previous.next_attempt(task.run_id) if previous is not None else 1
        done["attempt"] = attempt
        report = ShardReport(
            task.run_id, task.shard, attempt, os.getpid(), socket.gethostname(),
            updated_at=time.time(), node_id=_node_id(),
        )  # fmt: skip
        # Written first: the driver counts the restart, and sees the worker's pid, at once.
        await write_report(root, report)
        with _local_manifest(root, task.shard) as path:
            registry = load_registry(settings.models_file, settings.model_overrides)
            manifest = load_manifest(path, registry=registry)
            async with contextlib.AsyncExitStack() as stack:
                engine = await _opened(stack, task, settings, manifest, attempt)
                reporter = asyncio.create_task(_report(engine, root, report, task.run_id))
                try:
                    async for _ in engine.run(manifest):
                        pass
                finally:
                    reporter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reporter
        await write_report(root, _counted(report, engine, finished=True))
        return {**done, "summary": engine.summary.to_dict(), "error": None}
    except CometBatchError as exc:
        summary = engine.summary.to_dict() if engine is not None else None
        return {**done, "summary": summary, "error": _error(exc)}


async def _opened(
    stack: contextlib.AsyncExitStack, task: ShardTask, settings: Settings, manifest: Manifest,
    attempt: int,
) -> Engine:  # fmt: skip
    """The shard's engine, open; a restarted shard waits out the lock lease of its dead attempt."""
    out = task.output(task.shard)
    store: Store = open_store(out, task.storage_options)
    # --ipm pacing is sized by the shard's largest request, as a one-machine run does.
    largest = max(manifest.stats.max_request_images, 1)
    waited = 0.0
    while True:
        limiter = await _limiter_for(
            task.limit_name, settings, task.shard, largest=largest, attempt=attempt
        )
        budget = limiter.shared_budget(settings)
        if budget is not None and attempt > 1:
            # In this attempt's figures, which a restarted limit actor adopts from its heartbeats.
            made, spent = await _carried(store, task)
            budget.images, budget.cost = budget.images + made, budget.cost + spent
        engine = Engine(
            settings, out_dir=out, store=store, registry=manifest.registry, prices=task.prices,
            limiter=limiter, budget=budget,
        )  # fmt: skip
        try:
            return await stack.enter_async_context(engine)
        except LedgerError:
            # On a local folder the dead attempt's lock died with it; a store's lease runs out.
            if attempt == 1 or store.local_folder is not None or waited >= LOCK_WAIT_S:
                raise
            log.info("shard %s: waiting for the lock of its earlier attempt", task.shard)
            await asyncio.sleep(LOCK_RETRY_S)
            waited += LOCK_RETRY_S


async def _carried(store: Store, task: ShardTask) -> tuple[int, float]:
    """What the shard's earlier attempts in this run made and spent: its ledger, less the start."""
    try:
        ledger = await asyncio.to_thread(ledger_path, store)
    except LedgerError:
        return 0, 0.0
    prices = task.prices or builtin_prices()
    made, spent = await asyncio.to_thread(earlier_totals, ledger, prices)
    return max(made - task.earlier[0], 0), max(spent - task.earlier[1], 0.0)


def _counted(report: ShardReport, engine: Engine, *, finished: bool = False) -> ShardReport:
    """The report with the engine's counts now."""
    s = engine.summary
    try:
        in_flight = engine.limiter.sending
    except RuntimeError:
        in_flight = 0
    return replace(
        report,
        planned_images=s.planned_images,
        done_images=s.images_written + s.skipped_images,
        failed_images=s.failed_images,
        processed_images=s.images_written + s.failed_images,
        in_flight=in_flight,
        rate_limited=s.rate_limited,
        retries=s.retries,
        finished=finished,
        updated_at=time.time(),
    )


async def _report(engine: Engine, root: Store, report: ShardReport, run_id: str) -> None:
    """Every second: the shard's counts into its report, and a stop when the driver halts."""
    while True:
        await asyncio.sleep(REPORT_EVERY)
        try:
            await write_report(root, _counted(report, engine))
            if not engine.stopping and await asyncio.to_thread(halt_asked, root, run_id):
                engine.stop()
        except OSError as exc:  # a report is for the display only: the run goes on
            log.debug("shard %s: cannot write its report: %s", report.shard, exc)


@contextlib.contextmanager
def _local_manifest(root: Store, shard: str) -> Iterator[Path]:
    """The shard's manifest as a local file: in OUT itself on a local folder, else a copy."""
    name = shard_manifest_name(shard)
    with local_copy(root, name) as path:
        if path is None:
            raise OutputError(f"{root.root}/{name} is missing: the driver writes it")
        yield path
