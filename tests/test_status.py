"""`status` reads a folder's ledger without the lock: finished, crashed and running folders."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from cometbatch import LedgerError
from cometbatch.views.status import read_status


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


# Real folders: a finished run, a crashed one (SIGKILL mid-run) and one still being written.

ROOT = Path(__file__).resolve().parent.parent


def manifest_of(path: Path, count: int, model: str = "qwen-image") -> Path:
    lines = (
        json.dumps({"id": f"j{i}", "prompt": f"picture {i}", "model": model}) for i in range(count)
    )
    path.write_text("".join(line + "\n" for line in lines))
    return path


def recorded_ok(folder: Path) -> int:
    events = [json.loads(x) for x in (folder / "ledger.jsonl").read_text().splitlines() if x]
    return len({e["key"] for e in events if e["event"] == "result" and e["status"] == "ok"})


def test_status_json_of_a_finished_folder(tmp_path: Path) -> None:
    """After a complete run: every job done, nothing pending, state finished, spend counted."""
    from click.testing import CliRunner

    from cometbatch.cli.main import main

    manifest = manifest_of(tmp_path / "m.jsonl", 6, model="gpt-image-1")
    out = tmp_path / "out"
    done = CliRunner().invoke(main, ["run", str(manifest), "--simulate", "--out", str(out), "-q"])
    assert done.exit_code == 0, done.output
    shown = CliRunner().invoke(main, ["status", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["state"] == "finished"
    assert (data["ok_requests"], data["failed_requests"], data["pending_requests"]) == (6, 0, 0)
    assert data["by_model"]["gpt-image-1"]["pending_images"] == 0
    assert data["manifest"] == str(manifest) and data["manifest_note"] == ""
    # The simulator reports gpt-image usage tokens: spend comes from them.
    assert data["spend"]["usd"] > 0 and data["spend"]["simulated_runs"] == 1
    assert data["span_s"] is not None and data["span_s"] >= 0
    text = CliRunner().invoke(main, ["status", str(out)]).output
    assert "finished" in text and "spent: about $" in text and "pending" in text


def test_status_json_of_a_crashed_folder(tmp_path: Path) -> None:
    """A run killed with SIGKILL: no end line, a stale lock; counts match what was recorded."""
    manifest = manifest_of(tmp_path / "m.jsonl", 80)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cometbatch", "run", str(manifest), "--simulate",
         "--out", str(out), "--concurrency", "2", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    ledger = out / "ledger.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ledger.exists() and ledger.read_text().count('"event":"result"') >= 5:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    ok = recorded_ok(out)
    assert 5 <= ok < 80
    data = read_status(out).to_dict()
    assert data["state"] == "crashed", data
    assert f"pid {proc.pid}" in data["state_detail"]
    assert data["last_run_ended"] is False
    assert (data["ok_requests"], data["pending_requests"]) == (ok, 80 - ok)
    assert data["by_model"]["qwen-image"]["pending_images"] == 80 - ok


async def test_status_json_of_a_running_folder(tmp_path: Path) -> None:
    """While an engine writes the folder: state running, counts as recorded, no lock taken."""
    from support import settings_for

    from cometbatch import Engine, SimConfig, Simulator, load_manifest

    manifest = load_manifest(manifest_of(tmp_path / "m.jsonl", 6))
    out = tmp_path / "out"
    async with Simulator(SimConfig(slow_seconds=30)) as sim:
        # Three requests hang (until the run is stopped); the other three answer at once.
        sim.enqueue(*(["slow"] * 3))
        settings = settings_for(sim, concurrency=6)
        async with Engine(settings, out_dir=out) as engine:
            results = aiter(engine.run(manifest))
            assert isinstance(results, AsyncGenerator)
            seen = [await anext(results) for _ in range(3)]
            data = read_status(out).to_dict()
            assert data["state"] == "running", data
            assert (data["ok_requests"], data["pending_requests"]) == (3, 3)
            assert data["last_run_ended"] is False
            # Reading the status took no lock: the run goes on until cancelled, and ends cleanly.
            await results.aclose()
    assert all(result.ok for result in seen)
    after = read_status(out).to_dict()
    assert after["state"] != "running" and after["last_run_ended"] is True


def test_pending_is_unknown_without_a_manifest(tmp_path: Path) -> None:
    """A ledger whose run names no manifest: pending is None and the note says why."""
    folder = write(tmp_path, RUN, result("a#0", "ok"), END)
    data = read_status(folder).to_dict()
    assert data["pending_requests"] is None and data["pending_images"] is None
    assert "pending work is unknown" in data["manifest_note"]


async def test_a_txt_run_with_job_defaults_has_known_pending_work(tmp_path: Path) -> None:
    """The run event records --model/--n, so status and the gallery read a .txt manifest as
    it ran: pending work is counted and prompts are found."""
    from support import no_sleep, settings_for

    from cometbatch import Engine, SimConfig, Simulator, load_manifest
    from cometbatch.views.gallery.content import read_gallery

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue bird\na green frog\n")
    manifest = load_manifest(prompts, model="qwen-image", n=2)
    out = tmp_path / "out"
    async with Simulator(SimConfig(seed=5)) as sim:
        # One at a time: which requests fit under the cap is then the manifest order.
        settings = settings_for(sim, max_images=4, concurrency=1)
        async with Engine(settings, out_dir=out, sleep=no_sleep) as engine:
            async for _ in engine.run(manifest):
                pass
    data = read_status(out).to_dict()
    assert data["manifest_note"] == ""
    assert (data["ok_images"], data["pending_images"]) == (4, 2)
    gallery = read_gallery(out)
    assert gallery.manifest_note == ""
    assert {job.prompt for job in gallery.jobs.values()} == {"a red fox", "a blue bird"}


def test_a_lock_left_by_a_dead_process_reads_as_crashed(tmp_path: Path) -> None:
    """The holder info names a process that is gone: crashed; this live process: running."""
    import os
    import socket

    from cometbatch.store.liverun import run_state

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    info = {"pid": int(gone.stdout), "host": socket.gethostname(), "started_at": "t"}
    (tmp_path / ".cometbatch.lock").write_text(json.dumps(info))
    assert run_state(tmp_path, ended=False, interrupted=False)[0] == "crashed"
    info["pid"] = os.getpid()
    (tmp_path / ".cometbatch.lock").write_text(json.dumps(info))
    assert run_state(tmp_path, ended=True, interrupted=False)[0] == "running"
    info["host"] = "elsewhere.invalid"
    (tmp_path / ".cometbatch.lock").write_text(json.dumps(info))
    assert run_state(tmp_path, ended=False, interrupted=False)[0] == "unknown"
    (tmp_path / ".cometbatch.lock").write_text("")
    assert run_state(tmp_path, ended=True, interrupted=True)[0] == "interrupted"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_lock_whose_pid_now_belongs_to_another_process_reads_as_crashed(tmp_path: Path) -> None:
    """A killed run's holder info names a pid that another process has since taken: crashed,
    not running; a lock held now reads as running."""
    import os

    from cometbatch.store.liverun import run_state
    from cometbatch.store.lock import LOCK_NAME, FolderLock

    killed = "import os, sys; from cometbatch.store.lock import FolderLock; "
    killed += "FolderLock(sys.argv[1]).acquire(); os._exit(9)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    died = subprocess.run([sys.executable, "-c", killed, str(tmp_path)], env=env)
    assert died.returncode == 9
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert run_state(tmp_path, ended=False, interrupted=False)[0] == "crashed"
    # The pid is reused: by this test's own process, which started at another time.
    info["pid"] = os.getpid()
    (tmp_path / LOCK_NAME).write_text(json.dumps(info))
    assert run_state(tmp_path, ended=False, interrupted=False)[0] == "crashed"
    with FolderLock(tmp_path / "live"):
        assert run_state(tmp_path / "live", ended=True, interrupted=False)[0] == "running"


def test_spend_counts_each_paid_request_once(tmp_path: Path) -> None:
    """A request fetched again (same fingerprint, nothing sent) is paid once; failures cost
    nothing."""
    paid: dict[str, Any] = {"fingerprint": "f1", "usage": None, "images": [{"index": 0}]}
    link = {"index": 0, "url": "https://img.example/0.png", "tries": 1}
    folder = write(
        tmp_path,
        RUN,
        result("a#0", "download_failed", fingerprint="f1", images=[], downloads=[link]),
        result("a#0", "ok", model="dall-e-3", attempts=0, **paid),
        result("b#0", "failed", model="dall-e-3"),
        result("c#0", "ok", model="no-price-model", fingerprint="f2", images=[{"index": 0}]),
        END,
    )
    spend = read_status(folder).to_dict()["spend"]
    assert spend["usd"] == pytest.approx(0.04)  # dall-e-3 1024x1024 standard, once
    assert spend["unpriced_images"] == 1


async def test_after_lowering_n_status_and_export_count_only_the_manifests_images(
    tmp_path: Path,
) -> None:
    """A job's n lowered in the manifest after its images were made: status and export count
    the images the manifest now asks for, not the chunks and indexes beyond the new n."""
    import io

    from support import no_sleep, settings_for

    from cometbatch import Engine, SimConfig, Simulator, load_manifest
    from cometbatch.views.export import export

    manifest = tmp_path / "m.jsonl"
    out = tmp_path / "out"

    def write_manifest(n: int) -> None:
        # dall-e-3 takes one image a request (four keys), dall-e-2 takes all four in one.
        jobs = [("a", "dall-e-3"), ("b", "dall-e-2")]
        lines = (json.dumps({"id": i, "prompt": i, "model": m, "n": n}) for i, m in jobs)
        manifest.write_text("".join(line + "\n" for line in lines))

    write_manifest(4)
    async with (
        Simulator(SimConfig(seed=3)) as sim,
        Engine(settings_for(sim), out_dir=out, sleep=no_sleep) as engine,
    ):
        async for _ in engine.run(load_manifest(manifest)):
            pass
    write_manifest(2)
    data = read_status(out).to_dict()
    assert data["by_model"]["dall-e-3"]["ok_requests"] == 2
    assert (data["ok_images"], data["failed_images"], data["pending_images"]) == (4, 0, 0)
    stream = io.StringIO()
    assert export(out, "jsonl", stream) == 2
    records = {r["job_id"]: r for r in map(json.loads, stream.getvalue().splitlines())}
    for job_id in ("a", "b"):
        assert records[job_id]["n"] == 2
        assert [image["index"] for image in records[job_id]["images"]] == [0, 1]


def test_odd_types_in_run_and_end_lines_are_read_as_unknown(tmp_path: Path) -> None:
    """Hand-edited run and end lines with values of other types: status still reads the
    folder, with pending unknown, instead of failing."""
    from cometbatch.cli.report import status_lines

    run = {"event": "run", "started_at": 5, "settings": [], "manifest": ["x"], "defaults": 1}
    end = {"event": "end", "finished_at": ["t"], "summary": ["interrupted"]}
    folder = write(tmp_path, json.dumps(run), result("a#0", "ok"), json.dumps(end))
    data = read_status(folder).to_dict()
    assert data["ok_images"] == 1 and data["pending_images"] is None
    assert status_lines(data)[0].startswith(str(folder))


def test_links_are_judged_from_each_keys_latest_line(tmp_path: Path) -> None:
    """A key's links are given up or not by its latest line: a key whose link later worked is
    not gone, one whose latest line has used up its tries is."""
    link = {"index": 0, "url": "https://img.example/0.png", "first_failed_at": None}
    waiting: dict[str, Any] = {"images": [], "fingerprint": "f1"}
    folder = write(
        tmp_path,
        RUN,
        result("a#0", "download_failed", downloads=[{**link, "tries": 1}], **waiting),
        result("a#0", "download_failed", downloads=[{**link, "tries": 2}], **waiting),
        result("a#0", "ok", fingerprint="f1", images=[{"index": 0}], attempts=0),
        result("b#0", "download_failed", downloads=[{**link, "tries": 1}], **waiting),
        result("b#0", "download_failed", downloads=[{**link, "tries": 3}], **waiting),
        END,
    )
    data = read_status(folder).to_dict()
    assert (data["links_gone"], data["awaiting_download"]) == (1, 0)


async def test_status_from_another_folder_finds_the_manifest_and_its_pending_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run given a relative manifest path records it absolute (and as typed), so status run
    from another folder still reads it and counts the pending work (and export its prompts)."""
    from support import no_sleep, run_all, settings_for

    from cometbatch import Engine, SimConfig, Simulator, load_manifest
    from cometbatch.views.jobresults import read_jobs

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "jobs").mkdir(parents=True)
    elsewhere.mkdir()
    jobs = [{"id": f"j{i}", "prompt": f"fox {i}", "model": "dall-e-3"} for i in range(5)]
    (project / "jobs" / "foxes.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    monkeypatch.chdir(project)
    async with Simulator(SimConfig(seed=4)) as sim:
        settings = settings_for(sim, max_images=2, concurrency=1)
        async with Engine(settings, out_dir="out", sleep=no_sleep) as engine:
            await run_all(engine, load_manifest("jobs/foxes.jsonl"))
    lines = (project / "out" / "ledger.jsonl").read_text().splitlines()
    (run,) = [e for e in map(json.loads, lines) if e["event"] == "run"]
    assert run["manifest"] == str((project / "jobs" / "foxes.jsonl").resolve())
    assert run["manifest_given"] == "jobs/foxes.jsonl"

    monkeypatch.chdir(elsewhere)
    data = read_status(project / "out").to_dict()
    assert data["manifest_note"] == ""
    assert (data["ok_images"], data["pending_requests"], data["pending_images"]) == (2, 3, 3)
    assert {job.prompt for job in read_jobs(project / "out")} == {"fox 0", "fox 1"}


def test_an_old_ledger_with_a_relative_manifest_reads_it_from_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run line from before absolute paths were recorded names the manifest as typed: read
    from the folder status runs in, as before."""
    (tmp_path / "jobs.jsonl").write_text(
        '{"id": "a", "prompt": "a fox", "model": "dall-e-3"}\n'
        '{"id": "b", "prompt": "an owl", "model": "dall-e-3"}\n'
    )
    run = json.dumps({"event": "run", "run_id": "r1", "manifest": "jobs.jsonl"})
    folder = write(tmp_path / "out", run, result("a#0", "ok", job_id="a", chunk=0), END)
    monkeypatch.chdir(tmp_path)
    data = read_status(folder).to_dict()
    assert (data["manifest"], data["pending_requests"]) == ("jobs.jsonl", 1)
