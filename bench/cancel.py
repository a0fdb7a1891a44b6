"""Cancelling in the library: 8 jobs sent, then the caller's wait cancelled (a cancelled
generate(), a break out of run()), then the same jobs again with a new engine over the same
folder. Counts the images the simulated API generated (what it would bill) against the images
asked for: a sent request finishes under the engine and is recorded, so the target is no image
paid twice.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable

from _common import finish, options, verdict

from cometbatch import Engine, Job, Settings, SimConfig, Simulator

JOBS = 8
# Long enough that every request is still at the server when the caller gives up.
LATENCY = 0.3


async def until_sent(sim: Simulator, count: int) -> None:
    """Wait until the simulated API has received `count` requests."""
    while sim.stats.requests < count:  # noqa: ASYNC110 - a counter, with no event to wait on
        await asyncio.sleep(0.002)


async def cancel_generate(engine: Engine, sim: Simulator, jobs: list[Job]) -> None:
    """Start generate() for every job, then cancel every call once all were sent."""
    calls = [asyncio.create_task(engine.generate(job)) for job in jobs]
    await until_sent(sim, len(jobs))
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


async def break_run(engine: Engine, sim: Simulator, jobs: list[Job]) -> None:
    """Iterate run() over every job and leave the loop once all were sent."""
    async for _ in engine.run(jobs):
        break  # the first result: the other requests are still out


Scenario = Callable[[Engine, Simulator, list[Job]], Awaitable[None]]


async def paid_twice(scenario: Scenario, jobs: int) -> tuple[int, int]:
    """(images asked for, images generated) over the cancelled call and the rerun (one image
    per request: the requests the simulated API answered)."""
    batch = [Job(id=f"c{i}", prompt=f"a kite, study {i}", model="qwen-image") for i in range(jobs)]
    async with Simulator(SimConfig(latency=LATENCY)) as sim:
        settings = Settings(base_url=sim.base_url, api_key="sk-bench", concurrency=jobs)
        with tempfile.TemporaryDirectory() as out:
            async with Engine(settings, out_dir=out) as engine:
                await scenario(engine, sim, batch)
            async with Engine(settings, out_dir=out) as engine:
                async for _ in engine.run(batch):
                    pass
                assert engine.summary.complete, engine.summary.to_dict()
        return len(batch), sim.stats.requests


def main() -> None:
    opts = options(__doc__ or "", runs=1)
    jobs = 2 if opts.smoke else JOBS
    worst = 0
    for _ in range(opts.runs):
        for name, scenario in (("cancel generate()", cancel_generate), ("break run()", break_run)):
            asked, billed = asyncio.run(paid_twice(scenario, jobs))
            worst = max(worst, billed - asked)
            print(f"{name}: {asked} images asked for, {billed} generated over both runs")
    met = verdict("images paid twice", worst, 0, higher_is_better=False, unit=" images")
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main()
