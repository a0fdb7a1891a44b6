"""status, verify, export and gallery read a cluster run's output (OUT/cluster/plan.json with
one ordinary output per shard under OUT/shards/<id>/) as one whole, on a folder or a store."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from clusterout import make_cluster_output
from s3server import S3Server

from cometbatch import SimConfig, Simulator
from cometbatch.cli.main import main
from cometbatch.ledger.clustered import read_cluster
from cometbatch.store.urls import open_store

JOBS = 12
SHARDS = 3


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=7)) as server:
        yield server


def manifest_of(path: Path, count: int = JOBS) -> Path:
    lines = (
        json.dumps({"id": f"j{i}", "prompt": f"picture {i}", "model": "gpt-image-1"})
        for i in range(count)
    )
    path.write_text("".join(line + "\n" for line in lines))
    return path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


async def ainvoke(*args: str) -> Any:
    """`invoke` from a test's event loop (the commands run their own)."""
    return await asyncio.to_thread(invoke, *args)


@pytest.fixture(params=["folder", "memory"])
def out(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """OUT as a local folder, or as a memory:// store."""
    if request.param == "folder":
        return str(tmp_path / "out")
    return str(request.getfixturevalue("url"))


async def test_status_sums_every_shard_and_counts_the_done_ones(
    sim: Simulator, tmp_path: Path, out: str
) -> None:
    """Every job is counted once across shards; a shard not run yet is pending, not done."""
    manifest = manifest_of(tmp_path / "m.jsonl")
    cut = await make_cluster_output(out, manifest, sim, shards=SHARDS, run=[0, 1])
    left = len(cut["00002"])
    assert 0 < left < JOBS
    data = json.loads((await ainvoke("status", out, "--json")).output)
    assert data["cluster"] == {"shards": SHARDS, "shards_done": 2}
    assert (data["ok_requests"], data["failed_requests"]) == (JOBS - left, 0)
    assert (data["pending_requests"], data["pending_images"]) == (left, left)
    assert data["keys"] == JOBS - left
    assert data["spend"]["images"] == JOBS - left
    assert data["state"] == "finished"
    assert data["manifest"] == str(manifest)
    text = (await ainvoke("status", out)).output
    assert f"cluster: 2 of {SHARDS} shard(s) done" in text


async def test_status_of_a_whole_run_has_every_shard_done(sim: Simulator, tmp_path: Path) -> None:
    """Once every shard ran, nothing is pending and every shard is done."""
    out = str(tmp_path / "out")
    await make_cluster_output(out, manifest_of(tmp_path / "m.jsonl"), sim, shards=SHARDS)
    data = json.loads((await ainvoke("status", out, "--json")).output)
    assert data["cluster"] == {"shards": SHARDS, "shards_done": SHARDS}
    assert (data["ok_requests"], data["pending_requests"]) == (JOBS, 0)
    assert data["runs"] == 1


def test_an_ordinary_output_has_no_cluster_object(tmp_path: Path) -> None:
    """status --json of an output without a plan is as before: no "cluster" key."""
    manifest = manifest_of(tmp_path / "m.jsonl", 3)
    out = str(tmp_path / "out")
    assert invoke("run", str(manifest), "--simulate", "--out", out, "-q").exit_code == 0
    data = json.loads(invoke("status", out, "--json").output)
    assert "cluster" not in data
    assert data["ok_requests"] == 3


def test_a_broken_plan_is_a_clear_error(tmp_path: Path) -> None:
    """A plan without a number of shards is named, with exit 2 and no traceback."""
    out = tmp_path / "out"
    (out / "cluster").mkdir(parents=True)
    (out / "cluster" / "plan.json").write_text('{"version": 1, "shards": "three"}')
    shown = invoke("status", str(out))
    assert shown.exit_code == 2
    assert "plan.json" in shown.output + shown.stderr and "shards" in shown.stderr


async def test_verify_checks_every_shard_and_names_bad_images_under_out(
    sim: Simulator, tmp_path: Path, out: str
) -> None:
    """A good cluster output verifies (exit 0, every image checked); an image gone from one
    shard and one damaged in another are named by their paths under OUT (exit 1)."""
    cut = await make_cluster_output(out, manifest_of(tmp_path / "m.jsonl"), sim, shards=SHARDS)
    good = await ainvoke("verify", out, "--json")
    assert good.exit_code == 0
    assert json.loads(good.output)["checked_images"] == JOBS
    store = open_store(out)
    (first, second) = [name for name, held in cut.items() if held][:2]
    gone = next(n for n in store.names(f"shards/{first}/images") if n.endswith((".png", ".jpeg")))
    damaged = store.names(f"shards/{second}/images")[0]
    store.remove(gone)
    await store.put(damaged, store.read(damaged)[:-10])
    checked = await ainvoke("verify", out, "--json")
    assert checked.exit_code == 1
    data = json.loads(checked.output)
    assert sorted(bad["path"] for bad in data["bad"]) == sorted([gone, damaged])
    assert data["marked_keys"] == 2 and data["checked_images"] == JOBS
    text = (await ainvoke("verify", out)).output
    assert gone in text and damaged in text


def test_verify_of_a_cluster_output_no_run_wrote_to_is_a_clear_error(tmp_path: Path) -> None:
    """Nothing to verify yet: said plainly, exit 2."""
    out = tmp_path / "out"
    (out / "cluster").mkdir(parents=True)
    (out / "cluster" / "plan.json").write_text('{"version": 1, "shards": 2}')
    shown = invoke("verify", str(out))
    assert shown.exit_code == 2
    assert "nothing to verify" in shown.stderr


async def test_export_has_every_shards_jobs_with_paths_under_out(
    sim: Simulator, tmp_path: Path, out: str
) -> None:
    """One row per job of every shard; each image path is relative to OUT (shards/<id>/...)
    and names the image there; prompts come from the shard's manifest lines."""
    cut = await make_cluster_output(out, manifest_of(tmp_path / "m.jsonl"), sim, shards=SHARDS)
    shard_of_job = {job: name for name, held in cut.items() for job in held}
    exported = await ainvoke("export", out, "--format", "csv")
    assert exported.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(exported.output)))
    assert sorted(row["job_id"] for row in rows) == sorted(f"j{i}" for i in range(JOBS))
    store = open_store(out)
    for row in rows:
        assert row["status"] == "ok"
        assert row["prompt"] == f"picture {row['job_id'].removeprefix('j')}"
        (path,) = row["image_paths"].split()
        assert path.startswith(f"shards/{shard_of_job[row['job_id']]}/images/{row['job_id']}/")
        assert store.stat(path).size > 0
    lines = (await ainvoke("export", out, "--format", "openai-batch")).output.splitlines()
    urls = [json.loads(line)["response"]["body"]["data"][0]["url"] for line in lines]
    assert len(urls) == JOBS and all(url.startswith("shards/") for url in urls)


