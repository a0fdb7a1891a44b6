"""A real aiohttp server on loopback that behaves like CometAPI's images route, with faults."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Literal

from aiohttp import hdrs, web

from ..models.registry import ModelRegistry
from .config import SimConfig
from .faults import (
    BAD_BASE64,
    DOWNLOAD_FAULTS,
    FAULT_ERRORS,
    FAULT_PAGES,
    FAULTS,
    NOT_FOUND_PAGE,
    SERVER_ERROR_STATUSES,
    SHAPING_FAULTS,
    ApiFailure,
    counts_as_generated,
    cut_image,
    images_to_answer,
    pick_fault,
    short_answer,
)
from .files import FileStore
from .limits import SlidingWindow, admit, retry_headers
from .pictures import PictureCache
from .rawanswers import drop, drop_midway, html
from .response import REQUEST_ID_HEADER, success_body
from .rules import (
    ID_ALPHABET,
    ImageRequest,
    check_authorization,
    error_body,
    image_seed,
    json_or_none,
    make_request_id,
    parse_request,
    usage_for,
)
from .stats import SimStats

__all__ = ["GENERATION_PATH", "SimConfig", "SimStats", "Simulator", "serve"]

log = logging.getLogger(__name__)

GENERATION_PATH = "/v1/images/generations"
# The most url files kept at once. Passed to the store at each use rather than fixed when
# the store is made, so a lowered value applies to a simulator already serving.
_MAX_FILES = 100_000


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
        self._files = FileStore(
            self._stats, self._now, self.config.url_ttl, self.config.huge_download_bytes
        )
        self._pictures = PictureCache(self.config.image_px, self.config.payload_bytes)
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
            queue = self._files.faults if name in DOWNLOAD_FAULTS else self._forced
            queue.append(name)

    def __repr__(self) -> str:
        where = self.base_url if self._state == "open" else self._state
        s = self._stats
        return (
            f"<Simulator {where} requests={s.requests} generated={s.generated} "
            f"images={s.images} in_flight={self._in_flight} "
            f"queued_faults={len(self._forced) + len(self._files.faults)}>"
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
        # The id inside the message (CometAPI's way) and in the header (every answer's).
        request_id = self._request_id()
        body = json.dumps(error_body(failure, request_id))
        return self._reply(
            web.Response(
                status=failure.status,
                text=body,
                content_type="application/json",
                headers={**(headers or {}), REQUEST_ID_HEADER: request_id},
            )
        )

    # generation route

    async def _handle_generation(self, request: web.Request) -> web.StreamResponse:
        self._stats.requests += 1
        self._in_flight += 1
        self._stats.max_in_flight = max(self._stats.max_in_flight, self._in_flight)
        try:
            response = await self._generate(request)
        except BaseException:
            self._stats.unanswered += 1
            raise
        finally:
            self._in_flight -= 1
        if request.transport is None or request.transport.is_closing():
            # The client is gone (killed, or it gave up): it never hears this answer.
            self._stats.unanswered += 1
        return response

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
            # `is None`, never `or`: aiohttp 3.10's responses are empty mappings, so false.
            refused = self._admit(parsed)
            if refused is None:
                refused = self._random_fault(request)
            if refused is not None:
                return refused
            forced = self._short_answer(parsed)
        elif forced == "slow":
            await asyncio.sleep(self.config.slow_seconds)
        await self._latency()
        return await self._success(parsed, body, forced, request)

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

    def _short_answer(self, request: ImageRequest) -> str | None:
        # No draw at all unless short answers are asked for: seeded runs keep their faults.
        if self.config.rate_short <= 0:
            return None
        fault = short_answer(self.config, request.n, self._rng.random())
        if fault is not None:
            self._stats.faults[fault] += 1
        return fault

    def _fault_response(self, fault: str, request: web.Request) -> web.StreamResponse:
        if fault in FAULT_ERRORS:
            headers = retry_headers(self.config.retry_after) if fault == "429" else None
            return self._error(FAULT_ERRORS[fault], headers)
        if fault in FAULT_PAGES:
            status, reason, page = FAULT_PAGES[fault]
            return self._reply(html(status, page, reason))
        if fault == "redirect":
            location = f"{self.origin}/moved{GENERATION_PATH}"
            return self._reply(web.Response(status=301, headers={hdrs.LOCATION: location}))
        if fault == "malformed":
            text = json.dumps({"created": int(time.time()), "data": [{"b64_json": "iVBORw0K"}]})
            return self._reply(
                web.Response(
                    text=text[: len(text) // 2],
                    content_type="application/json",
                    headers={REQUEST_ID_HEADER: self._request_id()},
                )
            )
        if fault == "drop":
            return drop(request)
        raise ValueError(f"fault {fault!r} does not replace the answer")

    async def _latency(self) -> None:
        delay = self.config.latency
        if self.config.latency_jitter:
            delay += self._rng.uniform(0.0, self.config.latency_jitter)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _success(
        self, request: ImageRequest, asked: Mapping[str, Any], forced: str | None, http: web.Request
    ) -> web.StreamResponse:
        count = images_to_answer(forced, request.n)
        items = [self._item(request, index, forced) for index in range(count)]
        usage = usage_for(request, count) if request.usage else None
        body = success_body(request, asked, int(time.time()), items, usage)
        headers = {REQUEST_ID_HEADER: self._request_id()}
        stats = self._stats
        stats.billed_images += count
        if counts_as_generated(forced):
            stats.generated += 1
            stats.images += count
            stats.by_model[request.model] = stats.by_model.get(request.model, 0) + 1
        if forced == "drop-midway":
            return await drop_midway(http, json.dumps(body).encode(), headers)
        return self._reply(
            web.Response(text=json.dumps(body), content_type="application/json", headers=headers)
        )

    def _item(self, request: ImageRequest, index: int, forced: str | None) -> dict[str, str]:
        seed = image_seed(request.prompt, index)
        # "truncated-image": the image, in the answer or at its link, is cut short.
        cut = forced == "truncated-image"
        item: dict[str, str]
        if forced == "bad-base64":
            item = {"b64_json": BAD_BASE64}
        elif request.mode == "b64_json" and cut:
            data = cut_image(self._pictures.image_bytes(request.fmt, seed))
            item = {"b64_json": base64.b64encode(data).decode("ascii")}
        elif request.mode == "b64_json":
            item = {"b64_json": self._pictures.image_b64(request.fmt, seed)}
        else:
            item = {"url": self._store(request.fmt, seed, cut)}
        if request.revised_prompt:
            item["revised_prompt"] = f"{request.prompt}, rendered in rich, vivid detail"
        return item

    def _store(self, fmt: str, seed: int, cut: bool = False) -> str:
        data = self._pictures.image_bytes(fmt, seed)
        name = self._files.put(cut_image(data) if cut else data, fmt, _MAX_FILES)
        return f"{self.origin}/files/{name}"

    # other routes

    async def _handle_download(self, request: web.Request) -> web.StreamResponse:
        return await self._files.serve(request, _MAX_FILES)

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        return html(404, NOT_FOUND_PAGE)


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
