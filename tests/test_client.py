"""Tests for the HTTP client against small aiohttp servers on loopback ephemeral ports."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr
from support import Handler, serve

from cometbatch import (
    APIConnectionError,
    APIError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ContentPolicyError,
    DownloadError,
    IncompatibleAPIError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    Settings,
)
from cometbatch.net.client import Client
from cometbatch.net.response import ImagesResponse
from cometbatch.net.retry import possibly_billed

KEY = "sk-test-SECRET-0123456789"
ROUTE = "/v1/images/generations"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def reply(status: int = 200, body: Any = None, **kwargs: Any) -> Handler:
    """A handler answering a fixed JSON (or text, if `text=` is given) response."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if "text" in kwargs or "body_bytes" in kwargs:
            return web.Response(
                status=status,
                text=kwargs.get("text"),
                body=kwargs.get("body_bytes"),
                content_type=kwargs.get("content_type", "text/plain"),
                headers=kwargs.get("headers"),
            )
        return web.json_response(body, status=status, headers=kwargs.get("headers"))

    return handler


def comet_error(message: str, code: str = "", request_id: str | None = "req-42") -> dict[str, Any]:
    """An error body in CometAPI's shape, with the request id inside the message."""
    suffix = f" (request id: {request_id})" if request_id else ""
    return {
        "error": {"message": message + suffix, "type": "comet_api_error", "param": "", "code": code}
    }


def free_port() -> int:
    """A loopback port that was just bound and released, so nothing listens on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_no_key(exc: BaseException) -> None:
    """The key appears nowhere in the exception or its cause chain."""
    seen: BaseException | None = exc
    while seen is not None:
        assert KEY not in str(seen)
        assert KEY not in repr(seen)
        seen = seen.__cause__


async def generate(base: str, payload: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Send one generation through a fresh client to `base`/v1."""
    async with Client(base_url=f"{base}/v1", api_key=KEY, **kwargs) as client:
        return await client.generate(payload or {"model": "dall-e-3", "prompt": "a fox"})


async def test_generate_parses_success_and_sends_key_per_request() -> None:
    """A 200 answer is parsed, and the request carried the key and the JSON payload."""
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen["auth"] = request.headers.get("Authorization")
        seen["body"] = await request.json()
        return web.json_response(
            {
                "created": 1700000000,
                "data": [{"b64_json": "aGk=", "revised_prompt": "a red fox", "extra": 1}],
                "usage": {"total_tokens": 10},
                "unknown_field": True,
            }
        )

    async with serve({("POST", ROUTE): handler}) as base:
        answer = await generate(base, {"model": "gpt-image-1", "prompt": "a fox", "n": 1})
    assert isinstance(answer, ImagesResponse)
    assert answer.answered.created == 1700000000
    assert answer.data[0].b64_json == "aGk="
    assert answer.data[0].revised_prompt == "a red fox"
    assert answer.usage == {"total_tokens": 10}
    assert seen == {
        "auth": f"Bearer {KEY}",
        "body": {"model": "gpt-image-1", "prompt": "a fox", "n": 1},
    }


async def test_generate_without_key_sends_no_authorization() -> None:
    """With no key, the request carries no Authorization header at all."""
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"data": [{"url": "http://127.0.0.1/x.png"}]})

    async with (
        serve({("POST", ROUTE): handler}) as base,
        Client(base_url=f"{base}/v1/", api_key=None) as client,
    ):
        answer = await client.generate({"prompt": "p"})
    assert answer.data[0].url == "http://127.0.0.1/x.png"
    assert seen == [None]


