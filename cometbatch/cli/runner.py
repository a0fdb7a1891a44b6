"""Run a manifest the way the CLI does: optional in-process simulator, progress, Ctrl-C handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr
from rich.console import Console

from ..costs.prices import PriceTable, builtin_prices
from ..engine.engine import Engine
from ..engine.summary import Summary
from ..manifest.reader import Manifest
from ..net.limits import Limiter
from ..settings import Settings
from ..store.interface import Store
from .progress import Mode, ProgressDisplay

if TYPE_CHECKING:
    # The simulator's web server is imported only by runs that use it (--simulate).
    from ..simulator.config import SimConfig
    from ..simulator.server import Simulator

log = logging.getLogger(__name__)

SIMULATED_KEY = "sk-simulated"


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """A run's summary, the prices its cost was counted at, and the error that stopped it."""

    summary: Summary
    error: Exception | None = None
    # The summary counts the run's spend (each result's cost); these say what prices it used.
    prices: PriceTable | None = None


# A closed terminal (SIGHUP, which Windows does not have) and a polite kill (SIGTERM) stop
# the way Ctrl-C does.
STOP_SIGNALS = tuple(
    sig
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
    if sig is not None
)


class _Interrupts:
    """First Ctrl-C, SIGTERM or SIGHUP: stop taking work; a second one: stop at once."""

    # The first lets sent requests land; the second (or the grace period running out)
    # stops at once, counting what was cut off.

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.engine: Engine | None = None
        self.signals = 0
        self.aborted = False
        self._timer: asyncio.TimerHandle | None = None
        self._installed: list[signal.Signals] = []

    def install(self, engine: Engine) -> None:
        """Handle the stop signals for `engine`'s run (until `uninstall`)."""
        self.engine = engine
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            try:
                loop.add_signal_handler(sig, self)
            except NotImplementedError:  # pragma: no cover - Windows: Ctrl-C interrupts
                return
            self._installed.append(sig)

    def uninstall(self) -> None:
        """Give the signals back (after the engine wrote its end line) and drop the timer."""
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        while self._installed:
            loop.remove_signal_handler(self._installed.pop())

    def __call__(self) -> None:
        engine = self.engine
        assert engine is not None
        self.signals += 1
        if self.signals > 1:
            self.abort()
            return
        # Stop first: the message below may go to a terminal that is already gone.
        in_flight = engine.holding_sent_requests
        engine.stop()
        grace = engine.settings.grace_period
        self._timer = asyncio.get_running_loop().call_later(grace, self.abort)
        self.say(
            f"stopping: letting {in_flight} request(s) in flight finish (up to {grace:.0f} s); "
            "press Ctrl-C again to quit now"
        )

    def abort(self) -> None:
        """Stop at once: the engine cancels every request and counts the sent ones."""
        # The run then ends as usual (its end line written), with no request left running.
        if self.aborted or self.engine is None:
            return
        self.aborted = True
        cut = self.engine.abort()
        self.say(
            f"quitting now; {cut} request(s) still in flight may have been billed and will "
            "be sent again next run"
        )


async def run_manifest(
    manifest: Manifest,
    *,
    settings: Settings,
    out_dir: str | Path,
    store: Store | None = None,
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
            from ..simulator.server import Simulator

            # The simulated API takes what the run's registry says the models take (its
            # models file and overrides), so a simulated run tries exactly those rules.
            sim = await stack.enter_async_context(Simulator(simulate, registry=manifest.registry))
            settings = settings.model_copy(
                update={"base_url": sim.base_url, "api_key": SecretStr(SIMULATED_KEY)}
            )
        interrupts: _Interrupts | None = None
        if handle_signals:
            interrupts = _Interrupts(say)
            # Registered before the engine: the handlers stay until its end line is written.
            stack.callback(interrupts.uninstall)
        # --ipm pacing is sized by the manifest's largest request (else the registry's).
        largest = manifest.stats.max_request_images
        limiter = None
        if largest:
            limiter = Limiter.from_settings(settings, max_images_per_request=largest)
        engine = await stack.enter_async_context(
            Engine(
                settings,
                out_dir=out_dir,
                store=store,
                registry=manifest.registry,
                prices=prices,
                limiter=limiter,
                simulator=sim,
            )
        )
        if interrupts is not None:
            interrupts.install(engine)
        error: Exception | None = None
        try:
            async with ProgressDisplay(engine, mode=progress, console=console):
                async for _ in engine.run(manifest):
                    pass
        except Exception as exc:
            # Reported together with the summary of what the run did before it stopped.
            error = exc
        return RunOutcome(engine.summary, error, prices)
