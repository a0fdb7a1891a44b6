"""Tests for the results ledger, its in-memory state and the output folder lock."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cometbatch import CometBatchError, LedgerError, OutputError
from cometbatch.ledger import _scan as _ledgerscan
from cometbatch.ledger.events import LEDGER_NAME, iter_events, repair_tail
from cometbatch.ledger.index import LedgerState
from cometbatch.ledger.keystate import KeyState
from cometbatch.ledger.writer import Ledger
from cometbatch.results import ImageRecord
from cometbatch.settings import FsyncPolicy
from cometbatch.store.interface import AppendLog
from cometbatch.store.local import LocalStore
from cometbatch.store.lock import LOCK_NAME, FolderLock

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


# Left out of a hand-edited entry.
_ABSENT_FIELD = object()
# A fingerprint as the planner writes them (16 hex digits): such rows are kept compact.
PLANNED = "0123456789abcdef"
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


def every_reader(out: Path) -> list[tuple[str, Callable[[], object]]]:
    """Each reader of OUT's ledger, by name: what a damaged line must fail alike."""
    from cometbatch.views.gallery.content import read_gallery
    from cometbatch.views.jobresults import read_jobs
    from cometbatch.views.status import read_status

    path = out / LEDGER_NAME
    return [
        ("events", lambda: list(iter_events(path))),
        ("resume", lambda: LedgerState.load(path)),
        ("status", lambda: read_status(out)),
        ("gallery", lambda: read_gallery(out)),
        ("export", lambda: list(read_jobs(out))),
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", ["ok"]),
        ("key", 5),
        ("job_id", None),
        ("chunk", "0"),
        ("n", "3"),
        ("n", -1),
        ("n", True),
        ("images", {"a": 1}),
        ("images", [5]),
        ("downloads", "url"),
        ("attempts", "x"),
        ("error", "boom"),
        ("model", ["dall-e-3"]),
        ("finished_at", 5),
    ],
)
def test_a_result_field_of_the_wrong_type_names_the_line_for_every_reader(
    tmp_path: Path, field: str, value: Any
) -> None:
    """A hand-edited result line with a field of the wrong JSON type is a LedgerError naming
    the line and the field, for resume, status, gallery and export alike."""
    path = tmp_path / LEDGER_NAME
    bad = result("b", status="failed")
    bad[field] = value
    write_lines(path, RUN, result("a"), bad, END)
    for name, read in every_reader(tmp_path):
        with pytest.raises(
            LedgerError, match=f"line 3 is not a valid 'result' event: .*'{field}'"
        ) as info:
            read()
        assert str(path) in str(info.value), name


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"tries": "x"}, "tries"),
        ({"tries": -1}, "tries"),
        ({"tries": True}, "tries"),
        ({"tries": 1.5}, "tries"),
        ({"first_failed_at": 5}, "first_failed_at"),
        ({"first_failed_at": ["2026-01-01"]}, "first_failed_at"),
        ({"index": "0"}, "index"),
        ({"url": None}, "url"),
        ({"url": _ABSENT_FIELD}, "url"),
    ],
)
def test_a_download_entry_of_the_wrong_type_names_the_line_and_field_for_every_reader(
    tmp_path: Path, entry: dict[str, Any], field: str
) -> None:
    """A hand-edited link of a download_failed line (`downloads[].tries`, `first_failed_at`,
    `index`, `url`) of the wrong type is a LedgerError naming the line and the field, for
    resume, status, gallery and export alike, not a crash inside one of them."""
    link = {"index": 0, "url": "https://img.example/0.png", "tries": 1, "first_failed_at": None}
    link.update(entry)
    link = {name: value for name, value in link.items() if value is not _ABSENT_FIELD}
    path = tmp_path / LEDGER_NAME
    bad = result("b", status="download_failed", downloads=[link])
    write_lines(path, RUN, result("a"), bad, END)
    readers = every_reader(tmp_path)
    expected = rf"line 3 is not a valid 'result' event: .*downloads\[0\].*'{field}'"
    for name, read in readers:
        with pytest.raises(LedgerError, match=expected) as info:
            read()
        assert str(path) in str(info.value), name


