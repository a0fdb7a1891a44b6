"""Overhead vs. the raw loop: cometbatch's full pipeline against a minimal hand-written loop.

20,000 requests to the simulator with zero latency and small images, concurrency 64. Both
sides send, decode, hash, write each image atomically and append a ledger line; the raw loop
(bench/_rawloop.py) does nothing more, cometbatch adds its retries, limiter, validation and
resume bookkeeping. Runs alternate (raw, cometbatch, raw, ...) in one process so that load
from elsewhere on the machine hits both alike; the target is on the ratio of the medians.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from _common import finish, in_turn, median, options, settle, simulator_process, verdict
from _rawloop import raw_loop

from cometbatch import Engine, Job, Settings, SimConfig

REQUESTS = 20_000
SMOKE_REQUESTS = 200
CONCURRENCY = 64
# The simulator caches 1,024 small pictures: 2,000 requests make most of them before timing.
WARM_UP = 2_000
TARGET_RATIO = 0.8
MODEL = "gpt-image-1"
KEY = "sk-bench"


def make_jobs(count: int) -> list[Job]:
    """One single-image b64 request per job (gpt-image-1 always answers base64)."""
    return [Job(id=f"j{i:05d}", prompt=f"picture {i}", model=MODEL) for i in range(count)]


async def run_cometbatch(base_url: str, jobs: list[Job], out: Path, concurrency: int) -> float:
    """The whole library path, engine open to close; returns the seconds taken."""
    settings = Settings(base_url=base_url, api_key=KEY, concurrency=concurrency)
    started = time.perf_counter()
    ok = 0
    async with Engine(settings, out_dir=out) as engine:
        async for result in engine.run(jobs):
            ok += result.ok
    took = time.perf_counter() - started
    if ok != len(jobs):
        raise SystemExit(f"cometbatch: only {ok} of {len(jobs)} requests succeeded")
    return took


async def run_raw(base_url: str, jobs: list[Job], out: Path, concurrency: int) -> float:
    """The hand-written loop over the same requests."""
    work = [(job.id, {"model": job.model, "prompt": job.prompt}) for job in jobs]
    return await raw_loop(base_url, KEY, work, out, concurrency)


def warm_up(base_url: str, jobs: list[Job], out: Path, concurrency: int) -> None:
    """Untimed: let the simulator make and cache the pictures these jobs are answered with."""
    asyncio.run(run_raw(base_url, jobs, out, concurrency))
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    opts = options(__doc__.splitlines()[0] if __doc__ else "overhead")
    count = SMOKE_REQUESTS if opts.smoke else REQUESTS
    jobs = make_jobs(count)
    raw_rates: list[float] = []
    cb_rates: list[float] = []
    config = SimConfig(seed=1, record_requests=False)
    print(f"{count} requests, concurrency {CONCURRENCY}, {MODEL} b64, simulator latency 0")
    with simulator_process(config) as sim, tempfile.TemporaryDirectory() as tmp:
        warm_up(sim.base_url, jobs[:WARM_UP], Path(tmp) / "warm-up", CONCURRENCY)
        for run in range(1, opts.runs + 1):
            contenders = [
                ("raw loop", run_raw, raw_rates),
                ("cometbatch", run_cometbatch, cb_rates),
            ]
            for name, runner, rates in in_turn(run, contenders):
                out = Path(tmp) / f"{name.replace(' ', '-')}-{run}"
                seconds = asyncio.run(runner(sim.base_url, jobs, out, CONCURRENCY))
                rates.append(count / seconds)
                print(f"run {run} {name:>10}: {count / seconds:8.0f} requests/s ({seconds:.2f} s)")
                settle(out)
    raw, cb = median(raw_rates), median(cb_rates)
    pairs = " ".join(f"{c / r:.2f}" for r, c in zip(raw_rates, cb_rates, strict=True))
    print(f"ratio of each run: {pairs}")
    print(f"median raw loop:   {raw:8.0f} requests/s")
    print(f"median cometbatch: {cb:8.0f} requests/s")
    met = verdict("cometbatch / raw loop", cb / raw, TARGET_RATIO, higher_is_better=True, unit="x")
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main()
