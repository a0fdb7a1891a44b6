"""A request's attempts: each under the shared limits, retried, its images stored."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity import RetryCallState

from ..errors import (
    APIConnectionError,
    APIError,
    APIResponseError,
    CometBatchError,
    ConfigError,
    IncompatibleAPIError,
    UpstreamDownError,
)
from ..ledger.runlines import sent_line
from ..ledger.writer import Ledger
from ..net.answered import Answered
from ..net.client import Client
from ..net.limits import Limiter, Outcome
from ..net.response import ImagesResponse
from ..net.retry import RetryPolicy, possibly_billed, retrying
from ..plan import Request
from ..results import DOWNLOAD_FAILED, FAILED, OK, ImageRecord, PendingDownload, add_usage
from ..store.sink import Sink
from .fetch import Fetcher, output_error
from .inflight import Halt, InFlight
from .summary import Summary

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
# Failures that say "the server is overloaded" and slow the whole engine down; a rejected
# prompt says nothing about the server's capacity.
THROTTLE_KINDS = frozenset({"rate_limit", "server", "timeout", "ambiguous", "connection"})


class Stopped(Exception):
    """A request that was not started (or not retried) because the run is stopping."""


class CapReached(Stopped):
    """A request not sent because it would cross a budget cap (`reason`: which one)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_fatal(exc: APIError) -> bool:
    """Errors that every request would get alike: stop the run instead of failing each job."""
    if exc.kind == "auth":
        return True
    if isinstance(exc, IncompatibleAPIError):
        return True
    if isinstance(exc, APIConnectionError) and not exc.retryable:
        # A TLS certificate the client refuses: no request to that host can succeed.
        return True
    # A 404 without CometAPI's JSON error (which always carries a request id) is a wrong URL.
    return exc.kind == "not_found" and exc.request_id is None and exc.code is None


def never_reached(exc: APIError) -> bool:
    """A failure before the request left this machine (refused, DNS, connect timeout)."""
    return isinstance(exc, APIConnectionError) and not exc.sent


def fatal_error(exc: APIError, base_url: str) -> CometBatchError:
    """The run-stopping form of a fatal error (a wrong URL is a configuration error)."""
    if never_reached(exc):
        return UpstreamDownError(
            f"{exc}; stopping (nothing of the request was sent) — check --base-url and the "
            "network, then run the same command again to resume"
        )
    if exc.kind == "not_found":
        return ConfigError(
            f"{base_url} does not look like an OpenAI-compatible API: "
            f"POST /images/generations answered {exc.status} ({exc}); check --base-url"
        )
    return exc


def ambiguous_failure(exc: APIError) -> APIError:
    """A possibly billed failure that was not retried: kept (not resent) until --retry-failed."""
    return APIError(
        f"{exc.message} — the image may have been generated and billed, so it was not sent "
        "again (retry_ambiguous is off; --retry-failed sends it again)",
        kind="ambiguous",
        status=exc.status,
        code=exc.code,
        request_id=exc.request_id,
        retryable=False,
    )


