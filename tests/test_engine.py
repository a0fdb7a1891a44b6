"""The engine end to end against the built-in simulator: images, ledger, resume, faults."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image
from support import ledger_results as results
from support import no_sleep, run_all, serve, settings_for

from cometbatch import Engine, Job, Manifest, Settings, SimConfig, Simulator, load_manifest
from cometbatch.simulator.imagegen import make_png

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "jobs" / "demo.jsonl"
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=1)) as server:
        yield server


def assert_images_complete(out: Path, manifest: Manifest) -> None:
    """Every planned image exists once, decodes, and is the format its extension says."""
    expected = {(job.id, k) for job in manifest for k in range(job.n)}
    found = set()
    for path in (out / "images").rglob("*"):
        if path.is_dir():
            continue
        assert not path.name.endswith(".tmp")
        with Image.open(path) as image:
            image.load()
            assert image.format == PIL_FORMATS[path.suffix[1:]]
        found.add((path.parent.name, int(path.stem)))
    assert found == expected


async def test_demo_manifest_runs_to_completion(sim: Simulator, tmp_path: Path) -> None:
    """The demo manifest produces every image, decodable, with one ok line per request key."""
    manifest = load_manifest(DEMO)
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        got = await run_all(engine, manifest)
    assert engine.summary.complete
    assert len(got) == manifest.stats.requests
    assert_images_complete(tmp_path, manifest)
    lines = results(tmp_path)
    assert Counter(e["status"] for e in lines) == {"ok": manifest.stats.requests}
    assert len({e["key"] for e in lines}) == len(lines)
    assert sim.stats.download_auth_rejections == 0
    assert sim.stats.downloads > 0


async def test_rerun_sends_nothing_and_a_dropped_line_is_regenerated(
    sim: Simulator, tmp_path: Path
) -> None:
    """A second run sends zero requests; removing one ledger line regenerates exactly it."""
    manifest = load_manifest(DEMO)
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, manifest)
    first = sim.stats.requests

    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        assert await run_all(engine, manifest) == []
    assert sim.stats.requests == first
    assert engine.summary.skipped_requests == manifest.stats.requests
    assert engine.summary.complete

    ledger = tmp_path / "ledger.jsonl"
    kept = [text for text in ledger.read_text().splitlines() if '"key":"koi-pond#1"' not in text]
    ledger.write_text("\n".join(kept) + "\n")
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        again = await run_all(engine, manifest)
    assert [r.key for r in again] == ["koi-pond#1"]
    assert sim.stats.requests == first + 1


async def test_no_forbidden_parameters_reach_the_api(sim: Simulator, tmp_path: Path) -> None:
    """dall-e-3 and qwen-image never get n > 1; gpt-image models never get response_format."""
    manifest = load_manifest(DEMO)
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, manifest)
    bodies = [entry["body"] for entry in sim.stats.requests_log]
    assert bodies
    for body in bodies:
        if body["model"] in ("dall-e-3", "qwen-image"):
            assert body.get("n", 1) == 1
        if body["model"].startswith("gpt-image"):
            assert "response_format" not in body
    assert all(entry["authorization_present"] for entry in sim.stats.requests_log)


async def test_faults_are_retried_until_every_image_lands(tmp_path: Path) -> None:
    """With 429s (with and without Retry-After) and 5xx injected, 240 requests all succeed."""
    config = SimConfig(seed=7, rate_429=0.1, rate_429_bare=0.05, rate_5xx=0.1)
    jobs = [Job(id=f"j{i}", prompt=f"prompt {i}", model="dall-e-3") for i in range(240)]
    async with (
        Simulator(config) as server,
        Engine(settings_for(server, concurrency=32), out_dir=tmp_path, sleep=no_sleep) as engine,
    ):
        got = await run_all(engine, jobs)
    assert len(got) == 240
    assert all(result.ok for result in got)
    assert server.stats.faults["429"] + server.stats.faults["429-bare"] > 0
    assert engine.summary.retries > 0
    assert engine.summary.complete
    assert len([p for p in (tmp_path / "images").rglob("*") if p.is_file()]) == 240


async def test_bad_request_is_a_permanent_failure_with_request_id(
    sim: Simulator, tmp_path: Path
) -> None:
    """A 400 is not retried and is recorded as failed with its message and request id."""
    sim.enqueue("400")
    job = Job(id="bad", prompt="x", model="dall-e-3")
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, [job])
    assert sim.stats.requests == 1
    assert result.status == "failed"
    assert result.attempts == 1
    (event,) = results(tmp_path)
    error = event["error"]
    assert error["kind"] == "bad_request"
    assert error["status"] == 400
    assert error["retryable"] is False
    assert error["request_id"]
    assert error["message"]
    assert not engine.summary.complete


async def test_permanent_failures_are_kept_unless_retry_failed(
    sim: Simulator, tmp_path: Path
) -> None:
    """A rerun skips permanent failures; --retry-failed tries them again."""
    sim.enqueue("400")
    job = Job(id="bad", prompt="x", model="dall-e-3")
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, [job])
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        assert await run_all(engine, [job]) == []
    assert engine.summary.kept_failures == 1
    assert sim.stats.requests == 1
    settings = settings_for(sim, retry_failed=True)
    async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, [job])
    assert result.ok


async def test_url_downloads_never_carry_authorization(sim: Simulator, tmp_path: Path) -> None:
    """URL-mode images are fetched without the Authorization header (the route rejects it)."""
    jobs = [Job(id="u", prompt="x", model="dall-e-2", n=5, response_format="url")]
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, jobs)
    assert result.ok
    assert sim.stats.downloads == 5
    assert sim.stats.download_auth_rejections == 0


def library_page_example() -> str:
    """The first python block under the library page's own-event-loop heading."""
    text = (ROOT / "docs" / "library.md").read_text()
    section = text[text.index("## Inside your own event loop") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


async def test_library_page_example_runs_as_written(
    sim: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The library page's example, verbatim, runs inside a running loop with its own session."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "demo.jsonl").write_text(DEMO.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COMETAPI_BASE_URL", sim.base_url)
    monkeypatch.setenv("COMETAPI_KEY", "sk-readme")
    code = "async def example():\n" + textwrap.indent(library_page_example(), "    ")
    code += "    return summary\n"
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/library.md", "exec"), namespace)
    summary = await namespace["example"]()
    assert summary.complete
    assert summary.ok_requests == load_manifest(DEMO).stats.requests
    assert "lighthouse-dawn#0 ok ['images/lighthouse-dawn/0." in capsys.readouterr().out
    assert sim.stats.requests == summary.ok_requests


async def test_generate_serves_single_jobs_from_many_tasks(sim: Simulator, tmp_path: Path) -> None:
    """generate() can be awaited from many tasks under one shared limit."""
    import asyncio

    settings = settings_for(sim, concurrency=4)
    async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
        batches = await asyncio.gather(
            *(
                engine.generate(Job(id=f"g{i}", prompt=f"p{i}", model="gpt-image-1", n=2))
                for i in range(20)
            )
        )
    assert all(r.ok for batch in batches for r in batch)
    assert sim.stats.max_in_flight <= 4
    assert len(list((tmp_path / "images").rglob("*.png"))) == 40


async def test_changed_job_is_refused(sim: Simulator, tmp_path: Path) -> None:
    """A job whose request changed since the ledger recorded it is refused, not silently reused."""
    from cometbatch import LedgerError

    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, [Job(id="c", prompt="one", model="dall-e-3")])
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        with pytest.raises(LedgerError, match="changed"):
            await run_all(engine, [Job(id="c", prompt="two", model="dall-e-3")])
    assert sim.stats.requests == 1


async def test_edited_job_after_a_permanent_failure_is_sent_again(
    sim: Simulator, tmp_path: Path
) -> None:
    """A job that failed for good and was then edited (same id) is sent, not refused or kept."""
    sim.enqueue("content-policy")
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        (failed,) = await run_all(engine, [Job(id="c", prompt="too spicy", model="dall-e-3")])
    assert failed.error is not None and failed.error["kind"] == "content_policy"
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        (fixed,) = await run_all(engine, [Job(id="c", prompt="mild", model="dall-e-3")])
    assert fixed.ok
    assert sim.stats.requests == 2


async def test_engine_refuses_reuse_and_a_second_engine_on_the_same_folder(
    sim: Simulator, tmp_path: Path
) -> None:
    """One run per folder: a second engine on the same folder names the lock holder."""
    from cometbatch import LedgerError

    engine = Engine(settings_for(sim), out_dir=tmp_path)
    async with engine:
        with pytest.raises(LedgerError, match="in use"):
            async with Engine(settings_for(sim), out_dir=tmp_path):
                pass
    with pytest.raises(RuntimeError):
        async with engine:
            pass


async def test_wrong_key_stops_the_run_without_failing_jobs(tmp_path: Path) -> None:
    """A rejected key stops the run with AuthenticationError and records no failed jobs."""
    from cometbatch import AuthenticationError

    async with Simulator(SimConfig(api_key="right")) as server:
        settings = Settings(base_url=server.base_url, api_key="wrong")
        jobs = [Job(id=f"k{i}", prompt="x") for i in range(10)]
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            with pytest.raises(AuthenticationError):
                await run_all(engine, jobs)
    assert results(tmp_path) == []
    assert "wrong" not in (tmp_path / "ledger.jsonl").read_text()


async def test_exhausted_retries_record_every_attempt(sim: Simulator, tmp_path: Path) -> None:
    """A request that fails on every attempt is recorded with all its attempts, still retryable."""
    sim.enqueue("500", "503", "500")
    job = Job(id="tired", prompt="x", model="dall-e-3")
    settings = settings_for(sim, max_attempts=3)
    async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, [job])
    assert (result.status, result.attempts) == ("failed", 3)
    assert result.error is not None
    assert (result.error["kind"], result.error["retryable"]) == ("server", True)
    assert engine.summary.retries == 2