@pytest.mark.parametrize(
    ("status", "code", "message", "cls", "kind", "retryable"),
    [
        (400, "", "Invalid size", BadRequestError, "bad_request", False),
        (401, "", "Invalid token", AuthenticationError, "auth", False),
        (403, "", "Forbidden", PermissionDeniedError, "permission", False),
        (404, "", "No such model", NotFoundError, "not_found", False),
        (413, "", "Body too large", BadRequestError, "too_large", False),
        (422, "", "Unprocessable", BadRequestError, "unprocessable", False),
        (408, "", "Request timeout", APIStatusError, "status", True),
        (409, "", "Conflict", APIStatusError, "status", True),
        (429, "", "Rate limit reached", RateLimitError, "rate_limit", True),
        (500, "", "Internal error", ServerError, "server", True),
        (500, "invalid_request", "Upstream rejected", ServerError, "server", False),
        (502, "", "Bad gateway", ServerError, "server", True),
        (503, "", "Overloaded", ServerError, "server", True),
        (504, "", "Gateway timeout", ServerError, "server", True),
        (524, "", "A timeout occurred", ServerError, "server", True),
        (
            400,
            "content_policy_violation",
            "Rejected by the safety system",
            ContentPolicyError,
            "content_policy",
            False,
        ),
    ],
)
async def test_error_statuses_are_classified(
    status: int, code: str, message: str, cls: type[APIError], kind: str, retryable: bool
) -> None:
    """Each error status maps to its class, kind and retry decision, with the request id."""
    async with serve({("POST", ROUTE): reply(status, comet_error(message, code))}) as base:
        with pytest.raises(APIError) as info:
            await generate(base)
    exc = info.value
    assert type(exc) is cls
    assert (exc.kind, exc.retryable, exc.status) == (kind, retryable, status)
    assert exc.request_id == "req-42"
    assert exc.message == message
    assert exc.code == (code or None)
    assert exc.retry_after is None


async def test_rate_limit_retry_after_is_recorded() -> None:
    """A 429 with Retry-After carries the parsed wait on the error."""
    handler = reply(429, comet_error("slow down"), headers={"Retry-After": "3"})
    async with serve({("POST", ROUTE): handler}) as base:
        with pytest.raises(RateLimitError) as info:
            await generate(base)
    assert info.value.retry_after == 3.0
    assert info.value.retryable is True


async def test_retry_after_ms_is_recorded_uncapped() -> None:
    """retry-after-ms wins, and a large value is stored raw (capping is the policy's job)."""
    handler = reply(503, comet_error("busy"), headers={"retry-after-ms": "500000"})
    async with serve({("POST", ROUTE): handler}) as base:
        with pytest.raises(ServerError) as info:
            await generate(base)
    assert info.value.retry_after == 500.0


async def test_request_id_falls_back_to_header() -> None:
    """Without a request id in the message, the X-Request-Id header supplies it."""
    handler = reply(500, comet_error("boom", request_id=None), headers={"X-Request-Id": "hdr-7"})
    async with serve({("POST", ROUTE): handler}) as base:
        with pytest.raises(ServerError) as info:
            await generate(base)
    assert info.value.request_id == "hdr-7"


async def test_html_error_page_gives_short_message() -> None:
    """A 502 HTML page becomes a short plain message, not the page."""
    page = "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"
    handler = reply(502, text=page, content_type="text/html")
    async with serve({("POST", ROUTE): handler}) as base:
        with pytest.raises(ServerError) as info:
            await generate(base)
    assert info.value.message == "the server answered with an HTML page"
    assert info.value.retryable is True


async def test_html_200_is_not_an_openai_api() -> None:
    """A 200 HTML page says plainly that this is not an OpenAI-compatible API."""
    page = "<!doctype html><html><head><title>Welcome</title></head></html>"
    handler = reply(200, text=page, content_type="text/html")
    async with serve({("POST", ROUTE): handler}) as base:
        with pytest.raises(APIResponseError) as info:
            await generate(base)
    message = str(info.value)
    assert "does not look like an OpenAI-compatible API" in message
    assert "HTML page" in message
    assert "<" not in message
    assert info.value.retryable is False


async def test_redirect_is_not_followed_and_explained() -> None:
    """A 301 is not followed; the message names the redirect and the base URL."""
    followed: list[str] = []

    async def moved(request: web.Request) -> web.StreamResponse:
        await request.read()
        raise web.HTTPMovedPermanently(location="/login")

    async def login(request: web.Request) -> web.StreamResponse:
        followed.append(request.method)
        return web.json_response({"data": [{"b64_json": "aGk="}]})

    async with serve({("POST", ROUTE): moved, ("*", "/login"): login}) as base:
        with pytest.raises(APIResponseError) as info:
            await generate(base)
    message = str(info.value)
    assert "301 redirect to /login" in message
    assert "does not look like an OpenAI-compatible API" in message
    assert f"{base}/v1" in message
    assert info.value.retryable is False
    assert followed == []


