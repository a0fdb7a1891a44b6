"""Tests for the results ledger, its in-memory state and the output folder lock."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cometbatch.errors import LedgerError, OutputError
from cometbatch.events import LEDGER_NAME, iter_events, repair_tail
from cometbatch.ledger import Ledger
from cometbatch.lock import LOCK_NAME, FolderLock
from cometbatch.state import KeyState, LedgerState

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef" * 4


def image(job_id: str, index: int = 0, **overrides: Any) -> dict[str, Any]:
    """A ledger image object as the sink records it."""
    record = {
        "index": index,
        "path": f"images/{job_id}/{index}.png",
        "format": "png",
        "bytes": 1234,
        "sha256": SHA,
        "revised_prompt": None,
    }
    record.update(overrides)
    return record


def result(job_id: str, chunk: int = 0, status: str = "ok", **overrides: Any) -> dict[str, Any]:
    """A result event with the contract's fields."""
    event: dict[str, Any] = {
        "event": "result",
        "run_id": "r1",
        "key": f"{job_id}#{chunk}",
        "job_id": job_id,
        "chunk": chunk,
        "status": status,
        "fingerprint": "f" * 64,
        "model": "dall-e-3",
        "n": 1,
        "images": [image(job_id)] if status == "ok" else [],
        "attempts": 1,
        "ambiguous_retries": 0,
        "error": None,
        "latency_s": 1.5,
        "finished_at": "2026-01-01T00:00:00+00:00",
        "usage": None,
        "metadata": {"tag": "x"},
    }
    if status == "failed":
        event["error"] = {
            "kind": "rate_limit",
            "status": 429,
            "code": None,
            "message": "slow down",
            "request_id": None,
            "retryable": True,
        }
    event.update(overrides)
    return event


RUN = {"event": "run", "run_id": "r1", "started_at": "2026-01-01T00:00:00+00:00", "settings": {}}
END = {"event": "end", "run_id": "r1", "finished_at": "2026-01-01T00:01:00+00:00", "summary": {}}