async def test_wrong_base_url_stops_the_run_without_failing_jobs(
    sim: Simulator, tmp_path: Path
) -> None:
    """A base URL that answers an HTML 404 stops the run with a ConfigError naming the URL."""
    from cometbatch import ConfigError

    settings = Settings(base_url=sim.origin + "/wrong", api_key="sk-test")
    jobs = [Job(id=f"w{i}", prompt="x") for i in range(5)]
    async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
        with pytest.raises(ConfigError, match="does not look like an OpenAI-compatible API"):
            await run_all(engine, jobs)
    assert results(tmp_path) == []


async def test_generate_reports_a_kept_failure_without_sending(
    sim: Simulator, tmp_path: Path
) -> None:
    """generate() on a job that failed for good returns a failed Result and sends nothing."""
    sim.enqueue("400")
    job = Job(id="k", prompt="x", model="dall-e-3")
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        await engine.generate(job)
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        (again,) = await engine.generate(job)
    assert again.status == "failed" and again.reused
    assert again.error is not None and again.error["kind"] == "earlier_failure"
    assert sim.stats.requests == 1


async def test_impossible_settings_fail_before_the_folder_is_touched(tmp_path: Path) -> None:
    """A setting that cannot work is refused before the output folder is created or locked."""
    from cometbatch import ConfigError

    out = tmp_path / "never"
    with pytest.raises(ConfigError):
        async with Engine(Settings(ipm=5, api_key="sk-test"), out_dir=out):
            pass
    with pytest.raises(ConfigError, match="clear text"):
        async with Engine(Settings(base_url="http://10.9.9.9/v1", api_key="sk-x"), out_dir=out):
            pass
    assert not out.exists()


