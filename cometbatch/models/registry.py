"""The model registry: each model's capabilities by name, from data, with families and overrides.

The rules themselves are data (`models.toml`, read by `modeldata` on first use); a name that
is not listed takes the rules of a family whose pattern it matches (`gpt-image-*`), with one
notice, and a name that matches nothing is passed through with one warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from fnmatch import fnmatchcase
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError
from ..validation import first_problem
from .data import builtin_catalog, is_pattern, load_catalog, new_model_fields
from .spec import ModelSpec, Requirement

__all__ = [
    "DEFAULT_MODEL",
    "PARAMS",
    "ModelRegistry",
    "ModelSpec",
    "Requirement",
    "load_registry",
    "parse_overrides",
    "recorded_registry",
]

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


DEFAULT_MODEL = "dall-e-3"


class ModelRegistry:
    """Model specs by name: a listed model's own, else its family's (one notice), else a
    pass-through spec with max n 1 (one warning). `quiet=True` says nothing (reports)."""

    def __init__(
        self,
        specs: Iterable[ModelSpec] | None = None,
        families: Iterable[ModelSpec] | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        if specs is None:
            catalog = builtin_catalog()
            specs = catalog.models.values()
            families = catalog.families.values() if families is None else families
        self._specs: dict[str, ModelSpec] = {spec.name: spec for spec in specs}
        # Longest pattern first: the most specific family wins.
        ordered = sorted(families or (), key=lambda spec: -len(spec.name))
        self._families: dict[str, ModelSpec] = {spec.name: spec for spec in ordered}
        self._quiet = quiet
        self._told: set[str] = set()
        self._resolved: dict[str, ModelSpec] = {}

    @classmethod
    def from_file(cls, *paths: str | os.PathLike[str]) -> ModelRegistry:
        """The built-in models with each models file (TOML, as models.toml) merged over them."""
        catalog = load_catalog(*paths)
        return cls(catalog.models.values(), catalog.families.values())

    def __contains__(self, name: object) -> bool:
        """Listed, or matching a family (such a name is not an unknown model)."""
        return isinstance(name, str) and (name in self._specs or self.family_of(name) is not None)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __repr__(self) -> str:
        return f"ModelRegistry({sorted(self._specs)!r}, families={list(self._families)!r})"

    @property
    def families(self) -> tuple[ModelSpec, ...]:
        """The family specs (each named by its pattern), most specific first."""
        return tuple(self._families.values())

    def family_of(self, name: str) -> ModelSpec | None:
        """The family whose pattern `name` matches (the longest such pattern), or None."""
        for pattern, spec in self._families.items():
            if fnmatchcase(name, pattern):
                return spec
        return None

    def resolve(self, name: str) -> ModelSpec:
        """The spec for `name`, saying nothing: its own, its family's, or a pass-through one."""
        spec = self._specs.get(name) or self._resolved.get(name)
        if spec is not None:
            return spec
        family = self.family_of(name)
        if family is not None:
            spec = family.model_copy(update={"name": name, "family": family.name})
        else:
            spec = ModelSpec(name=name, **new_model_fields({}))
        self._resolved[name] = spec
        return spec

    def get(self, name: str) -> ModelSpec:
        """The spec for `name`; a family member says so once, an unknown model warns once."""
        spec = self.resolve(name)
        if self._quiet or name in self._specs or name in self._told:
            return spec
        self._told.add(name)
        if spec.family is not None:
            # Shown by default: the user should know that cometbatch applies rules it infers.
            log.warning(
                "model %r is not listed: using the rules of its family %r (up to %d images "
                "per request); a models file (--models) can list it with its own",
                name,
                spec.family,
                spec.max_n,
            )
        else:
            log.warning(
                "model %r is not in cometbatch's registry: sending 1 image per request and "
                "passing parameters through unchecked",
                name,
            )
        return spec

    def quiet(self) -> ModelRegistry:
        """This registry without notices or warnings (a report is not a run)."""
        return ModelRegistry(self._specs.values(), self._families.values(), quiet=True)

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> ModelRegistry:
        """A new registry where each named model's fields are replaced (or a model is added);
        a name with * or ? changes (or adds) a family.

        `{"dall-e-2": {"max_n": 4}, "my-model": {"max_n": 4, "sizes": ["512x512"]}}`
        """
        specs, families = dict(self._specs), dict(self._families)
        for name, fields in overrides.items():
            table = families if is_pattern(name) else specs
            known = table.get(name) or (None if is_pattern(name) else self._member(name))
            data = known.model_dump() if known is not None else new_model_fields(fields)
            # Changed rules are no longer the data file's: say where they come from instead.
            data.update(source="model override", as_of=None, family=None)
            data.update(fields)
            data["name"] = name
            try:
                table[name] = ModelSpec.model_validate(data)
            except ValidationError as exc:
                problem = first_problem(exc)
                raise ConfigError(f"bad override for model {name!r}: {problem}") from None
        return ModelRegistry(specs.values(), families.values(), quiet=self._quiet)

    def _member(self, name: str) -> ModelSpec | None:
        family = self.family_of(name)
        return None if family is None else self.resolve(name)


def load_registry(
    models_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> ModelRegistry:
    """The built-in models, with a models file merged over them and then per-model overrides."""
    registry = ModelRegistry.from_file(models_file) if models_file else ModelRegistry()
    return registry.with_overrides(overrides or {})


def recorded_registry(settings: Any) -> ModelRegistry:
    """The quiet registry a run's recorded settings describe (its models file and overrides);
    the built-in rules when that file cannot be read any more (a report goes on)."""
    given = settings if isinstance(settings, Mapping) else {}
    models_file, overrides = given.get("models_file"), given.get("model_overrides")
    try:
        registry = load_registry(models_file if isinstance(models_file, str) else None)
    except ConfigError as exc:
        log.warning("%s; counting with the built-in model rules", exc)
        registry = ModelRegistry()
    return registry.with_overrides(overrides if isinstance(overrides, Mapping) else {}).quiet()


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


def __getattr__(name: str) -> tuple[ModelSpec, ...]:
    # BUILTIN_MODELS is read from the data file on first use, never at import.
    if name == "BUILTIN_MODELS":
        return tuple(builtin_catalog().models.values())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