def test_status_of_a_result_with_a_wrong_type_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    """The CLI says which line is wrong, in one line, with the exit code of a usage error."""
    write_lines(tmp_path / LEDGER_NAME, RUN, result("a", status=["ok"]))  # type: ignore[arg-type]
    done = subprocess.run(
        [sys.executable, "-m", "cometbatch", "status", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.count("\n") == 1 and "line 2" in done.stderr and "internal" not in done.stderr
    )


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


@pytest.mark.parametrize("policy", ["end", "batch", "always"])
async def test_fsync_policies_append_whole_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: FsyncPolicy
) -> None:
    """Every policy appends whole lines; "end" fsyncs only at close, the others before each
    append returns."""
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    async with Ledger(tmp_path, fsync=policy) as ledger:
        opened = len(synced)
        await ledger.append(RUN)
        await ledger.append(result("a"))
        assert len(synced) - opened == (0 if policy == "end" else 2)
    assert len(synced) - opened == (1 if policy == "end" else 3)
    assert LedgerState.load(tmp_path / LEDGER_NAME).results == 1


def test_an_unknown_fsync_policy_is_refused(tmp_path: Path) -> None:
    """A policy name that does not exist fails at construction, naming the choices."""
    with pytest.raises(ValueError, match="end, batch, always"):
        Ledger(tmp_path, fsync="sometimes")  # type: ignore[arg-type]


async def test_appends_queued_during_a_write_share_the_next_one(tmp_path: Path) -> None:
    """Lines appended while a write is under way go out together: 200 concurrent appends take
    far fewer writes than lines, each returning once its own line is on disk, in order."""
    path = tmp_path / LEDGER_NAME
    async with Ledger(tmp_path) as ledger:

        async def append(i: int) -> None:
            await ledger.append(result(f"job{i}"))
            # Returned: this line is in the file (whole), not just queued.
            assert f'"key":"job{i}#0"'.encode() in path.read_bytes()
            assert f"job{i}#0" in ledger.state

        async with asyncio.TaskGroup() as group:
            for i in range(200):
                group.create_task(append(i))
        assert ledger.writes < 200
        assert "pending=0" in repr(ledger)
    keys = [e["key"] for _, e in iter_events(path)]
    assert keys == [f"job{i}#0" for i in range(200)]


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


async def test_server_text_is_written_as_escapes_and_read_back_the_same(tmp_path: Path) -> None:
    """Controls, C1 codes, bidi overrides and lone surrogates are \\u escapes on disk: each line
    is strict UTF-8 a terminal can show, and reads back as the same text."""
    text = "t\x1b]0;pwned\x07 \x1b[2J \u202e \ud800 \x9b31m é🐱"
    async with Ledger(tmp_path) as ledger:
        await ledger.append(result("a", metadata={"odd": text}))
    data = (tmp_path / LEDGER_NAME).read_bytes()
    shown = data.decode("utf-8")
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e\ud800-\udfff]", shown)
    assert "é🐱" in shown  # other text stays as it is
    [(_, event)] = list(iter_events(tmp_path / LEDGER_NAME))
    assert event["metadata"] == {"odd": text}
    assert LedgerState.load(tmp_path / LEDGER_NAME).get("a#0") is not None


class FillingStore(LocalStore):
    """A local store whose disk fills up once `full` is set: every ledger write then fails."""

    full = False

    def open_log(self, name: str, *, sync: bool) -> AppendLog:
        log = super().open_log(name, sync=sync)
        store = self

        class Filling:
            path = log.path
            on_loop = log.on_loop

            def append(self, data: bytes, sync: bool) -> int | None:
                if store.full:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return log.append(data, sync)

            def close(self, sync: bool) -> None:
                log.close(sync)

        return Filling()


