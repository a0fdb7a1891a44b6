"""Image writers, whole runs: writer threads vs writes on the event loop vs aiofiles.

Each contender is a local store handed to the engine (Engine(store=...)), so everything but
the way each image file is written stays the same: whole library runs against the simulated
API in its own process, 4,000 requests with small images and 200 with ~2 MB images (base64,
gpt-image-1), concurrency 64. Every writer keeps the same rules: a temporary name in the
final folder, fsync per the policy (none for images under the default "end"), os.replace
onto the final name, no file left by a failed write, and the file complete before its ledger
line. The contenders:

- "threads": every image one trip to the local store's writer threads (its default).
- "loop": files under 64 KB written on the event loop itself (`LocalStore(loop_bytes=...)`),
  larger ones in the threads; small images only (for large ones it is "threads" again).
- "aiofiles": every file through aiofiles (open, write, close, replace: one executor trip
  each). Skipped when aiofiles is not installed (`pip install aiofiles`).

Runs alternate between contenders; images/s is the median of the runs, with the CPU time
this process spent per image (the simulator's is not in it), which a loaded machine blurs
less than the wall clock. Target: the store's default writer within 10 % of the fastest
contender at both sizes (the rule the writer was chosen by: aiofiles if it is within 10 % of
the best, else the faster writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import finish, in_turn, median, options, settle, simulator_process, verdict
from overhead import KEY, make_jobs, warm_up

from cometbatch import Engine, Job, Settings, SimConfig
from cometbatch.store.local import LocalStore

SMALL, LARGE = 4_000, 200
SMOKE_SMALL, SMOKE_LARGE = 100, 4
CONCURRENCY = 64
LARGE_BYTES = 2_000_000
TARGET = 0.9

try:
    aiofiles: Any = importlib.import_module("aiofiles")
    aiofiles_os: Any = importlib.import_module("aiofiles.os")
except ImportError:
    aiofiles = aiofiles_os = None


class AiofilesStore(LocalStore):
    """The local store with each file written through aiofiles, under the same rules."""

    async def put(self, name: str, data: bytes, *, sync: bool = False) -> None:
        final = os.path.join(self.root, *name.split("/"))
        folder = os.path.dirname(final)
        temp = os.path.join(folder, f".{os.path.basename(final)}.{id(data):x}.tmp")
        await aiofiles_os.makedirs(folder, exist_ok=True)
        try:
            async with aiofiles.open(temp, "xb", buffering=0) as handle:
                view = memoryview(data)
                while view:
                    view = view[await handle.write(view) :]
                if sync:
                    await asyncio.to_thread(os.fsync, handle.fileno())
            await aiofiles_os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise


Writer = Callable[[Path], LocalStore]
WRITERS: dict[str, Writer] = {
    "threads": LocalStore,
    "loop": lambda out: LocalStore(out, loop_bytes=64 * 1024),
}
if aiofiles is not None:
    WRITERS["aiofiles"] = AiofilesStore
DEFAULT = "threads"


async def run(base_url: str, jobs: list[Job], out: Path, store: LocalStore) -> float:
    """One whole library run with `store`; returns the seconds taken."""
    settings = Settings(base_url=base_url, api_key=KEY, concurrency=CONCURRENCY)
    started = time.perf_counter()
    ok = 0
    async with Engine(settings, out_dir=out, store=store) as engine:
        async for result in engine.run(jobs):
            ok += result.ok
    took = time.perf_counter() - started
    if ok != len(jobs):
        raise SystemExit(f"only {ok} of {len(jobs)} requests succeeded")
    return took


def measure(
    label: str, count: int, payload: int | None, runs: int, tmp: Path, writers: list[str]
) -> dict[str, float]:
    """Median images/s of each of `writers` over `runs` alternating runs of `count` requests."""
    jobs = make_jobs(count)
    rates: dict[str, list[float]] = {name: [] for name in writers}
    cpu: dict[str, list[float]] = {name: [] for name in writers}
    config = SimConfig(seed=1, payload_bytes=payload, record_requests=False)
    with simulator_process(config) as sim:
        warm_up(sim.base_url, jobs[: min(count, 2_000)], tmp / "warm-up", CONCURRENCY)
        for number in range(1, runs + 1):
            for name in in_turn(number, writers):
                out = tmp / f"{label}-{name}-{number}"
                spent = time.process_time()
                seconds = asyncio.run(run(sim.base_url, jobs, out, WRITERS[name](out)))
                cpu[name].append((time.process_time() - spent) / count * 1e6)
                rates[name].append(count / seconds)
                print(
                    f"{label} run {number} {name:>8}: {count / seconds:8.1f} images/s, "
                    f"{cpu[name][-1]:6.0f} us CPU/image"
                )
                settle(out)
    medians = {name: median(values) for name, values in rates.items()}
    for name, rate in medians.items():
        print(
            f"{label} median {name:>8}: {rate:8.1f} images/s, {median(cpu[name]):6.0f} us CPU/image"
        )
    return medians


def main() -> None:
    opts = options(__doc__.splitlines()[0] if __doc__ else "image writers")
    small, large = (SMOKE_SMALL, SMOKE_LARGE) if opts.smoke else (SMALL, LARGE)
    if aiofiles is None:
        print("aiofiles is not installed: its contender is skipped (pip install aiofiles)")
    met = True
    with tempfile.TemporaryDirectory() as tmp:
        for label, count, payload in (("small", small, None), ("large", large, LARGE_BYTES)):
            writers = [name for name in WRITERS if label == "small" or name != "loop"]
            medians = measure(label, count, payload, opts.runs, Path(tmp), writers)
            best = max(medians, key=medians.__getitem__)
            if "aiofiles" in medians:
                print(f"{label}: aiofiles / {best} = {medians['aiofiles'] / medians[best]:.2f}")
            ratio = medians[DEFAULT] / medians[best]
            met &= verdict(
                f"{label}: {DEFAULT} (default) / {best} (fastest)",
                ratio,
                TARGET,
                higher_is_better=True,
                unit="x",
            )
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main()
