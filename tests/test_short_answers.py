"""Short answers: the images that came are kept and recorded, only the missing count is asked
for again (under the same key, continuing the job's indexes), and nothing is paid twice."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support import ledger_results, no_sleep, run_all, serve, settings_for

from cometbatch import Engine, Job, ModelRegistry, Settings, SimConfig, Simulator
from cometbatch.costs.budget import earlier_totals
from cometbatch.costs.prices import builtin_prices
from cometbatch.engine.attempts import Attempts
from cometbatch.engine.forecast import forecast, ledger_verdicts
from cometbatch.ledger.index import LedgerState
from cometbatch.plan import plan_job, remainder
from cometbatch.simulator.imagegen import make_png
from cometbatch.views.export import export
from cometbatch.views.gallery.content import read_gallery
from cometbatch.views.status import read_status

# 420 images in requests of 2 to 10 (dall-e-2 takes up to 10 per request).
SIZES = [2, 3, 4, 5, 6, 7, 8, 9, 10] * 7 + [10, 10, 10, 10, 2]
JOBS = [
    Job(id=f"j{i}", prompt=f"a lighthouse, study {i}", model="dall-e-2", n=n,
        response_format="b64_json")
    for i, n in enumerate(SIZES)
]  # fmt: skip
PLANNED = sum(SIZES)


@pytest.mark.parametrize(("done", "n", "first", "sent_n"), [(1, 2, 1, None), (3, 10, 3, 7)])
def test_the_remainder_continues_the_indexes_under_the_same_key(
    done: int, n: int, first: int, sent_n: int | None
) -> None:
    """The follow-up asks for the missing count (n left out when it is 1), continuing the
    job's indexes, with the key and fingerprint of the request it completes."""
    job = Job(id="j", prompt="p", model="dall-e-2", n=10 + n)
    request = list(plan_job(job, ModelRegistry().get("dall-e-2")))[1]
    assert (request.n, request.first_index) == (n, 10)
    rest = remainder(request, done)
    assert (rest.key, rest.fingerprint, rest.chunk) == (request.key, request.fingerprint, 1)
    assert (rest.n, rest.first_index, rest.payload.get("n")) == (n - done, 10 + first, sent_n)
    assert {k: v for k, v in rest.payload.items() if k != "n"} == {
        k: v for k, v in request.payload.items() if k != "n"
    }
    assert remainder(request, 0) == request
    with pytest.raises(ValueError):
        remainder(request, n)


def latest_by_key(out: Path) -> dict[str, dict[str, Any]]:
    """The latest result line of each key."""
    return {event["key"]: event for event in ledger_results(out)}


