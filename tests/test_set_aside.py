"""A kill at any step of regenerating a changed job leaves a ledger that tells the truth, and a
rerun of either manifest does the right thing without paying for what is on disk."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support import ledger_results, no_sleep, run_all, settings_for

from cometbatch import Engine, Job, SimConfig, Simulator
from cometbatch.ledger.events import LEDGER_NAME, iter_events
from cometbatch.ledger.index import LedgerState
from cometbatch.ledger.verify import ImagePresence
from cometbatch.store.local import LocalStore
from cometbatch.store.setaside import REPLACED_DIR, put_back, set_aside
from cometbatch.views.status import read_status

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL = Job(id="c", prompt="one", model="gpt-image-1", n=2)
CHANGED = ORIGINAL.model_copy(update={"prompt": "two"})

# A child regenerates the changed job and SIGKILLs itself at one step: right before the old
# images move aside (after any line written before the move), right after they moved, or
# after the request was answered and its images written but before its result line.
CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    import cometbatch.engine.restore as restore
    from cometbatch import Engine, Job, Settings, SimConfig, Simulator
    from cometbatch.engine.attempts import Attempts

    out, point = sys.argv[1], sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    move = restore.set_aside

    def before_move(*args, **kwargs):
        die()

    def after_move(*args, **kwargs):
        moved = move(*args, **kwargs)
        die()
        return moved

    send = Attempts.send

    async def after_request(self, request):
        await send(self, request)
        die()

    if point == "before-move":
        restore.set_aside = before_move
    elif point == "after-move":
        restore.set_aside = after_move
    else:
        Attempts.send = after_request

    async def main():
        job = Job(id="c", prompt="two", model="gpt-image-1", n=2)
        async with Simulator(SimConfig(seed=9)) as sim:
            settings = Settings(base_url=sim.base_url, api_key="sk-test", regenerate_changed=True)
            async with Engine(settings, out_dir=out) as engine:
                async for _ in engine.run([job]):
                    pass

    asyncio.run(main())
    """
)
POINTS = ("before-move", "after-move", "after-request")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def latest_results(out: Path) -> dict[str, dict[str, Any]]:
    """Each key's latest result line."""
    latest = {}
    for _, event in iter_events(out / LEDGER_NAME):
        if event.get("event") == "result":
            latest[event["key"]] = event
    return latest


def assert_claims_true(out: Path) -> None:
    """Every image an ok line names is on disk with the size and digest the line records."""
    for key, event in latest_results(out).items():
        if event["status"] != "ok":
            continue
        for image in event["images"]:
            path = out / image["path"]
            assert path.is_file(), f"{key}: the ledger says ok, {image['path']} is gone"
            assert path.stat().st_size == image["bytes"], f"{key}: {image['path']} differs"
            assert sha256(path) == image["sha256"], f"{key}: {image['path']} differs"


async def kill_while_regenerating(out: Path, point: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(out), point, cwd=ROOT
    )
    assert await asyncio.wait_for(process.wait(), 60) == -signal.SIGKILL


async def first_run(sim: Simulator, out: Path) -> dict[int, str]:
    async with Engine(settings_for(sim), out_dir=out, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, [ORIGINAL])
    assert result.ok
    return {image.index: image.sha256 for image in result.images}


@pytest.mark.parametrize("point", POINTS)
async def test_rerunning_the_original_manifest_after_a_kill_pays_nothing(
    point: str, tmp_path: Path
) -> None:
    """The original job's images come back from where they were set aside, without a request."""
    async with Simulator(SimConfig(seed=3)) as sim:
        original = await first_run(sim, tmp_path)
        await kill_while_regenerating(tmp_path, point)
        assert_claims_true(tmp_path)
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, [ORIGINAL])
        assert sim.stats.requests == 1, "the original images were paid for again"
        assert_claims_true(tmp_path)
        (event,) = latest_results(tmp_path).values()
        assert event["status"] == "ok"
        assert {image["index"]: image["sha256"] for image in event["images"]} == original


@pytest.mark.parametrize("point", POINTS)
async def test_rerunning_the_changed_manifest_after_a_kill_regenerates_once(
    point: str, tmp_path: Path
) -> None:
    """The changed job is generated (once) and recorded; the old images stay in replaced/."""
    async with Simulator(SimConfig(seed=3)) as sim:
        original = await first_run(sim, tmp_path)
        await kill_while_regenerating(tmp_path, point)
        settings = settings_for(sim, regenerate_changed=True)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [CHANGED])
        assert result.ok
        assert sim.stats.requests == 2
        assert_claims_true(tmp_path)
        kept = {sha256(path) for path in (tmp_path / "replaced").rglob("*.png")}
        assert set(original.values()) <= kept
        # And the folder is consistent: the same command again sends nothing.
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            assert await run_all(engine, [CHANGED]) == []
        assert sim.stats.requests == 2


