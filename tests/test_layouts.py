"""Dataset layouts read back by the readers people use, and packing that survives a kill."""

from __future__ import annotations

import gc
import io
import json
import sys
import tarfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from support import ROOT, cli, no_sleep, run_all, settings_for

from cometbatch import (
    CometBatchError,
    ConfigError,
    Engine,
    Job,
    Settings,
    SimConfig,
    Simulator,
    load_manifest,
)
from cometbatch.cli.config import parse_config
from cometbatch.ledger.verify import verify_folder
from cometbatch.store.interface import AppendLog
from cometbatch.store.local import LocalStore
from cometbatch.views.export import export as export_ledger
from cometbatch.views.gallery.content import write_gallery
from cometbatch.views.status import read_status

JOBS = [Job(id=f"job-{i}", prompt=f"a lighthouse, take {i}", metadata={"i": i}) for i in range(30)]
PROMPTS = {job.prompt for job in JOBS}


async def generate(
    out: Path, layout: str, *, store: Any = None, jobs: Sequence[Job] = JOBS, **fields: Any
) -> int:
    """Run `jobs` into `out` with `layout` (8 images a shard); the requests the API got."""
    async with Simulator(SimConfig(seed=3)) as sim:
        settings = settings_for(sim, layout=layout, shard_size=8, concurrency=4, **fields)
        async with Engine(settings, out_dir=out, sleep=no_sleep, store=store) as engine:
            await run_all(engine, list(jobs))
        return sim.stats.requests


def webdataset_samples(out: Path) -> list[dict[str, Any]]:
    """Every sample of OUT's tar shards, read by webdataset itself."""
    import webdataset as wds

    urls = [str(path) for path in sorted((out / "shards").glob("*.tar"))]
    with warnings.catch_warnings():
        # webdataset leaves its shard files to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        gc.collect()
    return samples


def parquet_rows(out: Path) -> list[dict[str, Any]]:
    """Every row of OUT's parquet shards, read by pyarrow."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in sorted((out / "shards").glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def staged_files(out: Path) -> list[Path]:
    return [path for path in (out / "images").rglob("*") if path.is_file()]


def shard_events(out: Path) -> list[dict[str, Any]]:
    lines = (out / "ledger.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "shard"]


async def test_webdataset_shards_read_back_with_prompt_and_image(tmp_path: Path) -> None:
    """30 images in tar shards of 8 read back through webdataset as 30 samples with bytes,
    prompt and record; staging is empty and every shard has its stats."""
    assert await generate(tmp_path, "webdataset") == 30
    samples = webdataset_samples(tmp_path)
    assert len(samples) == 30
    assert {s["txt"].decode() for s in samples} == PROMPTS
    for sample in samples:
        record = json.loads(sample["json"])
        assert record["prompt"] == sample["txt"].decode()
        assert record["metadata"] == {"i": int(record["job_id"].split("-")[1])}
        assert sample["webp"][:4] == b"RIFF"
    names = sorted(path.name for path in (tmp_path / "shards").iterdir())
    assert names == [f"{n:05d}{suffix}" for n in range(4) for suffix in (".tar", "_stats.json")]
    stats = json.loads((tmp_path / "shards" / "00003_stats.json").read_text())
    assert (stats["count"], stats["successes"]) == (6, 6)
    assert staged_files(tmp_path) == []


async def test_parquet_shards_read_back_one_row_per_image(tmp_path: Path) -> None:
    """30 images in parquet shards read back through pyarrow as 30 rows with image bytes,
    prompt, size in pixels and the job's metadata as JSON."""
    from PIL import Image

    assert await generate(tmp_path, "parquet") == 30
    rows = parquet_rows(tmp_path)
    assert len(rows) == 30
    assert {row["prompt"] for row in rows} == PROMPTS
    for row in rows:
        with Image.open(io.BytesIO(row["image"])) as image:
            assert (row["width"], row["height"]) == image.size
        assert json.loads(row["metadata"]) == {"i": row["index"] + int(row["job_id"][4:])}
    assert staged_files(tmp_path) == []


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
async def test_a_rerun_of_a_packed_output_sends_nothing(tmp_path: Path, layout: str) -> None:
    """Images that live in committed shards count as done: a rerun sends no request and
    writes no shard."""
    await generate(tmp_path, layout)
    before = sorted(path.name for path in (tmp_path / "shards").iterdir())
    assert await generate(tmp_path, layout) == 0
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == before


