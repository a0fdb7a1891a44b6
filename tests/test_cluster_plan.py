"""The shard plan of a cluster output (stable shards, a kept shard count, done shards) and the
node check, without Ray."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import settings_for

from cometbatch import ConfigError, Engine, Job, OutputError, SimConfig, Simulator, load_manifest
from cometbatch.cluster.connect import check_nodes
from cometbatch.cluster.plan import (
    PLAN_NAME,
    RUNS_NAME,
    ShardPlan,
    append_run,
    cut_manifest,
    default_shards,
    plan_shards,
    read_plan,
    shard_done,
    shard_of,
    shard_out,
)
from cometbatch.cluster.reports import ShardReport
from cometbatch.cluster.summaries import exit_code, summary_of, summed
from cometbatch.store.local import LocalStore


def write_jobs(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def jobs_of(count: int, *, prompt: str = "a cat", start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"job-{i}", "prompt": f"{prompt} {i}", "model": "dall-e-2", "size": "256x256"}
        for i in range(start, start + count)
    ]


def shards_of(manifest: Path, shards: int, folder: Path) -> dict[str, str]:
    """Each job id of the manifest and the shard file it was cut into."""
    folder.mkdir()
    where = {}
    for shard, cut in cut_manifest(load_manifest(manifest), shards, folder).items():
        for job in load_manifest(cut.path):
            where[job.id] = shard
    return where


def test_a_job_lands_in_the_shard_its_id_hashes_to() -> None:
    """sha256(job_id) % shards, the same for the same id, spread over every shard."""
    assert shard_of("job-1", 12) == shard_of("job-1", 12)
    assert shard_of("job-1", 12) == int(hashlib.sha256(b"job-1").hexdigest(), 16) % 12
    spread = Counter(shard_of(f"job-{i}", 8) for i in range(800))
    assert set(spread) == set(range(8))
    assert min(spread.values()) > 50


def test_default_shard_count_is_four_per_worker_or_a_thousand_jobs_each() -> None:
    """A first run cuts 4 shards per worker, more when shards would hold over 1,000 jobs."""
    assert default_shards(10, 3) == 12
    assert default_shards(2500, 1) == 4
    assert default_shards(10_001, 1) == 11


def test_shards_are_stable_when_the_manifest_is_edited(tmp_path: Path) -> None:
    """Edited prompts, added and removed jobs: every job kept stays in its shard."""
    first = write_jobs(tmp_path / "first.jsonl", jobs_of(300))
    edited = jobs_of(150, prompt="a dog") + jobs_of(100, start=400)
    second = write_jobs(tmp_path / "second.jsonl", edited)
    before = shards_of(first, 12, tmp_path / "a")
    after = shards_of(second, 12, tmp_path / "b")
    kept = before.keys() & after.keys()
    assert len(kept) == 150
    assert {job: after[job] for job in kept} == {job: before[job] for job in kept}
    assert len(after) == 250


def test_a_cut_job_reads_back_as_the_same_job(tmp_path: Path) -> None:
    """Shard lines carry the id and every field: defaults from the command line, extra and
    metadata, and a default id, all read back equal."""
    text = tmp_path / "prompts.txt"
    text.write_text("a red fox\na blue whale\n")
    manifest = load_manifest(text, model="dall-e-2", size="512x512", n=3)
    jsonl = write_jobs(
        tmp_path / "m.jsonl",
        [{"prompt": "x", "model": "gpt-image-1", "extra": {"seed": 4}, "metadata": {"k": [1]}}],
    )
    for source in (manifest, load_manifest(jsonl)):
        folder = tmp_path / source.path.stem
        folder.mkdir()
        cuts = cut_manifest(source, 2, folder)
        read: list[Job] = [job for cut in cuts.values() for job in load_manifest(cut.path)]
        assert sorted(read, key=lambda job: job.id) == sorted(source, key=lambda job: job.id)
        assert sum(cut.images for cut in cuts.values()) == source.stats.images
        assert sum(cut.requests for cut in cuts.values()) == source.stats.requests


async def test_the_first_plan_is_kept_by_later_runs(tmp_path: Path) -> None:
    """plan.json is written once (S = 4 x workers); a later run with more workers keeps S."""
    manifest = load_manifest(write_jobs(tmp_path / "m.jsonl", jobs_of(40)))
    out = tmp_path / "out"
    root = LocalStore(out)
    first = await plan_shards(manifest, root, out, 3)
    assert first.new and first.plan.shards == 12
    data = json.loads((out / PLAN_NAME).read_text())
    assert data["shards"] == 12 and data["manifest_sha256"] == manifest.sha256
    assert data["shard_of"] == "sha256(job_id) % shards" and data["version"] == 1
    assert sorted(p.name for p in (out / "cluster" / "shards").iterdir()) == [
        f"{i:05d}.jsonl" for i in range(12)
    ]
    later = await plan_shards(manifest, root, out, 8)
    assert not later.new and later.plan.shards == 12
    assert later.to_run() == first.to_run()


async def test_a_dry_plan_writes_nothing(tmp_path: Path) -> None:
    """plan_shards(write=False) cuts and checks without touching OUT."""
    manifest = load_manifest(write_jobs(tmp_path / "m.jsonl", jobs_of(5)))
    out = tmp_path / "out"
    shards = await plan_shards(manifest, LocalStore(out), out, 1, write=False)
    assert shards.plan.shards == 4 and not out.exists()


def test_a_bad_plan_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """plan.json that is not JSON, or holds no shard count, is refused by name."""
    (tmp_path / "cluster").mkdir()
    (tmp_path / PLAN_NAME).write_text("{oops")
    with pytest.raises(OutputError, match=r"plan\.json is not valid JSON"):
        read_plan(LocalStore(tmp_path))
    (tmp_path / PLAN_NAME).write_text(json.dumps({**_plan().to_dict(), "shards": 0}))
    with pytest.raises(OutputError, match="'shards'"):
        read_plan(LocalStore(tmp_path))
    assert read_plan(LocalStore(tmp_path / "none")) is None


def _plan() -> ShardPlan:
    return ShardPlan(4, "abc", "m.jsonl", "2026-01-01T00:00:00+00:00")


async def test_runs_are_recorded_one_line_each(tmp_path: Path) -> None:
    """runs.jsonl gets a line per run, appended."""
    root = LocalStore(tmp_path)
    await root.put(PLAN_NAME, b"{}")
    await append_run(root, {"run_id": "a", "manifest_sha256": "x"})
    await append_run(root, {"run_id": "b", "manifest_sha256": "y"})
    lines = (tmp_path / RUNS_NAME).read_text().splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == ["a", "b"]


async def test_a_shard_is_done_when_its_ledger_has_every_key_ok(tmp_path: Path) -> None:
    """Not run: not done; run to its end by an ordinary engine: done; a new job: not done."""
    manifest = load_manifest(write_jobs(tmp_path / "m.jsonl", jobs_of(3)))
    folder = tmp_path / "cut"
    folder.mkdir()
    cut = cut_manifest(manifest, 1, folder)["00000"]
    out = tmp_path / "out"
    store = LocalStore(shard_out(out, "00000"))
    assert not shard_done(store, cut, manifest.registry)
    async with (
        Simulator(SimConfig()) as sim,
        Engine(settings_for(sim), out_dir=shard_out(out, "00000")) as engine,
    ):
        async for _ in engine.run(load_manifest(cut.path)):
            pass
    assert shard_done(store, cut, manifest.registry)
    grown = load_manifest(write_jobs(tmp_path / "m2.jsonl", jobs_of(4)))
    (tmp_path / "cut2").mkdir()
    bigger = cut_manifest(grown, 1, tmp_path / "cut2")["00000"]
    assert not shard_done(store, bigger, grown.registry)


def test_a_shard_with_no_jobs_is_done(tmp_path: Path) -> None:
    """An empty shard needs no task."""
    manifest = load_manifest(write_jobs(tmp_path / "m.jsonl", jobs_of(1)))
    cuts = cut_manifest(manifest, 64, tmp_path)
    empty = next(cut for cut in cuts.values() if cut.jobs == 0)
    assert shard_done(LocalStore(tmp_path / "x"), empty, manifest.registry)


def test_shard_summaries_add_up() -> None:
    """Counts add, failures merge, a budget stop wins, the exit code is run's."""
    one: dict[str, Any] = {
        "run_id": "r1", "planned_requests": 3, "ok_requests": 2, "failed_requests": 1,
        "planned_images": 3, "images_written": 2, "failed_images": 1, "failures": {"server": 1},
        "resent_unanswered": {"requests": 1, "images": 1}, "spent_usd": 0.5,
        "earlier_unanswered": {"requests": 1, "images": 2}, "stopped": None,
    }  # fmt: skip
    two: dict[str, Any] = {
        "run_id": "r2", "planned_requests": 2, "skipped_requests": 2, "planned_images": 2,
        "skipped_images": 2, "failures": {"server": 2, "timeout": 1}, "stopped": "max_images",
        "spent_usd": 0.25,
    }  # fmt: skip
    total = summed([one, two], run_id="all")
    assert (total.planned_requests, total.ok_requests, total.skipped_requests) == (5, 2, 2)
    assert total.failures == {"server": 3, "timeout": 1}
    assert total.resent_unanswered == 1 and total.earlier_unanswered == (1, 2)
    assert total.spent_usd == pytest.approx(0.75)
    assert total.stopped == "max_images" and exit_code(total) == 3
    assert summary_of(total.to_dict()).to_dict() == total.to_dict()
    done = summed([{"planned_requests": 1, "ok_requests": 1}])
    assert exit_code(done) == 0 and exit_code(done, failed=True) == 1


