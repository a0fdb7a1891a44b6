"""A request's life: acts on triage's verdict, sends within the budget, records each line."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..costs.budget import BUDGET_REASONS, Budget, cap_text
from ..costs.prices import PriceTable, estimate, request_cost
from ..errors import APIError
from ..layouts import RunLayout
from ..ledger.events import now_iso
from ..ledger.keystate import KeyState
from ..ledger.writer import Ledger
from ..plan import Request, remainder
from ..results import FAILED, OK, ImageRecord, Result
from ..store.setaside import carry
from .attempts import Attempts, CapReached, Sent, Stopped, fatal_error
from .keyparts import key_status, made_images, maybe_billed, next_part, recorded_sent
from .restore import Restorer
from .summary import Summary
from .triage import Triage, Work

log = logging.getLogger(__name__)


class RequestLife:
    """Each request from triage's verdict to its ledger lines; one at a time per key."""

    def __init__(
        self,
        *,
        attempts: Attempts,
        triage: Triage,
        ledger: Ledger,
        out_dir: Path | str,
        run_id: str,
        summary: Summary,
        base_url: str,
        prices: PriceTable,
        budget: Budget | None = None,
        layout: RunLayout,
    ) -> None:
        self.attempts = attempts
        self.layout = layout  # ok lines' images go to it (shard layouts pack them)
        self.triage = triage
        self._ledger = ledger
        self.out_dir = out_dir
        self.run_id = run_id
        self.summary = summary
        self.base_url = base_url
        self.prices = prices
        # Caps (None: none set, and no bookkeeping at all).
        self.budget = budget
        self._restorer = Restorer(
            out_dir=out_dir,
            run_id=run_id,
            ledger=ledger,
            fetcher=attempts.fetcher,
            sink=attempts.sink,
        )
        # Requests being sent now, by key: a second caller of the same key shares the result.
        self._inflight: dict[str, asyncio.Future[Result]] = {}
        # Work triaged and not finished yet, by key; and keys that got a line while another
        # piece of work for them waited (the same job twice): its verdict is out of date.
        self._admitted: dict[str, int] = {}
        self._moved: set[str] = set()
        self._writable = False

    def __repr__(self) -> str:
        return f"<RequestLife sending={len(self._inflight)} attempts={self.attempts!r}>"

    def admit(self, work: Work) -> Work:
        """Note triaged work before it waits for a worker (see `_moved`); the same work."""
        key = work.request.key
        self._admitted[key] = self._admitted.get(key, 0) + 1
        return work

    async def execute(self, work: Work) -> Result:
        """Act on the work's verdict, or share the result of the same key being sent now."""
        try:
            return await self._execute(work)
        finally:
            key = work.request.key
            left = self._admitted.get(key, 0) - 1
            if left > 0:
                self._admitted[key] = left
            else:
                self._admitted.pop(key, None)
                self._moved.discard(key)

    async def _execute(self, work: Work) -> Result:
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
        restoring = work.verdict in ("restore", "redownload")
        if request.key in self._moved and not restoring:
            # Recorded since it was triaged (the same job twice, or a first caller gone after
            # a line): triage decides again. (A key to restore is ok: its files are gone.)
            verdict, state = self.triage.again(request)
            if verdict == "reuse" and state is not None:
                self.triage.count("reuse", request, planned=False)
                return self.triage.reused(request, state)
            if verdict in ("rest", "fetch"):
                work = Work(request, verdict, state)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._inflight[request.key] = future
        try:
            result = await self._put_back(work) if restoring else None
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

    async def _send_and_record(self, work: Work) -> Result:
        """One request from send to ledger lines; API failures become a failed Result."""
        # A short answer is recorded (a partial line) before the missing images are asked
        # for under the same key; each line lists every image of the key so far.
        request = work.request
        if not self._writable:
            # Before the first request is paid for: its images must have somewhere to go.
            await asyncio.to_thread(self.attempts.sink.check_writable)
            self._writable = True
        # Images an earlier run paid for (a fetch, or a partial key's rest), and their cost.
        sent = recorded_sent(work)
        cost = self._cost(request, sent)[0] if sent.generated else 0.0
        key = _Key(
            work, sent, asyncio.get_running_loop().time(), _Paid(sent.generated, cost),
            written=len(sent.images),
        )  # fmt: skip
        try:
            if sent.pending:
                # Generated (and paid for) already: only the downloads are tried again.
                await self.attempts.refetch(request.job.id, list(sent.pending), sent)
            if sent.generated >= request.n:
                return await self._record(key)
            return await self._generate(key)
        finally:
            # From the key's last line, also when a stop cancelled a follow-up (the line stands).
            if key.last is not None:
                self._count(key, key.last)

    def _count(self, key: _Key, result: Result) -> None:
        """Count a key's last line in the summary: only what this run wrote and paid for."""
        self.summary.add(result, paid=False, written_before=key.written)
        # The line carries the key's whole cost; this run's spend is what it added.
        made = made_images(result) - key.earlier.images
        cost = result.cost_usd
        self.summary.pay(None if cost is None else cost - (key.earlier.cost or 0.0), made)
        if key.aside_kind in ("missing_image", "corrupt_image") and made:
            # Generated again because a file was gone or damaged (counted once answered).
            self.summary.regenerated_missing += 1

    async def _generate(self, key: _Key) -> Result:
        """Ask for a key's missing images until all came, one fails, or the run stops."""
        work, sent = key.work, key.sent
        request = work.request
        # The reservation covers every follow-up: together they ask for the missing count.
        missing = remainder(request, sent.generated)
        part, reserved = await self._send(key, next_part(request, sent), missing)
        reservation = (missing.n, reserved)
        try:
            while True:
                sent.add(part)
                failed = part.error is not None and not part.pending
                last = await self._record(key)
                if failed or sent.generated >= request.n:
                    return last
                try:
                    # The rest of a short answer (the reservation covers it).
                    part = await self._attempt(next_part(request, sent))
                except Stopped:
                    # The partial line stands: the next run asks for the rest.
                    return last
        finally:
            if self.budget is not None:
                self._settle(self.budget, reservation, key)

    async def _attempt(self, request: Request) -> Sent:
        """Send a request (all its attempts); an error every request would get stops the run."""
        try:
            return await self.attempts.send(request)
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
        status = key_status(sent, request.n)
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
        await self._ledger.append(line)
        self._moved_by(line)
        key.last = result
        # Recorded: the task holds nothing paid for and unrecorded (a follow-up may wait for
        # its slot a while; a stop need not wait for it, nor count it as cut off).
        self.attempts.recorded()
        if result.ok:
            self.layout.add(result)
            await self.layout.pack_full()
        return result

    async def _send(
        self, key: _Key, request: Request, reserve: Request
    ) -> tuple[Sent, float | None]:
        """Send the key's first missing images, reserving the budget for all of `reserve`
        (the outcome, and the dollars reserved, settled by `_settle`)."""
        work = key.work
        recorded = work.recorded
        budget = self.budget
        reserved: float | None = None
        if budget is not None:
            reserved = estimate(reserve, self.prices)
            cap = budget.reserve(reserve.n, reserved)
            if cap is not None:
                self._capped(budget, cap)
                raise CapReached(cap)
        try:
            if work.verdict in ("changed", "restore") and recorded is not None:
                key.withdrawing, key.aside_kind = await self._restorer.set_aside(
                    work.verdict, recorded
                )
                self._moved_by(key.withdrawing)
            return await self._attempt(request), reserved
        except BaseException as exc:
            if budget is not None:
                budget.release(reserve.n, reserved)
                # A shared budget (a cluster's) answers at the slot, after the reservation.
                if isinstance(exc, CapReached) and exc.reason in BUDGET_REASONS:
                    self._capped(budget, exc.reason)
            raise

    def _capped(self, budget: Budget, cap: str) -> None:
        """A cap stops new requests; the summary names the first one (unless interrupted)."""
        if self.summary.stopped is None and not self.summary.interrupted:
            self.summary.stopped = cap
            log.info("%s; no new requests start", cap_text(budget))

    def _settle(self, budget: Budget, reservation: tuple[int, float | None], key: _Key) -> None:
        """Replace a key's reservation by what its lines made and cost (maybe billed: kept)."""
        images, reserved = reservation
        last, sent, earlier = key.last, key.sent, key.earlier
        made = 0 if last is None else made_images(last) - earlier.images
        cost = None if last is None else last.cost_usd
        if made:
            spent = (reserved or 0.0) if cost is None else cost - (earlier.cost or 0.0)
        elif sent.ambiguous or (sent.error is not None and maybe_billed(sent.error)):
            spent = reserved or 0.0
        else:
            spent = 0.0
        budget.settle(images, reserved, made, spent)

    async def _put_back(self, work: Work) -> Result | None:
        """Record a key to restore again from its whole images (None: not all whole)."""
        put = await self._restorer.put_back(work)
        if put is None:
            return None
        line, restored = put
        self._moved_by(line)
        self.summary.restored_images += restored
        if line["status"] != OK:
            # Put back as the partial or download_failed line it was: triage decides again.
            verdict, state = self.triage.again(work.request)
            assert state is not None  # its line was just appended
            if verdict in ("rest", "fetch", "send"):
                return await self._send_and_record(Work(work.request, verdict, state))
            self.triage.count("keep", work.request, planned=False)
            return self.triage.kept(work.request, state)
        self.triage.count("reuse", work.request, planned=False)
        records = tuple(ImageRecord(**image) for image in line["images"])
        return Result.of(work.request, self.run_id, OK, images=records, reused=True)

    def _moved_by(self, line: dict[str, Any]) -> None:
        """A key's line was appended: other work for it waiting meanwhile must look again."""
        if self._admitted.get(line["key"], 0) > 1:
            self._moved.add(line["key"])


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
    # The line that withdrew its images this run, and its kind (see Restorer.set_aside).
    withdrawing: dict[str, Any] | None = None
    aside_kind: str | None = None


def _withdrawing_line(recorded: KeyState) -> dict[str, Any] | None:
    """A failed key's latest line, when it lists withdrawn images (else None, unread)."""
    if recorded.status != FAILED or not recorded.withdraws:
        return None
    return recorded.line_event()
