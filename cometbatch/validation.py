"""Pydantic's validation errors as plain messages: where, and what is wrong, in words a person
can act on (no "Value error," prefixes, no links to pydantic's pages, no type names)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError
from pydantic_core import ErrorDetails

__all__ = ["Problem", "first_problem", "plain_message", "problems"]

# What pydantic puts before the text of an error a validator raised.
_PREFIXES = ("Value error, ", "Assertion failed, ")


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation problem: the dotted path of the field ('' for the whole object), what
    is wrong, pydantic's error type (to tell e.g. an unknown field), and the value given."""

    where: str
    message: str
    kind: str
    given: object = None

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def plain_message(error: ErrorDetails) -> str:
    """An error's message without pydantic's prefixes."""
    message = error["msg"]
    for prefix in _PREFIXES:
        message = message.removeprefix(prefix)
    return message


def problems(exc: ValidationError, names: Mapping[str, str] | None = None) -> list[Problem]:
    """Every problem of `exc`; `names` renames a top-level field as the user typed it (a
    Settings field as its command-line option, say)."""
    found = []
    # include_url=False: the links are pydantic's documentation, not the user's problem.
    for error in exc.errors(include_url=False):
        parts = [str(part) for part in error["loc"]]
        if parts and names and parts[0] in names:
            parts[0] = names[parts[0]]
        found.append(Problem(".".join(parts), plain_message(error), error["type"], error["input"]))
    return found


def first_problem(exc: ValidationError, names: Mapping[str, str] | None = None) -> Problem:
    """The first problem of `exc` (one line is what a setting's error shows)."""
    return problems(exc, names)[0]