async def test_failed_write_stops_further_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed write is an OutputError; later appends refuse so a partial line stays last."""
    store = FillingStore(tmp_path)
    async with Ledger(tmp_path, store=store) as ledger:
        await ledger.append(RUN)
        store.full = True
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
        from cometbatch.store.lock import FolderLock
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


# --- the compact state and the fast path for result lines -------------------------------


def folded(path: Path) -> dict[str, KeyState]:
    """What a ledger holds, folded the plain way: every line through json and from_event."""
    latest: dict[str, KeyState] = {}
    for _, event in iter_events(path):
        if event["event"] == "result":
            latest[event["key"]] = KeyState.from_event(event)
    return latest


def assert_loads_like_json(path: Path) -> LedgerState:
    """LedgerState.load agrees with folding every line through json, key by key and in order."""
    state = LedgerState.load(path)
    expected = folded(path)
    assert [key for key, _ in state.items()] == list(expected)
    for key, value in state.items():
        assert value == expected[key], key
        assert state.get(key) == expected[key]
    assert len(state) == len(expected)
    counts = {"ok": 0, "failed": 0}
    for value in expected.values():
        counts[value.status] = counts.get(value.status, 0) + 1
    # A status no key has any more may stay listed, at 0.
    assert {k: v for k, v in state.counts().items() if v or k in ("ok", "failed")} == counts
    return state


# Text JSON writes as it is, and text it must escape (quotes, backslashes, controls, surrogates).
_PLAIN_TEXT = st.text(st.sampled_from(list("ab#-_. /é猫\U0001f431")), max_size=8)
_TEXT = st.text(st.sampled_from(list('ab#-_. "\\/é猫\U0001f431\x00\n\ud800')), max_size=8)


def json_values(text: st.SearchStrategy[str], *, deep: bool) -> st.SearchStrategy[Any]:
    """JSON values with strings drawn from `text`: nested a little, or deep and with floats
    that json writes as Infinity."""
    floats = st.floats(allow_nan=False, allow_infinity=deep)
    return st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | floats | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8 if deep else 3,
    )


_HEX16 = st.text("0123456789abcdef", min_size=16, max_size=16)


@st.composite
def result_lines(draw: st.DrawFn) -> str:
    """Result lines as the Ledger writes them, mostly, and in many other legal shapes."""
    ours = draw(st.booleans())  # as the Ledger writes: compact UTF-8, plain text, its order
    text = _PLAIN_TEXT if ours else draw(st.sampled_from([_PLAIN_TEXT, _TEXT]))
    job_id = draw(st.sampled_from(["a", "b", "c/d", "e#f"]) | text.filter(bool))
    chunk = draw(st.integers(0, 2))
    statuses = ["ok", "ok", "failed", "download_failed"] + ([] if ours else ["weird"])
    status = draw(st.sampled_from(statuses))
    event = result(job_id, chunk, status if status != "weird" else "failed")
    event["status"] = status
    odd_fingerprints = st.sampled_from([None, "F" * 16, "f" * 64, "xyz"])
    event["fingerprint"] = draw(_HEX16 if ours else _HEX16 | odd_fingerprints)
    event["n"] = draw(st.integers(0, 12) if ours else st.sampled_from([0, 2**40]))
    if not ours and draw(st.booleans()):
        event["key"] = draw(text)
    fmt = st.sampled_from(["png", "jpeg", "webp", "gif"])
    event["images"] = [
        image(job_id, index, format=draw(fmt), bytes=draw(st.integers(0, 2**40)),
              sha256=draw(st.sampled_from([SHA, "XYZ", ""])),
              path=draw(st.sampled_from([f"images/{job_id}/{index}.png", "images/x/0.png"])),
              revised_prompt=draw(st.none() | text))
        for index in range(draw(st.integers(0, 3)))
    ]  # fmt: skip
    event["downloads"] = (
        [{"index": 1, "url": draw(text), "revised_prompt": draw(st.none() | text)}]
        if status == "download_failed" and draw(st.booleans())
        else []
    )
    if status != "ok":
        retryable = draw(st.sampled_from([True, False, None, "yes", 1, 0]))
        # "missing_image" withdraws images (KeyState.withdraws); a kind may be any JSON.
        kind = draw(st.sampled_from(["x", "missing_image", "replaced", ["x"]]))
        event["error"] = draw(
            st.sampled_from([None, {"kind": kind, "retryable": retryable}, {"kind": "y"}])
        )
    event["metadata"] = draw(json_values(text, deep=not ours))
    event["usage"] = draw(st.none() | json_values(text, deep=not ours))
    if draw(st.booleans()):
        # Lines since results count their 429s and cost: each after its neighbour; and since
        # answers are kept, what the answer said, when it said anything, after the usage.
        costs = st.fixed_dictionaries({"usd": st.none() | st.floats(0, 100), "basis": text})
        answers = st.fixed_dictionaries(
            {}, optional={"created": st.integers(0, 2**40), "size": text, "quality": text}
        )
        added: dict[str, list[tuple[str, Any]]] = {
            "ambiguous_retries": [("rate_limited", draw(st.integers(0, 99)))],
            "usage": [
                ("response", draw(answers)),
                ("request_id", draw(text)),
                ("cost", draw(st.none() | costs)),
            ],
        }
        left_out = draw(st.sets(st.sampled_from(["response", "request_id"])))
        grown: dict[str, Any] = {}
        for name, value in event.items():
            grown[name] = value
            for new, new_value in added.get(name, ()):
                if new not in left_out:
                    grown[new] = new_value
        event = grown
    # The Ledger's field order (Result.to_event): downloads follow images.
    order = [*list(event)[: list(event).index("images") + 1], "downloads"]
    event = {name: event[name] for name in [*order, *(k for k in event if k not in order)]}
    if not ours and draw(st.booleans()):
        items = list(event.items())
        draw(st.randoms()).shuffle(items)
        event = dict(items)
    compact = ours or draw(st.booleans())
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(event, ensure_ascii=not ours and draw(st.booleans()), separators=separators)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(result_lines() | st.just(None), max_size=12),
    st.sampled_from([64, 1000, 1 << 20]),
)
def test_load_agrees_with_json_on_any_result_lines(lines: list[str | None], block: int) -> None:
    """Whatever shape result lines take, and however blocks split them, loading gives what
    folding each line through json gives."""
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(_ledgerscan, "_READ_SIZE", block)
        path = Path(folder) / LEDGER_NAME
        text = [json.dumps(RUN) if line is None else line for line in [None, *lines]]
        data = "".join(line + "\n" for line in text).encode("utf-8", "surrogatepass")
        # Lone surrogates end up as (invalid) UTF-8 bytes here: json.loads reads them still.
        path.write_bytes(data)
        state = assert_loads_like_json(path)
        assert state.results == len([line for line in lines if line is not None])
        assert state.runs == 1 + lines.count(None)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_fast_pattern_takes_no_line_json_refuses(data: st.DataObject) -> None:
    """A damaged result line that the fast pattern still takes is one json reads the same."""
    line = data.draw(result_lines()).encode("utf-8", "surrogatepass") + b"\n"
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(line) - 1))
        byte = data.draw(st.sampled_from(list(b'"{}[],:0123456789-.eE\\ antrufls#\n\x00\x7f')))
        head, tail = line[:at], line[at:]
        damaged = [head + tail[1:], head + bytes([byte]) + tail, head + bytes([byte]) + tail[1:]]
        line = data.draw(st.sampled_from(damaged))
    if not line.endswith(b"\n") or line.count(b"\n") != 1 or not _ledgerscan._plain_lines(line):
        return  # the fast pattern never sees such a line
    found = _ledgerscan.result_line().fullmatch(line)
    if found is None:
        return
    parsed = json.loads(line)
    key, job_id, status, fingerprint, n = found.group(2, 3, 4, 5, 6)
    assert parsed["event"] == "result"
    assert parsed["key"] == key.decode() and parsed["job_id"] == job_id.decode()
    assert key.decode().rpartition("#")[0] == parsed["job_id"]
    assert (parsed["status"], parsed["fingerprint"]) == (status.decode(), fingerprint.decode())
    assert parsed["n"] == int(n)


@pytest.mark.parametrize("block", [1000, 1 << 20])
def test_a_ledger_in_this_packages_shape_loads_compactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """Results the engine writes take the fast path and no whole objects; images stay on disk
    (read in blocks of a few lines, the index grows as it goes)."""
    monkeypatch.setattr(_ledgerscan, "_READ_SIZE", block)
    path = tmp_path / LEDGER_NAME
    later = result("a", fingerprint="0" * 16, status="failed")
    later["error"]["retryable"] = False
    # A long first line makes the index's first sizing too small: it grows during the load.
    first = result("long", fingerprint="f" * 16, metadata={"pad": "x" * 20_000})
    lines = [RUN, first, *(result(f"j{i}", fingerprint=f"{i:016x}") for i in range(300)), later]
    path.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in lines))
    state = assert_loads_like_json(path)
    assert not state._whole
    assert len(state) == 302 and state.results == 302
    recorded = state.get("j7#0")
    assert recorded is not None and "images=?" in repr(recorded)
    assert recorded.images == [{k: v for k, v in image("j7").items() if k != "revised_prompt"}]
    a = state.get("a#0")
    assert a is not None and (a.status, a.retryable, a.fingerprint) == ("failed", False, "0" * 16)


def test_result_lines_the_engine_writes_take_the_fast_path() -> None:
    """A Result's ledger line, with its 429 count, cost and answer, matches the fast pattern."""
    from cometbatch import Job, ModelRegistry, Result
    from cometbatch.ledger.writer import _encode
    from cometbatch.net.answered import Answered
    from cometbatch.plan import plan_job
    from cometbatch.results import ImageRecord

    job = Job(id="fast", prompt="p", model="dall-e-3", metadata={"sku": "A-1"})
    (request,) = plan_job(job, ModelRegistry().get("dall-e-3"))
    record = ImageRecord(index=0, path="images/fast/0.png", format="png", bytes=9, sha256=SHA)
    answers = (Answered(), Answered("req_1", 17, "1024x1024", "high", "png", "opaque"))
    for (cost, basis), answer in itertools.product(((0.04, "list"), (None, "unpriced")), answers):
        result = Result.of(
            request, "r1", "ok", images=(record,), attempts=3, rate_limited=2,
            usage={"input_tokens": 1}, cost_usd=cost, cost_basis=basis, answered=answer,
        )  # fmt: skip
        line = _encode(result.to_event())
        found = _ledgerscan.result_line().fullmatch(line)
        assert found is not None and found.group(2) == b"fast#0"
        assert json.loads(line)["cost"] == {"usd": cost, "basis": basis}
        assert Answered.of_line(json.loads(line)) == answer


