"""The simulated CometAPI's rules as pure functions: validation, request ids and usage."""

from __future__ import annotations

import json
import string
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import CapabilityError
from ..models.registry import ModelRegistry
from ..models.spec import ModelSpec
from .faults import (
    ApiFailure,
)

__all__ = [
    "ID_ALPHABET",
    "ImageRequest",
    "check_authorization",
    "error_body",
    "image_seed",
    "json_or_none",
    "make_request_id",
    "parse_request",
    "usage_for",
]

_URL_FORMATS: Mapping[str, str] = {"dall-e-3": "webp"}  # CometAPI links dall-e-3 to .webp files
_OUTPUT_TOKENS: Mapping[str, int] = {"low": 272, "medium": 1056, "high": 4160, "auto": 1056}
_WIDE_SIZES = frozenset({"1536x1024", "1024x1536"})
_BASE_FIELDS = frozenset({"model", "prompt", "n"})
ID_ALPHABET = string.ascii_letters + string.digits


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
    # The server's lookup says nothing: warnings about a manifest's models are the client's.
    spec = registry.resolve(model)
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


def usage_for(request: ImageRequest, images: int | None = None) -> dict[str, Any]:
    """Plausible gpt-image token usage for a request answered with `images` (default: n)."""
    per_image = _OUTPUT_TOKENS.get(request.quality or "auto", _OUTPUT_TOKENS["auto"])
    if request.size in _WIDE_SIZES:
        per_image = per_image * 3 // 2
    text_tokens = max(1, len(request.prompt) // 4)
    output_tokens = per_image * (request.n if images is None else images)
    return {
        "input_tokens": text_tokens,
        "output_tokens": output_tokens,
        "total_tokens": text_tokens + output_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
    }