async def test_imagefolder_reads_images_with_their_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files layout's metadata.jsonl gives imagefolder a prompt column, and job folders do
    not become class labels."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    await generate(out, "files")
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert len(dataset) == 30
    assert "label" not in dataset.column_names
    assert {row["prompt"] for row in dataset} == PROMPTS
    assert min(dataset[0]["image"].size) > 0


class KilledError(OSError):
    """What a killed process would leave: nothing after this point is written."""


class Dying:
    """A store that dies at one step of packing the last shard (00003): that write and every
    later one fail, as if the process had been killed there (mixed into a store class)."""

    step = ""
    dead = False
    committed = False
    removed = 0

    def _die(self, step: str) -> None:
        if self.dead or step == self.step:
            self.dead = True
            raise KilledError(f"killed at {step}")

    async def put(self, name: str, data: bytes, *, sync: bool = False) -> None:
        self._die("stats" if name == "shards/00003_stats.json" else "put")
        await super().put(name, data, sync=sync)  # type: ignore[misc]

    async def put_file(self, name: str, source: str, *, sync: bool = False) -> None:
        self._die("shard" if name.startswith("shards/00003.") else "put")
        await super().put_file(name, source, sync=sync)  # type: ignore[misc]

    def remove(self, name: str) -> None:
        # "staging": after two of the committed shard's six images were removed.
        if self.committed and name.startswith("images/"):
            self.removed += 1
            if self.removed == 3:
                self._die("staging")
        super().remove(name)  # type: ignore[misc]

    def open_log(self, name: str, *, sync: bool) -> Any:
        log: AppendLog = super().open_log(name, sync=sync)  # type: ignore[misc]
        return _DyingLog(log, self)


class DyingStore(Dying, LocalStore):
    """A local folder that dies at one step of packing."""

    def __init__(self, root: Path, step: str) -> None:
        super().__init__(root)
        self.step = step


class _DyingLog:
    def __init__(self, log: AppendLog, store: Any) -> None:  # a dying store of either kind
        self.log, self.store = log, store
        self.path, self.on_loop = log.path, log.on_loop

    def append(self, data: bytes, sync: bool) -> int | None:
        last_shard = b'"shards/00003.' in data
        self.store._die("event" if last_shard else "line")
        size = self.log.append(data, sync)
        self.store.committed |= last_shard
        return size

    def close(self, sync: bool) -> None:
        self.log.close(sync)


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
@pytest.mark.parametrize("step", ["shard", "stats", "event", "staging"])
async def test_a_kill_at_any_step_of_packing_loses_and_repeats_nothing(
    tmp_path: Path, layout: str, step: str
) -> None:
    """Killed before the shard is stored, before its stats, before its ledger line or while
    its staging is removed, the next run sends nothing and every image is in a shard once."""
    store = DyingStore(tmp_path, step)
    # All 30 are answered and recorded before the end of the run packs the last 6.
    with pytest.raises((OSError, CometBatchError)):
        await generate(tmp_path, layout, store=store, jobs=JOBS)
    assert store.dead
    # A stray of another number (a shard put, never committed, by some earlier kill) too.
    (tmp_path / "shards").mkdir(exist_ok=True)
    (tmp_path / "shards" / "00042.tar").write_bytes(b"half a shard")
    assert await generate(tmp_path, layout) == 0
    if layout == "webdataset":
        keys = [json.loads(sample["json"])["job_id"] for sample in webdataset_samples(tmp_path)]
    else:
        keys = [row["job_id"] for row in parquet_rows(tmp_path)]
    assert sorted(keys) == sorted(job.id for job in JOBS)
    assert staged_files(tmp_path) == []
    # Every shard in the store is a committed one (a stray was removed or replaced).
    committed = {name for e in shard_events(tmp_path) for name in (e["shard"], e["stats"])}
    assert {f"shards/{path.name}" for path in (tmp_path / "shards").iterdir()} == committed


async def files_output(tmp_path: Path) -> Path:
    """A files-layout output of JOBS, run from a manifest file (the prompts' source)."""
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(job.model_dump_json() + "\n" for job in JOBS))
    out = tmp_path / "out"
    async with Simulator(SimConfig(seed=3)) as sim:
        settings = settings_for(sim)
        async with Engine(settings, out_dir=out, sleep=no_sleep) as engine:
            await run_all(engine, load_manifest(manifest))
    return out


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
async def test_export_converts_a_files_output_into_shards(tmp_path: Path, layout: str) -> None:
    """`export OUT DEST --layout` packs a finished files-layout output into shards that read
    back as 30 samples with their prompts, and leaves OUT as it was."""
    out = await files_output(tmp_path)
    dest = tmp_path / "dest"
    code, _, stderr = await cli(
        "export", str(out), str(dest), "--layout", layout, "--shard-size", "8"
    )
    assert code == 0, stderr
    assert "30 image(s) in 4" in stderr
    if layout == "webdataset":
        prompts = [sample["txt"].decode() for sample in webdataset_samples(dest)]
    else:
        prompts = [row["prompt"] for row in parquet_rows(dest)]
    assert sorted(prompts) == sorted(PROMPTS)
    assert len(staged_files(out)) == 30
    # Into a folder that holds shards already: refused, nothing overwritten.
    code, _, stderr = await cli("export", str(out), str(dest), "--layout", layout)
    assert code != 0 and "already holds shards/" in stderr


