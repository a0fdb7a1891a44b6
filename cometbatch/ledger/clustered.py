"""A cluster run's output: OUT/cluster/plan.json and one ordinary output per shard under
OUT/shards/<id>/; the one place the views learn whether OUT is one and which shards it has."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LedgerError, OutputError
from ..store.interface import Store
from ..store.urls import store_of
from .events import LEDGER_NAME

__all__ = [
    "PLAN_NAME",
    "RUNS_NAME",
    "SHARDS_FOLDER",
    "ClusterOutput",
    "Shard",
    "local_copy",
    "read_cluster",
    "refuse_cluster_output",
    "shard_id",
    "shard_manifest",
]

# Written once by the first cluster run: {"version", "shards", "manifest", "manifest_sha256",
# "created_at", "shard_of"}; later runs keep its number of shards.
PLAN_NAME = "cluster/plan.json"
# One line per cluster run (run_id, manifest_sha256, started/finished, shards, workers, ...).
RUNS_NAME = "cluster/runs.jsonl"
# Each shard's manifest lines, as the driver cut them.
MANIFESTS_FOLDER = "cluster/shards"
# Each shard's output: its own lock, ledger, images and metadata.
SHARDS_FOLDER = "shards"
_LOOKERS = 8


def shard_id(index: int) -> str:
    """A shard's name: its number, five digits, zero padded."""
    return f"{index:05d}"


@dataclass(frozen=True, slots=True)
class Shard:
    """One shard of a cluster output: an ordinary output of its own, under OUT/shards/<id>."""

    id: str
    store: Store

    @property
    def folder(self) -> str:
        """Where the shard is, relative to OUT."""
        return f"{SHARDS_FOLDER}/{self.id}"

    @property
    def manifest_name(self) -> str:
        """The shard's manifest lines, relative to OUT."""
        return f"{MANIFESTS_FOLDER}/{self.id}.jsonl"

    def under_out(self, path: str) -> str:
        """A path relative to the shard as a path relative to OUT."""
        return f"{self.folder}/{path}"

    def has_ledger(self) -> bool:
        """Whether a run wrote to this shard yet."""
        return self.store.has_log(LEDGER_NAME)


@dataclass(frozen=True, slots=True)
class ClusterOutput:
    """OUT of a cluster run: its plan and every planned shard, in order."""

    store: Store
    plan: dict[str, Any]
    shards: tuple[Shard, ...]

    @property
    def manifest(self) -> str | None:
        """The manifest the first cluster run was given, as it named it."""
        value = self.plan.get("manifest")
        return value if isinstance(value, str) and value else None

    @property
    def manifest_sha256(self) -> str | None:
        value = self.plan.get("manifest_sha256")
        return value if isinstance(value, str) and value else None

    def started(self) -> list[Shard]:
        """The shards a run wrote to (a shard not reached yet has no ledger)."""
        # A few at a time: on an object store each look is a round trip.
        with ThreadPoolExecutor(_LOOKERS, thread_name_prefix="cometbatch-shards") as pool:
            found = list(pool.map(Shard.has_ledger, self.shards))
        return [shard for shard, started in zip(self.shards, found, strict=True) if started]

    def runs(self) -> int:
        """How many cluster runs OUT recorded (0 when none recorded it)."""
        try:
            text = self.store.read(RUNS_NAME).decode("utf-8", "replace")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines() if line.strip())


def read_cluster(out: Store | str | os.PathLike[str]) -> ClusterOutput | None:
    """OUT as a cluster output, or None when it is an ordinary one (no plan)."""
    store = store_of(out)
    try:
        raw = store.read(PLAN_NAME)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        # No plan (OUT, or a folder on its way, may not even be a folder: its owner says so).
        return None
    except OSError as exc:
        raise OutputError(f"cannot read {store.root}/{PLAN_NAME}: {exc.strerror or exc}") from exc
    where = f"{store.root}/{PLAN_NAME}"
    try:
        plan = json.loads(raw)
    except ValueError as exc:
        raise LedgerError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(plan, dict):
        raise LedgerError(f"{where} is not a cluster plan (a JSON object)")
    count = plan.get("shards")
    if type(count) is not int or count < 1:
        raise LedgerError(f"{where}: 'shards' must be a whole number of at least 1")
    shards = tuple(
        Shard(name, store.within(f"{SHARDS_FOLDER}/{name}")) for name in map(shard_id, range(count))
    )
    return ClusterOutput(store, plan, shards)


def refuse_cluster_output(store: Store) -> None:
    """One machine's run refuses OUT of a cluster run: it would send again what the shards made."""
    # Only looked at, not read: opening an output costs no object read.
    try:
        planned = store.stat(PLAN_NAME).is_file
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise OutputError(f"cannot read {store.root}/{PLAN_NAME}: {exc.strerror or exc}") from exc
    if planned:
        raise ConfigError(
            f"{store.root} is a cluster run's output ({PLAN_NAME}): run it again with --ray "
            "(or cometbatch.cluster.run_on_ray), or give another --out"
        )


@contextlib.contextmanager
def shard_manifest(cluster: ClusterOutput, shard: Shard) -> Iterator[Path | None]:
    """A local file holding the shard's manifest lines (None when there are none), for the
    span of a `with` block: the store's own file on a disk, else a temporary copy."""
    with local_copy(cluster.store, shard.manifest_name) as path:
        yield path


@contextlib.contextmanager
def local_copy(store: Store, name: str) -> Iterator[Path | None]:
    """`name` of the store as a local file (None when it is not there) for a `with` block:
    the store's own file on a disk, else a temporary copy."""
    if store.local_folder is not None:
        path = Path(store.local_folder, *name.split("/"))
        yield path if path.is_file() else None
        return
    try:
        data = store.read(name)
    except FileNotFoundError:
        yield None
        return
    stem = name.rpartition("/")[2].partition(".")[0]
    handle, temp = tempfile.mkstemp(prefix=f"cometbatch-{stem}-", suffix=".jsonl")
    try:
        with os.fdopen(handle, "wb") as copy:
            copy.write(data)
        yield Path(temp)
    finally:
        os.unlink(temp)
