"""Manifests: one job per line (JSONL; text and CSV through `inputs`), validated up front,
streamed on use."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import CapabilityError, ManifestError, ManifestFileError, ManifestProblem
from ..models.registry import DEFAULT_MODEL, PARAMS, ModelRegistry
from ..paths import safe_component
from ..validation import problems as validation_problems
from .inputs import input_format, reader_for
from .lineshapes import batch_fields, is_batch_line, sdk_fields, streaming_problem

MAX_ID_CHARS = 256
MAX_N = 100_000
# Fields that make up a job's default id: everything sent except n, so raising n on a rerun
# keeps the id and only the new images are generated.
_ID_FIELDS = ("prompt", "model", *PARAMS, "extra")
_CORE = frozenset(("prompt", "model", "n", *PARAMS))
_TEXT_PARAMS = tuple(name for name in PARAMS if name != "output_compression")
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


class _LineTooLong(ManifestError):
    """A line over MAX_LINE_CHARS: it ends the reading of the file."""


def numbered_lines(handle: TextIO, limit: int = MAX_LINE_CHARS) -> Iterator[tuple[int, str]]:
    """(number, text) of each physical line of a text file; a line over `limit` characters
    raises ManifestError naming it, read no further than the limit."""
    number = 0
    # readline(size) reads in chunks and stops at `size`: a huge line is never held whole.
    while text := handle.readline(limit + 1):
        number += 1
        if len(text) > limit and not text.endswith(("\n", "\r")):
            raise _LineTooLong(
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


def default_job_id(data: dict[str, Any]) -> str:
    """A short stable id from a job's request fields (64 bits: collisions are negligible)."""
    basis = {k: data[k] for k in _ID_FIELDS if data.get(k) not in (None, {})}
    text = json.dumps(basis, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: a lone surrogate must fail validation naming its field, not crash here.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class Job(BaseModel):
    """One manifest line: a prompt, a model, how many images, and the request parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Optional for callers: when absent, _fill_id derives it from the request fields.
    id: str = Field(default="", min_length=1, max_length=MAX_ID_CHARS)
    prompt: str = Field(min_length=1)
    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _fill_id(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        data.setdefault("model", DEFAULT_MODEL)
        job_id = data.get("id")
        if job_id is None:
            data["id"] = default_job_id(data)
        elif isinstance(job_id, int) and not isinstance(job_id, bool):
            data["id"] = str(job_id)
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank")
        return value

    @field_validator("extra")
    @classmethod
    def _extra_does_not_shadow(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(_CORE & value.keys())
        if clash:
            raise ValueError(f"must not set {', '.join(clash)}: set it as a top-level field")
        for name in ("stream", "partial_images"):
            if name in value and (why := streaming_problem(name, value[name])):
                raise ValueError(f"must not set {name}: {why}")
        return value

    # prompt, model and id need no check: their length constraints already refuse surrogates.
    @field_validator(*_TEXT_PARAMS, "extra")
    @classmethod
    def _sent_as_text(cls, value: Any) -> Any:
        try:
            if isinstance(value, str):
                value.encode()  # what json.dumps would fail on, without building the JSON
            elif value:
                json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            # It would be sent, and hashed into the request fingerprint, as UTF-8.
            raise ValueError(
                "holds a lone surrogate (a \\ud800-\\udfff escape), not text"
            ) from None
        return value

    def params(self) -> dict[str, Any]:
        """The optional request parameters that are set."""
        # Straight from the instance dict: this runs several times per job on every pass.
        fields = self.__dict__
        return {name: value for name in PARAMS if (value := fields[name]) is not None}


@dataclass(frozen=True, slots=True)
class JobDefaults:
    """Values a line gets when it does not set them (from --model, --size, --n)."""

    model: str | None = None
    size: str | None = None
    n: int | None = None

    def apply(self, data: dict[str, Any]) -> dict[str, Any]:
        """The line's fields with the defaults filled in where absent."""
        for name in ("model", "size", "n"):
            value = getattr(self, name)
            if value is not None and data.get(name) is None:
                data[name] = value
        return data


@dataclass(slots=True)
class ModelPlan:
    """Work for one model: jobs, requests and images."""

    jobs: int = 0
    requests: int = 0
    images: int = 0


@dataclass(slots=True)
class ManifestStats:
    """Totals gathered while validating a manifest."""

    jobs: int = 0
    requests: int = 0
    images: int = 0
    by_model: dict[str, ModelPlan] = field(default_factory=dict)
    # The most images any one request will carry (sizes the --ipm pacing bucket).
    max_request_images: int = 0

    def add(self, job: Job, max_n: int) -> None:
        """Count one job that fans out into requests of at most max_n images."""
        requests = -(-job.n // max_n)
        self.max_request_images = max(self.max_request_images, min(job.n, max_n))
        plan = self.by_model.setdefault(job.model, ModelPlan())
        for target in (self, plan):
            target.jobs += 1
            target.requests += requests
            target.images += job.n


def _unknown_field_message(name: str, value: Any) -> str:
    """What to do about a field no job has: a near miss is a typo; anything else is most likely
    a provider's own field (seed, negative_prompt, ...), which goes through `extra`."""
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
_STRICT_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_refuse_constant)


def _strict_json(text: str) -> Any:
    """Standard JSON nested at most MAX_NESTING deep; otherwise ValueError saying why."""
    too_deep = f"nested more than {MAX_NESTING} levels deep"
    if text.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig)")  # as json.loads says
    try:
        data = _STRICT_DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg) from None
    except _NotJSONError:
        raise
    except RecursionError:
        raise ValueError(too_deep) from None
    except ValueError:
        # Python refuses integers longer than sys.get_int_max_str_digits() (4300 by default).
        raise ValueError("a number has too many digits") from None
    if text.count("[") + text.count("{") > MAX_NESTING and _nesting_exceeds(data, MAX_NESTING):
        raise ValueError(too_deep)
    return data


