"""Result lines in this package's own shape matched by one regular expression, a block at a time."""

# Decoding a million result lines with json costs seconds, almost all of it building dicts
# and strings that resume throws away. Lines in the shape this package writes are instead
# matched by one regular expression that accepts nothing json would refuse: it is only tried
# on lines without backslashes or raw control characters, where every JSON string is plain
# text between two quotes, and it spells out the JSON grammar of every value it skips over.
# Any other line (another writer's field order, escapes, deep nesting) takes the json path.

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from functools import cache
from typing import IO

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


# A `sent` line as this package writes it. Groups: the run id, the key and n.
_SENT = (
    rb'\{"event":"sent","run_id":"([^"]*)","key":"([^"]*)","attempt":' + _INT
    + rb',"n":(0|[1-9][0-9]{0,8}),"sent_at":' + _STR + rb"\}\n"
)  # fmt: skip
SENT_START = b'{"event":"sent",'


# Compiling these takes a good part of a second: on first use, never at import.
@cache
def result_line() -> re.Pattern[bytes]:
    """The pattern of one result line in this package's own shape."""
    return re.compile(_RESULT)


@cache
def _block_line() -> re.Pattern[bytes]:
    """Every line of a block: a result line as above, or any other line (the last group)."""
    return re.compile(_RESULT + rb"|([^\n]*+\n)")


# One line of a block as _block_line().findall gives it: the groups of _RESULT, then the text
# of a line that is not such a result (b"" where a group did not take part).
Row = tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes]
# Where a Row holds the text of a line that is not a result in this package's shape.
OTHER = 7
_OTHER = operator.itemgetter(OTHER)


@cache
def _sent_line() -> re.Pattern[bytes]:
    return re.compile(_SENT)


def sent_fields(line: bytes) -> tuple[str, str, int] | None:
    """(run id, key, n) of a `sent` line in this package's shape; None for any other line."""
    # Only plain lines (no escapes, no control characters): their strings are the text
    # between the quotes, exactly as json would read them.
    if not line.startswith(SENT_START) or line.translate(None, _PLAIN_BYTES) != b"\n":
        return None
    found = _sent_line().fullmatch(line)
    if found is None:
        return None
    run_id, key, n = found.groups()
    try:
        return run_id.decode(), key.decode(), int(n)
    except UnicodeDecodeError:
        return None


def block_rows(block: bytes) -> list[Row]:
    """The Rows of a block of whole lines, one per line."""
    newlines = _plain_lines(block)
    if newlines:
        rows: list[Row] = _block_line().findall(block)
        # Each match ends with a newline, so as many matches as newlines means that no
        # match ran on into the next line (through a quote left open).
        if len(rows) == newlines:
            return rows
    # bytes.splitlines would also split at a lone carriage return.
    return [_line_row(line + b"\n") for line in block.split(b"\n")[:-1]]


def all_results(rows: list[Row]) -> bool:
    """Whether every Row is a result line in this package's shape."""
    return not any(map(_OTHER, rows))


def line_length(row: Row) -> int:
    """The length of a Row's line, whichever group holds it."""
    return len(row[0]) + len(row[OTHER])


def _line_row(line: bytes) -> Row:
    """The Row of one line, checked on its own (for blocks that are not plain throughout)."""
    if _plain_lines(line):
        found = result_line().fullmatch(line)
        if found is not None:
            return (*found.groups(), b"")  # type: ignore[return-value]
    return (b"", b"", b"", b"", b"", b"", b"", line)


def whole_lines(handle: IO[bytes]) -> Iterator[bytes]:
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
    """Lines in `data` if it is plain (UTF-8, no backslash, no control but newline), else 0."""
    rest = data.translate(None, _PLAIN_BYTES)
    if rest.count(b"\n") != len(rest):
        return 0
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return 0
    return len(rest)
