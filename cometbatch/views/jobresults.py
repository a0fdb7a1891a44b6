"""An output folder's results per job: the latest line of each of its requests, merged."""

# A job with more images than its model takes per request has several requests (keys
# `<job_id>#<chunk>`); jobs come out in the order their last result was recorded. A job whose
# later requests were never sent shows the ones that were; a job whose n was lowered in the
# manifest the latest run names shows only the images that manifest asks for.

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import CometBatchError, LedgerError
from ..ledger.clustered import ClusterOutput, Shard, read_cluster, shard_manifest
from ..ledger.events import SHARD_EVENT, ledger_path, read_events
from ..ledger.lines import ResultEvent, RunEvent
from ..net.answered import Answered
from ..results import DOWNLOAD_FAILED, FAILED, OK, PARTIAL, add_usage
from ..store.interface import Store
from .prompts import PromptFile
from .recorded import recorded_manifest
from .scope import Scope


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(slots=True)
class JobResults:
    """One job as the ledger has it now: the latest result event of each of its requests."""

    job_id: str
    requests: dict[int, dict[str, Any]]
    # From the manifest the latest run recorded: None when it is gone or does not hold the job.
    prompt: str | None = None
    # The latest result of each request, in chunk order: sorted once, read by every property.
    events: list[dict[str, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.events = [self.requests[chunk] for chunk in sorted(self.requests)]

    @property
    def model(self) -> str | None:
        model = self.events[0].get("model")
        return model if isinstance(model, str) else None

    @property
    def n(self) -> int:
        """Images asked for across the recorded requests."""
        return sum(_count(event.get("n")) for event in self.events)

    @property
    def images(self) -> list[dict[str, Any]]:
        """Every image on disk, by index."""
        found = [
            image
            for event in self.events
            for image in event.get("images") or ()
            if isinstance(image, dict)
        ]
        return sorted(found, key=lambda image: _count(image.get("index")))

    @property
    def downloads(self) -> list[dict[str, Any]]:
        """Generated images still to be downloaded."""
        return [
            pending
            for event in self.events
            for pending in event.get("downloads") or ()
            if isinstance(pending, dict)
        ]

    @property
    def status(self) -> str:
        statuses = {event.get("status") for event in self.events}
        if statuses == {OK}:
            return OK
        if statuses <= {OK, DOWNLOAD_FAILED}:
            return DOWNLOAD_FAILED
        return PARTIAL if self.images else FAILED

    @property
    def failed_requests(self) -> int:
        return sum(event.get("status") != OK for event in self.events)

    @property
    def error(self) -> dict[str, Any] | None:
        """The first request's error that is not ok, with its `chunk`."""
        for chunk in sorted(self.requests):
            event = self.requests[chunk]
            if event.get("status") != OK:
                error = event.get("error")
                found = dict(error) if isinstance(error, dict) else _no_error(event)
                return {**found, "chunk": chunk}
        return None

    @property
    def usage(self) -> dict[str, Any] | None:
        """Token usage summed over the requests that reported it."""
        total: dict[str, Any] = {}
        for event in self.events:
            usage = event.get("usage")
            if isinstance(usage, dict):
                add_usage(total, usage)
        return total or None

    @property
    def answers(self) -> list[Answered]:
        """What each request's answer said about itself, in chunk order (empty: none kept)."""
        return [Answered.of_line(event) for event in self.events]

    @property
    def request_ids(self) -> list[str]:
        """The request ids of the answers the ledger recorded, in chunk order."""
        return [answer.request_id for answer in self.answers if answer.request_id is not None]

    @property
    def finished_at(self) -> str | None:
        stamps = [event["finished_at"] for event in self.events if event.get("finished_at")]
        return max(map(str, stamps), default=None)

    @property
    def created(self) -> int | None:
        """finished_at as Unix seconds (the `created` of an API answer)."""
        stamp = self.finished_at
        try:
            return int(datetime.fromisoformat(stamp).timestamp()) if stamp else None
        except ValueError:
            return None

    @property
    def metadata(self) -> dict[str, Any]:
        metadata = self.events[-1].get("metadata")
        return metadata if isinstance(metadata, dict) else {}

    def total(self, name: str) -> int:
        """A per-request count (attempts, ambiguous_retries) summed over the requests."""
        return sum(_count(event.get(name)) for event in self.events)

    @property
    def latency_s(self) -> float:
        values = (event.get("latency_s") for event in self.events)
        total = sum(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))
        return round(total, 3)


def _no_error(event: dict[str, Any]) -> dict[str, Any]:
    """What a line that is not ok and records no error stands for."""
    if event.get("status") != PARTIAL:
        return {"kind": "unknown"}
    # A short answer recorded before its rest was asked for (the run stopped in between).
    written = len(event.get("images") or ())
    return {
        "kind": PARTIAL,
        "message": f"{written} of {_count(event.get('n'))} image(s) so far; the next run asks "
        "for the rest",
    }


def read_jobs(out_dir: Store | str | os.PathLike[str]) -> Iterator[JobResults]:
    """Each job of OUT's ledger with the latest result of each of its requests (of every
    shard's ledger for a cluster output, its paths relative to OUT)."""
    # Two passes keep in memory only the jobs whose requests are not all read yet: the first
    # notes each job's last result line, the second emits a job on reaching it. Lines
    # appended between the passes are left for the next export.
    cluster = read_cluster(out_dir)
    if cluster is None:
        return _merged_jobs(ledger_path(out_dir))
    started = cluster.started()
    if not started:
        raise LedgerError(f"{cluster.store.root} is a cluster output no run wrote to yet")
    return _cluster_jobs(cluster, started)


def _cluster_jobs(cluster: ClusterOutput, shards: list[Shard]) -> Iterator[JobResults]:
    """Each shard's jobs in turn, prompts from the manifest lines the shard was given."""
    for shard in shards:
        with shard_manifest(cluster, shard) as lines:
            for job in _merged_jobs(ledger_path(shard.store), lines):
                requests = {chunk: _under(e, shard) for chunk, e in job.requests.items()}
                yield JobResults(job.job_id, requests, job.prompt)


def _under(event: dict[str, Any], shard: Shard) -> dict[str, Any]:
    """A shard's result line with its image paths (and packed shard names) relative to OUT."""
    images = [
        {**image, **{k: shard.under_out(image[k]) for k in ("path", "shard") if k in image}}
        if isinstance(image, dict) else image
        for image in event.get("images") or ()
    ]  # fmt: skip
    return {**event, "images": images}


def _merged_jobs(path: Path, manifest: Path | None = None) -> Iterator[JobResults]:
    last: dict[str, int] = {}
    run: dict[str, Any] = {}
    # Images a committed shard holds, by (job_id, index): where each went (shard, sample).
    packed: dict[tuple[str, Any], dict[str, str]] = {}
    end = 0
    for event in read_events(path):
        end = event.line
        where = event.where if isinstance(event, ResultEvent) else None
        if where is not None:
            last[where[0]] = event.line
            if packed:  # recorded again since it was packed: its images are staged again
                for image in event.fields.get("images") or ():
                    packed.pop((where[0], image.get("index")), None)
        elif isinstance(event, RunEvent) and event.fields.get("manifest"):
            run = event.fields
        elif event.kind == SHARD_EVENT:
            shard = str(event.fields["shard"])
            for sample in event.fields["samples"]:
                where_to = {"shard": shard, "sample": str(sample["sample"])}
                packed[(str(sample["job_id"]), sample["index"])] = where_to
    with PromptFile() as prompts:
        scope = _read_manifest(run, set(last), prompts, manifest)
        pending: dict[str, dict[int, dict[str, Any]]] = {}
        for event in read_events(path):
            if event.line > end:
                break
            where = event.where if isinstance(event, ResultEvent) else None
            if where is None:
                continue
            job_id, chunk = where
            kept = _within(event.fields, job_id, chunk, scope)
            if kept is not None and packed:
                kept = _placed(kept, job_id, packed)
            if kept is not None:
                pending.setdefault(job_id, {})[chunk] = kept
            if last.get(job_id) == event.line and job_id in pending:
                yield JobResults(job_id, pending.pop(job_id), prompts.get(job_id))
        # Only when the ledger changed between the passes (it was repaired or replaced).
        for job_id, requests in pending.items():
            yield JobResults(job_id, requests, prompts.get(job_id))


def _placed(
    event: dict[str, Any], job_id: str, packed: dict[tuple[str, Any], dict[str, str]]
) -> dict[str, Any]:
    """A result line whose images each name the shard and sample that hold it, if packed."""
    images = [
        {**image, **packed.get((job_id, image.get("index")), {})} if isinstance(image, dict)
        else image
        for image in event.get("images") or ()
    ]  # fmt: skip
    return {**event, "images": images}


def _read_manifest(
    run: dict[str, Any], recorded: set[str], prompts: PromptFile, given: Path | None = None
) -> Scope:
    """What the latest run's manifest (or `given`, read as that run read it) still asks of the
    recorded jobs; prompts into `prompts`."""
    # When it cannot be read, everything recorded counts and no prompt is known.
    scope = Scope()
    path = given or run.get("manifest")
    if not isinstance(path, str | Path):
        return scope
    try:
        manifest = recorded_manifest(run, path)
        for job in manifest:
            if job.id in recorded:
                scope.add(job, manifest.registry.get(job.model).max_n)
                prompts.add(job.id, job.prompt)
    except (CometBatchError, OSError):
        prompts.clear()
        return Scope()
    return scope


def _within(event: dict[str, Any], job_id: str, chunk: int, scope: Scope) -> dict[str, Any] | None:
    """A result line cut to what the manifest still asks (its n lowered); None: nothing."""
    n = _count(event.get("n"))
    counted = scope.images(job_id, chunk, n)
    if counted is None or counted == n:
        return None if counted is None else event

    def kept(items: Any) -> list[Any]:
        return [
            item
            for item in items or ()
            if not isinstance(item, dict) or scope.keeps_index(job_id, _count(item.get("index")))
        ]

    return {**event, "n": counted, "images": kept(event.get("images")),
            "downloads": kept(event.get("downloads"))}  # fmt: skip
