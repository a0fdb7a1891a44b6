"""Each request sent at most once at a time, its old images set aside, its result recorded."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from .aside import REPLACED_DIR, set_aside
from .budget import Budget, CapReason, request_cost
from .dispatch import Dispatcher, Sent, Stopped, fatal_error
from .errors import APIError, OutputError
from .events import now_iso
from .ledger import Ledger
from .prices import PriceTable, estimate
from .results import FAILED, PendingDownload, Result, Summary
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
        if state is not None and decide(request.fingerprint, state, retry_failed=False) == "reuse":
            # Done since it was queued (the same job twice in a caller's list): reuse it.
            self.triage.count("reuse", request, planned=False)
            return self.triage.reused(request, state)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._inflight[request.key] = future
        try:
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
        """One request from send to ledger line; API failures become a failed Result."""
        ledger = self._ledger()
        request, recorded = work.request, work.recorded
        loop = asyncio.get_running_loop()
        if not self._writable:
            # Before the first request is paid for: its images must have somewhere to go.
            await asyncio.to_thread(self.dispatcher.sink.check_writable)
            self._writable = True
        started = loop.time()
        if work.verdict == "fetch" and recorded is not None:
            # Generated (and paid for) in an earlier run: only its downloads are tried again.
            sent = Sent(images=[ImageRecord(**image) for image in recorded.images])
            pending = [PendingDownload(*item) for item in recorded.downloads]
            await self.dispatcher.refetch(request.job.id, pending, sent)
            reserved: float | None = None
        else:
            sent, reserved = await self._send(work)
        job = request.job
        generated = 0 if sent.status == FAILED else len(sent.images) + len(sent.pending)
        cost, basis = request_cost(
            job.model, sent.usage, generated, job.size, job.quality, self.prices
        )
        result = Result.of(
            request,
            self.run_id,
            sent.status,
            images=tuple(sent.images),
            downloads=tuple(sent.pending),
            attempts=sent.attempts,
            ambiguous_retries=sent.ambiguous,
            error=sent.error.to_record() if sent.error else None,
            latency_s=loop.time() - started,
            finished_at=now_iso(),
            usage=sent.usage,
            rate_limited=sent.rate_limited,
            cost_usd=cost,
            cost_basis=basis,
        )
        if self.budget is not None and work.verdict != "fetch":
            self._settle(self.budget, result, sent, reserved)
        await ledger.append(result.to_event())
        # A fetch pays nothing now: its line carries the request's cost, this run's spend not.
        self.summary.add(result, paid=work.verdict != "fetch")
        return result

    async def _send(self, work: Work) -> tuple[Sent, float | None]:
        """Generate a request within the budget (when caps are set); the sent outcome and
        the dollars reserved for it (settled by `_settle` once its result is known)."""
        request, recorded = work.request, work.recorded
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
            if work.verdict == "changed" and recorded is not None:
                await self._set_aside(recorded)
            try:
                return await self.dispatcher.send(request), reserved
            except APIError as exc:
                raise fatal_error(exc, self.base_url) from exc
        except BaseException:
            if budget is not None:
                budget.release(request.n, reserved)
            raise

    def _settle(self, budget: Budget, result: Result, sent: Sent, reserved: float | None) -> None:
        """Replace a request's reservation by what it made and cost; a failure that may have
        been billed keeps its estimate."""
        made = 0 if result.status == FAILED else len(result.images) + len(result.downloads)
        if made:
            spent = (reserved or 0.0) if result.cost_usd is None else result.cost_usd
        elif sent.ambiguous or (sent.error is not None and _maybe_billed(sent.error)):
            spent = reserved or 0.0
        else:
            spent = 0.0
        budget.settle(result.n, reserved, made, spent)

    async def _set_aside(self, recorded: KeyState) -> None:
        """Move a changed job's recorded images out of the way before regenerating them."""
        relpaths = [image["path"] for image in recorded.images]
        try:
            moved = await asyncio.to_thread(set_aside, self.out_dir, self.run_id, relpaths)
        except OSError as exc:
            raise OutputError(
                f"cannot move the old images of job {recorded.job_id!r} aside in "
                f"{self.out_dir}: {exc.strerror or exc}"
            ) from exc
        if moved:
            log.info(
                "job %r changed: %d old image(s) moved to %s",
                recorded.job_id,
                moved,
                self.out_dir / REPLACED_DIR / self.run_id,
            )


def _maybe_billed(error: APIError) -> bool:
    """A final failure that may have generated (and billed) images all the same."""
    return error.kind == "ambiguous" or possibly_billed(error)
