"""Per-model capabilities as data: what each model accepts, and how many images per request."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import CapabilityError, ConfigError

log = logging.getLogger(__name__)

# The optional request parameters a manifest line may carry (besides prompt, n and extra).
PARAMS: tuple[str, ...] = (
    "size",
    "quality",
    "style",
    "response_format",
    "output_format",
    "output_compression",
    "background",
    "moderation",
    "user",
)


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
    sizes: tuple[str, ...] | None = None
    response_formats: tuple[str, ...] = ("url", "b64_json")
    # gpt-image models always answer b64_json and reject the parameter itself.
    send_response_format: bool = True
    max_prompt_chars: int | None = None
    params: Mapping[str, tuple[str, ...] | None] = Field(default_factory=dict)
    int_ranges: Mapping[str, tuple[int, int]] = Field(default_factory=dict)
    requirements: tuple[Requirement, ...] = ()
    returns_revised_prompt: bool = False
    # Unknown models pass every parameter through untouched.
    known: bool = True

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
            if self.sizes is not None and params.get("size") is not None:
                self._check_one("size", params["size"])
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

    def _check_one(self, name: str, value: Any) -> None:
        if name == "size":
            if self.sizes is not None and value not in self.sizes:
                raise CapabilityError(
                    f"{self.name} does not take size {value!r}; sizes: {', '.join(self.sizes)}",
                    field="size",
                )
            return
        if name == "response_format":
            if value not in self.response_formats:
                raise CapabilityError(
                    f"{self.name} does not take response_format {value!r}; it answers "
                    f"{' or '.join(self.response_formats)}",
                    field="response_format",
                )
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


_DALLE_URL = ("url", "b64_json")
_GPT_IMAGE = {
    "max_n": 10,
    "sizes": ("1024x1024", "1536x1024", "1024x1536", "auto"),
    "response_formats": ("b64_json",),
    "send_response_format": False,
    "max_prompt_chars": 32000,
    "params": {
        "quality": ("low", "medium", "high", "auto"),
        "output_format": ("png", "jpeg", "webp"),
        "background": ("transparent", "opaque", "auto"),
        "moderation": ("low", "auto"),
        "user": None,
    },
    "int_ranges": {"output_compression": (0, 100)},
    "requirements": (
        Requirement(
            param="background",
            values=("transparent",),
            needs="output_format",
            allowed=("png", "webp"),
            default="png",
        ),
        Requirement(
            param="output_compression",
            needs="output_format",
            allowed=("jpeg", "webp"),
            default="png",
        ),
    ),
}

BUILTIN_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="dall-e-2",
        max_n=10,
        sizes=("256x256", "512x512", "1024x1024"),
        response_formats=_DALLE_URL,
        max_prompt_chars=1000,
        params={"quality": ("standard",), "user": None},
    ),
    ModelSpec(
        name="dall-e-3",
        max_n=1,
        sizes=("1024x1024", "1792x1024", "1024x1792"),
        response_formats=_DALLE_URL,
        max_prompt_chars=4000,
        params={"quality": ("standard", "hd"), "style": ("vivid", "natural"), "user": None},
        returns_revised_prompt=True,
    ),
    *(
        ModelSpec.model_validate({"name": name, **_GPT_IMAGE})
        for name in ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
    ),
    ModelSpec(
        name="qwen-image",
        max_n=1,
        sizes=None,
        response_formats=_DALLE_URL,
        params={},
    ),
)

DEFAULT_MODEL = "dall-e-3"


class ModelRegistry:
    """Looks up model specs; unknown models get max n 1, pass-through params and one warning."""

    def __init__(self, specs: Iterable[ModelSpec] = BUILTIN_MODELS) -> None:
        self._specs: dict[str, ModelSpec] = {spec.name: spec for spec in specs}
        self._warned: set[str] = set()

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Any:
        return iter(self._specs.values())

    def __repr__(self) -> str:
        return f"ModelRegistry({sorted(self._specs)!r})"

    def get(self, name: str) -> ModelSpec:
        """The spec for `name`; an unknown model warns once and gets a pass-through spec."""
        spec = self._specs.get(name)
        if spec is not None:
            return spec
        if name not in self._warned:
            self._warned.add(name)
            log.warning(
                "model %r is not in cometbatch's registry: sending 1 image per request and "
                "passing parameters through unchecked",
                name,
            )
        spec = ModelSpec(name=name, max_n=1, known=False)
        self._specs[name] = spec
        return spec

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> ModelRegistry:
        """A new registry where each named model's fields are replaced (or a model is added).

        `{"dall-e-2": {"max_n": 4}, "my-model": {"max_n": 4, "sizes": ["512x512"]}}`
        """
        specs = dict(self._specs)
        for name, fields in overrides.items():
            base = specs.get(name)
            # A model added by override passes parameters through unless it declares them.
            data: dict[str, Any] = (
                base.model_dump()
                if base is not None
                else {"name": name, "max_n": 1, "known": "params" in fields}
            )
            data.update(fields)
            data["name"] = name
            try:
                specs[name] = ModelSpec.model_validate(data)
            except ValidationError as exc:
                raise ConfigError(f"bad override for model {name!r}: {exc}") from None
        return ModelRegistry(specs.values())


def parse_overrides(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`MODEL.FIELD=VALUE` options as model overrides; VALUE is JSON where it parses as JSON."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        model, dot, name = target.rpartition(".")
        if not (sep and dot and model and name):
            raise ConfigError(f"model override {item!r}: expected MODEL.FIELD=VALUE")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(model, {})[name] = value
    return overrides
