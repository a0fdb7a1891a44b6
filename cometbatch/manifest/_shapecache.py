"""Lines whose request fields were validated before: checked and built with one dict lookup."""

# A speed-up of the full model (job_from_fields): any line it cannot vouch for goes that way.

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

from ..models.registry import DEFAULT_MODEL, ModelRegistry
from .job import MAX_ID_CHARS, Job, JobDefaults, default_job_id
from .lines import SCAN, decode_line, job_from_fields, too_nested
from .lineshapes import BATCH_KEYS, BATCH_URL, SDK_KEYS

__all__ = ["ABSENT", "Shape", "ShapeCache", "decoded", "good_text", "shape_of"]

# Distinct request-field combinations remembered at most (then forgotten and learnt again).
CAPACITY = 4096
_SURROGATE = re.compile("[\ud800-\udfff]")
_SCAN = SCAN
_new = object.__new__
_set = object.__setattr__
# id, prompt and metadata differ from line to line; every other field makes up the shape.
# A line without metadata (null is not the same: the full model refuses it).
ABSENT: Any = object()


@dataclass(frozen=True, eq=False, slots=True)
class Shape:
    """A line's request fields as validated once, shared by every line that repeats them."""

    model: str
    n: int
    max_n: int
    # Prompt characters the model takes.
    max_prompt: int
    # Every Job field as validated; id, prompt, extra and metadata are each line's own.
    values: dict[str, Any]
    # The fields a line of this shape sets (what the full model records), metadata aside.
    fields_set: frozenset[str]


def shape_of(job: Job, registry: ModelRegistry) -> Shape:
    """The shape a validated job's request fields make."""
    spec = registry.resolve(job.model)
    values = dict(job.__dict__)
    return Shape(
        job.model,
        job.n,
        spec.max_n,
        spec.max_prompt_chars if spec.max_prompt_chars is not None else sys.maxsize,
        values,
        frozenset(job.model_fields_set - {"metadata"}),
    )


def _built(shape: Shape, job_id: str, prompt: str, metadata: Any) -> Job:
    """The Job the full model makes of a line of `shape` (its own values filled in)."""
    values = shape.values.copy()
    values["id"] = job_id
    values["prompt"] = prompt
    values["extra"] = {}
    if metadata is ABSENT:
        values["metadata"] = {}
        fields_set = set(shape.fields_set)
    else:
        values["metadata"] = metadata
        fields_set = {*shape.fields_set, "metadata"}
    # What Job.model_construct does, without its per-field loop (some 30 times slower than
    # this): the values were validated by the full model for the shape's first line.
    job = _new(Job)
    _set(job, "__dict__", values)
    _set(job, "__pydantic_fields_set__", fields_set)
    _set(job, "__pydantic_extra__", None)
    _set(job, "__pydantic_private__", None)
    return job


