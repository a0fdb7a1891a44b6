"""Dataset layouts: files with metadata.jsonl, or images packed into webdataset/parquet shards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Iterable
from typing import Protocol

from ..ledger.writer import Ledger
from ..manifest.job import Job
from ..models.registry import ModelRegistry
from ..results import Result
from ..settings import Settings
from ..store.interface import Store
from .files import FilesLayout
from .packer import Packer

__all__ = ["FilesLayout", "Packer", "RunLayout", "open_layout"]


class RunLayout(Protocol):
    """A layout's part in a run: what it sees of the jobs and ok lines, and its end."""

    def watch(self, jobs: Iterable[Job]) -> Iterable[Job]: ...

    def awatch(self, jobs: AsyncIterable[Job]) -> AsyncIterable[Job]: ...

    def seen(self, job: Job) -> None: ...

    def add(self, result: Result) -> None: ...

    async def pack_full(self) -> int: ...

    async def finish_run(self) -> Exception | None: ...


async def open_layout(
    store: Store, settings: Settings, ledger: Ledger, run_id: str, registry: ModelRegistry
) -> RunLayout:
    """The run's layout, open: the packer takes up where the ledger says packing stands."""
    if settings.layout == "files":
        return FilesLayout(store, ledger.state, registry)
    packer = Packer(
        store, layout=settings.layout, shard_size=settings.shard_size, ledger=ledger, run_id=run_id
    )
    await asyncio.to_thread(packer.open, ledger.state)
    return packer
