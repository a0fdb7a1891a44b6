"""One attempt at a time against the images API; the only module that sees aiohttp's errors."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Self
from urllib.parse import urlsplit

import aiohttp

from ..errors import APIConnectionError, APIError, APIResponseError, APITimeoutError, DownloadError
from ..settings import check_base_url
from .response import ImagesResponse, read_answer, redact

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["Client", "Download"]

log = logging.getLogger(__name__)

DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# An error answer is read this far only: its message is at the start, and a proxy's error
# page may be of any size.
_ERROR_BODY_BYTES = 1024 * 1024
_CHUNK = 64 * 1024
_READ_BUFSIZE = 1024 * 1024
_GONE_STATUSES = frozenset({403, 404, 410})
_RETRYABLE_DOWNLOAD_STATUSES = frozenset({408, 425, 429})
_NOT_IMAGE_TYPES = ("text/html", "application/json")


@dataclass(frozen=True, slots=True)
class Download:
    """An image URL's answer, opened: its content type and its body, chunk by chunk."""

    content_type: str | None
    chunks: AsyncIterator[bytes]


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


async def _read_up_to(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body's first `limit` bytes at most; the rest is left unread (and the connection
    closed, not reused)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    body = b"".join(chunks)
    return body[:limit] if size > limit else body


def _refusal(exc: aiohttp.ClientConnectorError) -> str:
    """Why a connection could not be made, in the system's words: aiohttp's own text names its
    connector internals ("ssl:default [Connect call failed ...]")."""
    return exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__


