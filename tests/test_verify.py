"""What the ledger says stays true: a run restores images gone from under an ok line, and
`cometbatch verify` finds missing or damaged ones and marks them for the next run."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from support import cli, ledger_results, no_sleep, run_all, settings_for

from cometbatch import Engine, Job, Result, SimConfig, Simulator, Summary
from cometbatch.cli.report import summary_lines
from cometbatch.costs.paid import Payments
from cometbatch.engine.resume import LINK_LIFETIME_S, decide
from cometbatch.ledger.keystate import KeyState
from cometbatch.ledger.verify import ImagePresence, verify_folder
from cometbatch.store.lock import FolderLock

JOBS = [
    Job(id="a", prompt="a red fox", model="gpt-image-1", n=2),
    Job(id="b", prompt="a paper boat", model="gpt-image-1", output_format="jpeg"),
    Job(id="c", prompt="a koi pond", model="dall-e-2", size="256x256", response_format="url"),
]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=5)) as server:
        yield server


async def first_run(sim: Simulator, out: Path) -> None:
    async with Engine(settings_for(sim), out_dir=out, sleep=no_sleep) as engine:
        results = await run_all(engine, JOBS)
    assert all(result.ok for result in results)


async def rerun_one(sim: Simulator, out: Path) -> tuple[Result, Summary]:
    """Run JOBS again over OUT, where exactly one request is left to do: its result and the
    run's summary."""
    async with Engine(settings_for(sim), out_dir=out, sleep=no_sleep) as engine:
        (result,) = await run_all(engine, JOBS)
    return result, engine.summary


