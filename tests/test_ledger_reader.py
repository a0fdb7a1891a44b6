"""The one ledger reader: typed events in order, a torn last line skipped and then repaired."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cometbatch import LedgerError
from cometbatch.ledger.events import (
    LEDGER_NAME,
    LedgerReader,
    ledger_path,
    read_events,
    repair_tail,
)
from cometbatch.ledger.lines import EndEvent, OtherEvent, ResultEvent, RunEvent


def _line(**fields: Any) -> str:
    return json.dumps(fields) + "\n"


def _result(key: str, status: str, **fields: Any) -> str:
    return _line(event="result", key=key, status=status, n=2, **fields)


def test_each_line_comes_as_its_typed_event(tmp_path: Path) -> None:
    """Run, result, end and other lines come typed, with their line numbers and fields."""
    path = tmp_path / LEDGER_NAME
    path.write_text(
        _line(event="run", manifest="m.jsonl", started_at="t0")
        + "\n"
        + _line(event="sent", key="a#0")
        + _result("a#0", "download_failed", job_id="a", chunk=0, images=[{"index": 0}],
                  downloads=[{"index": 1, "url": "https://x/1.png"}], attempts=0)
        + _line(event="end", finished_at="t1", summary=["not an object"])
    )  # fmt: skip
    events = list(read_events(path))
    assert [type(event) for event in events] == [RunEvent, OtherEvent, ResultEvent, EndEvent]
    assert [event.line for event in events] == [1, 3, 4, 5]
    run, sent, result, end = events
    assert isinstance(run, RunEvent) and (run.manifest, run.started_at) == ("m.jsonl", "t0")
    assert sent.kind == "sent"
    assert isinstance(result, ResultEvent)
    assert (result.key, result.where, result.n, result.generated) == ("a#0", ("a", 0), 2, 2)
    assert result.paid and result.attempts == 0
    assert isinstance(end, EndEvent) and end.summary is None and end.finished_at == "t1"


@pytest.mark.parametrize(
    ("status", "paid"),
    [("ok", True), ("download_failed", True), ("partial", True), ("failed", False)],
)
def test_a_result_is_paid_for_when_it_records_generated_images(status: str, paid: bool) -> None:
    """Which statuses mean a generation was paid for (results.PAID, the one definition)."""
    result = ResultEvent(1, {"event": "result", "key": "j#3", "status": status})
    assert result.paid is paid
    assert result.where == ("j", 3)  # from the key: the line has no job_id or chunk


def test_a_torn_last_line_is_skipped_then_repaired(tmp_path: Path) -> None:
    """A crash mid-write leaves a torn last line: read past and noted, then cut off."""
    path = tmp_path / LEDGER_NAME
    whole = _line(event="run") + _result("a#0", "ok")
    path.write_text(whole + '{"event":"result","key":"b#')
    reader = LedgerReader(path)
    assert [event.kind for event in reader] == ["run", "result"]
    assert reader.torn_tail
    assert repair_tail(path) and path.read_text() == whole


def test_a_folder_without_a_ledger_is_named(tmp_path: Path) -> None:
    """Asking a folder nothing ran in for its ledger is a LedgerError saying so."""
    with pytest.raises(LedgerError, match="nothing has run there yet"):
        ledger_path(tmp_path)
    (tmp_path / LEDGER_NAME).write_text("")
    assert ledger_path(tmp_path) == tmp_path / LEDGER_NAME
