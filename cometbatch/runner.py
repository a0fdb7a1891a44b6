"""Run a manifest the way the CLI does: optional in-process simulator, progress, Ctrl-C handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console

from .engine import Engine
from .manifest import Manifest
from .prices import PriceTable, builtin_prices, spent
from .progress import Mode, ProgressDisplay
from .results import Result, Summary
from .settings import Settings
from .simulator import SimConfig, Simulator

log = logging.getLogger(__name__)

SIMULATED_KEY = "sk-simulated"


@dataclass(slots=True)
class Spend:
    """What a run's answers cost at list prices (usage tokens where the answers had them)."""

    prices: PriceTable = field(default_factory=builtin_prices)
    usd: float = 0.0
    unpriced_images: int = 0

    @classmethod
    def of(cls, summary: Summary, prices: PriceTable) -> Spend:
        """The spend a run's summary counted (each result's `cost`)."""
        return cls(prices, summary.spent_usd, summary.unpriced_images)

    def add(self, result: Result) -> None:
        """Count one result (nothing for a reused or failed one)."""
        cost = spent(result, self.prices)
        if cost is None:
            self.unpriced_images += len(result.images) + len(result.downloads)
        else:
            self.usd += cost

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {
            "estimated_usd": round(self.usd, 6),
            "unpriced_images": self.unpriced_images,
            "prices": self.prices.describe(),
        }


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """A run's summary, what it cost, and the error that stopped it early (if one did)."""

    summary: Summary
    error: Exception | None = None
    spend: Spend | None = None


class _Interrupts:
    """First Ctrl-C: stop taking work, let paid-for requests land; second (or grace over): quit."""

    def __init__(self, engine: Engine, task: asyncio.Task[object], say: Callable[[str], None]):
        self.engine = engine
        self.task = task
        self.say = say
        self.aborted = False
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        if not self.engine.stopping:
            in_flight = self.engine.limiter.in_flight
            grace = self.engine.settings.grace_period
            self.say(
                f"stopping: letting {in_flight} request(s) in flight finish (up to {grace:.0f} s); "
                "press Ctrl-C again to quit now"
            )
            self.engine.stop()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(grace, self.abort)
        else:
            self.abort()

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            cut = self.engine.summary.cut_off_requests = self.engine.holding_sent_requests
            self.say(
                f"quitting now; {cut} request(s) still in flight may have been billed and will "
                "be sent again next run"
            )
            self.task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def run_manifest(
    manifest: Manifest,
    *,
    settings: Settings,
    out_dir: str | Path,
    simulate: SimConfig | None = None,
    progress: Mode = "off",
    console: Console | None = None,
    say: Callable[[str], None] = print,
    handle_signals: bool = False,
    prices: PriceTable | None = None,
) -> RunOutcome:
    """Run every pending request of a validated manifest; the summary, and what stopped it."""
    sim: Simulator | None = None
    prices = prices or builtin_prices()
    async with contextlib.AsyncExitStack() as stack:
        if simulate is not None:
            sim = await stack.enter_async_context(Simulator(simulate))
            settings = settings.model_copy(
                update={"base_url": sim.base_url, "api_key": SecretStr(SIMULATED_KEY)}
            )
        engine = await stack.enter_async_context(
            Engine(
                settings,
                out_dir=out_dir,
                registry=manifest.registry,
                simulated=simulate is not None,
                max_images_per_request=manifest.stats.max_request_images or None,
                prices=prices,
            )
        )
        interrupts: _Interrupts | None = None
        if handle_signals:
            task = asyncio.current_task()
            assert task is not None
            interrupts = _Interrupts(engine, task, say)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, interrupts)
            stack.callback(interrupts.close)
            for sig in (signal.SIGINT, signal.SIGTERM):
                stack.callback(loop.remove_signal_handler, sig)
        error: Exception | None = None
        try:
            async with ProgressDisplay(engine, mode=progress, console=console):
                async for _ in engine.run(manifest):
                    pass
        except Exception as exc:
            # Reported together with the summary of what the run did before it stopped.
            error = exc
        except asyncio.CancelledError:
            if interrupts is None or not interrupts.aborted:
                raise
            # Our own hard stop: uncancel so the engine can still write its end event.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            engine.summary.interrupted = True
        if sim is not None:
            engine.summary.simulator_requests = sim.stats.requests
        return RunOutcome(engine.summary, error, Spend.of(engine.summary, prices))
