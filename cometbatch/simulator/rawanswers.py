"""Raw aiohttp answers for the simulator's faults: HTML pages, cut connections, padded bodies."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from aiohttp import hdrs, web

_CHUNK = 64 * 1024


def html(status: int, body: str, reason: str | None = None) -> web.Response:
    """An HTML answer, wrapped in a minimal page unless `body` is a whole page already."""
    page = f"<!DOCTYPE html><html><body>{body}</body></html>" if "<html>" not in body else body
    return web.Response(status=status, reason=reason, text=page, content_type="text/html")


def drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without answering; aiohttp then skips writing the response."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


async def drop_midway(
    request: web.Request, body: bytes, headers: Mapping[str, str] | None = None
) -> web.StreamResponse:
    """Send the headers and half the body, then close: the answer is lost after it was paid."""
    response = web.StreamResponse(
        headers={**(headers or {}), hdrs.CONTENT_TYPE: "application/json"}
    )
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    # close() (not abort()) sends what was written before the FIN; aiohttp then finds the
    # transport closing and skips finishing the response.
    if request.transport is not None:
        request.transport.close()
    return response


async def send_huge(
    request: web.Request, data: bytes, content_type: str, size: int
) -> web.StreamResponse:
    """Stream `data` padded to `size` bytes, announced in Content-Length."""
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: content_type})
    response.content_length = total = max(size, len(data))
    await response.prepare(request)
    padding = bytes(_CHUNK)
    # A client that refuses it after the headers closes the connection: that is the point.
    with contextlib.suppress(ConnectionError):
        await response.write(data)
        for start in range(len(data), total, _CHUNK):
            await response.write(padding[: min(_CHUNK, total - start)])
    return response