def write_lines(path: Path, *lines: str | dict[str, Any], tail: str = "") -> None:
    """Write a ledger file from events or raw lines, plus an unterminated tail."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text + tail, encoding="utf-8")


# --- reading ---------------------------------------------------------------------------


def test_iter_events_streams_events_with_line_numbers(tmp_path: Path) -> None:
    """Events come with their 1-based line numbers and blank lines are skipped."""
    path = tmp_path / LEDGER_NAME
    write_lines(path, RUN, "", "   ", result("a"), END)
    assert [(n, e["event"]) for n, e in iter_events(path)] == [
        (1, "run"),
        (4, "result"),
        (5, "end"),
    ]


@pytest.mark.parametrize(
    "tail", ['{"event":"resu', '{"event":"result","key":"b#0"', "\x00\x00\x00"]
)
def test_torn_last_line_is_skipped(tmp_path: Path, tail: str) -> None:
    """An unterminated, unparseable last line (a crash mid-write) is skipped and noted."""
    path = tmp_path / LEDGER_NAME
    write_lines(path, RUN, result("a"), tail=tail)
    assert [e["event"] for _, e in iter_events(path)] == ["run", "result"]
    state = LedgerState.load(path)
    assert state.torn_tail is True
    assert len(state) == 1


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    """A last line that is a whole event but lost its newline still counts."""
    path = tmp_path / LEDGER_NAME
    write_lines(path, RUN, tail=json.dumps(result("a")))
    state = LedgerState.load(path)
    assert state.torn_tail is False
    assert state.get("a#0") is not None
    assert repair_tail(path) is True
    assert path.read_text().endswith("}\n")
    assert LedgerState.load(path).get("a#0") is not None


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"event":"result",', "line 2 is not valid JSON"),
        ("not json at all", "line 2 is not valid JSON"),
        ('{"event":"run"} trailing', "line 2 is not valid JSON"),
        (b"\xff\xfe{}".decode("latin-1"), "line 2 is not valid JSON"),
        ("[1, 2]", "line 2 is not a ledger event"),
        ("42", "line 2 is not a ledger event"),
        ('{"status":"ok"}', "line 2 is not a ledger event"),
    ],
)
def test_corrupt_middle_line_names_the_line(tmp_path: Path, bad: str, message: str) -> None:
    """A bad line that is not the last one is an error naming its line number."""
    path = tmp_path / LEDGER_NAME
    write_lines(path, RUN, bad, result("a"))
    with pytest.raises(LedgerError, match=message):
        list(iter_events(path))
    with pytest.raises(LedgerError, match=message):
        LedgerState.load(path)


def test_result_missing_fields_names_the_line(tmp_path: Path) -> None:
    """A result event without its key is an error naming the line."""
    path = tmp_path / LEDGER_NAME
    bad = result("a")
    del bad["key"]
    write_lines(path, RUN, result("b"), bad)
    with pytest.raises(LedgerError, match="line 3 is not a valid 'result' event"):
        LedgerState.load(path)


def test_leading_whitespace_and_crlf_lines_are_read(tmp_path: Path) -> None:
    """Lines a person edited (indented, CRLF) are still valid JSON and are read."""
    path = tmp_path / LEDGER_NAME
    path.write_bytes(b'  {"event":"run"}\r\n' + json.dumps(result("a")).encode() + b"\r\n")
    state = LedgerState.load(path)
    assert state.runs == 1
    assert len(state) == 1


def test_missing_ledger_is_empty(tmp_path: Path) -> None:
    """A folder without a ledger loads as an empty state."""
    state = LedgerState.load(tmp_path / LEDGER_NAME)
    assert len(state) == 0
    assert state.counts() == {"ok": 0, "failed": 0}
    assert (state.runs, state.results, state.torn_tail) == (0, 0, False)


def test_reading_while_another_process_appends(tmp_path: Path) -> None:
    """A reader skips a line still being written and sees it once it is complete."""
    path = tmp_path / LEDGER_NAME
    line = json.dumps(result("b")).encode() + b"\n"
    with open(path, "ab") as writer:
        writer.write(json.dumps(result("a")).encode() + b"\n" + line[:40])
        writer.flush()
        assert sorted(k for k, _ in LedgerState.load(path).items()) == ["a#0"]
        writer.write(line[40:])
        writer.flush()
        assert sorted(k for k, _ in LedgerState.load(path).items()) == ["a#0", "b#0"]


# --- repair ----------------------------------------------------------------------------


def test_repair_tail_drops_a_torn_line(tmp_path: Path) -> None:
    """repair_tail truncates back to the last newline, once."""
    path = tmp_path / LEDGER_NAME
    write_lines(path, RUN, result("a"), tail='{"event":"res')
    good = path.read_bytes().rsplit(b"\n", 1)[0] + b"\n"
    assert repair_tail(path) is True
    assert path.read_bytes() == good
    assert repair_tail(path) is False


def test_repair_tail_on_a_file_without_any_newline(tmp_path: Path) -> None:
    """A file holding only a torn line is emptied."""
    path = tmp_path / LEDGER_NAME
    path.write_bytes(b'{"event":"ru' * 10_000)
    assert repair_tail(path) is True
    assert path.read_bytes() == b""


def test_repair_tail_leaves_good_files_alone(tmp_path: Path) -> None:
    """Empty, missing and newline-terminated ledgers are not touched."""
    assert repair_tail(tmp_path / "missing.jsonl") is False
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert repair_tail(empty) is False
    good = tmp_path / LEDGER_NAME
    write_lines(good, RUN)
    assert repair_tail(good) is False


async def test_ledger_open_repairs_a_torn_tail(tmp_path: Path) -> None:
    """Opening a ledger drops a torn last line, so the next append starts a fresh line."""
    path = tmp_path / LEDGER_NAME
    write_lines(path, RUN, result("a"), tail='{"event":"result","ke')
    async with Ledger(tmp_path) as ledger:
        assert ledger.repaired is True
        assert len(ledger.state) == 1
        await ledger.append(result("b"))
    assert [e.get("key") for _, e in iter_events(path)] == [None, "a#0", "b#0"]


# --- state -----------------------------------------------------------------------------


async def test_append_and_load_round_trip(tmp_path: Path) -> None:
    """Events appended through a Ledger load back into the same state."""
    async with Ledger(tmp_path) as ledger:
        await ledger.append(RUN)
        await ledger.append(result("cat", 0))
        await ledger.append(result("cat", 1, status="failed"))
        await ledger.append(result("dog", 0, metadata={"note": "caf\u00e9 \U0001f431"}))
        await ledger.append(END)
        live = ledger.state
    lines = (tmp_path / LEDGER_NAME).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    assert lines[0].startswith('{"event":"run","run_id":"r1"')
    assert "caf\u00e9 \U0001f431" in lines[3]  # written as UTF-8, not \u escapes

    loaded = LedgerState.load(tmp_path / LEDGER_NAME)
    for state in (live, loaded):
        assert (len(state), state.runs, state.results) == (3, 1, 3)
        assert state.counts() == {"ok": 2, "failed": 1}
        assert state.last_run is not None and state.last_run["run_id"] == "r1"
        assert state.last_end is not None
        ok = state.get("cat#0")
        assert ok == KeyState(
            "cat#0",
            "ok",
            "f" * 64,
            None,
            "cat",
            1,
            [image("cat")],
        )
        assert ok.images == [
            {
                "index": 0,
                "path": "images/cat/0.png",
                "format": "png",
                "bytes": 1234,
                "sha256": SHA,
            }
        ]
        failed = state.get("cat#1")
        assert failed is not None
        assert (failed.status, failed.retryable, failed.images) == ("failed", True, [])
        assert state.get("nope#0") is None
        assert "dog#0" in state


def test_later_result_for_the_same_key_wins(tmp_path: Path) -> None:
    """The last result line for a key replaces earlier ones, and counts follow."""
    path = tmp_path / LEDGER_NAME
    retry_later = result("a", status="failed")
    permanent = result("b", status="failed")
    permanent["error"]["retryable"] = False
    write_lines(path, RUN, retry_later, result("a", fingerprint="new"), permanent, RUN)
    state = LedgerState.load(path)
    a = state.get("a#0")
    assert a is not None
    assert (a.status, a.fingerprint, a.retryable, a.image_count) == ("ok", "new", None, 1)
    b = state.get("b#0")
    assert b is not None and b.retryable is False
    assert state.counts() == {"ok": 1, "failed": 1}
    assert (len(state), state.results, state.runs) == (2, 3, 2)


def test_key_state_keeps_unusual_values_exactly(tmp_path: Path) -> None:
    """Values the compact form cannot rebuild (odd paths, job ids, hashes) come back as written."""
    path = tmp_path / LEDGER_NAME
    odd = result(
        "a/b",
        key="custom-key",
        fingerprint="ABCDEF" * 6,
        n=3,
        images=[
            image("a/b", 0, path="images/a_b-1234abcd/0.png", sha256="XYZ"),
            image("a/b", 1, path="images/a_b-1234abcd/1.jpg", format="jpeg", bytes=7),
            image("a/b", 2, path="images/a/b/2.webp", format="webp", sha256="ab" * 32),
        ],
    )
    write_lines(path, odd)
    state = LedgerState.load(path).get("custom-key")
    assert state is not None
    assert (state.job_id, state.fingerprint, state.n) == ("a/b", "ABCDEF" * 6, 3)
    assert state.images == [
        {k: v for k, v in i.items() if k != "revised_prompt"} for i in odd["images"]
    ]
    assert state.image_bytes == 1234 + 7 + 1234
    assert "images=3" in repr(state)


# --- appending -------------------------------------------------------------------------


async def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    """Fifty tasks appending at once produce fifty intact lines."""
    async with Ledger(tmp_path) as ledger:
        big = "x" * 100_000  # larger than any buffer, so a torn interleave would show
        async with asyncio.TaskGroup() as group:
            for i in range(50):
                group.create_task(ledger.append(result(f"job{i}", metadata={"pad": big})))
        assert len(ledger.state) == 50
    lines = (tmp_path / LEDGER_NAME).read_bytes().split(b"\n")
    assert lines[-1] == b""
    events = [json.loads(line) for line in lines[:-1]]
    assert sorted(e["key"] for e in events) == sorted(f"job{i}#0" for i in range(50))


async def test_fsync_mode_appends(tmp_path: Path) -> None:
    """With fsync on, appends still land as whole lines."""
    async with Ledger(tmp_path, fsync=True) as ledger:
        await ledger.append(RUN)
        await ledger.append(result("a"))
    assert LedgerState.load(tmp_path / LEDGER_NAME).results == 1


async def test_cancelled_append_still_writes_a_whole_line(tmp_path: Path) -> None:
    """Cancelling the caller mid-append still leaves one complete line, and the state knows it."""
    async with Ledger(tmp_path) as ledger:
        task = asyncio.create_task(ledger.append(result("a")))
        await asyncio.sleep(0)  # let the append start its write
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await ledger.append(result("b"))
    state = LedgerState.load(tmp_path / LEDGER_NAME)
    assert sorted(k for k, _ in state.items()) == ["a#0", "b#0"]


async def test_malformed_events_are_refused_before_writing(tmp_path: Path) -> None:
    """An event the loader would reject is never written."""
    async with Ledger(tmp_path) as ledger:
        with pytest.raises(ValueError, match="event"):
            await ledger.append({"no": "event"})
        bad = result("a")
        del bad["job_id"]
        with pytest.raises(KeyError):
            await ledger.append(bad)
        with pytest.raises(TypeError):
            await ledger.append({"event": "run", "when": object()})
    assert (tmp_path / LEDGER_NAME).read_bytes() == b""


async def test_lone_surrogates_round_trip(tmp_path: Path) -> None:
    """Text that is not valid UTF-8 (a lone surrogate from JSON input) is escaped, not lost."""
    async with Ledger(tmp_path) as ledger:
        await ledger.append(result("a", metadata={"odd": "\ud800"}))
    [(_, event)] = list(iter_events(tmp_path / LEDGER_NAME))
    assert event["metadata"] == {"odd": "\ud800"}


async def test_failed_write_stops_further_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed write is an OutputError; later appends refuse so a partial line stays last."""
    async with Ledger(tmp_path) as ledger:
        await ledger.append(RUN)
        handle: Any = ledger._file

        async def full_disk(data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(handle, "write", full_disk)
        message = f"cannot write the ledger {ledger.path}: No space left on device; "
        with pytest.raises(OutputError, match=re.escape(message)) as first:
            await ledger.append(result("a"))
        assert isinstance(first.value.__cause__, OSError)
        assert first.value.__cause__.errno == errno.ENOSPC
        # Every later append says the same (concurrent appends race to report first).
        with pytest.raises(OutputError, match=re.escape(message)):
            await ledger.append(result("b"))
        assert ledger.state.results == 0
    assert LedgerState.load(tmp_path / LEDGER_NAME).runs == 1


async def test_ledger_lifecycle_is_one_shot(tmp_path: Path) -> None:
    """A ledger refuses appends when closed and cannot be opened twice; repr shows its state."""
    ledger = Ledger(tmp_path / "out")
    assert "new" in repr(ledger)
    with pytest.raises(RuntimeError):
        await ledger.append(RUN)
    async with ledger:
        assert "open" in repr(ledger)
        with pytest.raises(RuntimeError):
            await ledger.__aenter__()
        await ledger.append(result("a"))
        assert "results=1" in repr(ledger)
    assert "closed" in repr(ledger)
    with pytest.raises(RuntimeError):
        await ledger.append(RUN)
    with pytest.raises(RuntimeError):
        async with ledger:
            pass
    assert (tmp_path / "out" / LOCK_NAME).exists()


# --- the folder lock -------------------------------------------------------------------


def test_second_lock_in_the_same_process_refuses(tmp_path: Path) -> None:
    """Two locks on one folder conflict even within one process, naming the holder."""
    with FolderLock(tmp_path / "out") as first:
        assert first.held
        info = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()
        with pytest.raises(
            LedgerError, match=rf"is in use by another cometbatch run \(pid {os.getpid()} on host "
        ):
            FolderLock(tmp_path / "out").acquire()
        with pytest.raises(RuntimeError):
            first.acquire()
    assert not first.held
    with FolderLock(tmp_path / "out"):
        pass


async def test_ledger_refuses_a_locked_folder(tmp_path: Path) -> None:
    """Opening a ledger whose folder another run holds fails and leaves the lock alone."""
    async with Ledger(tmp_path):
        second = Ledger(tmp_path)
        with pytest.raises(LedgerError, match="wait for it to finish or stop it"):
            await second.__aenter__()
        assert "closed" in repr(second)
    async with Ledger(tmp_path) as third:
        assert len(third.state) == 0


def test_lock_of_a_killed_process_is_free(tmp_path: Path) -> None:
    """A lock held by a process that is SIGKILLed is free again: the OS drops it."""
    out = tmp_path / "out"
    code = textwrap.dedent(
        """
        import sys, time
        from cometbatch.lock import FolderLock
        FolderLock(sys.argv[1]).acquire()
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready, "child did not take the lock in time"
        line = child.stdout.readline()
        assert line == "locked\n", child.stderr.read() if child.stderr else ""
        with pytest.raises(LedgerError, match=f"pid {child.pid} on host"):
            FolderLock(out).acquire()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    with FolderLock(out) as lock:
        assert lock.held
