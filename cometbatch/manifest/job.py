"""The Job: one manifest line's request as a validated model, its default id and its folder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..models.registry import DEFAULT_MODEL, PARAMS
from ..paths import safe_component
from .lineshapes import streaming_problem

__all__ = ["MAX_ID_CHARS", "MAX_N", "Job", "JobDefaults", "default_job_id", "folder_key"]

MAX_ID_CHARS = 256
MAX_N = 100_000
# Fields that make up a job's default id: everything sent except n, so raising n on a rerun
# keeps the id and only the new images are generated.
_ID_KEYS = frozenset(("prompt", "model", *PARAMS, "extra"))
_CORE = frozenset(("prompt", "model", "n", *PARAMS))
_TEXT_PARAMS = tuple(name for name in PARAMS if name != "output_compression")
# One encoder for every id: json.dumps with options builds a new one per call.
_ID_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode


def default_job_id(data: dict[str, Any]) -> str:
    """A short stable id from a job's request fields (64 bits: collisions are negligible)."""
    basis = {k: v for k, v in data.items() if k in _ID_KEYS and v is not None and v != {}}
    text = _ID_JSON(basis)
    # surrogatepass: a lone surrogate must fail validation naming its field, not crash here.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def folder_key(job_id: str) -> str:
    """What must be unique per job: its image folder, also on case-insensitive file systems."""
    return safe_component(job_id).casefold()


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
