"""Pure planning: a job becomes requests of at most the model's n, with keys and fingerprints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from .manifest.job import Job
from .models.spec import ModelSpec


def request_key(job_id: str, chunk: int) -> str:
    """The ledger key of a job's request: `<job_id>#<chunk>` (contract)."""
    return f"{job_id}#{chunk}"


@dataclass(frozen=True, slots=True)
class Request:
    """One API call: images first_index .. first_index + n - 1 of its job."""

    job: Job
    chunk: int
    n: int
    first_index: int
    payload: dict[str, Any]
    fingerprint: str

    @property
    def key(self) -> str:
        """The ledger key, `<job_id>#<chunk>`."""
        return request_key(self.job.id, self.chunk)

    @property
    def indexes(self) -> range:
        """The job-wide image indexes this request fills."""
        return range(self.first_index, self.first_index + self.n)


# One encoder for every request: json.dumps with options would build a new one per call.
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable digest of exactly what is sent (key order and spacing do not matter)."""
    return hashlib.sha256(_CANONICAL.encode(payload).encode()).hexdigest()[:16]


def build_payload(job: Job, spec: ModelSpec, n: int) -> dict[str, Any]:
    """The JSON body for `n` images: only parameters the model accepts, extra passed through."""
    payload: dict[str, Any] = {"model": job.model, "prompt": job.prompt}
    # n=1 is every API's default; leaving it out keeps strict providers happy.
    if n > 1:
        payload["n"] = n
    for name, value in job.params().items():
        if spec.accepts(name):
            payload[name] = value
    payload.update(job.extra)
    return payload


def chunk_sizes(n: int, max_n: int) -> list[int]:
    """Split n images into requests of at most max_n (the last one may be smaller)."""
    full, rest = divmod(n, max_n)
    return [max_n] * full + ([rest] if rest else [])


def remainder(request: Request, done: int) -> Request:
    """The follow-up to `request` once `done` of its images came: the missing count, asked
    for under the same key and fingerprint, continuing the job's image indexes."""
    if not 0 <= done < request.n:
        raise ValueError(f"{done} of {request.n} images leaves no remainder to ask for")
    return part(request, request.first_index + done, request.n - done)


def part(request: Request, first_index: int, n: int) -> Request:
    """Images first_index .. first_index + n - 1 of `request`, asked for under its key and
    fingerprint (a follow-up for the images it still misses)."""
    if n < 1 or first_index < request.first_index or first_index + n > request.indexes.stop:
        raise ValueError(f"images {first_index}..{first_index + n - 1} are not of {request.key}")
    if n == request.n:
        return request
    payload = {key: value for key, value in request.payload.items() if key != "n"}
    # n=1 is left out as build_payload leaves it out; any other n is the count asked for.
    if n > 1:
        payload["n"] = n
    return replace(request, n=n, first_index=first_index, payload=payload)


def plan_job(job: Job, spec: ModelSpec) -> Iterator[Request]:
    """The requests for one job, in chunk order."""
    first = 0
    for chunk, size in enumerate(chunk_sizes(job.n, spec.max_n)):
        payload = build_payload(job, spec, size)
        yield Request(job, chunk, size, first, payload, fingerprint(payload))
        first += size
