"""The simulated CometAPI's rules as pure functions: validation, faults, limits and usage."""

from __future__ import annotations

import json
import math
import string
import time
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import CapabilityError
from .models import ModelRegistry, ModelSpec

SERVER_ERROR_STATUSES: tuple[int, ...] = (500, 502, 503, 504, 524)
# Faults that change a successful answer instead of replacing it. "drop-midway" sends the
# headers and half the body of a generated (billed) answer, then closes the connection.
SHAPING_FAULTS: tuple[str, ...] = (
    "empty-data",
    "fewer-images",
    "bad-base64",
    "slow",
    "drop-midway",
)
# Faults of the file route, applied to the next downloads rather than the next generations.
# "download-expired" makes the file pass its TTL (gone for good); "download-404" is one 404.
DOWNLOAD_FAULTS: tuple[str, ...] = (
    "download-404",
    "download-expired",
    "download-huge",
    "download-not-image",
)
FAULTS: tuple[str, ...] = (
    *("429", "429-bare", "500", "502", "503", "504", "524", "500-invalid-request"),
    *("400", "content-policy", "drop", "malformed", "html", "redirect"),
    *SHAPING_FAULTS,
    *DOWNLOAD_FAULTS,
)
_WINDOW_SECONDS = 60.0
_URL_FORMATS: Mapping[str, str] = {"dall-e-3": "webp"}  # CometAPI links dall-e-3 to .webp files
_OUTPUT_TOKENS: Mapping[str, int] = {"low": 272, "medium": 1056, "high": 4160, "auto": 1056}
_WIDE_SIZES = frozenset({"1536x1024", "1024x1536"})
_BASE_FIELDS = frozenset({"model", "prompt", "n"})
ID_ALPHABET = string.ascii_letters + string.digits


class SimConfig(BaseModel):
    """How the simulated API behaves: latency, image payloads, limits and fault rates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latency: float = Field(default=0.0, ge=0)
    latency_jitter: float = Field(default=0.0, ge=0)
    image_px: int = Field(default=64, ge=1, le=4096)
    payload_bytes: int | None = Field(default=None, gt=0)
    rate_429: float = Field(default=0.0, ge=0, le=1)
    rate_429_bare: float = Field(default=0.0, ge=0, le=1)
    retry_after: float = Field(default=1.0, ge=0)
    rate_5xx: float = Field(default=0.0, ge=0, le=1)
    rate_drop: float = Field(default=0.0, ge=0, le=1)
    rate_malformed: float = Field(default=0.0, ge=0, le=1)
    rpm_limit: int | None = Field(default=None, ge=1)
    ipm_limit: int | None = Field(default=None, ge=1)
    api_key: str | None = Field(default=None, repr=False)
    url_ttl: float = Field(default=3600.0, ge=0)
    slow_seconds: float = Field(default=30.0, ge=0)
    # The size of a "download-huge" answer: by default just over the client's 64 MiB cap.
    huge_download_bytes: int = Field(default=64 * 1024 * 1024 + 1, gt=0)
    seed: int | None = None
    record_requests: bool = True
    # Prompts containing this text are refused as a content-policy violation (a 400).
    content_policy_marker: str | None = None

    @model_validator(mode="after")
    def _rates_fit(self) -> SimConfig:
        if self.fault_rates_total() > 1.0 + 1e-9:
            raise ValueError("the fault rates add up to more than 1")
        return self

    def fault_rates(self) -> tuple[tuple[str, float], ...]:
        """Each random fault with its rate, in the order a draw is matched against them."""
        return (
            ("429", self.rate_429),
            ("429-bare", self.rate_429_bare),
            ("5xx", self.rate_5xx),
            ("drop", self.rate_drop),
            ("malformed", self.rate_malformed),
        )

    def fault_rates_total(self) -> float:
        """The fraction of requests that get a random fault."""
        return sum(rate for _, rate in self.fault_rates())


@dataclass(frozen=True, slots=True)
class ApiFailure:
    """An error answer in CometAPI's shape, before the request id is added."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str = ""


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """A request that passed validation, reduced to what the answer depends on."""

    model: str
    prompt: str
    n: int
    mode: Literal["url", "b64_json"]
    fmt: str
    size: str | None
    quality: str | None
    revised_prompt: bool
    usage: bool


# -- pure decisions ----------------------------------------------------------------------


def _bad(message: str) -> ApiFailure:
    return ApiFailure(400, message)


def check_authorization(header: str | None, api_key: str | None) -> ApiFailure | None:
    """None if the Authorization header is acceptable, else the 401 to answer."""
    scheme, _, token = (header or "").partition(" ")
    if scheme != "Bearer" or not token.strip():
        return ApiFailure(401, "No token provided (Authorization: Bearer <key>)", "comet_api_error")
    if api_key is not None and header != f"Bearer {api_key}":
        return ApiFailure(401, "Invalid token", "comet_api_error")
    return None