def test_an_image_that_came_as_a_link_keeps_its_url(tmp_path: Path) -> None:
    """`url` is written only for an image downloaded from a link (an inline image's line is
    as before); such lines still take the fast path, and their state keeps the links."""
    record = ImageRecord(index=0, path="images/u/0.png", format="png", bytes=9, sha256=SHA)
    assert "url" not in record.to_dict()
    linked = dataclasses.replace(record, url="https://img.example/u/0.png?sig=x")
    assert linked.to_dict()["url"] == "https://img.example/u/0.png?sig=x"
    path = tmp_path / LEDGER_NAME
    images = [image("u", 0, url="https://img.example/0.png"), image("u", 1, path="images/u/1.png")]
    lines = [RUN, result("u", fingerprint=PLANNED, n=2, images=images), result("b")]
    path.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in lines))
    assert _ledgerscan.result_line().fullmatch(path.read_bytes().splitlines(keepends=True)[1])
    state = assert_loads_like_json(path)
    u = state.get("u#0")
    assert u is not None and "images=?" in repr(u)
    assert [i.get("url") for i in u.images] == ["https://img.example/0.png", None]
    b = state.get("b#0")
    assert b is not None and all("url" not in i for i in b.images)
    bad = result("u", images=[image("u", 0, url=7)])
    write_lines(path, RUN, bad)
    with pytest.raises(LedgerError, match=r"line 2 .*images\[0\] 'url' is 7, not a string"):
        LedgerState.load(path)


