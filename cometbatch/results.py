"""What a run produces: one Result per request, and a Summary of the whole run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .manifest.job import Job
from .net.answered import Answered
from .plan import Request, request_key

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
class ImageRecord:
    """One image written to disk, as the ledger's `images` list records it."""

    index: int
    path: str
    format: str
    bytes: int
    sha256: str
    revised_prompt: str | None = None
    # The (redacted) link the image was downloaded from; None for an image that came inline.
    # While the link works, a run downloads a lost image again instead of generating it.
    url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ledger's image object (the fields, in order; `url` only when there is one)."""
        # Spelled out: dataclasses.asdict deep-copies generically, a cost paid per image.
        image = {
            "index": self.index,
            "path": self.path,
            "format": self.format,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "revised_prompt": self.revised_prompt,
        }
        if self.url is not None:
            image["url"] = self.url
        return image


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
