"""Budget caps: the pure bookkeeping, a capped run against the simulator, and the rerun."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support import ledger_results, no_sleep, run_all, serve, settings_for

from cometbatch import (
    BudgetExceededError,
    Engine,
    Job,
    Settings,
    SimConfig,
    Simulator,
    load_manifest,
)
from cometbatch.costs.budget import Budget, cap_text, earlier_totals
from cometbatch.costs.prices import PriceTable, builtin_prices, request_cost
from cometbatch.ledger.events import LEDGER_NAME
from cometbatch.ledger.verify import verify_folder
from cometbatch.simulator.imagegen import make_png
from cometbatch.views.status import read_status

ROOT = Path(__file__).resolve().parent.parent
# qwen-image at a round $0.25 an image (one image per request, no usage tokens).
ROUND_PRICES = {"models": {"qwen-image": {"per_image": {"*": {"*": 0.25}}}}}


def round_prices() -> PriceTable:
    return builtin_prices().merged(ROUND_PRICES, source="test")


def qwen_jobs(count: int) -> list[Job]:
    return [Job(id=f"q{i}", prompt=f"prompt {i}", model="qwen-image") for i in range(count)]


def ledger_events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / LEDGER_NAME).read_text().splitlines() if line]


# --- the pure bookkeeping --------------------------------------------------------------------


def test_a_reservation_that_would_cross_max_images_is_refused_and_nothing_is_held() -> None:
    """Reservations count toward the cap like made images; the first refusal is final."""
    budget = Budget(max_images=6, earlier_images=1)
    assert budget.reserve(2, None) is None
    assert budget.reserve(2, None) is None
    assert (budget.images, budget.reserved_images) == (1, 4)
    assert budget.reserve(1, None) is None  # exactly at the cap is allowed
    assert budget.reserve(1, None) == "max_images"
    assert budget.reserved_images == 5
    budget.release(2, None)  # room again, but a refused budget stays refused
    assert budget.reserve(1, None) == "max_images"
    assert budget.stopped == "max_images"


def test_settling_replaces_the_reservation_by_what_was_made_and_spent() -> None:
    """An ok request commits its images and actual cost; a failed one gives its images back."""
    budget = Budget(max_cost=1.0, earlier_cost=0.25)
    assert budget.reserve(2, 0.5) is None
    budget.settle(2, 0.5, made=2, spent=0.375)  # usage tokens said less than the list price
    assert (budget.images, budget.reserved_images) == (2, 0)
    assert budget.cost == pytest.approx(0.625) and budget.reserved_cost == pytest.approx(0.0)
    assert budget.reserve(1, 0.25) is None
    budget.settle(1, 0.25, made=0, spent=0.25)  # failed, but possibly billed: cost kept
    assert budget.images == 2 and budget.cost == pytest.approx(0.875)
    assert budget.reserve(1, 0.25) == "max_cost"
    assert "max_cost $1.00: the next request would cross it" in cap_text(budget)


def test_sums_of_prices_do_not_cross_a_cap_by_rounding() -> None:
    """Twenty-five requests at $0.04 fit a $1 cap exactly, despite float sums."""
    budget = Budget(max_cost=1.0)
    for _ in range(25):
        assert budget.reserve(1, 0.04) is None
    assert budget.reserve(1, 0.04) == "max_cost"


def test_an_unpriced_request_is_refused_under_a_cost_cap_only() -> None:
    """Without a price a dollar cap cannot be kept, so it refuses; an image cap does not care."""
    assert Budget(max_images=3).reserve(1, None) is None
    capped = Budget(max_cost=10.0)
    assert capped.reserve(1, None) == "max_cost"
    assert capped.unpriced and "has no price" in cap_text(capped)


def test_request_cost_names_its_basis() -> None:
    """Usage tokens where the model bills by token, else the list price; nothing made: free."""
    prices = builtin_prices()
    usage = {"input_tokens": 1_000_000, "output_tokens": 0}
    assert request_cost("gpt-image-1", usage, 1, None, None, prices) == (5.0, "usage")
    cost, basis = request_cost("dall-e-3", None, 2, "1024x1024", "standard", prices)
    assert (round(cost or 0, 3), basis) == (0.08, "list")
    assert request_cost("dall-e-3", None, 0, None, None, prices) == (0.0, "none")
    assert request_cost("no-such-model", None, 1, None, None, prices) == (None, "unpriced")


def test_earlier_totals_count_each_paid_request_once(tmp_path: Path) -> None:
    """Images come from each generation's latest line; dollars from each recorded `cost`,
    else from the list price (lines written before results recorded their cost)."""

    def line(key: str, status: str, n: int, **extra: Any) -> dict[str, Any]:
        job_id = key.split("#")[0]
        images = [
            {"index": i, "path": f"images/{job_id}/{i}.png", "format": "png", "bytes": 1,
             "sha256": "0" * 64, "revised_prompt": None}
            for i in range(n if status == "ok" else 0)
        ]  # fmt: skip
        return {"event": "result", "key": key, "job_id": key.split("#")[0], "n": n,
                "status": status, "fingerprint": "0" * 16, "model": "qwen-image",
                "images": images, "usage": None, **extra}  # fmt: skip

    path = tmp_path / LEDGER_NAME
    events = [
        line("a#0", "failed", 1),
        line("a#0", "ok", 1, cost={"usd": 0.5, "basis": "list"}),
        line("b#0", "ok", 2),  # no cost field: priced at the list price (0.03 each)
        line("c#0", "failed", 1, cost={"usd": 0.0, "basis": "none"}),
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    images, cost = earlier_totals(path, builtin_prices())
    assert images == 3 and cost == pytest.approx(0.56)


# --- runs against the simulator ----------------------------------------------------------------


async def test_max_images_stops_at_the_cap_and_a_higher_cap_continues(tmp_path: Path) -> None:
    """With 4 requests in flight at a time, a run capped at 5 images generates exactly 5, ends
    with `stopped: max_images`; a rerun with a higher cap sends only the rest."""
    jobs = [*qwen_jobs(8), Job(id="split", prompt="three", n=3)]  # dall-e-3: 3 requests
    async with Simulator(SimConfig(seed=1)) as sim:
        settings = settings_for(sim, concurrency=4, max_images=5)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            first = await run_all(engine, jobs)
        assert sim.stats.generated == len(first) == 5 and all(r.ok for r in first)
        summary = engine.summary
        assert (summary.stopped, summary.complete, summary.pending_requests) == (
            "max_images", False, 6,
        )  # fmt: skip
        end = ledger_events(tmp_path)[-1]
        assert (end["event"], end["stopped"], end["summary"]["stopped"]) == (
            "end", "max_images", "max_images",
        )  # fmt: skip
        assert end["summary"]["budget"]["images"] == 5

        # The same cap again: the folder already holds 5 images, so nothing is sent.
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            assert await run_all(engine, jobs) == []
        assert sim.stats.generated == 5 and engine.summary.stopped == "max_images"

        higher = settings_for(sim, concurrency=4, max_images=20)
        async with Engine(higher, out_dir=tmp_path, sleep=no_sleep) as engine:
            rest = await run_all(engine, jobs)
        assert engine.summary.complete and engine.summary.stopped is None
        assert sim.stats.generated == 11 and sim.stats.requests == 11
        assert {r.key for r in first}.isdisjoint(r.key for r in rest)
        assert engine.summary.budget is not None and engine.summary.budget.images == 11
    assert ledger_events(tmp_path)[-1]["stopped"] is None


async def test_requests_in_flight_count_toward_the_cap(tmp_path: Path) -> None:
    """While 3 requests are held unanswered, the 4th worker is refused: it never reaches the
    API, and the held ones still land and are recorded."""
    arrived = 0
    release = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        await release.wait()
        image = {"b64_json": base64.b64encode(make_png(8, 8, 1)).decode()}
        return web.json_response({"created": 1, "data": [image]})

    async with serve({("POST", "/v1/images/generations"): hold}) as origin:
        settings = Settings(base_url=f"{origin}/v1", api_key="sk-test", concurrency=4, max_images=3)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            task = asyncio.create_task(run_all(engine, qwen_jobs(10)))
            async with asyncio.timeout(30):
                # The engine has no event for "a cap refused a request": poll its summary.
                while engine.summary.stopped is None or arrived < 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert arrived == 3
            release.set()
            got = await task
    assert arrived == 3 and len(got) == 3 and all(r.ok for r in got)
    assert len(ledger_results(tmp_path)) == 3


async def test_max_cost_stops_before_the_cap_and_a_higher_cap_continues(tmp_path: Path) -> None:
    """At $0.25 an image, a $1.00 cap makes 4 images and records their cost; $2.00 makes the
    rest (the folder's spend so far is counted, nothing is made twice)."""
    prices = round_prices()
    jobs = qwen_jobs(6)
    async with Simulator(SimConfig(seed=2)) as sim:
        capped = settings_for(sim, concurrency=3, max_cost=1.0)
        async with Engine(capped, out_dir=tmp_path, sleep=no_sleep, prices=prices) as engine:
            first = await run_all(engine, jobs)
        assert sim.stats.generated == len(first) == 4
        assert engine.summary.stopped == "max_cost"
        assert engine.summary.spent_usd == pytest.approx(1.0)
        costs = {e["key"]: e["cost"] for e in ledger_results(tmp_path)}
        assert all(cost == {"usd": 0.25, "basis": "list"} for cost in costs.values())
        assert ledger_events(tmp_path)[-1]["stopped"] == "max_cost"

        higher = settings_for(sim, concurrency=3, max_cost=2.0)
        async with Engine(higher, out_dir=tmp_path, sleep=no_sleep, prices=prices) as engine:
            rest = await run_all(engine, jobs)
        assert sim.stats.generated == 6 and len(rest) == 2
        assert engine.summary.complete
        budget = engine.summary.budget
        assert budget is not None and budget.cost == pytest.approx(1.5)
        assert budget.earlier_cost == pytest.approx(1.0)


async def test_generate_past_a_cap_raises_and_sends_nothing(tmp_path: Path) -> None:
    """engine.generate() under a cap: the job that would cross it is refused with
    BudgetExceededError naming the cap."""
    async with Simulator(SimConfig(seed=3)) as sim:
        settings = settings_for(sim, max_images=1)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (done,) = await engine.generate(qwen_jobs(1)[0])
            with pytest.raises(BudgetExceededError, match="max_images 1") as refused:
                await engine.generate(Job(id="more", prompt="more", model="qwen-image"))
        assert done.ok and refused.value.reason == "max_images"
        assert sim.stats.generated == 1


async def test_results_count_their_429s_and_the_run_event_records_job_defaults(
    tmp_path: Path,
) -> None:
    """A request that met two 429s says so on its ledger line; the run event keeps the
    manifest's --model/--size/--n defaults."""
    manifest_path = tmp_path / "prompts.txt"
    manifest_path.write_text("a red fox\n")
    manifest = load_manifest(manifest_path, model="qwen-image", n=2)
    out = tmp_path / "out"
    async with Simulator(SimConfig(seed=4)) as sim:
        sim.enqueue("429", "429")
        one_at_a_time = settings_for(sim, concurrency=1)
        async with Engine(one_at_a_time, out_dir=out, sleep=no_sleep) as engine:
            await run_all(engine, manifest)
    events = ledger_events(out)
    assert events[0]["defaults"] == {"model": "qwen-image", "size": None, "n": 2}
    counts = sorted(e["rate_limited"] for e in events if e["event"] == "result")
    assert counts == [0, 2] and engine.summary.rate_limited == 2


# --- the command line --------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cometbatch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def write_qwen_manifest(path: Path, count: int) -> Path:
    lines = (
        json.dumps({"id": f"q{i}", "prompt": f"p {i}", "model": "qwen-image"}) for i in range(count)
    )
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_cli_max_images_exits_3_and_a_higher_cap_finishes_without_regenerating(
    tmp_path: Path,
) -> None:
    """`run --max-images` stops at the cap with exit 3 and says why; the rerun with a higher
    cap sends exactly the requests that are left."""
    manifest = write_qwen_manifest(tmp_path / "m.jsonl", 8)
    out = tmp_path / "out"
    base = ["run", str(manifest), "--simulate", "--out", str(out), "--concurrency", "4"]
    capped = cli(*base, "--max-images", "3", "--json")
    assert capped.returncode == 3, capped.stderr
    summary = json.loads(capped.stdout)
    assert (summary["simulator_requests"], summary["ok_requests"]) == (3, 3)
    assert summary["stopped"] == "max_images" and summary["budget"]["images"] == 3
    assert ledger_events(out)[-1]["stopped"] == "max_images"

    said = cli(*base, "--max-images", "3")
    assert said.returncode == 3
    assert "stopped at the budget cap max_images 3" in said.stderr
    assert "--max-images to continue" in said.stderr

    rest = cli(*base, "--max-images", "100", "--json")
    assert rest.returncode == 0, rest.stderr
    summary = json.loads(rest.stdout)
    assert (summary["simulator_requests"], summary["skipped_requests"]) == (5, 3)
    assert summary["complete"] and summary["stopped"] is None


def test_cli_max_cost_with_a_price_file_exits_3_then_continues(tmp_path: Path) -> None:
    """`run --max-cost 1 --prices FILE` at $0.25 an image makes 4 images; 2 more under $2."""
    manifest = write_qwen_manifest(tmp_path / "m.jsonl", 6)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(ROUND_PRICES))
    out = tmp_path / "out"
    base = ["run", str(manifest), "--simulate", "--out", str(out), "--prices", str(prices)]
    capped = cli(*base, "--max-cost", "1", "--concurrency", "3", "--json")
    assert capped.returncode == 3, capped.stderr
    summary = json.loads(capped.stdout)
    assert summary["simulator_requests"] == 4 and summary["stopped"] == "max_cost"
    assert summary["spent_usd"] == pytest.approx(1.0)
    assert summary["spend"]["estimated_usd"] == pytest.approx(1.0)

    rest = cli(*base, "--max-cost", "2", "--json")
    assert rest.returncode == 0, rest.stderr
    assert json.loads(rest.stdout)["simulator_requests"] == 2

    refused = cli(*base, "--max-cost", "0")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr


async def test_images_verify_marked_stay_paid_for_status_the_budget_and_the_cap(
    tmp_path: Path,
) -> None:
    """A key verify marked (its latest line failed, its image withdrawn) was paid for all the
    same: status spend, the budget's earlier totals and --max-images count it; generating it
    again is a second payment, counted by all three alike."""
    prices = round_prices()
    # Inline images: a lost one has no link to download again, so it is generated again.
    jobs = [job.model_copy(update={"response_format": "b64_json"}) for job in qwen_jobs(3)]
    ledger = tmp_path / LEDGER_NAME

    def counted() -> tuple[tuple[int, float], tuple[int, float]]:
        spend = read_status(tmp_path, prices=prices).to_dict()["spend"]
        images, usd = earlier_totals(ledger, prices)
        return (images, round(usd, 6)), (spend["images"], round(spend["usd"], 6))

    async with Simulator(SimConfig(seed=3)) as sim:
        settings = settings_for(sim, concurrency=2)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep, prices=prices) as engine:
            await run_all(engine, jobs)
        (image,) = (tmp_path / "images" / "q0").iterdir()
        image.unlink()
        assert (await verify_folder(tmp_path)).marked_keys == 1
        assert counted() == ((3, 0.75), (3, 0.75))

        # At a cap of the 3 images paid for, generating the marked key again would cross it.
        capped = settings_for(sim, concurrency=2, max_images=3)
        async with Engine(capped, out_dir=tmp_path, sleep=no_sleep, prices=prices) as engine:
            await run_all(engine, jobs)
        assert engine.summary.stopped == "max_images" and sim.stats.generated == 3

        higher = settings_for(sim, concurrency=2, max_images=4)
        async with Engine(higher, out_dir=tmp_path, sleep=no_sleep, prices=prices) as engine:
            await run_all(engine, jobs)
        assert engine.summary.complete and sim.stats.generated == 4
        assert engine.summary.budget is not None and engine.summary.budget.images == 4
    assert counted() == ((4, 1.0), (4, 1.0))


