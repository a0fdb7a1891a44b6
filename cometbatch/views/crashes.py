"""What crashes cost: the requests each run sent and never heard back about, and their resends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..costs.prices import PriceTable, format_usd, request_cost

# A job's (model, size, quality), or None when neither the ledger nor the manifest says.
JobShape = Callable[[str, str], tuple[str, str | None, str | None] | None]


@dataclass(slots=True)
class RunCrash:
    """One run's requests sent and never answered in it (they may have been billed)."""

    run_id: str
    requests: int = 0
    images: int = 0
    # Of those, how many a later run sent again: possibly billed twice.
    sent_again: int = 0
    sent_again_images: int = 0
    # Their list price (None: no request of them could be priced); and images left unpriced.
    estimated_usd: float | None = None
    unpriced_images: int = 0


class Crashes:
    """Folds a ledger's `sent` and result lines, in order, into each run's unanswered sends."""

    __slots__ = ("_lost", "_pending", "_runs")

    def __init__(self) -> None:
        # Per key: its latest send with no result after it, (run_id, images asked for).
        self._pending: dict[str, tuple[str, int]] = {}
        # (run_id, key, images, sent again) of each send a run never heard back about.
        self._lost: list[tuple[str, str, int, bool]] = []
        self._runs: list[str] = []

    def __repr__(self) -> str:
        return f"<Crashes pending={len(self._pending)} lost={len(self._lost)}>"

    def run(self, run_id: str) -> None:
        """A run started (runs are listed in ledger order)."""
        self._runs.append(run_id)

    def sent(self, run_id: str, key: str, n: int) -> None:
        """A request left; an earlier run's unanswered send of the same key is sent again."""
        earlier = self._pending.get(key)
        if earlier is not None and earlier[0] != run_id:
            self._lost.append((earlier[0], key, earlier[1], True))
        self._pending[key] = (run_id, n)

    def answered(self, key: str) -> None:
        """A result line for `key`: its latest send is answered."""
        self._pending.pop(key, None)

    def unanswered(self, live_run: str | None = None) -> dict[str, tuple[str, int]]:
        """Keys whose latest send has no result, but those of `live_run` (still in flight)."""
        return {key: sent for key, sent in self._pending.items() if sent[0] != live_run}

    def by_run(self, shape: JobShape, prices: PriceTable, live_run: str | None) -> list[RunCrash]:
        """Each run that left requests unanswered, in ledger order, priced by `shape`."""
        lost = self._lost + [
            (run, key, n, False) for key, (run, n) in self.unanswered(live_run).items()
        ]
        crashes: dict[str, RunCrash] = {}
        for run, key, n, again in lost:
            crash = crashes.setdefault(run, RunCrash(run))
            crash.requests += 1
            crash.images += n
            if again:
                crash.sent_again += 1
                crash.sent_again_images += n
            job_id = key.rpartition("#")[0]
            known = shape(key, job_id)
            cost = None if known is None else request_cost(known[0], None, n, *known[1:], prices)[0]
            if cost is None:
                crash.unpriced_images += n
            else:
                crash.estimated_usd = (crash.estimated_usd or 0.0) + cost
        order = {run: at for at, run in enumerate(self._runs)}
        return sorted(crashes.values(), key=lambda crash: order.get(crash.run_id, len(order)))


def crash_dicts(crashes: list[RunCrash]) -> list[dict[str, Any]]:
    """`status --json`'s `crashes`: each run's unanswered requests, estimated spend rounded."""
    rows = []
    for crash in crashes:
        row = asdict(crash)
        if crash.estimated_usd is not None:
            row["estimated_usd"] = round(crash.estimated_usd, 6)
        rows.append(row)
    return rows


def crash_text(crash: dict[str, Any]) -> str:
    """One run's unanswered requests for a person, from its `crash_dicts` row."""
    cost = crash["estimated_usd"]
    spent = f"about {format_usd(cost)}" if cost is not None else "price unknown"
    if crash["unpriced_images"] and cost is not None:
        spent += f", {crash['unpriced_images']} image(s) of unknown price"
    again = ""
    if crash["sent_again"]:
        again = (
            f"; {crash['sent_again']} request(s) ({crash['sent_again_images']} image(s)) sent "
            "again: possibly billed twice"
        )
    return (
        f"run {crash['run_id']} stopped with {crash['requests']} request(s) "
        f"({crash['images']} image(s)) sent and not answered ({spent}){again}"
    )
