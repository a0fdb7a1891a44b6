"""The per-key index's compact table: flat arrays and an open-addressing hash of row numbers."""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator, Sequence
from itertools import accumulate, islice
from pathlib import Path
from typing import Any

from ..store.setaside import withdraws as _withdraws
from ._scan import OTHER, Row, line_length
from .keystate import KeyState

# One row per key, in first-recorded order, held in flat arrays rather than one object per
# key: a million keys take about 65 bytes each. Keys live UTF-8 encoded end to end in one
# bytearray, found through an open-addressing table of row numbers. A row whose values do not
# fit the compact form (an unusual fingerprint, a job id that is not the key's prefix, a
# ledger line that could not be located) is kept whole, as a KeyState, in `_whole`.

_RETRYABLE = (None, True, False)
_NO_FINGERPRINT = 4  # flag bit; bits 0-1 index _RETRYABLE
_WITHDRAWS = 8  # flag bit: KeyState.withdraws
_MAX_N = 0xFFFFFFFF
# Status codes: the fast path's three come first, in this order; a row loaded twice (a later
# line for the same key) is folded into the first and left dead.
_FAST_STATUS = {b"ok": 0, b"failed": 1, b"download_failed": 2}
_DEAD = 255
_MAX_STATUSES = _DEAD
# The index of row numbers is at most this full (linear probing stays short).
_MAX_LOAD = 0.6
_FINGERPRINT_BYTES = 8
_DIGITS = bytes.maketrans(b"0123456789", bytes(range(10)))


def _is_fingerprint(value: object) -> bool:
    """Whether `value` is 16 lowercase hex digits, as the planner writes fingerprints."""
    if type(value) is not str or len(value) != 16:
        return False
    try:
        return bytes.fromhex(value).hex() == value
    except ValueError:
        return False


def _retry_flag(value: object) -> int:
    """`value`'s index in _RETRYABLE, or -1 (JSON's 1 and 0 are not True and False here)."""
    if value is None:
        return 0
    if value is True:
        return 1
    return 2 if value is False else -1


def _error_flag(status: bytes, error: bytes) -> int:
    """A not-ok result's flags from its error's JSON text: retryable (-1: odd), withdraws."""
    if error[:1] != b"{":
        return 0  # only an object has a "retryable"
    parsed = json.loads(error)
    flag = _retry_flag(parsed.get("retryable"))
    if flag >= 0 and status == b"failed" and _withdraws(parsed):
        flag |= _WITHDRAWS
    return flag


def encode_key(key: str) -> bytes:
    # surrogatepass: JSON may carry lone surrogates, and they must round-trip exactly.
    try:
        return key.encode()
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogatepass")


