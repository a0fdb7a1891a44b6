"""What the ledger says about each request key, held compactly for million-line ledgers."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import LedgerError
from .events import _SHARED, _EventReader
from .paths import EXTENSIONS


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


_WITH_IMAGES = frozenset({"ok", "download_failed"})

# Each image is packed flat into KeyState._images as these five values, because a million
# results held as dicts or small objects cost several times the memory.
_FIELDS_PER_IMAGE = 5


class KeyState:
    """The latest recorded outcome of one request key (`<job_id>#<chunk>`), stored compactly."""

    __slots__ = (
        "_fingerprint", "_images", "_job_id", "downloads", "key", "n", "retryable", "status",
    )  # fmt: skip

    key: str
    status: str
    retryable: bool | None
    n: int
    _fingerprint: bytes | str | None
    _job_id: str | None
    _images: tuple[Any, ...]
    # (index, url, revised_prompt) of images generated but not downloaded (download_failed).
    downloads: tuple[tuple[int, str, str | None], ...]

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
    ) -> None:
        self.key = key
        self.status = _SHARED.get(status, status)
        self._fingerprint = None if fingerprint is None else _pack_hex(fingerprint)
        self.retryable = retryable
        # Keys are "<job_id>#<chunk>": the job id is kept separately only if it differs.
        self._job_id = None if key.rpartition("#")[0] == job_id else job_id
        self.n = n
        self._images = _pack_image_dicts(job_id, images) if images else ()
        self.downloads = tuple(
            (int(item["index"]), str(item["url"]), item.get("revised_prompt")) for item in downloads
        )

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> KeyState:
        """Build from a result event; raises KeyError/TypeError/ValueError when malformed."""
        status = event["status"]
        retryable: bool | None = None
        if status != "ok":
            error = event.get("error")
            if isinstance(error, dict):
                retryable = error.get("retryable")
        # A download_failed result keeps the images it did write, and the URLs still to fetch.
        images = (event.get("images") or ()) if status in _WITH_IMAGES else ()
        downloads = (event.get("downloads") or ()) if status == "download_failed" else ()
        return cls(
            event["key"], status, event.get("fingerprint"), retryable, event["job_id"],
            event["n"], images, downloads,
        )  # fmt: skip

    @property
    def fingerprint(self) -> str | None:
        """The request fingerprint the ledger recorded."""
        value = self._fingerprint
        return None if value is None else _unpack_hex(value)

    @property
    def job_id(self) -> str:
        """The job this key belongs to."""
        job_id = self._job_id
        return self.key.rpartition("#")[0] if job_id is None else job_id

    @property
    def image_count(self) -> int:
        """How many images the result recorded (0 unless ok or download_failed)."""
        return len(self._images) // _FIELDS_PER_IMAGE

    @property
    def image_bytes(self) -> int:
        """Total size of the recorded images."""
        return sum(self._images[3::_FIELDS_PER_IMAGE])

    @property
    def images(self) -> list[dict[str, Any]]:
        """The recorded image objects, rebuilt; `revised_prompt` is not kept."""
        packed = self._images
        if not packed:
            return []
        job_id = self.job_id
        images = []
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
            self.images,
            self.downloads,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyState):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"KeyState(key={self.key!r}, status={self.status!r}, "
            f"fingerprint={self.fingerprint!r}, retryable={self.retryable!r}, "
            f"job_id={self.job_id!r}, n={self.n!r}, images={self.image_count}, "
            f"downloads={len(self.downloads)})"
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


class LedgerState:
    """The latest result per key, plus counts; what resume and `status` need from a ledger."""

    __slots__ = ("_counts", "_keys", "last_end", "last_run", "results", "runs", "torn_tail")

    def __init__(self) -> None:
        self._keys: dict[str, KeyState] = {}
        self._counts: dict[str, int] = {"ok": 0, "failed": 0}
        self.runs = 0
        self.results = 0
        self.torn_tail = False
        self.last_run: dict[str, Any] | None = None
        self.last_end: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"<LedgerState keys={len(self._keys)} ok={self._counts.get('ok', 0)} "
            f"failed={self._counts.get('failed', 0)} runs={self.runs} results={self.results}>"
        )

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def get(self, key: str) -> KeyState | None:
        """The latest state of `key`, or None if the ledger never recorded it."""
        return self._keys.get(key)

    def items(self) -> Iterator[tuple[str, KeyState]]:
        """Every key with its latest state, in first-recorded order."""
        return iter(self._keys.items())

    def counts(self) -> dict[str, int]:
        """How many keys are currently ok and failed."""
        return dict(self._counts)

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one ledger event into the state; raises KeyError/TypeError when malformed."""
        kind = event["event"]
        if kind == "result":
            self._record(KeyState.from_event(event))
        elif kind == "run":
            self.runs += 1
            self.last_run = event
        elif kind == "end":
            self.last_end = event
        # Unknown event kinds are left alone so older versions can read newer ledgers.

    def _record(self, state: KeyState) -> None:
        """Replace the state of its key, keeping the status counts in step."""
        key = state.key
        previous = self._keys.get(key)
        counts = self._counts
        if previous is not None:
            counts[previous.status] -= 1
        self._keys[key] = state
        counts[state.status] = counts.get(state.status, 0) + 1
        self.results += 1

    @classmethod
    def load(cls, path: Path) -> LedgerState:
        """Read a ledger without locking it (a missing file is an empty ledger)."""
        self = cls()
        reader = _EventReader(Path(path))
        # A million results create millions of objects with no cycles among them; automatic
        # collections would rescan them all again and again for nothing.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for lineno, event in reader:
                try:
                    if event["event"] == "result":
                        self._record(KeyState.from_event(event))
                    else:
                        self.apply(event)
                except (AttributeError, KeyError, TypeError, ValueError) as exc:
                    raise LedgerError(
                        f"{path} line {lineno} is not a valid {event.get('event')!r} event: "
                        f"{type(exc).__name__}: {exc}"
                    ) from None
        except FileNotFoundError:
            return cls()
        finally:
            if gc_was_enabled:
                gc.enable()
        self.torn_tail = reader.torn_tail
        return self
