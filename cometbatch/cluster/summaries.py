"""One summary for a cluster run: the shards' summaries added up (pure)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

from ..costs.budget import BUDGET_REASONS
from ..engine.summary import Summary

__all__ = ["exit_code", "summary_of", "summed"]

# Summary fields that are not counts: set once from the shards, or left to the driver.
_NOT_ADDED = frozenset(
    {"run_id", "simulated", "failures", "earlier_unanswered", "interrupted", "stopped",
     "simulator_requests", "budget", "pace", "elapsed_s"}
)  # fmt: skip
# Names in Summary.to_dict() for fields kept under another shape there.
_NESTED = {
    "resent_unanswered": ("resent_unanswered", "requests"),
    "resent_unanswered_images": ("resent_unanswered", "images"),
}


def summed(shards: Iterable[Mapping[str, Any]], *, run_id: str = "") -> Summary:
    """The summaries of the shards (`Summary.to_dict()` each) as one Summary of the run."""
    total = Summary(run_id=run_id)
    earlier = [0, 0]
    for data in shards:
        for item in fields(Summary):
            name = item.name
            if name in _NOT_ADDED:
                continue
            value = _value(data, name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                setattr(total, name, getattr(total, name) + value)
        total.failures.update(Counter(data.get("failures") or {}))
        total.simulated = total.simulated or bool(data.get("simulated"))
        total.interrupted = total.interrupted or bool(data.get("interrupted"))
        stopped = data.get("stopped")
        # A budget cap names the run's stop before any other reason a shard gave.
        if stopped and (total.stopped is None or stopped in BUDGET_REASONS):
            total.stopped = str(stopped)
        before = data.get("earlier_unanswered") or {}
        earlier[0] += int(before.get("requests", 0))
        earlier[1] += int(before.get("images", 0))
        requests = data.get("simulator_requests")
        if isinstance(requests, int):
            total.simulator_requests = (total.simulator_requests or 0) + requests
    total.earlier_unanswered = (earlier[0], earlier[1])
    return total


def summary_of(data: Mapping[str, Any]) -> Summary:
    """A Summary back from its `to_dict()` (no budget or pace: a cluster run sums none)."""
    summary = summed([data], run_id=str(data.get("run_id", "")))
    summary.elapsed_s = float(data.get("elapsed_s") or 0.0)
    return summary


def _value(data: Mapping[str, Any], name: str) -> Any:
    if name in _NESTED:
        outer, inner = _NESTED[name]
        return (data.get(outer) or {}).get(inner, 0)
    return data.get(name, 0)


def exit_code(summary: Summary, *, failed: bool = False) -> int:
    """A cluster run's exit code, as `run` gives one (`failed`: a shard ended in an error)."""
    if summary.interrupted:
        return 130
    if summary.stopped in BUDGET_REASONS:
        return 3
    return 0 if summary.complete and not failed else 1
