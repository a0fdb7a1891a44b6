"""A request's attempts: the paid-for window is never cancellable, and which errors stop a run."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from support import no_sleep

from cometbatch import (
    APIConnectionError,
    APIError,
    APIResponseError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    IncompatibleAPIError,
    Job,
    ModelRegistry,
    NotFoundError,
    ServerError,
    SimConfig,
    Simulator,
    Summary,
)
from cometbatch.engine.attempts import Attempts, fatal_error, is_fatal
from cometbatch.engine.inflight import Halt, InFlight
from cometbatch.net.client import Client
from cometbatch.net.limits import Limiter
from cometbatch.net.retry import RetryPolicy
from cometbatch.plan import Request, plan_job
from cometbatch.store.sink import Sink


class Marks(InFlight):
    """An InFlight that also lists each time a task starts (True) or stops holding a request."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bool] = []

    def mark_busy(self, busy: bool) -> None:
        self.calls.append(busy)
        super().mark_busy(busy)


def attempts_for(
    client: Client,
    limiter: Limiter,
    tmp_path: Path,
    *,
    sleep: Callable[[float], Awaitable[None]] = no_sleep,
    inflight: InFlight | None = None,
    policy: RetryPolicy | None = None,
) -> Attempts:
    """Attempts over real parts, with no real waiting."""
    summary = Summary()
    return Attempts(
        client=client,
        limiter=limiter,
        sink=Sink(tmp_path),
        policy=policy or RetryPolicy(max_attempts=3),
        summary=summary,
        inflight=inflight or InFlight(),
        halt=Halt(summary),
        sleep=sleep,
    )


def one_request() -> Request:
    job = Job(id="d", prompt="p", model="dall-e-3", response_format="b64_json")
    (request,) = plan_job(job, ModelRegistry().get("dall-e-3"))
    return request


async def send_once(tmp_path: Path, *faults: str) -> tuple[list[bool], bool]:
    """Send one dall-e-3 request through real attempts; return the busy calls and success."""
    marks = Marks()
    async with (
        Simulator(SimConfig()) as sim,
        Client(base_url=sim.base_url, api_key="sk-test") as client,
        Limiter(concurrency=2) as limiter,
    ):
        sim.enqueue(*faults)
        sent = await attempts_for(client, limiter, tmp_path, inflight=marks).send(one_request())
    return marks.calls, sent.error is None and len(sent.images) == 1


async def test_a_successful_request_stays_busy_until_recorded(tmp_path: Path) -> None:
    """After a successful generation the task is never marked idle (a stop must not cancel it)."""
    calls, ok = await send_once(tmp_path)
    assert ok
    assert calls == [True]


async def test_a_failed_attempt_is_idle_while_it_waits_to_retry(tmp_path: Path) -> None:
    """A failed attempt marks the task idle (its retry wait may be cut short), then busy again."""
    calls, ok = await send_once(tmp_path, "500")
    assert ok
    assert calls == [True, False, True]


@pytest.mark.parametrize(
    ("exc", "fatal"),
    [
        (AuthenticationError("bad key", status=401), True),
        (IncompatibleAPIError("an HTML page"), True),
        (APIResponseError("an odd answer", retryable=False), False),
        (APIResponseError("truncated JSON", retryable=True), False),
        (NotFoundError("html 404", status=404), True),
        (NotFoundError("no such model", status=404, request_id="2026abc"), False),
        (BadRequestError("bad size", status=400, request_id="2026abc"), False),
        (ServerError("overloaded", status=503, retryable=True), False),
        (APIConnectionError("TLS certificate check failed", retryable=False), True),
        (APIConnectionError("connection refused", sent=False), False),
        (APIConnectionError("dropped while waiting", sent=True), False),
    ],
)
def test_which_errors_stop_the_run(exc: APIError, fatal: bool) -> None:
    """Errors every request would get alike stop the run; the others fail only their job."""
    assert is_fatal(exc) is fatal


def test_a_wrong_url_becomes_a_configuration_error() -> None:
    """A route that is not there is reported as a base-URL problem naming the URL."""
    error = fatal_error(NotFoundError("page", status=404), "http://127.0.0.1:9/api")
    assert isinstance(error, ConfigError)
    assert "http://127.0.0.1:9/api does not look like an OpenAI-compatible API" in str(error)


