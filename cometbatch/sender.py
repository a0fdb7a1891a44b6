"""Each request sent at most once at a time, its old images set aside, its result recorded."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .aside import (
    REPLACED_DIR,
    find_whole,
    plan_aside,
    put_back,
    reinstated_event,
    set_aside,
    withdraw_event,
    withdrawn,
)
from .budget import Budget, CapReason, request_cost
from .dispatch import Dispatcher, Sent, Stopped, fatal_error
from .errors import APIError, OutputError
from .events import now_iso
from .ledger import Ledger
from .plan import Request, remainder
from .prices import PriceTable, estimate
from .results import DOWNLOAD_FAILED, FAILED, OK, PARTIAL, PendingDownload, Result, Summary
from .resume import decide
from .retry import possibly_billed
from .sink import ImageRecord
from .state import KeyState
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
                self.triage.count("reuse" if shared.ok else "keep", request, planned=False)
                return dataclasses.replace(shared, reused=True)
        state = self._ledger().state.get(request.key)
        # (A key to restore is ok in the ledger: its files are what triage found gone.)
        if (
            state is not None
            and work.verdict != "restore"
            and decide(request.fingerprint, state, retry_failed=False) == "reuse"
        ):
            # Done since it was queued (the same job twice in a caller's list): reuse it.
            self.triage.count("reuse", request, planned=False)
            return self.triage.reused(request, state)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._inflight[request.key] = future
        try:
            result = await self._reinstate(work) if work.verdict == "restore" else None
            if result is None:
                result = await self._send_and_record(work)
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[request.key]

    async def _send_and_record(self, work: Work) -> Result:
        """One request from send to ledger line; API failures become a failed Result.

        A short answer is recorded (a partial line) before the missing images are asked for
        under the same key; each line lists every image of the key so far."""
        request = work.request
        if not self._writable:
            # Before the first request is paid for: its images must have somewhere to go.
            await asyncio.to_thread(self.dispatcher.sink.check_writable)
            self._writable = True
        started = asyncio.get_running_loop().time()
        # Images an earlier run paid for (a fetch, or the rest of a partial key), and their cost.
        sent = _recorded(work)
        earlier = _Paid(sent.generated, self._cost(request, sent)[0])
        if sent.pending:
            # Generated (and paid for) already: only the downloads are tried again.
            await self.dispatcher.refetch(request.job.id, list(sent.pending), sent)
        if sent.generated >= request.n:
            result = await self._record(work, sent, started)
        else:
            result = await self._generate(work, sent, started, earlier)
        self.summary.add(result, paid=False)
        # The line carries the key's whole cost; this run's spend is what it added.
        made = _made(result) - earlier.images
        cost = result.cost_usd
        self.summary.pay(None if cost is None else cost - (earlier.cost or 0.0), made)
        return result

    async def _generate(self, work: Work, sent: Sent, started: float, earlier: _Paid) -> Result:
        """Ask for the key's missing images until they all came, a request fails, or the run
        stops; each short answer is recorded before the next request is sent."""
        request = work.request
        follow = remainder(request, sent.generated)
        part, reserved = await self._send(work, follow)
        # The reservation covers every follow-up: each asks for fewer images than the first.
        reservation = (follow.n, reserved)
        # The last line written for the key.
        last: Result | None = None
        try:
            while True:
                sent.add(part)
                failed = part.error is not None and not part.pending
                last = await self._record(work, sent, started)
                if failed or sent.generated >= request.n:
                    return last
                follow = remainder(request, sent.generated)
                try:
                    part = await self._follow_up(follow)
                except Stopped:
                    # The partial line stands: the next run asks for the rest.
                    return last
        finally:
            if self.budget is not None:
                self._settle(self.budget, reservation, last, sent, earlier)

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

    async def _record(self, work: Work, sent: Sent, started: float) -> Result:
        """Append the key's line for what it has so far; the Result it records."""
        request = work.request
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
            latency_s=asyncio.get_running_loop().time() - started,
            finished_at=now_iso(),
            usage=sent.usage,
            rate_limited=sent.rate_limited,
            cost_usd=cost,
            cost_basis=basis,
        )
        await self._ledger().append(result.to_event())
        return result

    async def _send(self, work: Work, request: Request) -> tuple[Sent, float | None]:
        """Generate `request` (the key's missing images) within the budget (when caps are
        set); the sent outcome and the dollars reserved for it (settled by `_settle`)."""
        recorded = work.recorded
        budget = self.budget
        reserved: float | None = None
        if budget is not None:
            reserved = estimate(request, self.prices)
            cap = budget.reserve(request.n, reserved)
            if cap is not None:
                # Nothing was sent; the run takes no new work, requests under way still land.
                if self._refused is not None:
                    self._refused(cap)
                raise Stopped
        try:
            if work.verdict in ("changed", "restore") and recorded is not None:
                await self._set_aside(work, recorded)
            try:
                return await self.dispatcher.send(request), reserved
            except APIError as exc:
                raise fatal_error(exc, self.base_url) from exc
        except BaseException:
            if budget is not None:
                budget.release(request.n, reserved)
            raise

    def _settle(
        self,
        budget: Budget,
        reservation: tuple[int, float | None],
        last: Result | None,
        sent: Sent,
        earlier: _Paid,
    ) -> None:
        """Replace a key's reservation by what its recorded lines made and cost this run; a
        failure that may have been billed keeps its estimate."""
        images, reserved = reservation
        made = 0 if last is None else _made(last) - earlier.images
        cost = None if last is None else last.cost_usd
        if made:
            spent = (reserved or 0.0) if cost is None else cost - (earlier.cost or 0.0)
        elif sent.ambiguous or (sent.error is not None and _maybe_billed(sent.error)):
            spent = reserved or 0.0
        else:
            spent = 0.0
        budget.settle(images, reserved, made, spent)

    async def _set_aside(self, work: Work, recorded: KeyState) -> None:
        """Take a key's recorded images out of ok before it is generated again: first a line
        that says so, then the files moved to OUT/replaced/<run>/ (never overwritten), so
        that a kill at any point leaves a ledger that names only files that are there."""
        latest = await asyncio.to_thread(_latest_line, recorded)
        earlier = withdrawn(latest)
        images = earlier if earlier is not None else list(latest.get("images") or ())
        where = f"{REPLACED_DIR}/{self.run_id}/"
        if work.verdict == "changed":
            kind = "replaced"
            message = f"the job changed: its images were set aside in {where} to generate it again"
        else:
            error = latest.get("error")
            kind = error["kind"] if earlier is not None and isinstance(error, dict) else ""
            kind = kind if kind in ("missing_image", "corrupt_image") else "missing_image"
            message = (
                f"images of this request were gone or damaged; the rest were set aside in "
                f"{where} to generate it again"
            )
            self.summary.regenerated_missing += 1
        try:
            planned = await asyncio.to_thread(plan_aside, self.out_dir, self.run_id, images)
            line = withdraw_event(
                latest,
                planned,
                run_id=self.run_id,
                kind=kind,
                message=message,
                finished_at=now_iso(),
            )
            await self._ledger().append(line)
            relpaths = [image["path"] for image in images]
            moved = await asyncio.to_thread(set_aside, self.out_dir, self.run_id, relpaths)
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
        """Record again the images a key's line withdrew when each is whole (at its path or
        where it was set aside), moved back first: nothing is sent. None if one is not."""
        recorded = work.recorded
        if recorded is None:
            return None
        latest = await asyncio.to_thread(recorded.line_event)
        images = withdrawn(latest)
        if not images or latest is None:
            return None
        found = await asyncio.to_thread(find_whole, self.out_dir, images)
        if found is None:
            return None
        try:
            await asyncio.to_thread(put_back, self.out_dir, images, found)
        except OSError as exc:
            raise OutputError(
                f"cannot move the images of job {recorded.job_id!r} back in {self.out_dir}: "
                f"{exc.strerror or exc}"
            ) from exc
        line = reinstated_event(latest, run_id=self.run_id, finished_at=now_iso())
        await self._ledger().append(line)
        self.summary.restored_images += len(images)
        self.triage.count("reuse", work.request, planned=False)
        records = tuple(ImageRecord(**image) for image in line["images"])
        return Result.of(work.request, self.run_id, OK, images=records, reused=True)


@dataclasses.dataclass(frozen=True, slots=True)
class _Paid:
    """What a key's earlier runs paid for: images generated, and their cost."""

    images: int
    cost: float | None


def _latest_line(recorded: KeyState) -> dict[str, Any]:
    """A key's latest ledger line (rebuilt from its state when that is held in memory)."""
    event = recorded.line_event()
    if event is not None:
        return event
    return {
        "key": recorded.key,
        "job_id": recorded.job_id,
        "fingerprint": recorded.fingerprint,
        "n": recorded.n,
        "images": recorded.images,
    }


def _recorded(work: Work) -> Sent:
    """The images (and pending downloads) a fetch or a partial key starts from."""
    recorded = work.recorded
    if work.verdict not in ("fetch", "rest") or recorded is None:
        return Sent()
    return Sent(
        images=[ImageRecord(**image) for image in recorded.images],
        pending=[PendingDownload(*item) for item in recorded.downloads],
        usage=recorded.usage if work.verdict == "rest" else None,
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
