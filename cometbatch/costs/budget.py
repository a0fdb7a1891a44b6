"""Budget caps (`max_images`, `max_cost`): reserve before each send, settle when it is recorded."""

# The caps count the whole output folder: what its ledger already records as generated (and
# spent) plus this run's requests, those in flight included, so a run stopped at a cap is
# continued by running it again with a higher one.

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..ledger.events import read_events
from ..ledger.lines import ResultEvent
from ..settings import Settings
from .paid import Payments, generation_cost
from .prices import CostEstimate, PriceTable, format_usd
from .prices import request_cost as request_cost  # where the run imports the rule from

CapReason = Literal["max_images", "max_cost"]
# The reasons a budget stops a run (Summary.stopped holds one of them).
BUDGET_REASONS: frozenset[str] = frozenset({"max_images", "max_cost"})
# Float sums of prices (0.04 * 25 = 1.0000000000000002) must not cross a cap by rounding.
_SLACK = 1e-9


class Budget:
    """How much of each cap is spent and reserved; refuses a request that would cross one."""

    __slots__ = (
        "cost", "earlier_cost", "earlier_images", "images", "max_cost", "max_images",
        "reserved_cost", "reserved_images", "stopped", "unpriced",
    )  # fmt: skip

    def __init__(
        self,
        *,
        max_images: int | None = None,
        max_cost: float | None = None,
        earlier_images: int = 0,
        earlier_cost: float = 0.0,
    ) -> None:
        self.max_images = max_images
        self.max_cost = max_cost
        self.earlier_images = earlier_images
        self.earlier_cost = earlier_cost
        # Committed (recorded) figures, the folder's earlier ones included.
        self.images = earlier_images
        self.cost = earlier_cost
        # Held by requests being sent now.
        self.reserved_images = 0
        self.reserved_cost = 0.0
        # The cap that refused a request; from then on every request is refused.
        self.stopped: CapReason | None = None
        # True when max_cost refused a request it could not price.
        self.unpriced = False

    def __repr__(self) -> str:
        return (
            f"<Budget images={self.images}+{self.reserved_images}/{self.max_images} "
            f"cost={self.cost:.4f}+{self.reserved_cost:.4f}/{self.max_cost} "
            f"stopped={self.stopped}>"
        )

    def reserve(self, images: int, cost: float | None) -> CapReason | None:
        """Hold `images` and `cost` (None: unpriced) for a send; the cap it would cross, or None."""
        if self.stopped is not None:
            return self.stopped
        limit = self.max_images
        if limit is not None and self.images + self.reserved_images + images > limit:
            self.stopped = "max_images"
            return self.stopped
        if self.max_cost is not None:
            if cost is None:
                # A request without a price cannot be kept under a dollar cap.
                self.unpriced = True
                self.stopped = "max_cost"
                return self.stopped
            if self.cost + self.reserved_cost + cost > self.max_cost + _SLACK:
                self.stopped = "max_cost"
                return self.stopped
        self.reserved_images += images
        self.reserved_cost += cost or 0.0
        return None

    def settle(self, images: int, cost: float | None, made: int, spent: float) -> None:
        """Replace a reservation by what the request did: `made` images, `spent` dollars."""
        self.reserved_images -= images
        self.reserved_cost -= cost or 0.0
        self.images += made
        self.cost += spent

    def release(self, images: int, cost: float | None) -> None:
        """Give a reservation back: the request was not sent, or nothing of it is recorded."""
        self.settle(images, cost, 0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the summary (`end` event, `--json`)."""
        return {
            "max_images": self.max_images,
            "max_cost": self.max_cost,
            "images": self.images,
            "cost_usd": round(self.cost, 6),
            "earlier_images": self.earlier_images,
            "earlier_cost_usd": round(self.earlier_cost, 6),
            "stopped": self.stopped,
            "unpriced": self.unpriced,
        }


def cap_text(budget: Budget) -> str:
    """Why a budget stopped a run, for a person (the caps' figures cover the whole folder)."""
    if budget.stopped == "max_images":
        return (
            f"max_images {budget.max_images}: the next request would cross it "
            f"({budget.images} image(s) made in this folder, {budget.reserved_images} in flight)"
        )
    if budget.stopped == "max_cost":
        cap = format_usd(budget.max_cost)
        if budget.unpriced:
            return (
                f"max_cost {cap}: the next request's model, size or quality has no price, so "
                "the cap cannot bound it (give it one with --prices)"
            )
        return (
            f"max_cost {cap}: the next request would cross it (about "
            f"{format_usd(budget.cost)} spent in this folder, "
            f"{format_usd(budget.reserved_cost)} in flight)"
        )
    return "no budget cap was reached"


@dataclass(frozen=True, slots=True)
class PlanFit:
    """Whether a dry run's plan fits under the caps, as `Budget.reserve` would decide it."""

    max_images: int | None
    max_cost: float | None
    earlier_images: int
    earlier_cost: float
    send_images: int
    send_cost: float
    # Images to send without a price: a cost cap cannot bound them (the run stops at one).
    unpriced_images: int = 0

    @property
    def images_over(self) -> int:
        """Images beyond max_images (0: they fit, or no cap)."""
        if self.max_images is None:
            return 0
        return max(self.earlier_images + self.send_images - self.max_images, 0)

    @property
    def cost_over(self) -> float:
        """Dollars beyond max_cost (0: they fit, or no cap)."""
        if self.max_cost is None:
            return 0.0
        over = self.earlier_cost + self.send_cost - self.max_cost
        return over if over > _SLACK else 0.0

    @property
    def fits(self) -> bool:
        """Whether the run would send all of the plan without stopping at a cap."""
        unbounded = self.max_cost is not None and self.unpriced_images > 0
        return not (self.images_over or self.cost_over or unbounded)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `run --dry-run --json`."""
        return {
            "fits": self.fits,
            "max_images": self.max_images,
            "max_cost": self.max_cost,
            "earlier_images": self.earlier_images,
            "earlier_cost_usd": round(self.earlier_cost, 6),
            "send_images": self.send_images,
            "send_cost_usd": round(self.send_cost, 6),
            "unpriced_images": self.unpriced_images,
            "images_over": self.images_over,
            "cost_over_usd": round(self.cost_over, 6),
        }


def plan_fit(
    settings: Settings, ledger: Path, prices: PriceTable, send_images: int, send: CostEstimate
) -> PlanFit | None:
    """The plan against the caps and what `ledger` already records; None without a cap."""
    if settings.max_images is None and settings.max_cost is None:
        return None
    images, cost = earlier_totals(ledger, prices)
    return PlanFit(
        max_images=settings.max_images,
        max_cost=settings.max_cost,
        earlier_images=images,
        earlier_cost=cost,
        send_images=send_images,
        send_cost=send.usd,
        unpriced_images=send.unpriced_images,
    )


def earlier_totals(ledger: Path, prices: PriceTable) -> tuple[int, float]:
    """Images and dollars the folder's ledger records, each generation once, as `status` does."""
    payments = Payments()
    try:
        for event in read_events(ledger):
            if isinstance(event, ResultEvent):
                payments.add(event.fields)
    except FileNotFoundError:
        return 0, 0.0
    images = 0
    cost = 0.0
    for payment in payments:
        images += payment.images
        cost += generation_cost(payment, prices) or 0.0
    return images, cost


async def open_budget(settings: Settings, ledger: Path, prices: PriceTable) -> Budget | None:
    """The caps' bookkeeping from what the folder's ledger records; None when no cap is set."""
    if settings.max_images is None and settings.max_cost is None:
        return None
    # A long ledger takes a while to read: keep the event loop free meanwhile.
    images, cost = await asyncio.to_thread(earlier_totals, ledger, prices)
    return Budget(
        max_images=settings.max_images,
        max_cost=settings.max_cost,
        earlier_images=images,
        earlier_cost=cost,
    )
