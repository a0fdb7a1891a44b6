"""Pacing accuracy: --rpm / --ipm set to the server's own per-minute limit, for 2 minutes.

The simulator enforces a sliding 60 s window (rpm_limit, then ipm_limit with 4-image
gpt-image-1 requests) and answers 429 to anything over it; cometbatch runs with `rpm` (`ipm`)
set to exactly that limit and enough jobs for `--seconds` of load (default 120: a default run
takes about 2 minutes per mode and repetition, so `--runs 3` takes ~12 minutes; `--smoke`
runs 2 s). Every generation request is timestamped as it leaves the client (an aiohttp
trace on the engine's session). Targets, per mode:

- zero 429s caused by the limit (the simulator's own count of requests that found their
  sliding window full);
- no 60 s window holding more than the limit, the first one included (client timestamps,
  every window that starts at a request);
- achieved rate >= 0.97 x the limit, both over the whole run and over its steady part. The
  whole run: the requests (images) sent, less the last one, over the time from calling
  `engine.run()` to sending the last request, so start-up counts against it. (The pacer lets
  half a second of requests go at once at the start, so a run of a few seconds shows more
  than the limit per minute; over 2 minutes that adds 0.4 %.) The steady part: the same
  between 10 s after the start and 10 s before the last request. Also shown: the fewest
  sent in any whole 60 s window of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import aiohttp
from _common import finish, median, simulator_process, verdict

from cometbatch import Engine, Job, Settings, SimConfig
from cometbatch.net.limits import Limiter

LIMIT = 6_000  # per minute: requests in rpm mode, images in ipm mode
IMAGES_PER_REQUEST = 4  # ipm mode: gpt-image-1 with n=4
LATENCY = 0.5
CONCURRENCY = 100  # > rate x latency (100/s x 0.5 s), so the pace, not concurrency, binds
WINDOW = 60.0
TRIM = 10.0
TARGET_RATE = 0.97


@dataclass
class Sends:
    """When each generation request left the client, and how many images it asked for."""

    times: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)


@dataclass
class Run:
    mode: str
    sent: int
    limit_429s: int
    all_429s: int
    max_window: int
    whole_rate: float
    steady_rate: float
    min_full_minute: int | None
    wall: float
    ok: int
    requests: int


def max_in_window(times: list[float], weights: list[int], span: float = WINDOW) -> int:
    """The largest total weight in any window [t, t + span) that starts at an event."""
    prefix = [0]
    for weight in weights:
        prefix.append(prefix[-1] + weight)
    return max(prefix[bisect.bisect_left(times, t + span)] - prefix[k] for k, t in enumerate(times))


def full_minutes(times: list[float], weights: list[int]) -> int | None:
    """The smallest total weight of a whole window [t, t + 60) inside the run, if any fits."""
    prefix = [0]
    for weight in weights:
        prefix.append(prefix[-1] + weight)
    ends = [k for k, t in enumerate(times) if t + WINDOW <= times[-1]]
    if not ends:
        return None
    return min(prefix[bisect.bisect_left(times, times[k] + WINDOW)] - prefix[k] for k in ends)


def rate_between(times: list[float], weights: list[int], start: float, end: float) -> float:
    """Weight per minute sent in [start, end]: what left after `start`, over the time taken."""
    first = bisect.bisect_left(times, start)
    last = bisect.bisect_right(times, end)
    if last - first < 2 or end <= start:
        return 0.0
    # N events paced from `start` take (N - 1) intervals: the last one's weight is not counted.
    sent = sum(weights[first : last - 1])
    return sent / (times[last - 1] - start) * WINDOW


def tracing_session(sends: Sends, images: int, concurrency: int) -> aiohttp.ClientSession:
    """A session that timestamps every generation request as it starts."""
    trace = aiohttp.TraceConfig()

    async def on_start(
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        if params.method == "POST" and params.url.path.endswith("/images/generations"):
            sends.times.append(asyncio.get_running_loop().time())
            sends.images.append(images)

    trace.on_request_start.append(on_start)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=2 * concurrency), trace_configs=[trace]
    )


async def one_run(mode: str, base_url: str, seconds: float, out: Path) -> tuple[Run, Sends]:
    images = 1 if mode == "rpm" else IMAGES_PER_REQUEST
    requests = round(LIMIT / images / WINDOW * seconds)
    jobs = [
        Job(id=f"job-{i:06d}", prompt=f"paced {i}", model="gpt-image-1", quality="low", n=images)
        for i in range(requests)
    ]
    settings = Settings(
        base_url=base_url,
        api_key="sk-bench",
        concurrency=CONCURRENCY,
        rpm=LIMIT if mode == "rpm" else None,
        ipm=LIMIT if mode == "ipm" else None,
    )
    sends = Sends()
    ok = 0
    session = tracing_session(sends, images, CONCURRENCY)
    # max_images_per_request as the CLI passes it: the largest request of the manifest.
    limiter = Limiter.from_settings(settings, max_images_per_request=images)
    engine = Engine(settings, out_dir=out, session=session, limiter=limiter)
    async with session, engine:
        started = asyncio.get_running_loop().time()
        clock = time.perf_counter()
        async for result in engine.run(jobs):
            ok += result.ok
        wall = time.perf_counter() - clock
    times, weights = sends.times, sends.images
    end = times[-1]
    trim = min(TRIM, (end - started) / 4)
    run = Run(
        mode=mode,
        sent=len(times),
        limit_429s=0,
        all_429s=0,
        max_window=max_in_window(times, weights),
        whole_rate=rate_between(times, weights, started, end),
        steady_rate=rate_between(times, weights, started + trim, end - trim),
        min_full_minute=full_minutes(times, weights),
        wall=wall,
        ok=ok,
        requests=requests,
    )
    return run, sends


def measure(mode: str, seconds: float) -> Run:
    config = SimConfig(
        latency=LATENCY,
        record_requests=False,
        rpm_limit=LIMIT if mode == "rpm" else None,
        ipm_limit=LIMIT if mode == "ipm" else None,
    )
    with simulator_process(config) as sim, tempfile.TemporaryDirectory() as tmp:
        run, _ = asyncio.run(one_run(mode, sim.base_url, seconds, Path(tmp)))
        run.limit_429s = sim.stats.limit_429s
        run.all_429s = sim.stats.statuses[429]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script")
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of")
    parser.add_argument(
        "--seconds",
        type=float,
        default=120.0,
        help="seconds of load per run (default 120: about 2 minutes per mode and run)",
    )
    parser.add_argument("--mode", choices=["rpm", "ipm", "both"], default="both")
    args = parser.parse_args()
    runs = 1 if args.smoke else max(1, args.runs)
    seconds = 2.0 if args.smoke else args.seconds
    modes = ["rpm", "ipm"] if args.mode == "both" else [args.mode]
    met = True
    for mode in modes:
        unit = "requests" if mode == "rpm" else "images"
        print(
            f"{mode} pacing: limit {LIMIT} {unit}/min at the simulator and in cometbatch, "
            f"{seconds:g} s of load, latency {LATENCY:g} s, concurrency {CONCURRENCY}"
        )
        results = []
        for i in range(runs):
            run = measure(mode, seconds)
            results.append(run)
            minute = "-" if run.min_full_minute is None else str(run.min_full_minute)
            print(
                f"  run {i + 1}: {run.sent} requests sent, {run.ok}/{run.requests} ok in "
                f"{run.wall:.1f} s; 429s from the limit {run.limit_429s} (all 429s "
                f"{run.all_429s}); max {run.max_window} {unit} in a 60 s window; rate whole "
                f"{run.whole_rate:.1f}/min = {run.whole_rate / LIMIT:.4f}, steady "
                f"{run.steady_rate:.1f}/min = {run.steady_rate / LIMIT:.4f}; fewest in a "
                f"whole minute {minute}"
            )
        checks = [
            # (what, figure, target, higher is better)
            (f"{mode} 429s from the limit (worst run)",
             max(r.limit_429s for r in results), 0, False),
            (f"{mode} most {unit} in a 60 s window (worst run)",
             max(r.max_window for r in results), LIMIT, False),
            (f"{mode} whole-run rate / limit (median)",
             median([r.whole_rate / LIMIT for r in results]), TARGET_RATE, True),
            (f"{mode} steady rate / limit (median)",
             median([r.steady_rate / LIMIT for r in results]), TARGET_RATE, True),
            (f"{mode} requests not ok (all runs)",
             sum(r.requests - r.ok for r in results), 0, False),
        ]  # fmt: skip
        for name, figure, target, higher in checks:
            met = verdict(name, figure, target, higher_is_better=higher, unit="") and met
    finish(met, smoke=args.smoke)


if __name__ == "__main__":
    main()
