"""Cluster refusals that need no running cluster: one OUT is either one machine's or a cluster's,
a --ray-address that cannot work, a worker's failure and a node's missing key in one line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_cluster_cli import manifest, run_cli

from cometbatch import ConfigError, Engine, Settings
from cometbatch.cluster import driver, run_on_ray
from cometbatch.cluster.connect import connect
from cometbatch.cluster.worker import ShardTask, run_shard

ROOT = Path(__file__).resolve().parent.parent
PLAN = {"version": 1, "shards": 2, "manifest": "m.jsonl", "shard_of": "sha256(job_id) % shards"}


def cluster_output(out: Path) -> Path:
    (out / "cluster").mkdir(parents=True)
    (out / "cluster" / "plan.json").write_text(json.dumps(PLAN))
    return out


def test_a_ray_run_refuses_an_output_a_one_machine_run_wrote(tmp_path: Path) -> None:
    """After `run --simulate` into OUT, --ray (dry run or not) refuses OUT: it would pay again."""
    path, out = manifest(tmp_path, 5), tmp_path / "out"
    made = run_cli("run", str(path), "--out", str(out), "--simulate", "--json")
    assert made.returncode == 0, made.stderr
    planned = run_cli("run", str(path), "--out", str(out), "--ray", "--dry-run", "--json")
    assert planned.returncode == 2, planned.stdout
    lines = [line for line in planned.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "one-machine run" in lines[0] and "--out" in lines[0], lines
    assert not (out / "cluster").exists()


def test_run_on_ray_refuses_an_output_with_a_ledger(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.jsonl").write_text("")
    with pytest.raises(ConfigError, match="one-machine run"):
        asyncio.run(run_on_ray(manifest(tmp_path, 5), out, Settings(api_key="sk-test"), workers=1))
    assert not (out / "cluster").exists()


async def test_an_engine_refuses_a_cluster_output(tmp_path: Path) -> None:
    """An Engine on OUT with a cluster plan would re-send what the shards made."""
    out = cluster_output(tmp_path / "out")
    with pytest.raises(ConfigError, match="cluster run's output"):
        async with Engine(Settings(api_key="sk-test"), out_dir=out):
            pass
    assert not (out / "ledger.jsonl").exists()


def test_a_plain_run_and_dry_run_refuse_a_cluster_output(tmp_path: Path) -> None:
    out = cluster_output(tmp_path / "out")
    for extra in (["--dry-run", "--json"], ["--simulate"]):
        done = run_cli("run", str(manifest(tmp_path, 5)), "--out", str(out), *extra)
        assert done.returncode == 2, (extra, done.stdout)
        assert "cluster run's output" in done.stderr and "--ray" in done.stderr
        assert "Traceback" not in done.stderr
    assert not (out / "ledger.jsonl").exists()


class _NoInit:
    @staticmethod
    def is_initialized() -> bool:
        return False

    @staticmethod
    def init(**_: Any) -> None:
        raise AssertionError("ray.init reached")


@pytest.mark.parametrize("address", ["not an address", "host:port", ":6379", "h:0", "h:70000"])
def test_a_malformed_ray_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(address)):
        connect(_NoInit(), address, None, Settings(api_key="sk-test"))  # type: ignore[arg-type]


def test_an_unreachable_ray_address_fails_at_once(tmp_path: Path) -> None:
    """Nothing listens: a ConfigError naming the address, before any plan is written."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"127.0.0.1:{port}"
    out = tmp_path / "out"
    began = time.monotonic()
    with pytest.raises(ConfigError, match=re.escape(address)):
        asyncio.run(
            run_on_ray(
                manifest(tmp_path, 5), out, Settings(api_key="sk-test"), address=address,
                workers=2,
            )
        )  # fmt: skip
    assert time.monotonic() - began < 30
    assert not (out / "cluster" / "plan.json").exists()
    assert not (out / "cluster" / "shards").exists()


def test_a_bad_ray_address_on_the_command_line_exits_2(tmp_path: Path) -> None:
    done = run_cli(
        "run", str(manifest(tmp_path)), "--out", str(tmp_path / "o"), "--ray",
        "--ray-address", "not an address", "--workers", "2",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "internal error" not in done.stderr and "not an address" in done.stderr
    assert not (tmp_path / "o" / "cluster").exists()


def test_a_worker_failure_is_its_cause_in_one_clean_line() -> None:
    from ray.exceptions import RayTaskError, WorkerCrashedError

    cause = OSError(28, "No space left on device")
    exc = RayTaskError(  # type: ignore[no-untyped-call]
        "run_shard", "Traceback (most recent call last):\n  ...", cause,
        proctitle="\x1b[36mray::run_shard()\x1b[39m", pid=1234, ip="10.0.0.2",
    )  # fmt: skip
    line = driver.failure_line(exc)
    assert line == "OSError: [Errno 28] No space left on device", line
    not_found = ModuleNotFoundError("No module named 'cometbatch'")
    missing = RayTaskError("run_shard", "tb", not_found)  # type: ignore[no-untyped-call]
    assert driver.failure_line(missing) == "ModuleNotFoundError: No module named 'cometbatch'"
    crashed = driver.failure_line(WorkerCrashedError())
    assert "\x1b" not in crashed and "\n" not in crashed and crashed


def test_a_node_without_the_key_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMETAPI_KEY", raising=False)
    task = ShardTask(
        out=str(tmp_path / "out"), local=True, shard="00000", run_id="r1",
        settings=Settings().public(),
    )  # fmt: skip
    error = run_shard(task.to_dict())["error"]
    assert error["kind"] == "config"
    assert socket.gethostname() in error["message"] and "COMETAPI_KEY" in error["message"]
    assert "Settings(api_key" not in error["message"]


def test_importing_ray_leaves_the_environment_alone() -> None:
    """A later run on a remote cluster in the same process must not be loopback-only."""
    code = (
        "import os; from cometbatch.cluster.connect import import_ray; import_ray(); "
        "print(os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
