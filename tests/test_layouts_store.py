"""Dataset layouts, exports and streamed downloads on an object store (memory://, and the S3
server): read back from the objects' bytes, reruns and kills that send nothing."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import os
import secrets
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from s3server import S3Server
from support import no_sleep, run_all, settings_for
from test_layouts import JOBS, PROMPTS, Dying

from cometbatch import CometBatchError, ConfigError, Engine, Job, SimConfig, Simulator
from cometbatch.cli.main import main
from cometbatch.ledger.verify import verify_folder
from cometbatch.store.interface import Store
from cometbatch.store.remote import FsspecStore
from cometbatch.store.sink import SPOOL_BYTES
from cometbatch.store.staging import Staging
from cometbatch.views.gallery.content import publish_gallery
from cometbatch.views.status import read_status

fsspec = pytest.importorskip("fsspec")

LAYOUTS = ["webdataset", "parquet"]


@pytest.fixture
def s3_url(s3_server: S3Server) -> str:
    """A new bucket on the S3 server; the output is a prefix in it."""
    import s3fs

    bucket = f"lay-{secrets.token_hex(4)}"
    s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options).mkdir(bucket)
    return f"s3://{bucket}/out"


def s3_store(url: str, server: S3Server) -> FsspecStore:
    return FsspecStore.from_url(url, {**server.storage_options, "skip_instance_cache": True})


async def generate(url: str, layout: str, store: Store | None = None, **more: Any) -> int:
    """Run JOBS into the store at `url` (8 images a shard); the requests the API got."""
    async with Simulator(SimConfig(seed=3)) as sim:
        settings = settings_for(sim, layout=layout, shard_size=8, concurrency=4, **more)
        async with Engine(settings, out_dir=url, sleep=no_sleep, store=store) as engine:
            await run_all(engine, list(JOBS))
        return sim.stats.requests


def read_back(store: Store, layout: str) -> list[dict[str, Any]]:
    """Every sample of the store's shards, read from the objects' bytes by webdataset or
    pyarrow: (job_id, prompt, image bytes) each."""
    names = [n for n in store.names("shards") if not n.endswith("_stats.json")]
    if layout == "parquet":
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = []
        for name in names:
            rows.extend(pq.read_table(io.BytesIO(store.read(name))).to_pylist())
        return [{"job_id": r["job_id"], "prompt": r["prompt"], "image": r["image"]} for r in rows]
    import webdataset as wds

    streams = [{"url": name, "stream": io.BytesIO(store.read(name))} for name in names]
    samples = list(wds.tariterators.tar_file_expander(streams))
    grouped = list(wds.tariterators.group_by_keys(iter(samples)))
    return [
        {"job_id": json.loads(s["json"])["job_id"], "prompt": s["txt"].decode(), "image": s["webp"]}
        for s in grouped
    ]


def shard_events(store: Store) -> list[dict[str, Any]]:
    path = store.log_copy("ledger.jsonl")
    assert path is not None
    lines = Path(path).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "shard"]


async def check_layout_round_trip(url: str, store: Store, layout: str) -> None:
    """A run of JOBS on the store: 30 samples read back from the shard objects, no staging
    left, a rerun sends nothing and writes no object."""
    assert await generate(url, layout, store) == 30
    samples = read_back(store, layout)
    assert sorted(s["prompt"] for s in samples) == sorted(PROMPTS)
    assert all(s["image"][:4] == b"RIFF" for s in samples)
    assert store.names("images") == []
    assert len(shard_events(store)) == 4
    before = [n for n in store.names("") if not n.startswith("ledger/")]
    assert await generate(url, layout, store) == 0
    assert [n for n in store.names("") if not n.startswith("ledger/")] == before


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_shards_on_a_memory_store_read_back_and_rerun_free(url: str, layout: str) -> None:
    await check_layout_round_trip(url, FsspecStore.from_url(url), layout)


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_shards_on_s3_read_back_and_rerun_free(
    s3_url: str, s3_server: S3Server, layout: str
) -> None:
    await check_layout_round_trip(s3_url, s3_store(s3_url, s3_server), layout)


class CountingStore(FsspecStore):
    """A store that counts the objects read from it."""

    reads = 0

    def read(self, name: str) -> bytes:
        self.reads += 1
        return super().read(name)


async def test_files_layout_writes_metadata_on_the_store_without_reading_objects(
    url: str,
) -> None:
    """metadata.jsonl is put on the store, a line per image; rebuilding it at a rerun's end
    reads no object (the ledger's local copy has every line)."""
    fs, base = fsspec.core.url_to_fs(url)
    store = CountingStore(url, fs, base)
    assert await generate(url, "files", store) == 30
    assert await generate(url, "files", store) == 0
    assert store.reads == 0
    lines = [json.loads(line) for line in store.read("metadata.jsonl").splitlines()]
    assert sorted(line["prompt"] for line in lines) == sorted(PROMPTS)
    assert {line["file_name"] for line in lines} == set(store.names("images"))


class DyingRemote(Dying, FsspecStore):
    """An object store that dies at one step of packing, as DyingStore does for a folder."""


async def check_kill_while_packing(
    dying: DyingRemote, store: FsspecStore, layout: str, step: str
) -> None:
    """Killed at `step` of packing the last shard on the store, the next run sends nothing,
    removes a stray shard object, and every image is in a committed shard once."""
    dying.step = step
    with pytest.raises((OSError, CometBatchError)):
        await generate(store.root, layout, dying)
    assert dying.dead
    await store.put("shards/00042.tar", b"half a shard")
    assert await generate(store.root, layout, store) == 0
    samples = read_back(store, layout)
    assert sorted(s["job_id"] for s in samples) == sorted(job.id for job in JOBS)
    assert store.names("images") == []
    committed = {n for e in shard_events(store) for n in (e["shard"], e["stats"])}
    assert set(store.names("shards")) == committed


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("step", ["shard", "stats", "event", "staging"])
async def test_a_kill_while_packing_on_a_store_repeats_no_request(
    url: str, layout: str, step: str
) -> None:
    fs, base = fsspec.core.url_to_fs(url)
    await check_kill_while_packing(
        DyingRemote(url, fs, base), FsspecStore.from_url(url), layout, step
    )


@pytest.mark.parametrize("step", ["stats", "staging"])
async def test_a_kill_while_packing_on_s3_repeats_no_request(
    s3_url: str, s3_server: S3Server, step: str
) -> None:
    store = s3_store(s3_url, s3_server)
    dying = DyingRemote(s3_url, store.fs, store.base)
    await check_kill_while_packing(dying, store, "webdataset", step)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def manifest_file(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(job.model_dump_json() + "\n" for job in JOBS))
    return path


@pytest.mark.parametrize(("source", "target"), [("url", "url"), ("url", "dir"), ("dir", "url")])
def test_export_layout_between_folders_and_stores(
    url: str, tmp_path: Path, source: str, target: str
) -> None:
    """`export OUT DEST --layout` with OUT and/or DEST a URL writes 30 samples to DEST;
    `export OUT --format csv` reads a URL's ledger."""
    out = url if source == "url" else str(tmp_path / "out")
    dest = f"{url}-dest" if target == "url" else str(tmp_path / "dest")
    done = invoke("run", str(manifest_file(tmp_path)), "--simulate", "--out", out)
    assert done.exit_code == 0, done.stderr
    table = list(csv.DictReader(io.StringIO(invoke("export", out, "--format", "csv").output)))
    assert sorted(row["job_id"] for row in table) == sorted(job.id for job in JOBS)
    converted = invoke("export", out, dest, "--layout", "webdataset", "--shard-size", "8")
    assert converted.exit_code == 0, converted.stderr
    assert "30 image(s) in 4" in converted.stderr
    samples = read_back(
        FsspecStore.from_url(dest) if target == "url" else _local(dest), "webdataset"
    )
    assert sorted(s["prompt"] for s in samples) == sorted(PROMPTS)
    again = invoke("export", out, dest, "--layout", "webdataset")
    assert again.exit_code != 0 and "already holds shards/" in again.stderr


def _local(folder: str) -> Store:
    from cometbatch.store.local import LocalStore

    return LocalStore(folder)


def test_export_layout_and_csv_on_s3(
    s3_url: str, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same on the S3 server, credentials from the environment: OUT and DEST on S3."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    dest = f"{s3_url}-parquet"
    assert invoke("run", str(manifest_file(tmp_path)), "--simulate", "--out", s3_url).exit_code == 0
    table = list(csv.DictReader(io.StringIO(invoke("export", s3_url, "--format", "csv").output)))
    assert len(table) == len(JOBS)
    converted = invoke("export", s3_url, dest, "--layout", "parquet", "--shard-size", "8")
    assert converted.exit_code == 0, converted.stderr
    samples = read_back(s3_store(dest, s3_server), "parquet")
    assert sorted(s["prompt"] for s in samples) == sorted(PROMPTS)
    assert len(s3_store(s3_url, s3_server).names("images")) == len(JOBS)


async def test_a_streamed_download_ends_whole_in_a_store(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A url-mode image past the streaming threshold is staged locally, put in the store whole
    with its recorded sha256, and the temporary staging folder is gone at the end."""
    import hashlib

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "temp"))
    store = FsspecStore.from_url(url)
    job = Job(id="big", prompt="a glacier", model="dall-e-2", n=1, response_format="url")
    async with (
        Simulator(SimConfig(seed=1, payload_bytes=3 * SPOOL_BYTES)) as sim,
        Engine(settings_for(sim), out_dir=url, sleep=no_sleep) as engine,
    ):
        (result,) = await run_all(engine, [job])
    assert result.ok and sim.stats.requests == 1
    ((image,),) = [[record.to_dict() for record in result.images]]
    data = store.read(str(image["path"]))
    assert len(data) == image["bytes"] > SPOOL_BYTES
    assert hashlib.sha256(data).hexdigest() == image["sha256"]
    assert not await asyncio.to_thread(os.path.exists, Staging.for_store(store).folder)
    assert not await asyncio.to_thread(os.path.exists, "memory:")


async def test_status_verify_and_gallery_on_a_packed_store(url: str) -> None:
    """status counts the store's shards, verify checks their samples, and the gallery says it
    needs the files layout, as for a local folder, and puts no page."""
    await generate(url, "webdataset")
    store = FsspecStore.from_url(url)
    assert read_status(store).to_dict()["layout"]["packed_images"] == len(JOBS)
    report = await verify_folder(url)
    assert report.ok and report.checked_images == len(JOBS)
    with pytest.raises(ConfigError, match="files layout"):
        await asyncio.to_thread(publish_gallery, url)
    assert "index.html" not in store.names("")


class Overlapping(FsspecStore):
    """A store whose first two image reads each wait for the other: reads one at a time
    would break the barrier (and the run)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.barrier = threading.Barrier(2, timeout=10)
        self.waits = itertools.count()

    def read(self, name: str) -> bytes:
        if name.startswith("images/") and next(self.waits) < 2:
            self.barrier.wait()
        return super().read(name)


async def test_packing_reads_staged_objects_a_few_at_a_time(url: str) -> None:
    """On an object store each staged image is a request: the packer reads several at once."""
    fs, base = fsspec.core.url_to_fs(url)
    store = Overlapping(url, fs, base)
    assert await generate(url, "webdataset", store) == 30
    assert len(read_back(store, "webdataset")) == 30


async def test_a_large_shard_is_uploaded_a_part_at_a_time(
    s3_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    """A shard file far larger than an upload part goes to S3 holding about one part in
    memory, not the ten parts s3fs reads at once by default (a 2 GB shard took 1 GB)."""
    size = 320 * 1024 * 1024
    source = tmp_path / "00000.tar"
    with source.open("wb") as handle:
        handle.truncate(size)  # sparse: quick to make, read back as zeros
    store = s3_store(s3_url, s3_server)
    tracemalloc.start()
    try:
        await store.put_file("shards/00000.tar", str(source))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert store.stat("shards/00000.tar").size == size
    assert peak < 130 * 1024 * 1024, peak
