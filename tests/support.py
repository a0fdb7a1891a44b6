"""Helpers shared by the test modules: no-wait sleeps, engine settings, ledger reading, servers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from cometbatch import Engine, Settings, Simulator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def no_sleep(_: float) -> None:
    """Retry waits take no real time in tests."""


def settings_for(sim: Simulator, **overrides: Any) -> Settings:
    """Settings that send to the simulator with a test key."""
    return Settings(base_url=sim.base_url, api_key="sk-test", **overrides)


def ledger_results(out: Path) -> list[dict[str, Any]]:
    """Every result event of OUT's ledger, in order."""
    lines = (out / "ledger.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e and e["event"] == "result"]


async def run_all(engine: Engine, jobs: Any) -> list[Any]:
    """Everything `engine.run(jobs)` yields."""
    return [result async for result in engine.run(jobs)]


@contextlib.asynccontextmanager
async def serve(routes: dict[tuple[str, str], Handler]) -> AsyncIterator[str]:
    """Serve `routes` ({(method, path): handler}) on 127.0.0.1; yields the server's origin."""
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