async def test_non_json_200_is_not_an_openai_api() -> None:
    """A 200 plain-text answer is reported as not an OpenAI-compatible API."""
    async with serve({("POST", ROUTE): reply(200, text="hello world")}) as base:
        with pytest.raises(APIResponseError) as info:
            await generate(base)
    assert "does not look like an OpenAI-compatible API" in str(info.value)
    assert info.value.retryable is False


async def test_truncated_json_is_malformed_and_retryable() -> None:
    """A cut-off JSON body is a malformed response worth retrying."""
    body = b'{"created": 1, "data": [{"b64_json": "aGk'
    handler = reply(200, body_bytes=body, content_type="application/json")
    async with serve({("POST", ROUTE): handler}) as base:
        with pytest.raises(APIResponseError) as info:
            await generate(base)
    assert str(info.value).startswith("malformed response:")
    assert info.value.retryable is True


async def test_wrong_shape_json_is_malformed_and_retryable() -> None:
    """JSON that fails validation is a malformed response worth retrying."""
    async with serve({("POST", ROUTE): reply(200, {"data": "nope"})}) as base:
        with pytest.raises(APIResponseError) as info:
            await generate(base)
    assert str(info.value).startswith("malformed response: data")
    assert info.value.retryable is True


async def test_empty_data_is_retryable() -> None:
    """An answer with no images is a retryable response error."""
    async with serve({("POST", ROUTE): reply(200, {"created": 1, "data": []})}) as base:
        with pytest.raises(APIResponseError) as info:
            await generate(base)
    assert str(info.value) == "the API answered no images"
    assert info.value.retryable is True


@pytest.mark.parametrize(
    ("body", "billed"),
    [
        (b"{}", False),
        (b'{"created": 1}', False),
        (b'{"created": 1, "data": []}', False),
        (b'{"data": null, "usage": {"total_tokens": 1}}', False),
        (json.dumps(comet_error("upstream failed")).encode(), False),
        (b"", True),
        (b'{"created": 1, "data": [{"b64_json": "aGk', True),
        (b'{"data": [{"b64_json": 5}]}', True),
        (b'{"data": [{"revised_prompt": "a fox"}]}', True),
    ],
    ids=["empty-object", "no-data", "empty-data", "null-data", "error-in-200", "empty-body",
         "cut-off", "wrong-image-shape", "image-without-content"],
)  # fmt: skip
async def test_only_answers_that_could_carry_images_count_as_possibly_billed(
    body: bytes, billed: bool
) -> None:
    """A readable answer with no images is malformed but paid nothing; a cut-off or unreadable
    one, or one with an image slot, may have carried paid images. All are retried."""
    handler = reply(200, body_bytes=body, content_type="application/json")
    async with serve({("POST", ROUTE): handler}) as base:
        with pytest.raises(APIResponseError) as info:
            await generate(base)
    assert info.value.retryable is True
    assert possibly_billed(info.value) is billed


async def test_error_object_with_200_is_an_error() -> None:
    """A relay that sends an error object with status 200 still raises, with the request id."""
    async with serve({("POST", ROUTE): reply(200, comet_error("upstream failed"))}) as base:
        with pytest.raises(APIResponseError) as info:
            await generate(base)
    assert "upstream failed" in str(info.value)
    assert info.value.request_id == "req-42"


NOT_THE_API = [
    (405, "405: Method Not Allowed", "text/plain"),
    (501, "<html><body><h1>Unsupported method ('POST')</h1></body></html>", "text/html"),
    (404, "<!DOCTYPE html><html><body>Not Found</body></html>", "text/html"),
    (404, "404 page not found", "text/plain"),
    (400, "<html><body>The plain HTTP request was sent to HTTPS port</body></html>", "text/html"),
    (200, "<!DOCTYPE html><html><body>Welcome to nginx!</body></html>", "text/html"),
]


