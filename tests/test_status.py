"""`status` reads a folder's ledger without the lock: finished, crashed and running folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cometbatch import LedgerError
from cometbatch.status import read_status


def result(key: str, status: str, model: str = "dall-e-3", n: int = 1, **extra: Any) -> str:
    error = None
    if status == "failed":
        error = {"kind": "content_policy", "message": "rejected", "retryable": False}
    event = {
        "event": "result",
        "key": key,
        "status": status,
        "model": model,
        "n": n,
        "error": error,
        "attempts": 2,
        "ambiguous_retries": 0,
        "finished_at": "2026-11-21T10:00:01Z",
        **extra,
    }
    return json.dumps(event)


RUN = json.dumps({"event": "run", "run_id": "r1", "started_at": "2026-11-21T10:00:00Z"})
END = json.dumps({"event": "end", "run_id": "r1", "finished_at": "2026-11-21T10:00:02Z"})


def write(folder: Path, *lines: str, tail: str = "") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "ledger.jsonl").write_text("\n".join(lines) + "\n" + tail)
    return folder


def test_finished_folder_counts_latest_outcome_per_key(tmp_path: Path) -> None:
    """A later result for the same key replaces the earlier one; failures are grouped."""
    folder = write(
        tmp_path,
        RUN,
        result("a#0", "failed"),
        result("a#0", "ok"),
        result("b#0", "ok", model="gpt-image-1", n=4),
        result("c#0", "failed"),
        END,
    )
    data = read_status(folder).to_dict()
    assert (data["ok_requests"], data["ok_images"], data["failed_requests"]) == (2, 5, 1)
    assert data["failures"] == {"content_policy": 1}
    assert data["failure_examples"]["content_policy"] == "rejected"
    assert data["retries"] == 4
    assert data["last_run_ended"] is True


def test_crashed_folder_with_torn_tail_is_read(tmp_path: Path) -> None:
    """A run killed mid-write (no end event, torn last line) still gives the recorded counts."""
    folder = write(tmp_path, RUN, result("a#0", "ok"), tail='{"event":"result","key":"b#')
    data = read_status(folder).to_dict()
    assert (data["ok_requests"], data["runs"], data["last_run_ended"]) == (1, 1, False)


def test_folder_without_ledger_is_a_ledger_error(tmp_path: Path) -> None:
    """A folder nothing has run in is a clear LedgerError."""
    with pytest.raises(LedgerError, match="nothing has run there yet"):
        read_status(tmp_path)


def test_an_unreadable_ledger_is_a_ledger_error(tmp_path: Path) -> None:
    """A ledger that cannot be opened is one clear LedgerError, not an OSError traceback."""
    (tmp_path / "ledger.jsonl").mkdir()
    with pytest.raises(LedgerError, match="cannot read the ledger"):
        read_status(tmp_path)