def test_a_later_line_for_a_key_replaces_it_in_place(tmp_path: Path) -> None:
    """A retried key keeps its first place, takes its last line's state, and counts once."""
    path = tmp_path / LEDGER_NAME
    fp = "0123456789abcdef"
    lines = [
        result("a", status="failed", fingerprint=fp),
        result("b", fingerprint=fp),
        result("a", fingerprint=fp, n=3),
        result("b", status="download_failed", fingerprint=fp),
    ]
    path.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in lines))
    state = assert_loads_like_json(path)
    assert [key for key, _ in state.items()] == ["a#0", "b#0"]
    assert state.counts() == {"ok": 1, "failed": 0, "download_failed": 1}
    a = state.get("a#0")
    assert a is not None and (a.status, a.n) == ("ok", 3)
    assert (len(state), state.results) == (2, 4)


async def test_appended_results_are_found_in_the_file_not_kept(tmp_path: Path) -> None:
    """Results appended through the Ledger point at their lines; their images read back."""
    async with Ledger(tmp_path) as ledger:
        await ledger.append(RUN)
        async with asyncio.TaskGroup() as group:
            for i in range(40):
                group.create_task(ledger.append(result(f"j{i}", fingerprint=f"{i:016x}")))
        await ledger.append(result("j3", status="failed", fingerprint="f" * 16))
        state = ledger.state
        assert state._following and not state._whole
        assert state.get("j3#0") == KeyState("j3#0", "failed", "f" * 16, True, "j3", 1)
        j9 = state.get("j9#0")
        assert j9 is not None and j9.images[0]["path"] == "images/j9/0.png"
    assert_loads_like_json(tmp_path / LEDGER_NAME)


