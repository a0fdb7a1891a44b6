"""The simulator's url files: image bytes kept for a TTL, and the /files route with its faults."""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import hdrs, web

from .faults import NOT_AN_IMAGE_PAGE, NOT_FOUND_PAGE, cut_image
from .imagegen import CONTENT_TYPES
from .rawanswers import html, send_huge
from .stats import SimStats

_EXTENSIONS: Mapping[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}


@dataclass(slots=True)
class _StoredFile:
    data: bytes
    content_type: str
    expires_at: float
    downloads: int = 0


class FileStore:
    """The files behind url answers, each kept for the TTL and two downloads at most."""

    def __init__(
        self, stats: SimStats, clock: Callable[[], float], ttl: float, huge_bytes: int
    ) -> None:
        # Download faults ("download-*") to apply to the next downloads, in order.
        self.faults: deque[str] = deque()
        self._stats = stats
        self._clock = clock
        self._ttl = ttl
        self._huge_bytes = huge_bytes
        self._files: dict[str, _StoredFile] = {}

    def __repr__(self) -> str:
        return f"<FileStore files={len(self._files)} queued_faults={len(self.faults)}>"

    def put(self, data: bytes, fmt: str, cap: int) -> str:
        """Store an image for the TTL, keeping at most `cap` files; its name under /files/."""
        now = self._clock()
        self._evict(now, cap, room=1)
        name = f"{secrets.token_hex(12)}.{_EXTENSIONS[fmt]}"
        self._files[name] = _StoredFile(data, CONTENT_TYPES[fmt], now + self._ttl)
        return name

    def clear(self) -> None:
        """Forget every file."""
        self._files.clear()

    def _evict(self, now: float, cap: int, room: int = 0) -> None:
        # Every file lives for the same TTL, so insertion order is expiry order; the cap keeps
        # memory bounded when a long run never downloads its links.
        while self._files:
            name = next(iter(self._files))
            if self._files[name].expires_at > now and len(self._files) + room <= cap:
                break
            del self._files[name]

    async def serve(self, request: web.Request, cap: int) -> web.StreamResponse:
        """Answer a GET of /files/{name}, shaped by the next queued download fault if any."""
        if hdrs.AUTHORIZATION in request.headers:
            self._stats.download_auth_rejections += 1
            return web.Response(
                status=403,
                text="Forbidden: file links take no credentials",
                content_type="text/plain",
            )
        self._evict(self._clock(), cap)
        name = request.match_info["name"]
        fault = self.faults.popleft() if self.faults else None
        if fault is not None:
            self._stats.faults[fault] += 1
            if fault == "download-expired":
                # Past its TTL: gone for good, answered as any expired link is.
                self._files.pop(name, None)
        stored = self._files.get(name)
        if stored is None or fault == "download-404":
            return html(404, NOT_FOUND_PAGE)
        if fault == "download-not-image":
            return html(200, NOT_AN_IMAGE_PAGE)
        if fault == "download-503":
            return html(503, "<h1>503 Service Temporarily Unavailable</h1>")
        if fault == "download-huge":
            return await send_huge(request, stored.data, stored.content_type, self._huge_bytes)
        stored.downloads += 1
        # Two downloads allow one client retry; then the memory is released.
        if stored.downloads >= 2:
            del self._files[name]
        self._stats.downloads += 1
        # A host that lost the end of the file serves what it has as if it were all of it.
        body = cut_image(stored.data) if fault == "download-truncated" else stored.data
        return web.Response(body=body, content_type=stored.content_type)
