"""The append-only results ledger OUT/ledger.jsonl: one writer per output, whole lines only."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, get_args

from ..errors import CometBatchError, LedgerError, OutputError
from ..settings import FsyncPolicy
from ..store.interface import AppendLog, Store
from ..store.urls import store_of
from ..textsafe import safe_json
from .events import LEDGER_NAME, repair_tail
from .index import LedgerState
from .keystate import KeyState

FSYNC_POLICIES: tuple[str, ...] = get_args(FsyncPolicy)

# A line waiting for the write that carries it: its bytes, its event, its key's new state,
# and the future its append waits on.
_Queued = tuple[bytes, dict[str, Any], KeyState | None, "asyncio.Future[None]"]


# One encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _encode(event: dict[str, Any]) -> bytes:
    """One ledger line, UTF-8 with its newline, its unsafe characters as \\u escapes."""
    # Controls, bidi overrides and lone surrogates (legal in JSON input, not in UTF-8) are
    # escaped, so that every line is valid UTF-8 and `tail -f` shows server text inert.
    line = safe_json(_ENCODER.encode(event))
    return line.encode("utf-8") + b"\n"


def _reason(exc: OSError, subject: Path) -> str:
    """The OS's reason for `exc`, naming the file it is about when that is not `subject`."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None and Path(str(exc.filename)) != subject:
        reason += f" ({exc.filename})"
    return reason


# Appends are group-committed: lines queued while a write is under way go out together in
# the next one (one write on the loop; with an fsync, in a worker thread); each append returns once
# the write carrying its line is done. `fsync` (the Settings field) says when lines reach the
# disk itself: "end" flushes each write to the OS (a killed process loses no line; a power
# loss may lose the last ones, sent again by a rerun) and fsyncs once at close; "batch" also
# fsyncs each write (about a quarter fewer results/s at a thousand a second); "always" is
# "batch" plus an fsync of every image and its folder before its line (the Sink's `fsync`).


