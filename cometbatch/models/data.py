"""Model capabilities as data: the built-in `models.toml` and users' files of the same shape.

A user's file is merged over the built-in data entry by entry (each field it gives replaces
the built-in one); `like` is resolved after merging, so an entry follows the changes made to
the one it is like. Nothing is read at import: `builtin_catalog` reads the package's file once.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, partial
from importlib import resources
from typing import Any

from pydantic import ValidationError

from ..errors import ModelsError
from ..validation import first_problem
from .datafile import read_data_file
from .spec import ModelSpec

__all__ = [
    "BUILTIN_SOURCE",
    "Catalog",
    "builtin_catalog",
    "is_pattern",
    "load_catalog",
    "new_model_fields",
]

BUILTIN_SOURCE = "cometbatch/models.toml"
_KINDS = ("models", "families")
# Fields of a file's entry that are not rules: where they come from, and what they start from.
_PROVENANCE = frozenset({"source", "as_of"})
# Set by the table's own name, never by a field.
_RESERVED = frozenset({"name", "family"})
_ALLOWED = frozenset(ModelSpec.model_fields) - _RESERVED


def is_pattern(name: str) -> bool:
    """Whether `name` is a shell-style family pattern (`gpt-image-*`) rather than a model name."""
    return any(char in name for char in "*?[")


def new_model_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """What a model nothing describes starts from, before its own `fields`: one image per
    request, and parameters passed through unchecked unless it declares them (`params`)."""
    return {"max_n": 1, "known": "params" in fields}


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every model and family the data describes, and the user files merged into it."""

    models: Mapping[str, ModelSpec]
    families: Mapping[str, ModelSpec]
    sources: tuple[str, ...] = ()


# Raw entries by kind ("models", "families") and name, before `like` is resolved.
Raw = dict[str, dict[str, dict[str, Any]]]


@cache
def _builtin_raw() -> Raw:
    text = resources.files("cometbatch.models").joinpath("models.toml").read_text(encoding="utf-8")
    return _merge({kind: {} for kind in _KINDS}, {}, tomllib.loads(text), None)


@cache
def builtin_catalog() -> Catalog:
    """The models and families shipped with cometbatch (read once, on first use)."""
    return _resolve(_builtin_raw(), {})


def load_catalog(*paths: str | os.PathLike[str]) -> Catalog:
    """The built-in data with each TOML file in `paths` merged over it, in order."""
    if not paths:
        return builtin_catalog()
    raw: Raw = {kind: dict(entries) for kind, entries in _builtin_raw().items()}
    origins: dict[tuple[str, str], str] = {}
    for path in paths:
        source = str(path)
        data = read_data_file(path, partial(ModelsError, source=source))
        raw = _merge(raw, origins, data, source)
    return _resolve(raw, origins, tuple(str(path) for path in paths))


def _merge(raw: Raw, origins: dict[tuple[str, str], str], data: Any, source: str | None) -> Raw:
    """`raw` with a file's entries merged in; `origins` learns which file set each entry."""
    where = source or BUILTIN_SOURCE
    for key in data:
        if key not in _KINDS:
            raise ModelsError(
                "unknown entry (expected models or families)", source=where, entry=key
            )
    merged = {kind: dict(raw[kind]) for kind in _KINDS}
    for kind in _KINDS:
        tables = data.get(kind, {})
        if not isinstance(tables, Mapping):
            raise ModelsError("must be a table of entries", source=where, entry=kind)
        for name, fields in tables.items():
            entry = f"{kind}.{name}"
            _check_entry(kind, name, fields, where, entry)
            own = dict(fields)
            if source is not None:
                # Rules changed by a user's file come from that file unless it says otherwise.
                own.setdefault("source", source)
                own.setdefault("as_of", None)
                origins[(kind, name)] = source
            merged[kind][name] = {**merged[kind].get(name, {}), **own}
    return merged


def _check_entry(kind: str, name: str, fields: Any, source: str, entry: str) -> None:
    if not isinstance(fields, Mapping):
        raise ModelsError("must be a table of fields", source=source, entry=entry)
    if kind == "families" and not is_pattern(name):
        raise ModelsError(
            "a family is a pattern with * or ? (e.g. gpt-image-*); list one model under "
            "[models.NAME]",
            source=source,
            entry=entry,
        )
    if kind == "models" and is_pattern(name):
        raise ModelsError(
            'a model name cannot hold * ? or [; a pattern goes under [families."PATTERN"]',
            source=source,
            entry=entry,
        )
    for field in fields:
        if field in _RESERVED or (field not in _ALLOWED and field != "like"):
            close = difflib.get_close_matches(field, sorted(_ALLOWED), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModelsError(f"unknown field{hint}", source=source, entry=f"{entry}.{field}")


def _resolve(
    raw: Raw, origins: Mapping[tuple[str, str], str], sources: tuple[str, ...] = ()
) -> Catalog:
    """Every entry as a ModelSpec, with `like` followed; ModelsError naming the entry if bad."""
    specs: dict[str, dict[str, ModelSpec]] = {kind: {} for kind in _KINDS}
    for kind in _KINDS:
        for name in raw[kind]:
            where = origins.get((kind, name), BUILTIN_SOURCE)
            fields = _fields(raw, kind, name, (), where)
            try:
                specs[kind][name] = ModelSpec.model_validate({**fields, "name": name})
            except ValidationError as exc:
                first = first_problem(exc)
                entry = f"{kind}.{name}.{first.where}".rstrip(".")
                raise ModelsError(first.message, source=where, entry=entry) from None
    return Catalog(specs["models"], specs["families"], sources)


def _fields(
    raw: Raw, kind: str, name: str, seen: tuple[tuple[str, str], ...], where: str
) -> dict[str, Any]:
    """One entry's fields, on top of those of the entry it is `like` (recursively)."""
    entry = raw[kind][name]
    like = entry.get("like")
    if like is None:
        base = new_model_fields(entry)
    else:
        target = _like_target(raw, like, where, f"{kind}.{name}.like")
        if target in (*seen, (kind, name)):
            chain = " -> ".join(".".join(step) for step in (*seen, (kind, name), target))
            raise ModelsError(f"a loop: {chain}", source=where, entry=f"{kind}.{name}.like")
        inherited = _fields(raw, *target, (*seen, (kind, name)), where)
        base = {key: value for key, value in inherited.items() if key not in _PROVENANCE}
    base.update({key: value for key, value in entry.items() if key != "like"})
    return base


def _like_target(raw: Raw, like: Any, where: str, entry: str) -> tuple[str, str]:
    if isinstance(like, str):
        for kind in _KINDS:
            if like in raw[kind]:
                return kind, like
    raise ModelsError(f"no entry named {like!r} to be like", source=where, entry=entry)
