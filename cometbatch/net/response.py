"""An images answer read: status, headers and body to an ImagesResponse or its APIError."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PrivateAttr, ValidationError

from ..errors import (
    APIError,
    APIResponseError,
    BadRequestError,
    ContentPolicyError,
    IncompatibleAPIError,
)
from ..validation import first_problem
from .answered import Answered, answered
from .retry import (
    is_content_policy,
    make_status_error,
    not_the_api,
    parse_error_body,
    request_id_header,
)

__all__ = ["MASK", "ImageItem", "ImagesResponse", "read_answer", "redact"]

MASK = "***"
# Image data: decoded to bytes, never stored or shown as text, and megabytes long.
_IMAGE_DATA = "b64_json"
# Up to this size an answer is searched as text for the key before its parsed form is walked.
_SEARCHED_AS_TEXT = 64 * 1024


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
    # Its request id, created, size, ...: read leniently (see answered.py), not validated
    # here, so that an odd one never fails an answer whose images were paid for.
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


def redact(text: str, key: str | None) -> str:
    """`text` with every occurrence of `key` blanked out (a server may echo the key back)."""
    if key and key in text:
        return text.replace(key, MASK)
    return text


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


def _may_hold_key(text: str, key: str) -> bool:
    """Whether the parsed form of JSON `text` may hold `key` in a string."""
    # Without a backslash each parsed string is a slice of the text, so a text without the key
    # has none (a small answer is searched so; a large one is walked, skipping image data).
    return len(text) > _SEARCHED_AS_TEXT or key in text or "\\" in text


def _may_carry_images(data: Any) -> bool:
    """Whether a parsed answer has something where paid images would be (a non-empty data)."""
    return isinstance(data, dict) and isinstance(data.get("data"), list) and bool(data["data"])


def _looks_like_html(content_type: str, body: bytes) -> bool:
    head = body[:512].lstrip().lower()
    return "html" in content_type or head.startswith((b"<!doctype", b"<html", b"<head", b"<body"))


def read_answer(
    status: int, headers: Mapping[str, str], body: bytes, *, base_url: str, api_key: str | None
) -> ImagesResponse:
    """The images an answer carries, or the APIError it is (the key blanked out of both)."""
    if 300 <= status < 400:
        location = headers.get("Location", "nowhere")
        raise IncompatibleAPIError(
            f"the server at {base_url} answered {status} redirect to {location}; "
            "this does not look like an OpenAI-compatible API — check --base-url",
            status=status,
        )
    content_type = headers.get("Content-Type", "").lower()
    html = _looks_like_html(content_type, body)
    if status >= 400 or status < 200:
        text = redact(body.decode("utf-8", errors="replace"), api_key)
        error = make_status_error(status, text, headers=headers)
        json_body = not html and text.lstrip().startswith("{")
        code, request_id = error.code, error.request_id
        if not_the_api(status, code=code, request_id=request_id, html=html, json_body=json_body):
            detail = "an HTML page" if html else error.message
            raise IncompatibleAPIError(
                f"the server at {base_url} answered {status} ({detail}) to POST "
                "/images/generations; this does not look like an OpenAI-compatible API "
                "— check --base-url",
                status=status,
            )
        raise error
    if html:
        raise IncompatibleAPIError(
            f"the server at {base_url} does not look like an OpenAI-compatible API "
            "(it answered an HTML page) — check --base-url",
            status=status,
        )
    return _read_images(status, headers, body, base_url=base_url, api_key=api_key)


def _read_images(
    status: int, headers: Mapping[str, str], body: bytes, *, base_url: str, api_key: str | None
) -> ImagesResponse:
    text = body.decode("utf-8", errors="replace")
    stripped = text.lstrip()
    if not stripped:
        # An empty 200 is a transient fault (a proxy cut the body), not a wrong API.
        raise APIResponseError("malformed response: empty body", status=status, retryable=True)
    if not stripped.startswith(("{", "[")):
        raise IncompatibleAPIError(
            f"the server at {base_url} answered something that is not JSON; this does "
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
    if api_key and _may_hold_key(text, api_key):
        _redact_json(data, api_key)
    if isinstance(data, dict) and "error" in data and "data" not in data:
        raise _error_in_ok(status, redact(text, api_key), headers)
    # What a success says about itself, the key blanked out (`data` is redacted already,
    # the header is not).
    header = request_id_header(headers)
    header = redact(header, api_key) if header is not None else None
    try:
        answer = ImagesResponse.read(data, answered(data if isinstance(data, dict) else {}, header))
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


def _error_in_ok(status: int, text: str, headers: Mapping[str, str]) -> APIError:
    """An error object sent with a success status (some relays do this)."""
    message, code, request_id = parse_error_body(text)
    request_id = request_id or request_id_header(headers)
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
