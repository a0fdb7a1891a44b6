"""Requests earlier runs sent and never heard back about: they may have been billed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..ledger.index import LedgerState


@dataclass(frozen=True, slots=True)
class Unanswered:
    """Keys whose latest line is a `sent` by an earlier run: key -> (run_id, images asked)."""

    keys: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    # The run before this one (None: no earlier run).
    last_run: str | None = None

    @classmethod
    def of(cls, state: LedgerState, run_id: str) -> Unanswered:
        """What the ledger says earlier runs left unanswered, at the start of run `run_id`."""
        last = state.last_run
        last_run = last.get("run_id") if last is not None else None
        return cls(state.unanswered(run_id), last_run if isinstance(last_run, str) else None)

    @property
    def requests(self) -> int:
        return len(self.keys)

    @property
    def images(self) -> int:
        return sum(n for _, n in self.keys.values())

    def text(self, retry: bool) -> str:
        """What the run says at start (empty when nothing is unanswered)."""
        if not self.keys:
            return ""
        runs = {run for run, _ in self.keys.values()}
        if runs == {self.last_run}:
            who = "the last run"
        else:
            who = "an earlier run" if len(runs) == 1 else f"{len(runs)} earlier runs"
        then = (
            "sending them again (possibly billed twice; --no-retry-ambiguous holds them back)"
            if retry
            else "held back, not sent (--retry-ambiguous sends them)"
        )
        return (
            f"{who} stopped with {self.requests} requests ({self.images} images) sent and not "
            f"answered; they may have been billed: {then}"
        )
