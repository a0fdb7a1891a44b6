"""The ledger file: stream its events, tolerate and repair a torn last line, stamp times."""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from ..errors import LedgerError

LEDGER_NAME = "ledger.jsonl"

_TAIL_CHUNK = 64 * 1024
_DECODER = json.JSONDecoder()
# json.loads makes a fresh string per value; sharing the few recurring ones saves memory
# across a million results.
_SHARED: dict[str, str] = {s: s for s in ("ok", "failed", "download_failed", "png", "jpeg", "webp")}


_T = TypeVar("_T")

_NONE = type(None)
_ABSENT = object()
# What the readers of a result line (resume, status, gallery, export, fetch) rely on: each
# field's JSON types when it is present, and what to call them in an error. A hand-edited
# line that differs is refused here, naming it, instead of failing inside one of them.
_RESULT_TYPES: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("key", (str,), "a string"),
    ("job_id", (str,), "a string"),
    ("chunk", (int,), "a whole number, 0 or more"),
    ("status", (str,), "a string"),
    ("n", (int,), "a whole number, 0 or more"),
    ("model", (str, _NONE), "a string or null"),
    ("fingerprint", (str, _NONE), "a string or null"),
    ("images", (list,), "a list of objects"),
    ("downloads", (list, _NONE), "a list of objects"),
    ("attempts", (int, float), "a number, 0 or more"),
    ("ambiguous_retries", (int, float), "a number, 0 or more"),
    ("rate_limited", (int,), "a whole number, 0 or more"),
    ("error", (dict, _NONE), "an object or null"),
    ("finished_at", (str, _NONE), "a string or null"),
)


# The same for each entry of `downloads` (a link still to download); index and url are
# required, tries and first_failed_at are absent from lines written before links were counted.
_DOWNLOAD_TYPES: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("index", (int,), "a whole number, 0 or more"),
    ("url", (str,), "a string"),
    ("tries", (int,), "a whole number, 0 or more"),
    ("first_failed_at", (str, _NONE), "a string or null"),
)
_DOWNLOAD_NEEDS = ("index", "url")
# The same for each entry of `images`: `url` (the link it was downloaded from) is absent from
# images that came inline and from lines written before links were kept.
_IMAGE_TYPES: tuple[tuple[str, tuple[type, ...], str], ...] = (("url", (str,), "a string"),)


def result_problem(event: dict[str, Any]) -> str | None:
    """What is wrong with the JSON types of a result event's fields, or None."""
    if "key" not in event or "status" not in event:
        return "a result needs its 'key' and 'status'"
    problem = _type_problem(event, _RESULT_TYPES, "the result's ")
    if problem is not None:
        return problem
    for at, image in enumerate(event.get("images") or ()):
        problem = _type_problem(image, _IMAGE_TYPES, f"the result's images[{at}] ")
        if problem is not None:
            return problem
    for at, item in enumerate(event.get("downloads") or ()):
        where = f"the result's downloads[{at}] "
        missing = [name for name in _DOWNLOAD_NEEDS if name not in item]
        if missing:
            return f"{where}has no {missing[0]!r}"
        problem = _type_problem(item, _DOWNLOAD_TYPES, where)
        if problem is not None:
            return problem
    return None


def _type_problem(
    fields: dict[str, Any], types: tuple[tuple[str, tuple[type, ...], str], ...], where: str
) -> str | None:
    """The first of `fields` present with a JSON type that `types` does not allow, or None."""
    for name, allowed, expected in types:
        value = fields.get(name, _ABSENT)
        if value is _ABSENT:
            continue
        kind = type(value)  # not isinstance: true and false are no numbers here
        if (
            kind not in allowed
            or (kind is int and value < 0)
            or (kind is list and any(type(item) is not dict for item in value))
        ):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:59] + "\u2026"
            return f"{where}{name!r} is {shown}, not {expected}"
    return None


