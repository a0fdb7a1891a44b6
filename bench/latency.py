"""Latency-bound scaling: 5,000 requests of 2 s each at concurrency 500 take about 20 s.

When every request waits on the server, wall time should be requests x latency / concurrency;
the engine's own overhead (queueing, limiter, client, writing images, the ledger) has to fit in
the remaining 10 %. Target: wall time <= 1.1 x ideal. `--auto` also runs the same load with
adaptive concurrency (starting low, bounded by the same 500) and reports the level it reached.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import finish, median, peak_rss_mb, simulator_process, verdict

from cometbatch import Engine, Job, Settings, SimConfig

LATENCY = 2.0
CONCURRENCY = 500
REQUESTS = 5_000
SMOKE_LATENCY, SMOKE_CONCURRENCY, SMOKE_REQUESTS = 0.5, 50, 200
TARGET = 1.1


@dataclass
class Run:
    wall: float
    written: int
    peak_limit: int
    final_limit: int


def raise_open_file_limit(concurrency: int) -> None:
    """What the CLI does for --concurrency: room for a client and a server socket per request,
    plus downloads and files (both ends live in this process here)."""
    wanted = concurrency * 4 + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def jobs(count: int) -> list[Job]:
    # gpt-image-1 answers inline (b64_json): the run measures generations, not downloads.
    return [
        Job(id=f"job-{i:05d}", prompt=f"bench image {i}", model="gpt-image-1", quality="low")
        for i in range(count)
    ]


async def one_run(base_url: str, requests: int, concurrency: int, *, auto: bool, out: Path) -> Run:
    settings = Settings(
        base_url=base_url,
        api_key="sk-bench",
        concurrency=concurrency,
        auto_concurrency=auto,
    )
    todo = jobs(requests)
    peak = 0
    # Timed from opening the engine to closing it (ledger closed and synced).
    start = time.perf_counter()
    async with Engine(settings, out_dir=out) as engine:
        async for _ in engine.run(todo):
            peak = max(peak, engine.limiter.limit)
        final = engine.limiter.limit
    wall = time.perf_counter() - start
    return Run(wall, engine.summary.images_written, peak, final)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script")
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of")
    parser.add_argument(
        "--auto", action="store_true", help="also show what --concurrency auto reaches"
    )
    args = parser.parse_args()
    runs = 1 if args.smoke else max(1, args.runs)
    latency, concurrency, requests = (
        (SMOKE_LATENCY, SMOKE_CONCURRENCY, SMOKE_REQUESTS)
        if args.smoke
        else (LATENCY, CONCURRENCY, REQUESTS)
    )
    ideal = requests * latency / concurrency
    raise_open_file_limit(concurrency)
    print(
        f"latency-bound scaling: {requests} requests, latency {latency:g} s, "
        f"concurrency {concurrency}; ideal {ideal:.1f} s"
    )
    config = SimConfig(latency=latency, record_requests=False)
    walls: list[float] = []
    with simulator_process(config) as sim:
        for i in range(runs):
            with tempfile.TemporaryDirectory() as tmp:
                result = asyncio.run(
                    one_run(sim.base_url, requests, concurrency, auto=False, out=Path(tmp))
                )
            walls.append(result.wall)
            print(
                f"  run {i + 1}: {result.wall:.2f} s = {result.wall / ideal:.3f} x ideal, "
                f"{result.written} images"
            )
            if result.written != requests:
                print(f"  run {i + 1} wrote {result.written} of {requests} images")
                walls[-1] = float("inf")
        if args.auto:
            with tempfile.TemporaryDirectory() as tmp:
                auto = asyncio.run(
                    one_run(sim.base_url, requests, concurrency, auto=True, out=Path(tmp))
                )
            print(
                f"  auto (max {concurrency}): {auto.wall:.2f} s = {auto.wall / ideal:.3f} x "
                f"ideal, concurrency reached {auto.peak_limit} (at the end {auto.final_limit})"
            )
    wall = median(walls)
    print(f"median wall {wall:.2f} s over {runs} run(s); peak RSS {peak_rss_mb():.0f} MB")
    met = verdict("wall / ideal", wall / ideal, TARGET, higher_is_better=False, unit="x")
    finish(met, smoke=args.smoke)


if __name__ == "__main__":
    main()
