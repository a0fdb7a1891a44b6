"""What every benchmark shares: a simulator on its own thread, options, RSS, the verdict.

Benchmarks print their figures and the target, and exit 1 when the target is missed, so
`python bench/<name>.py` is a check as well as a measurement. `--smoke` runs a tiny size that
only proves the script still works (the test suite runs every benchmark that way).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from cometbatch import SimConfig, Simulator
from cometbatch.simulator.stats import SimStats


@dataclass
class Options:
    """The command line every benchmark takes."""

    smoke: bool
    runs: int


def options(description: str, *, runs: int = 3) -> Options:
    """Parse `--smoke` and `--runs N` (medians are taken over the runs)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script")
    parser.add_argument("--runs", type=int, default=runs, help="runs to take the median of")
    args = parser.parse_args()
    return Options(smoke=args.smoke, runs=1 if args.smoke else max(1, args.runs))


class SimulatorProcess:
    """A simulated API running in a child process: its base URL, and its stats on request."""

    def __init__(self, base_url: str, conn: Connection) -> None:
        self.base_url = base_url
        self._conn = conn

    @property
    def stats(self) -> SimStats:
        """A snapshot of the child's counters."""
        self._conn.send("stats")
        stats: SimStats = self._conn.recv()
        return stats


def _serve_child(config: SimConfig, conn: Connection) -> None:
    """The child's body: serve until the parent says stop (or goes away)."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()
        async with Simulator(config) as sim:

            def on_message() -> None:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = "stop"
                if message == "stats":
                    conn.send(sim.stats)
                elif not stop.done():
                    stop.set_result(None)

            loop.add_reader(conn.fileno(), on_message)
            conn.send(sim.base_url)
            await stop
            loop.remove_reader(conn.fileno())

    asyncio.run(serve())


@contextlib.contextmanager
def simulator_process(config: SimConfig) -> Iterator[SimulatorProcess]:
    """The simulated API in its own process, as a remote API would be: its CPU work (encoding
    answers, the HTTP server) does not share the measured client's interpreter (GIL)."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve_child, args=(config, child), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(60):
            raise RuntimeError("the simulator process did not start")
        yield SimulatorProcess(parent.recv(), parent)
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
        parent.close()


T = TypeVar("T")


def in_turn(run: int, contenders: Sequence[T]) -> list[T]:
    """The contenders of run `run`, in alternating order: neither always goes first (and
    so neither always meets the machine as the other left it)."""
    return list(contenders) if run % 2 else list(reversed(contenders))


def settle(out: Path) -> None:
    """Untimed, between runs: delete a run's output and write back what the OS still holds
    dirty, so that the next run does not pay for the disk writes of the one before."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / (1024 * 1024)


def timed_process(
    command: list[str], cwd: Path, env: dict[str, str]
) -> tuple[float, resource.struct_rusage]:
    """Run `command` to its end, its output in `cwd`/process.log: the seconds from start to
    exit and what it used (wait4: its own CPU and peak memory, whatever else loads the
    machine); SystemExit with the log's tail if it failed."""
    log = cwd / "process.log"
    with open(log, "wb") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=output)
        _, status, usage = os.wait4(process.pid, 0)
        took = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        text = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(command[1:4])} exited {code}:\n{text}")
    return took, usage


def median(values: list[float]) -> float:
    """The median of the runs."""
    return statistics.median(values)


def verdict(
    name: str, measured: float, target: float, *, higher_is_better: bool, unit: str
) -> bool:
    """Print the figure against its target; True when the target is met."""
    met = measured >= target if higher_is_better else measured <= target
    relation = "≥" if higher_is_better else "≤"
    print(
        f"{name}: {measured:.3f}{unit} (target {relation} {target:g}{unit}) "
        f"{'MET' if met else 'MISSED'}"
    )
    return met


def finish(met: bool, *, smoke: bool) -> None:
    """Exit 1 when a target was missed (a smoke run only has to run)."""
    if not met and not smoke:
        sys.exit(1)


def manifest_line(rng: random.Random, number: int, job: dict[str, Any]) -> str:
    """One manifest line of `job`: mostly an explicit id, some derived ids, some Batch API lines."""
    shape = rng.random()
    if shape < 0.8:
        data: dict[str, Any] = {"id": f"scene-{number:07d}", **job}
    elif shape < 0.9:
        data = job  # the id is derived from the request fields
    else:
        metadata = job.pop("metadata", None)
        data = {"custom_id": f"batch-{number:07d}", "method": "POST"}
        data.update(url="/v1/images/generations", body=job)
        if metadata is not None:
            data["metadata"] = metadata
    return json.dumps(data, separators=(",", ":"))
