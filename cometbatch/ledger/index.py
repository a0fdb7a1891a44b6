"""The per-key index of a ledger: what resume and `status` need, following the writer's appends."""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from itertools import accumulate, islice
from pathlib import Path
from typing import Any

from ..errors import LedgerError
from ._keytable import KeyTable, encode_key, guess_rows
from ._scan import OTHER, Row, all_results, line_length, result_line, sent_fields
from .events import SHARD_EVENT, LedgerReader
from .keystate import KeyState as KeyState  # also imported from here (the writer, the sender)

_NOTHING_AHEAD = (b"", 0)


class LedgerState(KeyTable):
    """The latest result per key, plus counts; what resume and `status` need from a ledger."""

    __slots__ = (
        "_ahead",
        "_end",
        "_following",
        "_sent",
        "last_end",
        "last_run",
        "last_shard",
        "packed",
        "runs",
        "shards",
        "torn_tail",
    )

    def __init__(self) -> None:
        super().__init__()
        # While following, lines appended to the ledger later are found at _end (the first
        # line not yet accounted for), so their rows point there too.
        self._following = False
        self._end = 0
        # Lines read past _end but not yet recorded: the bytes, and where the next one starts.
        self._ahead = _NOTHING_AHEAD
        self.runs = 0
        self.torn_tail = False
        self.last_run: dict[str, Any] | None = None
        self.last_end: dict[str, Any] | None = None
        # Keys whose images a committed shard holds (their files left staging), and the
        # shard events (less their samples): a key's later result line takes it out again.
        self.packed: set[str] = set()
        self.shards: list[dict[str, Any]] = []
        # The latest shard event whole: a run killed while removing its staging left some.
        self.last_shard: dict[str, Any] | None = None
        # Keys whose latest line is a `sent` (no result after it): key -> (run_id, images).
        self._sent: dict[str, tuple[str, int]] = {}

    def __repr__(self) -> str:
        return (
            f"<LedgerState keys={len(self)} ok={self._counts.get('ok', 0)} "
            f"failed={self._counts.get('failed', 0)} runs={self.runs} results={self.results}>"
        )

    def apply(self, event: dict[str, Any], line: bytes | None = None) -> None:
        """Fold one event (`line`: as the Ledger appended it) in; KeyError/TypeError if bad."""
        kind = event["event"]
        if kind == "result":
            self._record(KeyState.from_event(event), line)
            return
        if kind == "run":
            self.runs += 1
            self.last_run = event
        elif kind == "end":
            self.last_end = event
        elif kind == SHARD_EVENT:
            # Without its samples: a million images would hold their every field here.
            self.shards.append({name: v for name, v in event.items() if name != "samples"})
            self.last_shard = event
            self.packed.update(str(sample["key"]) for sample in event["samples"])
        elif kind == "sent":
            self._sent[_text(event, "key")] = (_text(event, "run_id"), _count(event))
        # Unknown event kinds are left alone so older versions can read newer ledgers.
        self._follow(None, line)

    def _record(self, state: KeyState, line: bytes | None = None) -> None:
        """Replace the state of its key (the Ledger calls this once its line is written)."""
        # With `line`, the bytes the Ledger appended, its offset is known without reading the
        # file back; the Ledger has checked (`_appended`) that its write landed at our end.
        offset = self._follow(state.key, line)
        self._put(state, offset)
        self._answered(state.key)

    def _answered(self, key: str) -> None:
        """A result line for `key`: no longer sent without an answer, nor packed (a key
        recorded again after its shard has new images in staging)."""
        self._sent.pop(key, None)
        self.packed.discard(key)

    def unanswered(self, run_id: str | None = None) -> dict[str, tuple[str, int]]:
        """Keys sent with no result since, by runs other than `run_id`: key -> (run, images)."""
        return {key: sent for key, sent in self._sent.items() if sent[0] != run_id}

    # -- following appends ------------------------------------------------------------------

    def _appended(self, size: int, end: int | None) -> None:
        """Note an append of `size` bytes ending at `end`; stop following if it is not ours."""
        # Once not following, states are kept whole in memory instead of as offsets.
        if self._following and end != self._end + size:
            self._following = False
            self._ahead = _NOTHING_AHEAD

    def _follow(self, key: str | None, line: bytes | None = None) -> int:
        """The offset of the line just appended for `key` (None: not a result), or -1."""
        # The Ledger writes each line before it records it, in order, so the next unread
        # line is the one being recorded (given as `line`, or read back); if it is not
        # (another writer), following stops and states are kept whole in memory instead.
        if not self._following:
            return -1
        start = self._end
        if line is not None:
            self._end = start + len(line)
            return start
        line = self._next_line()
        if line is not None and _line_is(line, key):
            self._end = start + len(line)
            return start
        self._following = False
        self._ahead = _NOTHING_AHEAD
        return -1

    def _next_line(self) -> bytes | None:
        """The next whole line after `_end`; a batch of lines is read in one go."""
        ahead, at = self._ahead
        cut = ahead.find(b"\n", at) + 1
        if not cut:
            assert self._path is not None
            try:
                with open(self._path, "rb") as handle:
                    handle.seek(self._end)
                    ahead, at = handle.read(), 0
            except OSError:
                return None
            cut = ahead.find(b"\n") + 1
            if not cut:
                return None
        self._ahead = (ahead, cut)
        return ahead[at:cut]

    @classmethod
    def load(cls, path: Path) -> LedgerState:
        """Read a ledger without locking it (a missing file is an empty ledger)."""
        self = cls()
        self._path = path = Path(path)
        scanner = LedgerReader(path)
        # Sized once, from the file's size, where the first block shows the lines' length.
        sized = False
        # A million results create objects with no cycles among them; automatic collections
        # would rescan them again and again for nothing.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for lineno, offset, item in scanner.scan():
                if isinstance(item, list):
                    if not sized:
                        self._reserve(guess_rows(path, item))
                        sized = True
                    self._load_rows(item, lineno, offset)
                else:
                    self._load_event(item.fields, lineno, offset)
        except FileNotFoundError:
            pass
        finally:
            if gc_was_enabled:
                gc.enable()
        self.torn_tail = scanner.torn_tail
        # Lines appended from here on (by a Ledger holding the lock) are followed.
        self._end = scanner.end
        self._following = True
        return self

    def _load_rows(self, rows: list[Row], lineno: int, offset: int) -> None:
        offsets: Sequence[int]
        linenos: Sequence[int]
        if all_results(rows):
            if self._sent or self.packed:
                for row in rows:
                    self._answered(row[1].decode("utf-8", "surrogatepass"))
            lengths = accumulate((len(row[0]) for row in rows), initial=offset)
            offsets = list(islice(lengths, len(rows)))
            linenos = range(lineno, lineno + len(rows))
        else:
            rows, offsets, linenos = self._take_sent(rows, lineno, offset)
        while rows:
            done = self._put_rows(rows, offsets)
            if done == len(rows):
                return
            # A line the compact form cannot hold: read it in full.
            self._load_event(json.loads(rows[done][0]), linenos[done], offsets[done])
            rows, offsets, linenos = rows[done + 1 :], offsets[done + 1 :], linenos[done + 1 :]

    def _take_sent(
        self, rows: list[Row], lineno: int, offset: int
    ) -> tuple[list[Row], list[int], list[int]]:
        """Fold in the `sent` lines among result lines; the result lines, offsets, line numbers."""
        sent = self._sent
        results: list[Row] = []
        offsets: list[int] = []
        linenos: list[int] = []
        for row in rows:
            if row[OTHER]:
                fields = sent_fields(row[OTHER])
                if fields is None:
                    self._load_event(self._parsed(row[OTHER], lineno), lineno, offset)
                else:
                    sent[fields[1]] = (fields[0], fields[2])
            else:
                # In line order: a shard line among these packs only the results before it.
                self._answered(row[1].decode("utf-8", "surrogatepass"))
                results.append(row)
                offsets.append(offset)
                linenos.append(lineno)
            offset += line_length(row)
            lineno += 1
        return results, offsets, linenos

    def _parsed(self, line: bytes, lineno: int) -> dict[str, Any]:
        """A `sent` line not in this package's shape, read with json; LedgerError if it is bad."""
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise LedgerError(f"{self._path} line {lineno} is not valid JSON: {exc}") from None
        if type(event) is not dict or "event" not in event:
            raise LedgerError(f"{self._path} line {lineno} is not a ledger event")
        return event

    def _load_event(self, event: dict[str, Any], lineno: int, offset: int) -> None:
        try:
            if event["event"] == "result":
                state = KeyState.from_event(event)
                self._put(state, offset)
                self._answered(state.key)
            else:
                self.apply(event)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise LedgerError(
                f"{self._path} line {lineno} is not a valid {event.get('event')!r} event: "
                f"{type(exc).__name__}: {exc}"
            ) from None


def _text(event: dict[str, Any], name: str) -> str:
    """A string field of a `sent` line; TypeError naming it for anything else."""
    value = event[name]
    if type(value) is not str:
        raise TypeError(f"{name} must be a string, got {value!r}")
    return value


def _count(event: dict[str, Any]) -> int:
    """The `n` of a `sent` line, the images asked for; TypeError for anything else."""
    value = event["n"]
    if type(value) is not int or value < 0:
        raise TypeError(f"n must be a count of images, got {value!r}")
    return value


def _line_is(line: bytes, key: str | None) -> bool:
    """Whether `line` is the result line of `key` (key None: a whole line of another event)."""
    if not line.endswith(b"\n"):
        return False
    if key is not None:
        found = result_line().fullmatch(line)
        if found is not None:
            return found.group(2) == encode_key(key)
    try:
        event = json.loads(line)
    except ValueError:
        return False
    if type(event) is not dict:
        return False
    if key is None:
        return event.get("event") != "result"
    return event.get("event") == "result" and event.get("key") == key
