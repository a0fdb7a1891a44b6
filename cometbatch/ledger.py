"""The append-only results ledger OUT/ledger.jsonl: one writer per folder, whole lines only."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Self, get_args

from .errors import CometBatchError, LedgerError, OutputError
from .events import LEDGER_NAME, repair_tail
from .lock import FolderLock
from .state import KeyState, LedgerState

FsyncPolicy = Literal["end", "batch", "always"]
FSYNC_POLICIES: tuple[str, ...] = get_args(FsyncPolicy)

# A line waiting for the write that carries it: its bytes, its event, its key's new state.
_Queued = tuple[bytes, dict[str, Any], KeyState | None]


def _encode(event: dict[str, Any]) -> bytes:
    """One ledger line, UTF-8 with its newline."""
    line = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    try:
        return line.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        # Lone surrogates (legal in JSON input, not in UTF-8) survive only as \u escapes.
        return json.dumps(event, separators=(",", ":")).encode("ascii") + b"\n"


def _reason(exc: OSError, subject: Path) -> str:
    """The OS's reason for `exc`, naming the file it is about when that is not `subject`."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None and Path(str(exc.filename)) != subject:
        reason += f" ({exc.filename})"
    return reason


def _fsync_folder(folder: Path) -> None:
    """Make a new entry in `folder` (the ledger file itself) durable; a no-op on Windows."""
    if sys.platform == "win32":
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