async def test_raising_n_on_a_one_image_model_only_adds_images(
    sim: Simulator, tmp_path: Path
) -> None:
    """A dall-e-3 job raised from n=2 to n=4 keeps its id and sends only the two new requests."""
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, [Job(prompt="a kite", model="dall-e-3", n=2)])
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        more = await run_all(engine, [Job(prompt="a kite", model="dall-e-3", n=4)])
    assert sorted(r.chunk for r in more) == [2, 3]
    assert sim.stats.requests == 4
    assert len([p for p in (tmp_path / "images").rglob("*") if p.is_file()]) == 4


async def test_cancelling_the_consumer_leaves_a_resumable_ledger(tmp_path: Path) -> None:
    """Cancelling the consumer of run() closes cleanly: end event, no stray tasks, resumable."""
    jobs = [Job(id=f"c{i}", prompt=f"p{i}", model="qwen-image") for i in range(60)]
    before = asyncio.all_tasks()
    async with Simulator(SimConfig(latency=0.05)) as server:
        seen: list[str] = []
        enough = asyncio.Event()

        async def consume() -> None:
            async with Engine(settings_for(server, concurrency=4), out_dir=tmp_path) as engine:
                async for result in engine.run(jobs):
                    seen.append(result.key)
                    if len(seen) == 8:
                        enough.set()

        task = asyncio.create_task(consume())
        await enough.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # The simulator has closed (its own tasks with it): nothing started since may be left.
    assert started_since(before) == []
    lines = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "end"
    done = {e["key"] for e in lines if e["event"] == "result" and e["status"] == "ok"}
    assert 8 <= len(done) < 60

    async with Simulator(SimConfig(latency=0.05)) as server:
        async with Engine(settings_for(server), out_dir=tmp_path, sleep=no_sleep) as engine:
            rest = await run_all(engine, jobs)
        assert {r.key for r in rest} == {f"c{i}#0" for i in range(60)} - done
        assert engine.summary.complete