def now_iso() -> str:
    """The ledger's timestamp format: UTC, milliseconds, a trailing Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _EventReader:
    """Streams (line number, event) from a ledger and notes whether its last line was torn."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.torn_tail = False

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        return self._reading(self._read())

    def _reading(self, items: Iterator[_T]) -> Iterator[_T]:
        """`items`, with an unreadable ledger (not a missing one) raised as LedgerError."""
        try:
            yield from items
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger {self.path}: {exc.strerror or exc}") from exc

    def _read(self) -> Iterator[tuple[int, dict[str, Any]]]:
        with open(self.path, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    # Only the last line can lack a newline: a crash mid-write, or a writer
                    # that is appending right now. Either way it is not a result yet.
                    event = self._parse_last(lineno, raw)
                    if event is not None:
                        yield lineno, event
                    return
                event = self._parse_line(lineno, raw)
                if event is not None:
                    yield lineno, event

    def _parse_line(self, lineno: int, raw: bytes) -> dict[str, Any] | None:
        """One newline-terminated line as an event (None if blank); LedgerError if it is not."""
        # raw_decode on str skips json.loads' encoding sniffing and wrappers, about a sixth
        # of the load time of a large ledger; anything unusual (blank line, leading space,
        # trailing text, bad UTF-8) takes the careful path below.
        try:
            text = raw.decode()
            event, end = _DECODER.raw_decode(text)
            if end != len(text) - 1:
                raise ValueError("not a lone JSON value")
        except ValueError:
            if not raw.strip():
                return None
            event = self._parse_strict(lineno, raw)
        if type(event) is not dict or "event" not in event:
            raise LedgerError(
                f"{self.path} line {lineno} is not a ledger event "
                "(a JSON object with an 'event' field)"
            )
        return self._checked(lineno, event)

    def _checked(self, lineno: int, event: dict[str, Any]) -> dict[str, Any]:
        """`event`, or a LedgerError naming its line if it is a result with a field of the
        wrong type."""
        if event["event"] == "result":
            problem = result_problem(event)
            if problem is not None:
                raise LedgerError(
                    f"{self.path} line {lineno} is not a valid 'result' event: {problem}"
                )
        return event

    def _parse_strict(self, lineno: int, raw: bytes) -> Any:
        """Parse a line with json.loads, naming the line when it is not JSON."""
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise LedgerError(f"{self.path} line {lineno} is not valid JSON: {exc}") from None

    def _parse_last(self, lineno: int, raw: bytes) -> dict[str, Any] | None:
        """Parse an unterminated last line, or note it as torn and return None."""
        if not raw.strip():
            return None
        event = _whole_event(raw)
        if event is None:
            self.torn_tail = True
            return None
        return self._checked(lineno, event)


# --- reading result lines fast --------------------------------------------------------------
#
# Decoding a million result lines with json costs seconds, almost all of it building dicts
# and strings that resume throws away. Lines in the shape this package writes are instead
# matched by one regular expression that accepts nothing json would refuse: it is only tried
# on lines without backslashes or raw control characters, where every JSON string is plain
# text between two quotes, and it spells out the JSON grammar of every value it skips over.
# Any other line (another writer's field order, escapes, deep nesting) takes the json path.

_READ_SIZE = 1 << 20
# Deleting these from a line leaves only its control characters and backslashes.
_PLAIN_BYTES = bytes(b for b in range(256) if b >= 0x20 and b != 0x5C)
_STR = rb'"[^"]*+"'
_INT = rb"-?(?:0|[1-9][0-9]*+)"
_NUM = _INT + rb"(?:\.[0-9]++)?(?:[eE][-+]?[0-9]++)?"


def _json_value(depth: int) -> bytes:
    """A pattern for one JSON value (of plain strings) nested at most `depth` deep."""
    # Alternatives that start with a fixed character are skipped at a glance when it does
    # not match; a number does not, so it comes last.
    if depth == 0:
        return rb"(?:null|" + _STR + rb"|true|false|" + _NUM + rb")"
    inner = _json_value(depth - 1)
    return (
        rb"(?:null|" + _STR
        + rb"|\{(?:" + _STR + rb":" + inner + rb"(?:," + _STR + rb":" + inner + rb")*+)?\}"
        + rb"|\[(?:" + inner + rb"(?:," + inner + rb")*+)?\]|true|false|" + _NUM + rb")"
    )  # fmt: skip


_VALUE = _json_value(3)
_IMAGE = (
    rb'\{"index":' + _INT + rb',"path":' + _STR + rb',"format":' + _STR + rb',"bytes":'
    + _INT + rb',"sha256":' + _STR + rb'(?:,"revised_prompt":(?:null|' + _STR + rb"))?"
    + rb'(?:,"url":' + _STR + rb")?\}"
)  # fmt: skip
# The `response` object of an answer: flat, names and scalar values (far smaller to compile than
# a general JSON value; anything else takes the slow path).
_SCALAR = rb"(?:" + _STR + rb"|" + _NUM + rb"|null)"
_FLAT = rb'\{(?:"[a-z_]{1,32}":' + _SCALAR + rb'(?:,"[a-z_]{1,32}":' + _SCALAR + rb")*+)?\}"
# A result line as this package writes it (older versions wrote no `rate_limited` or `cost`;
# `response` and `request_id` only when the answer gave them),
# for a request key `<job_id>#<chunk>` with a planner's fingerprint. Groups: the line, the
# key, the key's job id, status, fingerprint, n, and the error's JSON text.
_RESULT = (
    rb'(\{"event":"result","run_id":' + _STR
    + rb',"key":"(([^"]*)#(?:0|[1-9][0-9]*+))","job_id":"\3","chunk":' + _INT
    + rb',"status":"(ok|failed|download_failed)","fingerprint":"([0-9a-f]{16})"'
    + rb',"model":(?:null|' + _STR + rb'),"n":(0|[1-9][0-9]{0,8})'
    + rb',"images":\[(?:' + _IMAGE + rb"(?:," + _IMAGE + rb")*+)?\]"
    + rb'(?:,"downloads":\[\])?,"attempts":' + _NUM + rb',"ambiguous_retries":' + _NUM
    + rb'(?:,"rate_limited":' + _INT + rb")?"
    + rb',"error":(' + _VALUE + rb'),"latency_s":' + _NUM
    + rb',"finished_at":(?:null|' + _STR + rb'),"usage":' + _VALUE
    + rb'(?:,"response":' + _FLAT + rb')?(?:,"request_id":' + _STR + rb")?"
    + rb'(?:,"cost":' + _VALUE + rb")?"
    + rb',"metadata":' + _VALUE + rb"\}\n)"
)  # fmt: skip
_RESULT_LINE = re.compile(_RESULT)
# Every line of a block: a result line as above, or any other line (the last group).
_BLOCK_LINE = re.compile(_RESULT + rb"|([^\n]*+\n)")
_OTHER = operator.itemgetter(7)

# One line of a block as _BLOCK_LINE.findall gives it: the groups of _RESULT, then the text
# of a line that is not such a result (b"" where a group did not take part).
Row = tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes]


