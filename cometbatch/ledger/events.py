"""The one ledger reader: typed events streamed in order, a torn last line tolerated, repaired."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from ..errors import LedgerError
from ..store.interface import Store
from ..store.urls import store_of
from ._scan import OTHER, SENT_START, Row, all_results, block_rows, line_length, whole_lines
from .lines import LedgerEvent, result_problem, typed

LEDGER_NAME = "ledger.jsonl"
# A dataset shard committed: its samples' images left staging (readers that do not know it
# skip it, as every reader skips unknown events).
SHARD_EVENT = "shard"

_TAIL_CHUNK = 64 * 1024
_DECODER = json.JSONDecoder()
_T = TypeVar("_T")


def now_iso() -> str:
    """The ledger's timestamp format: UTC, milliseconds, a trailing Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ledger_path(out: Store | str | os.PathLike[str]) -> Path:
    """A local file holding OUT's ledger (on an object store, a copy merged from its
    segments); LedgerError when nothing has run there yet."""
    store = store_of(out)
    shown = out if isinstance(out, str | os.PathLike) else store.root
    try:
        found = store.log_copy(LEDGER_NAME)
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger of {shown}: {exc.strerror or exc}") from exc
    if found is None:
        raise LedgerError(f"{shown} has no {LEDGER_NAME}: nothing has run there yet")
    return Path(found)


class LedgerReader:
    """Reads one ledger file: its typed events in order, or (`scan`) the index's fast form."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Whether the last line was torn (a crash mid-write, or a write under way).
        self.torn_tail = False
        # After `scan`: the offset just past the last whole line.
        self.end = 0

    def __repr__(self) -> str:
        return f"<LedgerReader {str(self.path)!r} torn_tail={self.torn_tail}>"

    def __iter__(self) -> Iterator[LedgerEvent]:
        return self._reading(self._read())

    def scan(self) -> Iterator[tuple[int, int, list[Row] | LedgerEvent]]:
        """(line, byte offset, Rows of own-shape result and sent lines in a row, or one event)."""
        return self._reading(self._scan())

    def _reading(self, items: Iterator[_T]) -> Iterator[_T]:
        """`items`, with an unreadable ledger (not a missing one) raised as LedgerError."""
        try:
            yield from items
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger {self.path}: {exc.strerror or exc}") from exc

    def _read(self) -> Iterator[LedgerEvent]:
        with open(self.path, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    # Only the last line can lack a newline: a crash mid-write, or a writer
                    # that is appending right now. Either way it is not a result yet.
                    event = self._parse_last(lineno, raw)
                    if event is not None:
                        yield typed(lineno, event)
                    return
                event = self._parse_line(lineno, raw)
                if event is not None:
                    yield typed(lineno, event)

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
        """`event`, or a LedgerError naming its line: a result with a field of a wrong type."""
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

    def _scan(self) -> Iterator[tuple[int, int, list[Row] | LedgerEvent]]:
        lineno = 0
        offset = 0
        with open(self.path, "rb") as handle:
            for block in whole_lines(handle):
                if not block.endswith(b"\n"):
                    event = self._parse_last(lineno + 1, block)
                    if event is not None:
                        yield lineno + 1, offset, typed(lineno + 1, event)
                    return
                rows = block_rows(block)
                if all_results(rows):
                    yield lineno + 1, offset, rows
                else:
                    yield from self._split(rows, lineno, offset)
                lineno += len(rows)
                offset += len(block)
                self.end = offset

    def _split(
        self, rows: list[Row], lineno: int, offset: int
    ) -> Iterator[tuple[int, int, list[Row] | LedgerEvent]]:
        """The items of a block that holds other lines too, in order."""
        # `sent` lines stay among the result lines (the index reads both a block at a time,
        # and reads one not in this package's shape in full); any other line is read alone.
        start = 0
        for at, row in enumerate(rows):
            if row[OTHER] and not row[OTHER].startswith(SENT_START):
                if start < at:
                    yield lineno + start + 1, offset, rows[start:at]
                    offset += sum(map(line_length, rows[start:at]))
                event = self._parse_line(lineno + at + 1, row[OTHER])
                if event is not None:
                    yield lineno + at + 1, offset, typed(lineno + at + 1, event)
                offset += len(row[OTHER])
                start = at + 1
        if start < len(rows):
            yield lineno + start + 1, offset, rows[start:]


def read_events(path: Path) -> Iterator[LedgerEvent]:
    """Stream a ledger's typed events, skipping blank lines and a torn last line."""
    return iter(LedgerReader(Path(path)))


def iter_events(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """`read_events` as (line number, the line's fields)."""
    return ((event.line, event.fields) for event in read_events(path))


def event_at(path: Path, offset: int) -> dict[str, Any]:
    """The fields of the ledger line at byte `offset`; OSError or ValueError if none is there."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        raw = handle.readline()
    event = json.loads(raw)
    if type(event) is not dict or "event" not in event:
        raise ValueError("not a ledger event")
    return event


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
