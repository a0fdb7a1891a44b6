"""Each request sent at most once at a time, its old images set aside, its result recorded."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..costs.budget import Budget, CapReason, request_cost
from ..costs.prices import PriceTable, estimate
from ..errors import APIError, OutputError
from ..ledger.events import now_iso
from ..ledger.index import KeyState
from ..ledger.writer import Ledger
from ..net.retry import possibly_billed
from ..plan import Request, part, remainder
from ..results import DOWNLOAD_FAILED, FAILED, OK, PARTIAL, PendingDownload, Result, Summary
from ..store.interface import Store
from ..store.setaside import (
    REPLACED_DIR,
    UNSENT,
    WITHDRAWN_KINDS,
    carry,
    find_whole,
    plan_aside,
    put_back,
    reinstated_event,
    set_aside,
    withdraw_event,
    withdrawal,
    withdrawn,
)
from ..store.sink import ImageRecord
from .dispatch import Dispatcher, Sent, Stopped, fatal_error
from .resume import decide, link_given_up
from .triage import Triage, Work

log = logging.getLogger(__name__)


class Sender:
    """Sends work through the dispatcher and writes its ledger line; shares a key in flight."""

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        triage: Triage,
        ledger: Callable[[], Ledger],
        out_dir: Path,
        run_id: str,
        summary: Summary,
        base_url: str,
        prices: PriceTable,
        budget: Budget | None = None,
        refused: Callable[[CapReason], None] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.triage = triage
        # The open ledger, looked up per request: a closed engine raises instead of sending.
        self._ledger = ledger
        self.out_dir = out_dir
        self.run_id = run_id
        self.summary = summary
        self.base_url = base_url
        self.prices = prices
        # Caps (None: none set, and no bookkeeping at all); `refused` stops the run at one.
        self.budget = budget
        self._refused = refused
        # Requests being sent now, by key: a second caller of the same key shares the result.
        self._inflight: dict[str, asyncio.Future[Result]] = {}
        self._writable = False

    async def execute(self, work: Work) -> Result:
        """Send a request, or share the result of the same request already being sent."""
        request = work.request
        while (pending := self._inflight.get(request.key)) is not None:
            # Two generate() calls for one job must not pay twice; wait without taking over
            # the first caller's error (if it fails, this caller sends the request itself).
            await asyncio.wait({pending})
            if not pending.cancelled():
                shared = pending.result()
                # A partial or download_failed key is still pending work, not a kept failure.
                if shared.ok:
                    self.triage.count("reuse", request, planned=False)
                elif shared.status == FAILED:
                    self.triage.count("keep", request, planned=False)
                return dataclasses.replace(shared, reused=True)
        state = self._ledger().state.get(request.key)
        restoring = work.verdict in ("restore", "redownload")
        if state is not None and state is not work.recorded and not restoring:
            # Recorded since it was queued (the same job twice in a caller's list, or a first
            # caller that went away after a line): go on from what the key has now.
            # (A key to restore is ok in the ledger: its files are what triage found gone.)
            verdict = decide(request.fingerprint, state, retry_failed=self._retry_failed)
            if verdict == "reuse":
                self.triage.count("reuse", request, planned=False)
                return self.triage.reused(request, state)
            if verdict in ("rest", "fetch"):
                work = Work(request, verdict, state)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._inflight[request.key] = future
        try:
            result = await self._reinstate(work) if restoring else None
            if result is None:
                if restoring:
                    # Not all whole again: generated again, its images set aside first.
                    work = Work(request, "restore", work.recorded)
                result = await self._send_and_record(work)
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[request.key]

    @property
    def _store(self) -> Store:
        """Where the images are (the sink's store)."""
        return self.dispatcher.sink.store

    @property
    def _retry_failed(self) -> bool:
        return self.triage.settings.retry_failed

    async def _send_and_record(self, work: Work) -> Result:
        """One request from send to ledger line; API failures become a failed Result.

        A short answer is recorded (a partial line) before the missing images are asked for
        under the same key; each line lists every image of the key so far."""
        request = work.request
        if not self._writable:
            # Before the first request is paid for: its images must have somewhere to go.
            await asyncio.to_thread(self.dispatcher.sink.check_writable)
            self._writable = True
        # Images an earlier run paid for (a fetch, or the rest of a partial key), and their
        # cost (nothing to price for a fresh request).
        sent = _recorded(work)
        cost = self._cost(request, sent)[0] if sent.generated else 0.0
        key = _Key(
            work, sent, asyncio.get_running_loop().time(), _Paid(sent.generated, cost),
            written=len(sent.images),
        )  # fmt: skip
        try:
            if sent.pending:
                # Generated (and paid for) already: only the downloads are tried again.
                await self.dispatcher.refetch(request.job.id, list(sent.pending), sent)
            if sent.generated >= request.n:
                return await self._record(key)
            return await self._generate(key)
        finally:
            # Counted from the key's last line, also when a stop cancelled the wait for a
            # follow-up (the line stands, and so do its images and its cost).
            if key.last is not None:
                self._count(key, key.last)

    def _count(self, key: _Key, result: Result) -> None:
        """Count a key's last line in the summary: only what this run wrote and paid for."""
        self.summary.add(result, paid=False, written_before=key.written)
        # The line carries the key's whole cost; this run's spend is what it added.
        made = _made(result) - key.earlier.images
        cost = result.cost_usd
        self.summary.pay(None if cost is None else cost - (key.earlier.cost or 0.0), made)
        if key.aside_kind in ("missing_image", "corrupt_image") and made:
            # Generated again because a file was gone or damaged (counted once answered).
            self.summary.regenerated_missing += 1

    async def _generate(self, key: _Key) -> Result:
        """Ask for the key's missing images until they all came, a request fails, or the run
        stops; each short answer is recorded before the next request is sent."""
        work, sent = key.work, key.sent
        request = work.request
        # The reservation covers every follow-up: together they ask for the missing count.
        missing = remainder(request, sent.generated)
        part, reserved = await self._send(key, _next_part(request, sent), missing)
        reservation = (missing.n, reserved)
        try:
            while True:
                sent.add(part)
                failed = part.error is not None and not part.pending
                last = await self._record(key)
                if failed or sent.generated >= request.n:
                    return last
                try:
                    part = await self._follow_up(_next_part(request, sent))
                except Stopped:
                    # The partial line stands: the next run asks for the rest.
                    return last
        finally:
            if self.budget is not None:
                self._settle(self.budget, reservation, key)

    async def _follow_up(self, request: Request) -> Sent:
        """Ask for the rest of a key whose answer was short (its reservation covers it)."""
        try:
            return await self.dispatcher.send(request)
        except APIError as exc:
            raise fatal_error(exc, self.base_url) from exc

    def _cost(self, request: Request, sent: Sent) -> tuple[float | None, str]:
        """What the images of `sent` cost (from its usage where the model is billed so)."""
        job = request.job
        return request_cost(
            job.model, sent.usage, sent.generated, job.size, job.quality, self.prices
        )

    async def _record(self, key: _Key) -> Result:
        """Append the key's line for what it has so far; the Result it records."""
        request, sent = key.work.request, key.sent
        status = _status(sent, request.n)
        cost, basis = self._cost(request, sent) if status != FAILED else (0.0, "none")
        result = Result.of(
            request,
            self.run_id,
            status,
            images=tuple(sent.images),
            downloads=tuple(sent.pending),
            attempts=sent.attempts,
            ambiguous_retries=sent.ambiguous,
            error=sent.error.to_record() if sent.error else None,
            latency_s=asyncio.get_running_loop().time() - key.started,
            finished_at=now_iso(),
            usage=sent.usage,
            answered=sent.answered,
            rate_limited=sent.rate_limited,
            cost_usd=cost,
            cost_basis=basis,
        )
        line = result.to_event()
        if status == FAILED:
            # Images the key's latest line withdrew stay findable (see aside.carry).
            withdrawing = key.withdrawing
            if withdrawing is None and key.work.recorded is not None:
                withdrawing = await asyncio.to_thread(_withdrawing_line, key.work.recorded)
            if withdrawing is not None:
                line = carry(line, withdrawing)
        await self._ledger().append(line)
        key.last = result
        # Recorded: the task holds nothing paid for and unrecorded (a follow-up may wait for
        # its slot a while; a stop need not wait for it, nor count it as cut off).
        self.dispatcher.busy(False)
        return result

    async def _send(
        self, key: _Key, request: Request, reserve: Request
    ) -> tuple[Sent, float | None]:
        """Generate `request` (the key's first missing images) within the budget (when caps
        are set), reserving for `reserve` (all of them); the sent outcome and the dollars
        reserved (settled by `_settle`)."""
        work = key.work
        recorded = work.recorded
        budget = self.budget
        reserved: float | None = None
        if budget is not None:
            reserved = estimate(reserve, self.prices)
            cap = budget.reserve(reserve.n, reserved)
            if cap is not None:
                # Nothing was sent; the run takes no new work, requests under way still land.
                if self._refused is not None:
                    self._refused(cap)
                raise Stopped
        try:
            if work.verdict in ("changed", "restore") and recorded is not None:
                await self._set_aside(key, recorded)
            try:
                return await self.dispatcher.send(request), reserved
            except APIError as exc:
                raise fatal_error(exc, self.base_url) from exc
        except BaseException:
            if budget is not None:
                budget.release(reserve.n, reserved)
            raise

    def _settle(self, budget: Budget, reservation: tuple[int, float | None], key: _Key) -> None:
        """Replace a key's reservation by what its recorded lines made and cost this run; a
        failure that may have been billed keeps its estimate."""
        images, reserved = reservation
        last, sent, earlier = key.last, key.sent, key.earlier
        made = 0 if last is None else _made(last) - earlier.images
        cost = None if last is None else last.cost_usd
        if made:
            spent = (reserved or 0.0) if cost is None else cost - (earlier.cost or 0.0)
        elif sent.ambiguous or (sent.error is not None and _maybe_billed(sent.error)):
            spent = reserved or 0.0
        else:
            spent = 0.0
        budget.settle(images, reserved, made, spent)

    async def _set_aside(self, key: _Key, recorded: KeyState) -> None:
        """Take a key's recorded images out of ok before it is generated again: first a line
        that says so, then the files moved to OUT/replaced/<run>/ (never overwritten), so
        that a kill at any point leaves a ledger that names only files that are there."""
        work = key.work
        latest = await asyncio.to_thread(recorded.line_event_or_rebuilt)
        earlier = withdrawal(latest)
        images = earlier["images"] if earlier is not None else list(latest.get("images") or ())
        where = f"{REPLACED_DIR}/{self.run_id}/"
        # Restoring: the kind of the withdrawal it continues, or files an ok line names gone.
        kind = "replaced" if work.verdict == "changed" else "missing_image"
        if work.verdict != "changed" and earlier is not None and earlier["kind"] in WITHDRAWN_KINDS:
            kind = earlier["kind"]
        if work.verdict == "changed":
            message = f"the job changed: its images were set aside in {where} to generate it again"
        elif kind == "replaced":
            message = (
                f"the images set aside when its job changed are not all whole; the rest were set "
                f"aside in {where} to generate it again"
            )
        else:
            message = (
                f"images of this request were gone or damaged; the rest were set aside in "
                f"{where} to generate it again"
            )
        try:
            planned = await asyncio.to_thread(plan_aside, self._store, self.run_id, images)
            line = withdraw_event(
                latest,
                planned,
                run_id=self.run_id,
                kind=kind,
                message=message,
                finished_at=now_iso(),
            )
            await self._ledger().append(line)
            key.withdrawing, key.aside_kind = line, kind
            relpaths = [image["path"] for image in images]
            moved = await asyncio.to_thread(set_aside, self._store, self.run_id, relpaths)
        except OSError as exc:
            raise OutputError(
                f"cannot move the old images of job {recorded.job_id!r} aside in "
                f"{self.out_dir}: {exc.strerror or exc}"
            ) from exc
        if moved:
            log.info(
                "job %r: %d old image(s) moved to %s",
                recorded.job_id,
                moved,
                self.out_dir / REPLACED_DIR / self.run_id,
            )

    async def _reinstate(self, work: Work) -> Result | None:
        """Record again the images of a key to restore when each is whole: at its path, where
        it was set aside (moved back first), or, for a "redownload", downloaded again from
        the link it came from (nothing is generated). None if one is not whole."""
        recorded = work.recorded
        if recorded is None:
            return None
        latest = await asyncio.to_thread(recorded.line_event)
        if latest is None:
            return None
        images = withdrawn(latest)
        taken = withdrawal(latest)
        if images is None and latest.get("status") == OK and work.verdict == "redownload":
            # Files gone from under an ok line: downloaded to their paths, the line repeated.
            images = list(latest.get("images") or ())
        # (A download_failed line may have withdrawn no image, only links to download.)
        if images is None or not (images or (taken is not None and taken.get("downloads"))):
            return None
        found = await asyncio.to_thread(find_whole, self._store, images)
        if found is None and work.verdict == "redownload":
            found = await self._download_again(recorded.job_id, images)
        if found is None:
            return None
        try:
            await asyncio.to_thread(put_back, self._store, images, found)
        except OSError as exc:
            raise OutputError(
                f"cannot move the images of job {recorded.job_id!r} back in {self.out_dir}: "
                f"{exc.strerror or exc}"
            ) from exc
        if taken is not None:
            line = reinstated_event(latest, run_id=self.run_id, finished_at=now_iso())
        else:
            line = repeated_event(latest, run_id=self.run_id, finished_at=now_iso())
        await self._ledger().append(line)
        self.summary.restored_images += len(images)
        if line["status"] != OK:
            # Put back as the partial or download_failed line it was: go on from there.
            return await self._go_on(work.request)
        self.triage.count("reuse", work.request, planned=False)
        records = tuple(ImageRecord(**image) for image in line["images"])
        return Result.of(work.request, self.run_id, OK, images=records, reused=True)

    async def _go_on(self, request: Request) -> Result:
        """A key whose line was just put back short of its request: the rest asked for, its
        links downloaded (or generated again under retry_failed), or kept as it is."""
        state = self._ledger().state.get(request.key)
        assert state is not None  # its line was just appended
        verdict = decide(request.fingerprint, state, retry_failed=self._retry_failed)
        if verdict in ("rest", "fetch", "send"):
            return await self._send_and_record(Work(request, verdict, state))
        self.triage.count("keep", request, planned=False)
        return self.triage.kept(request, state)

    async def _download_again(self, job_id: str, images: list[dict[str, Any]]) -> list[str] | None:
        """Download the images whole nowhere from the links they came from, each to its path
        (the Fetcher's retries; nothing is generated); where each image is whole now, or None
        when one is not (a link that no longer works, or a file that is not the recorded
        one: such files are removed, the key is generated again)."""
        lost = await asyncio.to_thread(_whole_nowhere, self._store, images)
        if not all(type(image.get("url")) is str for image in lost):
            return None
        links = [
            PendingDownload(image["index"], image["url"], image.get("revised_prompt"))
            for image in lost
        ]
        # A link that no longer works is expected here: the request is generated instead.
        fetched = await self.dispatcher.fetcher.fetch(job_id, links, failures=logging.INFO)
        by_index = {image["index"]: image for image in lost}
        other = [
            record
            for record in fetched.images
            if (record.sha256, record.bytes) != _digest(by_index[record.index])
        ]
        if other:
            # Not the image that was paid for: it must not stand under the recorded name.
            self.dispatcher.sink.discard(other)
        if fetched.pending or other:
            log.info(
                "job %r: %d image(s) could not be downloaded again; generating them again",
                job_id,
                len(fetched.pending) + len(other),
            )
            return None
        log.info("job %r: %d image(s) downloaded again from their links", job_id, len(lost))
        return await asyncio.to_thread(find_whole, self._store, images)


@dataclasses.dataclass(frozen=True, slots=True)
class _Paid:
    """What a key's earlier runs paid for: images generated, and their cost."""

    images: int
    cost: float | None


@dataclasses.dataclass(slots=True)
class _Key:
    """One key being sent: what it started from and what this run recorded for it."""

    work: Work
    sent: Sent
    started: float
    earlier: _Paid
    # Images on disk before this run (a fetch's or a partial key's).
    written: int = 0
    # The key's last line written by this run.
    last: Result | None = None
    # The line that withdrew its images this run, and its kind (see Sender._set_aside).
    withdrawing: dict[str, Any] | None = None
    aside_kind: str | None = None


def repeated_event(latest: dict[str, Any], *, run_id: str, finished_at: str) -> dict[str, Any]:
    """An ok line recorded again after its lost files were downloaded again: the same
    images, usage and cost, nothing sent (attempts 0: paid.py counts no new payment)."""
    return {**latest, "run_id": run_id, **UNSENT, "finished_at": finished_at}


def _whole_nowhere(store: Store, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The images whole neither at their path nor where they were set aside."""
    return [image for image in images if find_whole(store, [image]) is None]


def _digest(image: dict[str, Any]) -> tuple[object, object]:
    return image.get("sha256"), image.get("bytes")


def _withdrawing_line(recorded: KeyState) -> dict[str, Any] | None:
    """A failed key's latest line, when it lists withdrawn images (else None, unread)."""
    if recorded.status != FAILED or not recorded.withdraws:
        return None
    return recorded.line_event()


def _next_part(request: Request, sent: Sent) -> Request:
    """The first run of indexes of `request` that `sent` has no image for: the tail after a
    short answer, or a gap left by a given-up link (the answer fills it, in index order)."""
    have = {image.index for image in sent.images} | {item.index for item in sent.pending}
    first = next(index for index in request.indexes if index not in have)
    stop = next((index for index in range(first, request.indexes.stop) if index in have), None)
    return part(request, first, (request.indexes.stop if stop is None else stop) - first)


def _recorded(work: Work) -> Sent:
    """The images (and pending downloads) a fetch or a partial key starts from."""
    recorded = work.recorded
    if work.verdict not in ("fetch", "rest") or recorded is None:
        return Sent()
    pending = [PendingDownload(*item) for item in recorded.downloads]
    if work.verdict == "rest":
        # A partial key's given-up links are not downloaded again: asked for with the rest.
        now = time.time()
        pending = [p for p in pending if not link_given_up(p.tries, p.first_failed_at, now)]
    return Sent(
        images=[ImageRecord(**image) for image in recorded.images],
        pending=pending,
        usage=recorded.usage if work.verdict == "rest" else None,
        # The answer these images came in, until a later answer brings more.
        answered=recorded.answered,
    )


def _status(sent: Sent, n: int) -> str:
    """The line a key's images so far make: every image generated (ok, or download_failed
    while some still wait for their download), none (failed), or some (partial)."""
    if sent.generated >= n:
        return DOWNLOAD_FAILED if sent.pending else OK
    return PARTIAL if sent.generated else FAILED


def _made(result: Result) -> int:
    """Images a recorded line says were generated."""
    return 0 if result.status == FAILED else len(result.images) + len(result.downloads)


def _maybe_billed(error: APIError) -> bool:
    """A final failure that may have generated (and billed) images all the same."""
    return error.kind == "ambiguous" or possibly_billed(error)
