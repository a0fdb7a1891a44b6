"""The shard plan of a cluster output: which shard each job lands in, and which shards are done."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..engine.forecast import forecast, ledger_verdicts
from ..errors import LedgerError, ManifestError, OutputError
from ..ledger.clustered import MANIFESTS_FOLDER as SHARD_MANIFESTS
from ..ledger.clustered import PLAN_NAME, RUNS_NAME, shard_id
from ..ledger.clustered import SHARDS_FOLDER as SHARD_OUTPUTS
from ..ledger.events import ledger_path
from ..ledger.index import LedgerState
from ..manifest.job import Job
from ..manifest.reader import Manifest, load_manifest
from ..models.registry import ModelRegistry
from ..store.interface import Store
from ..store.urls import open_store

__all__ = [
    "PLAN_NAME",
    "RUNS_NAME",
    "ShardCut",
    "ShardPlan",
    "Shards",
    "append_run",
    "cut_manifest",
    "default_shards",
    "job_line",
    "new_plan",
    "plan_shards",
    "put_shard_manifests",
    "read_plan",
    "save_plan",
    "shard_done",
    "shard_id",
    "shard_manifest_name",
    "shard_of",
    "shard_out",
]

PLAN_VERSION = 1
SHARD_RULE = "sha256(job_id) % shards"
# Jobs per shard beyond which a first run cuts more shards than 4 per worker.
JOBS_PER_SHARD = 1000
# Lines held in memory while cutting, over every shard, before they go to their files.
_BUFFERED_LINES = 50_000


def shard_of(job_id: str, shards: int) -> int:
    """The shard a job lands in: its id's sha256 as a number, modulo the shard count."""
    # Only the id decides: editing a job, or adding and removing others, never moves it.
    return int.from_bytes(hashlib.sha256(job_id.encode("utf-8")).digest(), "big") % shards


def default_shards(jobs: int, workers: int) -> int:
    """A first run's shard count: four per worker (a lost one costs little), 1,000 jobs at most."""
    return max(4 * max(workers, 1), math.ceil(jobs / JOBS_PER_SHARD), 1)


def shard_manifest_name(shard: str) -> str:
    """Where a shard's manifest lines are in OUT."""
    return f"{SHARD_MANIFESTS}/{shard}.jsonl"


