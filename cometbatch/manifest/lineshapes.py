"""Batch API lines and openai-python keyword arguments as plain job fields, named as written."""

# Each shape keeps where its fields came from, so a problem is named as the line spells it
# (`body.size`, `custom_id`, `extra_body.seed`), not as cometbatch stores it.

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ManifestError, ManifestProblem

__all__ = [
    "BATCH_KEYS",
    "BATCH_URL",
    "SDK_FIELDS",
    "SDK_KEYS",
    "LineFields",
    "batch_fields",
    "is_batch_line",
    "sdk_fields",
    "streaming_problem",
]

BATCH_URL = "/v1/images/generations"
BATCH_KEYS = frozenset({"custom_id", "method", "url", "body", "metadata"})

_TIMEOUT_HINT = "the --timeout option, Settings.timeout, or `timeout` in the settings file"
_OPTION = "an openai-python client option, not a request field"
# openai-python's per-call client options, and what cometbatch offers instead of each.
_CLIENT_OPTIONS = {
    "timeout": f"{_OPTION}: cometbatch waits for every request as long as its own timeout "
    f"allows ({_TIMEOUT_HINT})",
    "extra_headers": f"{_OPTION}: cometbatch sends no custom headers per request (from "
    "Python, headers for every request can be set on the aiohttp session given to "
    "Engine(session=...)); provider fields go in `extra`",
    "extra_query": f"{_OPTION}: cometbatch sends no query parameters per request; provider "
    "fields go in the body, through `extra` (or `extra_body`)",
}
_STREAMING = {
    "stream": "cometbatch reads each answer whole and does not read streamed events",
    "partial_images": "partial images come only as streamed events, which cometbatch does not read",
}
# Keys an openai-python images.generate(...) call has beyond the request fields.
SDK_FIELDS = ("extra_body", *_CLIENT_OPTIONS, *_STREAMING)
SDK_KEYS = frozenset(SDK_FIELDS)


@dataclass(frozen=True, slots=True)
class LineFields:
    """A line's job fields, and how the line names them where it names them differently."""

    data: dict[str, Any]
    # Problems found while reshaping, named as the line spells the field.
    problems: tuple[ManifestProblem, ...] = ()
    # Put before every job field's name (a Batch API body's fields are "body.<name>").
    prefix: str = ""
    # A job field's name on the line where it is not prefix + name ("id" -> "custom_id").
    names: Mapping[str, str] | None = None

    def name(self, job_field: str | None) -> str | None:
        """The line's name for a job field (or a path inside one, such as "extra.seed")."""
        if job_field is None:
            return None
        head, dot, rest = job_field.partition(".")
        if self.names and head in self.names:
            return f"{self.names[head]}{dot}{rest}"
        return f"{self.prefix}{job_field}"

    def located(self, problems: list[ManifestProblem]) -> list[ManifestProblem]:
        """Problems about job fields, renamed to the fields the line holds."""
        return [replace(p, field=self.name(p.field)) for p in problems]


def streaming_problem(name: str, value: Any) -> str | None:
    """Why a `stream` or `partial_images` value cannot be sent (None: it asks for nothing)."""
    if name == "stream" and (value is None or value is False):
        return None
    if name == "partial_images" and (value is None or (type(value) is int and value == 0)):
        return None
    return (
        f"{_STREAMING[name]}: remove `{name}` (a long generation needs a longer timeout, "
        f"{_TIMEOUT_HINT}, not streaming)"
    )


def sdk_fields(data: dict[str, Any], line: int, prefix: str = "") -> LineFields:
    """A line (or Batch API body) of openai-python keyword arguments as job fields."""
    # extra_body becomes extra; client options and streaming are refused (naming the setting
    # to use instead) unless their value asks for nothing (stream: false, partial_images: 0,
    # null or {} headers and query); timeout always is: null means "no timeout" to openai.
    if SDK_KEYS.isdisjoint(data):
        return LineFields(data, prefix=prefix)  # the usual line: nothing to reshape
    data = dict(data)
    problems: list[ManifestProblem] = []
    names: dict[str, str] = {}  # filled in by _merge_extra_body
    for name, message in _CLIENT_OPTIONS.items():
        if name in data:
            value = data.pop(name)
            if name == "timeout" or value not in (None, {}):
                problems.append(ManifestProblem(line, f"{prefix}{name}", message))
    for name in _STREAMING:
        if name in data and (why := streaming_problem(name, data.pop(name))):
            problems.append(ManifestProblem(line, f"{prefix}{name}", why))
    if "extra_body" in data:
        problems += _merge_extra_body(data, line, prefix, names)
    return LineFields(data, tuple(problems), prefix, names)


def _merge_extra_body(
    data: dict[str, Any], line: int, prefix: str, names: dict[str, str]
) -> list[ManifestProblem]:
    """Move `extra_body` into `extra` (in place); the problems that stop it."""
    body = data.pop("extra_body")
    where = f"{prefix}extra_body"
    if body is None:
        return []
    if not isinstance(body, dict):
        message = "must be a JSON object (its fields are sent as extra)"
        return [ManifestProblem(line, where, message)]
    extra = data.get("extra")
    if extra is None:
        data["extra"] = body
        names["extra"] = where
        return []
    if not isinstance(extra, dict):
        return []  # validation names `extra` itself
    both = sorted(extra.keys() & body.keys())
    if both:
        return [
            ManifestProblem(
                line, f"{where}.{key}", "also set in extra: set each field in one of them"
            )
            for key in both
        ]
    data["extra"] = {**extra, **body}
    return []


def is_batch_line(data: dict[str, Any]) -> bool:
    """Whether a line is in OpenAI Batch API shape."""
    return "custom_id" in data or "body" in data


# Keys a Batch API body may not hold although a plain line may: they belong beside the body.
_NOT_IN_BODY = {
    "id": "not a request field: a Batch API line's job id is its custom_id",
    "metadata": "not a request field: put metadata beside custom_id, outside the body",
}


# A job field a Batch API line holds outside its body, by its name there.
_OUTSIDE_BODY = {"id": "custom_id", "metadata": "metadata"}


def batch_fields(data: dict[str, Any], line: int) -> LineFields:
    """A Batch API line as job fields: its body checked like a plain line, named `body.*`."""
    problems = _envelope_problems(data, line)
    body = data.get("body")
    if not isinstance(body, dict):
        # Without a body there is no job to check.
        raise ManifestError([*problems, ManifestProblem(line, "body", "must be a JSON object")])
    job = dict(body)
    for name, message in _NOT_IN_BODY.items():
        if name in job:
            del job[name]
            problems.append(ManifestProblem(line, f"body.{name}", message))
    shaped = sdk_fields(job, line, "body.")
    job = shaped.data
    job["id"] = data.get("custom_id")
    if "metadata" in data:
        job["metadata"] = data["metadata"]
    names = {**(shaped.names or {}), **_OUTSIDE_BODY}
    return LineFields(job, (*problems, *shaped.problems), "body.", names)


def _envelope_problems(data: dict[str, Any], line: int) -> list[ManifestProblem]:
    """What is wrong with a Batch API line outside its body."""
    problems = []
    if data.get("method", "POST") != "POST":
        problems.append(ManifestProblem(line, "method", "only POST is supported"))
    if data.get("url", BATCH_URL) != BATCH_URL:
        problems.append(ManifestProblem(line, "url", f"only {BATCH_URL} is supported"))
    problems += [
        ManifestProblem(line, name, "unknown field in a Batch API line")
        for name in sorted(data.keys() - BATCH_KEYS)
    ]
    return problems