def test_a_report_counts_attempts_within_a_run() -> None:
    """A shard's second start in the same run is attempt 2; a new run starts at 1."""
    report = ShardReport("run-a", "00001", 1, 123, "host")
    assert report.next_attempt("run-a") == 2
    assert report.next_attempt("run-b") == 1
    assert ShardReport.from_dict(report.to_dict()) == report
    assert ShardReport.from_dict({"run_id": "x"}) is None


class FakeRay:
    """What check_nodes asks of ray: its nodes, and a task pinned to each (run here, where
    the nodes named in `blind` do not see the folder)."""

    def __init__(self, nodes: int, blind: frozenset[str] = frozenset()) -> None:
        self._nodes = [
            {"NodeID": f"n{i}", "NodeManagerAddress": f"10.0.0.{i}", "Alive": True}
            for i in range(nodes)
        ]
        self.blind = blind
        self.probed: list[str] = []
        self.util = SimpleNamespace(
            scheduling_strategies=SimpleNamespace(NodeAffinitySchedulingStrategy=self._pin)
        )

    def nodes(self) -> list[dict[str, Any]]:
        return self._nodes

    @staticmethod
    def _pin(node: str, soft: bool) -> str:
        assert not soft
        return node

    def remote(self, **_: Any) -> Callable[[Callable[[str], bool]], Any]:
        def wrap(function: Callable[[str], bool]) -> Any:
            fake = self

            class Pinned:
                def options(self, scheduling_strategy: str) -> Any:
                    node = scheduling_strategy

                    class Call:
                        def remote(self, path: str) -> Any:
                            fake.probed.append(node)
                            done: Future[bool] = Future()
                            done.set_result(function(path) and node not in fake.blind)
                            return SimpleNamespace(future=lambda: done)

                    return Call()

            return Pinned()

        return wrap


async def test_a_local_out_must_be_seen_by_every_node(tmp_path: Path) -> None:
    """Several nodes: each runs a probe for a file written in OUT; a node that does not see
    it is named and the run refused. One node, or an object store: no probe."""
    root = LocalStore(tmp_path)
    one = FakeRay(1)
    await check_nodes(one, root)  # type: ignore[arg-type]
    assert one.probed == []
    shared = FakeRay(3)
    await check_nodes(shared, root)  # type: ignore[arg-type]
    assert shared.probed == ["n0", "n1", "n2"]
    blind = FakeRay(3, frozenset({"n2"}))
    with pytest.raises(ConfigError, match=r"1 of the cluster's 3 nodes do not see \(10\.0\.0\.2\)"):
        await check_nodes(blind, root)  # type: ignore[arg-type]
    assert probes(tmp_path) == []  # the probe file is gone


def probes(folder: Path) -> list[Path]:
    return list(folder.rglob("probe-*"))
