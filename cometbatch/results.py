"""What a run produces: one Result per request, and a Summary of the whole run."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .manifest.jobs import Job
from .net.answered import Answered
from .net.pace import Pace
from .plan import Request, request_key
from .store.sink import ImageRecord

if TYPE_CHECKING:
    from .costs.budget import Budget

# Result statuses. A download that failed after its image was generated (and paid for) is
# not a failed generation: its URL is kept so the download alone can be tried again.
OK = "ok"
FAILED = "failed"
DOWNLOAD_FAILED = "download_failed"
# Fewer images came than were asked for: those are recorded (paid for), the rest is asked for
# under the same key. The key's next line lists every image so far (ok, or partial again).
PARTIAL = "partial"
# Statuses of a line whose images were generated (paid for), on disk or still to download.
PAID = frozenset({OK, DOWNLOAD_FAILED, PARTIAL})
# Statuses of a line that may list generated images still to download.
WITH_DOWNLOADS = frozenset({DOWNLOAD_FAILED, PARTIAL})


def add_usage(total: dict[str, Any], usage: dict[str, Any]) -> None:
    """Add one answer's usage into `total`: numbers summed, objects merged."""
    for key, value in usage.items():
        have = total.get(key)
        if isinstance(value, dict):
            if not isinstance(have, dict):
                have = total[key] = {}
            add_usage(have, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(have, int | float) and not isinstance(have, bool):
                total[key] = have + value
            elif key not in total:
                total[key] = value
        else:
            total.setdefault(key, value)


@dataclass(frozen=True, slots=True)
class PendingDownload:
    """A generated image whose download has not succeeded yet (its temporary URL)."""

    index: int
    url: str
    revised_prompt: str | None = None
    # Runs whose downloads of the link failed, and when the first did (about when the image
    # was generated): past a bound on either, the link is given up (see resume.LINK_TRIES).
    tries: int = 0
    first_failed_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ledger's `downloads` entry."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one request (`key` = `<job_id>#<chunk>`), as written to the ledger."""

    run_id: str
    job: Job
    chunk: int
    n: int
    status: str
    fingerprint: str
    images: tuple[ImageRecord, ...] = ()
    attempts: int = 0
    ambiguous_retries: int = 0
    error: dict[str, Any] | None = None
    latency_s: float = 0.0
    finished_at: str = ""
    usage: dict[str, Any] | None = None
    # Images generated but not downloaded yet (status download_failed).
    downloads: tuple[PendingDownload, ...] = ()
    # True when the ledger already held this key as ok and nothing was sent.
    reused: bool = False
    # 429 answers this request met on its way (retried ones included).
    rate_limited: int = 0
    # What it cost (None: no price known) and how that was found: "usage" tokens, "list"
    # price per image, "none" (nothing generated), "unpriced".
    cost_usd: float | None = 0.0
    cost_basis: str = "none"
    # What the answer that brought the images said about itself (request id, size, ...).
    answered: Answered | None = None

    @classmethod
    def of(cls, request: Request, run_id: str, status: str, **fields: Any) -> Result:
        """The result of `request`, with the request's own fields filled in."""
        return cls(
            run_id=run_id,
            job=request.job,
            chunk=request.chunk,
            n=request.n,
            status=status,
            fingerprint=request.fingerprint,
            **fields,
        )

    @property
    def key(self) -> str:
        """The ledger key of this request."""
        return request_key(self.job.id, self.chunk)

    @property
    def ok(self) -> bool:
        """Whether every image of this request is on disk."""
        return self.status == OK

    def to_event(self) -> dict[str, Any]:
        """The ledger's result event (contract field names, no secrets)."""
        return {
            "event": "result",
            "run_id": self.run_id,
            "key": self.key,
            "job_id": self.job.id,
            "chunk": self.chunk,
            "status": self.status,
            "fingerprint": self.fingerprint,
            "model": self.job.model,
            "n": self.n,
            "images": [image.to_dict() for image in self.images],
            "downloads": [pending.to_dict() for pending in self.downloads],
            "attempts": self.attempts,
            "ambiguous_retries": self.ambiguous_retries,
            "rate_limited": self.rate_limited,
            "error": self.error,
            "latency_s": round(self.latency_s, 3),
            "finished_at": self.finished_at,
            "usage": self.usage,
            # Only what the answer gave: a line without them reads as before.
            **(self.answered.line_fields() if self.answered else {}),
            "cost": {
                "usd": None if self.cost_usd is None else round(self.cost_usd, 6),
                "basis": self.cost_basis,
            },
            "metadata": self.job.metadata,
        }


@dataclass(slots=True)
class Summary:
    """Counts for a whole run; `complete` means every planned image is on disk."""

    run_id: str = ""
    simulated: bool = False
    planned_requests: int = 0
    planned_images: int = 0
    skipped_requests: int = 0
    skipped_images: int = 0
    ok_requests: int = 0
    failed_requests: int = 0
    images_written: int = 0
    failed_images: int = 0
    # Permanent failures from earlier runs that this run did not try again.
    kept_failures: int = 0
    # Requests whose job changed since the ledger recorded it, regenerated on request.
    regenerated_requests: int = 0
    # Requests generated again because an image their ok line names was gone or damaged, and
    # images recorded again without a request (found whole where they had been set aside).
    regenerated_missing: int = 0
    restored_images: int = 0
    retries: int = 0
    ambiguous_retries: int = 0
    rate_limited: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    interrupted: bool = False
    # Requests cut off after they were sent by a hard stop (second Ctrl-C): maybe billed,
    # not recorded, so the next run sends them again.
    cut_off_requests: int = 0
    stopped: str | None = None
    # Requests the built-in simulator answered (only when the run was simulated).
    simulator_requests: int | None = None
    # What this run's requests cost (list-price estimates, usage tokens where answered),
    # and images generated without a known price.
    spent_usd: float = 0.0
    unpriced_images: int = 0
    # The caps and how much of them is used, when Settings set any.
    budget: Budget | None = None
    # The rate sent over the run against rpm/ipm, and what held it back (set at the end).
    pace: Pace | None = None

    def add(self, result: Result, *, paid: bool = True, written_before: int = 0) -> None:
        """Count one finished request (`paid`: its cost was paid by this run;
        `written_before`: how many of its images an earlier run wrote)."""
        written = max(len(result.images) - written_before, 0)
        if result.ok:
            self.ok_requests += 1
            self.images_written += written
        elif result.status == PARTIAL and result.error is None:
            # Stopped before the rest was asked for: its images are in, the request pending.
            self.images_written += written
        else:
            self.failed_requests += 1
            # A download_failed request wrote some of its images; the rest are the failures.
            self.images_written += written
            self.failed_images += result.n - len(result.images)
            kind = (result.error or {}).get("kind", "unknown")
            self.failures[str(kind)] += 1
        self.retries += max(result.attempts - 1, 0)
        self.ambiguous_retries += result.ambiguous_retries
        if paid:
            self.pay(result.cost_usd, len(result.images) + len(result.downloads))

    def pay(self, cost: float | None, images: int) -> None:
        """Count what this run paid for `images` generated (cost None: not priced)."""
        if cost is None:
            self.unpriced_images += images
        else:
            self.spent_usd += cost

    @property
    def pending_requests(self) -> int:
        """Planned requests neither finished nor skipped (interrupted or stopped early)."""
        done = self.skipped_requests + self.ok_requests + self.failed_requests + self.kept_failures
        return max(self.planned_requests - done, 0)

    @property
    def complete(self) -> bool:
        """Every planned image is present (nothing failed, nothing left pending)."""
        return (
            self.failed_requests == 0
            and self.kept_failures == 0
            and self.pending_requests == 0
            and not self.interrupted
            and self.stopped is None
        )

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain data (the ledger's end event and `--json`)."""
        return {
            "run_id": self.run_id,
            "simulated": self.simulated,
            "complete": self.complete,
            "planned_requests": self.planned_requests,
            "planned_images": self.planned_images,
            "skipped_requests": self.skipped_requests,
            "skipped_images": self.skipped_images,
            "ok_requests": self.ok_requests,
            "failed_requests": self.failed_requests,
            "pending_requests": self.pending_requests,
            "images_written": self.images_written,
            "failed_images": self.failed_images,
            "kept_failures": self.kept_failures,
            "regenerated_requests": self.regenerated_requests,
            "regenerated_missing": self.regenerated_missing,
            "restored_images": self.restored_images,
            "retries": self.retries,
            "ambiguous_retries": self.ambiguous_retries,
            "rate_limited": self.rate_limited,
            "failures": dict(self.failures),
            "elapsed_s": round(self.elapsed_s, 3),
            "interrupted": self.interrupted,
            "cut_off_requests": self.cut_off_requests,
            "stopped": self.stopped,
            "simulator_requests": self.simulator_requests,
            "spent_usd": round(self.spent_usd, 6),
            "unpriced_images": self.unpriced_images,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "pace": self.pace.to_dict() if self.pace is not None else None,
        }
