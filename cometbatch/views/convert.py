"""`export OUT DEST --layout`: a finished files-layout output's images packed into shards."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import CometBatchError, ConfigError
from ..layouts.packer import Packer
from ..ledger.clustered import read_cluster
from ..ledger.events import ledger_path
from ..ledger.index import LedgerState
from ..manifest.job import Job
from ..store.interface import Store
from ..store.liverun import lock_holder
from ..store.urls import store_of
from .recorded import recorded_manifest

__all__ = ["Converted", "convert"]


@dataclass(frozen=True, slots=True)
class Converted:
    """What a conversion wrote, and the recorded requests it could not (no job, no prompt)."""

    shards: int
    samples: int
    left_out: int


async def convert(
    out_dir: Store | str | os.PathLike[str],
    dest: Store | str | os.PathLike[str],
    *,
    layout: str,
    shard_size: int,
) -> Converted:
    """Write every ok image of OUT, with its job's prompt and record, as shards into DEST."""
    # OUT is only read (its ledger without the lock, as export does); prompts and parameters
    # come from the manifest the latest run recorded. Either may be a folder or a store.
    source = store_of(out_dir)
    out = str(out_dir) if isinstance(out_dir, str | os.PathLike) else source.root
    if await asyncio.to_thread(read_cluster, source) is not None:
        raise ConfigError(f"{out} is a cluster output: convert its shards (shards/<id>) one by one")
    state = await asyncio.to_thread(lambda: LedgerState.load(ledger_path(source)))
    if state.shards:
        raise ConfigError(f"{out} keeps its images in shards already: nothing to convert")
    if lock_holder(source)[0]:
        raise ConfigError(f"a run is writing {out}: convert it once that run has finished")
    run = state.last_run or {}
    if not isinstance(run.get("manifest"), str):
        raise ConfigError(f"the latest run in {out} recorded no manifest: the prompts come from it")
    target = store_of(dest)
    packer = Packer(target, layout=layout, shard_size=shard_size, source=source)
    await asyncio.to_thread(packer.open, state)
    try:
        manifest = recorded_manifest(run, run["manifest"])
        await asyncio.to_thread(_see_all, packer, manifest)
    except (CometBatchError, OSError) as exc:
        raise ConfigError(f"cannot read the manifest {run['manifest']}: {exc}") from exc
    await packer.finish()
    return Converted(packer.shards_written, packer.samples_written, packer.unseen)


def _see_all(packer: Packer, jobs: Iterable[Job]) -> None:
    for job in jobs:
        packer.seen(job)
