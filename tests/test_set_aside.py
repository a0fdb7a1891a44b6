"""A kill at any step of regenerating a changed job leaves a ledger that tells the truth, and a
rerun of either manifest does the right thing without paying for what is on disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support import no_sleep, run_all, settings_for

from cometbatch import Engine, Job, SimConfig, Simulator
from cometbatch.events import LEDGER_NAME, iter_events

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL = Job(id="c", prompt="one", model="gpt-image-1", n=2)
CHANGED = ORIGINAL.model_copy(update={"prompt": "two"})

# A child regenerates the changed job and SIGKILLs itself at one step: right before the old
# images move aside (after any line written before the move), right after they moved, or
# after the request was answered and its images written but before its result line.
CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    import cometbatch.sender as sender
    from cometbatch import Engine, Job, Settings, SimConfig, Simulator
    from cometbatch.dispatch import Dispatcher

    out, point = sys.argv[1], sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    move = sender.set_aside

    def before_move(*args, **kwargs):
        die()

    def after_move(*args, **kwargs):
        moved = move(*args, **kwargs)
        die()
        return moved

    send = Dispatcher.send

    async def after_request(self, request):
        await send(self, request)
        die()

    if point == "before-move":
        sender.set_aside = before_move
    elif point == "after-move":
        sender.set_aside = after_move
    else:
        Dispatcher.send = after_request

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
