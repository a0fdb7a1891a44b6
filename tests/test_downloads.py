"""Downloads are not generations: a failed download keeps its link and is fetched, not paid again.

Also: changed jobs are named and refused, or regenerated with their old images set aside.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import ledger_results as results
from support import no_sleep, run_all, settings_for

from cometbatch import ChangedJobsError, Engine, Job, Settings, SimConfig, Simulator
from cometbatch.fetch import fetch_pending
from cometbatch.report import status_lines, summary_lines
from cometbatch.status import read_status

ROOT = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=3)) as server:
        yield server


URL_JOB = Job(id="u", prompt="a lighthouse", model="dall-e-2", n=3, response_format="url")
# A cap no real image fits under: every download fails after its image was generated.
TINY = {"max_download_bytes": 16}


async def test_a_failed_download_keeps_its_links_and_is_not_generated_again(
    sim: Simulator, tmp_path: Path
) -> None:
    """The request is recorded download_failed with each image's URL; no second generation."""
    async with Engine(settings_for(sim, **TINY), out_dir=tmp_path, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, [URL_JOB])
    assert result.status == "download_failed"
    assert engine.summary.failures == {"download": 1}
    assert engine.summary.failed_images == 3
    assert not engine.summary.complete
    assert any(f"cometbatch fetch {tmp_path}" in x for x in summary_lines(engine.summary, tmp_path))
    (line,) = results(tmp_path)
    assert line["status"] == "download_failed"
    assert line["attempts"] == 1
    assert line["images"] == []
    assert [d["index"] for d in line["downloads"]] == [0, 1, 2]
    assert all(d["url"].startswith(sim.origin + "/") for d in line["downloads"])
    assert line["error"]["kind"] == "download"
    assert "larger than 16 bytes" in line["error"]["message"]
    assert sim.stats.requests == 1
    assert not list((tmp_path / "images").rglob("*.*"))
    status = read_status(tmp_path).to_dict()
    assert (status["awaiting_download"], status["failed_images"]) == (3, 3)
    assert any("cometbatch fetch" in line for line in status_lines(status))


async def test_fetch_downloads_the_pending_images_without_generating(
    sim: Simulator, tmp_path: Path
) -> None:
    """`fetch` writes the pending images; a rerun then reuses them and sends nothing."""
    async with Engine(settings_for(sim, **TINY), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, [URL_JOB])
    summary = await fetch_pending(tmp_path, Settings(base_url=sim.base_url), sleep=no_sleep)
    assert (summary.ok_requests, summary.failed_requests, summary.images_written) == (1, 0, 3)
    assert summary.complete
    line = results(tmp_path)[-1]
    assert line["status"] == "ok"
    assert line["attempts"] == 0 and line["downloads"] == [] and line["error"] is None
    for image in line["images"]:
        assert sha256(tmp_path / image["path"]) == image["sha256"]
    assert sim.stats.requests == 1
    assert sim.stats.download_auth_rejections == 0
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        assert await run_all(engine, [URL_JOB]) == []
    assert engine.summary.skipped_images == 3
    assert sim.stats.requests == 1
    # Nothing left to fetch.
    again = await fetch_pending(tmp_path, Settings(base_url=sim.base_url), sleep=no_sleep)
    assert again.planned_requests == 0


async def test_a_transient_download_failure_is_fetched_by_the_next_run(
    sim: Simulator, tmp_path: Path
) -> None:
    """A rerun downloads a retryable download_failed request instead of generating it."""
    async with Engine(settings_for(sim, **TINY), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, [URL_JOB])
    ledger = tmp_path / "ledger.jsonl"
    events = [json.loads(line) for line in ledger.read_text().splitlines()]
    for event in events:
        if event["event"] == "result":
            event["error"]["retryable"] = True  # as a host's 503 would have been
    ledger.write_text("".join(json.dumps(event) + "\n" for event in events))
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, [URL_JOB])
    assert result.ok and len(result.images) == 3
    assert result.attempts == 0
    assert sim.stats.requests == 1
    assert engine.summary.images_written == 3


async def test_a_dead_link_is_kept_and_regenerated_only_when_asked(
    sim: Simulator, tmp_path: Path
) -> None:
    """A link that fails for good is reported, not retried; retry_failed pays for it again."""
    async with Engine(settings_for(sim, **TINY), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, [URL_JOB])
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        assert await run_all(engine, [URL_JOB]) == []
        assert engine.summary.kept_failures == 1
        (kept,) = await engine.generate(URL_JOB)
    assert kept.status == "failed" and kept.reused
    assert kept.error is not None and "link no longer works" in kept.error["message"]
    assert sim.stats.requests == 1
    settings = settings_for(sim, retry_failed=True)
    async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
        (again,) = await run_all(engine, [URL_JOB])
    assert again.ok and len(again.images) == 3
    assert sim.stats.requests == 2


