"""The files layout: images stay in images/; metadata.jsonl names each with its prompt."""

# So that `datasets.load_dataset("imagefolder", data_dir=OUT)` reads images with prompts.

# With a metadata file there, imagefolder takes its columns from it and infers no class label
# from the job folders (datasets >= 2.x: drop_labels defaults to "when there is no metadata").

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import tempfile
from collections.abc import AsyncIterable, Iterable, Iterator

from ..ledger.index import LedgerState
from ..manifest.job import Job
from ..manifest.reader import Manifest
from ..models.registry import ModelRegistry
from ..plan import plan_job
from ..results import OK, PARTIAL, Result
from ..store.interface import Store

__all__ = ["METADATA_NAME", "FilesLayout", "metadata_lines", "write_metadata"]

METADATA_NAME = "metadata.jsonl"


def metadata_lines(
    jobs: Iterable[Job], state: LedgerState, registry: ModelRegistry
) -> Iterator[str]:
    """One JSON line per image the ledger holds for `jobs` (ok or partial requests)."""
    for job in jobs:
        spec = registry.get(job.model)
        for request in plan_job(job, spec):
            recorded = state.get(request.key)
            if recorded is None or recorded.status not in (OK, PARTIAL):
                continue
            if request.key in state.packed:
                continue  # in a shard: no file to name
            for image in recorded.images:
                line = {
                    "file_name": image["path"],
                    "prompt": job.prompt,
                    "job_id": job.id,
                    "model": job.model,
                    "index": image["index"],
                    "size": job.size,
                    "quality": job.quality,
                    "revised_prompt": image.get("revised_prompt"),
                    "sha256": image["sha256"],
                    # As JSON text: its keys vary by job, and one column needs one type.
                    "metadata": json.dumps(job.metadata, ensure_ascii=False),
                }
                yield json.dumps(line, ensure_ascii=False) + "\n"


def write_metadata_file(
    jobs: Iterable[Job], state: LedgerState, registry: ModelRegistry
) -> tuple[str, int]:
    """metadata.jsonl's lines in a local temporary file (blocking); the file and its lines."""
    handle, temp = tempfile.mkstemp(prefix=".metadata.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(handle, "w", encoding="utf-8", errors="surrogatepass") as stream:
            for line in metadata_lines(jobs, state, registry):
                stream.write(line)
                count += 1
    except BaseException:
        os.unlink(temp)
        raise
    return temp, count


async def write_metadata(
    store: Store, jobs: Iterable[Job], state: LedgerState, registry: ModelRegistry
) -> int:
    """Replace OUT's metadata.jsonl, whole, with a line per image of `jobs`; how many lines."""
    temp, count = await asyncio.to_thread(write_metadata_file, jobs, state, registry)
    try:
        await store.put_file(METADATA_NAME, temp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    return count


class FilesLayout:
    """The files layout's part in a run: metadata.jsonl for the manifest's images at the end."""

    # Only for runs of a Manifest, a list or a tuple: they are read again at the end, so the
    # file covers earlier runs' images too without holding a line per image meanwhile.

    def __init__(self, store: Store, state: LedgerState, registry: ModelRegistry) -> None:
        self.store = store
        self.state = state
        self.registry = registry
        self.sources: list[Iterable[Job]] = []
        self.lines = 0

    def __repr__(self) -> str:
        return f"<FilesLayout sources={len(self.sources)} lines={self.lines}>"

    def watch(self, jobs: Iterable[Job]) -> Iterable[Job]:
        """The jobs as given; a re-iterable source is noted for the metadata file."""
        if isinstance(jobs, Manifest | list | tuple):
            self.sources.append(jobs)
        return jobs

    def awatch(self, jobs: AsyncIterable[Job]) -> AsyncIterable[Job]:
        return jobs

    def seen(self, job: Job) -> None:
        """Nothing to do: images stay where the sink put them."""

    def add(self, result: Result) -> None:
        """Nothing to do: images stay where the sink put them."""

    async def pack_full(self) -> int:
        return 0

    async def finish_run(self) -> Exception | None:
        """Write metadata.jsonl for the run's jobs; its error returned, not raised."""
        if not self.sources:
            return None
        try:
            jobs = itertools.chain.from_iterable(self.sources)
            self.lines = await write_metadata(self.store, jobs, self.state, self.registry)
        except Exception as exc:  # the images are safe; the next run writes it again
            return exc
        return None
