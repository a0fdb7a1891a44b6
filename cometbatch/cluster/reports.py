"""What a shard's worker tells the driver through OUT: its live counts, and the driver's halt."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from ..store.interface import Store

__all__ = ["ShardReport", "ask_halt", "halt_asked", "read_report", "report_name", "write_report"]

# One small object per shard, rewritten every second or so by the shard's worker: the
# driver's display reads the running shards' ones (they work on any node, any store).
REPORTS = "cluster/progress"
HALTS = "cluster/halt"


def report_name(shard: str) -> str:
    """Where a shard's report is in OUT."""
    return f"{REPORTS}/{shard}.json"


@dataclass(frozen=True, slots=True)
class ShardReport:
    """A shard attempt's counts at one moment (`attempt` 2 and up: its worker was restarted)."""

    run_id: str
    shard: str
    attempt: int
    pid: int
    node: str
    planned_images: int = 0
    # Written by this attempt or found done in the shard's ledger.
    done_images: int = 0
    failed_images: int = 0
    # Written or failed by this attempt: what the display's rate counts.
    processed_images: int = 0
    in_flight: int = 0
    rate_limited: int = 0
    retries: int = 0
    finished: bool = False
    # Wall-clock seconds (time.time()) of the write: a report that stops changing is a worker
    # that is gone.
    updated_at: float = 0.0
    # The Ray node's id ("" in reports written before it was recorded).
    node_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the report object."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ShardReport | None:
        """A report read back (None when it is not one: a torn or foreign object)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
        except TypeError:
            return None

    def next_attempt(self, run_id: str) -> int:
        """The attempt number of the shard's next start in run `run_id`."""
        return self.attempt + 1 if self.run_id == run_id else 1


def read_report(store: Store, shard: str) -> ShardReport | None:
    """A shard's latest report (None: none yet, or unreadable)."""
    try:
        return ShardReport.from_dict(json.loads(store.read(report_name(shard))))
    except (OSError, ValueError):
        return None


async def write_report(store: Store, report: ShardReport) -> None:
    """Replace the shard's report (whole or not at all, as every store write)."""
    await store.put(report_name(report.shard), json.dumps(report.to_dict()).encode())


def _halt_name(run_id: str) -> str:
    return f"{HALTS}/{run_id}"


async def ask_halt(store: Store, run_id: str) -> None:
    """The driver's Ctrl-C: every worker of run `run_id` stops taking new work."""
    await store.put(_halt_name(run_id), b"halt\n")


def halt_asked(store: Store, run_id: str) -> bool:
    """Whether the driver asked run `run_id` to stop. Blocking."""
    try:
        store.stat(_halt_name(run_id))
    except FileNotFoundError:
        return False
    return True