class Client:
    """An async context manager that sends one images request or one download per call."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        timeout: float = 600.0,
        connect_timeout: float = 30.0,
        download_timeout: float = 120.0,
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        pool_size: int = 100,
        session: aiohttp.ClientSession | None = None,
        allow_insecure_http: bool = False,
        offload_bytes: int = 512 * 1024,
    ) -> None:
        check_base_url(base_url, allow_insecure_http=allow_insecure_http)
        self.offload_bytes = offload_bytes
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key or None
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._download_timeout = aiohttp.ClientTimeout(
            total=download_timeout, sock_connect=connect_timeout
        )
        self.max_download_bytes = max_download_bytes
        self.max_response_bytes = max_response_bytes
        self._pool_size = pool_size
        self._session = session
        self._owns_session = session is None
        # A private session for downloads, only when the caller's session would attach auth.
        self._download_session: aiohttp.ClientSession | None = None
        self._state = _State.UNOPENED
        self._url = f"{self.base_url}/images/generations"
        self._headers = {"Accept": "application/json"}
        # Per request, never on the session: the session may be the caller's, and it is
        # also used for downloads, which must not carry the key.
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        session: aiohttp.ClientSession | None = None,
        pool_size: int | None = None,
    ) -> Client:
        """A client configured from engine settings (key from the settings or COMETAPI_KEY)."""
        return cls(
            base_url=settings.base_url,
            api_key=settings.resolved_key(),
            timeout=settings.timeout,
            connect_timeout=settings.connect_timeout,
            download_timeout=settings.download_timeout,
            max_download_bytes=settings.max_download_bytes,
            max_response_bytes=settings.max_response_bytes,
            # Generations and downloads share the pool, so leave room for both.
            pool_size=pool_size if pool_size is not None else max(100, 2 * settings.max_in_flight),
            session=session,
            allow_insecure_http=settings.allow_insecure_http,
        )

    def __repr__(self) -> str:
        owner = "own session" if self._owns_session else "caller's session"
        return f"<Client base_url={self.base_url!r} state={self._state.value} {owner}>"

    async def __aenter__(self) -> Self:
        if self._state is _State.CLOSED:
            raise RuntimeError("client is closed")
        if self._state is _State.OPEN:
            raise RuntimeError("client is already open")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size)
            )
        self._state = _State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the sessions this client created; a caller's session stays open."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._download_session is not None:
            await self._download_session.close()
            self._download_session = None
        if self._owns_session and self._session is not None:
            await self._session.close()

    @property
    def closed(self) -> bool:
        """Whether the client has been closed (it cannot be reopened)."""
        return self._state is _State.CLOSED

    def _live_session(self) -> aiohttp.ClientSession:
        if self._state is _State.CLOSED:
            raise RuntimeError("client is closed")
        if self._session is None:
            raise RuntimeError("client is not open: use 'async with Client(...)'")
        return self._session

    def _redact(self, text: str) -> str:
        """Text with the key blanked out, in case a server echoed it back."""
        return redact(text, self._api_key)

    def _scrub(self, exc: APIError) -> None:
        """Blank the key out of every server-supplied text of an error, however it came back
        (JSON-escaped in a body, in a Location or X-Request-Id header, inside an image URL)."""
        if not self._api_key:
            return
        exc.message = self._redact(exc.message)
        exc.args = tuple(self._redact(a) if isinstance(a, str) else a for a in exc.args)
        exc.code = self._redact(exc.code) if exc.code else exc.code
        exc.request_id = self._redact(exc.request_id) if exc.request_id else exc.request_id

    async def generate(self, payload: dict[str, Any]) -> ImagesResponse:
        """Send one images/generations request and return its parsed answer (no retries)."""
        try:
            return await self._generate(payload)
        except APIError as exc:
            self._scrub(exc)
            raise

    async def _generate(self, payload: dict[str, Any]) -> ImagesResponse:
        session = self._live_session()
        try:
            async with session.post(
                self._url,
                json=payload,
                headers=self._headers,
                allow_redirects=False,
                raise_for_status=False,
                timeout=self._timeout,
                read_bufsize=_READ_BUFSIZE,
            ) as resp:
                body = await self._read_answer(resp)
                if len(body) < self.offload_bytes:
                    return self._parse_answer(resp, body)
            # Parsing a multi-megabyte answer takes milliseconds: not on the event loop.
            return await asyncio.to_thread(self._parse_answer, resp, body)
        except APIError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._raise_connection_error(exc)

    async def _read_answer(self, resp: aiohttp.ClientResponse) -> bytes:
        """The answer's body, refused beyond max_response_bytes instead of filling memory."""
        if not 200 <= resp.status < 300:
            return await _read_up_to(resp, _ERROR_BODY_BYTES)
        cap = self.max_response_bytes
        if resp.content_length is not None and resp.content_length > cap:
            raise self._answer_too_large(resp.status)
        body = await _read_up_to(resp, cap + 1)
        if len(body) > cap:
            raise self._answer_too_large(resp.status)
        return body

    def _answer_too_large(self, status: int) -> APIResponseError:
        # Retrying would pay for the same too-large answer again: the user raises the cap.
        return APIResponseError(
            f"the answer from {self.base_url} is larger than max_response_bytes "
            f"({self.max_response_bytes} bytes) and was not read; its images were generated "
            "and may have been billed (raise max_response_bytes; --retry-failed then sends "
            "the request again)",
            status=status,
            retryable=False,
            maybe_billed=True,
        )

    def _raise_connection_error(self, exc: BaseException) -> NoReturn:
        """Translate an aiohttp failure, deciding whether the request may have been sent."""
        where = self.base_url
        detail = self._redact(str(exc)) or type(exc).__name__
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            raise APITimeoutError(f"timed out connecting to {where}: {detail}", sent=False) from exc
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            raise APIConnectionError(
                f"TLS certificate check failed for {where}: {detail}", sent=False, retryable=False
            ) from exc
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise APIConnectionError(
                f"cannot connect to {where}: {_refusal(exc)}", sent=False
            ) from exc
        if isinstance(exc, TimeoutError):
            raise APITimeoutError(
                f"no complete answer from {where} in time (the image may have been generated)",
                sent=True,
            ) from exc
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            raise APIConnectionError(
                f"{where} closed the connection before answering "
                "(the image may have been generated)",
                sent=True,
            ) from exc
        if isinstance(exc, aiohttp.ClientPayloadError):
            raise APIConnectionError(
                # aiohttp's detail quotes its parser's internal code (400): not an HTTP status.
                f"the answer from {where} was cut off before it was complete "
                "(the image may have been generated)",
                sent=True,
            ) from exc
        raise APIConnectionError(
            f"connection to {where} failed after sending: {detail}", sent=True
        ) from exc

    def _parse_answer(self, resp: aiohttp.ClientResponse, body: bytes) -> ImagesResponse:
        return read_answer(
            resp.status, resp.headers, body, base_url=self.base_url, api_key=self._api_key
        )

    def _session_for_download(self) -> aiohttp.ClientSession:
        session = self._live_session()
        if session.auth is None and "Authorization" not in session.headers:
            return session
        # A caller's session that attaches auth by default would leak it to the image host.
        if self._download_session is None:
            log.debug("caller's session attaches credentials; downloading with a separate one")
            self._download_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size)
            )
        return self._download_session

    async def download(self, url: str) -> tuple[bytes, str | None]:
        """Fetch one image URL without credentials; returns (bytes, content type)."""
        async with self.open_download(url) as body:
            data = b"".join([chunk async for chunk in body.chunks])
        return data, body.content_type

    @contextlib.asynccontextmanager
    async def open_download(self, url: str) -> AsyncIterator[Download]:
        """Open one image URL without credentials; its body comes in chunks, within the cap."""
        # DownloadError for what goes wrong opening or reading it (past max_download_bytes too).
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError(f"refusing to download a non-http(s) image URL ({scheme or '?'})")
        session = self._session_for_download()
        try:
            resp = await session.get(
                url, allow_redirects=True, raise_for_status=False, timeout=self._download_timeout
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._download_error(exc) from exc
        try:
            try:
                self._check_download(resp)
            except APIError as exc:
                self._scrub(exc)
                raise
            # Only the body's reads are translated: the caller's own errors pass as they are.
            chunks = self._chunks(resp)
            try:
                yield Download(resp.headers.get("Content-Type"), chunks)
            finally:
                await chunks.aclose()
        finally:
            resp.release()

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes]:
        """The body of a download, chunk by chunk, within max_download_bytes."""
        size = 0
        reader = resp.content.iter_chunked(_CHUNK)
        while True:
            try:
                chunk = await anext(reader)
            except StopAsyncIteration:
                return
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise self._download_error(exc) from exc
            size += len(chunk)
            if size > self.max_download_bytes:
                raise self._too_large()
            yield chunk

    def _download_error(self, exc: BaseException) -> DownloadError:
        """What an aiohttp failure of a download means, the key blanked out of it."""
        if isinstance(exc, TimeoutError):
            error = DownloadError("timed out downloading the image", retryable=True)
        elif isinstance(exc, aiohttp.TooManyRedirects):
            error = DownloadError("too many redirects downloading the image")
        elif isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
            error = DownloadError(f"the image URL is not usable: {exc}")
        elif isinstance(exc, aiohttp.ClientConnectorError):
            error = DownloadError(
                f"cannot connect to the image host {exc.host}:{exc.port}: {_refusal(exc)}",
                retryable=True,
            )
        else:
            error = DownloadError(
                f"downloading the image failed: {exc or type(exc).__name__}", retryable=True
            )
        self._scrub(error)
        return error

    def _too_large(self) -> DownloadError:
        return DownloadError(f"image larger than {self.max_download_bytes} bytes")

    def _check_download(self, resp: aiohttp.ClientResponse) -> None:
        status = resp.status
        if status in _GONE_STATUSES:
            raise DownloadError(
                f"the image URL is no longer valid ({status})", status=status, retryable=False
            )
        if status >= 500 or status in _RETRYABLE_DOWNLOAD_STATUSES:
            raise DownloadError(f"the image host answered {status}", status=status, retryable=True)
        if status >= 300 or status < 200:
            raise DownloadError(f"the image host answered {status}", status=status)
        content_type = resp.headers.get("Content-Type", "").lower()
        if content_type.startswith(_NOT_IMAGE_TYPES):
            raise DownloadError(
                f"not an image: the URL answered {content_type.split(';')[0]}", status=status
            )
        if resp.content_length is not None and resp.content_length > self.max_download_bytes:
            raise self._too_large()
