"""`sent` lines: written before each request leaves, read back as "sent, outcome unknown"."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from support import run_all, settings_for

from cometbatch import Engine, Job, LedgerError, SimConfig, Simulator
from cometbatch.cli.config import merge_options, parse_config
from cometbatch.cli.report import summary_lines
from cometbatch.engine.summary import Summary
from cometbatch.errors import ConfigError
from cometbatch.ledger.index import LedgerState
from cometbatch.ledger.runlines import sent_line
from cometbatch.ledger.writer import Ledger
from cometbatch.views.gallery.content import read_gallery
from cometbatch.views.gallery.page import render_page
from cometbatch.views.status import read_status


def _line(**fields: Any) -> str:
    return json.dumps(fields) + "\n"


def _run(run_id: str) -> str:
    return _line(event="run", run_id=run_id, started_at="2026-12-01T10:00:00Z")


def _sent(run_id: str, key: str, n: int = 1, attempt: int = 1) -> str:
    return _line(event="sent", run_id=run_id, key=key, attempt=attempt, n=n, sent_at="t")


def _result(run_id: str, key: str, status: str = "ok", model: str = "dall-e-3", n: int = 1) -> str:
    job_id, _, chunk = key.rpartition("#")
    error = None if status == "ok" else {"kind": "server", "retryable": True}
    return _line(
        event="result", run_id=run_id, key=key, job_id=job_id, chunk=int(chunk), status=status,
        fingerprint="0123456789abcdef", model=model, n=n, images=[], attempts=1,
        ambiguous_retries=0, error=error, latency_s=0.1, finished_at="2026-12-01T10:00:01Z",
        usage=None, metadata=None,
    )  # fmt: skip


def _ledger(folder: Path, *lines: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "ledger.jsonl"
    path.write_text("".join(lines))
    return path


def test_an_old_ledger_without_sent_lines_has_nothing_unanswered(tmp_path: Path) -> None:
    """A ledger written before `sent` lines existed reads as before: nothing unanswered."""
    path = _ledger(tmp_path, _run("r1"), _result("r1", "a#0"), _result("r1", "b#0", "failed"))
    state = LedgerState.load(path)
    assert state.unanswered() == {}
    assert len(state) == 2
    data = read_status(tmp_path).to_dict()
    assert (data["unanswered_requests"], data["unanswered_images"]) == (0, 0)
    assert data["crashes"] == []


def test_a_key_sent_without_a_later_result_is_unanswered(tmp_path: Path) -> None:
    """The latest `sent` of a key with no result after it is unanswered, with its run and n;
    a result after it (any run's) answers it, and a later send replaces it."""
    path = _ledger(
        tmp_path,
        _run("r1"),
        _sent("r1", "a#0"), _result("r1", "a#0"),
        _sent("r1", "b#0", n=3), _result("r1", "b#0", "failed"), _sent("r1", "b#0", 3, 2),
        _sent("r1", "c#0", n=2),
        _sent("r1", "d#0"),
        _run("r2"),
        _result("r2", "d#0"),
        _sent("r2", "c#0", n=4),
    )  # fmt: skip
    state = LedgerState.load(path)
    assert state.unanswered() == {"b#0": ("r1", 3), "c#0": ("r2", 4)}
    assert state.unanswered("r2") == {"b#0": ("r1", 3)}
    # The result lines among the sent lines are indexed as before.
    assert state.get("a#0") is not None and state.get("a#0").status == "ok"  # type: ignore[union-attr]
    assert state.get("b#0").status == "failed"  # type: ignore[union-attr]


def test_a_sent_line_with_a_wrong_field_names_its_line(tmp_path: Path) -> None:
    """A hand-edited `sent` line whose n is not a count is an error naming the line."""
    path = _ledger(tmp_path, _run("r1"), _line(event="sent", run_id="r1", key="a#0", n="two"))
    with pytest.raises(LedgerError, match=r"line 2 is not a valid 'sent' event: .*n must be"):
        LedgerState.load(path)


async def test_appended_lines_are_followed_as_loaded_ones(tmp_path: Path) -> None:
    """The open ledger's index learns sent and result lines as they are appended."""
    async with Ledger(tmp_path) as ledger:
        await ledger.append({"event": "sent", "run_id": "r1", "key": "a#0", "attempt": 1, "n": 2})
        await ledger.append({"event": "sent", "run_id": "r1", "key": "b#0", "attempt": 1, "n": 1})
        assert ledger.state.unanswered() == {"a#0": ("r1", 2), "b#0": ("r1", 1)}
        await ledger.append(json.loads(_result("r1", "a#0")))
        assert ledger.state.unanswered() == {"b#0": ("r1", 1)}
    assert LedgerState.load(tmp_path / "ledger.jsonl").unanswered() == {"b#0": ("r1", 1)}


def test_the_summary_gives_earlier_unanswered_as_requests_and_images() -> None:
    """`--json` names what earlier runs left unanswered, and what this run did with it."""
    summary = Summary(earlier_unanswered=(6, 9), resent_unanswered=6, resent_unanswered_images=9)
    summary.ambiguous_retries = 1
    data = summary.to_dict()
    assert data["earlier_unanswered"] == {"requests": 6, "images": 9}
    assert data["resent_unanswered"] == {"requests": 6, "images": 9}
    assert data["possibly_billed_twice"] == 7
    assert Summary().to_dict()["earlier_unanswered"] == {"requests": 0, "images": 0}


def test_status_counts_each_crash_per_run_with_its_spend(tmp_path: Path) -> None:
    """A run that died with requests out counts them (and their list price); a later run that
    sent them again makes them possibly billed twice; what is still out is listed."""
    _ledger(
        tmp_path,
        _run("r1"),
        _sent("r1", "a#0"), _result("r1", "a#0"),
        _sent("r1", "b#0"), _sent("r1", "c#0", n=2),
        _run("r2"),
        _sent("r2", "b#0"), _result("r2", "b#0"),
    )  # fmt: skip
    status = read_status(tmp_path)
    data = status.to_dict()
    assert (data["unanswered_requests"], data["unanswered_images"]) == (1, 2)
    assert data["unanswered_keys"] == ["c#0"]
    [crash] = data["crashes"]
    assert crash["run_id"] == "r1"
    assert (crash["requests"], crash["images"]) == (2, 3)
    assert (crash["sent_again"], crash["sent_again_images"]) == (1, 1)
    assert data["possibly_billed_twice"] == 1
    # b#0 is priced from its later result (dall-e-3, $0.04 at 1024x1024 standard); c#0's job
    # is in no manifest and has no result: its price is unknown.
    assert crash["estimated_usd"] == pytest.approx(0.04)
    assert crash["unpriced_images"] == 2


def test_retry_ambiguous_overrides_the_settings_file_and_contradicts_its_opposite() -> None:
    """--retry-ambiguous sends held-back requests even when the file turns retrying off."""
    config = parse_config({"retry_ambiguous": False}, "f.toml")
    flags = {"no_retry_ambiguous": False, "retry_ambiguous": True}
    assert merge_options(flags, {"retry_ambiguous"}, config, {})["no_retry_ambiguous"] is False
    assert merge_options(flags, set(), config, {})["no_retry_ambiguous"] is True
    with pytest.raises(ConfigError, match="contradict"):
        merge_options(flags, {"retry_ambiguous", "no_retry_ambiguous"}, config, {})


async def test_each_attempt_writes_its_sent_line_before_its_result(tmp_path: Path) -> None:
    """Every request's `sent` line (run, key, attempt, images asked) precedes its result."""
    jobs = [Job(id=f"j{i}", prompt=f"p {i}", model="gpt-image-1", n=2) for i in range(5)]
    async with (
        Simulator(SimConfig(latency=0.0)) as sim,
        Engine(settings_for(sim), out_dir=tmp_path) as engine,
    ):
        await run_all(engine, jobs)
    events = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    seen: dict[str, int] = {}
    for at, event in enumerate(events):
        if event["event"] == "sent":
            assert set(event) == {"event", "run_id", "key", "attempt", "n", "sent_at"}
            assert (event["run_id"], event["attempt"], event["n"]) == (engine.run_id, 1, 2)
            seen[event["key"]] = at
        elif event["event"] == "result":
            assert seen.pop(event["key"]) < at
    assert seen == {}
    assert LedgerState.load(tmp_path / "ledger.jsonl").unanswered() == {}


async def test_a_held_back_key_is_not_sent_and_says_why(tmp_path: Path) -> None:
    """With retry_ambiguous off, a key an earlier run sent unanswered comes back failed
    ("unanswered") without a request; with it on, it is sent and counted as billed twice."""
    job = Job(id="j", prompt="p", model="gpt-image-1", n=2)
    _ledger(tmp_path, _run("old"), _sent("old", "j#0", n=2))
    async with Simulator(SimConfig(latency=0.0)) as sim:
        async with Engine(settings_for(sim, retry_ambiguous=False), out_dir=tmp_path) as engine:
            [held] = await engine.generate(job)
        assert sim.stats.requests == 0
        assert held.status == "failed" and held.error is not None
        assert held.error["kind"] == "unanswered"
        assert engine.summary.to_dict()["earlier_unanswered"] == {"requests": 1, "images": 2}
        assert engine.summary.held_unanswered == 1
        async with Engine(settings_for(sim), out_dir=tmp_path) as engine:
            [sent] = await engine.generate(job)
        assert sim.stats.requests == 1 and sent.ok
        assert engine.summary.possibly_billed_twice == 1


def test_a_run_that_only_held_requests_back_does_not_say_everything_was_done() -> None:
    """Held-back requests are pending: the report names them instead of "already done"."""
    summary = Summary(planned_requests=3, planned_images=3, skipped_requests=2, held_unanswered=1)
    lines = summary_lines(summary, Path("out"))
    assert not any("everything was already done" in line for line in lines)
    assert any("1 pending" in line for line in lines)
    assert any("were held back" in line and "--retry-ambiguous" in line for line in lines)


def _compact(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":")) + "\n"