def assert_each_image_once(out: Path, jobs: list[Job]) -> None:
    """Every planned image is on disk once and named once by its key's latest (ok) line."""
    latest = latest_by_key(out)
    assert {event["status"] for event in latest.values()} == {"ok"}
    named = Counter(
        (event["job_id"], image["index"]) for event in latest.values() for image in event["images"]
    )
    expected = {(job.id, k) for job in jobs for k in range(job.n)}
    assert set(named) == expected and set(named.values()) == {1}
    on_disk = {(p.parent.name, int(p.stem)) for p in (out / "images").rglob("*") if p.is_file()}
    assert on_disk == expected
    for event in latest.values():
        for image in event["images"]:
            data = (out / image["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == image["sha256"]


async def test_short_answers_are_kept_and_only_the_missing_images_are_asked_for(
    tmp_path: Path,
) -> None:
    """With 30 % of requests answered by half the images, every planned image lands once and
    the server bills exactly the planned images: no request is repeated whole."""
    async with Simulator(SimConfig(seed=5, rate_short=0.3)) as sim:
        # The cap is exactly the plan: follow-ups are covered by their key's reservation.
        settings = settings_for(sim, concurrency=8, max_images=PLANNED)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            got = await run_all(engine, JOBS)
        billed = sim.stats.billed_images
        shorts = sim.stats.faults["short"]
    assert shorts > 20  # the scenario happened
    assert engine.summary.complete and all(result.ok for result in got)
    assert_each_image_once(tmp_path, JOBS)
    assert billed - PLANNED == 0
    assert engine.summary.ambiguous_retries == 0
    assert engine.summary.budget is not None and engine.summary.budget.images == PLANNED
    # Each short answer left a partial line (before its follow-up was sent).
    statuses = Counter(event["status"] for event in ledger_results(tmp_path))
    assert statuses["partial"] == shorts
    # Counted once each, though a short key's images are listed on more than one line.
    assert engine.summary.images_written == PLANNED
    assert read_status(tmp_path).to_dict()["ok_images"] == PLANNED
    assert sum(bucket.images for bucket in read_gallery(tmp_path).buckets) == PLANNED
    ledger = tmp_path / "ledger.jsonl"
    images, cost = earlier_totals(ledger, builtin_prices())
    assert images == PLANNED and cost == pytest.approx(engine.summary.spent_usd)


async def test_short_answers_with_image_links_download_each_image_once(tmp_path: Path) -> None:
    """Answers with links: every answer is short, each link is downloaded once, and each
    follow-up asks for what is missing until the key is complete."""
    jobs = [Job(id=f"u{n}", prompt=f"a kite {n}", model="dall-e-2", n=n) for n in (2, 5, 10)]
    async with Simulator(SimConfig(seed=6, rate_short=1.0)) as sim:
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, jobs)
        billed, downloads = sim.stats.billed_images, sim.stats.downloads
    assert engine.summary.complete
    assert_each_image_once(tmp_path, jobs)
    assert billed == downloads == 17


@contextlib.asynccontextmanager
async def short_then_stop(out: Path) -> AsyncIterator[tuple[Engine, list[dict[str, Any]]]]:
    """An engine on a server whose first answer carries 1 of the 2 images asked for, after
    which the run is stopped: the follow-up is never sent. Yields it and the requests seen."""
    seen: list[dict[str, Any]] = []
    holder: list[Engine] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        holder[0].stop()
        png = base64.b64encode(make_png(8, 8, seed=1)).decode()
        return web.json_response({"created": 1, "data": [{"b64_json": png}]})

    async with serve({("POST", "/v1/images/generations"): handler}) as origin:
        settings = Settings(base_url=f"{origin}/v1", api_key="sk-test")
        async with Engine(settings, out_dir=out, sleep=no_sleep) as engine:
            holder.append(engine)
            yield engine, seen


JOB = Job(id="pair", prompt="two boats", model="dall-e-2", n=2, response_format="b64_json")


async def stopped_after_a_short_answer(out: Path) -> list[dict[str, Any]]:
    """Run JOB against a server that answers short and stops the run; the requests it saw."""
    async with short_then_stop(out) as (engine, seen):
        got = await run_all(engine, [JOB])
    assert len(seen) == 1
    assert [result.status for result in got] == ["partial"]
    assert not engine.summary.complete
    assert engine.summary.images_written == 1
    return list(seen)


async def test_a_stop_after_a_short_answer_records_it_and_the_rerun_asks_for_the_rest(
    tmp_path: Path,
) -> None:
    """The short answer's image is recorded (partial) before any follow-up; the next run sends
    only the missing count, continuing the job's indexes, and records the key ok."""
    await stopped_after_a_short_answer(tmp_path)
    (line,) = ledger_results(tmp_path)
    assert (line["status"], line["n"], line["key"]) == ("partial", 2, "pair#0")
    assert [image["index"] for image in line["images"]] == [0]
    first = (tmp_path / "images" / "pair" / "0.png").read_bytes()

    async with Simulator(SimConfig(seed=2)) as sim:
        # The recorded image counts against the cap; the rest fits exactly.
        settings = settings_for(sim, max_images=2)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            got = await run_all(engine, [JOB])
        bodies = [entry["body"] for entry in sim.stats.requests_log]
        billed = sim.stats.billed_images
    assert [body.get("n", 1) for body in bodies] == [1]
    assert billed == 1
    assert [result.status for result in got] == ["ok"] and engine.summary.complete
    # Only the image this run wrote: the first was written (and counted) by the first run.
    assert engine.summary.images_written == 1
    assert engine.summary.budget is not None
    assert (engine.summary.budget.earlier_images, engine.summary.budget.images) == (1, 2)
    assert_each_image_once(tmp_path, [JOB])
    assert (tmp_path / "images" / "pair" / "0.png").read_bytes() == first
    ok = latest_by_key(tmp_path)["pair#0"]
    assert [image["index"] for image in ok["images"]] == [0, 1]


async def test_a_crash_between_the_partial_line_and_the_follow_up_resumes_with_the_rest(
    tmp_path: Path,
) -> None:
    """The ledger a kill leaves after the partial line (the follow-up's files may be on disk,
    its line is not) resumes by asking only for the missing images."""
    async with Simulator(SimConfig(seed=3)) as sim:
        sim.enqueue("short")
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, [JOB])
    ledger = tmp_path / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    cut = next(i for i, text in enumerate(lines) if json.loads(text).get("status") == "partial")
    ledger.write_text("".join(lines[: cut + 1]))
    async with Simulator(SimConfig(seed=4)) as sim:
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, [JOB])
        assert [entry["body"].get("n", 1) for entry in sim.stats.requests_log] == [1]
    assert engine.summary.complete
    assert_each_image_once(tmp_path, [JOB])


