"""The shared limit on a real local Ray: three workers' engines under one actor's rpm and cap."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from cometbatch import Engine, Job, Settings, SimConfig, Simulator
from cometbatch.cluster.actor import limit_name, start_limit_actor
from cometbatch.cluster.connect import loopback_only
from cometbatch.cluster.remote_limiter import SharedLimiter

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    # Ray's own modules warn on import and shutdown; the code under test is ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """A local Ray instance on 127.0.0.1 whose workers import this checkout."""
    if os.environ.get("COMETBATCH_REQUIRE_RAY") == "1":
        import ray
    else:
        ray = pytest.importorskip("ray")
    # A short folder: Ray's unix sockets live under it and their paths have a length limit.
    temp = tempfile.mkdtemp(prefix="cbray")
    before = os.environ.get("PYTHONPATH")
    paths = (str(ROOT), str(ROOT / "tests"), before)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    try:
        with loopback_only(ray):
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                _temp_dir=temp,
                log_to_driver=False,
            )
        yield ray
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
        shutil.rmtree(temp, ignore_errors=True)


class SimThread:
    """The simulator serving on 127.0.0.1 from a thread of its own (Ray blocks the test's)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.sim: Simulator | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Simulator(self.config) as sim:
            self.sim = sim
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Simulator:
        self._thread.start()
        assert self._ready.wait(30)
        assert self.sim is not None
        return self.sim

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def run_shard(
    name: str, settings: Settings, out: str, jobs: list[Job], worker: str
) -> dict[str, Any]:
    """One worker: an Engine over its jobs under the shared limit; its summary."""

    async def main() -> dict[str, Any]:
        limiter = SharedLimiter.attach(name, settings, worker=worker)
        budget = limiter.shared_budget(settings)
        async with Engine(settings, out_dir=out, limiter=limiter, budget=budget) as engine:
            async for _ in engine.run(jobs):
                pass
        return {**engine.summary.to_dict(), "halted": limiter.halted}

    return asyncio.run(main())


def start_shards(
    ray: Any, name: str, settings: Settings, out: Path, shards: int, jobs: int
) -> list[Any]:
    task = ray.remote(num_cpus=0, max_retries=0)(run_shard)
    return [
        task.remote(
            name,
            settings,
            str(out / f"shard{s}"),
            [Job(id=f"s{s}j{i}", prompt=f"p {s} {i}", model="dall-e-3") for i in range(jobs)],
            f"shard{s}-1",
        )
        for s in range(shards)
    ]


def sent_times(out: Path) -> list[float]:
    """When each request left, from every shard's ledger `sent` lines, in order."""
    times = []
    for ledger in out.glob("shard*/ledger.jsonl"):
        for line in ledger.read_text().splitlines():
            event = json.loads(line) if line.strip() else None
            if event and event["event"] == "sent":
                stamp = event["sent_at"].replace("Z", "+00:00")
                times.append(datetime.fromisoformat(stamp).timestamp())
    return sorted(times)


def most_in(times: list[float], window: float) -> int:
    """The most sends any `window` seconds saw."""
    best = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


RPM = 240
# The actor's buckets hold half a second of the rate; a lease adds at most one more token.
BURST = 2 + 1


# A hang is a failure (with what each worker did), not a stuck suite.
WAIT = 180


def check_pacing(times: list[float], *, used: bool = True) -> None:
    rate = RPM / 60
    # No five seconds carry more than the cluster's rate (three unshared limiters: 3x).
    assert most_in(times, 5.0) <= rate * 5 + BURST
    if used:
        # ...and the rate is used: the sends span about what the rate needs, not much more.
        assert (len(times) - BURST) / (times[-1] - times[0]) >= 0.75 * rate


def test_three_workers_share_one_rpm(ray_local: Any, tmp_path: Path) -> None:
    """Three engines on Ray workers under one actor at 240 rpm: the server sees 240, no 429s."""
    name = limit_name("rpm")
    with SimThread(SimConfig(latency=0.05, rpm_limit=RPM)) as sim:
        settings = Settings(base_url=sim.base_url, api_key="sk-test", rpm=RPM, concurrency=4)
        actor = start_limit_actor(settings, name=name)
        summaries = ray_local.get(
            start_shards(ray_local, name, settings, tmp_path, 3, 16), timeout=WAIT
        )
        stats = ray_local.get(actor.stats.remote())
        assert sim.stats.limit_429s == 0
        assert sim.stats.requests == 48
    assert [s["ok_requests"] for s in summaries] == [16, 16, 16]
    check_pacing(sent_times(tmp_path))
    assert stats["rate_limited"] == 0 and stats["in_flight"] == 0
    ray_local.kill(actor)


def test_the_global_cap_holds_across_workers(ray_local: Any, tmp_path: Path) -> None:
    """--concurrency is the cluster's: three workers never have more than 2 in flight together."""
    name = limit_name("cap")
    with SimThread(SimConfig(latency=0.3)) as sim:
        settings = Settings(base_url=sim.base_url, api_key="sk-test", concurrency=2)
        actor = start_limit_actor(settings, name=name)
        summaries = ray_local.get(
            start_shards(ray_local, name, settings, tmp_path, 3, 4), timeout=WAIT
        )
        assert sim.stats.max_in_flight == 2
    assert sum(s["ok_requests"] for s in summaries) == 12
    ray_local.kill(actor)


def test_a_restarted_actor_keeps_the_pacing_bound(ray_local: Any, tmp_path: Path) -> None:
    """The actor killed mid-run restarts slow: the run ends whole and no window is over rpm."""
    name = limit_name("restart")
    with SimThread(SimConfig(latency=0.05, rpm_limit=RPM)) as sim:
        settings = Settings(base_url=sim.base_url, api_key="sk-test", rpm=RPM, concurrency=4)
        actor = start_limit_actor(settings, name=name)
        tasks = start_shards(ray_local, name, settings, tmp_path, 3, 16)
        deadline = time.monotonic() + 60
        while sim.stats.requests < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        ray_local.kill(actor, no_restart=False)
        summaries = ray_local.get(tasks, timeout=WAIT)
        stats = ray_local.get(actor.stats.remote())
        assert sim.stats.limit_429s == 0
    assert [s["ok_requests"] for s in summaries] == [16, 16, 16]
    assert stats["restarted"] is True
    # The restart itself takes a while (a new process): only the bound is checked here.
    check_pacing(sent_times(tmp_path), used=False)
    ray_local.kill(actor)


def test_halt_stops_every_worker_gracefully(ray_local: Any, tmp_path: Path) -> None:
    """halt(): each worker's engine stops taking work, what it sent is recorded."""
    name = limit_name("halt")
    with SimThread(SimConfig(latency=0.05)) as sim:
        settings = Settings(base_url=sim.base_url, api_key="sk-test", rpm=RPM, concurrency=4)
        actor = start_limit_actor(settings, name=name)
        tasks = start_shards(ray_local, name, settings, tmp_path, 3, 40)
        deadline = time.monotonic() + 60
        while sim.stats.requests < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        ray_local.get(actor.halt.remote())
        summaries = ray_local.get(tasks, timeout=WAIT)
        sent = sim.stats.requests
    assert all(s["halted"] for s in summaries)
    assert sum(s["ok_requests"] for s in summaries) == sent < 120
    ray_local.kill(actor)


def test_budget_caps_hold_across_workers(ray_local: Any, tmp_path: Path) -> None:
    """max_images is the cluster's: three workers together make exactly the cap, then stop."""
    name = limit_name("budget")
    with SimThread(SimConfig(latency=0.05)) as sim:
        settings = Settings(base_url=sim.base_url, api_key="sk-test", concurrency=4, max_images=20)
        actor = start_limit_actor(settings, name=name)
        summaries = ray_local.get(
            start_shards(ray_local, name, settings, tmp_path, 3, 16), timeout=WAIT
        )
        stats = ray_local.get(actor.stats.remote())
        assert sim.stats.images == 20
    assert sum(s["ok_requests"] for s in summaries) == 20
    assert {s["budget"]["stopped"] for s in summaries} == {"max_images"}
    # Each worker's summary says why it stopped, as a one-machine run at its cap does.
    assert {s["stopped"] for s in summaries} == {"max_images"}
    assert stats["budget"]["images"] == 20 and stats["budget"]["stopped"] == "max_images"
    ray_local.kill(actor)
