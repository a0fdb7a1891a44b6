"""After a SIGKILL, the next run knows what was sent and never answered, and can hold it back.

A real `cometbatch run` is killed while the simulated API (in this process, on a thread) holds
every request in flight; the simulator counts the requests whose answer never reached the
client, and the next runs must report exactly that number, hold them back with
--no-retry-ambiguous, and send them (counted as possibly billed twice) by default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from test_crash import CONCURRENCY, ROOT, CliRun, settle, simulator_on_thread, wait_for

from cometbatch import SimConfig
from cometbatch.ledger.events import LEDGER_NAME, iter_events

JOBS = 60
IMAGES_PER_JOB = 2


def _manifest(tmp_path: Path) -> Path:
    manifest = tmp_path / "crash.jsonl"
    jobs = (
        {"id": f"g{i}", "prompt": f"dune {i}", "model": "gpt-image-1", "n": IMAGES_PER_JOB}
        for i in range(JOBS)
    )
    manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return manifest


def _events(out: Path) -> list[dict[str, Any]]:
    if not (out / LEDGER_NAME).exists():
        return []
    return [event for _, event in iter_events(out / LEDGER_NAME)]


def _unanswered_keys(out: Path) -> dict[str, int]:
    """Keys whose latest line is a `sent` (no result after it), with the images asked for."""
    sent: dict[str, int] = {}
    for event in _events(out):
        if event["event"] == "sent":
            sent[event["key"]] = event["n"]
        elif event["event"] == "result":
            sent.pop(event["key"], None)
    return sent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMETAPI_")}
    env["COMETAPI_KEY"] = "sk-crash-test"
    return subprocess.run(
        [sys.executable, "-m", "cometbatch", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


def _prompts_sent(log: list[dict[str, Any]]) -> list[str]:
    return [str((entry["body"] or {}).get("prompt")) for entry in log]


def test_the_run_after_a_sigkill_reports_holds_back_and_resends_what_was_never_answered(
    tmp_path: Path,
) -> None:
    """SIGKILL with every slot held by the server: the next run reports exactly the requests
    the simulator received and never answered, --no-retry-ambiguous sends none of them (and
    status lists them), and a run after that sends them again as possibly billed twice."""
    manifest, out = _manifest(tmp_path), tmp_path / "out"
    # Held requests are answered after 2 s, long after the kill: to a client that is gone.
    config = SimConfig(latency=0.02, slow_seconds=2, record_requests=True)
    with simulator_on_thread(config) as sim:
        run = CliRun(manifest, out, sim.base_url, tmp_path, "killed")
        try:
            assert wait_for(run, lambda: sum(e["event"] == "result" for e in _events(out)), 5)
            sim.enqueue(*["slow"] * CONCURRENCY)
            assert wait_for(run, lambda: sim.in_flight, CONCURRENCY), run.describe()
            run.proc.send_signal(signal.SIGKILL)
            run.proc.wait(timeout=30)
        finally:
            run.close()
        settle(sim)
        never_answered = sim.stats.unanswered
        lost = _unanswered_keys(out)
        assert never_answered == CONCURRENCY
        assert len(lost) == never_answered
        lost_images = sum(lost.values())
        assert lost_images == never_answered * IMAGES_PER_JOB

        before = len(sim.stats.requests_log)
        held = _cli(
            "run", str(manifest), "--out", str(out), "--base-url", sim.base_url,
            "--concurrency", str(CONCURRENCY), "--json", "--no-retry-ambiguous",
        )  # fmt: skip
        second = _prompts_sent(sim.stats.requests_log[before:])
        summary = json.loads(held.stdout)
        assert (
            f"the last run stopped with {never_answered} requests ({lost_images} images) sent "
            "and not answered; they may have been billed"
        ) in held.stderr
        assert summary["earlier_unanswered"] == {
            "requests": never_answered,
            "images": lost_images,
        }
        assert summary["held_unanswered"] == never_answered
        assert summary["possibly_billed_twice"] == 0
        assert held.returncode == 1, held.stderr
        lost_prompts = {f"dune {key.split('#')[0][1:]}" for key in lost}
        assert not lost_prompts & set(second)
        assert len(second) == JOBS - summary["skipped_requests"] - never_answered

        status = _cli("status", str(out), "--json")
        assert status.returncode == 0, status.stderr
        folder = json.loads(status.stdout)
        assert folder["unanswered_requests"] == never_answered
        assert folder["unanswered_images"] == lost_images
        assert sorted(folder["unanswered_keys"]) == sorted(lost)

        before = len(sim.stats.requests_log)
        resent = _cli(
            "run", str(manifest), "--out", str(out), "--base-url", sim.base_url, "--json",
        )  # fmt: skip
        third = _prompts_sent(sim.stats.requests_log[before:])
        summary = json.loads(resent.stdout)
        assert resent.returncode == 0, resent.stderr
        assert summary["earlier_unanswered"] == {
            "requests": never_answered,
            "images": lost_images,
        }
        assert summary["resent_unanswered"] == {"requests": never_answered, "images": lost_images}
        assert summary["possibly_billed_twice"] == never_answered
        assert sorted(third) == sorted(lost_prompts)

    after = json.loads(_cli("status", str(out), "--json").stdout)
    assert after["unanswered_requests"] == after["unanswered_images"] == 0
    crashes = after["crashes"]
    assert [(c["requests"], c["images"]) for c in crashes] == [(never_answered, lost_images)]
    assert crashes[0]["sent_again"] == never_answered
