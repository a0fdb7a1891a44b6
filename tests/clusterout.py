"""Cluster outputs for the tests: one made without Ray (the plan, each shard's manifest lines,
ordinary engine runs into OUT/shards/<id>/), the simulator on a thread for `run --ray`
subprocesses, and readers of what a cluster run left behind."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path
from queue import Queue
from typing import Any

from support import no_sleep, run_all, settings_for

from cometbatch import Engine, SimConfig, Simulator, load_manifest
from cometbatch.ledger.clustered import PLAN_NAME, RUNS_NAME, shard_id
from cometbatch.store.urls import open_store

__all__ = [
    "kill_a_running_worker",
    "make_cluster_output",
    "ok_lines",
    "shard_images",
    "shard_of",
    "shard_runs",
    "simulator_thread",
]


def shard_of(job_id: str, shards: int) -> int:
    """The shard a job lands in: sha256(job_id) % shards (the plan's `shard_of`)."""
    return int(hashlib.sha256(job_id.encode()).hexdigest(), 16) % shards


async def make_cluster_output(
    out: str,
    manifest: Path,
    sim: Simulator,
    *,
    shards: int = 3,
    run: Collection[int] | None = None,
) -> dict[str, list[str]]:
    """Cut `manifest` into `shards`, write the plan and the cut, and run the shards in `run`
    (all by default) into `out` (a folder or a URL); each shard's job ids by shard id."""
    store = open_store(out)
    text = await asyncio.to_thread(manifest.read_text)
    lines = [line for line in text.splitlines() if line.strip()]
    cut: dict[str, list[str]] = {shard_id(i): [] for i in range(shards)}
    for line in lines:
        cut[shard_id(shard_of(json.loads(line)["id"], shards))].append(line)
    plan = {
        "version": 1,
        "shards": shards,
        "manifest": str(manifest),
        "manifest_sha256": load_manifest(manifest).sha256 or None,
        "created_at": "2026-01-01T00:00:00.000Z",
        "shard_of": "sha256(job_id) % shards",
    }
    await store.put(PLAN_NAME, json.dumps(plan).encode())
    for name, held in cut.items():
        await store.put(f"cluster/shards/{name}.jsonl", "".join(f"{x}\n" for x in held).encode())
    chosen = range(shards) if run is None else run
    with tempfile.TemporaryDirectory(prefix="cometbatch-cut-") as folder:
        for name in map(shard_id, chosen):
            # As a worker on another node would: the shard's lines read into a local file.
            local = Path(folder, f"{name}.jsonl")
            await asyncio.to_thread(local.write_bytes, store.read(f"cluster/shards/{name}.jsonl"))
            target = (
                os.path.join(out, "shards", name) if "://" not in out else f"{out}/shards/{name}"
            )
            async with Engine(settings_for(sim), out_dir=target, sleep=no_sleep) as engine:
                await run_all(engine, load_manifest(local))
    runs = json.dumps({"run_id": "test", "shards": shards, "workers": 1}) + "\n"
    await store.put(RUNS_NAME, runs.encode())
    return {name: [json.loads(x)["id"] for x in held] for name, held in cut.items()}


@contextlib.contextmanager
def simulator_thread(config: SimConfig) -> Iterator[Simulator]:
    """The simulated API on 127.0.0.1, on a thread of its own: its stats readable here."""
    ready: Queue[tuple[Simulator, asyncio.AbstractEventLoop, asyncio.Future[None]]] = Queue()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()
        async with Simulator(config) as sim:
            ready.put((sim, loop, stop))
            await stop

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    sim, loop, stop = ready.get(timeout=60)
    try:
        yield sim
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(timeout=60)


def shard_images(out: Path) -> Counter[str]:
    """How many image files each job has, over every shard of OUT."""
    found: Counter[str] = Counter()
    for path in (out / "shards").glob("*/images/*/*"):
        assert not path.name.endswith(".tmp"), path
        found[path.parent.name] += 1
    return found


def ok_lines(out: Path) -> Counter[str]:
    """How many ok result lines each key has, over every shard's ledger."""
    seen: Counter[str] = Counter()
    for ledger in (out / "shards").glob("*/ledger.jsonl"):
        for line in ledger.read_text().splitlines():
            event = json.loads(line)
            if event["event"] == "result" and event["status"] == "ok":
                seen[event["key"]] += 1
    return seen


def shard_runs(ledger: Path) -> list[dict[str, Any]]:
    """The run events of one shard's ledger."""
    events = [json.loads(line) for line in ledger.read_text().splitlines()]
    return [event for event in events if event["event"] == "run"]


def kill_a_running_worker(progress: Path, *, deadline: float) -> str:
    """SIGKILL the process of a shard that has done some images and is not finished; its id."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for path in sorted(progress.glob("*.json")):
            try:
                report: dict[str, Any] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if report["attempt"] == 1 and not report["finished"] and report["done_images"] >= 3:
                os.kill(report["pid"], signal.SIGKILL)
                return str(report["shard"])
        time.sleep(0.1)
    raise AssertionError("no shard was found running")
