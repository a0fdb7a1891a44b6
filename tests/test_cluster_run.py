"""`run --ray` on a real local Ray instance against the simulated API: shards, rerun, a kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterout import (
    kill_a_running_worker,
    ok_lines,
    shard_images,
    shard_runs,
    simulator_thread,
)
from rayserver import DRIVER_ENV, ray_problem, running_ray_cluster
from support import need

from cometbatch import SimConfig

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-cluster-test"
JOBS = 200


def cli_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """A driver's environment: on loopback, holding the key (and `env` on top)."""
    return {**os.environ, **DRIVER_ENV, "COMETAPI_KEY": KEY, **(env or {})}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cometbatch", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_environment(env),
        cwd=ROOT,
    )


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`cometbatch ARGS` started in the background, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "cometbatch", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=cli_environment(env),
    )  # fmt: skip


def write_manifest(path: Path, count: int = JOBS) -> Path:
    jobs = (
        {"id": f"job-{i}", "prompt": f"a cat {i}", "model": "dall-e-2", "size": "256x256"}
        for i in range(count)
    )
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A one-node Ray cluster on 127.0.0.1 for this module (3 CPUs), its workers holding the
    key; the address a `run --ray` subprocess joins (with DRIVER_ENV, as on loopback)."""
    need("RAY", ray_problem())
    with pytest.MonkeyPatch.context() as patch:
        # Ray's workers inherit the environment the node starts with.
        patch.setenv("COMETAPI_KEY", KEY)
        with running_ray_cluster(nodes=1, num_cpus=3) as cluster:
            yield cluster.address


def test_a_cluster_run_makes_every_image_once_and_a_rerun_sends_nothing(
    tmp_path: Path, ray_address: str
) -> None:
    """200 jobs over 3 workers: all done once, `--json` has the cluster; again: 0 requests."""
    manifest = write_manifest(tmp_path / "m.jsonl")
    out = tmp_path / "out"
    with simulator_thread(SimConfig(latency=0.05, record_requests=False)) as sim:
        args = (
            "run", str(manifest), "--out", str(out), "--base-url", sim.base_url, "--ray",
            "--ray-address", ray_address, "--workers", "3", "--concurrency", "4", "--json",
        )  # fmt: skip
        first = run_cli(*args)
        assert first.returncode == 0, first.stderr
        summary = json.loads(first.stdout)
        assert summary["cluster"] == {
            "workers": 3, "shards": 12, "shards_done": 12, "worker_restarts": 0
        }  # fmt: skip
        assert summary["complete"] and summary["ok_requests"] == JOBS
        assert sim.stats.requests == JOBS
        assert shard_images(out) == {f"job-{i}": 1 for i in range(JOBS)}
        assert set(ok_lines(out).values()) == {1}

        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        rerun = json.loads(again.stdout)
        assert (rerun["ok_requests"], rerun["skipped_requests"]) == (0, JOBS)
        assert rerun["cluster"]["shards_done"] == 12
        assert sim.stats.requests == JOBS
    runs = (out / "cluster" / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 2
    # Finished shards are skipped whole: no shard's ledger saw a second run.
    assert [len(shard_runs(ledger)) for ledger in sorted(out.glob("shards/*/ledger.jsonl"))] == [
        1
    ] * 12


def test_a_killed_worker_is_retried_and_its_shard_resumes(tmp_path: Path, ray_address: str) -> None:
    """A worker process killed mid-shard: Ray runs the shard again, it resumes from its ledger,
    every image is there once and at most what was in flight is sent twice."""
    manifest = write_manifest(tmp_path / "m.jsonl")
    out = tmp_path / "out"
    concurrency = 2
    with simulator_thread(SimConfig(latency=0.5, record_requests=False)) as sim:
        process = start_cli(
            "run", str(manifest), "--out", str(out), "--base-url", sim.base_url, "--ray",
            "--workers", "3", "--concurrency", str(concurrency), "--json",
            # RAY_ADDRESS names the cluster as --ray-address does.
            env={"RAY_ADDRESS": ray_address},
        )  # fmt: skip
        try:
            killed = kill_a_running_worker(out / "cluster" / "progress", deadline=120)
            stdout, stderr = process.communicate(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 0, stderr
        summary = json.loads(stdout)
        assert summary["cluster"]["worker_restarts"] >= 1
        assert summary["cluster"]["shards_done"] == 12
        assert shard_images(out) == {f"job-{i}": 1 for i in range(JOBS)}
        assert set(ok_lines(out).values()) == {1}
        assert JOBS <= sim.stats.requests <= JOBS + concurrency
    # The shard ran twice in the same folder: the second run resumed the first's ledger.
    assert len(shard_runs(out / "shards" / killed / "ledger.jsonl")) == 2


def test_an_error_in_a_shard_stops_the_run_with_one_clear_line(
    tmp_path: Path, ray_address: str
) -> None:
    """A key the API refuses: the shard's error is the run's (exit 2, no traceback), and no
    shard starts after it."""
    manifest = write_manifest(tmp_path / "m.jsonl", 40)
    out = tmp_path / "out"
    with simulator_thread(SimConfig(api_key="sk-another", record_requests=False)) as sim:
        done = run_cli(
            "run", str(manifest), "--out", str(out), "--base-url", sim.base_url, "--ray",
            "--ray-address", ray_address, "--workers", "1", "--json",
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "shard 00000" in done.stderr and "key" in done.stderr
    assert json.loads(done.stdout)["error"].startswith("shard 00000")
    assert len(list(out.glob("shards/*/ledger.jsonl"))) == 1


def test_ctrl_c_on_the_driver_lets_sent_requests_land(tmp_path: Path, ray_address: str) -> None:
    """SIGINT on the driver: the workers take no new work, every sent request is recorded,
    exit 130; the next run resumes."""
    manifest = write_manifest(tmp_path / "m.jsonl", 60)
    out = tmp_path / "out"
    with simulator_thread(SimConfig(latency=1.0, record_requests=False)) as sim:
        args = (
            "run", str(manifest), "--out", str(out), "--base-url", sim.base_url, "--ray",
            "--ray-address", ray_address, "--workers", "2", "--concurrency", "2", "--json",
        )  # fmt: skip
        process = start_cli(*args)
        try:
            wait_for_images(out / "cluster" / "progress", 2, deadline=120)
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 130, stderr
        summary = json.loads(stdout)
        assert summary["interrupted"] and summary["pending_requests"] > 0
        assert summary["cut_off_requests"] == 0
        sent = answered = 0
        for ledger in out.glob("shards/*/ledger.jsonl"):
            events = [json.loads(line) for line in ledger.read_text().splitlines()]
            sent += len({e["key"] for e in events if e["event"] == "sent"})
            answered += len({e["key"] for e in events if e["event"] == "result"})
        assert 0 < sent == answered == sim.stats.requests
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["skipped_requests"] == answered
        assert sim.stats.requests == 60


def test_a_killed_driver_costs_at_most_what_was_in_flight_and_a_rerun_resumes(
    tmp_path: Path, ray_address: str
) -> None:
    """SIGKILL on the driver mid-run: its workers end with its job; the next run completes
    every image once, and the requests sent twice are at most those that were in flight."""
    manifest = write_manifest(tmp_path / "m.jsonl", 60)
    out = tmp_path / "out"
    concurrency = 2
    with simulator_thread(SimConfig(latency=0.5, record_requests=False)) as sim:
        args = (
            "run", str(manifest), "--out", str(out), "--base-url", sim.base_url, "--ray",
            "--ray-address", ray_address, "--workers", "2", "--concurrency", str(concurrency),
            "--json",
        )  # fmt: skip
        process = start_cli(*args)
        try:
            wait_for_images(out / "cluster" / "progress", 3, deadline=120)
            process.kill()
            process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        assert shard_images(out) == {f"job-{i}": 1 for i in range(60)}
        assert set(ok_lines(out).values()) == {1}
        assert 60 <= sim.stats.requests <= 60 + concurrency


def wait_for_images(progress: Path, images: int, *, deadline: float) -> None:
    """Until some shard's report counts `images` done."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for path in progress.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text())["done_images"] >= images:
                    return
        time.sleep(0.1)
    raise AssertionError("no shard made images in time")


LISTENERS = """
import json, psutil
if {first}:
    import ray  # imported before cometbatch could set Ray's switch in the environment
from cometbatch import Settings
from cometbatch.cluster.connect import connect, import_ray
ray_module = import_ray()
connect(ray_module, None, 1, Settings(api_key="sk-listen"))
found = []
for process in psutil.Process().children(recursive=True):
    try:
        found += [c.laddr.ip for c in process.net_connections("inet") if c.status == "LISTEN"]
    except psutil.Error:
        pass
ray_module.shutdown()
print(json.dumps(found))
"""


@pytest.mark.parametrize("ray_first", [False, True], ids=["fresh", "ray-imported-first"])
def test_a_local_instance_the_run_starts_listens_on_loopback_only(ray_first: bool) -> None:
    """With no address, the Ray instance a run starts binds every port to 127.0.0.1."""
    need("RAY", ray_problem())
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        [sys.executable, "-c", LISTENERS.format(first=ray_first)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    addresses = json.loads(done.stdout.splitlines()[-1])
    assert addresses, "no listening socket found: the probe looked at the wrong processes"
    assert set(addresses) <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses
