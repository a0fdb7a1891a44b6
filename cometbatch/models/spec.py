"""One model's capabilities: what it accepts, checked before anything is sent (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import CapabilityError
from .provenance import DateText
from .sizes import SizeRule

# In a data file, "*" stands for "any value" (TOML has no null).
ANY = "*"


class Requirement(BaseModel):
    """When `param` is set (to one of `values`, or at all if None), `needs` must be in `allowed`.

    `default` is the value `needs` takes on the API side when it is not sent.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    param: str
    values: tuple[str, ...] | None = None
    needs: str
    allowed: tuple[str, ...]
    default: str | None = None


class ModelSpec(BaseModel):
    """What one model accepts. `params` maps a parameter to its allowed values (None: any)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    max_n: int = Field(ge=1)
    # Named sizes; None: any size (unless size_rule says otherwise).
    sizes: tuple[str, ...] | None = None
    # Sizes beyond the named ones, by rule (gpt-image-2's free WIDTHxHEIGHT).
    size_rule: SizeRule | None = None
    response_formats: tuple[str, ...] = ("url", "b64_json")
    # gpt-image models always answer b64_json and reject the parameter itself.
    send_response_format: bool = True
    # False: a manifest naming response_format at all is refused (gpt-image-2). True with
    # send_response_format False: a value the model answers anyway is accepted and left out
    # (gpt-image-1, as manifests written for it expect).
    response_format_in_manifest: bool = True
    max_prompt_chars: int | None = None
    params: Mapping[str, tuple[str, ...] | None] = Field(default_factory=dict)
    int_ranges: Mapping[str, tuple[int, int]] = Field(default_factory=dict)
    requirements: tuple[Requirement, ...] = ()
    returns_revised_prompt: bool = False
    # Unknown models pass every parameter through untouched.
    known: bool = True
    # Where these rules come from (a URL or a document) and the date they were taken.
    source: str | None = None
    as_of: DateText | None = None
    # The family pattern a name matched, when its rules are the family's.
    family: str | None = None

    @field_validator("sizes", mode="before")
    @classmethod
    def _any_size(cls, value: Any) -> Any:
        return None if value == ANY else value

    @field_validator("params", mode="before")
    @classmethod
    def _any_value(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {name: None if allowed == ANY else allowed for name, allowed in value.items()}
        return value

    def accepts(self, param: str) -> bool:
        """Whether the model takes `param` at all."""
        if not self.known:
            return True
        if param == "size":
            return True
        if param == "response_format":
            return self.send_response_format
        return param in self.params or param in self.int_ranges

    def check(self, params: Mapping[str, Any], prompt: str) -> None:
        """Raise CapabilityError naming the field if the model cannot take these values."""
        if self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars:
            raise CapabilityError(
                f"prompt is {len(prompt)} characters; {self.name} takes at most "
                f"{self.max_prompt_chars}",
                field="prompt",
            )
        if not self.known:
            # Pass-through models check only what they declare: sizes, when given.
            if params.get("size") is not None:
                self._check_size(params["size"])
            return
        for name, value in params.items():
            if value is None:
                continue
            self._check_one(name, value)
        for req in self.requirements:
            value = params.get(req.param)
            if value is None or (req.values is not None and value not in req.values):
                continue
            have = params.get(req.needs, req.default)
            if have not in req.allowed:
                raise CapabilityError(
                    f"{req.param}={value!r} needs {req.needs} in {list(req.allowed)} "
                    f"(got {have!r})",
                    field=req.needs if req.needs in params else req.param,
                )

    def describe_sizes(self) -> str:
        """The sizes this model takes, in words."""
        named = ", ".join(self.sizes or ())
        if self.size_rule is None:
            return named or "any"
        rule = f"any {self.size_rule.describe()}"
        return f"{named}, or {rule}" if named else rule

    def _check_size(self, value: Any) -> None:
        if self.sizes is None and self.size_rule is None:
            return
        if self.sizes is not None and value in self.sizes:
            return
        if self.size_rule is None:
            raise CapabilityError(
                f"{self.name} does not take size {value!r}; sizes: {', '.join(self.sizes or ())}",
                field="size",
            )
        problem = self.size_rule.problem(value)
        if problem is not None:
            raise CapabilityError(
                f"size {value!r}: {problem} ({self.name} takes {self.describe_sizes()})",
                field="size",
            )

    def _check_one(self, name: str, value: Any) -> None:
        if name == "size":
            self._check_size(value)
            return
        if name == "response_format":
            self._check_response_format(value)
            return
        if name in self.int_ranges:
            low, high = self.int_ranges[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise CapabilityError(
                    f"{name} must be a whole number from {low} to {high}", field=name
                )
            return
        if name not in self.params:
            raise CapabilityError(f"{self.name} does not take {name}", field=name)
        allowed = self.params[name]
        if allowed is not None and value not in allowed:
            raise CapabilityError(
                f"{self.name} does not take {name}={value!r}; allowed: {', '.join(allowed)}",
                field=name,
            )

    def _check_response_format(self, value: Any) -> None:
        answers = " or ".join(self.response_formats)
        if not self.response_format_in_manifest:
            raise CapabilityError(
                f"{self.name} does not take response_format (it always answers {answers}): "
                "remove the field",
                field="response_format",
            )
        if value not in self.response_formats:
            raise CapabilityError(
                f"{self.name} does not take response_format {value!r}; it answers {answers}",
                field="response_format",
            )
