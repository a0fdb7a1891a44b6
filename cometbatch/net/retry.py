"""Retry rules as pure decisions (status classes, Retry-After, backoff) plus a tenacity factory."""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, Any

import tenacity
from tenacity import RetryCallState

from ..errors import (
    APIConnectionError,
    APIError,
    APIResponseError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ContentPolicyError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)

if TYPE_CHECKING:
    from ..settings import Settings

# DESIGN's list, plus Cloudflare's other transient origin errors (520-523: unknown error, web
# server down, connection timed out, origin unreachable), siblings of the 524 it names. 501 and
# 505 and the like say the server will never do this, so they are not retried.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})

_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: BadRequestError,
    422: BadRequestError,
    429: RateLimitError,
}

# Statuses that share a class with others but keep their own ledger kind.
_STATUS_KINDS: dict[int, str] = {413: "too_large", 422: "unprocessable"}

_POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
_POLICY_PHRASES = ("safety system", "content policy")

_REQUEST_ID = re.compile(r"request id: ([^)\s]+)", re.IGNORECASE)
_REQUEST_ID_SUFFIX = re.compile(r"\s*\(request id: [^)]*\)", re.IGNORECASE)
_HTML_START = re.compile(r"^\s*<(!doctype\s+html|html|head|body|\?xml|!--)", re.IGNORECASE)
_PLAIN_LIMIT = 200
# Validation errors named in a message, at most (a body can list one per field).
_DETAILS_SHOWN = 10


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header `name`, looked up case-insensitively even in a plain dict."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, found in headers.items():
        if key.lower() == name:
            return found
    return None


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from retry-after-ms or Retry-After; None if absent."""
    millis = _header(headers, "retry-after-ms")
    if millis is not None:
        value = _finite(millis.strip())
        if value is not None:
            return max(value / 1000.0, 0.0)
    raw = _header(headers, "retry-after")
    if raw is None or not raw.strip():
        return None
    value = _finite(raw.strip())
    if value is not None:
        return max(value, 0.0)
    try:
        when = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)


def is_content_policy(code: str | None, message: str) -> bool:
    """Whether an error is a content-policy rejection (retrying it cannot help)."""
    if code in _POLICY_CODES:
        return True
    lowered = message.lower()
    return any(phrase in lowered for phrase in _POLICY_PHRASES)


def classify_status(
    status: int, *, code: str | None, message: str
) -> tuple[type[APIStatusError], bool]:
    """The error class for an HTTP error status, and whether a retry can help."""
    if is_content_policy(code, message):
        return ContentPolicyError, False
    if status in _STATUS_CLASSES:
        return _STATUS_CLASSES[status], status in RETRYABLE_STATUSES
    if 500 <= status <= 599:
        # A 500 tagged invalid_request is the upstream rejecting the request itself.
        return ServerError, status in RETRYABLE_STATUSES and code != "invalid_request"
    return APIStatusError, status in RETRYABLE_STATUSES


# Error pages a proxy in front of the real API sends for one request or a passing fault (the
# upstream down, a firewall refusing this prompt, a body too large, a login it wants): their
# HTML says nothing about the base URL. Any other HTML error page is a plain web server's.
_PROXY_PAGE_STATUSES = RETRYABLE_STATUSES | {401, 403, 413}


def not_the_api(
    status: int, *, code: str | None, request_id: str | None, html: bool, json_body: bool
) -> bool:
    """Whether an error answer comes from a plain web server rather than an images API: a 404,
    405 or 501 that is not a JSON error (an HTML page, plain text), an HTML error page."""
    if code is not None or request_id is not None:
        return False  # CometAPI's own error: its message carries a request id.
    if status in (404, 405, 501):
        # A JSON 404 is an API's answer about this job (a gateway that does not know its
        # model): a failure of the job, not a wrong base URL.
        return not json_body
    return html and status not in _PROXY_PAGE_STATUSES


def status_kind(status: int) -> str | None:
    """The ledger kind for statuses whose class alone does not name it (413, 422)."""
    return _STATUS_KINDS.get(status)


def _plain(text: str) -> str:
    """A short one-line message from a non-JSON body."""
    if _HTML_START.match(text) or "<html" in text[:1000].lower():
        return "the server answered with an HTML page"
    collapsed = " ".join(text.split())
    if len(collapsed) > _PLAIN_LIMIT:
        return collapsed[:_PLAIN_LIMIT] + "..."
    return collapsed


def _split_request_id(message: str) -> tuple[str, str | None]:
    found = _REQUEST_ID.search(message)
    if found is None:
        return message.strip(), None
    return _REQUEST_ID_SUFFIX.sub("", message).strip(), found.group(1)


def _location(loc: Any) -> str:
    """A validation error's `loc` (["body", "size"], [..., 0]) as one dotted name."""
    if isinstance(loc, list):
        return ".".join(str(part) for part in loc if isinstance(part, str | int))
    return loc if isinstance(loc, str) else ""


