"""A worker's SharedLimiter and SharedBudget against the limit actor's class in this process."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

from support import no_sleep, settings_for

from cometbatch import Engine, Job, Settings, SimConfig, Simulator
from cometbatch.cluster.actor import LimitActor
from cometbatch.cluster.remote_limiter import Halted, SharedLimiter
from cometbatch.cluster.sharedlimit import LimitConfig
from cometbatch.cluster.worker import ShardTask, _carried
from cometbatch.store.local import LocalStore


class Method:
    """`handle.method.remote(...)`, as Ray's, answered by the object in this process."""

    def __init__(self, method: Any) -> None:
        self._method = method

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        result = self._method(*args, **kwargs)
        if inspect.isawaitable(result):
            return asyncio.ensure_future(result)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(result)
        return done


class Handle:
    """An actor handle whose calls run on the actor's object in this process."""

    def __init__(self, actor: LimitActor) -> None:
        self.actor = actor

    def __getattr__(self, name: str) -> Method:
        return Method(getattr(self.actor, name))


def jobs(prefix: str, count: int) -> list[Job]:
    return [Job(id=f"{prefix}{i}", prompt=f"p {i}", model="dall-e-3") for i in range(count)]


async def run(engine: Engine, work: list[Job]) -> None:
    async for _ in engine.run(work):
        pass


async def test_a_429_one_worker_meets_pauses_the_shared_limit(tmp_path: Path) -> None:
    """A 429's Retry-After and the throttled outcome reach the actor with the slot's release."""
    async with Simulator(SimConfig(retry_after=0.05)) as sim:
        sim.enqueue("429")
        settings = settings_for(sim, concurrency=2)
        actor = LimitActor(LimitConfig.from_settings(settings), restarted=False)
        limiter = SharedLimiter(Handle(actor), settings, worker="a")
        async with Engine(settings, out_dir=tmp_path, limiter=limiter, sleep=no_sleep) as engine:
            await run(engine, jobs("a", 3))
    stats = actor.stats()
    assert stats["rate_limited"] == 1 and stats["pauses"] == 1 and stats["throttled"] == 1
    assert stats["in_flight"] == 0
    assert engine.summary.ok_requests == 3


async def test_a_halted_cluster_drains_the_workers_engine(tmp_path: Path) -> None:
    """After halt() a worker's engine sends nothing new and ends without an error."""
    async with Simulator(SimConfig()) as sim:
        settings = settings_for(sim, concurrency=2)
        actor = LimitActor(LimitConfig.from_settings(settings), restarted=False)
        limiter = SharedLimiter(Handle(actor), settings, worker="a")
        async with Engine(settings, out_dir=tmp_path, limiter=limiter) as engine:
            await run(engine, jobs("a", 2))
            actor.halt()
            await run(engine, jobs("b", 5))
        assert sim.stats.requests == 2
    assert limiter.halted and engine.summary.ok_requests == 2


async def test_a_cancelled_waiter_gives_its_late_slot_back() -> None:
    """A task cancelled while waiting for a global slot returns the slot granted after."""
    settings = settings_for_cap(1)
    actor = LimitActor(LimitConfig.from_settings(settings), restarted=False)
    holder = SharedLimiter(Handle(actor), settings, worker="a")
    waiter = SharedLimiter(Handle(actor), settings, worker="b")
    async with holder, waiter:
        async with holder.slot():
            waiting = asyncio.ensure_future(waiter.slot().__aenter__())
            await asyncio.sleep(0)
            assert not waiting.done()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        for _ in range(5):
            await asyncio.sleep(0)
        assert actor.stats()["in_flight"] == 0
        async with waiter.slot():
            assert actor.stats()["in_flight"] == 1


async def test_halted_slots_raise_the_engines_stop() -> None:
    """A slot asked for once the cluster halted raises Halted, a Stopped the engine drains on."""
    settings = settings_for_cap(2)
    actor = LimitActor(LimitConfig.from_settings(settings), restarted=False)
    actor.halt()
    async with SharedLimiter(Handle(actor), settings, worker="a") as limiter:
        try:
            async with limiter.slot():
                raise AssertionError("a halted cluster gave a slot")
        except Halted as exc:
            assert exc.reason == "interrupted"


def settings_for_cap(concurrency: int) -> Settings:
    """Settings for a limiter that never sends (its slots are all these tests take)."""
    return Settings(base_url="http://127.0.0.1:9/v1", api_key="sk-test", concurrency=concurrency)


async def test_a_forgotten_attempts_queued_acquires_take_no_slot() -> None:
    """A dead attempt's acquires, waiting or run late, end without a slot once it is forgotten."""
    actor = LimitActor(LimitConfig(concurrency=1), restarted=False)
    assert await actor.acquire("s1.1")
    waiting = asyncio.ensure_future(actor.acquire("s1.1"))
    await asyncio.sleep(0)
    assert actor.forget("s1.1") == 1
    assert await asyncio.wait_for(waiting, 1.0) is False
    assert await asyncio.wait_for(actor.acquire("s1.1"), 1.0) is False
    assert actor.stats()["in_flight"] == 0
    assert await asyncio.wait_for(actor.acquire("s1.2"), 1.0)


async def test_a_retried_shard_counts_what_its_dead_attempts_made(tmp_path: Path) -> None:
    """A retry's budget starts with what its shard's ledger gained in this run, before it."""
    async with Simulator(SimConfig()) as sim:
        engine = Engine(settings_for(sim, concurrency=2), out_dir=tmp_path)
        async with engine:
            await run(engine, jobs("a", 3))
    task = ShardTask(out=str(tmp_path), local=True, shard="s", run_id="r", settings={})
    assert (await _carried(LocalStore(tmp_path), task))[0] == 3
    before = ShardTask(**{**task.to_dict(), "earlier": (1, 0.0)})
    assert (await _carried(LocalStore(tmp_path), before))[0] == 2
