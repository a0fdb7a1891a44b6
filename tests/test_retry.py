"""Tests for the pure retry decisions and the tenacity factory built on them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from unittest.mock import AsyncMock, Mock, call

import pytest
from multidict import CIMultiDict
from pydantic import SecretStr

from cometbatch import (
    APIConnectionError,
    APIError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ContentPolicyError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    Settings,
)
from cometbatch.net.retry import (
    RetryPolicy,
    backoff,
    classify_status,
    make_status_error,
    not_the_api,
    parse_error_body,
    parse_retry_after,
    possibly_billed,
    retrying,
)

# 2023-09-29 16:26:37 GMT, the instant openai-python's Retry-After table is written against.
NOW = 1696004797.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "20"}, 20.0),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "-10"}, 0.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": " 7 "}, 7.0),
        ({"RETRY-AFTER": "7"}, 7.0),
        ({"Retry-After": "Fri, 29 Sep 2023 16:26:57 GMT"}, 20.0),
        ({"Retry-After": "Fri, 29 Sep 2023 16:26:37 GMT"}, 0.0),
        ({"Retry-After": "Fri, 29 Sep 2023 16:26:27 GMT"}, 0.0),
        ({"Retry-After": "Fri, 29 Sep 2023 16:27:37 GMT"}, 60.0),
        ({"Retry-After": "Fri, 29 Sep 2023 16:28:37 GMT"}, 120.0),
        ({"Retry-After": "Fri, 29 Sep 2023 16:26:47 -0000"}, 10.0),
        ({"Retry-After": "Fri, 29 Sep 2023 17:26:47 +0100"}, 10.0),
        ({"Retry-After": "Zun, 29 Sep 2023 16:26:27 GMT"}, 0.0),
        ({"Retry-After": "99999999999999999999999999999999999"}, 1e35),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "2023-09-29T16:26:47Z"}, None),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After-Ms": "-5"}, 0.0),
        ({"retry-after-ms": "250", "Retry-After": "20"}, 0.25),
        ({"retry-after-ms": "abc", "Retry-After": "20"}, 20.0),
        ({"X-Other": "5"}, None),
    ],
)
def test_parse_retry_after_table(headers: dict[str, str], expected: float | None) -> None:
    """Retry-After and retry-after-ms parse to seconds, clamp negatives to 0, and reject junk."""
    assert parse_retry_after(headers, now=NOW) == pytest.approx(expected)


def test_parse_retry_after_accepts_multidict() -> None:
    """aiohttp's case-insensitive header multidict works as the header mapping."""
    headers = CIMultiDict({"retry-after": "3"})
    assert parse_retry_after(headers) == 3.0


def test_parse_retry_after_date_defaults_to_current_time() -> None:
    """Without `now`, an HTTP date is measured against the current wall clock."""
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 3600))
    waited = parse_retry_after({"Retry-After": later})
    assert waited is not None
    assert 3590 <= waited <= 3600


@pytest.mark.parametrize(
    ("status", "code", "message", "cls", "retryable"),
    [
        (400, None, "Invalid size", BadRequestError, False),
        (401, None, "Invalid token", AuthenticationError, False),
        (403, None, "Forbidden", PermissionDeniedError, False),
        (404, None, "Not found", NotFoundError, False),
        (413, None, "Too large", BadRequestError, False),
        (422, None, "Unprocessable", BadRequestError, False),
        (408, None, "Request timeout", APIStatusError, True),
        (409, None, "Conflict", APIStatusError, True),
        (429, None, "Rate limit reached", RateLimitError, True),
        (500, None, "Internal error", ServerError, True),
        (502, None, "Bad gateway", ServerError, True),
        (503, None, "Unavailable", ServerError, True),
        (504, None, "Gateway timeout", ServerError, True),
        (524, None, "A timeout occurred", ServerError, True),
        (520, None, "Unknown", ServerError, True),
        (522, None, "Connection timed out", ServerError, True),
        (501, None, "Not implemented", ServerError, False),
        (505, None, "HTTP version not supported", ServerError, False),
        (500, "invalid_request", "bad upstream request", ServerError, False),
        (400, "content_policy_violation", "Rejected", ContentPolicyError, False),
        (400, "moderation_blocked", "Blocked", ContentPolicyError, False),
        (
            400,
            None,
            "Your request was rejected as a result of our safety system.",
            ContentPolicyError,
            False,
        ),
        (500, None, "This prompt violates our Content Policy", ContentPolicyError, False),
        (405, None, "Method not allowed", APIStatusError, False),
        (418, None, "Teapot", APIStatusError, False),
    ],
)
def test_classify_status_table(
    status: int, code: str | None, message: str, cls: type[APIStatusError], retryable: bool
) -> None:
    """Each status (and content-policy signal) maps to its error class and retry decision."""
    assert classify_status(status, code=code, message=message) == (cls, retryable)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "bad_request"),
        (413, "too_large"),
        (422, "unprocessable"),
        (401, "auth"),
        (429, "rate_limit"),
        (503, "server"),
        (409, "status"),
    ],
)
def test_make_status_error_sets_kind(status: int, kind: str) -> None:
    """The built error carries the ledger kind, including 413/422's own kinds."""
    assert make_status_error(status, '{"error": {"message": "x"}}').kind == kind


