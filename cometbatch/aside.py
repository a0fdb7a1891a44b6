"""Images of a changed job are set aside (never silently overwritten) before it is regenerated."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

REPLACED_DIR = "replaced"


def aside_path(out_dir: Path, run_id: str, relpath: str) -> Path | None:
    """Where an image recorded at `relpath` goes: OUT/replaced/<run_id>/<job>/<k>.<ext>.

    None for a path that does not name a file under OUT/images/ (a hand-edited ledger).
    """
    parts = PurePosixPath(relpath).parts
    if len(parts) != 3 or parts[0] != "images" or any(p in ("", ".", "..") for p in parts):
        return None
    return out_dir / REPLACED_DIR / run_id / parts[1] / parts[2]


def set_aside(out_dir: Path, run_id: str, relpaths: Iterable[str]) -> int:
    """Move the existing files among `relpaths` aside; returns how many were moved."""
    moved = 0
    for relpath in relpaths:
        source = out_dir / relpath
        target = aside_path(out_dir, run_id, relpath)
        if target is None or not source.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        moved += 1
    return moved
