"""What a manifest still asks of the requests a ledger recorded (pure).

Lowering a job's n in the manifest leaves its earlier results in the ledger: the chunks past
the new n, and in a request that held more images, the indexes past it. Status and export
count only what the manifest asks for; jobs the manifest does not hold count as recorded.
"""

from __future__ import annotations

from ..manifest.job import Job
from ..plan import chunk_sizes


class Scope:
    """The recorded jobs a manifest holds, each with its n and its model's images a request."""

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"<Scope jobs={len(self._jobs)}>"

    def clear(self) -> None:
        """Forget every job: everything recorded counts."""
        self._jobs.clear()

    def add(self, job: Job, max_n: int) -> None:
        """Take in a manifest job as planned with `max_n` images a request."""
        self._jobs[job.id] = (job.n, max_n)

    def images(self, job_id: str, chunk: int, recorded: int) -> int | None:
        """How many of a request's `recorded` images (or its n) count: None when the manifest
        no longer plans the request, at most the images it plans for it, else all of them."""
        held = self._jobs.get(job_id)
        if held is None:
            return recorded
        sizes = chunk_sizes(*held)
        if not 0 <= chunk < len(sizes):
            return None
        return min(recorded, sizes[chunk])

    def keeps_index(self, job_id: str, index: int) -> bool:
        """Whether the manifest still asks for the job's image `index` (0-based, job-wide)."""
        held = self._jobs.get(job_id)
        return held is None or index < held[0]
