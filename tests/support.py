"""Helpers shared by the test modules: no-wait sleeps, engine settings, ledger reading, servers,
and the rule for services a plain machine may lack."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from rich.console import Console

from cometbatch import Engine, Settings, Simulator
from cometbatch.cli.progress import Mode, ProgressDisplay
from cometbatch.net.pace import Pace

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROOT = Path(__file__).resolve().parent.parent


async def no_sleep(_: float) -> None:
    """Retry waits take no real time in tests."""


# A run at 590 of its 600 rpm, held back by its concurrency: every part of the pace shows.
PACE = Pace(
    requests_per_min=590.0,
    images_per_min=590.0,
    rpm=600.0,
    ipm=None,
    latency=3.1,
    images_per_request=1.0,
    mode="fixed",
    level=16,
    ceiling=16,
    cause="concurrency",
)


def show_progress(
    engine: object, console: Console, *, mode: Mode, naps: int = 3, **options: Any
) -> list[float]:
    """Run a ProgressDisplay over `engine` (a stand-in will do) until it parks in its `naps`-th
    sleep; the sleeps it asked for."""
    taken: list[float] = []

    async def scenario() -> None:
        parked = asyncio.Event()

        async def sleep(seconds: float) -> None:
            taken.append(seconds)
            if len(taken) == naps:
                parked.set()
                await asyncio.Event().wait()

        display = ProgressDisplay(
            cast(Engine, engine), mode=mode, console=console, sleep=sleep, **options
        )
        async with display:
            await parked.wait()

    asyncio.run(scenario())
    return taken


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


async def cli_bytes(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> tuple[int, bytes, bytes]:
    """The CLI in a subprocess, awaited so an in-process simulator keeps answering: its exit
    code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cometbatch",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def cli(*args: str) -> tuple[int, str, str]:
    """`cli_bytes` run from the repository, its output decoded."""
    code, stdout, stderr = await cli_bytes(*args)
    return code, stdout.decode(), stderr.decode()


def need(service: str, problem: str | None) -> None:
    """Skip a test whose SERVICE (e.g. BROWSER) is missing, with PROBLEM saying how to install it;
    a failure instead when COMETBATCH_REQUIRE_<SERVICE>=1, so CI cannot skip it unnoticed."""
    if problem is None:
        return
    switch = f"COMETBATCH_REQUIRE_{service}"
    if os.environ.get(switch) == "1":
        pytest.fail(f"{problem} (and {switch}=1 makes this a failure)")
    pytest.skip(f"{problem}; set {switch}=1 to make this a failure")


def chromium_problem(path: str) -> str | None:
    """Why the headless-Chromium tests cannot run with the browser at PATH, or None."""
    if not Path(path).is_file():
        return (
            f"no Chromium found at {path}: install it (apt-get install chromium) "
            "or set COMETBATCH_CHROMIUM"
        )
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: install it (pip install -e '.[test]')"
    return None
