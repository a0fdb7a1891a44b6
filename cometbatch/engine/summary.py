"""A whole run's counts: what was planned, sent, kept, paid for, and how it went."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..net.pace import Pace
from ..results import PARTIAL, Result

if TYPE_CHECKING:
    from ..costs.budget import Budget


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
    # Requests (and their images) earlier runs sent and never heard back about, found at
    # start; those of them this run sent again (possibly billed twice) or held back.
    earlier_unanswered: tuple[int, int] = (0, 0)
    resent_unanswered: int = 0
    resent_unanswered_images: int = 0
    held_unanswered: int = 0
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
        """Count one finished request (`paid`: by this run; `written_before`: by earlier ones)."""
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
    def possibly_billed_twice(self) -> int:
        """Requests sent again that an earlier attempt may have been billed for."""
        return self.ambiguous_retries + self.resent_unanswered

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
            "earlier_unanswered": {
                "requests": self.earlier_unanswered[0],
                "images": self.earlier_unanswered[1],
            },
            "resent_unanswered": {
                "requests": self.resent_unanswered,
                "images": self.resent_unanswered_images,
            },
            "held_unanswered": self.held_unanswered,
            "possibly_billed_twice": self.possibly_billed_twice,
            "stopped": self.stopped,
            "simulator_requests": self.simulator_requests,
            "spent_usd": round(self.spent_usd, 6),
            "unpriced_images": self.unpriced_images,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "pace": self.pace.to_dict() if self.pace is not None else None,
        }