def test_make_status_error_fills_fields_from_body_and_headers() -> None:
    """Message, code, request id and Retry-After all land on the built error."""
    body = (
        '{"error": {"message": "Rate limit reached (request id: 2026abc)", '
        '"type": "comet_api_error", "param": "", "code": "rate_limit_exceeded"}}'
    )
    exc = make_status_error(429, body, headers={"Retry-After": "9"})
    assert isinstance(exc, RateLimitError)
    assert (exc.message, exc.code, exc.request_id) == (
        "Rate limit reached",
        "rate_limit_exceeded",
        "2026abc",
    )
    assert (exc.status, exc.retryable, exc.retry_after) == (429, True, 9.0)


def test_make_status_error_request_id_from_header() -> None:
    """Without a request id in the message, the X-Request-Id header supplies it."""
    exc = make_status_error(500, '{"error": {"message": "boom"}}', headers={"x-request-id": "r1"})
    assert exc.request_id == "r1"


def test_make_status_error_empty_body() -> None:
    """An empty error body still gives a readable message naming the status."""
    exc = make_status_error(502, "")
    assert exc.message == "the server answered HTTP 502 with no error message"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"error": {"message": "Invalid size (request id: 2026112110551234567abc)", '
            '"type": "comet_api_error", "param": "", "code": ""}}',
            ("Invalid size", None, "2026112110551234567abc"),
        ),
        (
            '{"error": {"message": "upstream rejected (request id: r-9)", "type": "x", '
            '"param": "", "code": "invalid_request"}}',
            ("upstream rejected", "invalid_request", "r-9"),
        ),
        (
            '{"error": {"message": "No id here", "type": "t", "code": null}}',
            ("No id here", None, None),
        ),
        ('{"error": {"message": "m", "code": 429}}', ("m", "429", None)),
        ('{"error": "quota exceeded (request id: q1)"}', ("quota exceeded", None, "q1")),
        ('{"detail": "Not Found"}', ("Not Found", None, None)),
        (
            "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
            ("the server answered with an HTML page", None, None),
        ),
        (
            "\n  <html>\n<head><title>Error</title></head></html>",
            ("the server answered with an HTML page", None, None),
        ),
        (
            "upstream   connect error\n or disconnect",
            ("upstream connect error or disconnect", None, None),
        ),
        ("x" * 500, ("x" * 200 + "...", None, None)),
        ("[1, 2]", ("[1, 2]", None, None)),
        ("", ("", None, None)),
    ],
)
def test_parse_error_body(text: str, expected: tuple[str, str | None, str | None]) -> None:
    """CometAPI's error shape yields message, code and request id; other bodies a short line."""
    assert parse_error_body(text) == expected


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0), (7, 30.0), (10_000, 30.0)],
)
def test_backoff_bounds(attempt: int, ceiling: float) -> None:
    """Backoff is rand() times min(cap, base * 2**(attempt-1)), never more."""
    assert backoff(attempt, base=0.5, cap=30.0, rand=lambda: 1.0) == ceiling
    assert backoff(attempt, base=0.5, cap=30.0, rand=lambda: 0.0) == 0.0
    assert backoff(attempt, base=0.5, cap=30.0, rand=lambda: 0.5) == ceiling / 2


def test_backoff_default_rand_within_bounds() -> None:
    """With the default random source the wait stays within [0, ceiling]."""
    for _ in range(100):
        assert 0.0 <= backoff(3, base=0.5, cap=30.0) <= 2.0


