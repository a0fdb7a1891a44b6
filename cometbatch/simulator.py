"""A real aiohttp server on loopback that behaves like CometAPI's images route, with faults."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import random
import secrets
import string
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from aiohttp import hdrs, web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import CapabilityError
from .imagegen import CONTENT_TYPES, make_image, png_of_size
from .models import ModelRegistry, ModelSpec

log = logging.getLogger(__name__)

GENERATION_PATH = "/v1/images/generations"
SERVER_ERROR_STATUSES: tuple[int, ...] = (500, 502, 503, 504, 524)
# Faults that change a successful answer instead of replacing it.
_SHAPING_FAULTS: tuple[str, ...] = ("empty-data", "fewer-images", "bad-base64", "slow")
FAULTS: tuple[str, ...] = (
    *("429", "429-bare", "500", "502", "503", "504", "524", "500-invalid-request"),
    *("400", "content-policy", "drop", "malformed", "html", "redirect"),
    *_SHAPING_FAULTS,
)
_WINDOW_SECONDS = 60.0
# Distinct pictures cached per format: enough that prompts rarely share one, few enough
# that a long benchmark draws nearly every image from the cache.
_PICTURE_VARIANTS = 1024
_PAYLOAD_VARIANTS = 4
_MAX_FILES = 100_000
_URL_FORMATS: Mapping[str, str] = {"dall-e-3": "webp"}  # CometAPI links dall-e-3 to .webp files
_EXTENSIONS: Mapping[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_OUTPUT_TOKENS: Mapping[str, int] = {"low": 272, "medium": 1056, "high": 4160, "auto": 1056}
_WIDE_SIZES = frozenset({"1536x1024", "1024x1536"})
_ID_ALPHABET = string.ascii_letters + string.digits
_BASE_FIELDS = frozenset({"model", "prompt", "n"})


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


@dataclass
class SimStats:
    """What the simulator saw and answered; never the API key."""

    requests: int = 0
    generated: int = 0
    images: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    limit_429s: int = 0
    downloads: int = 0
    download_auth_rejections: int = 0
    max_in_flight: int = 0
    requests_log: list[dict[str, Any]] = field(default_factory=list)


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


# -- canned answers ----------------------------------------------------------------------

_FAULT_ERRORS: Mapping[str, ApiFailure] = {
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
_FAULT_PAGES: Mapping[str, tuple[int, str, str]] = {
    "502": (502, "Bad Gateway", "<title>502 Bad Gateway</title><h1>Bad gateway</h1>"),
    "524": (524, "A Timeout Occurred", "<title>524: A timeout occurred</title><h1>Error 524</h1>"),
    "html": (200, "OK", "<title>CometAPI</title><div id='root'>Loading...</div>"),
}
_NOT_FOUND_PAGE = (
    "<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1>"
    "</center><hr><center>nginx</center></body></html>"
)
_BAD_BASE64 = "%%% this is not base64 %%%"


def _html(status: int, body: str, reason: str | None = None) -> web.Response:
    page = f"<!DOCTYPE html><html><body>{body}</body></html>" if "<html>" not in body else body
    return web.Response(status=status, reason=reason, text=page, content_type="text/html")


@dataclass(slots=True)
class _StoredFile:
    data: bytes
    content_type: str
    expires_at: float
    downloads: int = 0


# -- the server --------------------------------------------------------------------------


class Simulator:
    """The simulated CometAPI server, running on loopback while the context is open."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] | None = None,
        registry: ModelRegistry | None = None,
    ) -> None:
        self.config = config or SimConfig()
        self._host = host
        self._port = port
        self._clock = clock
        self._registry = registry or ModelRegistry()
        self._stats = SimStats()
        self._state: Literal["new", "open", "closed"] = "new"
        self._runner: web.AppRunner | None = None
        self._forced: deque[str] = deque()
        self._rng = random.Random(self.config.seed)
        self._ids = random.Random()
        self._rpm = SlidingWindow(self.config.rpm_limit) if self.config.rpm_limit else None
        self._ipm = SlidingWindow(self.config.ipm_limit) if self.config.ipm_limit else None
        self._fault_total = self.config.fault_rates_total()
        self._files: dict[str, _StoredFile] = {}
        self._bytes_cache: dict[tuple[str, int], bytes] = {}
        self._b64_cache: dict[tuple[str, int], str] = {}
        self._in_flight = 0

    # lifecycle

    async def __aenter__(self) -> Simulator:
        if self._state != "new":
            raise RuntimeError(f"this Simulator is {self._state}; start a new one")
        if self._clock is None:
            self._clock = asyncio.get_running_loop().time
        app = web.Application()
        app.router.add_post(GENERATION_PATH, self._handle_generation)
        app.router.add_get("/files/{name}", self._handle_download)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        # A short shutdown timeout: a "slow" request still running must not hold up exit.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop serving; the simulator cannot be used again."""
        runner, self._runner = self._runner, None
        self._state = "closed"
        self._files.clear()
        if runner is not None:
            await runner.cleanup()

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"the Simulator is {self._state}, not serving")

    # public state

    @property
    def origin(self) -> str:
        """Scheme, host and port, e.g. http://127.0.0.1:8123."""
        self._require_open()
        host = "127.0.0.1" if self._host in ("", "0.0.0.0", "::") else self._host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self._port}"

    @property
    def base_url(self) -> str:
        """The base URL a client is configured with, e.g. http://127.0.0.1:8123/v1."""
        return f"{self.origin}/v1"

    @property
    def stats(self) -> SimStats:
        """Live counters."""
        return self._stats

    def enqueue(self, *faults: str) -> None:
        """Force the outcome of the next requests, in order."""
        if self._state == "closed":
            raise RuntimeError("the Simulator is closed")
        unknown = [name for name in faults if name not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
        self._forced.extend(faults)

    def __repr__(self) -> str:
        where = self.base_url if self._state == "open" else self._state
        s = self._stats
        return (
            f"<Simulator {where} requests={s.requests} generated={s.generated} "
            f"images={s.images} in_flight={self._in_flight} queued_faults={len(self._forced)}>"
        )

    # helpers

    def _now(self) -> float:
        assert self._clock is not None
        return self._clock()

    def _request_id(self) -> str:
        return make_request_id(time.time_ns(), "".join(self._ids.choices(_ID_ALPHABET, k=8)))

    def _reply(self, response: web.Response) -> web.Response:
        self._stats.statuses[response.status] += 1
        return response

    def _error(self, failure: ApiFailure, headers: Mapping[str, str] | None = None) -> web.Response:
        body = json.dumps(error_body(failure, self._request_id()))
        return self._reply(
            web.Response(
                status=failure.status,
                text=body,
                content_type="application/json",
                headers=headers,
            )
        )

    # generation route

    async def _handle_generation(self, request: web.Request) -> web.StreamResponse:
        self._stats.requests += 1
        self._in_flight += 1
        self._stats.max_in_flight = max(self._stats.max_in_flight, self._in_flight)
        try:
            return await self._generate(request)
        finally:
            self._in_flight -= 1

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = _json_or_none(await request.read())
        auth = request.headers.get(hdrs.AUTHORIZATION)
        if self.config.record_requests:
            self._stats.requests_log.append(
                {"body": body, "authorization_present": auth is not None}
            )
        forced = self._forced.popleft() if self._forced else None
        if forced is not None:
            self._stats.faults[forced] += 1
            if forced not in _SHAPING_FAULTS:
                return self._fault_response(forced, request)
        failure = check_authorization(auth, self.config.api_key)
        parsed = parse_request(body, self._registry) if failure is None else failure
        if isinstance(parsed, ApiFailure):
            return self._error(parsed)
        marker = self.config.content_policy_marker
        if marker and marker in parsed.prompt:
            self._stats.faults["content-policy"] += 1
            return self._fault_response("content-policy", request)
        if forced is None:
            refused = self._admit(parsed) or self._random_fault(request)
            if refused is not None:
                return refused
        elif forced == "slow":
            await asyncio.sleep(self.config.slow_seconds)
        await self._latency()
        return self._success(parsed, forced)

    def _admit(self, request: ImageRequest) -> web.StreamResponse | None:
        now = self._now()
        checks = [
            (window, cost, unit)
            for window, cost, unit in ((self._rpm, 1, "requests"), (self._ipm, request.n, "images"))
            if window is not None
        ]
        for window, cost, unit in checks:
            wait = window.wait_for(now, cost)
            if wait > 0:
                return self._limited(window, unit, wait)
        for window, cost, _ in checks:
            window.add(now, cost)
        return None

    def _limited(self, window: SlidingWindow, unit: str, wait: float) -> web.Response:
        self._stats.limit_429s += 1
        failure = ApiFailure(
            429,
            f"Rate limit reached for {unit} per minute: limit {window.limit}. "
            f"Please try again in {wait:.3f}s.",
            "comet_api_error",
            "rate_limit_exceeded",
        )
        # Whole seconds in the standard header (never shorter than the real wait).
        headers = retry_headers(wait)
        headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return self._error(failure, headers)

    def _random_fault(self, request: web.Request) -> web.StreamResponse | None:
        if self._fault_total <= 0:
            return None
        fault = pick_fault(self.config, self._rng.random())
        if fault is None:
            return None
        if fault == "5xx":
            fault = str(self._rng.choice(SERVER_ERROR_STATUSES))
        self._stats.faults[fault] += 1
        return self._fault_response(fault, request)

    def _fault_response(self, fault: str, request: web.Request) -> web.StreamResponse:
        if fault in _FAULT_ERRORS:
            headers = retry_headers(self.config.retry_after) if fault == "429" else None
            return self._error(_FAULT_ERRORS[fault], headers)
        if fault in _FAULT_PAGES:
            status, reason, page = _FAULT_PAGES[fault]
            return self._reply(_html(status, page, reason))
        if fault == "redirect":
            location = f"{self.origin}/moved{GENERATION_PATH}"
            return self._reply(web.Response(status=301, headers={hdrs.LOCATION: location}))
        if fault == "malformed":
            text = json.dumps({"created": int(time.time()), "data": [{"b64_json": "iVBORw0K"}]})
            return self._reply(
                web.Response(text=text[: len(text) // 2], content_type="application/json")
            )
        if fault == "drop":
            return _drop(request)
        raise ValueError(f"fault {fault!r} does not replace the answer")

    async def _latency(self) -> None:
        delay = self.config.latency
        if self.config.latency_jitter:
            delay += self._rng.uniform(0.0, self.config.latency_jitter)
        if delay > 0:
            await asyncio.sleep(delay)

    def _success(self, request: ImageRequest, forced: str | None) -> web.Response:
        count = {"fewer-images": request.n - 1, "empty-data": 0}.get(forced or "", request.n)
        items = [self._item(request, index, forced == "bad-base64") for index in range(count)]
        body: dict[str, Any] = {"created": int(time.time()), "data": items}
        if request.usage:
            body["usage"] = usage_for(request)
        if forced in (None, "slow"):
            stats = self._stats
            stats.generated += 1
            stats.images += count
            stats.by_model[request.model] = stats.by_model.get(request.model, 0) + 1
        return self._reply(web.Response(text=json.dumps(body), content_type="application/json"))

    def _item(self, request: ImageRequest, index: int, corrupt: bool) -> dict[str, str]:
        seed = image_seed(request.prompt, index)
        item: dict[str, str]
        if corrupt:
            item = {"b64_json": _BAD_BASE64}
        elif request.mode == "b64_json":
            item = {"b64_json": self._image_b64(request.fmt, seed)}
        else:
            item = {"url": self._store(request.fmt, seed)}
        if request.revised_prompt:
            item["revised_prompt"] = f"{request.prompt}, rendered in rich, vivid detail"
        return item

    def _picture_key(self, fmt: str, seed: int) -> tuple[str, int]:
        variants = _PAYLOAD_VARIANTS if fmt == "png" and self.config.payload_bytes else None
        return fmt, seed % (variants or _PICTURE_VARIANTS)

    def _image_bytes(self, fmt: str, seed: int) -> bytes:
        key = self._picture_key(fmt, seed)
        data = self._bytes_cache.get(key)
        if data is None:
            if fmt == "png" and self.config.payload_bytes:
                data = png_of_size(self.config.payload_bytes, key[1])
            else:
                px = self.config.image_px
                data = make_image(fmt, key[1], (px, px))
            self._bytes_cache[key] = data
        return data

    def _image_b64(self, fmt: str, seed: int) -> str:
        key = self._picture_key(fmt, seed)
        text = self._b64_cache.get(key)
        if text is None:
            text = base64.b64encode(self._image_bytes(fmt, seed)).decode("ascii")
            self._b64_cache[key] = text
        return text

    def _store(self, fmt: str, seed: int) -> str:
        now = self._now()
        self._evict(now, room=1)
        name = f"{secrets.token_hex(12)}.{_EXTENSIONS[fmt]}"
        self._files[name] = _StoredFile(
            self._image_bytes(fmt, seed), CONTENT_TYPES[fmt], now + self.config.url_ttl
        )
        return f"{self.origin}/files/{name}"

    def _evict(self, now: float, room: int = 0) -> None:
        # Every file lives for the same TTL, so insertion order is expiry order; the cap keeps
        # memory bounded when a long run never downloads its links.
        while self._files:
            name = next(iter(self._files))
            if self._files[name].expires_at > now and len(self._files) + room <= _MAX_FILES:
                break
            del self._files[name]

    # other routes

    async def _handle_download(self, request: web.Request) -> web.StreamResponse:
        if hdrs.AUTHORIZATION in request.headers:
            self._stats.download_auth_rejections += 1
            return web.Response(
                status=403,
                text="Forbidden: file links take no credentials",
                content_type="text/plain",
            )
        self._evict(self._now())
        name = request.match_info["name"]
        stored = self._files.get(name)
        if stored is None:
            return _html(404, _NOT_FOUND_PAGE)
        stored.downloads += 1
        # Two downloads allow one client retry; then the memory is released.
        if stored.downloads >= 2:
            del self._files[name]
        self._stats.downloads += 1
        return web.Response(body=stored.data, content_type=stored.content_type)

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        return _html(404, _NOT_FOUND_PAGE)


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without answering; aiohttp then skips writing the response."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


async def serve(
    config: SimConfig,
    host: str,
    port: int,
    *,
    on_ready: Callable[[Simulator], None] | None = None,
) -> None:
    """Run the simulated API until cancelled."""
    async with Simulator(config, host=host, port=port) as simulator:
        log.info("simulated CometAPI listening on %s", simulator.base_url)
        if on_ready is not None:
            on_ready(simulator)
        await asyncio.Event().wait()
