"""429 storm: 5 % of answers are 429 with `Retry-After: 1`; at most 2x the calm run's time.

2,000 requests at concurrency 50 against a 50 ms API, once calm and once with 5 % of answers
a 429 asking to wait 1 s (the two runs alternate, each repetition on a fresh simulator). A
429 delays only its own request, so the storm costs about one second per throttled request
spread over 50 workers, plus the last retries' wait at the end. Target: storm wall time <= 2 x
calm wall time (medians), and no image lost: every planned image is on disk and every request
key is recorded ok. (A script that pauses everything for 15 s after any 429 takes ~200x
longer here.)
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import finish, in_turn, median, options, simulator_process, verdict

from cometbatch import Engine, Job, Settings, SimConfig

REQUESTS, SMOKE_REQUESTS = 2_000, 200
CONCURRENCY = 50
LATENCY = 0.05
RATE_429 = 0.05
RETRY_AFTER = 1.0
TARGET = 2.0


@dataclass
class Run:
    wall: float
    ok_keys: int
    files: int
    planned_images: int
    rate_limited: int
    simulator_429s: int
    decreases: int
    lowest_limit: int


def jobs(count: int) -> list[Job]:
    # gpt-image-1 answers inline (b64_json): the run measures generations, not downloads.
    return [
        Job(id=f"job-{i:05d}", prompt=f"storm image {i}", model="gpt-image-1", quality="low")
        for i in range(count)
    ]


async def one_run(base_url: str, requests: int, out: Path) -> tuple[float, Run]:
    settings = Settings(base_url=base_url, api_key="sk-bench", concurrency=CONCURRENCY)
    ok_keys: set[str] = set()
    lowest = CONCURRENCY
    todo = jobs(requests)
    # Timed from opening the engine to closing it (ledger closed and synced).
    start = time.perf_counter()
    async with Engine(settings, out_dir=out) as engine:
        async for result in engine.run(todo):
            if result.ok:
                ok_keys.add(result.key)
            lowest = min(lowest, engine.limiter.limit)
        summary, decreases = engine.summary, engine.limiter.decreases
    wall = time.perf_counter() - start
    # Lost images are checked on disk, not only in the summary.
    files = sum(1 for path in (out / "images").glob("*/*") if not path.name.startswith("."))
    run = Run(
        wall=wall,
        ok_keys=len(ok_keys),
        files=files,
        planned_images=summary.planned_images,
        rate_limited=summary.rate_limited,
        simulator_429s=0,
        decreases=decreases,
        lowest_limit=lowest,
    )
    return wall, run


def measure(requests: int, rate_429: float) -> Run:
    config = SimConfig(
        latency=LATENCY, rate_429=rate_429, retry_after=RETRY_AFTER, record_requests=False
    )
    with simulator_process(config) as sim, tempfile.TemporaryDirectory() as tmp:
        _, run = asyncio.run(one_run(sim.base_url, requests, Path(tmp)))
        run.simulator_429s = sim.stats.faults["429"]
    # Untimed: the next run does not pay for writing back this one's files.
    os.sync()
    return run


def main() -> None:
    opts = options(__doc__ or "")
    requests = SMOKE_REQUESTS if opts.smoke else REQUESTS
    print(
        f"429 storm: {requests} requests, concurrency {CONCURRENCY}, latency "
        f"{LATENCY * 1000:g} ms, {RATE_429:.0%} answered 429 with Retry-After: {RETRY_AFTER:g}"
    )
    calm_walls: list[float] = []
    storm_walls: list[float] = []
    lost = 0
    for i in range(opts.runs):
        runs = {rate: measure(requests, rate) for rate in in_turn(i + 1, [0.0, RATE_429])}
        calm, storm = runs[0.0], runs[RATE_429]
        calm_walls.append(calm.wall)
        storm_walls.append(storm.wall)
        for name, run in (("calm", calm), ("storm", storm)):
            missing = max(run.planned_images - run.files, requests - run.ok_keys)
            lost += missing
            print(
                f"  run {i + 1} {name:>5}: {run.wall:6.2f} s, {run.ok_keys}/{requests} keys ok, "
                f"{run.files}/{run.planned_images} images on disk, 429s {run.simulator_429s} "
                f"(seen {run.rate_limited}), concurrency back-offs {run.decreases} "
                f"(lowest limit {run.lowest_limit})"
            )
    calm_wall, storm_wall = median(calm_walls), median(storm_walls)
    print(f"median calm {calm_wall:.2f} s, median storm {storm_wall:.2f} s")
    met = verdict("storm / calm", storm_wall / calm_wall, TARGET, higher_is_better=False, unit="x")
    met = verdict("lost images", lost, 0, higher_is_better=False, unit="") and met
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main()
