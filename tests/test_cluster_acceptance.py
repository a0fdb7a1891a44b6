"""The cluster run's promise at full size: 1,500 requests over a two-node Ray cluster under one
shared limit of 1,200 a minute, at a server that refuses a 1,201st; and the same with one
worker killed 20 s in. Each run takes over a minute and a quarter: marked long."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from clusterout import ok_lines, shard_images, simulator_thread
from rayserver import RayCluster

from cometbatch import SimConfig

pytestmark = pytest.mark.long

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-cluster-acceptance"
REQUESTS = 1_500
RPM = 1_200
CONCURRENCY = 8
WORKERS = 3


def write_manifest(path: Path) -> Path:
    jobs = (
        {
            "id": f"job-{i:04d}",
            "prompt": f"a lighthouse {i}",
            "model": "dall-e-2",
            "size": "256x256",
        }
        for i in range(REQUESTS)
    )
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def sent_times(out: Path) -> list[float]:
    """When each request left, from every shard's `sent` lines (seconds since the epoch)."""
    times = []
    for ledger in (out / "shards").glob("*/ledger.jsonl"):
        for line in ledger.read_text().splitlines():
            event = json.loads(line)
            if event["event"] == "sent":
                stamp = event["sent_at"].replace("Z", "+00:00")
                times.append(datetime.fromisoformat(stamp).timestamp())
    return sorted(times)


def busiest_minute(times: list[float]) -> int:
    """The most requests sent in any 60 s window."""
    best, start = 0, 0
    for end, at in enumerate(times):
        while times[start] <= at - 60.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def start_run(
    manifest: Path, out: Path, base_url: str, cluster: RayCluster
) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "cometbatch", "run", str(manifest), "--out", str(out),
        "--base-url", base_url, "--ray", "--ray-address", cluster.address,
        "--workers", str(WORKERS), "--rpm", str(RPM), "--concurrency", str(CONCURRENCY), "--json",
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, **cluster.env, "COMETAPI_KEY": KEY},
    )  # fmt: skip


@pytest.fixture
def key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key in this process's environment before the cluster starts: its nodes, and the
    workers they start, read it from their own environment (it never travels through Ray)."""
    monkeypatch.setenv("COMETAPI_KEY", KEY)


@pytest.fixture
def cluster(key_in_environment: None, ray_two_nodes: RayCluster) -> RayCluster:
    """The two-node cluster, its nodes holding the key."""
    return ray_two_nodes


def test_a_shared_limit_holds_for_the_whole_cluster(tmp_path: Path, cluster: RayCluster) -> None:
    """1,500 requests, three workers on two nodes: no 429 from the server's limit, at least
    0.9 of 1,200 in the busiest minute, every image once."""
    manifest = write_manifest(tmp_path / "m.jsonl")
    out = tmp_path / "out"
    with simulator_thread(SimConfig(rpm_limit=RPM, latency=0.05, record_requests=False)) as sim:
        process = start_run(manifest, out, sim.base_url, cluster)
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        assert sim.stats.limit_429s == 0
        assert sim.stats.requests == REQUESTS
    summary: dict[str, Any] = json.loads(stdout)
    reports = [
        json.loads(path.read_text()) for path in (out / "cluster" / "progress").glob("*.json")
    ]
    # Shards ran in at least two worker processes, on both nodes (one host: the Ray node ids).
    assert len({report["pid"] for report in reports}) >= 2, reports
    assert len({report["node_id"] for report in reports if report["node_id"]}) >= 2, reports
    busiest = busiest_minute(sent_times(out))
    print(f"busiest minute {busiest} of {RPM}; limit 429s 0; workers {summary['cluster']}")
    assert busiest >= 0.9 * RPM, busiest
    assert busiest <= RPM
    assert shard_images(out) == {f"job-{i:04d}": 1 for i in range(REQUESTS)}


def test_a_worker_killed_20_s_in_costs_at_most_what_it_had_in_flight(
    tmp_path: Path, cluster: RayCluster
) -> None:
    """The same run with one Ray worker process killed 20 s in: every image once, and the
    requests billed beyond the 1,500 at most the concurrency."""
    manifest = write_manifest(tmp_path / "m.jsonl")
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_one_at_20_s() -> None:
        time.sleep(20)
        for path in sorted((out / "cluster" / "progress").glob("*.json")):
            report = json.loads(path.read_text())
            if not report["finished"]:
                os.kill(report["pid"], signal.SIGKILL)
                killed.append(report["pid"])
                return

    with simulator_thread(SimConfig(rpm_limit=RPM, latency=0.05, record_requests=False)) as sim:
        process = start_run(manifest, out, sim.base_url, cluster)
        killer = threading.Thread(target=kill_one_at_20_s)
        killer.start()
        stdout, stderr = process.communicate(timeout=600)
        killer.join()
        assert process.returncode == 0, stderr
        assert killed, "no running worker was found to kill"
        assert sim.stats.limit_429s == 0
        billed = sim.stats.requests
    summary: dict[str, Any] = json.loads(stdout)
    print(f"killed pid {killed[0]}; billed {billed} for {REQUESTS}; cluster {summary['cluster']}")
    assert summary["cluster"]["worker_restarts"] >= 1
    assert shard_images(out) == {f"job-{i:04d}": 1 for i in range(REQUESTS)}
    assert set(ok_lines(out).values()) == {1}
    assert REQUESTS <= billed <= REQUESTS + CONCURRENCY, billed