@dataclass(slots=True)
class Sent:
    """What one request came to: its images or its error, and how many attempts it took."""

    images: list[ImageRecord] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    # What the latest answer with images said about itself (its request id, size, ...).
    answered: Answered | None = None
    error: APIError | None = None
    attempts: int = 0
    ambiguous: int = 0
    # 429 answers met on the way (retried ones included).
    rate_limited: int = 0
    # Images generated whose download failed: kept with their URL, fetched again later.
    pending: list[PendingDownload] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The ledger status this outcome records."""
        if self.pending:
            return DOWNLOAD_FAILED
        return FAILED if self.error is not None else OK

    @property
    def generated(self) -> int:
        """Images generated: written, or waiting for their download."""
        return len(self.images) + len(self.pending)

    def add(self, part: Sent) -> None:
        """Fold in a follow-up's outcome: the same key's images so far, and what it took."""
        self.images.extend(part.images)
        self.images.sort(key=lambda image: image.index)
        self.pending.extend(part.pending)
        if part.usage:
            # Summed into a new object: the recorded usage it starts from is left as it was.
            total: dict[str, Any] = {}
            if isinstance(self.usage, dict):
                add_usage(total, self.usage)
            add_usage(total, part.usage)
            self.usage = total
        if part.answered:
            self.answered = part.answered
        if part.error is not None:
            self.error = part.error
        self.attempts += part.attempts
        self.ambiguous += part.ambiguous
        self.rate_limited += part.rate_limited


def _check_count(request: Request, response: ImagesResponse) -> None:
    # A short answer is not a failure: its images are paid for, so they are stored and the
    # request's life asks for the rest. Only an answer without a single image is malformed.
    if not response.data:
        raise APIResponseError(
            f"asked for {request.n} image(s), the API answered none",
            retryable=True,
            maybe_billed=False,
        )


def retry_logger(request: Request) -> Callable[[RetryCallState], None]:
    """tenacity's before_sleep for one request: a -v line naming it, the failure, the wait."""

    def log_retry(state: RetryCallState) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        if isinstance(exc, APIError):
            what = f"{exc.status} {exc.kind}" if exc.status is not None else exc.kind
            why = "Retry-After" if exc.retry_after is not None else "backoff"
        else:
            what, why = type(exc).__name__, "backoff"
        log.info(
            "retry %d of job %s (key %s): %s, waiting %.1f s (%s): %s",
            state.attempt_number,
            request.job.id,
            request.key,
            what,
            wait,
            why,
            exc,
        )

    return log_retry