class KeyTable:
    """Each key's latest state, compactly: what LedgerState holds (see the comment above)."""

    __slots__ = (
        "_blob", "_codes", "_counts", "_dead", "_ends", "_fingerprints", "_flags", "_hashes",
        "_ns", "_offsets", "_path", "_slots", "_status_names", "_statuses", "_whole", "results",
    )  # fmt: skip

    def __init__(self) -> None:
        self._blob = bytearray()
        self._ends = array("Q")
        self._hashes = array("q")
        self._slots = array("i", [0]) * 8
        self._statuses = bytearray()
        self._flags = bytearray()
        self._fingerprints = bytearray()
        self._ns = array("I")
        self._offsets = array("q")
        self._whole: dict[int, KeyState] = {}
        self._dead = 0
        self._status_names: list[Any] = []
        self._codes: dict[Any, int] = {}
        for status in _FAST_STATUS:
            self._code(status.decode())
        self._counts: dict[Any, int] = {"ok": 0, "failed": 0}
        # The ledger file compact rows point into (offsets of their lines).
        self._path: Path | None = None
        self.results = 0

    def __len__(self) -> int:
        return len(self._ends) - self._dead

    def __contains__(self, key: object) -> bool:
        return type(key) is str and self._find(encode_key(key))[0] >= 0

    def get(self, key: str) -> KeyState | None:
        """The latest state of `key`, or None if the ledger never recorded it."""
        row = self._find(encode_key(key))[0]
        return None if row < 0 else self._state(row, key)

    def items(self) -> Iterator[tuple[str, KeyState]]:
        """Every key with its latest state, in first-recorded order."""
        for row in range(len(self._ends)):
            if self._statuses[row] != _DEAD:
                key = self._key_bytes(row).decode("utf-8", "surrogatepass")
                yield key, self._state(row, key)

    def counts(self) -> dict[str, int]:
        """How many keys are currently ok and failed."""
        return dict(self._counts)

    # -- rows --------------------------------------------------------------------------------

    def _key_bytes(self, row: int) -> bytes:
        ends = self._ends
        return bytes(self._blob[ends[row - 1] if row else 0 : ends[row]])

    def _find(self, key: bytes, hashed: int | None = None) -> tuple[int, int]:
        """(row, slot) of `key`, or (-1, the free slot where it would go)."""
        if hashed is None:
            hashed = hash(key)
        slots = self._slots
        hashes = self._hashes
        ends = self._ends
        blob = self._blob
        mask = len(slots) - 1
        slot = hashed & mask
        while True:
            row = slots[slot] - 1
            if row < 0:
                return -1, slot
            if hashes[row] == hashed and blob[ends[row - 1] if row else 0 : ends[row]] == key:
                return row, slot
            slot = (slot + 1) & mask

    def _reserve(self, rows: int) -> None:
        """Size the index for `rows` rows, rehashing if it grows."""
        size = len(self._slots)
        while size * _MAX_LOAD < rows:
            size *= 2
        if size == len(self._slots):
            return
        slots = array("i", [0]) * size  # no zeroed bytes object on the way
        mask = size - 1
        statuses = self._statuses
        for row, hashed in enumerate(self._hashes):
            if statuses[row] == _DEAD:
                continue
            slot = hashed & mask
            while slots[slot]:
                slot = (slot + 1) & mask
            slots[slot] = row + 1
        self._slots = slots

    def _code(self, status: Any) -> int:
        """The small number that stands for a status (-1 when there are too many)."""
        code = self._codes.get(status)
        if code is None:
            if len(self._status_names) >= _MAX_STATUSES:
                return -1
            code = self._codes[status] = len(self._status_names)
            self._status_names.append(status)
        return code

    def _status_of(self, row: int) -> Any:
        whole = self._whole.get(row)
        return self._status_names[self._statuses[row]] if whole is None else whole.status

    def _put(self, state: KeyState, offset: int) -> None:
        """Store `state` for its key; its images stay in the ledger line at `offset` if >= 0."""
        key = encode_key(state.key)
        hashed = hash(key)
        row, slot = self._find(key, hashed)
        counts = self._counts
        if row >= 0:
            counts[self._status_of(row)] -= 1
        else:
            row = len(self._ends)
            self._slots[slot] = row + 1
            self._blob += key
            self._ends.append(len(self._blob))
            self._hashes.append(hashed)
            self._statuses.append(0)
            self._flags.append(0)
            self._fingerprints += bytes(_FINGERPRINT_BYTES)
            self._ns.append(0)
            self._offsets.append(-1)
            self._reserve(len(self._ends))
        counts[state.status] = counts.get(state.status, 0) + 1
        self.results += 1
        fingerprint = state.fingerprint
        code = self._code(state.status)
        flags = _retry_flag(state.retryable)
        compact = (
            offset >= 0
            and code >= 0
            and state._job_id is None
            and flags >= 0
            and (fingerprint is None or _is_fingerprint(fingerprint))
            and type(state.n) is int
            and 0 <= state.n <= _MAX_N
        )
        if not compact:
            if offset >= 0:
                assert self._path is not None  # offsets are only known in a ledger file
                state = KeyState._on_disk(
                    state.key, state.status, fingerprint, state.retryable, state._job_id,
                    state.n, (self._path, offset), state.withdraws,
                )  # fmt: skip
            self._statuses[row] = 0
            self._whole[row] = state
            return
        self._whole.pop(row, None)
        self._statuses[row] = code
        if fingerprint is None:
            flags |= _NO_FINGERPRINT
        else:
            at = row * _FINGERPRINT_BYTES
            self._fingerprints[at : at + _FINGERPRINT_BYTES] = bytes.fromhex(fingerprint)
        if state.withdraws:
            flags |= _WITHDRAWS
        self._flags[row] = flags
        self._ns[row] = state.n
        self._offsets[row] = offset

    def _put_rows(self, rows: list[Row], offsets: Sequence[int]) -> int:
        """Store own-shape result lines (at `offsets`) in bulk; how many it stored."""
        # This is where a large ledger's time goes, so what can be is done a block at a time
        # by C code; only the index is updated line by line. It stops before a line whose
        # error's "retryable" is neither true, false nor null.
        _, keys, _, statuses, fingerprints, ns, errors, _ = zip(*rows, strict=True)
        flags: list[int] | bytes
        if statuses.count(b"ok") == len(statuses):
            flags = bytes(len(rows))
        else:
            flags = [
                0 if s == b"ok" else _error_flag(s, e)
                for s, e in zip(statuses, errors, strict=True)
            ]
            if -1 in flags:
                stop = flags.index(-1)
                return self._put_rows(rows[:stop], offsets[:stop]) if stop else 0
        first = len(self._ends)
        # Grown first: growing rehashes every row there is, and these are added one by one.
        self._reserve(first + len(rows))
        blob = self._blob
        self._ends.extend(islice(accumulate(map(len, keys), initial=len(blob)), 1, None))
        blob += b"".join(keys)
        hashes = array("q", map(hash, keys))
        self._hashes += hashes
        self._statuses += bytes(map(_FAST_STATUS.__getitem__, statuses))
        self._flags += bytes(flags)
        self._fingerprints += bytes.fromhex(b"".join(fingerprints).decode())
        digits = b"".join(ns)
        # Nearly always one digit each: then a byte translation is the whole conversion.
        self._ns.extend(digits.translate(_DIGITS) if len(digits) == len(ns) else map(int, ns))
        self._offsets.extend(offsets)
        counts = self._counts
        for status, code in _FAST_STATUS.items():
            if found := statuses.count(status):
                name = self._status_names[code]
                counts[name] = counts.get(name, 0) + found
        self.results += len(rows)
        slots = self._slots
        mask = len(slots) - 1
        all_hashes = self._hashes
        for row, hashed in enumerate(hashes, first):
            slot = hashed & mask
            while other := slots[slot]:
                if all_hashes[other - 1] == hashed and self._same_key(other - 1, row):
                    self._fold(other - 1, row)
                    break
                slot = (slot + 1) & mask
            else:
                slots[slot] = row + 1
        return len(rows)

    def _same_key(self, row: int, other: int) -> bool:
        return self._key_bytes(row) == self._key_bytes(other)

    def _fold(self, row: int, later: int) -> None:
        """Move a later row of the same key into `row`, which keeps its place; `later` dies."""
        self._counts[self._status_of(row)] -= 1
        self._whole.pop(row, None)
        self._statuses[row] = self._statuses[later]
        self._flags[row] = self._flags[later]
        at, source = row * _FINGERPRINT_BYTES, later * _FINGERPRINT_BYTES
        self._fingerprints[at : at + _FINGERPRINT_BYTES] = self._fingerprints[
            source : source + _FINGERPRINT_BYTES
        ]
        self._ns[row] = self._ns[later]
        self._offsets[row] = self._offsets[later]
        self._statuses[later] = _DEAD
        self._dead += 1

    def _state(self, row: int, key: str) -> KeyState:
        whole = self._whole.get(row)
        if whole is not None:
            return whole
        flags = self._flags[row]
        if flags & _NO_FINGERPRINT:
            fingerprint = None
        else:
            at = row * _FINGERPRINT_BYTES
            fingerprint = self._fingerprints[at : at + _FINGERPRINT_BYTES].hex()
        assert self._path is not None  # compact rows are only stored with a ledger file
        return KeyState._on_disk(
            key, self._status_names[self._statuses[row]], fingerprint, _RETRYABLE[flags & 3],
            None, self._ns[row], (self._path, self._offsets[row]), bool(flags & _WITHDRAWS),
        )  # fmt: skip


def guess_rows(path: Path, rows: list[Row]) -> int:
    """Roughly how many keys a ledger holds, so that its index is rarely rehashed."""
    try:
        size = path.stat().st_size
    except OSError:
        return 0
    # `sent` lines among them (their text in OTHER) take room but hold no key.
    results = sum(1 for row in rows if not row[OTHER])
    return size * results // max(sum(map(line_length, rows)), 1)
