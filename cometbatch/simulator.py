"""A real aiohttp server on loopback that behaves like CometAPI's images route, with faults."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from aiohttp import hdrs, web

from .imagegen import CONTENT_TYPES, make_image, png_of_size
from .models import ModelRegistry
from .simrules import (
    BAD_BASE64,
    DOWNLOAD_FAULTS,
    FAULT_ERRORS,
    FAULT_PAGES,
    FAULTS,
    ID_ALPHABET,
    NOT_AN_IMAGE_PAGE,
    NOT_FOUND_PAGE,
    SERVER_ERROR_STATUSES,
    SHAPING_FAULTS,
    ApiFailure,
    ImageRequest,
    SimConfig,
    SlidingWindow,
    admit,
    check_authorization,
    counts_as_generated,
    error_body,
    image_seed,
    images_to_answer,
    json_or_none,
    make_request_id,
    parse_request,
    pick_fault,
    retry_headers,
    usage_for,
)

__all__ = ["GENERATION_PATH", "SimConfig", "SimStats", "Simulator", "serve"]

log = logging.getLogger(__name__)

GENERATION_PATH = "/v1/images/generations"
# Distinct pictures cached per format: enough that prompts rarely share one, few enough
# that a long benchmark draws nearly every image from the cache.
_PICTURE_VARIANTS = 1024
_PAYLOAD_VARIANTS = 4
_MAX_FILES = 100_000
_CHUNK = 64 * 1024
_EXTENSIONS: Mapping[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}


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
        self._forced_downloads: deque[str] = deque()
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
        # Requests still being answered finish first: they read the simulator's state.
        if runner is not None:
            await runner.cleanup()
        self._state = "closed"
        self._files.clear()

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
        """Force the outcome of the next requests, in order ("download-*": the next downloads)."""
        if self._state == "closed":
            raise RuntimeError("the Simulator is closed")
        unknown = [name for name in faults if name not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
        for name in faults:
            queue = self._forced_downloads if name in DOWNLOAD_FAULTS else self._forced
            queue.append(name)

    def __repr__(self) -> str:
        where = self.base_url if self._state == "open" else self._state
        s = self._stats
        return (
            f"<Simulator {where} requests={s.requests} generated={s.generated} "
            f"images={s.images} in_flight={self._in_flight} "
            f"queued_faults={len(self._forced) + len(self._forced_downloads)}>"
        )

    # helpers

    def _now(self) -> float:
        assert self._clock is not None
        return self._clock()

    def _request_id(self) -> str:
        return make_request_id(time.time_ns(), "".join(self._ids.choices(ID_ALPHABET, k=8)))

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
        body = json_or_none(await request.read())
        auth = request.headers.get(hdrs.AUTHORIZATION)
        if self.config.record_requests:
            self._stats.requests_log.append(
                {"body": body, "authorization_present": auth is not None}
            )
        forced = self._forced.popleft() if self._forced else None
        if forced is not None:
            self._stats.faults[forced] += 1
            if forced not in SHAPING_FAULTS:
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
        return await self._success(parsed, forced, request)

    def _admit(self, request: ImageRequest) -> web.StreamResponse | None:
        windows = ((self._rpm, 1, "requests"), (self._ipm, request.n, "images"))
        refusal = admit(windows, self._now())
        if refusal is None:
            return None
        self._stats.limit_429s += 1
        return self._error(*refusal)

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
        if fault in FAULT_ERRORS:
            headers = retry_headers(self.config.retry_after) if fault == "429" else None
            return self._error(FAULT_ERRORS[fault], headers)
        if fault in FAULT_PAGES:
            status, reason, page = FAULT_PAGES[fault]
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

    async def _success(
        self, request: ImageRequest, forced: str | None, http: web.Request
    ) -> web.StreamResponse:
        count = images_to_answer(forced, request.n)
        items = [self._item(request, index, forced == "bad-base64") for index in range(count)]
        body: dict[str, Any] = {"created": int(time.time()), "data": items}
        if request.usage:
            body["usage"] = usage_for(request)
        if counts_as_generated(forced):
            stats = self._stats
            stats.generated += 1
            stats.images += count
            stats.by_model[request.model] = stats.by_model.get(request.model, 0) + 1
        if forced == "drop-midway":
            return await _drop_midway(http, json.dumps(body).encode())
        return self._reply(web.Response(text=json.dumps(body), content_type="application/json"))

    def _item(self, request: ImageRequest, index: int, corrupt: bool) -> dict[str, str]:
        seed = image_seed(request.prompt, index)
        item: dict[str, str]
        if corrupt:
            item = {"b64_json": BAD_BASE64}
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
        fault = self._forced_downloads.popleft() if self._forced_downloads else None
        if fault is not None:
            self._stats.faults[fault] += 1
            if fault == "download-expired":
                # Past its TTL: gone for good, answered as any expired link is.
                self._files.pop(name, None)
        stored = self._files.get(name)
        if stored is None or fault == "download-404":
            return _html(404, NOT_FOUND_PAGE)
        if fault == "download-not-image":
            return _html(200, NOT_AN_IMAGE_PAGE)
        if fault == "download-huge":
            return await _send_huge(request, stored, self.config.huge_download_bytes)
        stored.downloads += 1
        # Two downloads allow one client retry; then the memory is released.
        if stored.downloads >= 2:
            del self._files[name]
        self._stats.downloads += 1
        return web.Response(body=stored.data, content_type=stored.content_type)

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        return _html(404, NOT_FOUND_PAGE)


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without answering; aiohttp then skips writing the response."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


async def _drop_midway(request: web.Request, body: bytes) -> web.StreamResponse:
    """Send the headers and half the body, then close: the answer is lost after it was paid."""
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    # close() (not abort()) sends what was written before the FIN; aiohttp then finds the
    # transport closing and skips finishing the response.
    if request.transport is not None:
        request.transport.close()
    return response


async def _send_huge(request: web.Request, stored: _StoredFile, size: int) -> web.StreamResponse:
    """Stream the image padded to `size` bytes, announced in Content-Length."""
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: stored.content_type})
    response.content_length = total = max(size, len(stored.data))
    await response.prepare(request)
    padding = bytes(_CHUNK)
    # A client that refuses it after the headers closes the connection: that is the point.
    with contextlib.suppress(ConnectionError):
        await response.write(stored.data)
        for start in range(len(stored.data), total, _CHUNK):
            await response.write(padding[: min(_CHUNK, total - start)])
    return response


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