async def test_status_export_dry_run_and_budget_count_a_partial_key(tmp_path: Path) -> None:
    """A partial key's recorded images are done (and paid), the rest pending."""
    await stopped_after_a_short_answer(tmp_path)
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps(JOB.model_dump(exclude_none=True)) + "\n")
    status = read_status(tmp_path, manifest=manifest).to_dict()
    assert (status["ok_images"], status["pending_images"], status["failed_images"]) == (1, 1, 0)
    assert status["failures"] == {}

    out = io.StringIO()
    export(tmp_path, "jsonl", out)
    (job,) = map(json.loads, out.getvalue().splitlines())
    assert job["status"] == "partial" and len(job["images"]) == 1
    assert job["error"]["kind"] == "partial"

    gallery = read_gallery(tmp_path)
    assert gallery.image_count == 1 and gallery.failures == []
    assert [(t.status, t.n) for t in gallery.tiles if t.status != "ok"] == [("partial", 1)]
    assert sum(bucket.images for bucket in gallery.buckets) == 1

    state = LedgerState.load(tmp_path / "ledger.jsonl")
    other = Job(id="other", prompt="a raft", model="dall-e-2", n=3)
    plan = forecast([JOB, other], ledger_verdicts(ModelRegistry().quiet(), state.get)).totals()
    assert (plan.done_images, plan.send_requests, plan.send_images) == (1, 2, 4)
    images, cost = earlier_totals(tmp_path / "ledger.jsonl", builtin_prices())
    assert images == 1 and cost > 0


async def test_a_second_caller_sharing_a_partial_key_counts_no_kept_failure(
    tmp_path: Path,
) -> None:
    """Two callers of one job: the second shares the first's partial result (stopped after a
    short answer), which is pending work, not a permanent failure."""
    async with short_then_stop(tmp_path) as (engine, seen):
        first, second = await asyncio.gather(engine.generate(JOB), engine.generate(JOB))
    assert len(seen) == 1
    assert [r.status for r in first + second] == ["partial", "partial"]
    assert engine.summary.kept_failures == 0


async def test_a_follow_up_waiting_for_its_turn_holds_nothing_unrecorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the partial line is written, the key's follow-up holds nothing paid for and not
    recorded: a hard stop while it waits cuts off no sent request."""
    send = Attempts.send
    engines: list[Engine] = []
    calls: list[int] = []

    async def follow_up_stops(self: Attempts, request: Any) -> Any:
        calls.append(request.n)
        if len(calls) == 2:
            engines[0].abort()  # a second Ctrl-C while the follow-up waits for a slot
        return await send(self, request)

    monkeypatch.setattr(Attempts, "send", follow_up_stops)
    async with Simulator(SimConfig(seed=3)) as sim:
        sim.enqueue("short")
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            engines.append(engine)
            with contextlib.suppress(asyncio.CancelledError):
                await run_all(engine, [JOB])
        assert sim.stats.requests == 1
    assert calls == [2, 1]
    assert engine.summary.cut_off_requests == 0
    # The partial line stands, and the summary counts its image.
    assert [line["status"] for line in ledger_results(tmp_path)] == ["partial"]
    assert engine.summary.images_written == 1
