"""What an output folder paid for: each generation its ledger records, counted once; its cost."""

# `status` (spend) and the budget caps (their earlier figures) both count from here. A line
# that continues a generation (the rest of a partial key, a download tried again, images put
# back) carries its whole figures and replaces it; any other paid line is a new payment, and
# images taken out of ok (set aside, found missing or damaged) stay paid for.

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..results import PAID
from ..store.setaside import withdrawal
from .prices import PriceTable, request_cost

# A line's place in a key's history when it took the key's images out of ok.
WITHDRAWN = "withdrawn"


@dataclass(frozen=True, slots=True)
class Payment:
    """One generation of a key: what its latest line records of it."""

    key: str
    job_id: str
    model: str
    fingerprint: str | None
    # Images generated (written, or still to download).
    images: int
    usage: Any
    # The line's `cost` object (None: written before lines recorded their cost).
    cost: Mapping[str, Any] | None

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> Payment:
        """The generation a paid result line records."""
        return cls(
            key=str(event.get("key")),
            job_id=str(event.get("job_id")),
            model=str(event.get("model")),
            fingerprint=event.get("fingerprint"),
            images=len(event.get("images") or ()) + len(event.get("downloads") or ()),
            usage=event.get("usage"),
            cost=_mapping(event.get("cost")),
        )

    @classmethod
    def withdrawn_by(cls, event: Mapping[str, Any], taken: Mapping[str, Any]) -> Payment:
        """The generation a line took out of ok (`taken`), its key's earlier lines gone."""
        return cls(
            key=str(event.get("key")),
            job_id=str(event.get("job_id")),
            model=str(taken.get("model")),
            fingerprint=taken.get("fingerprint"),
            images=len(taken.get("images") or ()),
            usage=taken.get("usage"),
            cost=_mapping(taken.get("cost")),
        )


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


class Payments:
    """Folds a ledger's result lines, in order, into the generations they paid for."""

    __slots__ = ("_closed", "_open")

    def __init__(self) -> None:
        self._closed: list[Payment] = []
        # Per key: its current generation (None: none yet), the status of its last line
        # (WITHDRAWN for a line that took images out of ok or carries them on) and that
        # line's run.
        self._open: dict[str, tuple[Payment | None, str, object]] = {}

    def __repr__(self) -> str:
        return f"<Payments keys={len(self._open)} earlier={len(self._closed)}>"

    def __iter__(self) -> Iterator[Payment]:
        yield from self._closed
        for payment, _, _ in self._open.values():
            if payment is not None:
                yield payment

    def add(self, event: dict[str, Any]) -> None:
        """Fold one result line (lines of other events are for the caller to leave out)."""
        key = str(event.get("key"))
        current, last, last_run = self._open.get(key, (None, "", None))
        status = event.get("status")
        run = event.get("run_id")
        taken = withdrawal(event)
        if taken is not None:
            # The images stay paid for: the line only moves them out of ok.
            self._open[key] = (current or Payment.withdrawn_by(event, taken), WITHDRAWN, run)
            return
        if status not in PAID:
            self._open[key] = (current, str(status), run)
            return
        if current is not None and not _continues(current, last, last_run, event):
            self._closed.append(current)
        self._open[key] = (Payment.of(event), str(status), run)


def _continues(current: Payment, last: str, last_run: object, event: Mapping[str, Any]) -> bool:
    """Whether a paid line carries on the key's current generation instead of a new one."""
    # `last`, `last_run`: the key's previous line; a continuing line's figures include it.
    if event.get("fingerprint") != current.fingerprint:
        return False  # another request: the job changed
    if last == "partial":
        return True  # the rest of it, added to what it had
    if event.get("attempts") == 0:
        return True  # nothing was sent: a download tried again, or images put back
    # Images put back after a request under the key failed (its line carried them on). A
    # regeneration sets the images aside in its own run, right before it sends.
    return last == WITHDRAWN and event.get("run_id") != last_run


def generation_cost(
    payment: Payment,
    prices: PriceTable,
    size: str | None = None,
    quality: str | None = None,
) -> float | None:
    """What a generation cost: as its line recorded it, else by `request_cost`; None: no price."""
    # Lines written before results recorded their cost are priced at `size` and `quality`.
    if payment.cost is None:
        usage, images = payment.usage, payment.images
        return request_cost(payment.model, usage, images, size, quality, prices)[0]
    usd = payment.cost.get("usd")
    if usd is None:
        return None  # recorded as unpriced
    if isinstance(usd, int | float) and not isinstance(usd, bool) and math.isfinite(usd):
        return float(usd)
    return 0.0  # a hand-edited figure that is no number