async def test_an_error_inside_a_200_fails_only_its_job(tmp_path: Path) -> None:
    """A 200 carrying an invalid_request error object is that job's failure; the run goes on."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        if "broken" in body["prompt"]:
            error = {"message": "bad prompt (request id: 2026x1)", "type": "", "param": ""}
            return web.json_response({"error": {**error, "code": "invalid_request"}})
        image = {"b64_json": base64.b64encode(make_png(8, 8, 1)).decode()}
        return web.json_response({"created": 1, "data": [image]})

    jobs = [Job(id="a", prompt="fine"), Job(id="b", prompt="broken"), Job(id="c", prompt="ok")]
    async with serve({("POST", "/v1/images/generations"): answer}) as origin:
        settings = Settings(base_url=f"{origin}/v1", api_key="sk-test")
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            got = {r.key: r for r in await run_all(engine, jobs)}
    assert got["a#0"].ok and got["c#0"].ok
    error = got["b#0"].error
    assert error is not None
    assert (error["kind"], error["retryable"], error["request_id"]) == (
        "bad_request",
        False,
        "2026x1",
    )


async def test_breaking_out_of_run_leaves_nothing_running(tmp_path: Path) -> None:
    """A consumer that breaks out of run() early leaves no engine task behind, and resumes."""
    jobs = [Job(id=f"b{i}", prompt=f"p{i}", model="qwen-image") for i in range(80)]
    before = asyncio.all_tasks()
    async with (
        Simulator(SimConfig(latency=0)) as server,
        Engine(settings_for(server, concurrency=2), out_dir=tmp_path) as engine,
    ):
        async for _ in engine.run(jobs):
            # A slow consumer: the run fills its results queue meanwhile.
            await until(lambda: server.stats.requests >= 8)
            break
    # The simulator has closed (its own tasks with it): nothing started since may be left.
    assert started_since(before) == []
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "end"
    async with Simulator(SimConfig(latency=0)) as server:
        async with Engine(settings_for(server), out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, jobs)
        assert engine.summary.complete


async def test_a_failing_job_source_stops_cleanly_and_keeps_what_was_paid_for(
    tmp_path: Path,
) -> None:
    """A job source that raises mid-run: in-flight requests are recorded, then its error raised."""

    async def jobs() -> AsyncIterator[Job]:
        for i in range(6):
            yield Job(id=f"s{i}", prompt=f"p{i}", model="qwen-image")
        await api.arrived(6)
        # Let the six be answered: they are still out when the source breaks.
        api.release.set()
        raise OSError("the job source broke")

    async with (
        HeldAPI().serving() as api,
        Engine(api.settings(concurrency=8), out_dir=tmp_path) as engine,
    ):
        with pytest.raises(OSError, match="the job source broke"):
            await run_all(engine, jobs())
        assert engine.holding_sent_requests == 0
    assert len(api.prompts) == 6
    assert [line["status"] for line in results(tmp_path)] == ["ok"] * 6


def test_a_key_from_a_crlf_env_file_is_cleaned_and_bad_keys_are_refused() -> None:
    """Surrounding whitespace is dropped from the key; inner control characters are refused."""
    from cometbatch import ConfigError

    assert Settings(api_key="sk-abc\r\n").resolved_key() == "sk-abc"
    with pytest.raises(ConfigError, match="COMETAPI_KEY") as info:
        Settings(api_key="sk-a\x00bc").resolved_key()
    assert "sk-a" not in str(info.value)


async def test_a_lasting_outage_stops_the_run_and_leaves_everything_resumable(
    tmp_path: Path,
) -> None:
    """When every answer is a 5xx past the outage limit, the run stops; nothing is lost."""
    from cometbatch import UpstreamDownError

    jobs = [Job(id=f"o{i}", prompt=f"p{i}", model="qwen-image") for i in range(30)]
    # The outage limit, not the attempts running out, must be what stops the run: 8 requests
    # make about 2,500 attempts a second against instant 5xx answers, 100 each in 0.3 s, so the
    # limit is 0.05 s (about 16 attempts each).
    settings_args = {"concurrency": 8, "max_attempts": 100, "outage_limit": 0.05}
    async with (
        Simulator(SimConfig(rate_5xx=1.0, seed=5)) as down,
        Engine(settings_for(down, **settings_args), out_dir=tmp_path, sleep=no_sleep) as engine,
    ):
        with pytest.raises(UpstreamDownError, match="run the same command again"):
            await run_all(engine, jobs)
    assert engine.summary.stopped is not None
    assert results(tmp_path) == []
    async with Simulator(SimConfig()) as up:
        async with Engine(settings_for(up), out_dir=tmp_path, sleep=no_sleep) as engine:
            assert len(await run_all(engine, jobs)) == 30
        assert engine.summary.complete


async def test_two_runs_on_one_engine_count_both(sim: Simulator, tmp_path: Path) -> None:
    """run() may be called again on the same engine; the summary covers both runs."""

    def stream(prefix: str) -> Any:
        return (
            Job(id=f"{prefix}{i}", prompt=f"{prefix} {i}", model="qwen-image") for i in range(3)
        )

    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, stream("a"))
        await run_all(engine, stream("b"))
    s = engine.summary
    assert (s.planned_requests, s.ok_requests, s.pending_requests) == (6, 6, 0)
    assert s.complete


async def test_the_same_job_from_two_tasks_is_generated_once(tmp_path: Path) -> None:
    """Two concurrent generate() calls for one job share one request and one ledger line."""
    import asyncio

    job = Job(id="same", prompt="one kite", model="dall-e-3")
    async with (
        Simulator(SimConfig(latency=0.1)) as server,
        Engine(settings_for(server), out_dir=tmp_path, sleep=no_sleep) as engine,
    ):
        (first,), (second,) = await asyncio.gather(engine.generate(job), engine.generate(job))
    assert server.stats.requests == 1
    assert first.ok and second.ok and first.images == second.images
    assert [e["key"] for e in results(tmp_path)] == ["same#0"]
    assert engine.summary.complete


async def test_a_job_listed_twice_is_generated_once(sim: Simulator, tmp_path: Path) -> None:
    """A library caller's list with the same job twice sends it once, even one at a time."""
    job = Job(id="twice", prompt="p", model="dall-e-3")
    settings = settings_for(sim, concurrency=1)
    async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
        got = await run_all(engine, iter([job, job]))
    assert sim.stats.requests == 1
    assert [r.reused for r in got] == [False, True]
    assert engine.summary.complete


