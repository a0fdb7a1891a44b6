"""What an output folder holds, read from its ledger without taking the lock."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import LedgerError
from .events import LEDGER_NAME, iter_events


@dataclass(slots=True)
class ModelStatus:
    """Requests and images per outcome for one model."""

    ok_requests: int = 0
    failed_requests: int = 0
    ok_images: int = 0
    failed_images: int = 0


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
    failure_examples: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    ambiguous_retries: int = 0
    first_at: str | None = None
    last_at: str | None = None
    last_run_ended: bool = False
    last_summary: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `status --json`."""
        by_model = {name: asdict(item) for name, item in sorted(self.by_model.items())}
        totals = {
            field: sum(item[field] for item in by_model.values())
            for field in ("ok_requests", "failed_requests", "ok_images", "failed_images")
        }
        return {
            "out_dir": self.out_dir,
            "runs": self.runs,
            "keys": self.keys,
            **totals,
            "by_model": by_model,
            "failures": dict(self.failures),
            "awaiting_download": self.awaiting_download,
            "failure_examples": self.failure_examples,
            "retries": self.retries,
            "ambiguous_retries": self.ambiguous_retries,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "last_run_ended": self.last_run_ended,
            "last_summary": self.last_summary,
        }


def read_status(out_dir: str | Path) -> FolderStatus:
    """Summarise a folder's ledger; works while a run is writing it (a torn tail is skipped)."""
    path = Path(out_dir) / LEDGER_NAME
    if not path.exists():
        raise LedgerError(f"{out_dir} has no {LEDGER_NAME}: nothing has run there yet")
    status = FolderStatus(out_dir=str(out_dir))
    latest: dict[str, dict[str, Any]] = {}
    for _, event in iter_events(path):
        kind = event.get("event")
        if kind == "run":
            status.runs += 1
            status.last_run_ended = False
            status.first_at = status.first_at or event.get("started_at")
            status.last_at = event.get("started_at") or status.last_at
        elif kind == "end":
            status.last_run_ended = True
            status.last_summary = event.get("summary")
            status.last_at = event.get("finished_at") or status.last_at
        elif kind == "result":
            latest[str(event.get("key"))] = {
                "status": event.get("status"),
                "model": event.get("model"),
                "n": event.get("n", 0),
                "error": event.get("error"),
                "written": len(event.get("images") or ()),
            }
            status.retries += max(int(event.get("attempts") or 1) - 1, 0)
            status.ambiguous_retries += int(event.get("ambiguous_retries") or 0)
            status.last_at = event.get("finished_at") or status.last_at
    status.keys = len(latest)
    for item in latest.values():
        model = status.by_model.setdefault(str(item["model"]), ModelStatus())
        if item["status"] == "ok":
            model.ok_requests += 1
            model.ok_images += int(item["n"])
        else:
            # A download_failed request wrote some of its images; the rest are waiting.
            written = item["written"] if item["status"] == "download_failed" else 0
            if item["status"] == "download_failed":
                status.awaiting_download += int(item["n"]) - written
            model.failed_requests += 1
            model.ok_images += written
            model.failed_images += int(item["n"]) - written
            error = item["error"] or {}
            kind = str(error.get("kind", "unknown"))
            status.failures[kind] += 1
            status.failure_examples.setdefault(kind, str(error.get("message", "")))
    return status