def test_the_state_says_which_failures_withdrew_images(tmp_path: Path) -> None:
    """A failed line whose error kind withdraws images is flagged in the compact row, on the
    fast path, the whole-line path and an append alike; any other result is not."""
    withdrawing = {"kind": "missing_image", "retryable": True}
    taken = {"images": [image("w")], "usage": None, "cost": None, "run_id": "r0"}
    lines = [
        RUN,
        result("a", fingerprint=PLANNED),
        result("f", status="failed", fingerprint=PLANNED),
        result("m", status="failed", fingerprint=PLANNED, error=withdrawing),
        result("w", status="failed", fingerprint=PLANNED, error=withdrawing, withdrawn=taken),
        result("d", status="download_failed", fingerprint=PLANNED, error=withdrawing),
    ]
    # As the Ledger writes them: the result lines without "withdrawn" take the fast path.
    compact = [json.dumps(line, separators=(",", ":")) for line in lines]
    write_lines(tmp_path / LEDGER_NAME, *compact)
    state = assert_loads_like_json(tmp_path / LEDGER_NAME)
    assert not state._whole  # every row compact: the flag is one of its bits
    flagged = {key for key, recorded in state.items() if recorded.withdraws}
    assert flagged == {"m#0", "w#0"}
    fresh = LedgerState()
    for line in lines:
        fresh.apply(line)
    assert {key for key, recorded in fresh.items() if recorded.withdraws} == flagged


async def test_results_are_kept_whole_when_the_file_is_not_as_expected(tmp_path: Path) -> None:
    """If a line turns up that the Ledger did not write, states are kept in memory instead."""
    async with Ledger(tmp_path) as ledger:
        await ledger.append(result("a", fingerprint="a" * 16))
        append_bytes(tmp_path / LEDGER_NAME, b'{"event":"note"}\n')
        await ledger.append(result("b", fingerprint="b" * 16))
        await ledger.append(result("c", fingerprint="c" * 16))
        state = ledger.state
        assert not state._following and sorted(state._whole) == [1, 2]
        for key in ("a", "b", "c"):
            recorded = state.get(f"{key}#0")
            assert recorded is not None and recorded.image_bytes == 1234


def append_bytes(path: Path, data: bytes) -> None:
    """Another writer appending to the ledger behind the Ledger's back."""
    with open(path, "ab") as handle:
        handle.write(data)


def test_a_ledger_changed_under_a_state_is_an_error(tmp_path: Path) -> None:
    """Images of a key whose line moved away are refused, not read from another line."""
    path = tmp_path / LEDGER_NAME
    write_lines(path, RUN, result("a", fingerprint="a" * 16), result("b", fingerprint="b" * 16))
    state = LedgerState.load(path)
    write_lines(path, RUN, result("b", fingerprint="b" * 16))
    recorded = state.get("b#0")
    assert recorded is not None
    with pytest.raises(LedgerError, match="changed while it was in use"):
        recorded.images  # noqa: B018