def _validation_details(details: list[Any]) -> str:
    """FastAPI's (pydantic's) `detail` list as "body.size: msg; body.n: msg", each
    location named with its message; an entry of another shape as its JSON text."""
    parts = []
    for item in details[:_DETAILS_SHOWN]:
        if not isinstance(item, dict):
            parts.append(item if isinstance(item, str) else json.dumps(item))
            continue
        msg = item.get("msg", item.get("message"))
        text = msg if isinstance(msg, str) else json.dumps(msg if msg is not None else item)
        where = _location(item.get("loc"))
        parts.append(f"{where}: {text}" if where else text)
    more = len(details) - _DETAILS_SHOWN
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _with_param(message: str, param: Any) -> str:
    """`message` naming the parameter an OpenAI-style error blames, unless it does already."""
    if not isinstance(param, str) or not param.strip() or len(param) > _PLAIN_LIMIT:
        return message
    # As a word: the message "Invalid value" does not name the parameter "n".
    if re.search(rf"(?<!\w){re.escape(param)}(?!\w)", message):
        return message
    return f"{message} (param: {param})" if message else f"param: {param}"


def parse_error_body(text: str) -> tuple[str, str | None, str | None]:
    """(message, code, request_id) from an error body in CometAPI's or OpenAI's shape (with
    the `param` it names), FastAPI's validation `detail` list, or a plain excerpt."""
    try:
        data: Any = json.loads(text)
    except (ValueError, RecursionError):  # also too many digits, or nested too deeply
        return _plain(text), None, None
    if not isinstance(data, dict):
        return _plain(text), None, None
    error = data.get("error", data)
    if isinstance(error, str):
        message, request_id = _split_request_id(error)
        return message, None, request_id
    if not isinstance(error, dict):
        return _plain(text), None, None
    raw_message = error.get("message") or error.get("detail") or ""
    if isinstance(raw_message, list):
        raw_message = _validation_details(raw_message)
    elif not isinstance(raw_message, str):
        raw_message = json.dumps(raw_message)
    message, request_id = _split_request_id(raw_message)
    message = _with_param(message, error.get("param"))
    raw_code = error.get("code")
    code = str(raw_code) if raw_code not in (None, "") else None
    return message, code, request_id


def request_id_header(headers: Mapping[str, str]) -> str | None:
    """The request id an answer's headers carry (OpenAI's X-Request-Id, one-api's
    X-Oneapi-Request-Id), or None."""
    return _header(headers, "x-request-id") or _header(headers, "x-oneapi-request-id")


def make_status_error(
    status: int,
    body: str,
    *,
    headers: Mapping[str, str] | None = None,
    now: float | None = None,
) -> APIStatusError:
    """The classified exception for an error answer (status, body text, response headers)."""
    message, code, request_id = parse_error_body(body)
    cls, retryable = classify_status(status, code=code, message=message)
    hdrs: Mapping[str, str] = headers if headers is not None else {}
    if request_id is None:
        request_id = request_id_header(hdrs)
    return cls(
        message or f"the server answered HTTP {status} with no error message",
        status=status,
        code=code,
        request_id=request_id,
        retryable=retryable,
        retry_after=parse_retry_after(hdrs, now=now),
        kind=None if cls is ContentPolicyError else status_kind(status),
    )


# Gateway timeouts: the gateway gave up waiting, but the generation behind it may have finished.
GATEWAY_TIMEOUTS = frozenset({504, 524})


def possibly_billed(exc: APIError) -> bool:
    """Whether the failed attempt may have generated (and billed) images all the same."""
    if isinstance(exc, APIConnectionError):
        return exc.sent
    if isinstance(exc, APIResponseError) and exc.maybe_billed:
        # A body cut off, unreadable or too large: the generation ran, the answer was lost.
        return True
    return exc.status in GATEWAY_TIMEOUTS


def backoff(
    attempt: int, *, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Full-jitter exponential backoff: a random wait up to min(cap, base * 2**(attempt-1))."""
    exponent = max(attempt, 1) - 1
    # Bound the exponent so a huge attempt number cannot overflow the float.
    ceiling = cap if exponent >= 64 else min(cap, base * 2.0**exponent)
    return rand() * ceiling


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures to retry, how often, and how long to wait between attempts."""

    max_attempts: int = 8
    retry_ambiguous: bool = True
    max_retry_after: float = 120.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy the settings describe."""
        return cls(
            max_attempts=settings.max_attempts,
            retry_ambiguous=settings.retry_ambiguous,
            max_retry_after=settings.max_retry_after,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
        )

    def should_retry(self, exc: BaseException) -> bool:
        """Whether another attempt may succeed (possibly billed failures only if allowed)."""
        if not isinstance(exc, APIError) or not exc.retryable:
            return False
        if possibly_billed(exc):
            return self.retry_ambiguous
        return True

    def wait_for(self, exc: BaseException | None, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if isinstance(exc, APIError) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_after)
        return backoff(attempt, base=self.backoff_base, cap=self.backoff_max, rand=self.rand)


def retrying(
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    before_sleep: Callable[[RetryCallState], Any] | None = None,
) -> tenacity.AsyncRetrying:
    """A tenacity AsyncRetrying that applies `policy`; use as `async for attempt in ...`."""

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return policy.wait_for(exc, state.attempt_number)

    return tenacity.AsyncRetrying(
        sleep=sleep,
        retry=tenacity.retry_if_exception(policy.should_retry),
        wait=wait,
        stop=tenacity.stop_after_attempt(policy.max_attempts),
        before_sleep=before_sleep,
        reraise=True,
    )
