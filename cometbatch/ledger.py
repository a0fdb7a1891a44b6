"""The append-only results ledger OUT/ledger.jsonl, its in-memory state and the folder lock."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import aiofiles
from aiofiles.threadpool.binary import AsyncBufferedIOBase

from cometbatch.errors import LedgerError
from cometbatch.paths import EXTENSIONS

__all__ = [
    "LEDGER_NAME",
    "LOCK_NAME",
    "FolderLock",
    "KeyState",
    "Ledger",
    "LedgerState",
    "iter_events",
    "repair_tail",
]

LEDGER_NAME = "ledger.jsonl"
LOCK_NAME = ".cometbatch.lock"

_TAIL_CHUNK = 64 * 1024
_DECODER = json.JSONDecoder()
# json.loads makes a fresh string per value; sharing the few recurring ones saves memory
# across a million results.
_SHARED: dict[str, str] = {s: s for s in ("ok", "failed", "png", "jpeg", "webp")}


# --- reading ---------------------------------------------------------------------------


class _EventReader:
    """Streams (line number, event) from a ledger and notes whether its last line was torn."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.torn_tail = False

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
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
        try:
            event = json.loads(raw)
        except ValueError:
            self.torn_tail = True
            return None
        if type(event) is not dict or "event" not in event:
            self.torn_tail = True
            return None
        return event


