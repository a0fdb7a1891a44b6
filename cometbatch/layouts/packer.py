"""The packer: ok images wait in staging (images/), then go into shards committed by the ledger."""

# The order is what makes a kill at any point safe: (1) the shard is put whole in the store,
# (2) then its stats, (3) then the shard line is appended to the ledger, (4) then the staged
# images are removed. Before (3) the shard does not count: the next run removes it as a stray
# and packs its images again from staging, still recorded as ok, so nothing is sent again.
# After (3) the images live in the shard: resume takes their keys as done (LedgerState.packed)
# and removes what (4) left behind. Nothing here sends a request.

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError
from ..ledger.index import LedgerState
from ..ledger.writer import Ledger
from ..manifest.job import Job
from ..results import Result
from ..settings import SHARD_LAYOUTS
from ..store.imagecheck import image_size
from ..store.interface import Store
from ..store.shardfiles import Member, require_pyarrow, write_parquet, write_tar
from .files import METADATA_NAME
from .samples import (
    SHARDS,
    Staged,
    choose,
    sample_entry,
    sample_key,
    sample_record,
    shard_event,
    shard_name,
    shard_number,
    shard_stats,
    stats_name,
)

__all__ = ["SHARD_LAYOUTS", "Packer"]

log = logging.getLogger(__name__)

# Staged images read and removed this many at a time: on an object store each is a request.
_AT_ONCE = 8


