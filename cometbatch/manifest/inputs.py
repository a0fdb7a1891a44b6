"""Manifest readers for plain text (a prompt per line) and CSV (a prompt column), streamed."""

# Each reader turns records into the field dicts a JSONL line holds and hands them to the one
# validation (manifestlines.job_from_data): errors name line and field as JSONL errors do.

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError, ManifestError, ManifestProblem
from ..models.registry import PARAMS

if TYPE_CHECKING:
    from .job import Job

__all__ = [
    "FORMATS",
    "SUFFIXES",
    "BuildJob",
    "CsvJobs",
    "Reader",
    "TextPrompts",
    "input_format",
    "reader_for",
]

FORMATS = ("jsonl", "txt", "csv")
# A file's format from its suffix; anything else is read as JSONL (as it always was).
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "txt", ".csv": "csv"}

# Validates one line's fields (defaults filled in) as a Job, or raises ManifestError.
BuildJob = Callable[[dict[str, Any], int], "Job"]


class Reader(Protocol):
    """How a manifest format is read: physical lines into records, a record into a Job."""

    def records(self, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
        """(first line number, raw text) of each record, from numbered physical lines."""
        ...

    def parse(self, text: str, number: int) -> Job | None:
        """One record as a Job (None for blank and comment records); ManifestError if bad."""
        ...


def input_format(path: Path, format: str | None = None) -> str:
    """The format to read `path` as: `format` if given, else by suffix (default JSONL)."""
    if format is None:
        return SUFFIXES.get(path.suffix.lower(), "jsonl")
    if format not in FORMATS:
        raise ConfigError(f"unknown manifest format {format!r}; formats: {', '.join(FORMATS)}")
    return format


def reader_for(format: str, build: BuildJob) -> Reader | None:
    """The reader for a format other than JSONL (None: the manifest parses JSONL itself)."""
    if format == "txt":
        return TextPrompts(build)
    if format == "csv":
        return CsvJobs(build)
    return None


class TextPrompts:
    """A text file: each line that is not blank or a '#' comment is one prompt."""

    # Model, size and n come from the defaults (--model, --size, --n) for every line.

    def __init__(self, build: BuildJob) -> None:
        self._build = build

    def records(self, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
        """Every line is a record."""
        return lines

    def parse(self, text: str, number: int) -> Job | None:
        """The line's text (trimmed) as the prompt of a job."""
        prompt = text.strip()
        if not prompt or prompt.startswith("#"):
            return None
        if prompt.startswith("{") and prompt.endswith("}") and _is_json_object(prompt):
            # A JSONL manifest named .txt would otherwise send its JSON as prompts (and pay).
            raise ManifestError(
                [
                    ManifestProblem(
                        number,
                        None,
                        "this is a JSON object, not a prompt: name a JSONL manifest .jsonl "
                        "(or pass format='jsonl')",
                    )
                ]
            )
        return self._build({"prompt": prompt}, number)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


# CSV columns: the job fields by name, and metadata.<key> / extra.<key> for those objects.
_FIELDS = ("id", "prompt", "model", "n", *PARAMS)
_INTEGER_FIELDS = frozenset({"n", "output_compression"})
_GROUPS = ("metadata", "extra")
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
# Longer digit strings stay text: Python refuses to convert more than 4300 digits.
_MAX_DIGITS = 100


def _integer(value: str) -> int | str:
    """A whole number as an int; anything else stays text for validation to name."""
    if len(value) <= _MAX_DIGITS and _INTEGER.fullmatch(value):
        return int(value)
    return value


def _scalar(value: str) -> Any:
    """An extra.<key> cell: JSON numbers and true/false as such, anything else as text."""
    if value in ("true", "false"):
        return value == "true"
    if len(value) > _MAX_DIGITS or not _NUMBER.fullmatch(value):
        return value
    if _INTEGER.fullmatch(value):
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else value


def _unknown_column(label: str) -> str:
    guess = difflib.get_close_matches(label.lower(), _FIELDS, n=1)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    return (
        f"unknown column{hint}; name it 'extra.{label}' to send it to the API as is, or "
        f"'metadata.{label}' to carry it into the ledger"
    )


# A column: its header label, where its value goes ("" for an ignored column) and, for
# metadata.<key> and extra.<key>, the key.
_Column = tuple[str, str, str]


class CsvJobs:
    """A CSV file: a header naming job fields (`prompt` at least), metadata.<k>, extra.<k>."""

    # Empty cells are absent fields (defaults apply). An error names the physical line a record
    # starts on, also when quoted values span lines. The header's commas, else semicolons or
    # tabs, decide the delimiter.

    def __init__(self, build: BuildJob) -> None:
        self._build = build
        self._delimiter = ","
        self._columns: list[_Column] | None = None
        self._header_line = 0
        self._header_problems: list[ManifestProblem] = []
        # The row records() read for the record it yielded last (parse() takes it instead of
        # reading the record again); None when it could not be read.
        self._read: tuple[int, list[str] | None] = (0, None)

    def records(self, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
        """Each CSV record's first line number and raw text; reads the header on the way."""
        self._columns = None
        self._header_line = 0
        self._header_problems = []
        for number, text in lines:
            if text.strip():
                self._delimiter = _delimiter(text)
                lines = itertools.chain([(number, text)], lines)
                break
            yield number, text  # a blank line before the header
        else:
            return
        pending: list[tuple[int, str]] = []

        def feed() -> Iterator[str]:
            for item in lines:
                pending.append(item)
                yield item[1]

        reader = csv.reader(feed(), delimiter=self._delimiter, strict=True)
        while True:
            try:
                row: list[str] | None = next(reader)
            except StopIteration:
                return
            except csv.Error:
                row = None  # parse() reads the record again and names the problem
            if not pending:
                return
            first = pending[0][0]
            text = "".join(part for _, part in pending)
            pending.clear()
            if self._columns is None:
                self._read_header(row, text, first)
            self._read = (first, row)
            yield first, text

    def _read_header(self, row: list[str] | None, text: str, line: int) -> None:
        self._header_line = line
        self._columns = []
        if row is None:
            try:
                self._row(text, line)
            except ManifestError as exc:
                self._header_problems = list(exc.problems)
            return
        problems = self._header_problems
        seen: dict[str, int] = {}
        for index, raw in enumerate(row, start=1):
            label = raw.strip()
            target, key = "", ""
            group, dot, rest = label.partition(".")
            if not label:
                pass  # an unnamed column: its cells must stay empty
            elif label in seen:
                problems.append(
                    ManifestProblem(line, label, f"column {index} repeats column {seen[label]}")
                )
            elif dot and group in _GROUPS:
                if rest:
                    target, key = group, rest
                else:
                    problems.append(ManifestProblem(line, label, "no key after the dot"))
            elif label in _FIELDS:
                target = label
            else:
                problems.append(ManifestProblem(line, label, _unknown_column(label)))
            seen.setdefault(label, index)
            self._columns.append((label, target, key))
        if "prompt" not in seen:
            problems.append(ManifestProblem(line, "prompt", "the header has no 'prompt' column"))

    def _row(self, text: str, line: int) -> list[str]:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self._delimiter, strict=True)
        try:
            rows = list(reader)
        except csv.Error as exc:
            message = (
                "a quoted value is not closed (it runs to the end of the file)"
                if "unexpected end of data" in str(exc)
                else f"not valid CSV: {exc}"
            )
            raise ManifestError([ManifestProblem(line, None, message)]) from None
        return rows[0] if rows else []

    def parse(self, text: str, number: int) -> Job | None:
        """One record as a job; the header and blank records give None."""
        if number == self._header_line:
            if self._header_problems:
                raise ManifestError(list(self._header_problems))
            return None
        # Without a usable header no row can be read; the header's problems say why.
        if not text.strip() or self._columns is None or self._header_problems:
            return None
        read_at, row = self._read
        if read_at != number or row is None:
            row = self._row(text, number)  # a record read apart, or one that names its error
        columns = self._columns
        if any(cell.strip() for cell in row[len(columns) :]):
            message = f"{len(row)} values, but the header names {len(columns)} columns"
            raise ManifestError([ManifestProblem(number, None, message)])
        data: dict[str, Any] = {}
        for index, ((label, target, key), cell) in enumerate(
            zip(columns, row, strict=False), start=1
        ):
            value = cell.strip()
            if not value:
                continue
            if not label:
                message = f"a value in column {index}, which has no name in the header"
                raise ManifestError([ManifestProblem(number, None, message)])
            if target == "metadata":
                data.setdefault("metadata", {})[key] = value
            elif target == "extra":
                data.setdefault("extra", {})[key] = _scalar(value)
            elif target in _INTEGER_FIELDS:
                data[target] = _integer(value)
            elif target:
                data[target] = value
        if not data:
            return None
        return self._build(data, number)


def _delimiter(header: str) -> str:
    """Comma, unless the header has none and uses semicolons (European Excel) or tabs."""
    if "," in header:
        return ","
    if ";" in header:
        return ";"
    return "\t" if "\t" in header else ","