def test_each_generation_is_paid_once_however_its_key_was_recorded_again(
    tmp_path: Path,
) -> None:
    """A key generated again under the same fingerprint (after its image was withdrawn) is
    paid twice; a download tried again, the rest of a partial key and images put back are the
    same generation. Status and the budget count the same."""

    def image(key: str, index: int) -> dict[str, Any]:
        return {"index": index, "path": f"images/{key}/{index}.png", "format": "png",
                "bytes": 1, "sha256": "0" * 64}  # fmt: skip

    def line(key: str, status: str, run: str, attempts: int, images: int, **extra: Any) -> str:
        event = {"event": "result", "run_id": run, "key": f"{key}#0", "job_id": key,
                 "status": status, "fingerprint": "f" * 16, "model": "qwen-image", "n": 1,
                 "images": [image(key, i) for i in range(images)], "downloads": [],
                 "attempts": attempts, "error": None, "usage": None,
                 "cost": {"usd": 0.25 * images, "basis": "list"}, **extra}  # fmt: skip
        return json.dumps(event) + "\n"

    def withdrawing(key: str, run: str) -> str:
        taken = {"images": [image(key, 0)], "usage": None, "cost": {"usd": 0.25}}
        error = {"kind": "missing_image", "retryable": True}
        return line(key, "failed", run, 0, 0, error=error, withdrawn=taken)

    link = {"index": 0, "url": "https://img.example/b.png", "tries": 1}
    lines = [
        # Generated, found missing (verify), set aside and generated again in run r2.
        line("a", "ok", "r1", 1, 1),
        withdrawing("a", "verify"),
        withdrawing("a", "r2"),
        line("a", "ok", "r2", 1, 1),
        # Generated, its download failed, fetched in a later run (nothing sent).
        line("b", "download_failed", "r1", 1, 0, downloads=[link], cost={"usd": 0.25}),
        line("b", "ok", "r2", 0, 1),
        # A short answer, then the rest (the line lists both images and their whole cost).
        line("c", "partial", "r1", 1, 1, n=2),
        line("c", "ok", "r2", 1, 2, n=2),
        # Found missing, then put back whole from where it was kept (nothing sent).
        line("d", "ok", "r1", 1, 1),
        withdrawing("d", "verify"),
        line("d", "ok", "r3", 0, 1),
    ]
    (tmp_path / LEDGER_NAME).write_text("".join(lines))
    images, cost = earlier_totals(tmp_path / LEDGER_NAME, builtin_prices())
    assert images == 6
    assert cost == pytest.approx(1.5)
    spend = read_status(tmp_path, prices=round_prices()).to_dict()["spend"]
    assert (spend["images"], spend["usd"]) == (6, pytest.approx(1.5))
