"""The gallery's page model: the figures, failures and chart buckets the page shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...manifest.job import JobDefaults
from ..crashes import RunCrash

GALLERY_NAME = "index.html"
# A page past this many figures is too slow to be usable; the newest results are kept.
MAX_TILES = 50_000
MAX_EXAMPLES = 5
# What a figure says in place of an image reached through a symbolic link.
LINKED = "behind a symbolic link"


@dataclass(frozen=True, slots=True)
class JobText:
    """What the manifest says about a job (the ledger does not record the prompt or size)."""

    prompt: str
    size: str | None = None
    position: int = 0  # the job's place in the manifest


@dataclass(frozen=True, slots=True)
class Tile:
    """One figure of the contact sheet: an image on disk, or a request that has none."""

    job_id: str
    model: str
    status: str  # "ok" for an image on disk; else the request's status (a placeholder)
    index: int | None = None
    path: str | None = None
    revised_prompt: str | None = None
    n: int = 0  # images a placeholder stands for
    reason: str = ""  # a placeholder's failure kind


@dataclass(frozen=True, slots=True)
class Failure:
    """The latest outcome of a request key that is not ok, with its error."""

    key: str
    job_id: str
    model: str
    kind: str
    message: str
    status: int | None = None
    code: str = ""
    request_id: str = ""
    finished_at: str = ""


@dataclass(slots=True)
class Bucket:
    """What happened in one slice of time, counted from the result lines that finished in it."""

    start: float  # seconds since the epoch
    images: int = 0
    retries: int = 0
    throttled: int = 0  # 429 answers of the requests that finished in it
    failed: int = 0


@dataclass(slots=True)
class Gallery:
    """Everything the page shows."""

    title: str
    tiles: list[Tile] = field(default_factory=list)
    jobs: dict[str, JobText] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    bucket_s: int = 60
    runs: int = 0
    simulated: bool = False
    # 429 answers: counted per result line (older ledgers: the ended runs' summaries).
    rate_limited: int = 0
    # Whether every result line counts its 429s (else the chart shows final 429s only).
    per_result_429s: bool = True
    retries: int = 0
    first_at: str | None = None
    last_at: str | None = None
    # The manifest of the latest run that names one, as that run recorded it.
    manifest: str | None = None
    manifest_sha256: str | None = None
    # That run's recorded settings: its models file and model overrides read the manifest.
    run_settings: dict[str, Any] = field(default_factory=dict)
    # The --model/--size/--n of the run that recorded the manifest.
    defaults: JobDefaults = field(default_factory=JobDefaults)
    manifest_note: str = ""
    dropped_tiles: int = 0
    # Each run's requests sent and never answered (a crash or a hard stop), as status counts.
    crashes: list[RunCrash] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        """The models present, sorted."""
        return sorted({tile.model for tile in self.tiles})

    @property
    def image_count(self) -> int:
        """Images on disk that the page shows."""
        return sum(tile.status == "ok" for tile in self.tiles)

    def failure_groups(self) -> list[tuple[str, int, list[Failure]]]:
        """(kind, count, first examples) per failure kind, the most frequent first."""
        groups: dict[str, list[Failure]] = {}
        for failure in self.failures:
            groups.setdefault(failure.kind, []).append(failure)
        ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
        return [(kind, len(items), items[:MAX_EXAMPLES]) for kind, items in ordered]