async def test_expired_links_stay_pending_with_a_clear_reason(tmp_path: Path) -> None:
    """Links past their lifetime answer 404: fetch reports them, nothing is generated."""
    async with Simulator(SimConfig(seed=4, url_ttl=0)) as sim:
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [URL_JOB])
        assert result.status == "download_failed"
        assert result.error is not None
        assert "no longer valid (404)" in result.error["message"]
        assert result.error["retryable"] is False
        summary = await fetch_pending(tmp_path, Settings(base_url=sim.base_url), sleep=no_sleep)
        assert (summary.ok_requests, summary.failed_requests, summary.failed_images) == (0, 1, 3)
        assert results(tmp_path)[-1]["status"] == "download_failed"
        assert sim.stats.requests == 1


async def cli(*args: str) -> tuple[int, str, str]:
    """The CLI in a subprocess, awaited so the in-process simulator keeps answering."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cometbatch",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_fetch_command_reports_and_exits_by_outcome(sim: Simulator, tmp_path: Path) -> None:
    """`cometbatch fetch DIR` downloads what is pending (exit 0) and says so; JSON on request."""
    async with Engine(settings_for(sim, **TINY), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, [URL_JOB])
    code, stdout, stderr = await cli("fetch", str(tmp_path), "--json")
    assert code == 0, stderr
    assert "Traceback" not in stderr
    data = json.loads(stdout)
    assert (data["ok_requests"], data["images_written"], data["complete"]) == (1, 3, True)
    code, _, stderr = await cli("fetch", str(tmp_path))
    assert code == 0
    assert "nothing to fetch" in stderr
    code, _, stderr = await cli("fetch", str(tmp_path / "nope"))
    assert code == 2
    assert "Traceback" not in stderr


# -- changed jobs ---------------------------------------------------------------------------


async def test_changed_jobs_are_all_named_and_nothing_is_sent(
    sim: Simulator, tmp_path: Path
) -> None:
    """Every changed job is listed with the option that regenerates them; no request goes out."""
    jobs = [Job(id=name, prompt=name, model="dall-e-3") for name in ("a", "b", "c")]
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, jobs)
    edited = [jobs[0].model_copy(update={"prompt": "A"}), jobs[1]]
    edited.append(jobs[2].model_copy(update={"size": "1792x1024"}))
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        with pytest.raises(ChangedJobsError) as caught:
            await run_all(engine, edited)
    assert caught.value.job_ids == ["a", "c"]
    assert "--regenerate-changed" in str(caught.value)
    assert sim.stats.requests == 3


async def test_regenerating_a_changed_job_keeps_its_old_images_aside(
    sim: Simulator, tmp_path: Path
) -> None:
    """With regenerate_changed the job is sent again; its old files move to OUT/replaced/."""
    job = Job(id="c", prompt="one", model="gpt-image-1", n=2)
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        (first,) = await run_all(engine, [job])
    old = {image.index: image.sha256 for image in first.images}
    changed = job.model_copy(update={"prompt": "two"})
    settings = settings_for(sim, regenerate_changed=True)
    async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
        (second,) = await run_all(engine, [changed])
    assert second.ok
    assert engine.summary.regenerated_requests == 1
    assert sim.stats.requests == 2
    aside = tmp_path / "replaced" / engine.run_id / "c"
    assert {int(p.stem): sha256(p) for p in aside.iterdir()} == old
    for image in second.images:
        assert sha256(tmp_path / image.path) == image.sha256 != old[image.index]
    # The regenerated job is now the recorded one: a third run reuses it.
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        assert await run_all(engine, [changed]) == []
    assert sim.stats.requests == 2


@pytest.mark.parametrize(
    ("fault", "reason", "fetched_later"),
    [
        ("download-404", "no longer valid (404)", True),
        ("download-expired", "no longer valid (404)", False),
        ("download-huge", "image larger than 4096 bytes", True),
        ("download-not-image", "not an image: the URL answered text/html", True),
    ],
)
async def test_each_download_fault_is_recorded_with_its_link_and_reason(
    sim: Simulator, tmp_path: Path, fault: str, reason: str, fetched_later: bool
) -> None:
    """A download fault leaves a download_failed line naming the link and the reason; the other
    images of the request are written; `fetch` gets the image if the link still works."""
    sim.enqueue(fault)
    settings = settings_for(sim, max_download_bytes=4096)
    async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, [URL_JOB])
    assert result.status == "download_failed" and len(result.downloads) == 1
    (line,) = results(tmp_path)
    assert line["status"] == "download_failed"
    assert [image["index"] for image in line["images"]] == [1, 2]
    (pending,) = line["downloads"]
    assert pending["index"] == 0 and pending["url"].startswith(sim.origin)
    assert reason in line["error"]["message"]
    assert line["error"]["kind"] == "download" and line["error"]["retryable"] is False
    assert engine.summary.images_written == 2 and engine.summary.failed_images == 1
    on_disk = sorted(p.name for p in (tmp_path / "images").rglob("*") if p.is_file())
    assert on_disk == sorted(Path(image["path"]).name for image in line["images"])
    summary = await fetch_pending(tmp_path, Settings(base_url=sim.base_url), sleep=no_sleep)
    assert summary.complete is fetched_later
    assert results(tmp_path)[-1]["status"] == ("ok" if fetched_later else "download_failed")
    assert sim.stats.requests == 1