async def test_waiting_counts_requests_sleeping_before_a_retry(tmp_path: Path) -> None:
    """While a request sleeps before its next attempt, it is counted as waiting."""
    seen: list[int] = []
    async with (
        Simulator(SimConfig()) as sim,
        Client(base_url=sim.base_url, api_key="sk-test") as client,
        Limiter(concurrency=1) as limiter,
    ):
        sim.enqueue("429", "503")

        async def sleep(_: float) -> None:
            seen.append(attempts.waiting)

        attempts = attempts_for(client, limiter, tmp_path, sleep=sleep)
        sent = await attempts.send(one_request())
    assert sent.error is None
    assert seen == [1, 1]
    assert attempts.waiting == 0


async def test_a_final_failure_stays_busy_until_recorded(tmp_path: Path) -> None:
    """A failure that is not retried keeps the task busy, so its ledger line cannot be cut off."""
    calls, ok = await send_once(tmp_path, "400")
    assert not ok
    assert calls == [True]


@pytest.mark.parametrize("fault", ["504", "524", "drop", "malformed"])
async def test_a_possibly_billed_failure_is_not_resent_when_ambiguous_retries_are_off(
    tmp_path: Path, fault: str
) -> None:
    """With retry_ambiguous off, a failure after the request left fails as a kept 'ambiguous'."""
    async with (
        Simulator(SimConfig()) as sim,
        Client(base_url=sim.base_url, api_key="sk-test") as client,
        Limiter(concurrency=2) as limiter,
    ):
        sim.enqueue(fault)
        policy = RetryPolicy(max_attempts=3, retry_ambiguous=False)
        sent = await attempts_for(client, limiter, tmp_path, policy=policy).send(one_request())
        assert sim.stats.requests == 1
    assert sent.attempts == 1 and sent.ambiguous == 0
    assert sent.error is not None
    record = sent.error.to_record()
    assert record["kind"] == "ambiguous"
    # Kept on the next run (not resent behind the user's back) until --retry-failed.
    assert record["retryable"] is False
    assert "may have been generated and billed" in record["message"]


@pytest.mark.parametrize("fault", ["fewer-images", "short"])
async def test_a_short_answer_is_kept_and_not_retried(tmp_path: Path, fault: str) -> None:
    """An answer with fewer images than asked is one paid attempt: its images are written (at
    the request's indexes) and returned, nothing is sent again, nothing counted as billed twice."""
    job = Job(id="d", prompt="p", model="dall-e-2", n=4, response_format="b64_json")
    (request,) = plan_job(job, ModelRegistry().get("dall-e-2"))
    async with (
        Simulator(SimConfig()) as sim,
        Client(base_url=sim.base_url, api_key="sk-test") as client,
        Limiter(concurrency=2) as limiter,
    ):
        sim.enqueue(fault)
        sent = await attempts_for(client, limiter, tmp_path).send(request)
        assert sim.stats.requests == 1
    assert sent.error is None and (sent.attempts, sent.ambiguous) == (1, 0)
    count = 3 if fault == "fewer-images" else 2
    assert [image.index for image in sent.images] == list(range(count))
    assert sorted(p.name for p in (tmp_path / "images" / "d").iterdir()) == [
        f"{k}.png" for k in range(count)
    ]


async def test_a_possibly_billed_retry_is_counted(tmp_path: Path) -> None:
    """By default the same failure is retried, and the retry is counted as possibly billed."""
    async with (
        Simulator(SimConfig()) as sim,
        Client(base_url=sim.base_url, api_key="sk-test") as client,
        Limiter(concurrency=2) as limiter,
    ):
        sim.enqueue("drop", "500")
        sent = await attempts_for(client, limiter, tmp_path).send(one_request())
    assert sent.error is None and sent.attempts == 3
    # The drop may have been billed; the 500 was not.
    assert sent.ambiguous == 1


async def test_each_retry_is_logged_with_its_job_status_kind_and_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """-v retry lines name the job and key, the HTTP status and error kind, and the wait and
    where it came from (Retry-After or backoff); the request counts its 429s."""
    async with (
        Simulator(SimConfig(retry_after=1.0)) as sim,
        Client(base_url=sim.base_url, api_key="sk-test") as client,
        Limiter(concurrency=2) as limiter,
    ):
        sim.enqueue("429", "500")
        with caplog.at_level(logging.INFO, logger="cometbatch.engine.attempts"):
            sent = await attempts_for(client, limiter, tmp_path).send(one_request())
    assert sent.error is None and sent.rate_limited == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retry ")]
    assert len(lines) == 2
    assert lines[0].startswith(
        "retry 1 of job d (key d#0): 429 rate_limit, waiting 1.0 s (Retry-After): "
    )
    assert lines[1].startswith("retry 2 of job d (key d#0): 500 server, waiting ")
    assert "(backoff): " in lines[1]
    assert "sk-test" not in "".join(lines)
