"""What an output folder holds, read from its ledger without taking the lock."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..costs.paid import Payments, generation_cost
from ..costs.prices import PriceTable, builtin_prices
from ..engine.forecast import forecast, ledger_verdicts
from ..engine.resume import links_gone
from ..errors import CometBatchError, ManifestError
from ..ledger.events import SHARD_EVENT, ledger_path, read_events
from ..ledger.keystate import KeyState
from ..ledger.lines import EndEvent, ResultEvent, RunEvent
from ..results import DOWNLOAD_FAILED, OK, PARTIAL, WITH_DOWNLOADS
from ..store.interface import Store
from ..store.liverun import RunState, run_state
from ..store.urls import store_of
from .crashes import Crashes, RunCrash, crash_dicts
from .recorded import recorded_manifest
from .scope import Scope


@dataclass(slots=True)
class ModelStatus:
    """Requests and images per outcome for one model."""

    ok_requests: int = 0
    failed_requests: int = 0
    ok_images: int = 0
    failed_images: int = 0
    # Planned in the manifest and not recorded yet (None while unknown).
    pending_requests: int | None = None
    pending_images: int | None = None


@dataclass(slots=True)
class FolderStatus:
    """The latest outcome of every key in a ledger, grouped by model."""

    out_dir: str
    runs: int = 0
    keys: int = 0
    by_model: dict[str, ModelStatus] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    # Images generated but not downloaded yet (`cometbatch fetch` tries them again).
    awaiting_download: int = 0
    # Images whose links are gone or given up: failed generations (`run --retry-failed`).
    links_gone: int = 0
    failure_examples: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    ambiguous_retries: int = 0
    first_at: str | None = None
    last_at: str | None = None
    last_run_ended: bool = False
    last_summary: dict[str, Any] | None = None
    state: RunState = "unknown"
    state_detail: str = ""
    manifest: str | None = None
    # Why pending is unknown, or a caveat about it; pending_known says whether it is counted.
    manifest_note: str = ""
    pending_known: bool = False
    spend_usd: float = 0.0
    # Images generated (paid for), those since set aside or found bad included.
    paid_images: int = 0
    unpriced_images: int = 0
    prices: str = ""
    # Runs against the simulated API (their "spend" was never billed).
    simulated_runs: int = 0
    # The latest run's layout; committed shards and the images they hold.
    layout: str = "files"
    shards: int = 0
    packed_images: int = 0
    # Keys whose latest line is a `sent` by a run no longer running: they may have been
    # billed and were never answered (a crash or a hard stop); and each run's such sends.
    unanswered: dict[str, tuple[str, int]] = field(default_factory=dict)
    crashes: list[RunCrash] = field(default_factory=list)
    # A cluster output's {"shards", "shards_done"} (None for an ordinary output).
    cluster: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `status --json`."""
        by_model = {name: asdict(item) for name, item in sorted(self.by_model.items())}
        names = ("ok_requests", "failed_requests", "ok_images", "failed_images")
        totals: dict[str, int | None] = {
            name: sum(item[name] for item in by_model.values()) for name in names
        }
        for name in ("pending_requests", "pending_images"):
            known = self.pending_known
            totals[name] = sum(item[name] or 0 for item in by_model.values()) if known else None
        return {
            "out_dir": self.out_dir,
            "state": self.state,
            "state_detail": self.state_detail,
            "runs": self.runs,
            "keys": self.keys,
            **totals,
            "by_model": by_model,
            "manifest": self.manifest,
            "manifest_note": self.manifest_note,
            "failures": dict(self.failures),
            "awaiting_download": self.awaiting_download,
            "links_gone": self.links_gone,
            "failure_examples": self.failure_examples,
            "retries": self.retries,
            "ambiguous_retries": self.ambiguous_retries,
            "unanswered_requests": len(self.unanswered),
            "unanswered_images": sum(n for _, n in self.unanswered.values()),
            "unanswered_keys": sorted(self.unanswered),
            "crashes": crash_dicts(self.crashes),
            # In-run retries after an ambiguous failure, and requests sent again after a crash.
            "possibly_billed_twice": self.ambiguous_retries
            + sum(crash.sent_again for crash in self.crashes),
            "spend": {
                "usd": round(self.spend_usd, 6),
                "images": self.paid_images,
                "unpriced_images": self.unpriced_images,
                "prices": self.prices,
                "simulated_runs": self.simulated_runs,
            },
            "first_at": self.first_at,
            "last_at": self.last_at,
            "span_s": span_seconds(self.first_at, self.last_at),
            "last_run_ended": self.last_run_ended,
            "last_summary": self.last_summary,
            "layout": {
                "name": self.layout,
                "shards": self.shards,
                "packed_images": self.packed_images,
            },
            **({"cluster": self.cluster} if self.cluster is not None else {}),
        }