def test_policy_from_settings() -> None:
    """The policy copies the retry fields from Settings."""
    settings = Settings(
        api_key=SecretStr("sk-x"),
        max_attempts=3,
        retry_ambiguous=False,
        max_retry_after=10.0,
        backoff_base=1.0,
        backoff_max=5.0,
    )
    policy = RetryPolicy.from_settings(settings)
    assert (
        policy.max_attempts,
        policy.retry_ambiguous,
        policy.max_retry_after,
        policy.backoff_base,
        policy.backoff_max,
    ) == (3, False, 10.0, 1.0, 5.0)


@pytest.mark.parametrize(
    ("exc", "ambiguous_ok", "expected"),
    [
        (ServerError("x", retryable=True), True, True),
        (BadRequestError("x"), True, False),
        (APIConnectionError("x", sent=False), False, True),
        (APIConnectionError("x", sent=True), True, True),
        (APIConnectionError("x", sent=True), False, False),
        (APITimeoutError("x", sent=True), False, False),
        (ValueError("x"), True, False),
    ],
)
def test_should_retry(exc: BaseException, ambiguous_ok: bool, expected: bool) -> None:
    """Only retryable API errors are retried, ambiguous ones only when allowed."""
    assert RetryPolicy(retry_ambiguous=ambiguous_ok).should_retry(exc) is expected


def test_wait_for_caps_retry_after_and_falls_back_to_backoff() -> None:
    """A server's Retry-After wins (capped at max_retry_after); otherwise backoff applies."""
    policy = RetryPolicy(max_retry_after=120.0, rand=lambda: 1.0)
    assert policy.wait_for(RateLimitError("x", retry_after=7.0), 1) == 7.0
    assert policy.wait_for(RateLimitError("x", retry_after=500.0), 1) == 120.0
    assert policy.wait_for(ServerError("x"), 3) == 2.0
    assert policy.wait_for(None, 1) == 0.5


class Flaky:
    """An async callable that raises each of `failures` in turn, then returns "ok"."""

    def __init__(self, failures: Sequence[BaseException]) -> None:
        self.pending = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.pending:
            raise self.pending.pop(0)
        return "ok"


async def _run(policy: RetryPolicy, fn: Callable[[], Awaitable[str]], sleep: AsyncMock) -> str:
    result = ""
    async for attempt in retrying(policy, sleep=sleep):
        with attempt:
            result = await fn()
    return result


async def test_retrying_retries_with_backoff_waits() -> None:
    """Retryable errors are retried with exponential waits until the call succeeds."""
    sleep = AsyncMock()
    fn = Flaky([ServerError("boom", retryable=True) for _ in range(3)])
    assert await _run(RetryPolicy(rand=lambda: 1.0), fn, sleep) == "ok"
    assert sleep.await_args_list == [call(0.5), call(1.0), call(2.0)]
    assert fn.calls == 4


async def test_retrying_honours_retry_after_with_cap() -> None:
    """Retry-After decides the wait, capped at max_retry_after."""
    sleep = AsyncMock()
    fn = Flaky(
        [
            RateLimitError("slow down", retryable=True, retry_after=7.0),
            RateLimitError("slow down", retryable=True, retry_after=3600.0),
        ]
    )
    assert await _run(RetryPolicy(max_retry_after=120.0), fn, sleep) == "ok"
    assert sleep.await_args_list == [call(7.0), call(120.0)]


async def test_retrying_does_not_retry_bad_request() -> None:
    """A 400 is raised at once, without sleeping."""
    sleep = AsyncMock()
    fn = Flaky([BadRequestError("bad size", status=400)])
    with pytest.raises(BadRequestError):
        await _run(RetryPolicy(), fn, sleep)
    sleep.assert_not_awaited()
    assert fn.calls == 1


async def test_retrying_stops_after_max_attempts_and_reraises() -> None:
    """After max_attempts failures the last error itself is raised, not a RetryError."""
    sleep = AsyncMock()
    last = ServerError("third", retryable=True)
    fn = Flaky([ServerError("first", retryable=True), ServerError("second", retryable=True), last])
    with pytest.raises(ServerError) as info:
        await _run(RetryPolicy(max_attempts=3, rand=lambda: 0.0), fn, sleep)
    assert info.value is last
    assert sleep.await_count == 2
    assert fn.calls == 3


