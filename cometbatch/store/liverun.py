"""Whether a live run holds an output, read from its lock's info without taking the lock."""

# Taking the lock, even shared and for a moment, could make a run starting at that instant
# refuse the folder; reading the holder's info (which a run clears on release) cannot.

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from .interface import Store
from .lock import LOCK_NAME, process_start

RunState = Literal["finished", "interrupted", "running", "crashed", "unknown"]


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    except OSError:
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A process that has exited but not been reaped yet (Linux; elsewhere: False)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (name) S ...": the state follows the last ")" (a name may hold parentheses).
    fields = stat[stat.rfind(")") + 1 :].split()
    return bool(fields) and fields[0] in ("Z", "X")


def holder_text(info: dict[str, Any]) -> str:
    """The run a lock's info names, for a message."""
    if not isinstance(info.get("pid"), int):
        return "holder unknown"
    text = f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started_at', '?')}"
    expires = info.get("expires_at")
    if isinstance(expires, int | float):
        until = datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds")
        text += f", lease until {until}"
    return text


def holder_alive(info: dict[str, Any], now: float | None = None) -> bool | None:
    """Whether the run a lock's info names still lives (None: cannot tell from here)."""
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    expires = info.get("expires_at")
    # A lease (a lock object on a store) that ran out was not renewed: its run is gone.
    if isinstance(expires, int | float) and expires < (time.time() if now is None else now):
        return False
    if str(info.get("host", "?")) != socket.gethostname() or sys.platform == "win32":
        # Another host's run: its lease says it lives; a folder lock cannot tell.
        return True if isinstance(expires, int | float) else None
    if not _pid_alive(pid):
        return False
    recorded, current = info.get("process_start"), process_start(pid)
    # The pid lives, but if it started at another time, another process has taken it since
    # (a killed run leaves its info behind). Without a recorded or readable start: alive.
    return not (isinstance(recorded, str) and current is not None and recorded != current)


def lock_holder(store: Store | str | os.PathLike[str]) -> tuple[bool | None, str]:
    """Whether a live run holds the output (None: cannot tell), read from the lock's holder
    info without taking the lock (a run releasing it clears the info)."""
    if isinstance(store, str | os.PathLike):
        from .local import LocalStore

        store = LocalStore(store)
    try:
        text = store.read(LOCK_NAME).decode("utf-8", errors="replace")
    except OSError:
        return False, ""
    try:
        info = json.loads(text) if text.strip() else None
    except ValueError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return False, ""
    return holder_alive(info), holder_text(info)


def run_state(
    store: Store | str | os.PathLike[str], ended: bool, interrupted: bool
) -> tuple[RunState, str]:
    """finished / interrupted (the last run wrote its end line), running (a live process
    holds the folder), crashed (no end line, no live holder), or unknown."""
    alive, holder = lock_holder(store)
    if alive:
        return "running", f"a run is writing this folder ({holder})"
    if ended:
        return ("interrupted", "") if interrupted else ("finished", "")
    if alive is None:
        return "unknown", f"the lock names {holder}: cannot tell from here whether it still runs"
    what = f" ({holder})" if holder else ""
    return "crashed", (
        f"the last run stopped without finishing{what}; run the same command again to resume"
    )