@pytest.mark.parametrize(
    ("status", "text", "content_type"), NOT_THE_API, ids=[str(row[0]) for row in NOT_THE_API]
)
async def test_a_plain_web_server_is_not_the_api(status: int, text: str, content_type: str) -> None:
    """A 404, 405 or 501 that is not JSON and the HTML pages a plain web server answers a POST
    with say "not this API": a configuration error naming --base-url, never a job's failure."""
    handler = reply(status, text=text, content_type=content_type)
    async with serve({("POST", ROUTE): handler}) as base:
        with pytest.raises(IncompatibleAPIError) as info:
            await generate(base)
    assert isinstance(info.value, ConfigError)
    assert (info.value.status, info.value.retryable) == (status, False)
    message = str(info.value)
    assert f"{base}/v1" in message and "check --base-url" in message
    assert "<" not in message


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (405, comet_error("Method not allowed"), APIStatusError),
        (501, comet_error("Not implemented"), ServerError),
        (404, comet_error("No such model"), NotFoundError),
        # A compatible gateway's JSON 404 for one job's unknown model: that job's failure.
        (404, {"error": {"message": "unknown model", "code": None}}, NotFoundError),
        (502, "<html><body><h1>502 Bad Gateway</h1></body></html>", ServerError),
        (403, "<html><body>Blocked by the firewall</body></html>", PermissionDeniedError),
        (413, "<html><body>Request Entity Too Large</body></html>", BadRequestError),
    ],
)
async def test_the_api_or_a_proxy_in_front_of_it_keeps_its_classification(
    status: int, body: Any, cls: type[APIError]
) -> None:
    """CometAPI's own JSON errors, and the error pages a proxy in front of it sends for one
    request or a passing fault, are classified by status as before."""
    if isinstance(body, str):
        handler = reply(status, text=body, content_type="text/html")
    else:
        handler = reply(status, body)
    async with serve({("POST", ROUTE): handler}) as base:
        with pytest.raises(APIError) as info:
            await generate(base)
    assert type(info.value) is cls
    assert not isinstance(info.value, ConfigError)