class _ResultScanner(_EventReader):
    """Streams a ledger as (line number, byte offset, item): item is a list of Rows for a run
    of consecutive result lines in this package's own shape, or else one line's event.

    After iterating, `end` is the offset just past the last whole line.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.end = 0

    def scan(self) -> Iterator[tuple[int, int, list[Row] | dict[str, Any]]]:
        """The items; raises like iterating an _EventReader."""
        return self._reading(self._scan())

    def _scan(self) -> Iterator[tuple[int, int, list[Row] | dict[str, Any]]]:
        lineno = 0
        offset = 0
        with open(self.path, "rb") as handle:
            for block in _whole_lines(handle):
                if not block.endswith(b"\n"):
                    event = self._parse_last(lineno + 1, block)
                    if event is not None:
                        yield lineno + 1, offset, event
                    return
                rows: list[Row] | None = None
                newlines = _plain_lines(block)
                if newlines:
                    rows = _BLOCK_LINE.findall(block)
                    # Each match ends with a newline, so as many matches as newlines means
                    # that no match ran on into the next line (through a quote left open).
                    if len(rows) != newlines:
                        rows = None
                if rows is None:
                    # bytes.splitlines would also split at a lone carriage return.
                    lines = block.split(b"\n")[:-1]
                    rows = [_line_row(line + b"\n") for line in lines]
                if not any(map(_OTHER, rows)):
                    yield lineno + 1, offset, rows
                else:
                    yield from self._split(rows, lineno, offset)
                lineno += len(rows)
                offset += len(block)
                self.end = offset

    def _split(
        self, rows: list[Row], lineno: int, offset: int
    ) -> Iterator[tuple[int, int, list[Row] | dict[str, Any]]]:
        """The items of a block that holds other lines too, in order."""
        start = 0
        for at, row in enumerate(rows):
            if row[7]:
                if start < at:
                    yield lineno + start + 1, offset, rows[start:at]
                    offset += sum(len(earlier[0]) for earlier in rows[start:at])
                event = self._parse_line(lineno + at + 1, row[7])
                if event is not None:
                    yield lineno + at + 1, offset, event
                offset += len(row[7])
                start = at + 1
        if start < len(rows):
            yield lineno + start + 1, offset, rows[start:]


def _line_row(line: bytes) -> Row:
    """The Row of one line, checked on its own (for blocks that are not plain throughout)."""
    if _plain_lines(line):
        found = _RESULT_LINE.fullmatch(line)
        if found is not None:
            return (*found.groups(), b"")  # type: ignore[return-value]
    return (b"", b"", b"", b"", b"", b"", b"", line)


def _whole_lines(handle: IO[bytes]) -> Iterator[bytes]:
    """The file in blocks of whole lines (the last block may be an unterminated line)."""
    carry: list[bytes] = []
    while data := handle.read(_READ_SIZE):
        cut = data.rfind(b"\n") + 1
        if not cut:
            carry.append(data)  # inside a line longer than a block
            continue
        carry.append(data[:cut])
        yield b"".join(carry) if len(carry) > 1 else carry[0]
        carry = [data[cut:]] if cut < len(data) else []
    if carry:
        yield b"".join(carry)


def _plain_lines(data: bytes) -> int:
    """How many lines `data` holds if it is plain (UTF-8 without backslashes or control
    characters besides newlines); 0 if it is not."""
    rest = data.translate(None, _PLAIN_BYTES)
    if rest.count(b"\n") != len(rest):
        return 0
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return 0
    return len(rest)


def iter_events(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream (line number, event) from a ledger, skipping blank lines and a torn last line."""
    return iter(_EventReader(Path(path)))


def _whole_event(tail: bytes) -> dict[str, Any] | None:
    """An unterminated tail as an event, if it is a whole one that only lacks its newline."""
    try:
        event = json.loads(tail)
    except ValueError:
        return None
    return event if type(event) is dict and "event" in event else None


def repair_tail(path: Path) -> bool:
    """Make the ledger end with a newline, dropping a torn last line; True if it changed."""
    try:
        with open(path, "r+b") as handle:
            return _repair_open(handle)
    except FileNotFoundError:
        return False


def _repair_open(handle: IO[bytes]) -> bool:
    """`repair_tail` on an open file."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return False
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return False
    cut = _after_last_newline(handle, size)
    handle.seek(cut)
    if _whole_event(handle.read()) is not None:
        # A whole event that lost only its newline is a result worth keeping.
        handle.seek(size)
        handle.write(b"\n")
    else:
        handle.truncate(cut)
    handle.flush()
    os.fsync(handle.fileno())
    return True


def _after_last_newline(handle: IO[bytes], size: int) -> int:
    """Offset just after the last newline in the file (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        handle.seek(start)
        found = handle.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0
