"""Ledger writes: how many result lines a second the ledger takes under each fsync policy.

The engine appends one `result` line per finished request, from as many tasks as there are
requests in flight. Here 64 tasks append 20,000 realistic result lines (two images each, the
contract's fields) as fast as the ledger takes them, once per policy, each into a fresh
folder on the same disk as the other benchmarks. Appends are group-committed (lines queued
during a write go out together in the next one), so even with an fsync per write the rate
stays far above what any image API answers. Target: >= 1,000 results/s for "end" (the
default) and "batch" (an fsync before each group's appends return). "always" also fsyncs
every image in a real run, which this script has no images for: its ledger side is "batch".
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from _common import finish, median, options, settle, verdict

from cometbatch.ledger.writer import Ledger
from cometbatch.results import ImageRecord

RESULTS = 20_000
SMOKE_RESULTS = 500
TASKS = 64
TARGET = 1_000.0
POLICIES = ("end", "batch")


def event(number: int) -> dict[str, object]:
    """A result line as the engine writes it for a two-image request."""
    job = f"job-{number:07d}"
    images = [
        ImageRecord(i, f"images/{job}/{i}.png", "png", 1_234_567, f"{number:060x}{i:04x}", None)
        for i in range(2)
    ]
    return {
        "event": "result",
        "run_id": "0123456789ab",
        "key": f"{job}#0",
        "job_id": job,
        "chunk": 0,
        "status": "ok",
        "fingerprint": f"{number:064x}",
        "model": "gpt-image-1",
        "n": 2,
        "images": [image.to_dict() for image in images],
        "downloads": [],
        "attempts": 1,
        "ambiguous_retries": 0,
        "error": None,
        "latency_s": 1.234,
        "finished_at": "2026-11-21T12:00:00.000Z",
        "usage": {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210},
        "metadata": {"sku": f"A-{number}"},
    }


async def append_all(out: Path, policy: str, count: int) -> tuple[float, int]:
    """Append `count` results from TASKS tasks; (seconds from open to close, writes made)."""
    events = [event(i) for i in range(count)]
    started = time.perf_counter()
    async with Ledger(out, fsync=policy) as ledger:  # type: ignore[arg-type]

        async def task(first: int) -> None:
            for i in range(first, count, TASKS):
                await ledger.append(events[i])

        async with asyncio.TaskGroup() as group:
            for first in range(TASKS):
                group.create_task(task(first))
        writes = ledger.writes
    return time.perf_counter() - started, writes


def main() -> None:
    opts = options(__doc__.splitlines()[0] if __doc__ else "ledger writes")
    count = SMOKE_RESULTS if opts.smoke else RESULTS
    print(f"{count} result lines from {TASKS} tasks, fsync policies {', '.join(POLICIES)}")
    rates: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(1, opts.runs + 1):
            for policy in POLICIES:
                out = Path(tmp) / f"{policy}-{run}"
                seconds, writes = asyncio.run(append_all(out, policy, count))
                rates[policy].append(count / seconds)
                print(
                    f"run {run} fsync={policy:>5}: {count / seconds:8.0f} results/s "
                    f"({seconds:.2f} s, {writes} writes, {count / max(writes, 1):.1f} lines each)"
                )
                settle(out)
    met = True
    for policy in POLICIES:
        met &= verdict(
            f"median results/s, fsync={policy}",
            median(rates[policy]),
            TARGET,
            higher_is_better=True,
            unit="/s",
        )
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main()
