"""The append-only results ledger OUT/ledger.jsonl: one writer per folder, whole lines only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiofiles
from aiofiles.threadpool.binary import AsyncBufferedIOBase

from .errors import CometBatchError, LedgerError, OutputError
from .events import LEDGER_NAME, repair_tail
from .lock import FolderLock
from .state import KeyState, LedgerState


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
                self._file = await aiofiles.open(self.path, "ab")
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
                if self._pending:
                    await asyncio.gather(*self._pending, return_exceptions=True)
                self._file = None
                if handle is not None:
                    with contextlib.suppress(*self._quiet()):
                        await handle.flush()
                        await asyncio.to_thread(os.fsync, handle.fileno())
            finally:
                if handle is not None:
                    with contextlib.suppress(*self._quiet()):
                        await handle.close()
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
        """Write one event as a line, flushed (and fsynced if asked) before returning.

        A write the OS refuses raises OutputError naming the ledger; so does every append
        after it, so its partial line stays the last one (the next open drops it).
        """
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
                if isinstance(exc, OSError):
                    raise self._write_error() from exc
                raise
            if update is not None:
                self.state._record(update)
            else:
                self.state.apply(event)