class ShapeCache:
    """Checks JSONL lines and builds their Jobs, each decoded once and validated by its shape."""

    # A line of a known shape needs only its id, prompt and metadata looked at; any other goes
    # through the full model (job_from_fields), with its exact errors.

    def __init__(self, defaults: JobDefaults | None, registry: ModelRegistry) -> None:
        self._defaults = defaults
        # Defaults that set nothing need not be applied to each line's fields.
        self._fills = defaults is not None and defaults != JobDefaults()
        self._registry = registry
        # Read directly by the check loop (_fastcheck) for the usual line.
        self.shapes: dict[tuple[tuple[str, Any], ...], Shape] = {}

    def __repr__(self) -> str:
        return f"ShapeCache(shapes={len(self.shapes)})"

    def check(self, text: str, number: int) -> tuple[str, Shape] | None:
        """A line's job id and shape (None: blank or comment); ManifestError if it is bad."""
        data = decoded(text)
        if data is None:
            data = decode_line(text, number)
            if data is None:
                return None
        return self.check_decoded(data, number)

    def check_decoded(self, data: dict[str, Any], number: int) -> tuple[str, Shape]:
        """A decoded line's job id and shape; ManifestError if it is bad."""
        known = self._known(data)
        if known is not None:
            return known[1], known[0]
        job, shape = self._learn(data, number)
        return job.id, shape

    def job(self, text: str, number: int) -> Job | None:
        """A line's Job (None: blank or comment); ManifestError if it is bad."""
        data = decoded(text)
        if data is None:
            data = decode_line(text, number)
            if data is None:
                return None
        known = self._known(data)
        if known is not None:
            return _built(*known)
        return self._learn(data, number)[0]

    def derived_id(self, rest: dict[str, Any], prompt: str) -> str:
        """The id the full model gives a line without one (`rest` is filled in on the way)."""
        basis = self._defaults.apply(rest) if self._fills and self._defaults else rest
        basis.setdefault("model", DEFAULT_MODEL)
        basis["prompt"] = prompt
        return default_job_id(basis)

    def _learn(self, data: dict[str, Any], number: int) -> tuple[Job, Shape]:
        """The full model's Job for a line, and its shape (remembered when it has one)."""
        parts = _parts(data)
        key = None if parts is None else _key(parts[0])
        job = job_from_fields(data, number, defaults=self._defaults, registry=self._registry)
        shape = shape_of(job, self._registry)
        if key is not None:
            if len(self.shapes) >= CAPACITY:
                self.shapes.clear()
            self.shapes[key] = shape
        return job, shape

    def _known(self, data: dict[str, Any]) -> tuple[Shape, str, str, Any] | None:
        """(shape, id, prompt, metadata) of a good line of a known shape; None: ask the model."""
        parts = _parts(data)
        if parts is None:
            return None
        rest, job_id, prompt, metadata = parts
        try:
            shape = self.shapes.get(tuple(rest.items()))
        except TypeError:  # a list or an object among the request fields
            return None
        if shape is None or not _good_prompt(prompt, shape.max_prompt):
            return None
        if metadata is not ABSENT and type(metadata) is not dict:
            return None
        if job_id is None:
            job_id = self.derived_id(rest, prompt)
        elif type(job_id) is int:
            job_id = str(job_id)
            if len(job_id) > MAX_ID_CHARS:
                return None
        elif type(job_id) is not str or not good_text(job_id, MAX_ID_CHARS):
            return None
        return shape, job_id, prompt, metadata


def decoded(text: str) -> dict[str, Any] | None:
    """The JSON object a line holds, when it is plainly one (None: let decode_line tell)."""
    if text[:1] != "{" or too_nested(text):
        return None
    try:
        data, end = _SCAN(text, 0)
    except (ValueError, StopIteration, RecursionError):
        return None
    if end != len(text) and not text[end:].isspace():
        return None
    return data if type(data) is dict else None


def _parts(data: dict[str, Any]) -> tuple[dict[str, Any], Any, Any, Any] | None:
    """(request fields, id, prompt, metadata) of a plain or Batch API line; None: any other."""
    if "custom_id" in data or "body" in data:
        body = data.get("body")
        if (
            type(body) is not dict
            or not BATCH_KEYS.issuperset(data)
            or data.get("method", "POST") != "POST"
            or data.get("url", BATCH_URL) != BATCH_URL
            or "id" in body
            or "metadata" in body
            or not SDK_KEYS.isdisjoint(body)
        ):
            return None
        rest = body.copy()
        metadata = data.get("metadata", ABSENT)
        return rest, data.get("custom_id"), rest.pop("prompt", None), metadata
    if not SDK_KEYS.isdisjoint(data):
        return None
    rest = data.copy()
    return rest, rest.pop("id", None), rest.pop("prompt", None), rest.pop("metadata", ABSENT)


def _key(rest: dict[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    """A hashable key for the request fields (None when a value is a list or an object)."""
    key = tuple(rest.items())
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _good_prompt(prompt: Any, limit: int) -> bool:
    """Whether the full model would take `prompt` for a model taking `limit` characters."""
    return type(prompt) is str and good_text(prompt, limit) and not prompt.isspace()


def good_text(text: str, limit: int) -> bool:
    """Not empty, at most `limit` characters, no lone surrogate (it is not text)."""
    return 0 < len(text) <= limit and (text.isascii() or not _SURROGATE.search(text))