def _check_n(value: Any, spec: ModelSpec) -> int | ApiFailure:
    n = 1 if value is None else value
    if isinstance(n, bool) or not isinstance(n, int):
        return _bad(f"Invalid type for 'n': expected an integer, but got {type(n).__name__}.")
    if spec.max_n == 1 and n != 1:
        return _bad("You must provide n=1 for this model.")
    if n < 1:
        return _bad(f"Invalid 'n': integer below minimum value. Expected a value >= 1, got {n}.")
    if n > spec.max_n:
        return _bad(
            f"Invalid 'n': integer above maximum value. Expected a value <= {spec.max_n}, got {n}."
        )
    return n


def _check_params(body: Mapping[str, Any], spec: ModelSpec, prompt: str) -> ApiFailure | None:
    params = {key: value for key, value in body.items() if key not in _BASE_FIELDS}
    for key in params:
        if not spec.accepts(key):
            return _bad(f"Unknown parameter: '{key}'.")
    try:
        spec.check(params, prompt)
    except CapabilityError as exc:
        return _bad(str(exc))
    return None


def _answer_format(
    body: Mapping[str, Any], spec: ModelSpec
) -> tuple[Literal["url", "b64_json"], str] | ApiFailure:
    if spec.known and not spec.send_response_format:
        return "b64_json", str(body.get("output_format") or "png")
    mode = body.get("response_format") or "url"
    if mode == "b64_json":
        return "b64_json", "png"
    if mode == "url":
        return "url", _URL_FORMATS.get(spec.name, "png")
    return _bad(f"Invalid value: '{mode}'. Supported values are: 'url' and 'b64_json'.")


def json_or_none(raw: bytes) -> Any:
    """The decoded JSON body, or None if it does not parse."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


def parse_request(body: Any, registry: ModelRegistry) -> ImageRequest | ApiFailure:
    """Validate a generation body the way the real route does; the 400 to answer if it fails."""
    if not isinstance(body, dict):
        return _bad("We could not parse the JSON body of your request: expected a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _bad("you must provide a model parameter")
    prompt = body.get("prompt")
    if prompt is None:
        return _bad("Missing required parameter: 'prompt'.")
    if not isinstance(prompt, str) or not prompt.strip():
        return _bad("Invalid 'prompt': expected a non-empty string.")
    # Looking an unknown model up in the registry would log a warning and remember it.
    spec = registry.get(model) if model in registry else ModelSpec(name=model, max_n=1, known=False)
    n = _check_n(body.get("n"), spec)
    if isinstance(n, ApiFailure):
        return n
    failure = _check_params(body, spec, prompt)
    if failure is not None:
        return failure
    answer = _answer_format(body, spec)
    if isinstance(answer, ApiFailure):
        return answer
    size, quality = body.get("size"), body.get("quality")
    return ImageRequest(
        model=model,
        prompt=prompt,
        n=n,
        mode=answer[0],
        fmt=answer[1],
        size=size if isinstance(size, str) else None,
        quality=quality if isinstance(quality, str) else None,
        revised_prompt=spec.returns_revised_prompt,
        usage=spec.known and not spec.send_response_format,
    )


def make_request_id(now_ns: int, suffix: str) -> str:
    """A CometAPI-style request id: UTC timestamp, nanoseconds, then random letters."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now_ns // 1_000_000_000))
    return f"{stamp}{now_ns % 1_000_000_000:09d}{suffix}"


def error_body(failure: ApiFailure, request_id: str) -> dict[str, Any]:
    """CometAPI's error object: the request id lives only inside the message."""
    return {
        "error": {
            "message": f"{failure.message} (request id: {request_id})",
            "type": failure.type,
            "param": "",
            "code": failure.code,
        }
    }


def image_seed(prompt: str, index: int) -> int:
    """The picture seed of image `index` for `prompt`: different prompts, different pictures."""
    return zlib.crc32(f"{index}\0{prompt}".encode())


