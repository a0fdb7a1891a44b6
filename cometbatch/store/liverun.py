"""Whether a live run holds an output folder, read from its lock file without taking the lock.

Taking the lock, even shared and for a moment, could make a run starting at that instant
refuse the folder; reading the holder's info (which a run clears on release) cannot.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Literal

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


def lock_holder(out_dir: Path) -> tuple[bool | None, str]:
    """Whether a live run holds the folder (None: cannot tell), read from the lock file's
    holder info without taking the lock (a run releasing it clears the info)."""
    try:
        text = (out_dir / LOCK_NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False, ""
    try:
        info = json.loads(text) if text.strip() else None
    except ValueError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return False, ""
    pid, host = info["pid"], str(info.get("host", "?"))
    holder = f"pid {pid} on {host}, started {info.get('started_at', '?')}"
    if host != socket.gethostname() or sys.platform == "win32":
        return None, holder
    if not _pid_alive(pid):
        return False, holder
    recorded, now = info.get("process_start"), process_start(pid)
    # The pid lives, but if it started at another time, another process has taken it since
    # (a killed run leaves its info behind). Without a recorded or readable start: alive.
    return not (isinstance(recorded, str) and now is not None and recorded != now), holder


def run_state(out_dir: Path, ended: bool, interrupted: bool) -> tuple[RunState, str]:
    """finished / interrupted (the last run wrote its end line), running (a live process
    holds the folder), crashed (no end line, no live holder), or unknown."""
    alive, holder = lock_holder(out_dir)
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