def big_answer(chunked: bool, size: int) -> Handler:
    """A 200 answer of about `size` bytes, sent with a Content-Length or in chunks."""
    body = json.dumps({"data": [{"b64_json": "A" * size}]}).encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not chunked:
            return web.Response(body=body, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for start in range(0, len(body), 4096):
            await resp.write(body[start : start + 4096])
        await resp.write_eof()
        return resp

    return handler


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_answer_over_the_size_cap_is_a_failure_that_may_be_billed(chunked: bool) -> None:
    """An answer larger than max_response_bytes is not read into memory: a non-retried
    failure that says its images may have been paid for."""
    async with serve({("POST", ROUTE): big_answer(chunked, 200_000)}) as base:
        with pytest.raises(APIResponseError) as info:
            await generate(base, max_response_bytes=100_000)
        assert len((await generate(base, max_response_bytes=300_000)).data) == 1
    exc = info.value
    assert (exc.kind, exc.status, exc.retryable) == ("bad_response", 200, False)
    assert possibly_billed(exc)
    assert "max_response_bytes (100000 bytes)" in exc.message
    assert "may have been billed" in exc.message


async def test_a_content_length_over_the_size_cap_is_refused_before_reading() -> None:
    """A Content-Length over the cap fails at once, without waiting for a body still coming."""
    done = asyncio.Event()

    async def stalling(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 500_000
        await resp.prepare(request)
        await resp.write(b'{"data": [')
        await done.wait()
        return resp

    async with serve({("POST", ROUTE): stalling}) as base:
        try:
            with pytest.raises(APIResponseError, match="max_response_bytes"):
                await generate(base, max_response_bytes=100_000, timeout=30)
        finally:
            done.set()


async def test_an_error_answer_over_the_size_cap_is_classified_by_its_status() -> None:
    """A huge error page is cut short, not read whole, and still classified by its status."""
    page = "<html><body>" + "x" * 3_000_000 + "</body></html>"
    handler = reply(503, text=page, content_type="text/html")
    async with serve({("POST", ROUTE): handler}) as base:
        with pytest.raises(ServerError) as info:
            await generate(base, max_response_bytes=100_000)
    assert (info.value.status, info.value.retryable) == (503, True)


async def test_connection_refused_is_not_sent() -> None:
    """A refused connection means the request was never sent: retryable, not ambiguous."""
    port = free_port()
    with pytest.raises(APIConnectionError) as info:
        await generate(f"http://127.0.0.1:{port}")
    exc = info.value
    assert type(exc) is APIConnectionError
    assert (exc.sent, exc.retryable, exc.kind) == (False, True, "connection")
    assert isinstance(exc.__cause__, aiohttp.ClientConnectorError)
    assert_no_key(exc)


async def test_server_closing_after_request_is_ambiguous() -> None:
    """A server that reads the request and hangs up leaves an ambiguous, retryable error."""

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)
        await reader.readexactly(int(length.group(1)) if length else 0)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(APIConnectionError) as info:
            await generate(f"http://127.0.0.1:{port}")
    exc = info.value
    assert (exc.sent, exc.retryable, exc.kind) == (True, True, "ambiguous")


async def test_slow_server_times_out_ambiguously() -> None:
    """No answer within the timeout gives an ambiguous APITimeoutError."""
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        await request.read()
        await release.wait()
        return web.json_response({"data": []})

    async with serve({("POST", ROUTE): stall}) as base:
        try:
            with pytest.raises(APITimeoutError) as info:
                await generate(base, timeout=0.05)
        finally:
            release.set()
    exc = info.value
    assert (exc.sent, exc.retryable, exc.kind) == (True, True, "ambiguous")


def image_routes(seen: list[str | None]) -> dict[tuple[str, str], Handler]:
    """A generation route that demands the key, and an image route that refuses any auth."""

    async def generation(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response(comet_error("no key"), status=401)
        return web.json_response({"data": [{"url": str(request.url.with_path("/img/0.png"))}]})

    async def image(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        if "Authorization" in request.headers:
            return web.Response(status=403, text="credentials not accepted here")
        return web.Response(body=PNG, content_type="image/png")

    return {("POST", ROUTE): generation, ("GET", "/img/0.png"): image}


async def test_download_never_sends_authorization() -> None:
    """The image download carries no Authorization header even though generation did."""
    seen: list[str | None] = []
    async with (
        serve(image_routes(seen)) as base,
        Client(base_url=f"{base}/v1", api_key=KEY) as client,
    ):
        answer = await client.generate({"prompt": "p"})
        url = answer.data[0].url
        assert url is not None
        data, content_type = await client.download(url)
    assert data == PNG
    assert content_type == "image/png"
    assert seen == [None]


async def test_caller_session_is_used_and_left_open() -> None:
    """A caller's session serves both calls, stays open, and downloads still carry no key."""
    seen: list[str | None] = []
    async with serve(image_routes(seen)) as base, aiohttp.ClientSession() as session:
        async with Client(base_url=f"{base}/v1", api_key=KEY, session=session) as client:
            answer = await client.generate({"prompt": "p"})
            url = answer.data[0].url
            assert url is not None
            data, _ = await client.download(url)
        assert not session.closed
        assert "Authorization" not in session.headers
        assert data == PNG
        assert seen == [None]


async def test_caller_session_with_default_auth_does_not_leak_to_downloads() -> None:
    """Even a caller's session with a default Authorization header downloads without it."""
    seen: list[str | None] = []
    async with (
        serve(image_routes(seen)) as base,
        aiohttp.ClientSession(headers={"Authorization": "Bearer other"}) as session,
    ):
        async with Client(base_url=f"{base}/v1", api_key=KEY, session=session) as client:
            answer = await client.generate({"prompt": "p"})
            url = answer.data[0].url
            assert url is not None
            data, _ = await client.download(url)
        assert not session.closed
    assert data == PNG
    assert seen == [None]


async def test_download_follows_redirects() -> None:
    """A redirected image URL is followed to the image."""

    async def moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(location="/real.png")

    async def real(request: web.Request) -> web.StreamResponse:
        return web.Response(body=PNG, content_type="image/png")

    routes: dict[tuple[str, str], Handler] = {
        ("GET", "/old.png"): moved,
        ("GET", "/real.png"): real,
    }
    async with serve(routes) as base, Client(base_url=base, api_key=KEY) as client:
        data, _ = await client.download(f"{base}/old.png")
    assert data == PNG


async def test_download_size_cap_by_content_length() -> None:
    """An image whose Content-Length exceeds the cap is refused, not retried."""

    async def big(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 1000, content_type="image/png")

    async with (
        serve({("GET", "/big.png"): big}) as base,
        Client(base_url=base, api_key=KEY, max_download_bytes=100) as client,
    ):
        with pytest.raises(DownloadError) as info:
            await client.download(f"{base}/big.png")
    assert str(info.value) == "image larger than 100 bytes"
    assert info.value.retryable is False


async def test_download_size_cap_while_streaming() -> None:
    """A chunked image with no Content-Length is cut off once it passes the cap."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(10):
            await response.write(b"x" * 100)
        await response.write_eof()
        return response

    async with (
        serve({("GET", "/big.png"): stream}) as base,
        Client(base_url=base, api_key=KEY, max_download_bytes=250) as client,
    ):
        with pytest.raises(DownloadError) as info:
            await client.download(f"{base}/big.png")
    assert str(info.value) == "image larger than 250 bytes"


async def test_an_image_host_that_refuses_the_connection_is_named_plainly() -> None:
    """A download from a host nothing listens on says which host and why, retryable, without
    aiohttp's own wording of its connector."""
    port = free_port()
    async with Client(base_url="http://127.0.0.1:9/v1", api_key=KEY) as client:
        with pytest.raises(DownloadError) as info:
            await client.download(f"http://127.0.0.1:{port}/0.png")
    assert str(info.value).startswith(f"cannot connect to the image host 127.0.0.1:{port}: ")
    assert "ssl" not in str(info.value) and info.value.retryable


@pytest.mark.parametrize(
    ("status", "retryable", "message"),
    [
        (404, False, "the image URL is no longer valid (404)"),
        (403, False, "the image URL is no longer valid (403)"),
        (410, False, "the image URL is no longer valid (410)"),
        (503, True, "the image host answered 503"),
        (429, True, "the image host answered 429"),
        (400, False, "the image host answered 400"),
    ],
)
async def test_download_status_errors(status: int, retryable: bool, message: str) -> None:
    """Expired URLs are permanent failures; server errors are worth another download."""
    async with (
        serve({("GET", "/x.png"): reply(status, text="nope")}) as base,
        Client(base_url=base, api_key=KEY) as client,
    ):
        with pytest.raises(DownloadError) as info:
            await client.download(f"{base}/x.png")
    assert (str(info.value), info.value.retryable, info.value.status) == (
        message,
        retryable,
        status,
    )


@pytest.mark.parametrize("content_type", ["text/html", "application/json"])
async def test_download_refuses_non_images(content_type: str) -> None:
    """An HTML or JSON answer to an image URL is not an image, and not retried."""
    handler = reply(200, text="<html></html>", content_type=content_type)
    async with (
        serve({("GET", "/x.png"): handler}) as base,
        Client(base_url=base, api_key=KEY) as client,
    ):
        with pytest.raises(DownloadError) as info:
            await client.download(f"{base}/x.png")
    assert str(info.value).startswith("not an image")
    assert info.value.retryable is False


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "x.png"])
async def test_download_refuses_non_http_urls(url: str) -> None:
    """Only http(s) URLs are downloaded."""
    async with Client(base_url="http://127.0.0.1:9/v1", api_key=KEY) as client:
        with pytest.raises(DownloadError) as info:
            await client.download(url)
    assert info.value.retryable is False


async def test_download_connection_refused_is_retryable() -> None:
    """A download that cannot connect is a retryable download error."""
    port = free_port()
    async with Client(base_url="http://127.0.0.1:9/v1", api_key=KEY) as client:
        with pytest.raises(DownloadError) as info:
            await client.download(f"http://127.0.0.1:{port}/x.png")
    assert info.value.retryable is True
    assert info.value.kind == "download"


async def test_key_never_appears_in_repr_or_errors() -> None:
    """Neither repr(client) nor an error whose body echoes the key reveals it."""
    echo = reply(401, comet_error(f"Incorrect API key provided: {KEY}"))
    async with serve({("POST", ROUTE): echo}) as base:
        client = Client(base_url=f"{base}/v1", api_key=KEY)
        assert KEY not in repr(client)
        async with client:
            assert KEY not in repr(client)
            with pytest.raises(AuthenticationError) as info:
                await client.generate({"prompt": "p"})
        assert KEY not in repr(client)
    assert_no_key(info.value)
    assert "***" in str(info.value)


async def test_a_key_under_the_name_of_image_data_elsewhere_is_blanked() -> None:
    """Only an image's own b64_json is skipped as image data: the same name in `usage` or in
    an image's extra fields is text that reaches the ledger, so the key is blanked there."""
    text = json.dumps(
        {
            "data": [{"b64_json": "aGk=", "meta": {"b64_json": KEY}}],
            "usage": {"b64_json": KEY, "input_tokens": 3},
        }
    )
    async with serve({("POST", ROUTE): reply(text=text, content_type="application/json")}) as base:
        answer = await generate(base)
    assert KEY not in json.dumps(answer.model_dump())
    assert answer.usage == {"b64_json": "***", "input_tokens": 3}


async def test_a_key_with_one_character_escaped_is_blanked_from_an_answer() -> None:
    """An answer spelling the key with one character as an uppercase \\u escape still has it
    blanked wherever it stands, next to other escaped text."""
    text = json.dumps(
        {"data": [{"b64_json": "aGk=", "revised_prompt": f"caf\u00e9 for {KEY}"}]}
    ).replace("sk-test", "sk\\u002Dtest")
    async with serve({("POST", ROUTE): reply(text=text, content_type="application/json")}) as base:
        answer = await generate(base)
    assert answer.data[0].revised_prompt == "caf\u00e9 for ***"


def test_repr_shows_base_url_and_state() -> None:
    """repr names the base URL and the lifecycle state."""
    client = Client(base_url="http://127.0.0.1:9/v1", api_key=KEY)
    assert "http://127.0.0.1:9/v1" in repr(client)
    assert "unopened" in repr(client)


@pytest.mark.parametrize(
    "base_url", ["http://example.com/v1", "http://10.0.0.1/v1", "http://api.cometapi.com/v1"]
)
def test_plain_http_to_remote_host_is_refused(base_url: str) -> None:
    """A plain-http base URL to a non-loopback host is a ConfigError before any traffic."""
    with pytest.raises(ConfigError) as info:
        Client(base_url=base_url, api_key=KEY)
    assert KEY not in str(info.value)


def test_plain_http_allowed_for_loopback_or_when_asked() -> None:
    """Loopback hosts, and any host with allow_insecure_http, may use plain http."""
    Client(base_url="http://localhost:8000/v1", api_key=KEY)
    Client(base_url="http://[::1]:8000/v1", api_key=KEY)
    Client(base_url="http://example.com/v1", api_key=KEY, allow_insecure_http=True)


@pytest.mark.parametrize("base_url", ["ftp://127.0.0.1/v1", "127.0.0.1:8000", ""])
def test_bad_base_url_is_refused(base_url: str) -> None:
    """A base URL that is not http(s)://host is a ConfigError."""
    with pytest.raises(ConfigError):
        Client(base_url=base_url, api_key=KEY)


async def test_closed_client_refuses_use() -> None:
    """After close the client refuses calls and cannot be reopened."""
    client = Client(base_url="http://127.0.0.1:9/v1", api_key=KEY)
    async with client:
        pass
    assert client.closed
    assert "closed" in repr(client)
    with pytest.raises(RuntimeError, match="client is closed"):
        await client.generate({"prompt": "p"})
    with pytest.raises(RuntimeError, match="client is closed"):
        await client.download("http://127.0.0.1:9/x.png")
    with pytest.raises(RuntimeError, match="client is closed"):
        await client.__aenter__()


async def test_unopened_client_without_session_refuses_use() -> None:
    """A client that owns no session yet must be entered first."""
    client = Client(base_url="http://127.0.0.1:9/v1", api_key=KEY)
    with pytest.raises(RuntimeError, match="not open"):
        await client.generate({"prompt": "p"})


async def test_from_settings_uses_settings() -> None:
    """from_settings takes base URL, key and limits from Settings."""
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"data": [{"b64_json": "aGk="}]})

    async with serve({("POST", ROUTE): handler}) as base:
        settings = Settings(base_url=f"{base}/v1", api_key=SecretStr(KEY), max_download_bytes=5)
        client = Client.from_settings(settings)
        assert client.max_download_bytes == 5
        assert client.base_url == f"{base}/v1"
        async with client:
            await client.generate({"prompt": "p"})
    assert seen == [f"Bearer {KEY}"]


def test_images_response_ignores_unknown_fields() -> None:
    """Unknown top-level fields are ignored and unknown image fields kept."""
    answer = ImagesResponse.model_validate(
        json.loads('{"data": [{"url": "u", "seed": 7}], "model": "m"}')
    )
    assert answer.data[0].url == "u"
    assert answer.data[0].model_extra == {"seed": 7}
