"""What a successful answer said about itself, kept in the ledger: its request id, and the
ImagesResponse fields that describe its images (created, size, quality, output_format,
background). Every one is optional, and read leniently: a value of an unexpected type is left
out, never a reason to refuse images that were paid for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..textsafe import storable

__all__ = ["RESPONSE_FIELDS", "Answered", "answered", "placed"]

# The ledger's `response` object holds these, in this order, each only when the API sent it.
RESPONSE_FIELDS = ("created", "size", "quality", "output_format", "background")
# What the API sends here is a word, a size or an id: longer text is no such value, and a
# hostile server must not be able to bloat every ledger line with it.
_MAX_WORD = 64
_MAX_REQUEST_ID = 200
# A Unix time in seconds that a float still holds exactly.
_MAX_CREATED = 2**53


def _text(value: Any, limit: int = _MAX_WORD) -> str | None:
    """`value` if it is a non-empty string of at most `limit` characters (lone surrogates
    replaced, so that it encodes), else None."""
    if type(value) is not str or not value or len(value) > limit:
        return None
    return value if value.isascii() else storable(value)


def _unix_time(value: Any) -> int | None:
    """`value` if it is a whole number of seconds (not true or false), else None."""
    if type(value) is not int or not 0 <= value < _MAX_CREATED:
        return None
    return value


@dataclass(frozen=True, slots=True)
class Answered:
    """The request id and self-description of one answer; None where it said nothing."""

    request_id: str | None = None
    created: int | None = None
    size: str | None = None
    quality: str | None = None
    output_format: str | None = None
    background: str | None = None

    @property
    def response(self) -> dict[str, Any]:
        """The ledger's `response` object: the RESPONSE_FIELDS the answer gave."""
        # Spelled out in RESPONSE_FIELDS' order: a getattr per name costs more, once per line.
        found = {
            "created": self.created,
            "size": self.size,
            "quality": self.quality,
            "output_format": self.output_format,
            "background": self.background,
        }
        return {name: value for name, value in found.items() if value is not None}

    def line_fields(self) -> dict[str, Any]:
        """The result line's `response` and `request_id`, each only when there is one."""
        fields: dict[str, Any] = {}
        response = self.response
        if response:
            fields["response"] = response
        if self.request_id is not None:
            fields["request_id"] = self.request_id
        return fields

    def __bool__(self) -> bool:
        # Spelled out: dataclasses.fields() costs more than the comparison, once per answer.
        return (
            self.request_id is not None
            or self.created is not None
            or self.size is not None
            or self.quality is not None
            or self.output_format is not None
            or self.background is not None
        )

    @classmethod
    def of_line(cls, event: Mapping[str, Any]) -> Answered:
        """What a ledger line recorded (nothing for a line written before answers were kept,
        or one whose fields were edited into something else)."""
        response = event.get("response")
        return answered(response if isinstance(response, dict) else {}, event.get("request_id"))


def answered(body: Mapping[str, Any], header_id: Any = None) -> Answered:
    """What an answer's parsed body says about itself; the request id from the body's own
    `request_id`, else `header_id` (the X-Request-Id header's)."""
    return Answered(
        request_id=_text(body.get("request_id"), _MAX_REQUEST_ID)
        or _text(header_id, _MAX_REQUEST_ID),
        created=_unix_time(body.get("created")),
        size=_text(body.get("size")),
        quality=_text(body.get("quality")),
        output_format=_text(body.get("output_format")),
        background=_text(body.get("background")),
    )


def placed(event: dict[str, Any], answer: Answered) -> dict[str, Any]:
    """`event` with the answer's line fields right after its `usage`, where Result writes
    them (a line in the writer's order is read on the ledger's fast path)."""
    extra = answer.line_fields()
    rest = {name: value for name, value in event.items() if name not in ("response", "request_id")}
    if not extra or "usage" not in rest:
        return {**rest, **extra}
    line: dict[str, Any] = {}
    for name, value in rest.items():
        line[name] = value
        if name == "usage":
            line.update(extra)
    return line