async def test_export_layout_takes_a_destination(tmp_path: Path) -> None:
    """--layout without DEST, or with --format, is a usage error (exit 2)."""
    out = await files_output(tmp_path)
    code, _, stderr = await cli("export", str(out), "--layout", "webdataset")
    assert code == 2 and "DEST" in stderr
    code, _, _ = await cli("export", str(out), str(tmp_path / "d"), "--format", "csv")
    assert code == 2


async def test_verify_checks_every_sample_of_every_shard(tmp_path: Path) -> None:
    """verify finds a packed output whole, then names the one sample of a shard whose bytes
    are not those recorded when it was packed."""
    await generate(tmp_path, "webdataset")
    report = await verify_folder(tmp_path)
    assert report.ok and report.checked_images == 30
    shard = tmp_path / "shards" / "00001.tar"
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info)) for info in tar.getmembers()]
        contents = [(info, handle.read() if handle else b"") for info, handle in members]
    victim = "0000100002.webp"
    with tarfile.open(shard, "w") as tar:
        for info, data in contents:
            if info.name == victim:
                data = data[:-1] + bytes([data[-1] ^ 1])
            tar.addfile(info, io.BytesIO(data))
    report = await verify_folder(tmp_path)
    assert [(bad.path, bad.problem) for bad in report.bad] == [
        ("shards/00001.tar#0000100002", "sha256")
    ]


async def test_status_export_and_gallery_on_a_packed_output(tmp_path: Path) -> None:
    """status counts the shards and their images; the ledger exports as before (a shard line
    is skipped by readers that do not know it); the gallery says it needs the files layout."""
    await generate(tmp_path, "parquet")
    data = read_status(tmp_path).to_dict()
    assert data["layout"] == {"name": "parquet", "shards": 4, "packed_images": 30}
    assert data["ok_images"] == 30
    stream = io.StringIO()
    assert export_ledger(tmp_path, "jsonl", stream) == 30
    # Each image names the shard and sample that hold it now.
    images = [
        image for line in stream.getvalue().splitlines() for image in json.loads(line)["images"]
    ]
    assert sorted(image["sample"][:5] for image in images) == sorted(
        f"{n:05d}" for n, size in enumerate((8, 8, 8, 6)) for _ in range(size)
    )
    assert {image["shard"] for image in images} == {f"shards/{n:05d}.parquet" for n in range(4)}
    with pytest.raises(ConfigError, match="files layout"):
        write_gallery(tmp_path)


def test_layout_and_shard_size_are_checked_as_settings() -> None:
    """A layout or shard size out of bounds is refused by Settings, as flag or file value."""
    assert Settings(layout="parquet", shard_size=5).shard_size == 5
    with pytest.raises(ValidationError):
        Settings(layout="tar")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Settings(shard_size=0)
    assert parse_config({"layout": "webdataset", "shard_size": 64}, "c.toml").get("layout")
    with pytest.raises(ConfigError, match="'shard_size'"):
        parse_config({"shard_size": 0}, "c.toml")


async def test_run_and_status_with_layout_flags(tmp_path: Path) -> None:
    """`run --layout webdataset --shard-size N` packs the demo into shards that status counts;
    a shard size out of bounds is a usage error naming the flag."""
    out = tmp_path / "out"
    demo = str(ROOT / "jobs" / "demo.jsonl")
    args = ["--simulate", "--out", str(out), "--layout", "webdataset", "--shard-size", "4"]
    code, _, stderr = await cli("run", demo, *args)
    assert code == 0, stderr
    assert list((out / "shards").glob("*.tar")) and staged_files(out) == []
    code, stdout, _ = await cli("status", str(out))
    assert code == 0 and "layout webdataset:" in stdout
    code, _, stderr = await cli("run", demo, "--simulate", "--out", str(out), "--shard-size", "0")
    assert code == 2 and "--shard-size" in stderr