async def test_a_shared_failure_is_not_counted_as_done(tmp_path: Path) -> None:
    """When the shared request fails, both callers get the failure and the run is not complete."""
    import asyncio

    job = Job(id="bad", prompt="p", model="dall-e-3")
    async with (
        Simulator(SimConfig(latency=0.1)) as server,
        Engine(settings_for(server), out_dir=tmp_path, sleep=no_sleep) as engine,
    ):
        server.enqueue("400")
        (first,), (second,) = await asyncio.gather(engine.generate(job), engine.generate(job))
    assert server.stats.requests == 1
    assert first.status == second.status == "failed"
    assert engine.summary.skipped_requests == 0
    assert not engine.summary.complete


@pytest.mark.parametrize(
    ("policy", "per_image"), [("end", False), ("batch", False), ("always", True)]
)
async def test_the_fsync_setting_reaches_the_ledger_and_the_images(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, per_image: bool
) -> None:
    """fsync="end" syncs the ledger once, at the end; "batch" syncs each ledger write;
    "always" also syncs every image file before its line."""
    synced: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc") else "?")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    jobs = [Job(id=f"f{i}", prompt=f"p {i}", model="gpt-image-1", n=2) for i in range(6)]
    settings = settings_for(sim, fsync=policy, concurrency=1)
    async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, jobs)
    # An image is synced as its temp file, before the rename (and its folder after it).
    images = [name for name in synced if "/images/" in name and name.endswith(".tmp")]
    ledger = [name for name in synced if name.endswith("ledger.jsonl")]
    assert len(images) == (12 if per_image else 0)
    if policy == "end":
        assert len(ledger) == 1
    else:
        # One request at a time: the run line, each result and the end line are written
        # (and synced) one by one.
        assert len(ledger) >= 1 + len(jobs) + 1


