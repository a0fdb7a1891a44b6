"""Resume triage: each job's requests with their verdicts, and the results the ledger answers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..costs.prices import CostEstimate, PriceTable
from ..errors import ChangedJobsError
from ..ledger.index import LedgerState
from ..ledger.keystate import KeyState
from ..ledger.verify import ImagePresence
from ..manifest.job import Job
from ..manifest.reader import Manifest
from ..models.registry import ModelRegistry
from ..net.response import MASK
from ..plan import Request, plan_job
from ..results import DOWNLOAD_FAILED, PARTIAL, ImageRecord, Result
from ..settings import Settings
from ..store.interface import Store
from ..store.setaside import withdrawal
from .origin import NewWork, other_manifest, other_manifest_text
from .resume import LINK_GONE, Verdict, changed, decide, links_gone
from .summary import Summary
from .unanswered import Unanswered

log = logging.getLogger(__name__)

# Verdicts that put a request on the work queue (the rest are answered from the ledger).
SENT = frozenset({"send", "fetch", "changed", "rest", "restore", "redownload"})

# A job's requests, each with what the ledger recorded for it.
_Planned = list[tuple[Request, KeyState | None]]
# What triage found for decide: (missing, withdrawn, links_at) (see Triage._look).
_Found = tuple[bool, str | None, str | None]
_NOTHING: _Found = (False, None, None)


@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    """A request for a worker, with triage's verdict and the ledger state it came from."""

    request: Request
    verdict: Verdict = "send"
    recorded: KeyState | None = None


def _reads(state: KeyState | None) -> bool:
    """Whether triage reads the disk (an ok key's files) or the line (a withdrawal) of a state."""
    if state is None:
        return False
    status = state.status
    return status == "ok" or (status == "failed" and state.withdraws)


def _links_at(images: object, finished_at: object) -> str | None:
    """`finished_at` when each of a line's `images` came as a link that can work, else None."""
    # A link the key was blanked out of cannot work.
    if not isinstance(images, list) or not images or not isinstance(finished_at, str):
        return None
    for image in images:
        url = image.get("url") if isinstance(image, dict) else None
        if type(url) is not str or MASK in url:
            return None
    return finished_at