async def test_a_kill_before_anything_moved_changes_nothing(tmp_path: Path) -> None:
    """Killed before the move, the original manifest still finds its job done as it was."""
    async with Simulator(SimConfig(seed=3)) as sim:
        original = await first_run(sim, tmp_path)
        await kill_while_regenerating(tmp_path, "before-move")
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, [ORIGINAL])
        assert sim.stats.requests == 1
    for index, digest in original.items():
        assert sha256(tmp_path / f"images/c/{index}.png") == digest
    assert json.loads((tmp_path / LEDGER_NAME).read_text().splitlines()[-1])["event"] == "end"


async def test_a_failed_regeneration_keeps_the_record_of_the_images_set_aside(
    tmp_path: Path,
) -> None:
    """--regenerate-changed moves the old images aside, then the new request fails for good:
    its failed line still says where they are, so rerunning the original manifest puts them
    back without paying for them again."""
    async with Simulator(SimConfig(seed=3)) as sim:
        original = await first_run(sim, tmp_path)
        sim.enqueue("400")
        settings = settings_for(sim, regenerate_changed=True)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (failed,) = await run_all(engine, [CHANGED])
        assert failed.status == "failed"
        (line,) = latest_results(tmp_path).values()
        assert line["error"]["kind"] != "replaced" and "withdrawn" in line
        billed = sim.stats.billed_images
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [ORIGINAL])
        assert result.ok and sim.stats.billed_images == billed, "paid again for what was aside"
        assert engine.summary.restored_images == 2 and engine.summary.regenerated_missing == 0
        assert_claims_true(tmp_path)
        (event,) = latest_results(tmp_path).values()
        assert {image["index"]: image["sha256"] for image in event["images"]} == original
        assert event["fingerprint"] == result.fingerprint
        # The changed manifest is still the failure it was (a 400 is kept, not sent again).
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            assert await run_all(engine, [ORIGINAL]) == []
        assert sim.stats.billed_images == billed


async def test_a_failed_restore_still_puts_back_what_it_set_aside(tmp_path: Path) -> None:
    """An image of an ok key is gone: the run sets the other aside and asks again, and that
    request fails (retryable). Once the lost file is back, the next run puts both back
    without a request, instead of paying for the whole request again."""
    async with Simulator(SimConfig(seed=3)) as sim:
        original = await first_run(sim, tmp_path)
        lost = tmp_path / "images" / "c" / "1.png"
        saved = lost.read_bytes()
        lost.unlink()
        sim.enqueue("500")
        settings = settings_for(sim, max_attempts=1)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (failed,) = await run_all(engine, [ORIGINAL])
        assert failed.status == "failed"
        # Nothing was generated again: no request counts as regenerated.
        assert engine.summary.regenerated_missing == 0
        assert not (tmp_path / "images" / "c" / "0.png").exists()  # set aside
        lost.write_bytes(saved)
        billed = sim.stats.billed_images
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [ORIGINAL])
        assert result.ok and sim.stats.billed_images == billed, "paid again for what was aside"
        assert engine.summary.restored_images == 2
        assert_claims_true(tmp_path)
        (event,) = latest_results(tmp_path).values()
        assert {image["index"]: image["sha256"] for image in event["images"]} == original


async def test_a_regenerated_missing_image_is_counted_once_the_request_is_answered(
    tmp_path: Path,
) -> None:
    """regenerated_missing counts requests generated again for a lost file, after they were."""
    async with Simulator(SimConfig(seed=3)) as sim:
        await first_run(sim, tmp_path)
        (tmp_path / "images" / "c" / "1.png").unlink()
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [ORIGINAL])
        assert result.ok and engine.summary.regenerated_missing == 1


async def test_no_file_is_moved_or_counted_through_a_linked_job_folder(tmp_path: Path) -> None:
    """A job folder replaced by a link to a folder outside OUT: its files are not there for a
    run's look, and setting aside or putting back refuses (ELOOP) without moving anything."""
    out = tmp_path / "out"
    async with Simulator(SimConfig(seed=3)) as sim:
        await first_run(sim, out)
    elsewhere = tmp_path / "elsewhere"
    (out / "images" / "c").rename(elsewhere)
    (out / "images" / "c").symlink_to(elsewhere, target_is_directory=True)
    recorded = LedgerState.load(out / LEDGER_NAME).get("c#0")
    assert recorded is not None
    assert ImagePresence(out).missing("c", range(2), recorded, "png")
    with pytest.raises(OSError) as refused:
        set_aside(LocalStore(out), "r1", ["images/c/0.png", "images/c/1.png"])
    assert refused.value.errno == errno.ELOOP and "images/c" in str(refused.value.filename)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["0.png", "1.png"]
    assert not (out / REPLACED_DIR).exists()
    # One kept aside inside OUT is not moved back into the linked folder either.
    kept = out / REPLACED_DIR / "r0" / "c" / "0.png"
    kept.parent.mkdir(parents=True)
    (elsewhere / "0.png").rename(kept)
    image = {"index": 0, "path": "images/c/0.png", "aside": "replaced/r0/c/0.png"}
    with pytest.raises(OSError) as refused:
        put_back(LocalStore(out), [image], ["replaced/r0/c/0.png"])
    assert refused.value.errno == errno.ELOOP
    assert kept.is_file() and not (elsewhere / "0.png").exists()