class Ledger:
    """The open ledger of one output: holds its run lock and appends events, in order."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "end",
        store: Store | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}; got {fsync!r}")
        # Written (and locked) through the store; read from the log's local file.
        self.store: Store = store if store is not None else store_of(out_dir)
        self.where = self.store.root
        self.shown = f"{self.where}/{LEDGER_NAME}"
        self.path = Path(self.where) / LEDGER_NAME
        self.fsync: FsyncPolicy = fsync
        self.state = LedgerState()
        self.repaired = False
        self.writes = 0
        self._lock = self.store.lock()
        self._file: AppendLog | None = None
        self._phase = "new"
        # Lines waiting for the next write.
        self._queue: list[_Queued] = []
        # The write under way in a worker thread, if any.
        self._writing: asyncio.Future[int | None] | None = None
        self._broken: BaseException | None = None

    def __repr__(self) -> str:
        return (
            f"<Ledger {self.shown!r} {self._phase} fsync={self.fsync} "
            f"results={self.state.results} keys={len(self.state)} writes={self.writes} "
            f"pending={len(self._queue)}>"
        )

    async def __aenter__(self) -> Self:
        if self._phase != "new":
            raise RuntimeError(f"{self!r} cannot be opened again")
        self._phase = "opening"
        try:
            try:
                # In a thread: on an object store, taking the lock is a few requests.
                await asyncio.to_thread(self._lock.acquire)
            except OSError as exc:
                raise OutputError(
                    f"cannot use {self.where} as the output folder: "
                    f"{_reason(exc, Path(self.where))}"
                ) from exc
            try:
                # Opened for appending before anything is sent: a ledger that cannot take
                # results must stop the run before a single image is paid for.
                self._file = await asyncio.to_thread(
                    self.store.open_log, LEDGER_NAME, sync=self.fsync != "end"
                )
                self.path = Path(self._file.path)
                self.repaired = await asyncio.to_thread(repair_tail, self.path)
                # Loading a large ledger takes seconds: keep the event loop free meanwhile.
                self.state = await asyncio.to_thread(LedgerState.load, self.path)
            except OSError as exc:
                raise OutputError(
                    f"cannot open the ledger {self.shown}: {_reason(exc, self.path)}"
                ) from exc
        except BaseException:
            self._phase = "closed"
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close(False)
                self._file = None
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
            try:
                # Each finished write starts the next one first, so this ends when all are done.
                while self._writing is not None:
                    await asyncio.wait({self._writing})
                self._file = None
            finally:
                if handle is not None:
                    with contextlib.suppress(*self._quiet()):
                        await asyncio.to_thread(handle.close, True)
        except OSError as exc:
            # Every line was flushed when appended; this is the last fsync or close failing.
            raise OutputError(
                f"cannot finish writing the ledger {self.shown}: {_reason(exc, self.path)}"
            ) from exc
        finally:
            self._lock.release()

    def _quiet(self) -> tuple[type[BaseException], ...]:
        """Errors closing may swallow: after a failed write they were reported already."""
        return () if self._broken is None else (OSError,)

    async def append(self, event: dict[str, Any]) -> None:
        """Write one event as a line; return once it is flushed (and fsynced, per `fsync`)."""
        # A write the OS refuses raises OutputError naming the ledger, for every append it
        # carried and every append after it, so its partial line stays the last one (the next
        # open drops it).
        if self._phase != "open":
            raise RuntimeError(f"cannot append to {self!r}")
        self._check_writable()
        # Validate before writing: a line that loads would then refuse must never be written.
        kind = event.get("event") if isinstance(event, dict) else None
        if not isinstance(kind, str):
            raise ValueError("a ledger event is a dict with a string 'event' field")
        update = KeyState.from_event(event) if kind == "result" else None
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((_encode(event), event, update, written))
        if self._writing is None:
            self._write_queued()
        # Writes are driven by callbacks, not by this task: if the caller is cancelled while
        # its line waits or is being written, only its own future is cancelled, and the line
        # is still written whole, and in order.
        await written

    def _check_writable(self) -> None:
        """Refuse to write after a failed write: its partial line must stay the last one."""
        if self._broken is not None:
            raise self._write_error() from self._broken

    def _write_error(self) -> CometBatchError:
        """The error of a failed write, the same for it and for every append refused after it."""
        # Concurrent appends race to report first: they all say the same thing.
        broken = self._broken
        if isinstance(broken, OSError):
            return OutputError(
                f"cannot write the ledger {self.shown}: {_reason(broken, self.path)}; "
                "fix the cause and run again to resume"
            )
        return LedgerError(
            f"{self.shown} could not be written ({broken!r}); fix the cause and run again to resume"
        )

    def _write_queued(self) -> None:
        """Start one write of the lines queued (none under way); its end starts the next."""
        # Without fsync the write is a short append to the OS's cache, made on the loop itself
        # one loop turn later, so that a burst of appends shares it: a trip to a worker thread
        # cost more than the write. With fsync (milliseconds) it is one trip to a worker thread.
        handle = self._file
        if self._broken is not None or handle is None:
            queued, self._queue = self._queue, []
            if self._broken is not None:
                _fail(queued, self._write_error, self._broken)
            else:
                _fail(queued, self._closed_error, None)
            return
        loop = asyncio.get_running_loop()
        # On an object store every write is a network call: always in a worker thread.
        if self.fsync == "end" and handle.on_loop:
            self._writing = loop.create_future()
            loop.call_soon(self._write_on_loop, handle, self._writing)
            return
        queued, self._queue = self._queue, []
        data = b"".join(line for line, _, _, _ in queued)
        writing = loop.run_in_executor(None, handle.append, data, self.fsync != "end")
        self._writing = writing
        writing.add_done_callback(functools.partial(self._written, queued))

    def _write_on_loop(self, handle: AppendLog, done: asyncio.Future[int | None]) -> None:
        """Write every line queued by now, on the loop (the unflushed policy)."""
        queued, self._queue = self._queue, []
        try:
            end = handle.append(b"".join(line for line, _, _, _ in queued), False)
        except BaseException as exc:
            # A KeyboardInterrupt can land mid-write here, on the loop: the ledger is broken
            # (its half line stays the last one) and every waiting append is told, then it goes on.
            self._settle(queued, None, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self._settle(queued, end, None)
        finally:
            done.set_result(None)

    def _written(self, queued: list[_Queued], done: asyncio.Future[int | None]) -> None:
        """A write in a worker thread ended: settle its lines."""
        if done.cancelled():
            self._settle(queued, None, asyncio.CancelledError())
        else:
            exc = done.exception()
            self._settle(queued, None if exc is not None else done.result(), exc)

    def _settle(self, queued: list[_Queued], end: int | None, exc: BaseException | None) -> None:
        """Record a finished write's lines and settle their appends; start the next write."""
        self._writing = None
        if exc is not None:
            # Lines may be half on disk; appending more would bury them mid-file.
            self._broken = exc
            _fail(queued, self._write_error, exc)
        else:
            self.writes += 1
            self.state._appended(sum(len(line) for line, _, _, _ in queued), end)
            for line, event, update, written in queued:
                try:
                    if update is not None:
                        self.state._record(update, line)
                    else:
                        self.state.apply(event, line)
                except Exception as error:
                    # Validated before it was queued: a bug, but no append may hang on it.
                    if not written.done():
                        written.set_exception(error)
                    continue
                if not written.done():
                    written.set_result(None)
        if self._queue:
            self._write_queued()

    def _closed_error(self) -> CometBatchError:
        """The error of appends left queued when the file is already closed (a bug)."""
        return LedgerError(f"cannot append to {self!r}")


def _fail(
    queued: list[_Queued], error: Callable[[], CometBatchError], cause: BaseException | None
) -> None:
    """Fail the appends of `queued` still waiting, each with a fresh `error()`."""
    for _, _, _, written in queued:
        if written.done():
            continue
        exc = error()
        if cause is not None:
            # As `raise exc from cause` would: the OS's error is kept as the cause.
            exc.__cause__ = cause
            exc.__suppress_context__ = True
        written.set_exception(exc)