async def test_a_request_waiting_out_a_429_lends_its_slot(tmp_path: Path) -> None:
    """While one request sleeps on Retry-After, a spare worker takes its slot: the server
    below answers only pairs of requests in flight at once, which two workers can form only
    if the waiting one lent its slot; the limit on requests in flight still holds."""
    image = {"b64_json": base64.b64encode(make_png(8, 8, 1)).decode()}
    release = asyncio.Event()
    partner: list[asyncio.Future[None]] = []
    seen = {"requests": 0, "in_flight": 0, "most": 0}

    async def answer(request: web.Request) -> web.Response:
        seen["requests"] += 1
        if seen["requests"] == 1:
            return web.json_response(
                {"error": {"message": "slow down", "type": "rate_limit"}},
                status=429,
                headers={"Retry-After": "5"},
            )
        seen["in_flight"] += 1
        seen["most"] = max(seen["most"], seen["in_flight"])
        try:
            if not release.is_set():
                if partner:
                    partner.pop().set_result(None)
                else:
                    waiting = asyncio.get_running_loop().create_future()
                    partner.append(waiting)
                    await waiting
            return web.json_response({"created": 1, "data": [image]})
        finally:
            seen["in_flight"] -= 1

    waits: list[float] = []

    async def held_sleep(delay: float) -> None:
        waits.append(delay)
        await release.wait()

    done: list[str] = []
    jobs = [Job(id=f"w{i}", prompt=f"p {i}", model="gpt-image-1") for i in range(7)]
    async with serve({("POST", "/v1/images/generations"): answer}) as origin:
        settings = Settings(base_url=f"{origin}/v1", api_key="sk-test", concurrency=2)
        async with Engine(settings, out_dir=tmp_path, sleep=held_sleep) as engine:

            async def consume() -> None:
                async for result in engine.run(jobs):
                    done.append(result.job.id)
                    if len(done) == 6:
                        # The other six went through in pairs while the first one waited.
                        assert waits == [5.0] and not release.is_set()
                        release.set()

            await asyncio.wait_for(consume(), timeout=30)
    assert sorted(done) == sorted(job.id for job in jobs)
    assert engine.summary.complete and engine.summary.rate_limited == 1
    assert seen["most"] == 2


# -- cancellation never drops a paid request ------------------------------------------------

EIGHT = [Job(id=f"x{i}", prompt=f"p{i}", model="qwen-image") for i in range(8)]


async def until(condition: Any) -> None:
    """Poll on the event loop until `condition()` holds (at most some 10 s)."""
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("the condition never held")


