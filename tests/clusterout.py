"""A cluster run's output made without Ray, for the views' tests: the plan, each shard's
manifest lines, and ordinary engine runs into OUT/shards/<id>/ against the simulator."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from collections.abc import Collection
from pathlib import Path

from support import no_sleep, run_all, settings_for

from cometbatch import Engine, Simulator, load_manifest
from cometbatch.ledger.clustered import PLAN_NAME, RUNS_NAME, shard_id
from cometbatch.store.urls import open_store

__all__ = ["make_cluster_output", "shard_of"]


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
