"""What the ledger says about each request key, held compactly for million-line ledgers."""

from __future__ import annotations

import gc
import json
from array import array
from collections.abc import Iterator, Sequence
from itertools import accumulate, islice
from pathlib import Path
from typing import Any

from ..errors import LedgerError
from ..net.answered import Answered
from ..paths import EXTENSIONS
from ..results import PAID, WITH_DOWNLOADS
from ..store.setaside import withdraws as _withdraws
from .events import _RESULT_LINE, _SHARED, Row, _ResultScanner


def _pack_hex(text: str) -> bytes | str:
    """Lowercase hex text as raw bytes (half the memory) when that round-trips exactly."""
    if type(text) is str and len(text) >= 32:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            return text
        if raw.hex() == text:
            return raw
    return text


def _unpack_hex(value: bytes | str) -> str:
    """Undo `_pack_hex`: JSON never yields bytes, so bytes always mean packed hex."""
    return value.hex() if isinstance(value, bytes) else value


# Each image is packed flat into KeyState._images as these five values, because results held
# as dicts or small objects cost several times the memory.
_FIELDS_PER_IMAGE = 5

# (index, url, revised_prompt, tries, first_failed_at) of each link still to download.
Downloads = tuple[tuple[int, str, str | None, int, str | None], ...]