FOUR = Job(id="q", prompt="one", model="gpt-image-1", n=4)
FOUR_CHANGED = FOUR.model_copy(update={"prompt": "two"})


async def test_images_put_back_from_a_partial_line_are_partial_again(tmp_path: Path) -> None:
    """A partial key (2 of 4 images) is set aside when its job changed, the new request fails,
    the job is reverted: its 2 images come back as the partial line they were (never ok with
    images missing), and only the 2 missing ones are asked for."""
    async with Simulator(SimConfig(seed=3)) as sim:
        sim.enqueue("short", "500")
        settings = settings_for(sim, max_attempts=1)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (first,) = await run_all(engine, [FOUR])
        assert first.status == "partial" and len(first.images) == 2
        sim.enqueue("400")
        changed = settings_for(sim, regenerate_changed=True)
        async with Engine(changed, out_dir=tmp_path, sleep=no_sleep) as engine:
            (failed,) = await run_all(engine, [FOUR_CHANGED])
        assert failed.status == "failed"
        sent, before = len(sim.stats.requests_log), len(ledger_results(tmp_path))
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [FOUR])
        put, *_ = lines = ledger_results(tmp_path)[before:]
        for line in lines:
            assert line["status"] != "ok" or len(line["images"]) == 4, "ok with images missing"
        assert (put["status"], len(put["images"]), put["n"]) == ("partial", 2, 4)
        assert put["attempts"] == 0
        assert result.ok and engine.summary.complete
        assert [e["body"].get("n", 1) for e in sim.stats.requests_log[sent:]] == [2]
        assert sim.stats.billed_images == 4
        (event,) = latest_results(tmp_path).values()
        assert sorted(image["index"] for image in event["images"]) == [0, 1, 2, 3]
        assert_claims_true(tmp_path)
        assert read_status(tmp_path).to_dict()["spend"]["images"] == 4
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            assert await run_all(engine, [FOUR]) == []
        assert len(sim.stats.requests_log) == sent + 1


async def test_images_put_back_from_a_download_failed_line_are_downloaded_not_paid_again(
    tmp_path: Path,
) -> None:
    """The same from a download_failed key (its links not downloaded, nothing to move): put
    back as download_failed with its links, which are downloaded (nothing generated)."""
    job = FOUR.model_copy(update={"model": "dall-e-2", "n": 2})
    async with Simulator(SimConfig(seed=3)) as sim:
        sim.enqueue(*["download-503"] * 8)
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            (first,) = await run_all(engine, [job])
        assert first.status == "download_failed" and first.error
        assert first.error["retryable"] is True
        sim.enqueue("400")
        changed = settings_for(sim, regenerate_changed=True)
        async with Engine(changed, out_dir=tmp_path, sleep=no_sleep) as engine:
            (failed,) = await run_all(engine, [job.model_copy(update={"prompt": "two"})])
        assert failed.status == "failed"
        billed = sim.stats.billed_images
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [job])
        assert result.ok and sim.stats.billed_images == billed, "paid again for its links"
        put = ledger_results(tmp_path)[-2]
        assert (put["status"], len(put["downloads"]), put["attempts"]) == ("download_failed", 2, 0)
        assert_claims_true(tmp_path)


async def test_images_put_back_after_a_failed_regeneration_claim_no_attempts(
    tmp_path: Path,
) -> None:
    """A regeneration fails after 3 attempts, then the original job is asked for in the same
    engine: the images put back record no attempt (nothing was sent), so status counts no
    retry for them and their payment once."""
    async with Simulator(SimConfig(seed=3)) as sim:
        await first_run(sim, tmp_path)
        sim.enqueue("500", "500", "500")
        settings = settings_for(sim, regenerate_changed=True, max_attempts=3)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (failed,) = await engine.generate(CHANGED)
            assert failed.status == "failed" and failed.attempts == 3
            (result,) = await engine.generate(ORIGINAL)
        assert result.ok and sim.stats.billed_images == 2
    (event,) = latest_results(tmp_path).values()
    assert event["status"] == "ok"
    assert (event["attempts"], event["ambiguous_retries"], event["rate_limited"]) == (0, 0, 0)
    assert event["latency_s"] == 0.0
    status = read_status(tmp_path).to_dict()
    assert status["retries"] == 2  # the failed request's, none for the put back
    assert status["spend"]["images"] == 2
