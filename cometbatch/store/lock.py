"""One run per output folder: an OS file lock that dies with its process."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from ..errors import LedgerError

LOCK_NAME = ".cometbatch.lock"

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


def process_start(pid: int) -> str | None:
    """When process `pid` started, as "<boot id>:<start ticks>" (Linux; None elsewhere or when
    it cannot be read): a pid the OS gives to another process later has another start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return None
    # "pid (name) S ...": fields resume after the last ")" (a name may hold parentheses) at
    # field 3, so field 22, the start time in clock ticks since boot, is the 20th of them.
    fields = stat[stat.rfind(")") + 1 :].split()
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None


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
                # Tells this process from a later one given the same pid (see holder.py).
                "process_start": process_start(os.getpid()),
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
