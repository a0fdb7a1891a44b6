"""Helpers shared by the test modules: no-wait sleeps, engine settings, ledger reading, servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from cometbatch import Engine, Settings, Simulator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROOT = Path(__file__).resolve().parent.parent


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