def shard_out(out: Path | str, shard: str) -> Path | str:
    """A shard's own output (ledger, images) under OUT: a path, or a URL."""
    if isinstance(out, Path):
        return out / SHARD_OUTPUTS / shard
    return f"{str(out).rstrip('/')}/{SHARD_OUTPUTS}/{shard}"


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """OUT/cluster/plan.json: how many shards, fixed by the first cluster run, and its manifest."""

    shards: int
    manifest_sha256: str
    manifest: str
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        """The plan as written to plan.json."""
        return {
            "version": PLAN_VERSION,
            "shards": self.shards,
            "manifest_sha256": self.manifest_sha256,
            "manifest": self.manifest,
            "created_at": self.created_at,
            "shard_of": SHARD_RULE,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ShardPlan:
        """A plan read back; OutputError naming the file and field when it is not one."""
        if not isinstance(data, dict):
            raise OutputError(f"{where} is not a cluster plan (not a JSON object)")
        if data.get("version") != PLAN_VERSION or data.get("shard_of") != SHARD_RULE:
            raise OutputError(
                f"{where}: version {data.get('version')!r} or shard_of "
                f"{data.get('shard_of')!r} is not one this cometbatch knows"
            )
        shards = data.get("shards")
        if type(shards) is not int or shards < 1:
            raise OutputError(f"{where}: field 'shards' must be a whole number >= 1")
        return cls(
            shards=shards,
            manifest_sha256=str(data.get("manifest_sha256", "")),
            manifest=str(data.get("manifest", "")),
            created_at=str(data.get("created_at", "")),
        )


def now_text() -> str:
    """A timestamp as the ledger writes them."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_plan(manifest: Manifest, workers: int) -> ShardPlan:
    """The plan a first cluster run writes for `manifest`."""
    shards = default_shards(manifest.stats.jobs, workers)
    return ShardPlan(shards, manifest.sha256, str(manifest.path), now_text())


def read_plan(store: Store) -> ShardPlan | None:
    """OUT's plan (None: no cluster run yet); OutputError when it cannot be read."""
    where = f"{store.root.rstrip('/')}/{PLAN_NAME}"
    try:
        data = store.read(PLAN_NAME)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read {where}: {exc.strerror or exc}") from None
    try:
        return ShardPlan.from_dict(json.loads(data), where)
    except ValueError:
        raise OutputError(f"{where} is not valid JSON") from None


async def save_plan(store: Store, plan: ShardPlan) -> None:
    """Write plan.json (durably: every later run keeps its shard count)."""
    text = json.dumps(plan.to_dict(), indent=2) + "\n"
    await store.put(PLAN_NAME, text.encode(), sync=True)


def job_line(job: Job) -> str:
    """A job as one JSONL line that reads back as the same job (its id written out)."""
    data = job.model_dump(mode="json", exclude_none=True)
    for name in ("extra", "metadata"):
        if not data.get(name):
            data.pop(name, None)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


@dataclass(slots=True)
class ShardCut:
    """One shard's part of the manifest: its local file and what it asks for."""

    shard: str
    path: Path
    jobs: int = 0
    requests: int = 0
    images: int = 0


@dataclass(slots=True)
class _Cutter:
    folder: Path
    shards: int
    registry: ModelRegistry
    cuts: dict[str, ShardCut] = field(default_factory=dict)
    waiting: dict[str, list[str]] = field(default_factory=dict)
    held: int = 0

    def add(self, job: Job) -> None:
        shard = shard_id(shard_of(job.id, self.shards))
        cut = self.cuts[shard]
        cut.jobs += 1
        cut.requests += -(-job.n // self.registry.get(job.model).max_n)
        cut.images += job.n
        self.waiting.setdefault(shard, []).append(job_line(job))
        self.held += 1
        if self.held >= _BUFFERED_LINES:
            self.flush()

    def flush(self) -> None:
        # Appended in turns: 10,000 shards never hold 10,000 files open.
        for shard, lines in self.waiting.items():
            with self.cuts[shard].path.open("a", encoding="utf-8") as handle:
                handle.writelines(lines)
        self.waiting.clear()
        self.held = 0


def cut_manifest(manifest: Manifest, shards: int, folder: Path) -> dict[str, ShardCut]:
    """Each shard's jobs written to `folder`/<id>.jsonl (every shard has a file, maybe empty)."""
    cutter = _Cutter(folder, shards, manifest.registry)
    for index in range(shards):
        shard = shard_id(index)
        path = folder / f"{shard}.jsonl"
        path.write_bytes(b"")
        cutter.cuts[shard] = ShardCut(shard, path)
    for job in manifest:
        cutter.add(job)
    cutter.flush()
    return cutter.cuts


async def put_shard_manifests(store: Store, cuts: Iterable[ShardCut]) -> None:
    """Each shard's manifest into OUT (workers on any node read it there); the local files go."""
    for cut in cuts:
        # put_file moves the file: a copy stays for the done check.
        copy = cut.path.with_suffix(".put")
        copy.write_bytes(cut.path.read_bytes())
        await store.put_file(shard_manifest_name(cut.shard), os.fspath(copy))


async def append_run(store: Store, line: dict[str, Any]) -> None:
    """One line of OUT/cluster/runs.jsonl (a run's start, or its end)."""
    data = (json.dumps(line, separators=(",", ":")) + "\n").encode()

    def write() -> None:
        log = store.open_log(RUNS_NAME, sync=False)
        try:
            log.append(data, True)
        finally:
            log.close(True)

    await asyncio.to_thread(write)


def shard_done(store: Store, cut: ShardCut, registry: ModelRegistry) -> bool:
    """Whether the shard's ledger has every planned key of its manifest ok (nothing to send)."""
    if cut.jobs == 0:
        return True
    try:
        state = LedgerState.load(ledger_path(store))
    except LedgerError:
        return False  # never run, or a ledger the run itself will report on
    try:
        jobs = load_manifest(cut.path, registry=registry)
    except ManifestError:
        return False
    totals = forecast(jobs, ledger_verdicts(registry, state.get)).totals()
    return totals.requests == totals.done_requests


@dataclass(frozen=True, slots=True)
class Shards:
    """A run's shards: the plan, each shard's part of the manifest, and the ones done already."""

    plan: ShardPlan
    cuts: dict[str, ShardCut]
    done: frozenset[str]
    # Whether the plan was made now (no cluster run had written one).
    new: bool

    def to_run(self) -> list[str]:
        """The shards a run starts a task for, in order: not done, with jobs."""
        return [s for s in sorted(self.cuts) if s not in self.done and self.cuts[s].jobs]


async def plan_shards(
    manifest: Manifest,
    root: Store,
    out: Path | str,
    workers: int,
    options: Mapping[str, Any] | None = None,
    *,
    write: bool = True,
) -> Shards:
    """Cut the manifest by OUT's plan (made now for `workers` if none); with `write`, the plan
    and each shard's manifest go into OUT."""
    plan = await asyncio.to_thread(read_plan, root)
    new = plan is None
    if plan is None:
        plan = new_plan(manifest, workers)
        if write:
            await save_plan(root, plan)
    with tempfile.TemporaryDirectory(prefix="cometbatch-shards-") as folder:
        cuts = await asyncio.to_thread(cut_manifest, manifest, plan.shards, Path(folder))

        def done() -> frozenset[str]:
            return frozenset(
                shard
                for shard, cut in cuts.items()
                if shard_done(open_store(shard_out(out, shard), options), cut, manifest.registry)
            )

        finished = await asyncio.to_thread(done)
        if write:
            await put_shard_manifests(root, cuts.values())
    return Shards(plan, cuts, finished, new)