def test_lines_needing_escapes_keep_their_line_numbers(tmp_path: Path) -> None:
    """A block with escaped text takes the careful path and still names a bad line exactly."""
    path = tmp_path / LEDGER_NAME
    quoted = result('say "hi"', fingerprint="a" * 16, metadata={"tab": "\t"})
    write_lines(path, RUN, quoted, result("x", fingerprint="b" * 16), "{oops", result("y"))
    with pytest.raises(LedgerError, match="line 4 is not valid JSON"):
        LedgerState.load(path)
    write_lines(path, RUN, quoted, result("x", fingerprint="b" * 16))
    assert_loads_like_json(path)


def recorded(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The images a state holds, without the fields it adds (revised_prompt: None)."""
    return [{k: v for k, v in img.items() if v is not None} for img in images]


async def test_appended_results_are_kept_as_offsets_without_reading_the_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results the Ledger appends are remembered as their line's offset (memory stays flat
    over millions of results), placed from the bytes written rather than by re-reading the
    file, and each reads back exactly as recorded."""
    async with Ledger(tmp_path) as ledger:
        await ledger.append(RUN)
        await ledger.append(result("before", fingerprint=PLANNED))

    def no_read_back(self: LedgerState) -> bytes | None:
        raise AssertionError("the ledger file was read back")

    monkeypatch.setattr(LedgerState, "_next_line", no_read_back)
    async with Ledger(tmp_path) as ledger:
        await ledger.append(RUN)
        await asyncio.gather(
            *(ledger.append(result(f"k{i}", fingerprint=PLANNED)) for i in range(40))
        )
        await ledger.append(result("k3", status="failed", fingerprint=PLANNED))
        assert not ledger.state._whole
        for i in range(40):
            state = ledger.state.get(f"k{i}#0")
            assert state is not None
            expected = [] if i == 3 else recorded([image(f"k{i}")])
            assert (state.status, recorded(state.images)) == (
                "failed" if i == 3 else "ok",
                expected,
            )


async def test_a_foreign_append_makes_the_state_keep_results_in_memory(tmp_path: Path) -> None:
    """If the file does not end where the Ledger's writes put it (someone else appended),
    offsets can no longer be trusted: later results are kept whole, and still read right."""
    async with Ledger(tmp_path) as ledger:
        await ledger.append(RUN)
        await ledger.append(result("a", fingerprint=PLANNED))
        assert not ledger.state._whole
        with (tmp_path / LEDGER_NAME).open("ab") as other:
            other.write(json.dumps(result("stranger")).encode() + b"\n")
        await ledger.append(result("b", fingerprint=PLANNED))
        await ledger.append(result("c", fingerprint=PLANNED))
        assert len(ledger.state._whole) == 2  # b and c; a keeps its offset
        for key in ("a", "b", "c"):
            state = ledger.state.get(f"{key}#0")
            assert state is not None and recorded(state.images) == recorded([image(key)])


def test_an_interrupt_mid_write_breaks_the_ledger_instead_of_wedging_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that lands while a line is written on the loop fails later appends; close ends."""
    from cometbatch.store import local

    original = local.LocalLog.append
    calls = {"n": 0}

    def torn_append(self: local.LocalLog, data: bytes, sync: bool) -> int | None:
        calls["n"] += 1
        if calls["n"] == 2:
            self.handle.write(data[: len(data) // 2])
            raise KeyboardInterrupt
        return original(self, data, sync)

    monkeypatch.setattr(local.LocalLog, "append", torn_append)
    seen: dict[str, object] = {}

    async def main() -> None:
        ledger = Ledger(tmp_path)
        await ledger.__aenter__()
        await ledger.append({"event": "run", "run_id": "r"})
        torn = asyncio.create_task(ledger.append({"event": "end", "run_id": "r", "summary": {}}))
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(torn), 5)
        try:
            await asyncio.wait_for(ledger.append({"event": "run", "run_id": "r2"}), 5)
        except BaseException as exc:
            seen["append"] = exc
        await asyncio.wait_for(ledger.aclose(), 5)
        seen["closed"] = True

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(main())
    assert isinstance(seen.get("append"), CometBatchError)
    assert seen.get("closed") is True
