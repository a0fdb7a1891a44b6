"""Downloads are not generations: a failed download keeps its link and is fetched, not paid again.

Also: changed jobs are named and refused, or regenerated with their old images set aside.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support import Handler, cli, no_sleep, run_all, serve, settings_for
from support import ledger_results as results

from cometbatch import ChangedJobsError, Engine, Job, Settings, SimConfig, Simulator
from cometbatch.cli.report import fetch_lines, status_lines, summary_lines
from cometbatch.engine.fetch import fetch_pending
from cometbatch.engine.resume import LINK_LIFETIME_S, LINK_TRIES, decide
from cometbatch.ledger.keystate import KeyState
from cometbatch.store.imagecheck import check_image
from cometbatch.views.status import read_status


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
    # Refused for good (not a transient failure): the next run keeps it as a failed generation.
    assert (status["awaiting_download"], status["links_gone"], status["failed_images"]) == (0, 3, 3)
    assert any("--retry-failed" in line for line in status_lines(status))


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


# -- broken files and links that keep failing -----------------------------------------------


async def test_a_cut_off_download_is_downloaded_again_not_generated(
    sim: Simulator, tmp_path: Path
) -> None:
    """Half a file served as a whole one fails the image check: the download is retried (not
    the generation), and the ok line names a whole image."""
    sim.enqueue("download-truncated")
    job = Job(id="k", prompt="a kite", model="dall-e-2", n=1, response_format="url")
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, [job])
    assert result.ok
    assert (sim.stats.requests, sim.stats.downloads) == (1, 2)
    (line,) = results(tmp_path)
    (image,) = line["images"]
    data = (tmp_path / image["path"]).read_bytes()
    assert check_image(data) == image["format"]
    assert hashlib.sha256(data).hexdigest() == image["sha256"]


async def test_a_link_to_a_broken_file_never_gives_an_ok_line(
    sim: Simulator, tmp_path: Path
) -> None:
    """When the host only has a cut-off file, the request waits as download_failed and nothing
    is written or generated again."""
    sim.enqueue("truncated-image")
    job = Job(id="k", prompt="a kite", model="dall-e-2", n=1, response_format="url")
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, [job])
    assert result.status == "download_failed"
    assert [line["status"] for line in results(tmp_path)] == ["download_failed"]
    assert sim.stats.requests == 1 and sim.stats.downloads >= 1
    assert not list((tmp_path / "images").rglob("*.*"))


@contextlib.asynccontextmanager
async def dead_link_api(counts: Counter[str], name: str = "x") -> AsyncIterator[str]:
    """An images API whose every image link (/files/<name>.png) answers 503; yields its base
    URL."""

    async def generate(request: web.Request) -> web.StreamResponse:
        counts["generations"] += 1
        origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        return web.json_response({"created": 1, "data": [{"url": f"{origin}/files/{name}.png"}]})

    async def download(request: web.Request) -> web.StreamResponse:
        counts["downloads"] += 1
        return web.Response(status=503, text="Service Unavailable")

    routes: dict[tuple[str, str], Handler] = {
        ("POST", "/v1/images/generations"): generate,
        ("GET", "/files/{name}"): download,
    }
    async with serve(routes) as origin:
        yield f"{origin}/v1"


async def test_a_link_that_keeps_failing_becomes_a_failed_generation(tmp_path: Path) -> None:
    """A link answering 503 is downloaded again by the next runs, but only LINK_TRIES runs in
    all; then the request counts as a failed generation that --retry-failed generates again,
    and every message says so."""
    counts: Counter[str] = Counter()
    job = Job(id="d", prompt="a dune", model="dall-e-2", n=1, response_format="url")
    async with dead_link_api(counts) as base_url:
        settings = Settings(base_url=base_url, api_key="sk-test")
        for run in range(1, LINK_TRIES + 1):
            async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
                (result,) = await run_all(engine, [job])
            assert result.status == "download_failed"
            (pending,) = results(tmp_path)[-1]["downloads"]
            assert pending["tries"] == run
            assert counts == {"generations": 1, "downloads": 4 * run}
        error = results(tmp_path)[-1]["error"]
        assert error["retryable"] is False
        assert "--retry-failed" in error["message"]
        # Given up: kept without a download or a generation, and said so everywhere.
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            assert await run_all(engine, [job]) == []
            assert engine.summary.kept_failures == 1
            (kept,) = await engine.generate(job)
        assert counts == {"generations": 1, "downloads": 4 * LINK_TRIES}
        assert kept.error is not None and "link no longer works" in kept.error["message"]
        assert "retry_failed" in kept.error["message"]
        assert any("--retry-failed" in line for line in summary_lines(engine.summary, tmp_path))
        status = read_status(tmp_path).to_dict()
        assert (status["awaiting_download"], status["links_gone"]) == (0, 1)
        assert any("--retry-failed" in line for line in status_lines(status))
        assert not any("cometbatch fetch" in line for line in status_lines(status))
        fetched = await fetch_pending(tmp_path, Settings(), sleep=no_sleep)
        assert (fetched.failed_requests, fetched.kept_failures) == (1, 0)
        assert any("--retry-failed" in line for line in fetch_lines(fetched, tmp_path))
        # --retry-failed generates it again (paid again).
        again = Settings(base_url=base_url, api_key="sk-test", retry_failed=True)
        async with Engine(again, out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [job])
        assert counts["generations"] == 2
        (pending,) = results(tmp_path)[-1]["downloads"]
        assert pending["tries"] == 1


async def test_a_link_holding_the_key_is_gone_at_once(tmp_path: Path) -> None:
    """A link the API put the key into is blanked before use, so it can never be downloaded:
    tried once, then a failed generation at once (not after LINK_TRIES runs), saying why."""
    key = "sk-test-in-the-link"
    counts: Counter[str] = Counter()
    job = Job(id="k", prompt="a key", model="dall-e-2", n=1, response_format="url")
    async with dead_link_api(counts, key) as base_url:
        settings = Settings(base_url=base_url, api_key=key)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [job])
        assert result.status == "download_failed"
        line = results(tmp_path)[-1]
        assert line["downloads"][0]["url"].endswith("/files/***.png")
        assert line["error"]["retryable"] is False
        assert "put the API key into" in line["error"]["message"]
        assert "--retry-failed" in line["error"]["message"]
        assert counts == {"generations": 1, "downloads": 1}
        assert read_status(tmp_path).to_dict()["links_gone"] == 1
        # The next run neither downloads it again nor generates it.
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            assert await run_all(engine, [job]) == []
            assert engine.summary.kept_failures == 1
        assert counts == {"generations": 1, "downloads": 1}


def pending_state(tries: int, first_failed_at: str | None, retryable: bool = True) -> KeyState:
    error_free = {"index": 0, "url": "http://127.0.0.1:9/x.png", "revised_prompt": None}
    link = {**error_free, "tries": tries, "first_failed_at": first_failed_at}
    return KeyState("j#0", "download_failed", None, retryable, "j", 1, (), [link])


NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC).timestamp()


def ago(hours: float) -> str:
    return datetime.fromtimestamp(NOW - hours * 3600, UTC).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("state", "verdict", "with_retry_failed"),
    [
        (pending_state(1, ago(0.1)), "fetch", "fetch"),
        (pending_state(LINK_TRIES - 1, ago(23)), "fetch", "fetch"),
        # Written before links were counted: tried again, then counted.
        (pending_state(0, None), "fetch", "fetch"),
        (pending_state(LINK_TRIES, ago(0.1)), "keep", "send"),
        (pending_state(1, ago(LINK_LIFETIME_S / 3600)), "keep", "send"),
        (pending_state(1, ago(24 * 30)), "keep", "send"),
        (pending_state(1, ago(0.1), retryable=False), "keep", "send"),
        (pending_state(1, "not a time"), "fetch", "fetch"),
    ],
)
def test_links_are_given_up_after_a_bounded_number_of_runs_or_age(
    state: KeyState, verdict: str, with_retry_failed: str
) -> None:
    """A pending link is fetched while it may work; after LINK_TRIES failed runs or
    LINK_LIFETIME_S it is a failed generation, kept unless retry_failed generates it again."""
    assert decide("0123456789abcdef", state, retry_failed=False, now=NOW) == verdict
    assert decide("0123456789abcdef", state, retry_failed=True, now=NOW) == with_retry_failed


GAPPY = Job(id="g", prompt="four kites", model="dall-e-2", n=4, response_format="b64_json")


async def partial_with_a_dead_link(sim: Simulator, out: Path, error: dict[str, Any] | None) -> None:
    """A partial line of GAPPY: images 0 and 2 on disk, image 1's link given up (failed in
    LINK_TRIES runs), image 3 never generated."""
    async with Engine(settings_for(sim), out_dir=out, sleep=no_sleep) as engine:
        await run_all(engine, [GAPPY])
    ledger = out / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    line = json.loads(lines[-2])
    assert line["status"] == "ok"
    dead = {"index": 1, "url": "http://127.0.0.1:9/dead.png", "revised_prompt": None,
            "tries": LINK_TRIES, "first_failed_at": "2026-01-01T00:00:00Z"}  # fmt: skip
    line.update(
        status="partial",
        images=[image for image in line["images"] if image["index"] in (0, 2)],
        downloads=[dead],
        error=error,
    )
    ledger.write_text("\n".join([*lines[:-2], json.dumps(line), lines[-1]]) + "\n")
    for index in (1, 3):
        (out / "images" / "g" / f"{index}.png").unlink()


@pytest.mark.parametrize(
    "error",
    [None, {"kind": "download", "status": 503, "code": None, "message": "unavailable",
            "request_id": None, "retryable": True}],
)  # fmt: skip
async def test_a_dead_link_in_a_partial_key_is_given_up_and_asked_for_again(
    tmp_path: Path, error: dict[str, Any] | None
) -> None:
    """A partial key's link that failed in LINK_TRIES runs is not downloaded again: the key is
    a failed generation (kept, saying so, with its images); --retry-failed asks for the
    missing images only, filling the gap and the tail, with no download."""
    async with Simulator(SimConfig(seed=3)) as sim:
        await partial_with_a_dead_link(sim, tmp_path, error)
        before = sim.stats.requests
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            (kept,) = await engine.generate(GAPPY)
            assert engine.summary.kept_failures == 1
        assert sim.stats.requests == before and sim.stats.downloads == 0
        assert kept.status == "partial" and [image.index for image in kept.images] == [0, 2]
        assert kept.error is not None and "link no longer works" in kept.error["message"]
        status = read_status(tmp_path).to_dict()
        assert (status["links_gone"], status["awaiting_download"]) == (1, 0)
        again = settings_for(sim, retry_failed=True)
        async with Engine(again, out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [GAPPY])
        assert result.ok and sim.stats.downloads == 0
        asked = [entry["body"].get("n", 1) for entry in sim.stats.requests_log[before:]]
        assert asked == [1, 1] and engine.summary.images_written == 2
    line = results(tmp_path)[-1]
    assert [image["index"] for image in line["images"]] == [0, 1, 2, 3]
    for image in line["images"]:
        assert sha256(tmp_path / image["path"]) == image["sha256"]


async def test_a_partial_key_kept_for_good_reports_its_images(tmp_path: Path) -> None:
    """A partial key whose follow-up failed for good is reported with the images it has."""
    refused = {"kind": "content_policy", "status": 400, "code": None, "message": "refused",
               "request_id": None, "retryable": False}  # fmt: skip
    async with Simulator(SimConfig(seed=3)) as sim:
        await partial_with_a_dead_link(sim, tmp_path, refused)
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            (kept,) = await engine.generate(GAPPY)
    assert kept.status == "partial" and [image.index for image in kept.images] == [0, 2]
    assert kept.error is not None and "2 of 4" in kept.error["message"]