def started_since(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks still running that were started after `before` was taken (any name, any owner)."""
    return [task for task in asyncio.all_tasks() - before if task is not asyncio.current_task()]


def ledger_events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]


class HeldAPI:
    """An images API on loopback that holds every request until `release` is set, so that
    a test acts while requests are at the server however slow the machine is."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.release = asyncio.Event()
        self._arrived = asyncio.Event()
        self.base_url = ""

    async def _answer(self, request: web.Request) -> web.Response:
        self.prompts.append((await request.json())["prompt"])
        self._arrived.set()
        await self.release.wait()
        image = {"b64_json": base64.b64encode(make_png(8, 8, 1)).decode()}
        return web.json_response({"created": 1, "data": [image]})

    async def arrived(self, count: int) -> None:
        """Wait until `count` requests reached the server."""
        async with asyncio.timeout(60):
            while len(self.prompts) < count:
                self._arrived.clear()
                await self._arrived.wait()

    def settings(self, **overrides: Any) -> Settings:
        return Settings(base_url=self.base_url, api_key="sk-test", **overrides)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[HeldAPI]:
        async with serve({("POST", "/v1/images/generations"): self._answer}) as origin:
            self.base_url = f"{origin}/v1"
            try:
                yield self
            finally:
                self.release.set()  # a handler still holding lets the server close at once


async def test_cancelling_generate_after_sending_records_every_request(tmp_path: Path) -> None:
    """Eight generate() calls cancelled once their requests reached the server: the callers'
    waits end at once, the engine records all eight before it closes (then the end line), and
    a new engine over the folder sends nothing: none is paid twice."""
    async with HeldAPI().serving() as api:
        async with Engine(api.settings(concurrency=8), out_dir=tmp_path) as engine:
            calls = [asyncio.create_task(engine.generate(job)) for job in EIGHT]
            await api.arrived(8)
            for call in calls:
                call.cancel()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(x, asyncio.CancelledError) for x in outcomes)
            # Only the waits ended: the eight requests are still at the server, held.
            assert engine.holding_sent_requests == 8
            api.release.set()
        events = ledger_events(tmp_path)
        oks = [e["key"] for e in events if e["event"] == "result" and e["status"] == "ok"]
        assert sorted(oks) == sorted(f"x{i}#0" for i in range(8))
        assert events[-1]["event"] == "end"
        assert events[-1]["summary"]["cut_off_requests"] == 0
        async with Engine(api.settings(), out_dir=tmp_path, sleep=no_sleep) as engine:
            again = [result for job in EIGHT for result in await engine.generate(job)]
        assert all(result.ok and result.reused for result in again)
        assert len(api.prompts) == 8  # paid twice: 0