def usage_for(request: ImageRequest) -> dict[str, Any]:
    """Plausible gpt-image token usage for a request."""
    per_image = _OUTPUT_TOKENS.get(request.quality or "auto", _OUTPUT_TOKENS["auto"])
    if request.size in _WIDE_SIZES:
        per_image = per_image * 3 // 2
    text_tokens = max(1, len(request.prompt) // 4)
    output_tokens = per_image * request.n
    return {
        "input_tokens": text_tokens,
        "output_tokens": output_tokens,
        "total_tokens": text_tokens + output_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
    }


def pick_fault(config: SimConfig, draw: float) -> str | None:
    """The random fault for a uniform draw in [0, 1) ("5xx" for any server error), or None."""
    edge = 0.0
    for name, rate in config.fault_rates():
        edge += rate
        if draw < edge:
            return name
    return None


def images_to_answer(fault: str | None, n: int) -> int:
    """How many of the `n` images asked for an answer shaped by `fault` carries."""
    return {"fewer-images": n - 1, "empty-data": 0}.get(fault or "", n)


def counts_as_generated(fault: str | None) -> bool:
    """Whether an answer shaped by `fault` was generated in full (and billed) by the server."""
    return fault in (None, "slow", "drop-midway")


def format_seconds(seconds: float) -> str:
    """A Retry-After value: whole seconds as an integer, else a short decimal."""
    if seconds == int(seconds):
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def retry_headers(seconds: float) -> dict[str, str]:
    """Both the OpenAI-style millisecond header and the standard one."""
    return {
        "Retry-After": format_seconds(seconds),
        "retry-after-ms": str(math.ceil(seconds * 1000)),
    }


class SlidingWindow:
    """Costs accepted in the last `span` seconds, and how long until more would fit."""

    def __init__(self, limit: int, span: float = _WINDOW_SECONDS) -> None:
        self.limit = limit
        self.span = span
        self._events: deque[tuple[float, int]] = deque()
        self._used = 0

    def __repr__(self) -> str:
        return f"SlidingWindow(limit={self.limit}, used={self._used})"

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] + self.span <= now:
            self._used -= self._events.popleft()[1]

    def wait_for(self, now: float, cost: int = 1) -> float:
        """Seconds until `cost` more fits in the window (0.0: it fits now)."""
        self._expire(now)
        excess = self._used + cost - self.limit
        if excess <= 0:
            return 0.0
        if cost > self.limit:
            return self.span
        freed = 0
        for stamp, used in self._events:
            freed += used
            if freed >= excess:
                return stamp + self.span - now
        return self.span

    def add(self, now: float, cost: int = 1) -> None:
        """Record an accepted cost at `now`."""
        self._events.append((now, cost))
        self._used += cost


def admit(
    checks: Sequence[tuple[SlidingWindow | None, int, str]], now: float
) -> tuple[ApiFailure, dict[str, str]] | None:
    """Record each cost in its window if all fit, else the 429 and headers of the first refusal."""
    present = [(window, cost, unit) for window, cost, unit in checks if window is not None]
    for window, cost, unit in present:
        wait = window.wait_for(now, cost)
        if wait > 0:
            return rate_limited(unit, window.limit, wait)
    for window, cost, _ in present:
        window.add(now, cost)
    return None


def rate_limited(unit: str, limit: int, wait: float) -> tuple[ApiFailure, dict[str, str]]:
    """The 429 for a full per-minute window, with its Retry-After headers."""
    failure = ApiFailure(
        429,
        f"Rate limit reached for {unit} per minute: limit {limit}. "
        f"Please try again in {wait:.3f}s.",
        "comet_api_error",
        "rate_limit_exceeded",
    )
    # Whole seconds in the standard header (never shorter than the real wait).
    headers = retry_headers(wait)
    headers["Retry-After"] = str(max(1, math.ceil(wait)))
    return failure, headers


# -- canned answers ----------------------------------------------------------------------

FAULT_ERRORS: Mapping[str, ApiFailure] = {
    "429": ApiFailure(429, "upstream load is saturated, please retry later", "comet_api_error"),
    "429-bare": ApiFailure(
        429, "upstream load is saturated, please retry later", "comet_api_error"
    ),
    "500": ApiFailure(500, "internal server error", "comet_api_error"),
    "500-invalid-request": ApiFailure(
        500, "invalid request: upstream rejected the request", "comet_api_error", "invalid_request"
    ),
    "503": ApiFailure(503, "no upstream channel available right now", "comet_api_error"),
    "504": ApiFailure(504, "upstream request timed out", "comet_api_error"),
    "400": ApiFailure(400, "Invalid request: the request could not be processed."),
    "content-policy": ApiFailure(
        400,
        "Your request was rejected as a result of our safety system.",
        code="content_policy_violation",
    ),
}
# Cloudflare sits in front of the API: gateway errors arrive as its HTML pages, not JSON.
FAULT_PAGES: Mapping[str, tuple[int, str, str]] = {
    "502": (502, "Bad Gateway", "<title>502 Bad Gateway</title><h1>Bad gateway</h1>"),
    "524": (524, "A Timeout Occurred", "<title>524: A timeout occurred</title><h1>Error 524</h1>"),
    "html": (200, "OK", "<title>CometAPI</title><div id='root'>Loading...</div>"),
}
NOT_FOUND_PAGE = (
    "<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1>"
    "</center><hr><center>nginx</center></body></html>"
)
BAD_BASE64 = "%%% this is not base64 %%%"
# A CDN's interstitial: what an image link can answer instead of the image.
NOT_AN_IMAGE_PAGE = (
    "<html><head><title>Just a moment...</title></head><body><h1>Checking your browser "
    "before accessing the file</h1></body></html>"
)