async def test_export_layout_of_a_cluster_output_says_to_convert_each_shard(
    sim: Simulator, tmp_path: Path
) -> None:
    """export --layout is not for a whole cluster output: said plainly, exit 2."""
    out = str(tmp_path / "out")
    await make_cluster_output(out, manifest_of(tmp_path / "m.jsonl", 2), sim, shards=2)
    dest = str(tmp_path / "wds")
    shown = await ainvoke("export", out, dest, "--layout", "webdataset")
    assert shown.exit_code == 2
    assert "cluster output" in shown.stderr


@pytest.mark.parametrize("keep_manifest", [True, False])
async def test_the_gallery_shows_every_shards_images_with_their_prompts(
    sim: Simulator, tmp_path: Path, out: str, keep_manifest: bool
) -> None:
    """OUT/index.html shows each job's image from its shard by its path under OUT, with its
    prompt: from the manifest the plan names, or, when that file is gone, from the shards' own
    manifest lines."""
    manifest = manifest_of(tmp_path / "m.jsonl")
    cut = await make_cluster_output(out, manifest, sim, shards=SHARDS)
    if not keep_manifest:
        manifest.unlink()
    made = await ainvoke("gallery", out)
    assert made.exit_code == 0, made.stderr
    page = open_store(out).read("index.html").decode()
    for name, held in cut.items():
        for job in held:
            assert f'src="shards/{name}/images/{job}/0.' in page
            assert f"<p>picture {job.removeprefix('j')}</p>" in page
    assert "prompt not known" not in page


async def test_the_views_read_a_cluster_output_on_s3(
    sim: Simulator, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a real S3 server: status sums the shards, verify names a missing object by its path
    under OUT, export's paths are under OUT."""
    import s3fs

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = f"cluster-{secrets.token_hex(4)}"
    s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options).mkdir(bucket)
    out = f"s3://{bucket}/out"
    cut = await make_cluster_output(out, manifest_of(tmp_path / "m.jsonl"), sim, shards=2)
    data = json.loads((await ainvoke("status", out, "--json")).output)
    assert data["cluster"] == {"shards": 2, "shards_done": 2}
    assert (data["ok_requests"], data["pending_requests"]) == (JOBS, 0)
    store = open_store(out)
    name = next(name for name, held in cut.items() if held)
    gone = store.names(f"shards/{name}/images")[0]
    store.remove(gone)
    checked = await ainvoke("verify", out, "--json")
    assert checked.exit_code == 1
    assert [bad["path"] for bad in json.loads(checked.output)["bad"]] == [gone]
    exported = (await ainvoke("export", out, "--format", "jsonl")).output.splitlines()
    paths = [image["path"] for line in exported for image in json.loads(line)["images"]]
    assert len(paths) == JOBS - 1, paths
    assert all(path.startswith("shards/") for path in paths)


async def test_a_shards_store_is_the_folder_under_out_on_the_same_backend(out: str) -> None:
    """read_cluster names each planned shard in order; what a shard's store writes is at
    OUT/shards/<id>/ in OUT's own store; an output without a plan is no cluster output."""
    store = open_store(out)
    assert read_cluster(store) is None
    await store.put("cluster/plan.json", json.dumps({"version": 1, "shards": 2}).encode())
    cluster = read_cluster(store)
    assert cluster is not None
    assert [shard.id for shard in cluster.shards] == ["00000", "00001"]
    second = cluster.shards[1]
    assert second.store.root.rstrip("/").endswith("shards/00001")
    await second.store.put("images/a/0.png", b"png")
    assert store.read("shards/00001/images/a/0.png") == b"png"
    assert cluster.started() == []
