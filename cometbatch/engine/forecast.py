"""What a manifest still needs given a ledger, per model, with its list-price cost (sends nothing).

`--dry-run` shows it as the plan, decided as the run decides (`run_forecast`); `status` uses
it for the work not recorded yet, from the ledger alone (`ledger_verdicts`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..costs.prices import CostEstimate, PriceTable, builtin_prices
from ..ledger.index import LedgerState
from ..ledger.keystate import KeyState
from ..manifest.job import Job
from ..models.registry import ModelRegistry
from ..plan import Request, plan_job, remainder
from ..settings import Settings
from ..store.interface import Store
from ..store.local import LocalStore
from ..store.setaside import find_whole, withdrawn
from .resume import Verdict, decide
from .summary import Summary
from .triage import Triage

Lookup = Callable[[str], KeyState | None]
# Each request of a job with its verdict and what the ledger recorded for it.
Decided = Iterable[tuple[Verdict, Request, KeyState | None]]
Verdicts = Callable[[Job], Decided]


@dataclass(slots=True)
class ModelForecast:
    """One model's planned work and what the ledger already holds of it."""

    jobs: int = 0
    requests: int = 0
    images: int = 0
    # Recorded ok with the same request: skipped without a request.
    done_requests: int = 0
    done_images: int = 0
    # What a run would send (new, retryable failures, and changed ones it may regenerate).
    send_requests: int = 0
    send_images: int = 0
    # Not in the ledger at all (jobs: with at least one such request).
    new_jobs: int = 0
    new_requests: int = 0
    new_images: int = 0
    # Generated but not downloaded: fetched, not paid again.
    fetch_requests: int = 0
    # Permanent failures kept unless --retry-failed.
    kept_requests: int = 0
    # Changed since the ledger recorded them: refused unless --regenerate-changed.
    changed_requests: int = 0
    estimated_usd: float | None = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        data = asdict(self)
        if self.estimated_usd is not None:
            data["estimated_usd"] = round(self.estimated_usd, 6)
        return data


@dataclass(slots=True)
class Forecast:
    """The whole manifest against the ledger: per model, totals, costs and the changed jobs."""

    prices: PriceTable
    by_model: dict[str, ModelForecast] = field(default_factory=dict)
    # The cost of what a run would send, and of the whole manifest.
    to_send: CostEstimate = field(init=False)
    everything: CostEstimate = field(init=False)
    changed_jobs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.to_send = CostEstimate(prices=self.prices)
        self.everything = CostEstimate(prices=self.prices)

    def totals(self) -> ModelForecast:
        """Every model's counts added up."""
        total = ModelForecast()
        for item in self.by_model.values():
            for name in total.__dataclass_fields__:
                if name != "estimated_usd":
                    setattr(total, name, getattr(total, name) + getattr(item, name))
        total.estimated_usd = self.to_send.total
        return total


def ledger_verdicts(
    registry: ModelRegistry, recorded: Lookup, *, retry_failed: bool = False
) -> Verdicts:
    """Each job's verdicts from the ledger alone: no file looked at, no line read again
    (what `status` counts; a run also checks files, see `run_forecast`)."""

    def verdicts(job: Job) -> Decided:
        for request in plan_job(job, registry.get(job.model)):
            state = recorded(request.key)
            yield decide(request.fingerprint, state, retry_failed=retry_failed), request, state

    return verdicts


def run_forecast(
    jobs: Iterable[Job],
    registry: ModelRegistry,
    settings: Settings,
    out_dir: Path | str,
    state: LedgerState,
    prices: PriceTable | None = None,
    *,
    store: Store | None = None,
) -> Forecast:
    """What a run with `settings` would do in `out_dir`: its own triage (an ok key whose files
    are gone is generated again, images set aside are put back where they are whole)."""
    # Changed jobs are yielded, to be counted here; the run refuses them before sending.
    allow = settings.model_copy(update={"regenerate_changed": True})
    triage = Triage(
        settings=allow,
        registry=registry,
        out_dir=out_dir,
        run_id="",
        summary=Summary(),
        recorded=state,
        store=store,
    )
    where = store if store is not None else LocalStore(out_dir)

    def verdicts(job: Job) -> Decided:
        for verdict, request, recorded in triage.verdicts(job):
            if verdict in ("restore", "redownload") and _put_back(where, recorded):
                verdict = "reuse"  # put back without a request, as the run does
            elif verdict == "redownload":
                # The run downloads it again from its links first (free), and generates it if
                # a link no longer works: planned at that price, the most it can cost.
                verdict = "restore"
            yield verdict, request, recorded

    return forecast(jobs, verdicts, regenerate_changed=settings.regenerate_changed, prices=prices)


def _put_back(store: Store, recorded: KeyState | None) -> bool:
    """Whether the images a key's line withdrew are each whole somewhere: a run records them
    again without sending (a request's life puts them back)."""
    images = withdrawn(None if recorded is None else recorded.line_event())
    return bool(images) and find_whole(store, images or ()) is not None


def forecast(
    jobs: Iterable[Job],
    verdicts: Verdicts,
    *,
    regenerate_changed: bool = False,
    prices: PriceTable | None = None,
) -> Forecast:
    """Each job's requests with their verdicts (`verdicts`: as a run or the ledger decides),
    counted."""
    result = Forecast(prices or builtin_prices())
    for job in jobs:
        item = result.by_model.setdefault(job.model, ModelForecast())
        item.jobs += 1
        changed = new = False
        for verdict, request, state in verdicts(job):
            item.requests += 1
            item.images += request.n
            result.everything.add(request)
            if state is None:
                new = True
                item.new_requests += 1
                item.new_images += request.n
            if verdict == "reuse":
                item.done_requests += 1
                item.done_images += request.n
            elif verdict == "fetch":
                item.fetch_requests += 1
            elif verdict == "keep":
                item.kept_requests += 1
            elif verdict == "changed" and not regenerate_changed:
                item.changed_requests += 1
                changed = True
            elif verdict == "rest" and state is not None:
                # A partial key: its recorded images are done, only the rest is sent (and paid).
                have = min(state.image_count + len(state.downloads), request.n - 1)
                rest = remainder(request, have)
                item.done_images += have
                item.send_requests += 1
                item.send_images += rest.n
                result.to_send.add(rest)
            else:
                item.send_requests += 1
                item.send_images += request.n
                result.to_send.add(request)
        if changed:
            result.changed_jobs.append(job.id)
        item.new_jobs += new
    for name, item in result.by_model.items():
        item.estimated_usd = result.to_send.by_model.get(name, 0.0)
        if item.send_images and name not in result.to_send.by_model:
            item.estimated_usd = None
    return result