def span_seconds(first: str | None, last: str | None) -> float | None:
    """Seconds between two ledger timestamps; None if either is missing or unreadable."""
    if not first or not last:
        return None
    try:
        return (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    except (TypeError, ValueError):
        return None


def read_status(
    out_dir: str | Path | Store,
    *,
    manifest: str | Path | None = None,
    prices: PriceTable | None = None,
    ledger: Path | None = None,
) -> FolderStatus:
    """Summarise a folder's ledger, also while a run writes it (a torn tail is skipped)."""
    # Pending work needs the manifest: `manifest`, else the one the latest run recorded.
    # `ledger`: its local file when the caller has it already (on a store, a merged copy).
    store = store_of(out_dir)
    path = ledger or ledger_path(store)
    status = FolderStatus(out_dir=str(out_dir) if isinstance(out_dir, str | Path) else store.root)
    latest: dict[str, dict[str, Any]] = {}
    # What was paid for: every generation, counted once.
    paid = Payments()
    crashes = Crashes()
    run: dict[str, Any] = {}
    for event in read_events(path):
        if isinstance(event, RunEvent):
            run = event.fields
            crashes.run(str(run.get("run_id")))
            status.runs += 1
            status.last_run_ended = False
            status.first_at = status.first_at or event.started_at
            status.last_at = event.started_at or status.last_at
        elif isinstance(event, EndEvent):
            status.last_run_ended = True
            status.last_summary = event.summary
            if status.last_summary is not None and status.last_summary.get("simulated"):
                status.simulated_runs += 1
            status.last_at = event.finished_at or status.last_at
        elif isinstance(event, ResultEvent):
            latest[event.key] = {
                "status": event.status,
                "model": event.model,
                "job_id": event.job_id,
                "n": event.n,
                "error": event.error,
                "fingerprint": event.fingerprint,
                "written": len(event.images),
                "paid": event.paid,
                "generated": event.generated,
                # Links still to download, judged once the key's latest line is known.
                "downloads": event.downloads,
            }
            paid.add(event.fields)
            crashes.answered(event.key)
            status.retries += max(event.attempts - 1, 0)
            status.ambiguous_retries += event.ambiguous_retries
            status.last_at = event.finished_at or status.last_at
        elif event.kind == SHARD_EVENT:
            status.shards += 1
            status.packed_images += len(event.fields.get("samples") or ())
        elif event.kind == "sent":
            fields = event.fields
            crashes.sent(str(fields.get("run_id")), str(fields.get("key")), _n(fields.get("n")))
    status.keys = len(latest)
    settings = run.get("settings")
    if isinstance(settings, dict) and isinstance(settings.get("layout"), str):
        status.layout = settings["layout"]
    for key, item in latest.items():
        item["links_gone"] = _links_gone(key, item)
    interrupted = bool((status.last_summary or {}).get("interrupted"))
    status.state, status.state_detail = run_state(store, status.last_run_ended, interrupted)
    scope = Scope()
    # The sends of a run still going are in flight, not lost.
    live = str(run.get("run_id")) if status.state == "running" else None
    status.unanswered = crashes.unanswered(live)
    models: dict[str, str] = {}
    sizes = _count_pending(status, latest, run, manifest, scope, models)
    # Outcomes after the manifest is read: a job whose n was lowered counts only what it asks.
    _count_outcomes(status, _in_scope(latest, scope))
    if status.pending_known:
        for model in status.by_model.values():
            if model.pending_requests is None:
                model.pending_requests = model.pending_images = 0
    # Spend counts every paid image, asked for now or not.
    prices = prices or builtin_prices()
    _count_spend(status, paid, sizes, prices)

    def shape(key: str, job_id: str) -> tuple[str, str | None, str | None] | None:
        recorded = latest.get(key)
        model = recorded["model"] if recorded is not None else models.get(job_id)
        return None if model is None else (str(model), *sizes.get(job_id, (None, None)))

    status.crashes = crashes.by_run(shape, prices, live)
    return status


def _n(value: Any) -> int:
    """A `sent` line's images asked for (0 for a hand-edited value that is no count)."""
    return value if type(value) is int and value > 0 else 0


def _links_gone(key: str, item: dict[str, Any]) -> bool:
    """Whether a key's links are gone or given up, as a run decides it (resume.links_gone)."""
    status = str(item["status"])
    if status not in WITH_DOWNLOADS:
        return False
    error = item["error"]
    retryable = error.get("retryable") if isinstance(error, dict) else None
    state = KeyState(
        key, status, item["fingerprint"], retryable, str(item["job_id"]), int(item["n"]),
        downloads=item["downloads"],
    )  # fmt: skip
    links = [(tries, since) for _, _, _, tries, since in state.downloads]
    return links_gone(status, retryable, links)


def _in_scope(latest: dict[str, dict[str, Any]], scope: Scope) -> dict[str, dict[str, Any]]:
    """The latest items the manifest still asks for, their images cut to what it asks."""
    kept: dict[str, dict[str, Any]] = {}
    for key, item in latest.items():
        chunk = key.rpartition("#")[2]
        n = int(item["n"])
        counted = scope.images(str(item["job_id"]), int(chunk), n) if chunk.isdigit() else n
        if counted == n:
            kept[key] = item
        elif counted is not None:
            kept[key] = {**item, "n": counted, "written": min(item["written"], counted)}
    return kept


def _count_outcomes(status: FolderStatus, latest: dict[str, dict[str, Any]]) -> None:
    for item in latest.values():
        model = status.by_model.setdefault(str(item["model"]), ModelStatus())
        if item["status"] == OK:
            model.ok_requests += 1
            model.ok_images += int(item["n"])
        elif item["status"] == PARTIAL and not item["error"] and not item["links_gone"]:
            # Stopped before the rest was asked for: the rest is pending (the next run sends it).
            model.ok_images += item["written"]
        else:
            # A download_failed or partial request wrote some of its images; the rest are
            # waiting for their download, or failed.
            written = item["written"] if item["paid"] else 0
            if item["links_gone"]:
                # Of a partial key, the images whose links are given up (the rest is failed).
                status.links_gone += min(item["generated"], int(item["n"])) - written
            elif item["status"] == DOWNLOAD_FAILED:
                status.awaiting_download += int(item["n"]) - written
            model.failed_requests += 1
            model.ok_images += written
            model.failed_images += int(item["n"]) - written
            error = item["error"] or {}
            kind = str(error.get("kind", "unknown"))
            status.failures[kind] += 1
            status.failure_examples.setdefault(kind, str(error.get("message", "")))


def _count_pending(
    status: FolderStatus,
    latest: dict[str, dict[str, Any]],
    run: dict[str, Any],
    given: str | Path | None,
    scope: Scope,
    models: dict[str, str],
) -> dict[str, tuple[str | None, str | None]]:
    """Pending work per model from the manifest; each recorded job's size and quality."""
    # Fills `scope` with the recorded jobs the manifest holds; leaves pending unknown, with a
    # note, when the manifest cannot be used. Sizes price lines that recorded no cost.
    recorded_path = run.get("manifest")
    if not isinstance(recorded_path, str):
        recorded_path = None  # a hand-edited run line: read as no manifest recorded
    path = Path(given) if given is not None else Path(recorded_path) if recorded_path else None
    if path is None:
        status.manifest_note = "pending work is unknown: no manifest recorded (pass --manifest)"
        return {}
    status.manifest = str(path)
    sizes: dict[str, tuple[str | None, str | None]] = {}
    recorded_jobs = {str(item["job_id"]) for item in latest.values()}
    # Jobs sent and never answered are priced at the manifest's model, size and quality.
    unanswered = {key.rpartition("#")[0] for key in status.unanswered}
    try:
        manifest = recorded_manifest(run, path)
        manifest.validate()

        def jobs() -> Any:
            for job in manifest:
                if job.id in recorded_jobs:
                    sizes[job.id] = (job.size, job.quality)
                    scope.add(job, manifest.registry.get(job.model).max_n)
                elif job.id in unanswered:
                    sizes[job.id] = (job.size, job.quality)
                    models[job.id] = job.model
                yield job

        def lookup(key: str) -> KeyState | None:
            item = latest.get(key)
            if item is None:
                return None
            return KeyState(key, item["status"], item["fingerprint"], None, "", item["n"])

        plan = forecast(jobs(), ledger_verdicts(manifest.registry, lookup))
    except ManifestError as exc:
        first = exc.problems[0] if exc.problems else None
        reason = first.message if first is not None and first.line == 0 else str(exc)
        status.manifest_note = f"pending work is unknown: cannot read {path}: {reason}"
        scope.clear()  # only a manifest read whole says what it asks for
        return {}
    except (CometBatchError, OSError) as exc:
        status.manifest_note = f"pending work is unknown: cannot read {path}: {exc}"
        scope.clear()
        return {}
    matched = sum(p.requests - p.new_requests for p in plan.by_model.values())
    if latest and not matched:
        # A .txt or .csv run with --model/--size/--n from before run events recorded them, or
        # another manifest than the one that ran.
        status.manifest_note = (
            f"pending work is unknown: none of the jobs in {path} is in the ledger (pass the "
            "manifest the run used with --manifest)"
        )
        return sizes
    for name, item in plan.by_model.items():
        model = status.by_model.setdefault(name, ModelStatus())
        model.pending_requests = item.new_requests
        model.pending_images = item.new_images
    for line in latest.values():
        pending = line["status"] == PARTIAL and not line["error"] and not line["links_gone"]
        if pending and line["job_id"] in sizes:
            # The images a partial key still needs (its written ones count as done).
            counted = status.by_model.setdefault(str(line["model"]), ModelStatus())
            counted.pending_requests = (counted.pending_requests or 0) + 1
            rest = int(line["n"]) - line["written"]
            counted.pending_images = (counted.pending_images or 0) + rest
    status.pending_known = True
    if given is None and run.get("manifest_sha256") and manifest.sha256 != run["manifest_sha256"]:
        status.manifest_note = f"{path} changed since the last run: pending counts its new content"
    return sizes


def _count_spend(
    status: FolderStatus,
    paid: Payments,
    sizes: dict[str, tuple[str | None, str | None]],
    prices: PriceTable,
) -> None:
    """What the recorded generations cost, as their lines recorded it (paid.generation_cost)."""
    status.prices = prices.describe()
    for payment in paid:
        size, quality = sizes.get(payment.job_id, (None, None))
        status.paid_images += payment.images
        cost = generation_cost(payment, prices, size, quality)
        if cost is None:
            status.unpriced_images += payment.images
        else:
            status.spend_usd += cost
