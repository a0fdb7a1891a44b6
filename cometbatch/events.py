"""The ledger file: stream its events, tolerate and repair a torn last line, stamp times."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .errors import LedgerError

LEDGER_NAME = "ledger.jsonl"

_TAIL_CHUNK = 64 * 1024
_DECODER = json.JSONDecoder()
# json.loads makes a fresh string per value; sharing the few recurring ones saves memory
# across a million results.
_SHARED: dict[str, str] = {s: s for s in ("ok", "failed", "download_failed", "png", "jpeg", "webp")}


def now_iso() -> str:
    """The ledger's timestamp format: UTC, milliseconds, a trailing Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _EventReader:
    """Streams (line number, event) from a ledger and notes whether its last line was torn."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.torn_tail = False

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            yield from self._read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger {self.path}: {exc.strerror or exc}") from exc

    def _read(self) -> Iterator[tuple[int, dict[str, Any]]]:
        raw_decode = _DECODER.raw_decode
        with open(self.path, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    # Only the last line can lack a newline: a crash mid-write, or a writer
                    # that is appending right now. Either way it is not a result yet.
                    event = self._parse_last(lineno, raw)
                    if event is not None:
                        yield lineno, event
                    return
                # raw_decode on str skips json.loads' encoding sniffing and wrappers, about
                # a sixth of the load time of a large ledger; anything unusual (blank line,
                # leading space, trailing text, bad UTF-8) takes the careful path below.
                try:
                    text = raw.decode()
                    event, end = raw_decode(text)
                    if end != len(text) - 1:
                        raise ValueError("not a lone JSON value")
                except ValueError:
                    if not raw.strip():
                        continue
                    event = self._parse_strict(lineno, raw)
                if type(event) is not dict or "event" not in event:
                    raise LedgerError(
                        f"{self.path} line {lineno} is not a ledger event "
                        "(a JSON object with an 'event' field)"
                    )
                yield lineno, event

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
        return event


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