def iter_events(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream (line number, event) from a ledger, skipping blank lines and a torn last line."""
    return iter(_EventReader(Path(path)))


def _complete_line(tail: bytes) -> bool:
    """Whether an unterminated tail is a whole event that only lacks its newline."""
    try:
        event = json.loads(tail)
    except ValueError:
        return False
    return type(event) is dict and "event" in event


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
    if _complete_line(handle.read()):
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


# --- state -----------------------------------------------------------------------------


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


# Each image is packed flat into KeyState._images as these five values, because a million
# results held as dicts or small objects cost several times the memory.
_FIELDS_PER_IMAGE = 5


class KeyState:
    """The latest recorded outcome of one request key (`<job_id>#<chunk>`), stored compactly."""

    __slots__ = ("_fingerprint", "_images", "_job_id", "key", "n", "retryable", "status")

    key: str
    status: str
    retryable: bool | None
    n: int
    _fingerprint: bytes | str | None
    _job_id: str | None
    _images: tuple[Any, ...]

    def __init__(
        self,
        key: str,
        status: str,
        fingerprint: str | None,
        retryable: bool | None,
        job_id: str,
        n: int,
        images: Iterable[dict[str, Any]] = (),
    ) -> None:
        self.key = key
        self.status = _SHARED.get(status, status)
        self._fingerprint = None if fingerprint is None else _pack_hex(fingerprint)
        self.retryable = retryable
        # Keys are "<job_id>#<chunk>": the job id is kept separately only if it differs.
        self._job_id = None if key.rpartition("#")[0] == job_id else job_id
        self.n = n
        self._images = _pack_image_dicts(job_id, list(images))

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> KeyState:
        """Build from a result event; raises KeyError/TypeError/ValueError when malformed."""
        status = event["status"]
        job_id = event["job_id"]
        retryable: bool | None = None
        packed: tuple[Any, ...] = ()
        if status == "ok":
            raw_images = event.get("images")
            if raw_images:
                packed = _pack_image_dicts(job_id, raw_images)
        else:
            error = event.get("error")
            if isinstance(error, dict):
                retryable = error.get("retryable")
        # The same assignments as __init__, inline: this runs once per ledger line.
        self = cls.__new__(cls)
        key = self.key = event["key"]
        self.status = _SHARED.get(status, status)
        fingerprint = event.get("fingerprint")
        self._fingerprint = None if fingerprint is None else _pack_hex(fingerprint)
        self.retryable = retryable
        self._job_id = None if key.rpartition("#")[0] == job_id else job_id
        self.n = event["n"]
        self._images = packed
        return self

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
        """How many images the result recorded (0 unless ok)."""
        return len(self._images) // _FIELDS_PER_IMAGE

    @property
    def image_bytes(self) -> int:
        """Total size of the recorded images."""
        return sum(self._images[3::_FIELDS_PER_IMAGE])

    @property
    def images(self) -> list[dict[str, Any]]:
        """The recorded image objects of an ok result, rebuilt; `revised_prompt` is not kept."""
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
            f"job_id={self.job_id!r}, n={self.n!r}, images={self.image_count})"
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


def _pack_image_dicts(job_id: str, images: list[dict[str, Any]]) -> tuple[Any, ...]:
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


# --- the folder lock -------------------------------------------------------------------

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    # Lock a byte far past the holder's info so other processes can still read that info.
    _LOCK_OFFSET = 1 << 30

    def _try_lock(fd: int) -> bool:
        """Take the lock without waiting; False if another process holds it."""
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        """Release the lock."""
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        """Take the lock without waiting; False if another open file holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        """Release the lock."""
        fcntl.flock(fd, fcntl.LOCK_UN)


def _holder_text(fd: int) -> str:
    """Describe the lock holder from the info it wrote, as far as it can be read."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return "holder unknown"
    pid = info.get("pid", "?")
    host = info.get("host", "?")
    started = info.get("started_at", "?")
    return f"pid {pid} on host {host}, started {started}"


class FolderLock:
    """One run per output folder, held with an OS lock that dies with its process."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def __repr__(self) -> str:
        state = "held" if self._fd is not None else "free"
        return f"<FolderLock path={str(self.path)!r} {state}>"

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise LedgerError naming the run that holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self!r} is already held")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # flock locks belong to the open file description, so a second open in this
            # same process conflicts too, and the OS drops the lock when the holder dies.
            if not _try_lock(fd):
                raise LedgerError(
                    f"{self.out_dir} is in use by another cometbatch run ({_holder_text(fd)}); "
                    "wait for it to finish or stop it"
                )
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Clear the info first so no one reads a finished run as the holder.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            _unlock(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


# --- the ledger ------------------------------------------------------------------------


def _encode(event: dict[str, Any]) -> bytes:
    """One ledger line, UTF-8 with its newline."""
    line = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    try:
        return line.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        # Lone surrogates (legal in JSON input, not in UTF-8) survive only as \u escapes.
        return json.dumps(event, separators=(",", ":")).encode("ascii") + b"\n"


class Ledger:
    """The open ledger of one output folder: holds the folder lock and appends events."""

    def __init__(self, out_dir: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LEDGER_NAME
        self.fsync = fsync
        self.state = LedgerState()
        self.repaired = False
        self._lock = FolderLock(self.out_dir)
        self._file: AsyncBufferedIOBase | None = None
        self._phase = "new"
        self._write_lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()
        self._broken: BaseException | None = None

    def __repr__(self) -> str:
        return (
            f"<Ledger path={str(self.path)!r} {self._phase} results={self.state.results} "
            f"keys={len(self.state)} pending={len(self._pending)}>"
        )

    async def __aenter__(self) -> Self:
        if self._phase != "new":
            raise RuntimeError(f"{self!r} cannot be opened again")
        self._phase = "opening"
        try:
            self._lock.acquire()
            self.repaired = await asyncio.to_thread(repair_tail, self.path)
            # Loading a large ledger takes seconds: keep the event loop free meanwhile.
            self.state = await asyncio.to_thread(LedgerState.load, self.path)
            self._file = await aiofiles.open(self.path, "ab")
        except BaseException:
            self._phase = "closed"
            self._lock.release()
            raise
        self._phase = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Finish pending appends, flush and fsync the file, close it and release the lock."""
        if self._phase == "closed":
            return
        self._phase = "closed"
        handle = self._file
        try:
            if self._pending:
                await asyncio.gather(*self._pending, return_exceptions=True)
            self._file = None
            if handle is not None:
                with contextlib.suppress(*self._quiet()):
                    await handle.flush()
                    await asyncio.to_thread(os.fsync, handle.fileno())
        finally:
            try:
                if handle is not None:
                    with contextlib.suppress(*self._quiet()):
                        await handle.close()
            finally:
                self._lock.release()

    def _quiet(self) -> tuple[type[BaseException], ...]:
        """Errors closing may swallow: after a failed write they were reported already."""
        return () if self._broken is None else (OSError,)

    async def append(self, event: dict[str, Any]) -> None:
        """Write one event as a line, flushed (and fsynced if asked) before returning."""
        if self._phase != "open":
            raise RuntimeError(f"cannot append to {self!r}")
        self._check_writable()
        # Validate before writing: a line that loads would then refuse must never be written.
        kind = event.get("event") if isinstance(event, dict) else None
        if not isinstance(kind, str):
            raise ValueError("a ledger event is a dict with a string 'event' field")
        update = KeyState.from_event(event) if kind == "result" else None
        data = _encode(event)
        # The write runs in its own task: if the caller is cancelled mid-write, the line is
        # still finished whole and the lock keeps later lines from interleaving with it.
        task = asyncio.ensure_future(self._write(data, event, update))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.shield(task)

    def _check_writable(self) -> None:
        """Refuse to write after a failed write: its partial line must stay the last one."""
        if self._broken is not None:
            raise LedgerError(
                f"{self.path} could not be written ({self._broken}); "
                "fix the cause and run again to resume"
            ) from self._broken

    async def _write(self, data: bytes, event: dict[str, Any], update: KeyState | None) -> None:
        """Write, flush and maybe fsync one line under the write lock, then update the state."""
        async with self._write_lock:
            self._check_writable()
            handle = self._file
            if handle is None:
                raise RuntimeError(f"cannot append to {self!r}")
            try:
                await handle.write(data)
                await handle.flush()
                if self.fsync:
                    await asyncio.to_thread(os.fsync, handle.fileno())
            except BaseException as exc:
                # The line may be half on disk; appending more would bury it mid-file.
                self._broken = exc
                raise
            if update is not None:
                self.state._record(update)
            else:
                self.state.apply(event)