class Packer:
    """Packs an output's staged images into shards of `shard_size`, when full and at the end."""

    # With a ledger, each shard is committed there and its staging removed (a run); without,
    # shards are written to another store from a finished output left as it is (export).

    def __init__(
        self,
        store: Store,
        *,
        layout: str,
        shard_size: int,
        ledger: Ledger | None = None,
        source: Store | None = None,
        run_id: str = "",
    ) -> None:
        if layout not in SHARD_LAYOUTS:
            raise ConfigError(f"unknown shard layout {layout!r}; layouts: webdataset, parquet")
        if layout == "parquet":
            require_pyarrow()  # before anything is sent
        self.store = store
        self.source = source if source is not None else store
        self.layout = layout
        self.shard_size = shard_size
        self.ledger = ledger
        self.run_id = run_id
        self.shards_written = 0
        self.samples_written = 0
        self._state = LedgerState()
        # Staged requests of this run, in order; their image count.
        self._pending: dict[str, Staged] = {}
        self._images = 0
        # Keys an earlier run left staged, by job: pending once their job (its prompt) is seen.
        self._waiting: dict[str, list[str]] = {}
        self._next = 0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return (
            f"<Packer {self.layout} next={self._next} pending={self._images} "
            f"waiting_jobs={len(self._waiting)} shards={self.shards_written}>"
        )

    @property
    def unseen(self) -> int:
        """Staged requests whose job was never seen (no prompt known): not packed."""
        return sum(map(len, self._waiting.values()))

    def open(self, state: LedgerState) -> None:
        """Take up where the ledger says packing stands (blocking)."""
        # Strays (shards without a line) removed, the last committed shard's staging removed,
        # earlier runs' staged keys noted by job.
        self._state = state
        numbers = [shard_number(str(shard["shard"])) or 0 for shard in state.shards]
        self._next = max(numbers) + 1 if numbers else 0
        present = self.store.names(SHARDS)
        if self.ledger is None:
            if present:
                raise ConfigError(f"{self.store.root} already holds {SHARDS}/: choose a new folder")
        else:
            committed = {n for s in state.shards for n in (s["shard"], s["stats"])}
            for name in present:
                if name not in committed:
                    # Put before a kill, never committed: its images are still staged.
                    self.store.remove(name)
            last = state.last_shard
            if last is not None:
                # Not a key recorded again since: its new images are staged at the same paths.
                samples = [s for s in last["samples"] if s["key"] in state.packed]
                self._remove_staging(str(sample["path"]) for sample in samples)
        for key, recorded in state.items():
            if recorded.status == "ok" and key not in state.packed:
                self._waiting.setdefault(recorded.job_id, []).append(key)

    def watch(self, jobs: Iterable[Job]) -> Iterator[Job]:
        """The jobs, each seen on its way (see `seen`)."""
        for job in jobs:
            self.seen(job)
            yield job

    async def awatch(self, jobs: AsyncIterable[Job]) -> AsyncIterator[Job]:
        """The jobs of an async source, each seen on its way (see `seen`)."""
        async for job in jobs:
            self.seen(job)
            yield job

    def seen(self, job: Job) -> None:
        """A job of this run: its requests an earlier run left staged wait for a shard now."""
        keys = self._waiting.pop(job.id, None)
        for key in keys or ():
            recorded = self._state.get(key)
            if recorded is None or recorded.status != "ok" or key in self._state.packed:
                continue
            if key not in self._pending:
                line = recorded.line_event_or_rebuilt()
                cost = line.get("cost")
                usd = cost.get("usd") if isinstance(cost, dict) else None
                self._stage(Staged(key, job, tuple(recorded.images), line.get("usage"), usd))

    def add(self, result: Result) -> None:
        """A request's ok line was appended: its images wait in staging for a shard."""
        if result.ok and result.images:
            images = tuple(image.to_dict() for image in result.images)
            self._stage(Staged(result.key, result.job, images, result.usage, result.cost_usd))

    def _stage(self, staged: Staged) -> None:
        old = self._pending.pop(staged.key, None)
        if old is not None:
            self._images -= len(old.images)
        self._pending[staged.key] = staged
        self._images += len(staged.images)

    async def pack_full(self) -> int:
        """Pack every full shard there is (none while another pack is under way); how many."""
        if self._lock.locked() or self._images < self.shard_size:
            return 0
        # Shielded: a caller cancelled meanwhile (a stop) leaves the shard to finish whole.
        return await asyncio.shield(asyncio.ensure_future(self._pack_while(self.shard_size)))

    async def finish(self) -> int:
        """Pack everything staged, the last shard less than full; how many shards."""
        return await self._pack_while(1)

    async def finish_run(self) -> Exception | None:
        """`finish` at a run's end: its error returned (logged), the staged images kept."""
        try:
            await self.finish()
            # A files run's metadata.jsonl names images that now live in shards.
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self.store.remove, METADATA_NAME)
        except Exception as exc:  # the next run packs them
            log.error("the last shard was not packed: %s", exc)
            return exc
        return None

    async def _pack_while(self, least: int) -> int:
        async with self._lock:
            packed = 0
            while self._pending and self._images >= least:
                # Committed already (a pack whose caller went away after its ledger line).
                for key in [key for key in self._pending if key in self._state.packed]:
                    self._images -= len(self._pending.pop(key).images)
                if self._images < least or not self._pending:
                    break
                await self._pack(choose(self._pending.values(), self.shard_size))
                packed += 1
            return packed

    async def _pack(self, batch: list[Staged]) -> None:
        """Write, store and commit one shard of `batch`, then remove its staging."""
        number = self._next
        name = shard_name(number, self.layout)
        start = time.time()
        temp, entries, records, skipped = await asyncio.to_thread(self._build, number, batch)
        try:
            if entries:
                size, digest = await asyncio.to_thread(_digest, temp)
                await self.store.put_file(name, temp, sync=True)
                stats = shard_stats(name, self.layout, records, skipped, (start, time.time()))
                stats.update(sha256=digest, file_bytes=size)
                data = json.dumps(stats, indent=1).encode()
                await self.store.put(stats_name(number), data, sync=True)
                if self.ledger is not None:
                    await self.ledger.append(
                        shard_event(self.run_id, name, self.layout, entries, size, digest)
                    )
                    paths = [str(entry["path"]) for entry in entries]
                    await asyncio.to_thread(self._remove_staging, paths)
                self._next += 1
                self.shards_written += 1
                self.samples_written += len(entries)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        for staged in batch:
            if self._pending.get(staged.key) is staged:
                del self._pending[staged.key]
                self._images -= len(staged.images)

    def _build(
        self, number: int, batch: list[Staged]
    ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]], int]:
        """Write the shard to a local temporary file (blocking); see the return annotation."""
        # (file, its ledger entries, its records, images not whole in staging)
        entries: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        skipped = 0

        def members() -> Iterator[Member]:
            nonlocal skipped
            for staged, images in self._read_ahead(batch):
                if images is None:
                    # Left staged and unpacked: the next run finds the file gone and restores it.
                    skipped += len(staged.images)
                    continue
                for image, data in zip(staged.images, images, strict=True):
                    key = sample_key(number, len(records))
                    record = sample_record(staged, image, key, image_size(data))
                    records.append(record)
                    entries.append(sample_entry(record, str(image["path"])))
                    yield Member(key, data, record)

        handle, temp = tempfile.mkstemp(prefix=".shard.", suffix=".tmp")
        os.close(handle)
        try:
            (write_parquet if self.layout == "parquet" else write_tar)(temp, members())
        except BaseException:
            os.unlink(temp)
            raise
        return temp, entries, records, skipped

    def _read_ahead(self, batch: list[Staged]) -> Iterator[tuple[Staged, list[bytes] | None]]:
        """Each request of `batch` in order with its staged images, read a few ahead."""
        with ThreadPoolExecutor(_AT_ONCE) as pool:
            window: deque[tuple[Staged, Future[list[bytes] | None]]] = deque()
            for staged in batch:
                window.append((staged, pool.submit(self._read, staged)))
                if len(window) == _AT_ONCE:
                    first, images = window.popleft()
                    yield first, images.result()
            for first, images in window:
                yield first, images.result()

    def _read(self, staged: Staged) -> list[bytes] | None:
        """A request's staged images, or None (logged) if one is gone or not what was recorded."""
        found = []
        for image in staged.images:
            try:
                data = self.source.read(str(image["path"]))
            except FileNotFoundError:
                log.warning("%s: staged image %s is gone; not packed", staged.key, image["path"])
                return None
            if hashlib.sha256(data).hexdigest() != image["sha256"]:
                log.warning("%s: staged image %s changed; not packed", staged.key, image["path"])
                return None
            found.append(data)
        return found

    def _remove_staging(self, paths: Iterable[str]) -> None:
        """Remove staged images a committed shard holds (those already gone are fine)."""
        with ThreadPoolExecutor(_AT_ONCE) as pool:
            for _ in pool.map(self._remove_one, paths):
                pass

    def _remove_one(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.store.remove(path)


def _digest(path: str) -> tuple[int, str]:
    """A file's size and hex sha256."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return os.path.getsize(path), digest