class Ledger:
    """The open ledger of one output folder: holds the folder lock and appends events.

    Appends are group-committed: lines queued while a write is under way go out together in
    the next one (one write, one flush, one fsync in a worker thread), and each append returns
    only once the write carrying its line is done. An image is written before its result is
    appended, so an ok line still always names complete files.

    `fsync` says when the lines reach the disk itself, not just the OS:

    - "batch" (default): every write is fsynced before the appends it carries return, so a
      power loss loses no line that was recorded; one fsync covers a whole batch of lines.
    - "end": lines are flushed to the OS at once (a crash or kill of the process loses
      nothing) and fsynced once, when the ledger closes; a power loss may lose the last lines,
      whose requests a rerun sends (and pays for) again.
    - "always": as "batch" for the ledger; it also asks the engine to fsync every image file
      before its rename, so after a power loss an ok line names complete files on any
      filesystem (that half is the Sink's `fsync`).
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, fsync: FsyncPolicy = "batch") -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}; got {fsync!r}")
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LEDGER_NAME
        self.fsync: FsyncPolicy = fsync
        self.state = LedgerState()
        self.repaired = False
        self.writes = 0
        self._lock = FolderLock(self.out_dir)
        self._file: BinaryIO | None = None
        self._phase = "new"
        # Lines waiting for the next write, and the future that write settles.
        self._queue: list[_Queued] = []
        self._batch: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._broken: BaseException | None = None

    def __repr__(self) -> str:
        return (
            f"<Ledger path={str(self.path)!r} {self._phase} fsync={self.fsync} "
            f"results={self.state.results} keys={len(self.state)} writes={self.writes} "
            f"pending={len(self._queue)}>"
        )

    async def __aenter__(self) -> Self:
        if self._phase != "new":
            raise RuntimeError(f"{self!r} cannot be opened again")
        self._phase = "opening"
        try:
            try:
                self._lock.acquire()
            except OSError as exc:
                raise OutputError(
                    f"cannot use {self.out_dir} as the output folder: {_reason(exc, self.out_dir)}"
                ) from exc
            try:
                self.repaired = await asyncio.to_thread(repair_tail, self.path)
                # Loading a large ledger takes seconds: keep the event loop free meanwhile.
                self.state = await asyncio.to_thread(LedgerState.load, self.path)
                # Opened for appending before anything is sent: a ledger that cannot take
                # results must stop the run before a single image is paid for.
                self._file = await asyncio.to_thread(self._open)
            except OSError as exc:
                raise OutputError(
                    f"cannot open the ledger {self.path}: {_reason(exc, self.path)}"
                ) from exc
        except BaseException:
            self._phase = "closed"
            self._lock.release()
            raise
        self._phase = "open"
        return self

    def _open(self) -> BinaryIO:
        """Open the file for appending; with fsync on, make a new file's name durable too."""
        # Unbuffered: a write that fails leaves no bytes in a buffer for close() to add later.
        handle = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in aclose()
        if self.fsync != "end":
            try:
                _fsync_folder(self.out_dir)
            except BaseException:
                handle.close()
                raise
        return handle

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
            try:
                if self._writer is not None:
                    await asyncio.gather(self._writer, return_exceptions=True)
                self._file = None
                if handle is not None:
                    with contextlib.suppress(*self._quiet()):
                        await asyncio.to_thread(_flush, handle, True)
            finally:
                if handle is not None:
                    with contextlib.suppress(*self._quiet()):
                        await asyncio.to_thread(handle.close)
        except OSError as exc:
            # Every line was flushed when appended; this is the last fsync or close failing.
            raise OutputError(
                f"cannot finish writing the ledger {self.path}: {_reason(exc, self.path)}"
            ) from exc
        finally:
            self._lock.release()

    def _quiet(self) -> tuple[type[BaseException], ...]:
        """Errors closing may swallow: after a failed write they were reported already."""
        return () if self._broken is None else (OSError,)

    async def append(self, event: dict[str, Any]) -> None:
        """Write one event as a line; return once it is flushed (and fsynced, per `fsync`).

        A write the OS refuses raises OutputError naming the ledger, for every append it
        carried and every append after it, so its partial line stays the last one (the next
        open drops it).
        """
        if self._phase != "open":
            raise RuntimeError(f"cannot append to {self!r}")
        self._check_writable()
        # Validate before writing: a line that loads would then refuse must never be written.
        kind = event.get("event") if isinstance(event, dict) else None
        if not isinstance(kind, str):
            raise ValueError("a ledger event is a dict with a string 'event' field")
        update = KeyState.from_event(event) if kind == "result" else None
        self._queue.append((_encode(event), event, update))
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        batch = self._batch
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued())
        # The writer is a task of its own: if the caller is cancelled while its line waits or
        # is being written, the line is still written whole, and in order.
        await asyncio.shield(batch)

    def _check_writable(self) -> None:
        """Refuse to write after a failed write: its partial line must stay the last one."""
        if self._broken is not None:
            raise self._write_error() from self._broken

    def _write_error(self) -> CometBatchError:
        """The error of a failed write, the same for it and for every append refused after it.

        Concurrent appends race to report first: they all say the same thing.
        """
        broken = self._broken
        if isinstance(broken, OSError):
            return OutputError(
                f"cannot write the ledger {self.path}: {_reason(broken, self.path)}; "
                "fix the cause and run again to resume"
            )
        return LedgerError(
            f"{self.path} could not be written ({broken!r}); fix the cause and run again to resume"
        )

    async def _write_queued(self) -> None:
        """Write everything queued, batch after batch, until the queue is empty."""
        while self._queue:
            queued, self._queue = self._queue, []
            batch, self._batch = self._batch, None
            assert batch is not None
            try:
                await self._write(queued)
            except asyncio.CancelledError:
                batch.cancel()
                raise
            except BaseException as exc:
                # Every append this write carried gets its error (a batch is never left
                # unsettled, or its appends would wait forever).
                batch.set_exception(exc if isinstance(exc, Exception) else self._write_error())
                # Marked as retrieved: its appends may all have been cancelled meanwhile.
                batch.exception()
                if not isinstance(exc, Exception):
                    raise
            else:
                batch.set_result(None)

    async def _write(self, queued: list[_Queued]) -> None:
        """One write, flush and maybe fsync for a batch of lines, then their state updates."""
        self._check_writable()
        handle = self._file
        if handle is None:
            raise RuntimeError(f"cannot append to {self!r}")
        data = b"".join(line for line, _, _ in queued)
        try:
            await asyncio.to_thread(_write_lines, handle, data, self.fsync != "end")
        except BaseException as exc:
            # Lines may be half on disk; appending more would bury them mid-file. (A cancelled
            # writer leaves its thread writing: nothing may be appended after it either.)
            self._broken = exc
            if isinstance(exc, OSError):
                raise self._write_error() from exc
            raise
        self.writes += 1
        for _, event, update in queued:
            if update is not None:
                self.state._record(update)
            else:
                self.state.apply(event)


def _write_lines(handle: BinaryIO, data: bytes, fsync: bool) -> None:
    """Append `data` (whole lines) to the unbuffered file; fsync it if asked (in a thread)."""
    view = memoryview(data)
    while view:
        # A raw write may take less than it is given (a signal, a nearly full disk).
        written = handle.write(view)
        if not written:
            raise OSError(errno.EIO, "the ledger file took no bytes", str(handle.name))
        view = view[written:]
    _flush(handle, fsync)


def _flush(handle: BinaryIO, fsync: bool) -> None:
    """Flush what a (wrapped) file may buffer, and fsync it if asked (in a thread)."""
    handle.flush()
    if fsync:
        os.fsync(handle.fileno())
