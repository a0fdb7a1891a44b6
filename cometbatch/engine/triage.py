"""Resume triage: each job's requests with their verdicts, and the results the ledger answers."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path

from ..errors import ChangedJobsError
from ..ledger.index import LedgerState
from ..ledger.keystate import KeyState
from ..ledger.verify import ImagePresence
from ..manifest.jobs import Job
from ..models.registry import ModelRegistry
from ..net.client import MASK
from ..plan import Request, plan_job
from ..results import DOWNLOAD_FAILED, PARTIAL, Result, Summary
from ..settings import Settings
from ..store.setaside import withdrawal
from ..store.sink import ImageRecord
from .origin import NewWork
from .resume import LINK_GONE, Verdict, decide, links_gone

# Verdicts that put a request on the work queue (the rest are answered from the ledger).
SENT = frozenset({"send", "fetch", "changed", "rest", "restore", "redownload"})

# A job's requests, each with what the ledger recorded for it.
_Planned = list[tuple[Request, KeyState | None]]
# What triage found for decide: (missing, withdrawn, links_at) (see Triage._look).
_Found = tuple[bool, str | None, str | None]
_NOTHING: _Found = (False, None, None)


@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    """A request for a worker: send it, fetch its pending downloads, send the rest of a
    partial one, restore its images (downloading them again first), or regenerate it."""

    request: Request
    verdict: Verdict = "send"
    recorded: KeyState | None = None


def _reads(state: KeyState | None) -> bool:
    """Whether triage reads the disk or the ledger for a state: an ok key's files are looked
    for, and the line of a failure is read if it lists withdrawn images (only then)."""
    if state is None:
        return False
    status = state.status
    return status == "ok" or (status == "failed" and state.withdraws)


def _links_at(images: object, finished_at: object) -> str | None:
    """`finished_at` when each of `images` (a line's list) came as a link that can work, else
    None (a link the key was blanked out of cannot)."""
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
        # Wall-clock time, to tell whether recorded links are fresh (resume.links_fresh).
        self.clock: Callable[[], float] = time.time

    def verdicts(
        self, job: Job, *, look: bool = True
    ) -> Iterator[tuple[Verdict, Request, KeyState | None]]:
        """Each request of a job with its verdict (see resume.decide); "changed" is yielded
        only when the settings allow regenerating changed jobs. `look`: check that an ok
        key's files are still there (an access() each; counting needs no look). The files
        are looked at here, on the caller's thread: a run uses `looked`."""
        planned = self._planned(job)
        return self._decided(job, planned, [self._look(job, *item, look) for item in planned])

    async def looked(
        self, jobs: Sequence[Job]
    ) -> AsyncIterator[Iterator[tuple[Verdict, Request, KeyState | None]]]:
        """`verdicts(job)` of each job in turn, the files and ledger lines of all of them
        read in one thread first, off the event loop (a network filesystem may block)."""
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

    def _planned(self, job: Job) -> _Planned:
        recorded = self._recorded()
        spec = self.registry.get(job.model)
        spec.check(job.params(), job.prompt)
        return [(request, recorded.get(request.key)) for request in plan_job(job, spec)]

    def _look(self, job: Job, request: Request, state: KeyState | None, look: bool) -> _Found:
        """(missing, withdrawn, links_at) for decide, from the disk and the ledger (see
        `_reads`): withdrawn is the fingerprint of the request whose images the line lists
        ("" when not recorded), None when it lists none; links_at, for images to restore
        that all came as links, when the line that recorded those links was written."""
        if state is None:
            return _NOTHING
        if state.status == "ok":
            if not look or not self._presence.missing(
                job.id, request.indexes, state, job.output_format
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
        """A permanent failure from an earlier run, reported again without a request (a
        partial key with the images it has)."""
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
        """Count planned work (and in `new`, the requests the ledger has no record of) and
        refuse changed jobs (all named) before anything is sent."""
        changed: list[str] = []
        for job in jobs:
            unseen: list[Request] = []
            try:
                for _, request, state in self.verdicts(job, look=False):
                    self.summary.planned_requests += 1
                    self.summary.planned_images += request.n
                    if state is None:
                        unseen.append(request)
            except ChangedJobsError:
                changed.append(job.id)
            if new is not None:
                new.add(unseen)
        if changed:
            raise ChangedJobsError(self.out_dir, changed)