class KeyState:
    """The latest recorded outcome of one request key (`<job_id>#<chunk>`).

    A state that LedgerState hands out reads its images from its ledger line when first
    asked for them: resume decides on status and fingerprint alone, and keeping every key's
    images in memory is what made a million-result ledger cost half a gigabyte.
    """

    __slots__ = (
        "_answered", "_downloads", "_fingerprint", "_images", "_job_id", "_line", "_urls",
        "_usage", "key", "n", "retryable", "status", "withdraws",
    )  # fmt: skip

    key: str
    status: str
    retryable: bool | None
    n: int
    # Whether the line is failed with an error that lists withdrawn images (aside.withdraws):
    # only such a line is read to learn which images it took out of ok (aside.withdrawn).
    withdraws: bool
    _fingerprint: str | None
    _job_id: str | None
    # Packed images and pending downloads; None until read from the ledger line at _line.
    _images: tuple[Any, ...] | None
    _downloads: Downloads | None
    # Each image's link (None: came inline), or None when no image has one (read with them).
    _urls: tuple[str | None, ...] | None
    _line: tuple[Path, int] | None
    # A partial key's usage so far (read with its images): the rest's answer adds to it.
    _usage: Any
    # What the answer of a partial or download_failed key said (read with its images): its
    # next line keeps it until a later answer brings more.
    _answered: Answered | None

    def __init__(
        self,
        key: str,
        status: str,
        fingerprint: str | None,
        retryable: bool | None,
        job_id: str,
        n: int,
        images: Sequence[dict[str, Any]] = (),
        downloads: Sequence[dict[str, Any]] = (),
        usage: Any = None,
        withdraws: bool = False,
        answered: Answered | None = None,
    ) -> None:
        self.key = key
        self.status = _SHARED.get(status, status)
        self._fingerprint = fingerprint
        self.retryable = retryable
        self.withdraws = withdraws
        # Keys are "<job_id>#<chunk>": the job id is kept separately only if it differs.
        self._job_id = None if key.rpartition("#")[0] == job_id else job_id
        self.n = n
        self._images = _pack_image_dicts(job_id, images) if images else ()
        self._urls = _urls(images)
        self._downloads = _pack_downloads(downloads)
        self._usage = usage
        self._answered = answered
        self._line = None

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> KeyState:
        """Build from a result event; raises KeyError/TypeError/ValueError when malformed."""
        status = event["status"]
        retryable: bool | None = None
        withdraws = False
        if status != "ok":
            error = event.get("error")
            if isinstance(error, dict):
                retryable = error.get("retryable")
                withdraws = status == "failed" and _withdraws(error)
        # A download_failed result keeps the images it did write, and the URLs still to fetch.
        images = (event.get("images") or ()) if status in PAID else ()
        downloads = (event.get("downloads") or ()) if status in WITH_DOWNLOADS else ()
        usage = event.get("usage") if status == "partial" else None
        answered = (Answered.of_line(event) or None) if status in WITH_DOWNLOADS else None
        return cls(
            event["key"], status, event.get("fingerprint"), retryable, event["job_id"],
            event["n"], images, downloads, usage, withdraws, answered,
        )  # fmt: skip

    @classmethod
    def _on_disk(
        cls,
        key: str,
        status: str,
        fingerprint: str | None,
        retryable: bool | None,
        job_id: str | None,
        n: int,
        line: tuple[Path, int],
        withdraws: bool,
    ) -> KeyState:
        """A state whose images stay in its ledger line (job_id None: the key's prefix)."""
        self = cls.__new__(cls)
        self.key = key
        self.status = status
        self._fingerprint = fingerprint
        self.retryable = retryable
        self.withdraws = withdraws
        self._job_id = job_id
        self.n = n
        self._images = None
        self._urls = None
        self._downloads = None
        self._usage = None
        self._answered = None
        self._line = line
        return self

    @property
    def fingerprint(self) -> str | None:
        """The request fingerprint the ledger recorded."""
        return self._fingerprint

    @property
    def job_id(self) -> str:
        """The job this key belongs to."""
        job_id = self._job_id
        return self.key.rpartition("#")[0] if job_id is None else job_id

    @property
    def downloads(self) -> Downloads:
        """(index, url, revised_prompt, tries, first_failed_at) of images generated but not
        downloaded yet."""
        if self._downloads is None:
            self._read_line()
        assert self._downloads is not None
        return self._downloads

    @property
    def usage(self) -> Any:
        """The usage a partial result recorded (None for other statuses)."""
        if self._images is None:
            self._read_line()
        return self._usage

    @property
    def answered(self) -> Answered | None:
        """What the answer of a partial or download_failed result said (None for other
        statuses, and for a line that recorded nothing of it)."""
        if self._images is None:
            self._read_line()
        return self._answered

    def _packed_images(self) -> tuple[Any, ...]:
        if self._images is None:
            self._read_line()
        assert self._images is not None
        return self._images

    def line_event(self) -> dict[str, Any] | None:
        """The whole ledger line this state was read from (None: it is held in memory only)."""
        return None if self._line is None else self._event_at(*self._line)

    def line_event_or_rebuilt(self) -> dict[str, Any]:
        """The whole ledger line, or, for a state held in memory only, the fields of it that
        the state keeps (key, job_id, fingerprint, n and images)."""
        event = self.line_event()
        if event is not None:
            return event
        return {
            "key": self.key,
            "job_id": self.job_id,
            "fingerprint": self.fingerprint,
            "n": self.n,
            "images": self.images,
        }

    def _event_at(self, path: Path, offset: int) -> dict[str, Any]:
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                raw = handle.readline()
            event = json.loads(raw)
            if type(event) is not dict or event.get("key") != self.key:
                raise ValueError("not this key's result")
        except (OSError, ValueError) as exc:
            raise LedgerError(
                f"{path} changed while it was in use: the result of {self.key!r} is no longer "
                f"at byte {offset} ({exc})"
            ) from None
        return event

    def _read_line(self) -> None:
        """Fill in images and downloads from the ledger line this state was read from."""
        assert self._line is not None
        path, offset = self._line
        event = self._event_at(path, offset)
        try:
            recorded = KeyState.from_event(event)
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"{path} changed while it was in use: the result of {self.key!r} is no longer "
                f"at byte {offset} ({exc})"
            ) from None
        self._images = recorded._images
        self._urls = recorded._urls
        self._downloads = recorded._downloads
        self._usage = recorded._usage
        self._answered = recorded._answered

    @property
    def image_count(self) -> int:
        """How many images the result recorded (0 unless ok, download_failed or partial)."""
        return len(self._packed_images()) // _FIELDS_PER_IMAGE

    @property
    def image_bytes(self) -> int:
        """Total size of the recorded images."""
        return sum(self._packed_images()[3::_FIELDS_PER_IMAGE])

    @property
    def images(self) -> list[dict[str, Any]]:
        """The recorded image objects, rebuilt (with `url` where recorded); `revised_prompt`
        is not kept."""
        packed = self._packed_images()
        if not packed:
            return []
        job_id = self.job_id
        urls = self._urls
        images: list[dict[str, Any]] = []
        for at in range(0, len(packed), _FIELDS_PER_IMAGE):
            index, path, fmt, size, digest = packed[at : at + _FIELDS_PER_IMAGE]
            if path is None:
                path = f"images/{job_id}/{index}.{EXTENSIONS[fmt]}"
            images.append(
                {
                    "index": index,
                    "path": path,
                    "format": fmt,
                    "bytes": size,
                    "sha256": _unpack_hex(digest),
                }
            )
            if urls is not None and urls[at // _FIELDS_PER_IMAGE] is not None:
                images[-1]["url"] = urls[at // _FIELDS_PER_IMAGE]
        return images

    def _fields(self) -> tuple[Any, ...]:
        """Everything that defines the state, for equality and repr."""
        return (
            self.key,
            self.status,
            self.fingerprint,
            self.retryable,
            self.job_id,
            self.n,
            self.withdraws,
            self.images,
            self.downloads,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyState):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        images = "?" if self._images is None else str(self.image_count)
        downloads = "?" if self._downloads is None else str(len(self._downloads))
        return (
            f"KeyState(key={self.key!r}, status={self.status!r}, "
            f"fingerprint={self.fingerprint!r}, retryable={self.retryable!r}, "
            f"job_id={self.job_id!r}, n={self.n!r}, images={images}, downloads={downloads})"
        )


def _pack_one(
    job_id: str, index: int, path: str, fmt: str, size: int, sha256: str
) -> tuple[Any, ...]:
    """The five packed values of one image; a path the job id and index imply is dropped."""
    fmt = _SHARED.get(fmt, fmt)
    ext = EXTENSIONS.get(fmt)
    if ext is not None and path == f"images/{job_id}/{index}.{ext}":
        path_or_none: str | None = None
    else:
        path_or_none = path
    return (index, path_or_none, fmt, size, _pack_hex(sha256))


def _pack_image_dicts(job_id: str, images: Sequence[dict[str, Any]]) -> tuple[Any, ...]:
    """Pack the `images` list of a result event."""
    if len(images) == 1:  # the common case, without the list
        i = images[0]
        return _pack_one(job_id, i["index"], i["path"], i["format"], i["bytes"], i["sha256"])
    packed: list[Any] = []
    for i in images:
        packed += _pack_one(job_id, i["index"], i["path"], i["format"], i["bytes"], i["sha256"])
    return tuple(packed)


def _urls(images: Sequence[dict[str, Any]]) -> tuple[str | None, ...] | None:
    """Each image's `url` (None where it has none), or None when none has one."""
    if not any("url" in image for image in images):
        return None
    return tuple(image.get("url") for image in images)


def _pack_downloads(downloads: Sequence[dict[str, Any]]) -> Downloads:
    """The `downloads` list of a result event as tuples."""
    return tuple(
        (
            int(item["index"]),
            str(item["url"]),
            item.get("revised_prompt"),
            # Lines written before links were counted have neither: tried, then counted.
            int(item.get("tries") or 0),
            item.get("first_failed_at"),
        )
        for item in downloads
    )


# --- the table ----------------------------------------------------------------------------
#
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
_NOTHING_AHEAD = (b"", 0)
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
    """The flags of a result that is not ok, from its error (plain JSON text, as _RESULT
    matched it): its retryable flag (-1: none of the three), and whether it withdraws."""
    if error[:1] != b"{":
        return 0  # only an object has a "retryable"
    parsed = json.loads(error)
    flag = _retry_flag(parsed.get("retryable"))
    if flag >= 0 and status == b"failed" and _withdraws(parsed):
        flag |= _WITHDRAWS
    return flag


def _encode_key(key: str) -> bytes:
    # surrogatepass: JSON may carry lone surrogates, and they must round-trip exactly.
    try:
        return key.encode()
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogatepass")


class LedgerState:
    """The latest result per key, plus counts; what resume and `status` need from a ledger."""

    __slots__ = (
        "_ahead", "_blob", "_codes", "_counts", "_dead", "_end", "_ends", "_fingerprints",
        "_flags", "_following", "_hashes", "_ns", "_offsets", "_path", "_slots",
        "_status_names", "_statuses", "_whole", "last_end", "last_run", "results", "runs",
        "torn_tail",
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
        # The ledger file rows point into; while following, lines appended to it later are
        # found at _end (the first line not yet accounted for), so their rows point there too.
        self._path: Path | None = None
        self._following = False
        self._end = 0
        # Lines read past _end but not yet recorded: the bytes, and where the next one starts.
        self._ahead = _NOTHING_AHEAD
        self.runs = 0
        self.results = 0
        self.torn_tail = False
        self.last_run: dict[str, Any] | None = None
        self.last_end: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"<LedgerState keys={len(self)} ok={self._counts.get('ok', 0)} "
            f"failed={self._counts.get('failed', 0)} runs={self.runs} results={self.results}>"
        )

    def __len__(self) -> int:
        return len(self._ends) - self._dead

    def __contains__(self, key: object) -> bool:
        return type(key) is str and self._find(_encode_key(key))[0] >= 0

    def get(self, key: str) -> KeyState | None:
        """The latest state of `key`, or None if the ledger never recorded it."""
        row = self._find(_encode_key(key))[0]
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

    def apply(self, event: dict[str, Any], line: bytes | None = None) -> None:
        """Fold one ledger event into the state; raises KeyError/TypeError when malformed.

        `line` is the event's line as the Ledger just appended it (see `_record`)."""
        kind = event["event"]
        if kind == "result":
            self._record(KeyState.from_event(event), line)
            return
        if kind == "run":
            self.runs += 1
            self.last_run = event
        elif kind == "end":
            self.last_end = event
        # Unknown event kinds are left alone so older versions can read newer ledgers.
        self._follow(None, line)

    def _record(self, state: KeyState, line: bytes | None = None) -> None:
        """Replace the state of its key (the Ledger calls this once its line is written).

        With `line`, the bytes the Ledger appended for it, its offset in the file is known
        without reading the file back; the Ledger has checked (`_appended`) that its write
        landed exactly at the end this state knows."""
        offset = self._follow(state.key, line)
        self._put(state, offset)

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
        key = _encode_key(state.key)
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

    def _put_rows(self, rows: list[Row], offset: int) -> int:
        """Store result lines in this package's own shape, starting at `offset`, in bulk.

        This is where a large ledger's time goes, so what can be is done a block at a time by
        C code; only the index is updated line by line. Returns how many rows it stored: it
        stops before a line whose error's "retryable" is neither true, false nor null.
        """
        lines, keys, _, statuses, fingerprints, ns, errors, _ = zip(*rows, strict=True)
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
                return self._put_rows(rows[:stop], offset) if stop else 0
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
        self._offsets.extend(islice(accumulate(map(len, lines), initial=offset), len(rows)))
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

    # -- following appends ------------------------------------------------------------------

    def _appended(self, size: int, end: int | None) -> None:
        """The Ledger appended `size` bytes and the file now ends at `end` (None: unknown).
        Unless that is exactly where this state expected, stop following the file: states
        are then kept whole in memory instead of as offsets into it."""
        if self._following and end != self._end + size:
            self._following = False
            self._ahead = _NOTHING_AHEAD

    def _follow(self, key: str | None, line: bytes | None = None) -> int:
        """The offset of the line just appended for `key` (None: not a result), or -1.

        The Ledger writes each line before it records it, in order, so the next unread line
        of the file is the one being recorded (given as `line`, or read back); if it is not
        (another writer, a change in how lines are written), following stops and states are
        kept whole in memory instead.
        """
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
        scanner = _ResultScanner(path)
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
                        self._reserve(_guess_rows(path, item))
                        sized = True
                    self._load_rows(item, lineno, offset)
                else:
                    self._load_event(item, lineno, offset)
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
        while rows:
            done = self._put_rows(rows, offset)
            if done == len(rows):
                return
            # A line the compact form cannot hold: read it in full.
            offset += sum(len(row[0]) for row in rows[:done])
            self._load_event(json.loads(rows[done][0]), lineno + done, offset)
            offset += len(rows[done][0])
            rows = rows[done + 1 :]
            lineno += done + 1

    def _load_event(self, event: dict[str, Any], lineno: int, offset: int) -> None:
        try:
            if event["event"] == "result":
                self._put(KeyState.from_event(event), offset)
            else:
                self.apply(event)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise LedgerError(
                f"{self._path} line {lineno} is not a valid {event.get('event')!r} event: "
                f"{type(exc).__name__}: {exc}"
            ) from None


def _guess_rows(path: Path, rows: list[Row]) -> int:
    """Roughly how many keys a ledger holds, so that its index is rarely rehashed."""
    try:
        size = path.stat().st_size
    except OSError:
        return 0
    return size * len(rows) // max(sum(len(row[0]) for row in rows), 1)


def _line_is(line: bytes, key: str | None) -> bool:
    """Whether `line` is the result line of `key` (key None: a whole line of another event)."""
    if not line.endswith(b"\n"):
        return False
    if key is not None:
        found = _RESULT_LINE.fullmatch(line)
        if found is not None:
            return found.group(2) == _encode_key(key)
    try:
        event = json.loads(line)
    except ValueError:
        return False
    if type(event) is not dict:
        return False
    if key is None:
        return event.get("event") != "result"
    return event.get("event") == "result" and event.get("key") == key
