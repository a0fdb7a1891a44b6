"""One attempt at a time against the images API; the only module that sees aiohttp's errors."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Self
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, BeforeValidator, ConfigDict, PrivateAttr, ValidationError

from ..errors import (
    APIConnectionError,
    APIError,
    APIResponseError,
    APITimeoutError,
    BadRequestError,
    ContentPolicyError,
    DownloadError,
    IncompatibleAPIError,
)
from ..settings import check_base_url
from ..validation import first_problem
from .answered import Answered, answered
from .retry import (
    is_content_policy,
    make_status_error,
    not_the_api,
    parse_error_body,
    request_id_header,
)

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# An error answer is read this far only: its message is at the start, and a proxy's error
# page may be of any size.
_ERROR_BODY_BYTES = 1024 * 1024
MASK = "***"
_CHUNK = 64 * 1024
_READ_BUFSIZE = 1024 * 1024
_GONE_STATUSES = frozenset({403, 404, 410})
_RETRYABLE_DOWNLOAD_STATUSES = frozenset({408, 425, 429})
_NOT_IMAGE_TYPES = ("text/html", "application/json")


def _text_or_none(value: Any) -> str | None:
    """An optional text the answer describes its images with: kept when it is text, else left
    out (an odd one must never fail an answer whose images were paid for)."""
    return value if isinstance(value, str) else None


def _object_or_none(value: Any) -> dict[str, Any] | None:
    """`usage` when it is an object, else left out (the answer is priced from its list)."""
    return value if isinstance(value, dict) else None


class ImageItem(BaseModel):
    """One generated image: inline base64 or a temporary URL."""

    model_config = ConfigDict(extra="allow")

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: Annotated[str | None, BeforeValidator(_text_or_none)] = None


class ImagesResponse(BaseModel):
    """The body of a successful images/generations answer."""

    model_config = ConfigDict(extra="ignore")

    data: list[ImageItem]
    usage: Annotated[dict[str, Any] | None, BeforeValidator(_object_or_none)] = None
    # Its request id, created, size, ...: read leniently by the client (see answered.py), not
    # validated here, so that an odd one never fails an answer whose images were paid for.
    _answered: Answered = PrivateAttr(default_factory=Answered)

    @property
    def answered(self) -> Answered:
        """What the answer said about itself (its request id, created, size, ...)."""
        return self._answered

    @classmethod
    def read(cls, data: Any, answer: Answered) -> ImagesResponse:
        """The validated body `data`, with what `answer` says about it."""
        response = cls.model_validate(data)
        response._answered = answer
        return response


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


def _looks_like_html(content_type: str, body: bytes) -> bool:
    head = body[:512].lstrip().lower()
    return "html" in content_type or head.startswith((b"<!doctype", b"<html", b"<head", b"<body"))


def redact(text: str, key: str | None) -> str:
    """`text` with every occurrence of `key` blanked out (a server may echo the key back)."""
    if key and key in text:
        return text.replace(key, MASK)
    return text


# Image data: decoded to bytes, never stored or shown as text, and megabytes long.
_IMAGE_DATA = "b64_json"


def _redact_json(data: Any, key: str) -> None:
    """Blank `key` out of every string of parsed JSON but image data, object keys included,
    in place. Parsed, so a key the server spelled with JSON escapes is found as it is."""
    # Only an image's own `b64_json` is image data: the same name elsewhere (in `usage`, in
    # an extra field) is text that may be stored.
    items = data.get("data") if isinstance(data, dict) else None
    images = (
        {id(item) for item in items if isinstance(item, dict)} if isinstance(items, list) else set()
    )
    # A loop, not recursion: an answer may be nested about as deep as json.loads goes.
    pending = [data]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            for name in [name for name in node if key in name]:
                node[redact(name, key)] = node.pop(name)
            children: Any = node.items()
        elif isinstance(node, list):
            children = enumerate(node)
        else:
            continue
        for where, value in children:
            if isinstance(value, str):
                if (where != _IMAGE_DATA or id(node) not in images) and key in value:
                    node[where] = value.replace(key, MASK)
            elif isinstance(value, dict | list):
                pending.append(value)


def _may_carry_images(data: Any) -> bool:
    """Whether a parsed answer has something where paid images would be (a non-empty data)."""
    return isinstance(data, dict) and isinstance(data.get("data"), list) and bool(data["data"])


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
        url = f"{self.base_url}/images/generations"
        headers = {"Accept": "application/json"}
        # Per request, never on the session: the session may be the caller's, and it is
        # also used for downloads, which must not carry the key.
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            async with session.post(
                url,
                json=payload,
                headers=headers,
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
        status = resp.status
        if 300 <= status < 400:
            location = resp.headers.get("Location", "nowhere")
            raise IncompatibleAPIError(
                f"the server at {self.base_url} answered {status} redirect to {location}; "
                "this does not look like an OpenAI-compatible API — check --base-url",
                status=status,
            )
        content_type = resp.headers.get("Content-Type", "").lower()
        html = _looks_like_html(content_type, body)
        if status >= 400 or status < 200:
            text = self._redact(body.decode("utf-8", errors="replace"))
            error = make_status_error(status, text, headers=resp.headers)
            json_body = not html and text.lstrip().startswith("{")
            code, request_id = error.code, error.request_id
            if not_the_api(
                status, code=code, request_id=request_id, html=html, json_body=json_body
            ):
                detail = "an HTML page" if html else error.message
                raise IncompatibleAPIError(
                    f"the server at {self.base_url} answered {status} ({detail}) to POST "
                    "/images/generations; this does not look like an OpenAI-compatible API "
                    "— check --base-url",
                    status=status,
                )
            raise error
        if html:
            raise IncompatibleAPIError(
                f"the server at {self.base_url} does not look like an OpenAI-compatible API "
                "(it answered an HTML page) — check --base-url",
                status=status,
            )
        return self._parse_images(status, body, resp)

    def _parse_images(
        self, status: int, body: bytes, resp: aiohttp.ClientResponse
    ) -> ImagesResponse:
        text = body.decode("utf-8", errors="replace")
        stripped = text.lstrip()
        if not stripped:
            # An empty 200 is a transient fault (a proxy cut the body), not a wrong API.
            raise APIResponseError("malformed response: empty body", status=status, retryable=True)
        if not stripped.startswith(("{", "[")):
            raise IncompatibleAPIError(
                f"the server at {self.base_url} answered something that is not JSON; this does "
                "not look like an OpenAI-compatible API — check --base-url",
                status=status,
            )
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise APIResponseError(
                f"malformed response: invalid or truncated JSON ({exc.msg} at {exc.pos})",
                status=status,
                retryable=True,
            ) from None
        except (ValueError, RecursionError):
            # Python refuses integers longer than 4300 digits and very deep nesting.
            raise APIResponseError(
                "malformed response: JSON with a number too long or nesting too deep to read",
                status=status,
                retryable=True,
            ) from None
        if self._api_key:
            _redact_json(data, self._api_key)
        if isinstance(data, dict) and "error" in data and "data" not in data:
            raise self._error_in_ok(status, self._redact(text), resp)
        try:
            answer = ImagesResponse.read(data, self._answered(data, resp))
        except ValidationError as exc:
            first = first_problem(exc)
            raise APIResponseError(
                f"malformed response: {first.where or 'body'}: {first.message}",
                status=status,
                retryable=True,
                maybe_billed=_may_carry_images(data),
            ) from None
        if not answer.data:
            # A readable answer without images: nothing was paid for, retrying cannot pay twice.
            raise APIResponseError(
                "the API answered no images", status=status, retryable=True, maybe_billed=False
            )
        for index, item in enumerate(answer.data):
            if not item.b64_json and not item.url:
                raise APIResponseError(
                    f"malformed response: image {index} has neither b64_json nor url",
                    status=status,
                    retryable=True,
                )
        return answer

    def _answered(self, data: Any, resp: aiohttp.ClientResponse) -> Answered:
        """What a success says about itself, the key blanked out (`data` is redacted already,
        the header is not)."""
        header = request_id_header(resp.headers)
        header = self._redact(header) if header is not None else None
        return answered(data if isinstance(data, dict) else {}, header)

    def _error_in_ok(self, status: int, text: str, resp: aiohttp.ClientResponse) -> APIError:
        """An error object sent with a success status (some relays do this)."""
        message, code, request_id = parse_error_body(text)
        request_id = request_id or request_id_header(resp.headers)
        if is_content_policy(code, message):
            # The code alone can say so: {"error": {"code": "content_policy_violation"}}.
            message = message or f"the API answered {status} with error code {code}"
            return ContentPolicyError(message, status=status, code=code, request_id=request_id)
        text = f"the API answered {status} with an error: {message}"
        if code == "invalid_request":
            # The job's own request was refused: a failure of this job, not of the API.
            return BadRequestError(text, status=status, code=code, request_id=request_id)
        # A readable error object carries no images: a retry cannot pay twice.
        return APIResponseError(
            text,
            status=status,
            code=code,
            request_id=request_id,
            retryable=True,
            maybe_billed=False,
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
        try:
            return await self._download(url)
        except APIError as exc:
            self._scrub(exc)
            raise

    async def _download(self, url: str) -> tuple[bytes, str | None]:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError(f"refusing to download a non-http(s) image URL ({scheme or '?'})")
        session = self._session_for_download()
        try:
            async with session.get(
                url, allow_redirects=True, raise_for_status=False, timeout=self._download_timeout
            ) as resp:
                self._check_download(resp)
                content_type = resp.headers.get("Content-Type")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > self.max_download_bytes:
                        raise self._too_large()
                    chunks.append(chunk)
                return b"".join(chunks), content_type
        except APIError:
            raise
        except TimeoutError as exc:
            raise DownloadError("timed out downloading the image", retryable=True) from exc
        except aiohttp.TooManyRedirects as exc:
            raise DownloadError("too many redirects downloading the image") from exc
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            raise DownloadError(f"the image URL is not usable: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise DownloadError(
                f"cannot connect to the image host {exc.host}:{exc.port}: {_refusal(exc)}",
                retryable=True,
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise DownloadError(
                f"downloading the image failed: {exc or type(exc).__name__}", retryable=True
            ) from exc

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
