"""How the simulated API describes a success, as the real one does: a request id header on
every answer, and for GPT image models the size, quality, output_format and background the
images were made with ("auto" resolved as the model chose)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .rules import ImageRequest

__all__ = ["REQUEST_ID_HEADER", "described", "success_body"]

REQUEST_ID_HEADER = "X-Request-Id"
_DEFAULT_SIZE = "1024x1024"
# What "auto" (or nothing) comes to: the quality the simulated usage prices "auto" at.
_DEFAULT_QUALITY = "medium"
_QUALITIES = frozenset({"low", "medium", "high"})


def described(request: ImageRequest, asked: Mapping[str, Any]) -> dict[str, str]:
    """The fields a GPT image model's answer describes its images with, from what was
    `asked` (the request body); none for other models (dall-e answers only `created`)."""
    if not request.usage:
        return {}
    size, quality = asked.get("size"), asked.get("quality")
    return {
        "size": size if isinstance(size, str) and size != "auto" else _DEFAULT_SIZE,
        "quality": quality if quality in _QUALITIES else _DEFAULT_QUALITY,
        "output_format": request.fmt,
        "background": "transparent" if asked.get("background") == "transparent" else "opaque",
    }


def success_body(
    request: ImageRequest,
    asked: Mapping[str, Any],
    created: int,
    items: list[dict[str, str]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """The body of a successful answer, in ImagesResponse's order."""
    body: dict[str, Any] = {"created": created, "data": items, **described(request, asked)}
    if usage is not None:
        body["usage"] = usage
    return body
