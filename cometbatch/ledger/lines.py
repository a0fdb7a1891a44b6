"""A ledger line as a typed event (run, result, end, or another kind); a result's field types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..results import PAID

_NONE = type(None)
_ABSENT = object()
# What the readers of a result line (resume, status, gallery, export, fetch) rely on: each
# field's JSON types when it is present, and what to call them in an error. A hand-edited
# line that differs is refused here, naming it, instead of failing inside one of them.
_RESULT_TYPES: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("key", (str,), "a string"),
    ("job_id", (str,), "a string"),
    ("chunk", (int,), "a whole number, 0 or more"),
    ("status", (str,), "a string"),
    ("n", (int,), "a whole number, 0 or more"),
    ("model", (str, _NONE), "a string or null"),
    ("fingerprint", (str, _NONE), "a string or null"),
    ("images", (list,), "a list of objects"),
    ("downloads", (list, _NONE), "a list of objects"),
    ("attempts", (int, float), "a number, 0 or more"),
    ("ambiguous_retries", (int, float), "a number, 0 or more"),
    ("rate_limited", (int,), "a whole number, 0 or more"),
    ("error", (dict, _NONE), "an object or null"),
    ("finished_at", (str, _NONE), "a string or null"),
)


# The same for each entry of `downloads` (a link still to download); index and url are
# required, tries and first_failed_at are absent from lines written before links were counted.
_DOWNLOAD_TYPES: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("index", (int,), "a whole number, 0 or more"),
    ("url", (str,), "a string"),
    ("tries", (int,), "a whole number, 0 or more"),
    ("first_failed_at", (str, _NONE), "a string or null"),
)
_DOWNLOAD_NEEDS = ("index", "url")
# The same for each entry of `images`: `url` (the link it was downloaded from) is absent from
# images that came inline and from lines written before links were kept.
_IMAGE_TYPES: tuple[tuple[str, tuple[type, ...], str], ...] = (("url", (str,), "a string"),)


def result_problem(event: dict[str, Any]) -> str | None:
    """What is wrong with the JSON types of a result event's fields, or None."""
    if "key" not in event or "status" not in event:
        return "a result needs its 'key' and 'status'"
    problem = _type_problem(event, _RESULT_TYPES, "the result's ")
    if problem is not None:
        return problem
    for at, image in enumerate(event.get("images") or ()):
        problem = _type_problem(image, _IMAGE_TYPES, f"the result's images[{at}] ")
        if problem is not None:
            return problem
    for at, item in enumerate(event.get("downloads") or ()):
        where = f"the result's downloads[{at}] "
        missing = [name for name in _DOWNLOAD_NEEDS if name not in item]
        if missing:
            return f"{where}has no {missing[0]!r}"
        problem = _type_problem(item, _DOWNLOAD_TYPES, where)
        if problem is not None:
            return problem
    return None


def _type_problem(
    fields: dict[str, Any], types: tuple[tuple[str, tuple[type, ...], str], ...], where: str
) -> str | None:
    """The first of `fields` present with a JSON type that `types` does not allow, or None."""
    for name, allowed, expected in types:
        value = fields.get(name, _ABSENT)
        if value is _ABSENT:
            continue
        kind = type(value)  # not isinstance: true and false are no numbers here
        if (
            kind not in allowed
            or (kind is int and value < 0)
            or (kind is list and any(type(item) is not dict for item in value))
        ):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:59] + "\u2026"
            return f"{where}{name!r} is {shown}, not {expected}"
    return None


def _text(value: Any) -> str | None:
    """A string field, or None for a missing one or one of another type (a hand-edited line)."""
    return value if isinstance(value, str) else None


def _whole(value: Any) -> int:
    """A count field, or 0 for a missing one (the reader has checked the types)."""
    return value if type(value) is int else 0


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    """One ledger line: its number and its fields as written (the whole JSON object)."""

    line: int
    fields: dict[str, Any]

    @property
    def kind(self) -> str:
        """The line's `event`: run, result, end, sent, or a kind a newer version writes."""
        return str(self.fields["event"])


@dataclass(frozen=True, slots=True)
class RunEvent(LedgerEvent):
    """A run's start: the manifest it read and its settings."""

    @property
    def manifest(self) -> str | None:
        return _text(self.fields.get("manifest"))

    @property
    def manifest_sha256(self) -> str | None:
        return _text(self.fields.get("manifest_sha256"))

    @property
    def started_at(self) -> str | None:
        return _text(self.fields.get("started_at"))


@dataclass(frozen=True, slots=True)
class EndEvent(LedgerEvent):
    """A run's end, with its summary (None: a hand-edited line without an object there)."""

    @property
    def finished_at(self) -> str | None:
        return _text(self.fields.get("finished_at"))

    @property
    def summary(self) -> dict[str, Any] | None:
        summary = self.fields.get("summary")
        return summary if isinstance(summary, dict) else None


@dataclass(frozen=True, slots=True)
class ResultEvent(LedgerEvent):
    """A request's outcome; its fields have the types `result_problem` allows."""

    @property
    def key(self) -> str:
        return str(self.fields["key"])

    @property
    def status(self) -> str:
        return str(self.fields["status"])

    @property
    def paid(self) -> bool:
        """Whether the line records generated images (results.PAID): they were paid for."""
        return self.fields["status"] in PAID

    @property
    def job_id(self) -> str | None:
        return self.fields.get("job_id")

    @property
    def where(self) -> tuple[str, int] | None:
        """The job id and chunk, from the key when the line lacks them (None: neither)."""
        job_id, chunk = self.fields.get("job_id"), self.fields.get("chunk")
        if job_id is not None and chunk is not None:
            return job_id, chunk
        head, _, tail = self.key.rpartition("#")
        return (head, int(tail)) if head and tail.isdigit() and tail.isascii() else None

    @property
    def model(self) -> str | None:
        return self.fields.get("model")

    @property
    def n(self) -> int:
        return _whole(self.fields.get("n"))

    @property
    def fingerprint(self) -> str | None:
        return self.fields.get("fingerprint")

    @property
    def images(self) -> list[dict[str, Any]]:
        return self.fields.get("images") or []

    @property
    def downloads(self) -> list[dict[str, Any]]:
        return self.fields.get("downloads") or []

    @property
    def generated(self) -> int:
        """Images generated: written, or still to download."""
        return len(self.images) + len(self.downloads)

    @property
    def error(self) -> dict[str, Any] | None:
        return self.fields.get("error")

    @property
    def attempts(self) -> int:
        """Requests sent (0: nothing was sent; a line without the field counts one)."""
        attempts = self.fields.get("attempts")
        return 1 if attempts is None else int(attempts)

    @property
    def ambiguous_retries(self) -> int:
        return int(self.fields.get("ambiguous_retries") or 0)

    @property
    def finished_at(self) -> str | None:
        return self.fields.get("finished_at")


@dataclass(frozen=True, slots=True)
class OtherEvent(LedgerEvent):
    """A `sent` line, or a kind this version does not know (left alone)."""


_KINDS: dict[Any, type[LedgerEvent]] = {"run": RunEvent, "result": ResultEvent, "end": EndEvent}


def typed(line: int, fields: dict[str, Any]) -> LedgerEvent:
    """The typed event of a checked ledger line."""
    return _KINDS.get(fields["event"], OtherEvent)(line, fields)