async def test_retrying_skips_ambiguous_when_disabled() -> None:
    """A failure after sending is not retried when retry_ambiguous is off."""
    sleep = AsyncMock()
    fn = Flaky([APITimeoutError("timed out", sent=True)])
    with pytest.raises(APITimeoutError):
        await _run(RetryPolicy(retry_ambiguous=False), fn, sleep)
    sleep.assert_not_awaited()


async def test_retrying_retries_ambiguous_when_enabled() -> None:
    """A failure after sending is retried when retry_ambiguous is on."""
    sleep = AsyncMock()
    fn = Flaky([APIConnectionError("dropped", sent=True)])
    assert await _run(RetryPolicy(retry_ambiguous=True, rand=lambda: 0.0), fn, sleep) == "ok"
    assert sleep.await_count == 1


async def test_retrying_calls_before_sleep() -> None:
    """The before_sleep hook sees each retry before its wait."""
    sleep = AsyncMock()
    seen: list[int] = []
    hook = Mock(side_effect=lambda state: seen.append(state.attempt_number))
    fn = Flaky([ServerError("boom", retryable=True)])
    result = ""
    async for attempt in retrying(RetryPolicy(rand=lambda: 0.0), sleep=sleep, before_sleep=hook):
        with attempt:
            result = await fn()
    assert result == "ok"
    assert seen == [1]


async def test_retrying_does_not_retry_foreign_exceptions() -> None:
    """Exceptions outside the API error tree propagate at once."""
    sleep = AsyncMock()
    fn = Flaky([KeyError("bug")])
    with pytest.raises(KeyError):
        await _run(RetryPolicy(), fn, sleep)
    sleep.assert_not_awaited()


@pytest.mark.parametrize(
    ("exc", "billed"),
    [
        (APIConnectionError("refused", sent=False), False),
        (APIConnectionError("dropped after sending", sent=True), True),
        (APITimeoutError("read timeout", sent=True), True),
        (ServerError("gateway timeout", status=504, retryable=True), True),
        (ServerError("cloudflare 524", status=524, retryable=True), True),
        (ServerError("bad gateway", status=502, retryable=True), False),
        (RateLimitError("slow down", status=429, retryable=True), False),
        (APIResponseError("truncated JSON", status=200, retryable=True), True),
        (APIResponseError("no images", status=200, retryable=True, maybe_billed=False), False),
        (APIResponseError("too large", status=200, maybe_billed=True), True),
        (APIResponseError("odd answer", status=200), False),
    ],
)
def test_possibly_billed(exc: APIError, billed: bool) -> None:
    """Failures after the request reached the generator (timeouts, 504, 524, an answer cut
    off or too large) may be billed; an answer read whole without images may not."""
    assert possibly_billed(exc) is billed


def test_gateway_timeouts_are_not_retried_when_ambiguous_retries_are_off() -> None:
    """With retry_ambiguous off, a 524 is not retried (the image may exist and be billed)."""
    policy = RetryPolicy(retry_ambiguous=False)
    assert not policy.should_retry(ServerError("524", status=524, retryable=True))
    assert policy.should_retry(ServerError("502", status=502, retryable=True))


@pytest.mark.parametrize(
    ("status", "code", "request_id", "html", "json_body", "foreign"),
    [
        (404, None, None, True, False, True),
        (404, None, None, False, False, True),
        (404, None, None, False, True, False),
        (404, None, "req-1", False, True, False),
        (404, "model_not_found", None, False, True, False),
        (405, None, None, False, False, True),
        (405, None, None, False, True, False),
        (501, None, None, True, False, True),
        (501, None, "req-1", False, True, False),
        (400, None, None, True, False, True),
        (400, None, None, False, True, False),
        (410, None, None, True, False, True),
        (401, None, None, True, False, False),
        (403, None, None, True, False, False),
        (413, None, None, True, False, False),
        (429, None, None, True, False, False),
        (500, None, None, True, False, False),
        (502, None, None, True, False, False),
        (524, None, None, True, False, False),
        (503, None, None, False, False, False),
    ],
)
def test_not_the_api_table(
    status: int,
    code: str | None,
    request_id: str | None,
    html: bool,
    json_body: bool,
    foreign: bool,
) -> None:
    """A plain web server's 404, 405 or 501 (HTML or plain text) or HTML error page is "not
    the API"; JSON errors, CometAPI's own errors and the pages a proxy sends for one request
    or a passing fault are not."""
    found = not_the_api(status, code=code, request_id=request_id, html=html, json_body=json_body)
    assert found is foreign