async def test_cancelling_generate_before_sending_sends_nothing(tmp_path: Path) -> None:
    """A generate() cancelled while its request waits for a slot is simply cancelled."""
    async with HeldAPI().serving() as api:
        async with Engine(api.settings(concurrency=1), out_dir=tmp_path) as engine:
            first = asyncio.create_task(engine.generate(EIGHT[0]))
            await api.arrived(1)
            waiting = asyncio.create_task(engine.generate(EIGHT[1]))
            # Cancelled only once its request waits in the engine for the one slot.
            await until(lambda: engine.limiter.waiting == 1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            api.release.set()
            (done,) = await first
        assert done.ok
        assert api.prompts == ["p0"]
        assert [e["key"] for e in results(tmp_path)] == ["x0#0"]
        assert engine.summary.cut_off_requests == 0


async def test_requests_still_out_after_the_grace_period_are_counted_as_cut_off(
    tmp_path: Path,
) -> None:
    """With no grace period, closing the engine cuts the eight sent requests off at once and
    counts them (they may be billed; nothing records them)."""
    async with (
        HeldAPI().serving() as api,
        Engine(api.settings(concurrency=8, grace_period=0), out_dir=tmp_path) as engine,
    ):
        calls = [asyncio.create_task(engine.generate(job)) for job in EIGHT]
        await api.arrived(8)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    assert engine.summary.cut_off_requests == 8
    events = ledger_events(tmp_path)
    assert [e for e in events if e["event"] == "result"] == []
    assert events[-1]["event"] == "end" and events[-1]["summary"]["cut_off_requests"] == 8


async def test_breaking_out_of_run_records_every_sent_request(tmp_path: Path) -> None:
    """A consumer breaks out of run() at its first result while the other eight requests are
    held at the server: leaving the engine waits for their lines; a rerun sends nothing."""
    image = {"b64_json": base64.b64encode(make_png(8, 8, 1)).decode()}
    release = asyncio.Event()
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append((await request.json())["prompt"])
        if len(seen) > 1:
            await release.wait()
        return web.json_response({"created": 1, "data": [image]})

    jobs = [Job(id=f"b{i}", prompt=f"p{i}", model="qwen-image") for i in range(9)]
    async with serve({("POST", "/v1/images/generations"): answer}) as origin:
        settings = Settings(base_url=f"{origin}/v1", api_key="sk-test", concurrency=9)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            async for _ in engine.run(jobs):
                await until(lambda: len(seen) == 9)
                break
            release.set()
        oks = [e["key"] for e in results(tmp_path) if e["status"] == "ok"]
        assert sorted(oks) == sorted(f"b{i}#0" for i in range(9))
        assert ledger_events(tmp_path)[-1]["event"] == "end"
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            assert await run_all(engine, jobs) == []
        assert len(seen) == 9  # paid twice: 0


async def test_a_rate_alone_sizes_concurrency_and_the_summary_says_what_held_it_back(
    tmp_path: Path,
) -> None:
    """Settings(rpm=...) and no concurrency: the engine follows the rate (1,000 workers at
    most), the level settles at 1.5 x rate x latency + 1 once 32 answers are timed, and the
    summary (and the ledger's end line) give the rate against the limit and its cause."""
    async with Simulator(SimConfig(seed=1, latency=0.05)) as sim:
        # 120 requests at 1,200/min: half a second's burst, then 5.5 s paced.
        settings = settings_for(sim, rpm=1200)
        jobs = [Job(id=f"j{i}", prompt=f"p {i}", model="gpt-image-1") for i in range(120)]
        async with Engine(settings, out_dir=tmp_path) as engine:
            assert engine.limiter.mode == "rate" and engine.limiter.level == 1000
            results = await run_all(engine, jobs)
            # 20/s x ~0.05 s x 1.5 + 1: a handful, far below the 1,000 it started from.
            assert 2 <= engine.limiter.level <= 10
    assert len(results) == 120 and all(r.ok for r in results)
    pace = engine.summary.pace
    assert pace is not None and pace.cause == "rate" and pace.mode == "rate"
    end = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[-1])
    recorded = end["summary"]["pace"]
    assert recorded["held_back_by"] == "rate" and recorded["rpm"] == 1200
    assert 0.95 <= recorded["share_of_limit"] <= 1.15
    assert recorded["concurrency_mode"] == "rate" and recorded["max_concurrency"] == 1000
    assert recorded["requests_per_min"] > 0 and recorded["latency_s"] >= 0.05


async def test_a_fixed_concurrency_below_the_rate_is_named_as_the_limit(tmp_path: Path) -> None:
    """--concurrency 4 with an rpm that 4 slots cannot reach: every slot stays in use (a worker
    storing its images does not idle one) and the summary names concurrency, with what the
    rate would need."""
    async with Simulator(SimConfig(seed=1, latency=0.2)) as sim:
        settings = settings_for(sim, concurrency=4, rpm=6000)
        jobs = [Job(id=f"j{i}", prompt=f"p {i}", model="gpt-image-1") for i in range(110)]
        async with Engine(settings, out_dir=tmp_path) as engine:
            results = await run_all(engine, jobs)
        assert sim.stats.max_in_flight == 4
    assert all(r.ok for r in results)
    pace = engine.summary.pace
    assert pace is not None and pace.cause == "concurrency", pace
    # 100 a second at about 0.2 s each need about 20 in flight.
    assert re.search(r"limited by concurrency 4: at 0\.2 s per request, 6,000/min needs about 2\d$",
                     pace.text()), pace.text()  # fmt: skip