async def _twenty_jobs(out: Path) -> None:
    jobs = [Job(id=f"j{i}", prompt=f"p {i}", model="gpt-image-1", n=2) for i in range(20)]
    async with (
        Simulator(SimConfig(latency=0.0)) as sim,
        Engine(settings_for(sim, concurrency=4), out_dir=out) as engine,
    ):
        await run_all(engine, jobs)


def test_sent_lines_among_results_are_read_with_them(tmp_path: Path) -> None:
    """A run's ledger (sent lines between results) loads each key's result at its true offset,
    and sent lines in another shape (escapes, a torn-off one) are read in full or named."""
    asyncio.run(_twenty_jobs(tmp_path))
    path = tmp_path / "ledger.jsonl"
    with open(path, "a") as ledger:
        ledger.write(_compact(sent_line("later", "j3#0", 1, 2)))
        ledger.write(_compact(sent_line("later", 'odd"key#0', 1, 1)))
        ledger.write(_compact(sent_line("later", "j4#0", 1, 2)))
        ledger.write(_result("later", "j4#0", n=2))
    state = LedgerState.load(path)
    assert state.unanswered() == {"j3#0": ("later", 2), 'odd"key#0': ("later", 1)}
    # Each compact row points at its own line: its images are read from there.
    assert [len(s.images) for key, s in state.items() if key != "j4#0"] == [2] * 19
    with open(path, "a") as ledger:
        ledger.write('{"event":"sent","run_id":"later","key":\n')
        ledger.write(_compact(sent_line("later", "j5#0", 1, 2)))
    lines = len(path.read_text().splitlines())
    with pytest.raises(LedgerError, match=f"line {lines - 1} is not valid JSON"):
        LedgerState.load(path)