async def test_a_files_output_run_again_as_shards_packs_it_without_a_request(
    tmp_path: Path,
) -> None:
    """Images an earlier run left in images/ (a files run, or a run killed before packing) are
    packed once their job comes by again: no request, every image once."""
    await generate(tmp_path, "files")
    assert len(staged_files(tmp_path)) == 30
    assert (tmp_path / "metadata.jsonl").is_file()
    assert await generate(tmp_path, "webdataset") == 0
    # It named files that are gone into shards: not left behind.
    assert not (tmp_path / "metadata.jsonl").exists()
    samples = webdataset_samples(tmp_path)
    assert sorted(s["txt"].decode() for s in samples) == sorted(PROMPTS)
    assert staged_files(tmp_path) == []


async def test_parquet_without_pyarrow_names_the_extra_before_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pyarrow the parquet layout refuses to start, naming the pip command; nothing
    is sent."""
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"pip install 'cometbatch\[datasets\]'"):
        assert await generate(tmp_path, "parquet") == 0


async def test_generate_calls_are_packed_too(tmp_path: Path) -> None:
    """Images of single generate() calls go into shards like a run's: full ones as they fill,
    the rest when the engine closes."""
    async with Simulator(SimConfig(seed=3)) as sim:
        settings = settings_for(sim, layout="webdataset", shard_size=2)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            for job in JOBS[:3]:
                await engine.generate(job)
            assert len(shard_events(tmp_path)) == 1
    assert [event["count"] for event in shard_events(tmp_path)] == [2, 1]
    assert sorted(s["txt"].decode() for s in webdataset_samples(tmp_path)) == sorted(
        job.prompt for job in JOBS[:3]
    )


def test_parquet_row_groups_are_bounded_by_bytes(tmp_path: Path) -> None:
    """Large images close a row group by its bytes, not only its row count, and the image
    column is not dictionary-encoded: a shard of 2 MB images is written in small steps."""
    pq = pytest.importorskip("pyarrow.parquet")
    from cometbatch.store.shardfiles import Member, write_parquet

    record = {"job_id": "j", "index": 0, "prompt": "p", "model": "m", "format": "png"}
    record |= {"sha256": "0" * 64, "parameters": {}}
    image = bytes(range(256)) * (8 * 1024)  # 2 MB
    path = tmp_path / "00000.parquet"
    write_parquet(str(path), (Member(f"{n:010d}", image, record) for n in range(24)))
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 24 and meta.num_row_groups >= 3
    column = meta.schema.to_arrow_schema().get_field_index("image")
    assert "DICTIONARY" not in str(meta.row_group(0).column(column).encodings)


async def test_a_key_recorded_again_after_its_shard_is_not_packed(tmp_path: Path) -> None:
    """The index reads a shard line and later result lines in line order, also when they sit
    in one block: a job generated again after it was packed has its images in staging."""
    from cometbatch.ledger.index import LedgerState

    await generate(tmp_path, "webdataset", jobs=JOBS[:8])
    changed = [job.model_copy(update={"prompt": job.prompt + ", again"}) for job in JOBS[:3]]
    assert await generate(tmp_path, "files", jobs=changed, regenerate_changed=True) == 3
    state = LedgerState.load(tmp_path / "ledger.jsonl")
    again = {key for key in state.packed if key.split("#")[0] in {job.id for job in changed}}
    assert len(state.packed) == 5 and again == set()


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
def test_a_shard_is_read_back_a_few_samples_at_a_time(tmp_path: Path, layout: str) -> None:
    """verify reads a shard from its file in parts: a shard of 40 MB of images is checked
    with a few MB of memory, not the whole shard held (shards of large images are GBs)."""
    import hashlib
    import tracemalloc

    from cometbatch.store.shardfiles import Member, read_members, write_parquet, write_tar

    if layout == "parquet":
        pytest.importorskip("pyarrow.parquet")
    record = {"job_id": "j", "index": 0, "prompt": "p", "model": "m", "format": "png"}
    image = b"\x89PNG" + bytes(range(256)) * (8 * 1024)  # 2 MB
    members = (Member(f"{n:010d}", image, {**record, "sha256": "x"}) for n in range(20))
    path = tmp_path / "00000.shard"
    (write_parquet if layout == "parquet" else write_tar)(str(path), members)
    digest = hashlib.sha256(image).hexdigest()
    tracemalloc.start()
    try:
        with open(path, "rb") as source:
            found = [(k, hashlib.sha256(d).hexdigest()) for k, d in read_members(source, layout)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [k for k, _ in found] == [f"{n:010d}" for n in range(20)]
    assert {d for _, d in found} == {digest}
    assert peak < 24 * 2**20, f"{peak / 2**20:.0f} MB traced for a 40 MB shard"