def parse_line(
    text: str, line: int, *, defaults: JobDefaults | None = None, registry: ModelRegistry
) -> Job | None:
    """One manifest line as a Job (None for blank and comment lines); ManifestError if bad."""
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    try:
        data = _strict_json(stripped)
    except ValueError as exc:
        raise ManifestError([ManifestProblem(line, None, f"invalid JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise ManifestError([ManifestProblem(line, None, "a line must be a JSON object")])
    # A Batch API line or openai-python keyword arguments: the same fields, named as written.
    shaped = batch_fields(data, line) if is_batch_line(data) else sdk_fields(data, line)
    try:
        job = job_from_data(shaped.data, line, defaults=defaults, registry=registry)
    except ManifestError as exc:
        raise ManifestError([*shaped.problems, *shaped.located(exc.problems)]) from None
    if shaped.problems:
        raise ManifestError(list(shaped.problems))
    return job


def job_from_data(
    data: dict[str, Any], line: int, *, defaults: JobDefaults | None = None, registry: ModelRegistry
) -> Job:
    """A job from one line's fields (defaults filled in); ManifestError naming line and field.

    The one validation every input format shares (JSONL, text, CSV)."""
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


def folder_key(job_id: str) -> str:
    """What must be unique per job: its image folder, also on case-insensitive file systems."""
    return safe_component(job_id).casefold()


def _id_digest(job_id: str) -> int:
    # 64-bit digests instead of the ids themselves keep duplicate detection small in memory.
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=8).digest(), "big")


def _zeroed_table(slots: int) -> tuple[mmap.mmap, memoryview]:
    """`slots` zeroed 64-bit slots in an anonymous memory map of their own.

    Not an array: freeing a large malloc'd block raises glibc's mmap threshold to its size,
    after which the ledger's growing tables (loaded next) stay on the heap and are never given
    back; a 1,000,000-line manifest then costs a run some 30 MB of peak memory for nothing.
    A map of its own is simply unmapped.
    """
    mapped = mmap.mmap(-1, slots * 8)
    return mapped, memoryview(mapped).cast("Q")


class _DigestSet:
    """A set of 64-bit digests in one flat table: a million take 16 MB, not the 60 MB of a
    set of ints (an object per digest, and a slot of pointer and hash for each)."""

    __slots__ = ("_count", "_map", "_table")

    def __init__(self) -> None:
        self._map, self._table = _zeroed_table(1024)
        self._count = 0

    def close(self) -> None:
        """Give the table's memory back."""
        self._table.release()
        self._map.close()

    def add(self, digest: int) -> bool:
        """Add `digest`; False if it was there already."""
        digest = digest or 1  # 0 marks a free slot (a digest of 0 passes for one of 1)
        table = self._table
        mask = len(table) - 1
        at = digest & mask  # a digest's low bits are as random as its high ones
        while found := table[at]:
            if found == digest:
                return False
            at = (at + 1) & mask
        table[at] = digest
        self._count += 1
        if 2 * self._count > len(table):
            self._grow()
        return True

    def _grow(self) -> None:
        mapped, table = _zeroed_table(2 * len(self._table))
        mask = len(table) - 1
        for digest in self._table:
            if digest:
                at = digest & mask
                while table[at]:
                    at = (at + 1) & mask
                table[at] = digest
        self.close()
        self._map, self._table = mapped, table


class Manifest:
    """A validated manifest file: iterate it for Jobs (re-read from disk each time).

    `format` is "jsonl", "txt" or "csv"; by default it follows the file's suffix (.txt, .csv;
    anything else is JSONL)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        defaults: JobDefaults | None = None,
        registry: ModelRegistry | None = None,
        format: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.defaults = defaults or JobDefaults()
        self.registry = registry or ModelRegistry()
        self.stats = ManifestStats()
        self.sha256 = ""
        self.format = input_format(self.path, format)
        self._reader = reader_for(self.format, self._job_from)

    def _job_from(self, data: dict[str, Any], line: int) -> Job:
        return job_from_data(data, line, defaults=self.defaults, registry=self.registry)

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r}, jobs={self.stats.jobs}, images={self.stats.images})"

    def _lines(self) -> Iterator[tuple[int, str]]:
        # surrogateescape: bytes that are not UTF-8 fail their own line (see _parse), not the file.
        try:
            with self.path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
                lines = numbered_lines(f)
                yield from lines if self._reader is None else self._reader.records(lines)
        except FileNotFoundError:
            raise ManifestFileError(str(self.path), "file not found") from None
        except OSError as exc:
            reason = f"cannot read the file ({exc.strerror or exc})"
            raise ManifestFileError(str(self.path), reason) from None

    def _parse(self, text: str, number: int) -> Job | None:
        # An ASCII line cannot hold the stand-ins for undecodable bytes: skip the search.
        if not text.isascii() and _UNDECODABLE.search(text):
            raise ManifestError([ManifestProblem(number, None, "not UTF-8 text")])
        if self._reader is not None:
            return self._reader.parse(text, number)
        return parse_line(text, number, defaults=self.defaults, registry=self.registry)

    def __iter__(self) -> Iterator[Job]:
        for number, text in self._lines():
            job = self._parse(text, number)
            if job is not None:
                yield job

    def validate(self, *, max_problems: int = 50) -> ManifestStats:
        """Check every line; raise one ManifestError listing the problems (up to the cap)."""
        seen = _DigestSet()
        try:
            stats, problems, duplicates, truncated, sha256 = self._check(seen, max_problems)
        finally:
            seen.close()
        problems.extend(self._duplicate_problems(duplicates))
        if problems:
            problems.sort(key=lambda p: p.line)
            raise ManifestError(problems[:max_problems], source=str(self.path), truncated=truncated)
        self.stats = stats
        self.sha256 = sha256
        return stats

    def _check(
        self, seen: _DigestSet, max_problems: int
    ) -> tuple[ManifestStats, list[ManifestProblem], list[tuple[str, int, str]], bool, str]:
        """One pass over the lines: stats, problems, each repeat of an id (its folder key,
        line and id), whether it stopped early, and the file's sha256."""
        problems: list[ManifestProblem] = []
        truncated = False
        duplicates: list[tuple[str, int, str]] = []
        stats = ManifestStats()
        digest = hashlib.sha256()
        try:
            for number, text in self._lines():
                digest.update(text.encode("utf-8", "surrogateescape"))
                try:
                    job = self._parse(text, number)
                except ManifestError as exc:
                    problems.extend(exc.problems)
                    job = None
                if job is not None:
                    folder = folder_key(job.id)
                    if seen.add(_id_digest(folder)):
                        stats.add(job, self.registry.get(job.model).max_n)
                    else:
                        duplicates.append((folder, number, job.id))
                if len(problems) + len(duplicates) > max_problems:
                    truncated = True
                    break
        except _LineTooLong as exc:
            # The rest of the file is not read: what was found before the line is kept.
            problems.extend(exc.problems)
        return stats, problems, duplicates, truncated, digest.hexdigest()

    def _duplicate_problems(self, duplicates: list[tuple[str, int, str]]) -> list[ManifestProblem]:
        """Name the first line of each repeated id at every repeat (a second pass, only when
        there are any)."""
        if not duplicates:
            return []
        repeated = {folder for folder, _, _ in duplicates}
        first: dict[str, tuple[int, str]] = {}
        for number, text in self._lines():
            if len(first) == len(repeated):
                break
            try:
                job = self._parse(text, number)
            except ManifestError:
                continue
            if job is not None and folder_key(job.id) in repeated:
                first.setdefault(folder_key(job.id), (number, job.id))
        problems = []
        for folder, line, job_id in duplicates:
            first_line, first_id = first.get(folder, (0, job_id))
            if first_id == job_id:
                message = (
                    f"id {job_id!r} is already used on line {first_line} "
                    "(give each line its own 'id', or ask for more images with 'n')"
                )
            else:
                message = (
                    f"id {job_id!r} would share an image folder with id {first_id!r} on line "
                    f"{first_line} (ids must differ in more than letter case or characters "
                    "that are unsafe in file names)"
                )
            problems.append(ManifestProblem(line, "id", message))
        return problems


def load_manifest(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    size: str | None = None,
    n: int | None = None,
    registry: ModelRegistry | None = None,
    max_problems: int = 50,
    defaults: JobDefaults | None = None,
    format: str | None = None,
) -> Manifest:
    """Validate a manifest (ManifestError lists every bad line); return it to stream.

    JSONL, or by suffix a .txt of prompts or a .csv (see `Manifest`). `defaults` is the
    JobDefaults to use instead of model/size/n."""
    if defaults is None:
        defaults = JobDefaults(model=model, size=size, n=n)
    elif (model, size, n) != (None, None, None):
        raise TypeError("pass either defaults or model/size/n, not both")
    manifest = Manifest(path, defaults=defaults, registry=registry, format=format)
    manifest.validate(max_problems=max_problems)
    return manifest