def test_the_gallery_shows_what_a_crash_may_have_cost(tmp_path: Path) -> None:
    """The page names each run's requests sent and never answered, and those sent again."""
    _ledger(
        tmp_path,
        _run("r1"),
        _sent("r1", "a#0"), _sent("r1", "b#0", n=2),
        _run("r2"),
        _sent("r2", "a#0"), _result("r2", "a#0"),
    )  # fmt: skip
    page = render_page(read_gallery(tmp_path))
    assert (
        "run r1 stopped with 2 request(s) (3 image(s)) sent and not answered (about $0.040, "
        "2 image(s) of unknown price); 1 request(s) (1 image(s)) sent again: possibly billed twice"
    ) in page


def test_the_start_warning_names_which_runs_left_requests_unanswered() -> None:
    """The last run, an earlier one (the last run held them back), or several."""
    from cometbatch.engine.unanswered import Unanswered

    last = Unanswered({"a#0": ("r2", 2), "b#0": ("r2", 1)}, "r2")
    assert last.text(True).startswith("the last run stopped with 2 requests (3 images)")
    assert "held back, not sent" in last.text(False)
    assert Unanswered({"a#0": ("r1", 1)}, "r2").text(True).startswith("an earlier run stopped")
    several = Unanswered({"a#0": ("r1", 1), "b#0": ("r0", 1)}, "r2")
    assert several.text(True).startswith("2 earlier runs stopped")
    assert Unanswered({}, "r2").text(True) == ""


@pytest.mark.parametrize("retry", [True, False])
def test_the_dry_run_counts_what_earlier_runs_sent_and_never_heard_back_about(
    tmp_path: Path, retry: bool
) -> None:
    """The plan says how many requests may have been billed already, and what the run will
    do with them (send again, or hold back); --json gives them as earlier_unanswered."""
    from click.testing import CliRunner

    from cometbatch.cli.main import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "prompt": "p", "n": 2}\n{"id": "b", "prompt": "q"}\n')
    out = tmp_path / "out"
    _ledger(out, _run("r1"), _sent("r1", "a#0", n=2), _sent("r1", "b#0"), _result("r1", "b#0"))
    flag = "--retry-ambiguous" if retry else "--no-retry-ambiguous"
    base = ["run", str(manifest), "--out", str(out), "--dry-run", flag, "--model", "dall-e-2"]
    data = json.loads(CliRunner().invoke(main, [*base, "--json"]).output)
    assert data["earlier_unanswered"] == {"requests": 1, "images": 2}
    text = CliRunner().invoke(main, base).output
    assert "sent and never answered by an earlier run: 1 request(s), 2 image(s)" in text
    assert ("sends them again" if retry else "holds them back") in text
