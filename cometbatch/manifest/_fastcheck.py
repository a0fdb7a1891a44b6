"""The up-front check of a manifest's lines in one tight loop (a speed-up of the full model)."""

# The usual JSONL line is decoded once and checked against request fields validated before
# (ShapeCache), with no function call per field: this loop is most of a large check's time.

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import ManifestError, ManifestProblem
from ..paths import PLAIN_COMPONENT
from . import _iddigests
from ._iddigests import SHIFT, IdDigests
from ._shapecache import ABSENT, Shape, ShapeCache
from .job import MAX_ID_CHARS, folder_key
from .lines import MAX_NESTING, SCAN, LineTooLong
from .lineshapes import SDK_KEYS
from .stats import ManifestStats

__all__ = ["Checked", "check_lines"]

# Shapes counted before their tallies go into the totals (bounds the tally's memory).
_TALLY = 4096
_SURROGATE = re.compile("[\ud800-\udfff]").search
_UNDECODABLE = re.compile("[\udc80-\udcff]").search
_SCAN = SCAN
_PLAIN = PLAIN_COMPONENT.fullmatch

# A line's job id and shape (None: a line without a job); ManifestError if it is bad.
LineCheck = Callable[[str, int], "tuple[str, Shape] | None"]


@dataclass(slots=True)
class Checked:
    """What one pass over a manifest found."""

    stats: ManifestStats
    problems: list[ManifestProblem]
    digests: IdDigests
    # The last line read, and whether reading stopped there for the problems found.
    last_line: int
    truncated: bool
    sha256: str


def _tally(stats: ManifestStats, tally: dict[Shape, int]) -> None:
    for shape, jobs in tally.items():
        stats.count(shape.model, shape.n, shape.max_n, jobs)
    tally.clear()


def check_lines(
    lines: Iterable[tuple[int, str]],
    checked: LineCheck,
    cache: ShapeCache | None,
    max_problems: int,
) -> Checked:
    """Check every line (`cache` takes the usual JSONL line); stop after max_problems bad ones."""
    problems: list[ManifestProblem] = []
    stats = ManifestStats()
    tally: dict[Shape, int] = {}
    digests = IdDigests()
    parts = digests.parts
    mask = _iddigests.MASK  # id_digest(), inlined
    sha256 = hashlib.sha256()
    # Lines are hashed many at a time: one encode and update per line costs more.
    unhashed: list[str] = []
    shapes = cache.shapes if cache is not None else None
    number = 0
    truncated = False
    try:
        for number, text in lines:
            unhashed.append(text)
            # Counted in records, not line numbers (a CSV record may span lines); a long line
            # goes at once, so that what waits stays small.
            if len(unhashed) >= 512 or len(text) > 4096:
                sha256.update("".join(unhashed).encode("utf-8", "surrogateescape"))
                unhashed.clear()
            found = None
            try:
                if (
                    shapes is None
                    or text[:1] != "{"
                    or not (text.isascii() or not _UNDECODABLE(text))
                    or text.count("[") + text.count("{") > MAX_NESTING
                ):
                    found = checked(text, number)
                else:
                    found = _usual(text, number, shapes, checked, cache)
            except ManifestError as exc:
                problems.extend(exc.problems)
                if len(problems) > max_problems:
                    truncated = True
                    break
            if found is not None:
                job_id, shape = found
                folder = job_id.casefold() if _PLAIN(job_id) else folder_key(job_id)
                digest = hash(folder) & mask
                parts[digest >> SHIFT].append(digest)
                count = tally.get(shape)
                if count is not None:
                    tally[shape] = count + 1
                else:
                    if len(tally) >= _TALLY:
                        _tally(stats, tally)
                    tally[shape] = 1
    except LineTooLong as exc:
        # The rest of the file is not read: what was found before the line is kept.
        problems.extend(exc.problems)
    sha256.update("".join(unhashed).encode("utf-8", "surrogateescape"))
    _tally(stats, tally)
    return Checked(stats, problems, digests, number, truncated, sha256.hexdigest())


def _usual(
    text: str,
    number: int,
    shapes: dict[tuple[tuple[str, object], ...], Shape],
    checked: LineCheck,
    cache: ShapeCache | None,
) -> tuple[str, Shape] | None:
    """A line that starts as a JSON object, decoded once: checked by its shape if it can be."""
    try:
        data, end = _SCAN(text, 0)
    except (ValueError, StopIteration, RecursionError):
        return checked(text, number)  # it names the problem
    if (end != len(text) and not text[end:].isspace()) or cache is None:
        return checked(text, number)
    if "custom_id" in data or "body" in data or not SDK_KEYS.isdisjoint(data):
        return cache.check_decoded(data, number)
    rest = data.copy()
    job_id = rest.pop("id", None)
    prompt = rest.pop("prompt", None)
    metadata = rest.pop("metadata", ABSENT)
    try:
        shape = shapes.get(tuple(rest.items()))
    except TypeError:  # a list or an object among the request fields
        shape = None
    if (
        shape is not None
        and type(prompt) is str
        and 0 < len(prompt) <= shape.max_prompt
        and (prompt.isascii() or not _SURROGATE(prompt))
        and not prompt.isspace()
        and (metadata is ABSENT or type(metadata) is dict)
    ):
        if (
            type(job_id) is str
            and 0 < len(job_id) <= MAX_ID_CHARS
            and (job_id.isascii() or not _SURROGATE(job_id))
        ):
            return job_id, shape
        if job_id is None:
            return cache.derived_id(rest, prompt), shape
    return cache.check_decoded(data, number)