class Triage:
    """Decides, without sending, what each request needs; counts it in the run's summary."""

    def __init__(
        self,
        *,
        settings: Settings,
        registry: ModelRegistry,
        out_dir: Path | str,
        run_id: str,
        summary: Summary,
        recorded: LedgerState,
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.out_dir = out_dir
        self.run_id = run_id
        self.summary = summary
        # The open ledger's state (it follows every line the engine appends).
        self._recorded = recorded
        # On an object store a look costs a request per image: a run trusts its ledger there
        # (`cometbatch verify` checks every object and marks what is gone).
        local = store is None or store.local_folder is not None
        self._presence = ImagePresence(Path(out_dir)) if local else None
        # Keys earlier runs sent and never heard back about: sent again, or (with
        # retry_ambiguous off) held back.
        self.unanswered = Unanswered.of(recorded, run_id)
        self._unanswered = dict(self.unanswered.keys)
        # Wall-clock time, to tell whether recorded links are fresh (resume.links_fresh).
        self.clock: Callable[[], float] = time.time

    def verdicts(self, job: Job) -> Iterator[tuple[Verdict, Request, KeyState | None]]:
        """Each request of a job with its verdict (see resume.decide), looked at on this thread."""
        # A run uses `looked` instead; "changed" comes only if regenerating is allowed.
        planned = self._planned(job)
        return self._decided(job, planned, [self._look(job, *item, True) for item in planned])

    async def looked(
        self, jobs: Sequence[Job]
    ) -> AsyncIterator[Iterator[tuple[Verdict, Request, KeyState | None]]]:
        """`verdicts(job)` of each job, their files and lines read in one thread call first."""
        # Off the event loop: a network filesystem may block.
        planned: list[tuple[Job, _Planned]] = []
        failure: Exception | None = None
        for job in jobs:
            try:
                planned.append((job, self._planned(job)))
            except Exception as exc:  # after the jobs before it, as verdicts() would
                failure = exc
                break
        looks = [(job, *item) for job, items in planned for item in items]
        if any(_reads(state) for _, _, state in looks):
            found = await asyncio.to_thread(lambda: [self._look(*item, True) for item in looks])
        else:
            found = [_NOTHING] * len(looks)
        at = 0
        for job, items in planned:
            yield self._decided(job, items, found[at : at + len(items)])
            at += len(items)
        if failure is not None:
            raise failure

    def again(self, request: Request) -> tuple[Verdict, KeyState | None]:
        """A verdict from what the ledger has now, for work whose key got a line since."""
        state = self._recorded.get(request.key)
        verdict = decide(request.fingerprint, state, retry_failed=self.settings.retry_failed)
        return verdict, state

    def _planned(self, job: Job) -> _Planned:
        recorded = self._recorded
        spec = self.registry.get(job.model)
        spec.check(job.params(), job.prompt)
        return [(request, recorded.get(request.key)) for request in plan_job(job, spec)]

    def _look(self, job: Job, request: Request, state: KeyState | None, look: bool) -> _Found:
        """(missing, withdrawn, links_at) for decide, from the disk and the ledger (`_reads`)."""
        # withdrawn: the fingerprint of the request whose images the line lists ("" when not
        # recorded), None when it lists none; links_at: for images to restore that all came
        # as links, when the line that recorded those links was written.
        if state is None:
            return _NOTHING
        if state.status == "ok":
            if request.key in self._recorded.packed:
                return _NOTHING  # its images live in a committed shard, not in images/
            if (
                not look
                or self._presence is None
                or not self._presence.missing(job.id, request.indexes, state, job.output_format)
            ):
                return _NOTHING
            # Gone: its line is read (only then) for the links its images came from.
            event = state.line_event()
            if event is None:
                return True, None, None
            return True, None, _links_at(event.get("images"), event.get("finished_at"))
        if _reads(state):
            # Which images did its line take out of ok? Only such lines are read.
            taken = withdrawal(state.line_event())
            if taken is None:
                return _NOTHING
            links_at = _links_at(taken["images"], taken.get("finished_at"))
            return False, str(taken["fingerprint"] or ""), links_at
        return _NOTHING

    def _decided(
        self, job: Job, planned: _Planned, found: Sequence[_Found]
    ) -> Iterator[tuple[Verdict, Request, KeyState | None]]:
        changed = []
        now = self.clock()
        for (request, state), (missing, withdrawn, links_at) in zip(planned, found, strict=True):
            verdict = decide(
                request.fingerprint,
                state,
                retry_failed=self.settings.retry_failed,
                now=now,
                missing=missing,
                withdrawn=withdrawn,
                links_at=links_at,
            )
            if verdict == "changed" and not self.settings.regenerate_changed:
                changed.append(request.key)
            else:
                yield self._unanswered_verdict(verdict, request), request, state
        if changed:
            raise ChangedJobsError(self.out_dir, [job.id])

    def count_unanswered(self) -> None:
        """Count (and say) what earlier runs sent and never heard back about, at start."""
        found = self.unanswered
        self.summary.earlier_unanswered = (found.requests, found.images)
        if found.requests:
            log.warning("%s", found.text(self.settings.retry_ambiguous))

    def _unanswered_verdict(self, verdict: Verdict, request: Request) -> Verdict:
        """`verdict`, or "hold" for a key an earlier run sent unanswered (retry_ambiguous off)."""
        if verdict not in SENT or request.key not in self._unanswered:
            return verdict
        if self.settings.retry_ambiguous:
            # Sent again once: the first send may have been billed too.
            n = self._unanswered.pop(request.key)[1]
            self.summary.resent_unanswered += 1
            self.summary.resent_unanswered_images += n
            return verdict
        return "hold"

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
        elif verdict == "hold":
            s.held_unanswered += 1

    def reused(self, request: Request, state: KeyState) -> Result:
        """The ledger's ok result for a request, reported again without sending it."""
        images = tuple(ImageRecord(**image) for image in state.images)
        return Result.of(request, self.run_id, "ok", images=images, reused=True)

    def held(self, request: Request) -> Result:
        """A request an earlier run sent and never heard back about, held back (not sent)."""
        error = {
            "kind": "unanswered",
            "status": None,
            "code": None,
            "message": (
                "sent by an earlier run that never heard back: it may have been billed, so it "
                "was held back (--retry-ambiguous sends it again)"
            ),
            "request_id": None,
            "retryable": False,
        }
        return Result.of(request, self.run_id, "failed", error=error, reused=True)

    def kept(self, request: Request, state: KeyState | None) -> Result:
        """A permanent failure from an earlier run (a partial one with its images), not sent."""
        status = "failed"
        images: tuple[ImageRecord, ...] = ()
        gone = state is not None and links_gone(
            state.status,
            state.retryable,
            [(tries, since) for _, _, _, tries, since in state.downloads],
        )
        if state is not None and state.status == DOWNLOAD_FAILED:
            message = (
                f"generated in an earlier run, but its image link no longer works ({LINK_GONE}), "
                "so it counts as a failed generation: --retry-failed (setting retry_failed) "
                "generates it again (paid again)"
            )
        elif state is not None and state.status == PARTIAL:
            status = PARTIAL
            images = tuple(ImageRecord(**image) for image in state.images)
            why = (
                f"an image link no longer works ({LINK_GONE}), so those images count as failed "
                "generations"
                if gone
                else "asking for the rest failed permanently (see the ledger)"
            )
            message = (
                f"{len(images)} of {request.n} images were written in an earlier run; {why}: "
                "--retry-failed (setting retry_failed) asks for the missing ones (paid again)"
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
        return Result.of(request, self.run_id, status, images=images, error=error, reused=True)

    def preflight(self, jobs: Iterable[Job], new: NewWork | None = None) -> None:
        """Count planned work (in `new`: what the ledger has no record of); refuse changed jobs."""
        # Nothing is decided here (the run decides each request once, as it comes): changed
        # jobs are found by resume.changed, the rule decide itself follows.
        refused: list[str] = []
        refuse = not self.settings.regenerate_changed
        for job in jobs:
            unseen: list[Request] = []
            for request, state in self._planned(job):
                # Counting needs no look at the files: only a withdrawal line is read.
                withdrawn = self._look(job, request, state, False)[1] if state else None
                if refuse and changed(request.fingerprint, state, withdrawn=withdrawn):
                    if job.id not in refused:
                        refused.append(job.id)
                    continue
                self.summary.planned_requests += 1
                self.summary.planned_images += request.n
                if state is None:
                    unseen.append(request)
            if new is not None:
                new.add(unseen)
        if refused:
            raise ChangedJobsError(self.out_dir, refused)

    def preflight_run(
        self,
        jobs: Iterable[Job],
        manifest: Manifest | None,
        last_run: dict[str, Any] | None,
        prices: PriceTable,
    ) -> None:
        """`preflight`, warning what the jobs add when the folder last ran another manifest."""
        # The warning comes also when changed jobs then refuse the run.
        if (
            manifest is None
            or (other := other_manifest(last_run, manifest.path, manifest.sha256)) is None
        ):
            self.preflight(jobs)
            return
        new = NewWork(CostEstimate(prices))
        try:
            self.preflight(jobs, new)
        finally:
            counts = (new.jobs, new.requests, new.images)
            text = other_manifest_text(self.out_dir, other, manifest.path, counts, new.cost.total)
            log.warning("%s", text)
