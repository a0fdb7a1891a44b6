"""Large payloads: 500 requests answered with ~2 MB PNGs as base64, concurrency 32.

cometbatch against the same raw loop as bench/overhead.py (bench/_rawloop.py), alternating
in one process. While each runs, a ticker task sleeps 10 ms at a time and records how late
it wakes: the worst lag shows whether decoding, hashing or writing a large image ever holds
the event loop (cometbatch does that work in a worker thread above `offload_bytes`). The
simulator runs in this process too, so its own encoding of each answer (and any other load
on the machine) shows up in the lag as well: compare with the raw loop's. cometbatch also
checks that each image is whole (every PNG chunk's CRC), which the raw loop does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from _common import (
    finish,
    in_turn,
    median,
    options,
    peak_rss_mb,
    settle,
    simulator_process,
    verdict,
)
from overhead import make_jobs, run_cometbatch, run_raw, warm_up

from cometbatch import Job, SimConfig

REQUESTS = 500
SMOKE_REQUESTS = 10
CONCURRENCY = 32
PAYLOAD_BYTES = 2_000_000
# Held with the image check on: walking a 2 MB PNG's chunks costs one CRC pass.
TARGET_RATIO = 1.3
TICK = 0.010
WARM_UP = 16

Runner = Callable[[str, list[Job], Path, int], Awaitable[float]]


@contextlib.asynccontextmanager
async def loop_lag() -> AsyncIterator[list[float]]:
    """Measure how late a 10 ms sleep wakes up, while the body runs; yields the lags list."""
    lags: list[float] = []
    loop = asyncio.get_running_loop()

    async def tick() -> None:
        while True:
            due = loop.time() + TICK
            await asyncio.sleep(TICK)
            lags.append(loop.time() - due)

    ticker = asyncio.create_task(tick())
    try:
        yield lags
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


async def measured(
    runner: Runner, base_url: str, jobs: list[Job], out: Path
) -> tuple[float, list[float]]:
    """(seconds, the sorted event-loop lags in seconds) of one run."""
    async with loop_lag() as lags:
        seconds = await runner(base_url, jobs, out, CONCURRENCY)
    return seconds, sorted(lags) or [0.0]


def describe(lags: list[float]) -> str:
    """Median, 99th percentile and worst of sorted lags, in ms."""
    p50, p99 = lags[len(lags) // 2], lags[min(len(lags) - 1, int(0.99 * len(lags)))]
    return f"loop lag p50 {p50 * 1e3:5.1f} p99 {p99 * 1e3:6.1f} worst {lags[-1] * 1e3:6.1f} ms"


def main() -> None:
    opts = options(__doc__.splitlines()[0] if __doc__ else "large payloads")
    count = SMOKE_REQUESTS if opts.smoke else REQUESTS
    jobs = make_jobs(count)
    rates: dict[str, list[float]] = {"raw loop": [], "cometbatch": []}
    lags: dict[str, list[float]] = {"raw loop": [], "cometbatch": []}
    config = SimConfig(seed=1, payload_bytes=PAYLOAD_BYTES, record_requests=False)
    print(
        f"{count} requests, concurrency {CONCURRENCY}, PNGs of ~{PAYLOAD_BYTES / 1e6:g} MB "
        f"as base64, simulator latency 0"
    )
    with simulator_process(config) as sim, tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        # The simulator makes its few large pictures on first use: not part of any timing.
        warm_up(sim.base_url, jobs[:WARM_UP], Path(tmp) / "warm-up", CONCURRENCY)
        for run in range(1, opts.runs + 1):
            contenders = [("raw loop", run_raw), ("cometbatch", run_cometbatch)]
            for name, runner in in_turn(run, contenders):
                out = Path(tmp) / f"{name.replace(' ', '-')}-{run}"
                seconds, lag = asyncio.run(measured(runner, sim.base_url, jobs, out))
                rates[name].append(count / seconds)
                lags[name].append(lag[-1])
                print(
                    f"run {run} {name:>10}: {count / seconds:5.1f} requests/s "
                    f"({count * PAYLOAD_BYTES / seconds / 1e6:3.0f} MB/s, {seconds:5.2f} s), "
                    f"{describe(lag)}"
                )
                settle(out)
        took = time.perf_counter() - started
    raw, cb = median(rates["raw loop"]), median(rates["cometbatch"])
    pairs = zip(rates["raw loop"], rates["cometbatch"], strict=True)
    print(f"ratio of each run: {' '.join(f'{c / r:.2f}' for r, c in pairs)}")
    worst = max(lags["cometbatch"])
    print(f"median raw loop:   {raw:7.1f} requests/s")
    print(f"median cometbatch: {cb:7.1f} requests/s")
    print(
        f"worst event-loop lag, cometbatch: {worst * 1e3:.1f} ms (raw loop: "
        f"{max(lags['raw loop']) * 1e3:.1f} ms)"
    )
    print(f"peak RSS {peak_rss_mb():.0f} MB, {took:.0f} s in all")
    met = verdict("cometbatch / raw loop", cb / raw, TARGET_RATIO, higher_is_better=True, unit="x")
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main()