def rewrite_ledger(out: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Rewrite every line of OUT's ledger through `change` (a hand edit)."""
    ledger = out / "ledger.jsonl"
    events = [json.loads(line) for line in ledger.read_text().splitlines()]
    for event in events:
        change(event)
    ledger.write_text("".join(json.dumps(event) + "\n" for event in events))


def image_of(out: Path, key: str, index: int) -> Path:
    (event,) = [e for e in ledger_results(out) if e["key"] == key and e["status"] == "ok"][-1:]
    (image,) = [image for image in event["images"] if image["index"] == index]
    return out / str(image["path"])


# -- a run notices what is gone --------------------------------------------------------------


async def test_a_deleted_image_is_generated_again_and_counted(
    sim: Simulator, tmp_path: Path
) -> None:
    """An ok line whose file was deleted is not "already done": the run generates it again."""
    await first_run(sim, tmp_path)
    gone = image_of(tmp_path, "a#0", 1)
    gone.unlink()
    result, summary = await rerun_one(sim, tmp_path)
    assert result.ok and result.key == "a#0"
    assert gone.is_file()
    assert sim.stats.requests == len(JOBS) + 1
    data = summary.to_dict()
    assert data["regenerated_missing"] == 1
    assert data["skipped_requests"] == 2 and data["complete"]
    assert any("1 request(s) generated again" in line for line in summary_lines(summary, tmp_path))
    # The image that was still there was set aside, not silently overwritten.
    assert len(list((tmp_path / "replaced").rglob("0.png"))) == 1


# -- images that came as links are downloaded again while the links work --------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def payments_of(out: Path, key: str) -> int:
    """How many generations of `key` the ledger counts as paid (paid.Payments)."""
    payments = Payments()
    for event in ledger_results(out):
        payments.add(event)
    return sum(1 for payment in payments if payment.key == key)


async def test_a_deleted_url_image_is_downloaded_again_not_generated(
    sim: Simulator, tmp_path: Path
) -> None:
    """An image that came as a link records it; gone from disk, it is downloaded again while
    the link works: no generation request, the same bytes, counted as restored, not paid."""
    await first_run(sim, tmp_path)
    (line,) = [e for e in ledger_results(tmp_path) if e["key"] == "c#0"]
    (image,) = line["images"]
    assert image["url"].startswith(sim.origin + "/")
    # Images that came inline record no link: their lines are as before.
    inline = [e for e in ledger_results(tmp_path) if e["key"] != "c#0"]
    assert len(inline) == 2 and all("url" not in i for e in inline for i in e["images"])
    gone = image_of(tmp_path, "c#0", 0)
    digest = sha256_of(gone)
    gone.unlink()
    downloads = sim.stats.downloads
    result, summary = await rerun_one(sim, tmp_path)
    assert result.ok and result.key == "c#0"
    assert sim.stats.requests == len(JOBS)
    assert sim.stats.downloads == downloads + 1
    assert sha256_of(gone) == digest
    assert (summary.restored_images, summary.regenerated_missing) == (1, 0)
    assert summary.complete and summary.spent_usd == 0
    again = ledger_results(tmp_path)[-1]
    assert (again["key"], again["status"], again["attempts"]) == ("c#0", "ok", 0)
    assert (again["images"], again["usage"], again["cost"]) == (
        line["images"], line["usage"], line["cost"],
    )  # fmt: skip
    assert payments_of(tmp_path, "c#0") == 1
    code, _, _ = await cli("verify", str(tmp_path))
    assert code == 0


async def test_a_url_image_verify_marked_is_downloaded_again(
    sim: Simulator, tmp_path: Path
) -> None:
    """A damaged file that `verify` marked is downloaded again, not generated again."""
    await first_run(sim, tmp_path)
    damaged = image_of(tmp_path, "c#0", 0)
    digest = sha256_of(damaged)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    code, _, stderr = await cli("verify", str(tmp_path))
    assert code == 1, stderr
    result, summary = await rerun_one(sim, tmp_path)
    assert result.ok and result.key == "c#0"
    assert sim.stats.requests == len(JOBS)
    assert sha256_of(damaged) == digest
    assert (summary.restored_images, summary.regenerated_missing) == (1, 0)
    assert ledger_results(tmp_path)[-1]["attempts"] == 0
    assert payments_of(tmp_path, "c#0") == 1
    code, _, _ = await cli("verify", str(tmp_path))
    assert code == 0


async def test_a_link_no_longer_served_is_generated_again(sim: Simulator, tmp_path: Path) -> None:
    """The image host answers 404 for the link: the request is generated again, as before."""
    await first_run(sim, tmp_path)
    gone = image_of(tmp_path, "c#0", 0)
    gone.unlink()
    sim.enqueue("download-404")
    result, summary = await rerun_one(sim, tmp_path)
    assert result.ok and result.key == "c#0" and gone.is_file()
    assert sim.stats.requests == len(JOBS) + 1
    assert (summary.restored_images, summary.regenerated_missing) == (0, 1)
    code, _, _ = await cli("verify", str(tmp_path))
    assert code == 0


async def test_an_old_link_is_not_tried(sim: Simulator, tmp_path: Path) -> None:
    """A line older than the links live is generated again without a download."""
    await first_run(sim, tmp_path)
    gone = image_of(tmp_path, "c#0", 0)
    gone.unlink()
    # The ledger as a run of a few days ago wrote it: its links are past their lifetime.

    def days_ago(event: dict[str, Any]) -> None:
        if "finished_at" in event:
            event["finished_at"] = "2020-01-01T00:00:00.000Z"

    rewrite_ledger(tmp_path, days_ago)
    downloads = sim.stats.downloads
    result, summary = await rerun_one(sim, tmp_path)
    assert result.ok and result.key == "c#0" and gone.is_file()
    assert sim.stats.requests == len(JOBS) + 1
    assert sim.stats.downloads == downloads + 1  # the new image's own link only
    assert summary.regenerated_missing == 1


async def test_a_link_the_key_was_blanked_out_of_is_not_tried(
    sim: Simulator, tmp_path: Path
) -> None:
    """A recorded link holding the blanked key (`***`) cannot work: a lost image behind it is
    generated again without a download."""
    await first_run(sim, tmp_path)
    gone = image_of(tmp_path, "c#0", 0)
    gone.unlink()

    def blank_key(event: dict[str, Any]) -> None:
        for image in event.get("images") or []:
            if "url" in image:
                image["url"] += "?key=***"

    rewrite_ledger(tmp_path, blank_key)
    downloads = sim.stats.downloads
    result, _summary = await rerun_one(sim, tmp_path)
    assert result.ok and result.key == "c#0" and gone.is_file()
    assert sim.stats.requests == len(JOBS) + 1
    assert sim.stats.downloads == downloads + 1  # the new image's own link only


def test_decide_downloads_again_only_fresh_links() -> None:
    """decide: an ok key with files gone (or a line that withdrew them) whose links were
    recorded within LINK_LIFETIME_S is downloaded again; older or no links: generated."""
    ok = KeyState("k#0", "ok", "f" * 16, None, "k", 1)
    at = "2024-05-01T12:00:00.000Z"
    then = datetime.fromisoformat(at).timestamp()
    fresh = then + LINK_LIFETIME_S - 1
    old = then + LINK_LIFETIME_S + 1
    assert decide("f" * 16, ok, retry_failed=False, now=fresh, missing=True, links_at=at) == (
        "redownload"
    )
    assert decide("f" * 16, ok, retry_failed=False, now=old, missing=True, links_at=at) == (
        "restore"
    )
    assert decide("f" * 16, ok, retry_failed=False, now=fresh, missing=True) == "restore"
    assert decide("f" * 16, ok, retry_failed=False, now=fresh, links_at=at) == "reuse"
    marked = KeyState("k#0", "failed", "f" * 16, True, "k", 1, withdraws=True)
    kwargs = {"retry_failed": False, "withdrawn": "f" * 16, "links_at": at}
    assert decide("f" * 16, marked, now=fresh, **kwargs) == "redownload"  # type: ignore[arg-type]
    assert decide("f" * 16, marked, now=old, **kwargs) == "restore"  # type: ignore[arg-type]


async def test_an_untouched_folder_sends_nothing(sim: Simulator, tmp_path: Path) -> None:
    """Every file in place (png, jpeg, url-mode): nothing is sent, nothing is restored."""
    await first_run(sim, tmp_path)
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        assert await run_all(engine, JOBS) == []
    assert engine.summary.regenerated_missing == 0
    assert sim.stats.requests == len(JOBS)


async def test_a_run_looks_for_files_off_the_event_loop(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check that an ok key's files are there (a system call each, which may block on a
    network filesystem) runs in a thread, never on the event loop."""
    await first_run(sim, tmp_path)
    threads: list[int] = []
    look = ImagePresence.missing

    def missing(self: ImagePresence, *args: Any, **kwargs: Any) -> bool:
        threads.append(threading.get_ident())
        return look(self, *args, **kwargs)

    monkeypatch.setattr(ImagePresence, "missing", missing)
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        assert await run_all(engine, JOBS) == []
        # generate() of a job already done looks the same way.
        assert all(result.reused for result in await engine.generate(JOBS[0]))
    assert len(threads) == len(JOBS) + 1
    assert threading.get_ident() not in threads


async def test_a_run_reads_no_line_of_a_failure_that_withdrew_nothing(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retryable failure is sent again without its ledger line being read: only a line
    that withdrew images (flagged when the ledger is loaded) is read for them."""
    await first_run(sim, tmp_path)
    (ok,) = [event for event in ledger_results(tmp_path) if event["key"] == "b#0"]
    error = {"kind": "server_error", "status": 500, "code": None, "message": "down",
             "request_id": None, "retryable": True}  # fmt: skip
    failed = {**ok, "status": "failed", "images": [], "error": error}
    with (tmp_path / "ledger.jsonl").open("a") as ledger:
        ledger.write(json.dumps(failed, separators=(",", ":")) + "\n")
    read: list[str] = []
    line_event = KeyState.line_event

    def reading(self: KeyState) -> dict[str, Any] | None:
        read.append(self.key)
        return line_event(self)

    monkeypatch.setattr(KeyState, "line_event", reading)
    result, _summary = await rerun_one(sim, tmp_path)
    assert result.ok and result.key == "b#0"
    assert read == []


# -- cometbatch verify -----------------------------------------------------------------------


async def test_verify_passes_a_whole_folder(sim: Simulator, tmp_path: Path) -> None:
    """Every image there, whole, with its recorded size and digest: exit 0, nothing appended."""
    await first_run(sim, tmp_path)
    before = (tmp_path / "ledger.jsonl").read_bytes()
    code, stdout, stderr = await cli("verify", str(tmp_path))
    assert code == 0, stderr
    assert "4 image(s)" in stdout and "all good" in stdout
    assert (tmp_path / "ledger.jsonl").read_bytes() == before


async def test_verify_names_bad_files_and_the_next_run_restores_them(
    sim: Simulator, tmp_path: Path
) -> None:
    """Missing, cut short, or the same size with other bytes: each named, exit 1, marked;
    the next run restores exactly those requests and verify passes afterwards."""
    await first_run(sim, tmp_path)
    missing = image_of(tmp_path, "a#0", 0)
    missing.unlink()
    cut = image_of(tmp_path, "b#0", 0)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    flipped = image_of(tmp_path, "c#0", 0)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    code, stdout, stderr = await cli("verify", str(tmp_path), "--json")
    assert code == 1, stderr
    report = json.loads(stdout)
    assert report["checked_images"] == 4 and report["bad_images"] == 3
    assert {(bad["key"], bad["problem"]) for bad in report["bad"]} == {
        ("a#0", "missing"),
        ("b#0", "size"),
        ("c#0", "sha256"),
    }
    marks = [e for e in ledger_results(tmp_path) if e["status"] == "failed"]
    assert {(e["key"], e["error"]["kind"], e["error"]["retryable"]) for e in marks} == {
        ("a#0", "missing_image", True),
        ("b#0", "corrupt_image", True),
        ("c#0", "corrupt_image", True),
    }
    code, stdout, _ = await cli("verify", str(tmp_path))
    assert code == 1 and str(missing.relative_to(tmp_path)) in stdout
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        restored = await run_all(engine, JOBS)
    assert sorted(result.key for result in restored) == ["a#0", "b#0", "c#0"]
    # The url-mode image is downloaded again from its link; the others are generated again.
    assert sim.stats.requests == 2 * len(JOBS) - 1
    assert engine.summary.regenerated_missing == 2
    assert engine.summary.restored_images == 1
    code, stdout, stderr = await cli("verify", str(tmp_path))
    assert code == 0, stdout + stderr


async def test_verify_finds_an_image_that_does_not_decode(sim: Simulator, tmp_path: Path) -> None:
    """An image whose size and digest were recorded from damaged bytes still fails verify."""
    await first_run(sim, tmp_path)
    report = await verify_folder(tmp_path)
    assert report.bad == []
    path = image_of(tmp_path, "a#0", 0)
    data = path.read_bytes()[:100]
    path.write_bytes(data)
    # The ledger is edited to match the damaged file, as a bug of an older version would have.
    ledger = tmp_path / "ledger.jsonl"
    lines = []
    for line in ledger.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "result" and event.get("key") == "a#0":
            for image in event["images"]:
                if image["index"] == 0:
                    image["bytes"] = len(data)
                    image["sha256"] = __import__("hashlib").sha256(data).hexdigest()
        lines.append(json.dumps(event))
    ledger.write_text("\n".join(lines) + "\n")
    report = await verify_folder(tmp_path)
    assert [(bad.key, bad.problem) for bad in report.bad] == [("a#0", "undecodable")]


async def test_verify_usage_errors_exit_2(sim: Simulator, tmp_path: Path) -> None:
    """No ledger, or a run holding the folder: a clear message and exit 2, nothing changed."""
    code, _, stderr = await cli("verify", str(tmp_path))
    assert code == 2 and "ledger" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "ledger.jsonl").exists()
    await first_run(sim, tmp_path)
    with FolderLock(tmp_path):
        code, _, stderr = await cli("verify", str(tmp_path))
    assert code == 2 and "in use" in stderr and "Traceback" not in stderr
    assert str(os.getpid()) in stderr
