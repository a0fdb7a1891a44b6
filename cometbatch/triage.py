"""Resume triage: each job's requests with their verdicts, and the results the ledger answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .aside import withdrawn as withdrawn_images
from .errors import ChangedJobsError
from .manifest import Job
from .models import ModelRegistry
from .plan import Request, plan_job
from .results import DOWNLOAD_FAILED, Result, Summary
from .resume import LINK_GONE, Verdict, decide
from .settings import Settings
from .sink import ImageRecord
from .state import KeyState, LedgerState
from .verify import ImagePresence

# Verdicts that put a request on the work queue (the rest are answered from the ledger).
SENT = frozenset({"send", "fetch", "changed", "rest", "restore"})


@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    """A request for a worker: send it, fetch its pending downloads, send the rest of a
    partial one, restore its images, or regenerate it."""

    request: Request
    verdict: Verdict = "send"
    recorded: KeyState | None = None


class Triage:
    """Decides, without sending, what each request needs; counts it in the run's summary."""

    def __init__(
        self,
        *,
        settings: Settings,
        registry: ModelRegistry,
        out_dir: Path,
        run_id: str,
        summary: Summary,
        recorded: Callable[[], LedgerState],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.out_dir = out_dir
        self.run_id = run_id
        self.summary = summary
        # The open ledger's state, looked up per job: a closed engine raises instead of guessing.
        self._recorded = recorded
        self._presence = ImagePresence(out_dir)

    def verdicts(
        self, job: Job, *, look: bool = True
    ) -> Iterator[tuple[Verdict, Request, KeyState | None]]:
        """Each request of a job with its verdict (see resume.decide); "changed" is yielded
        only when the settings allow regenerating changed jobs. `look`: check that an ok
        key's files are still there (a stat each; counting needs no look)."""
        recorded = self._recorded()
        spec = self.registry.get(job.model)
        spec.check(job.params(), job.prompt)
        changed = []
        for request in plan_job(job, spec):
            state = recorded.get(request.key)
            missing = withdrawn = False
            if state is not None:
                if state.status == "ok" and look:
                    missing = self._presence.missing(
                        job.id, request.indexes, state, job.output_format
                    )
                elif state.status == "failed" and state.retryable is True:
                    # Rare enough to read its line: did it take the key's images out of ok?
                    withdrawn = withdrawn_images(state.line_event()) is not None
            verdict = decide(
                request.fingerprint,
                state,
                retry_failed=self.settings.retry_failed,
                missing=missing,
                withdrawn=withdrawn,
            )
            if verdict == "changed" and not self.settings.regenerate_changed:
                changed.append(request.key)
            else:
                yield verdict, request, state
        if changed:
            raise ChangedJobsError(self.out_dir, [job.id])

    def count(self, verdict: str, request: Request, *, planned: bool) -> None:
        """Count one request in the summary: planned (unless counted before) and its verdict."""
        s = self.summary
        if planned:
            s.planned_requests += 1
            s.planned_images += request.n
        if verdict == "reuse":
            s.skipped_requests += 1
            s.skipped_images += request.n
        elif verdict == "keep":
            s.kept_failures += 1
        elif verdict == "changed":
            s.regenerated_requests += 1

    def reused(self, request: Request, state: KeyState) -> Result:
        """The ledger's ok result for a request, reported again without sending it."""
        images = tuple(ImageRecord(**image) for image in state.images)
        return Result.of(request, self.run_id, "ok", images=images, reused=True)

    def kept(self, request: Request, state: KeyState | None) -> Result:
        """A permanent failure from an earlier run, reported again without a request."""
        if state is not None and state.status == DOWNLOAD_FAILED:
            message = (
                f"generated in an earlier run, but its image link no longer works ({LINK_GONE}), "
                "so it counts as a failed generation: --retry-failed (setting retry_failed) "
                "generates it again (paid again)"
            )
        else:
            message = (
                "failed permanently in an earlier run (see the ledger); "
                "set retry_failed to try again"
            )
        error = {
            "kind": "earlier_failure",
            "status": None,
            "code": None,
            "message": message,
            "request_id": None,
            "retryable": False,
        }
        return Result.of(request, self.run_id, "failed", error=error, reused=True)

    def preflight(self, jobs: Iterable[Job]) -> None:
        """Count planned work and refuse changed jobs (all named) before anything is sent."""
        changed: list[str] = []
        for job in jobs:
            try:
                for _, request, _ in self.verdicts(job, look=False):
                    self.summary.planned_requests += 1
                    self.summary.planned_images += request.n
            except ChangedJobsError:
                changed.append(job.id)
        if changed:
            raise ChangedJobsError(self.out_dir, changed)
