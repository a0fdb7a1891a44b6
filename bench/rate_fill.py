"""Rate fill: only `--rpm` given, the limit is used at any latency (concurrency follows the rate).

The simulator runs in its own process with a sliding-window limit of 1,200 requests a minute
(answering 429 to anything over it) and a latency of 2 s (1,000 requests) or 10 s (6,000
requests: 5 minutes of load), each answer up to a quarter longer at random. cometbatch runs
with `Settings(rpm=1200)` and nothing else, as `cometbatch run M --rpm 1200` does: no
`--concurrency`, so the requests in flight follow rate x measured latency. Every generation
request is timestamped as it leaves the client. Targets, per latency:

- the whole run at >= 0.9 of the limit: the requests sent, less the last one, over the time
  from calling `engine.run()` to sending the last request (start-up counts against it);
- zero 429s caused by the limit (the simulator's own count), no 60 s window over it;
- every request ok.

`--concurrency 16` runs the same with a fixed concurrency instead, for comparison (what the
default was before concurrency followed the rate); its figures are shown, not checked.
`--smoke` runs a few seconds at 0.2 s latency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import finish, simulator_process, verdict
from pacing import Sends, max_in_window, rate_between, tracing_session

from cometbatch import Engine, Job, Settings, SimConfig
from cometbatch.net.limits import Limiter

LIMIT = 1200  # requests per minute, at the simulator and in cometbatch
TARGET = 0.9
# (latency in seconds, requests): 1,000 at 2 s; 5 minutes of load at 10 s.
SCENARIOS = {"2s": (2.0, 1000), "10s": (10.0, 6000)}
SMOKE = (0.2, 60)
JITTER = 0.25  # each answer takes up to this share of the latency longer


@dataclass
class Run:
    latency: float
    requests: int
    ok: int
    sent: int
    limit_429s: int
    max_window: int
    whole_rate: float
    level: float
    peak_in_flight: int
    pace: str
    wall: float


async def one_run(base_url: str, latency: float, requests: int, concurrency: int | None,
                  out: Path) -> tuple[Run, Sends]:  # fmt: skip
    jobs = [
        Job(id=f"job-{i:06d}", prompt=f"fill {i}", model="gpt-image-1", quality="low")
        for i in range(requests)
    ]
    settings = Settings(base_url=base_url, api_key="sk-bench", rpm=LIMIT, concurrency=concurrency)
    sends = Sends()
    session = tracing_session(sends, 1, settings.max_in_flight)
    limiter = Limiter.from_settings(settings, max_images_per_request=1)
    engine = Engine(settings, out_dir=out, session=session, limiter=limiter)
    ok = peak_in_flight = 0
    levels: list[int] = []
    async with session, engine:
        limiter = engine.limiter

        async def watch() -> None:
            nonlocal peak_in_flight
            while True:
                await asyncio.sleep(1.0)
                peak_in_flight = max(peak_in_flight, limiter.sending)
                # Once its latency is measured (before, the pacer alone decides).
                if limiter.ok_total >= 64:
                    levels.append(limiter.level)

        watcher = asyncio.create_task(watch())
        started = asyncio.get_running_loop().time()
        clock = time.perf_counter()
        async for result in engine.run(jobs):
            ok += result.ok
        wall = time.perf_counter() - clock
        watcher.cancel()
    times = sends.times
    pace = engine.summary.pace.text() if engine.summary.pace is not None else ""
    run = Run(
        latency=latency,
        requests=requests,
        ok=ok,
        sent=len(times),
        limit_429s=0,
        max_window=max_in_window(times, sends.images),
        whole_rate=rate_between(times, sends.images, started, times[-1]),
        level=statistics.median(levels) if levels else float("nan"),
        peak_in_flight=peak_in_flight,
        pace=pace,
        wall=wall,
    )
    return run, sends


def measure(latency: float, requests: int, concurrency: int | None) -> Run:
    config = SimConfig(
        latency=latency,
        latency_jitter=latency * JITTER,
        record_requests=False,
        rpm_limit=LIMIT,
    )
    with simulator_process(config) as sim, tempfile.TemporaryDirectory() as tmp:
        run, _ = asyncio.run(one_run(sim.base_url, latency, requests, concurrency, Path(tmp)))
        run.limit_429s = sim.stats.limit_429s
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script")
    parser.add_argument("--latency", choices=[*SCENARIOS, "both"], default="both")
    parser.add_argument(
        "--concurrency", type=int, help="a fixed concurrency instead (shown, not checked)"
    )
    args = parser.parse_args()
    scenarios = (
        [SMOKE] if args.smoke
        else list(SCENARIOS.values()) if args.latency == "both"
        else [SCENARIOS[args.latency]]
    )  # fmt: skip
    met = True
    for latency, requests in scenarios:
        how = f"--concurrency {args.concurrency}" if args.concurrency else "only --rpm"
        print(
            f"rate fill: limit {LIMIT} requests/min at the simulator and --rpm {LIMIT} ({how}); "
            f"latency {latency:g} s (+ up to {JITTER:.0%}), {requests} requests"
        )
        run = measure(latency, requests, args.concurrency)
        print(
            f"  {run.ok}/{run.requests} ok in {run.wall:.1f} s; whole-run rate "
            f"{run.whole_rate:.1f}/min = {run.whole_rate / LIMIT:.3f} of the limit; 429s from "
            f"the limit {run.limit_429s}; most in a 60 s window {run.max_window}; level (median) "
            f"{run.level:g}, in flight at most {run.peak_in_flight}"
        )
        print(f"  summary: {run.pace}")
        if args.concurrency:
            continue
        name = f"{latency:g} s"
        checks = [
            (f"{name}: whole-run rate / limit", run.whole_rate / LIMIT, TARGET, True),
            (f"{name}: 429s from the limit", run.limit_429s, 0, False),
            (f"{name}: most requests in a 60 s window", run.max_window, LIMIT, False),
            (f"{name}: requests not ok", run.requests - run.ok, 0, False),
        ]
        for what, figure, target, higher in checks:
            met = verdict(what, figure, target, higher_is_better=higher, unit="") and met
    finish(met, smoke=args.smoke)


if __name__ == "__main__":
    main()
