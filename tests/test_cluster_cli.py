"""`run --ray` refusals and its dry run: no cluster needed for any of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cometbatch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COMETAPI_KEY": "sk-test", **(env or {})},
        cwd=ROOT,
    )


def manifest(tmp_path: Path, count: int = 30) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"j{i}", "prompt": f"p {i}"}) + "\n" for i in range(count))
    )
    return path


def test_a_missing_ray_extra_is_a_clear_error(tmp_path: Path) -> None:
    """Without ray installed, --ray exits 2 naming the pip command, with no traceback."""
    fake = tmp_path / "shadow" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no ray here')\n")
    done = run_cli(
        "run", str(manifest(tmp_path)), "--out", str(tmp_path / "out"), "--ray",
        env={"PYTHONPATH": str(fake.parent)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "pip install 'cometbatch[ray]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_memory_store_is_refused_on_a_cluster(tmp_path: Path) -> None:
    """memory:// lives in one process: --ray refuses it before anything runs."""
    done = run_cli("run", str(manifest(tmp_path)), "--out", "memory://b/out", "--ray")
    assert done.returncode == 2
    assert "--ray cannot write to memory://" in done.stderr
    assert "Traceback" not in done.stderr


def test_cluster_flags_need_ray(tmp_path: Path) -> None:
    """--workers or --ray-address alone is a usage error."""
    done = run_cli("run", str(manifest(tmp_path)), "--out", str(tmp_path / "o"), "--workers", "2")
    assert done.returncode == 2
    assert "go with --ray" in done.stderr


def test_dry_run_on_a_cluster_plans_the_shards(tmp_path: Path) -> None:
    """--dry-run --ray says how many shards, done and to run; it writes nothing."""
    out = tmp_path / "out"
    done = run_cli(
        "run", str(manifest(tmp_path)), "--out", str(out), "--ray", "--workers", "2", "--dry-run",
        "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["cluster"] == {
        "shards": 8, "new_plan": True, "shards_done": 0, "shards_to_run": 8, "workers": 2
    }  # fmt: skip
    assert data["to_run"] == {"requests": 30, "images": 30}
    assert not out.exists()
    text = run_cli(
        "run", str(manifest(tmp_path)), "--out", str(out), "--ray", "--workers", "1", "--dry-run"
    )
    assert "4 shard(s) (a new plan)" in text.stdout
    assert "dry run: nothing was sent" in text.stdout


def test_the_cluster_display_shows_the_whole_cluster() -> None:
    """One line for every worker: images over the manifest, in flight, 429s, workers alive."""
    from cometbatch.cli.clusterrun import cluster_snapshot
    from cometbatch.cli.snapshot import Snapshot
    from cometbatch.cluster import ClusterProgress

    progress = ClusterProgress(
        images_done=120, images_failed=1, images_planned=200, images_processed=90,
        in_flight=7, limit=8, rate_limited=3, retries=4, workers=3, workers_alive=2,
        shards=12, shards_done=5, worker_restarts=1,
    )  # fmt: skip
    line = cluster_snapshot(progress).line(2.5)
    for part in ("images 120/200", "2.5/s", "in flight 7/8", "workers 2/3 alive", "429s 3"):
        assert part in line
    # A one-machine run's display has no workers.
    one = Snapshot(done=1, failed=0, total=2, in_flight=1, limit=4, retries=0, rate_limited=0,
                   probing=False)  # fmt: skip
    assert "workers" not in one.line(1.0)
