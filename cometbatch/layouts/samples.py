"""What a shard holds, decided without I/O: which staged requests, each sample's key and record."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..ledger.events import SHARD_EVENT, now_iso
from ..manifest.job import Job

__all__ = [
    "SHARDS",
    "Staged",
    "choose",
    "sample_entry",
    "sample_key",
    "sample_record",
    "shard_event",
    "shard_name",
    "shard_number",
    "shard_stats",
    "stats_name",
]

# The folder under OUT that holds the shards and their stats.
SHARDS = "shards"
_SUFFIX = {"webdataset": "tar", "parquet": "parquet"}


@dataclass(frozen=True, slots=True)
class Staged:
    """An ok request whose images wait in staging (images/) for a shard, with its job."""

    key: str
    job: Job
    # The ledger's image objects (index, path, format, bytes, sha256, revised_prompt).
    images: tuple[Mapping[str, Any], ...]
    usage: Any = None
    cost: float | None = None


def shard_name(number: int, layout: str) -> str:
    """`shards/NNNNN.tar` or `shards/NNNNN.parquet`."""
    return f"{SHARDS}/{number:05d}.{_SUFFIX[layout]}"


def stats_name(number: int) -> str:
    """`shards/NNNNN_stats.json`."""
    return f"{SHARDS}/{number:05d}_stats.json"


def shard_number(name: str) -> int | None:
    """The number of a shard or stats name (`shards/00012.tar` -> 12); None for others."""
    stem = name.rpartition("/")[2].partition(".")[0].removesuffix("_stats")
    return int(stem) if stem.isdigit() else None


def sample_key(number: int, position: int) -> str:
    """A sample's key: shard number and position, digits only (webdataset splits at a dot)."""
    # As img2dataset numbers its samples: unique in the dataset, sorted as packed.
    return f"{number:05d}{position:05d}"


def choose(pending: Iterable[Staged], size: int) -> list[Staged]:
    """The staged requests of the next shard: whole requests, in order, up to `size` images."""
    # One request larger than `size` makes a shard of its own.
    chosen: list[Staged] = []
    count = 0
    for staged in pending:
        if chosen and count + len(staged.images) > size:
            break
        chosen.append(staged)
        count += len(staged.images)
    return chosen


def sample_record(
    staged: Staged, image: Mapping[str, Any], key: str, dims: tuple[int, int] | None
) -> dict[str, Any]:
    """A sample's record (the webdataset `<key>.json`; the source of a parquet row)."""
    job = staged.job
    cost = staged.cost / len(staged.images) if staged.cost is not None else None
    return {
        "key": key,
        "job_id": job.id,
        "index": image["index"],
        "request": staged.key,
        "prompt": job.prompt,
        "model": job.model,
        "parameters": job.params(),
        "metadata": job.metadata,
        "revised_prompt": image.get("revised_prompt"),
        "usage": staged.usage,
        # The request's cost shared evenly by its images.
        "cost": None if cost is None else round(cost, 6),
        "format": image["format"],
        "bytes": image["bytes"],
        "sha256": image["sha256"],
        "width": dims[0] if dims else None,
        "height": dims[1] if dims else None,
    }


def shard_stats(
    name: str,
    layout: str,
    records: Sequence[Mapping[str, Any]],
    skipped: int,
    timing: tuple[float, float],
) -> dict[str, Any]:
    """img2dataset-style stats of one shard (`NNNNN_stats.json`)."""
    start, end = timing
    return {
        "shard": name,
        "layout": layout,
        "count": len(records) + skipped,
        "successes": len(records),
        "failed_to_read": skipped,
        "status_dict": {"success": len(records), **({"missing": skipped} if skipped else {})},
        "bytes": sum(int(r["bytes"]) for r in records),
        "start_time": start,
        "end_time": end,
        "duration": round(end - start, 3),
    }


def sample_entry(record: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A sample as its shard's ledger line lists it: the request and staging path it came from."""
    return {
        "sample": record["key"],
        "key": record["request"],
        "job_id": record["job_id"],
        "index": record["index"],
        "path": path,
        "format": record["format"],
        "sha256": record["sha256"],
    }


def shard_event(
    run_id: str, name: str, layout: str, entries: list[dict[str, Any]], size: int, digest: str
) -> dict[str, Any]:
    """The ledger line that commits a shard (its samples as `sample_entry` gives them)."""
    return {
        "event": SHARD_EVENT,
        "run_id": run_id,
        "layout": layout,
        "shard": name,
        "stats": stats_name(shard_number(name) or 0),
        "count": len(entries),
        "bytes": size,
        "sha256": digest,
        "finished_at": now_iso(),
        "samples": entries,
    }
