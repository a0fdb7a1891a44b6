"""The latest recorded outcome of one request key; its images are read from its line on demand."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import LedgerError
from ..net.answered import Answered
from ..paths import EXTENSIONS
from ..results import PAID, WITH_DOWNLOADS
from ..store.setaside import withdraws as _withdraws
from .events import event_at

# json.loads makes a fresh string per value; sharing the few recurring ones saves memory
# across a million results.
SHARED: dict[str, str] = {s: s for s in ("ok", "failed", "download_failed", "png", "jpeg", "webp")}


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
    """The latest recorded outcome of one request key (`<job_id>#<chunk>`)."""

    # A state that LedgerState hands out reads its images from its ledger line when first
    # asked for them: resume decides on status and fingerprint alone, and keeping every key's
    # images in memory is what made a million-result ledger cost half a gigabyte.

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
        self.status = SHARED.get(status, status)
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
        """(index, url, revised_prompt, tries, first_failed_at) of images still to download."""
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
        """What a partial or download_failed result's answer said (None: nothing recorded)."""
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
        """The whole ledger line, or for a state in memory only the fields of it that it keeps."""
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
            event = event_at(path, offset)
            if event.get("key") != self.key:
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
        """The recorded image objects, rebuilt (`url` where recorded; no `revised_prompt`)."""
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
    fmt = SHARED.get(fmt, fmt)
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