class Attempts:
    """Sends requests through the shared limiter and client and writes their images."""

    def __init__(
        self,
        *,
        client: Client,
        limiter: Limiter,
        sink: Sink,
        policy: RetryPolicy,
        summary: Summary,
        inflight: InFlight,
        halt: Halt,
        sleep: Sleep | None = None,
        lend: Callable[[bool], None] | None = None,
        ledger: Ledger | None = None,
        run_id: str = "",
    ) -> None:
        self.limiter = limiter
        self.client = client
        self.sink = sink
        self.policy = policy
        self.summary = summary
        # Knows which tasks hold a sent (paid-for) request: a stop never cancels those.
        self._inflight = inflight
        self._halt = halt
        self._sleep = sleep if sleep is not None else halt.sleep
        # The pool's one hook: a worker waiting to retry lends its slot to a spare worker.
        self._lend = lend
        # Where each attempt's `sent` line goes before it leaves (None: not recorded).
        self._ledger = ledger
        self._run_id = run_id
        # Requests sleeping before their next attempt (for the progress display).
        self.waiting = 0
        # Downloads are retried on their own, with the same backoff; a download holds a
        # paid-for image, so its retry waits keep the task busy (not cancelled).
        self.fetcher = Fetcher(client, sink, policy, self._sleep)

    def __repr__(self) -> str:
        return f"<Attempts waiting={self.waiting} limiter={self.limiter!r}>"

    def recorded(self) -> None:
        """The current task's request is recorded: it holds nothing paid for any more."""
        self._inflight.mark_busy(False)

    async def _wait(self, delay: float) -> None:
        # Only a request waiting to retry holds nothing paid for: a stop may cancel it now.
        self._inflight.mark_busy(False)
        self.waiting += 1
        if self._lend is not None:
            self._lend(True)
        try:
            await self._sleep(delay)
        finally:
            self.waiting -= 1
            if self._lend is not None:
                self._lend(False)

    async def send(self, request: Request) -> Sent:
        """Generate and store one request; API failures are returned, fatal ones raised."""
        sent = Sent()
        try:
            await self._attempts(request, sent)
        except APIError as exc:
            if is_fatal(exc):
                raise
            if never_reached(exc) and self.limiter.ok_total == 0:
                # Not one answer from the API this run, even after every retry: a wrong port
                # or no network. Every request would fare the same: stop, fail no job. (Once
                # the API has answered, an outage is the limiter's to judge: outage_limit.)
                raise
            sent.error = exc
            if exc.retryable and possibly_billed(exc) and not self.policy.retry_ambiguous:
                sent.error = ambiguous_failure(exc)
        return sent

    async def _attempts(self, request: Request, sent: Sent) -> None:
        # Most requests succeed at once: the first attempt is made without building the
        # retry machinery (a real cost at a thousand requests a second). If it fails in a way
        # worth retrying, tenacity takes over and is handed that failure as its own first
        # attempt, so waits, logging and the attempt limit are exactly as if it had made it.
        try:
            return await self._answer(request, sent, None)
        except APIError as exc:
            if not self.policy.should_retry(exc):
                raise
            first: APIError | None = exc
        last = first
        log_retry = retry_logger(request)
        async for attempt in retrying(self.policy, sleep=self._wait, before_sleep=log_retry):
            with attempt:
                if first is not None:
                    failed, first = first, None
                    raise failed
                try:
                    return await self._answer(request, sent, last)
                except APIError as exc:
                    last = exc
                    raise
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _answer(self, request: Request, sent: Sent, last: APIError | None) -> None:
        """One attempt and its images stored; an inline image that is not whole fails it."""
        # It was generated all the same, so a retry counts as possibly billed.
        response = await self._attempt(request, sent, last)
        sent.usage = response.usage
        try:
            await self._store(request, response, sent)
        except APIError as exc:
            # An image that is not whole: the answer's request id is the one to ask about.
            exc.request_id = exc.request_id or response.answered.request_id
            raise
        sent.answered = response.answered

    async def _attempt(self, request: Request, sent: Sent, last: APIError | None) -> ImagesResponse:
        """One attempt under the shared limits; `last` is the previous attempt's failure."""
        if self._halt.is_set():
            raise Stopped
        async with self.limiter.slot(images=request.n, retry=sent.attempts > 0):
            # A stop may have come while this task waited for its slot.
            if self._halt.is_set():
                raise Stopped
            if last is not None and possibly_billed(last):
                sent.ambiguous += 1
            sent.attempts += 1
            # From here the image may be paid for: a stop must not cancel this task until its
            # result is recorded (the engine marks it idle after that).
            self._inflight.mark_busy(True)
            if self._ledger is not None:
                # On the OS's side before the request leaves: if this process dies now, the
                # next run knows the request may have been billed. Lines from one loop turn
                # share one write.
                await self._ledger.append(
                    sent_line(self._run_id, request.key, sent.attempts, request.n)
                )
            try:
                response = await self.client.generate(request.payload)
                _check_count(request, response)
            except APIError as exc:
                # Still busy: a final failure is recorded before the task is idle.
                if exc.kind == "rate_limit":
                    self.summary.rate_limited += 1
                    sent.rate_limited += 1
                outcome: Outcome = "throttled" if exc.kind in THROTTLE_KINDS else "ok"
                self.limiter.record(outcome, detail=str(exc), error=exc)
                raise
            self.limiter.record("ok")
            return response

    async def _store(self, request: Request, response: ImagesResponse, sent: Sent) -> None:
        """Write each image: decode inline ones, download URL ones (never regenerated)."""
        urls = []
        try:
            for offset, item in enumerate(response.data[: request.n]):
                index = request.first_index + offset
                if item.b64_json:
                    try:
                        record = await self.sink.decode_and_write(
                            request.job.id, index, item.b64_json, revised_prompt=item.revised_prompt
                        )
                    except OSError as exc:
                        raise output_error(self.sink, exc) from exc
                    sent.images.append(record)
                elif item.url:
                    urls.append(PendingDownload(index, item.url, item.revised_prompt))
                else:
                    raise APIResponseError(
                        "an image in the answer has neither b64_json nor url", retryable=True
                    )
            if urls:
                await self.refetch(request.job.id, urls, sent)
        except BaseException:
            # The request will not be recorded ok: images it already wrote must not stay behind.
            self.sink.discard(sent.images)
            sent.images.clear()
            raise

    async def refetch(self, job_id: str, pending: list[PendingDownload], sent: Sent) -> None:
        """Download images already generated; what still fails stays pending with its URL."""
        fetched = await self.fetcher.fetch(job_id, pending)
        sent.images.extend(fetched.images)
        sent.images.sort(key=lambda image: image.index)
        sent.pending = fetched.pending
        if fetched.error is not None:
            sent.error = fetched.error
