"""A manifest's lines: read in bounded pieces, decoded as strict JSON, validated into Jobs."""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from pydantic import ValidationError

from ..errors import CapabilityError, ManifestError, ManifestProblem
from ..models.registry import ModelRegistry
from ..validation import problems as validation_problems
from .job import Job, JobDefaults
from .lineshapes import batch_fields, is_batch_line, sdk_fields

__all__ = [
    "MAX_LINE_CHARS",
    "MAX_NESTING",
    "SCAN",
    "decode_line",
    "job_from_data",
    "job_from_fields",
    "not_utf8",
    "numbered_lines",
    "parse_line",
]

# Deeper lines are refused: json's encoder and decoder recurse, so data nested near the
# interpreter's recursion limit would parse here and then fail to serialise further on.
MAX_NESTING = 100
# What undecodable bytes become when a line is read with errors="surrogateescape".
_UNDECODABLE = re.compile("[\udc80-\udcff]")
# Characters a manifest line may hold: far above the longest prompt a model takes (32,000)
# with its metadata, far below what would exhaust memory (a binary or a log given by mistake).
MAX_LINE_CHARS = 1 << 20
# Characters of a value that a hint repeats.
_SHOWN_CHARS = 40


class LineTooLong(ManifestError):
    """A line over MAX_LINE_CHARS: it ends the reading of the file."""


def numbered_lines(handle: TextIO, limit: int = MAX_LINE_CHARS) -> Iterator[tuple[int, str]]:
    """(number, text) of each physical line; LineTooLong at a line over `limit` characters."""
    number = 0
    # readline(size) reads in chunks and stops at `size`: a huge line is never held whole.
    while text := handle.readline(limit + 1):
        number += 1
        if len(text) > limit and not text.endswith(("\n", "\r")):
            raise LineTooLong(
                [
                    ManifestProblem(
                        number,
                        None,
                        f"the line is longer than {limit:,} characters: no manifest line is "
                        "that long (is this the right file?); the lines after it were not read",
                    )
                ]
            )
        yield number, text


def not_utf8(text: str, number: int) -> None:
    """Raise ManifestError if the line held bytes that are not UTF-8 (read as surrogates)."""
    # An ASCII line cannot hold the stand-ins for undecodable bytes: skip the search.
    if not text.isascii() and _UNDECODABLE.search(text):
        raise ManifestError([ManifestProblem(number, None, "not UTF-8 text")])


def _unknown_field_message(name: str, value: Any) -> str:
    """What to do about a field no job has: a typo's fix, else how to send it through extra."""
    # Anything that is not a near miss is most likely a provider's own field (seed, ...).
    known = sorted((*Job.model_fields, "extra_body"))
    guess = difflib.get_close_matches(name, known, n=1)
    if guess:
        return f"unknown field (did you mean '{guess[0]}'?)"
    return (
        "unknown field: not a request field cometbatch knows; to send it to the API as is, "
        f'put it in extra: {{"extra": {{{_json_shown(name)}: {_json_shown(value)}}}}}'
    )


def _json_shown(value: Any) -> str:
    """A value as JSON for a hint, cut short when long (the hint shows the shape, not data)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _SHOWN_CHARS else "..."


def _problems_from(exc: ValidationError, line: int) -> list[ManifestProblem]:
    found = []
    for problem in validation_problems(exc):
        if problem.kind == "extra_forbidden":
            message = _unknown_field_message(problem.where, problem.given)
        else:
            message = problem.message
        found.append(ManifestProblem(line, problem.where or None, message))
    return found


class _NotJSONError(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJSONError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # It would go out as Infinity, which is not JSON either.
        raise _NotJSONError(f"{text} is out of range for a number")
    return value


def _nesting_exceeds(data: Any, limit: int) -> bool:
    """Whether lists and objects nest deeper than `limit` (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


# One decoder for every line: json.loads with hooks would build a new one per line.
STRICT_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_refuse_constant)
# Its scanner: (value, end) of the JSON value at an index, without decode()'s two regex skips
# of whitespace (the fast check wants the end, to look at what follows itself).
SCAN: Callable[[str, int], tuple[Any, int]] = STRICT_DECODER.scan_once  # type: ignore[attr-defined]


def _strict_json(text: str) -> Any:
    """Standard JSON nested at most MAX_NESTING deep; otherwise ValueError saying why."""
    too_deep = f"nested more than {MAX_NESTING} levels deep"
    if text.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig)")  # as json.loads says
    try:
        data = STRICT_DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg) from None
    except _NotJSONError:
        raise
    except RecursionError:
        raise ValueError(too_deep) from None
    except ValueError:
        # Python refuses integers longer than sys.get_int_max_str_digits() (4300 by default).
        raise ValueError("a number has too many digits") from None
    if too_nested(text) and _nesting_exceeds(data, MAX_NESTING):
        raise ValueError(too_deep)
    return data


def too_nested(text: str) -> bool:
    """Whether a line has brackets enough to nest deeper than MAX_NESTING (a cheap bound)."""
    return text.count("[") + text.count("{") > MAX_NESTING


def decode_line(text: str, line: int) -> dict[str, Any] | None:
    """A line's JSON object (None for blank and comment lines); ManifestError if it is none."""
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    try:
        data = _strict_json(stripped)
    except ValueError as exc:
        raise ManifestError([ManifestProblem(line, None, f"invalid JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise ManifestError([ManifestProblem(line, None, "a line must be a JSON object")])
    return data


def job_from_fields(
    data: dict[str, Any], line: int, *, defaults: JobDefaults | None = None, registry: ModelRegistry
) -> Job:
    """A decoded line (any shape: plain, Batch API, openai-python keywords) as a Job."""
    # A Batch API line or openai-python keyword arguments: the same fields, named as written.
    shaped = batch_fields(data, line) if is_batch_line(data) else sdk_fields(data, line)
    try:
        job = job_from_data(shaped.data, line, defaults=defaults, registry=registry)
    except ManifestError as exc:
        raise ManifestError([*shaped.problems, *shaped.located(exc.problems)]) from None
    if shaped.problems:
        raise ManifestError(list(shaped.problems))
    return job


def parse_line(
    text: str, line: int, *, defaults: JobDefaults | None = None, registry: ModelRegistry
) -> Job | None:
    """One manifest line as a Job (None for blank and comment lines); ManifestError if bad."""
    data = decode_line(text, line)
    if data is None:
        return None
    return job_from_fields(data, line, defaults=defaults, registry=registry)


def job_from_data(
    data: dict[str, Any], line: int, *, defaults: JobDefaults | None = None, registry: ModelRegistry
) -> Job:
    """A job from one line's fields (defaults filled in); ManifestError naming line and field."""
    # The one validation every input format shares (JSONL, text, CSV).
    if defaults is not None:
        data = defaults.apply(data)
    try:
        job = Job.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_problems_from(exc, line)) from None
    try:
        registry.get(job.model).check(job.params(), job.prompt)
    except CapabilityError as exc:
        raise ManifestError([ManifestProblem(line, exc.field, str(exc))]) from None
    return job
