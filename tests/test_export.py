"""Export: one line per job from the ledger, in OpenAI Batch output, CSV and JSONL shapes."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO, cast

import pytest
from support import no_sleep, run_all, settings_for

from cometbatch import ConfigError, Engine, Job, LedgerError, SimConfig, Simulator, load_manifest
from cometbatch.streams import GuardedStream
from cometbatch.views import EXPORT_FORMATS
from cometbatch.views.export import CSV_COLUMNS, export, openai_batch_record
from cometbatch.views.jobresults import JobResults, read_jobs
from cometbatch.views.prompts import PromptFile

ROOT = Path(__file__).resolve().parent.parent
BATCH = ROOT / "jobs" / "openai-batch.jsonl"
MARKER = "FORBIDDEN"


def exported(out: Path, format: str) -> str:
    stream = io.StringIO()
    export(out, format, stream)
    return stream.getvalue()


def records(out: Path, format: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in exported(out, format).splitlines()]


async def test_a_batch_manifest_round_trips_one_line_per_custom_id(tmp_path: Path) -> None:
    """The example Batch API input, run and exported, gives each custom_id exactly once,
    with all its images (merged across requests) on disk."""
    manifest = load_manifest(BATCH)
    assert manifest.stats.requests > manifest.stats.jobs  # some jobs are split
    async with (
        Simulator(SimConfig(seed=3)) as sim,
        Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine,
    ):
        await run_all(engine, manifest)
    assert engine.summary.complete
    lines = records(tmp_path, "openai-batch")
    custom_ids = [json.loads(line)["custom_id"] for line in BATCH.read_text().splitlines()]
    assert Counter(line["custom_id"] for line in lines) == Counter(custom_ids)
    assert len({line["id"] for line in lines}) == len(lines)
    wanted = {job.id: job for job in manifest}
    for line in lines:
        assert line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200
        data = response["body"]["data"]
        job = wanted[line["custom_id"]]
        assert len(data) == job.n
        paths = [item["url"] for item in data]
        assert paths == sorted(paths, key=lambda p: int(Path(p).stem))
        assert all((tmp_path / p).is_file() for p in paths)
        assert isinstance(response["body"]["created"], int)
        if job.model == "dall-e-3":
            assert all(item["revised_prompt"] for item in data)
        if job.model.startswith("gpt-image"):
            assert response["body"]["usage"]["output_tokens"] > 0


async def test_failures_have_the_batch_error_shapes_and_the_latest_result_wins(
    tmp_path: Path,
) -> None:
    """An API refusal keeps its status and request id; a connection failure is an `error`;
    a request that failed and then succeeded on a rerun is exported once, as ok."""
    flaky = Job(id="flaky", prompt="a fox", model="dall-e-3")
    refused = Job(id="refused", prompt=f"a {MARKER} fox", model="dall-e-3")
    split = Job(id="split", prompt="an owl", model="dall-e-3", n=2)
    config = SimConfig(seed=1, content_policy_marker=MARKER)
    async with Simulator(config) as sim:
        one_try = settings_for(sim, max_attempts=1, concurrency=1)
        sim.enqueue("500")
        async with Engine(one_try, out_dir=tmp_path, sleep=no_sleep) as engine:
            (first,) = await run_all(engine, [flaky])
        assert first.status == "failed"
        async with Engine(one_try, out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, [flaky, refused])
        sim.enqueue("drop")
        async with Engine(one_try, out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, [split])
    by_id = {line["custom_id"]: line for line in records(tmp_path, "openai-batch")}
    assert sorted(by_id) == ["flaky", "refused", "split"]

    assert by_id["flaky"]["response"]["status_code"] == 200

    refusal = by_id["refused"]
    assert refusal["error"] is None
    assert refusal["response"]["status_code"] == 400
    assert refusal["response"]["request_id"]
    assert refusal["response"]["body"]["error"]["type"] == "content_policy"
    assert refusal["response"]["body"]["error"]["message"]

    dropped = by_id["split"]
    assert dropped["response"] is None
    assert dropped["error"]["code"] in {"ambiguous", "connection"}
    assert dropped["error"]["message"]

    jobs = {line["job_id"]: line for line in records(tmp_path, "jsonl")}
    assert jobs["split"]["status"] == "partial"
    assert (jobs["split"]["requests"], jobs["split"]["failed_requests"]) == (2, 1)
    assert len(jobs["split"]["images"]) == 1
    assert jobs["refused"]["status"] == "failed"
    assert jobs["flaky"]["status"] == "ok"
    assert jobs["flaky"]["attempts"] == 1  # the latest result's, not the failed one's


async def test_csv_and_jsonl_merge_a_split_job(tmp_path: Path) -> None:
    """A 12-image gpt-image-1 job (two requests) is one CSV row and one JSONL record, with
    images 0-11 in order and usage summed over both requests."""
    job = Job(id="mugs", prompt="a mug", model="gpt-image-1", n=12, metadata={"sku": "M-1"})
    async with (
        Simulator(SimConfig(seed=2)) as sim,
        Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine,
    ):
        results = await run_all(engine, [job])
    assert len(results) == 2

    (record,) = records(tmp_path, "jsonl")
    assert record["status"] == "ok"
    assert (record["n"], record["requests"]) == (12, 2)
    assert [image["index"] for image in record["images"]] == list(range(12))
    assert record["usage"]["output_tokens"] == sum(r.usage["output_tokens"] for r in results)
    assert record["metadata"] == {"sku": "M-1"}

    rows = list(csv.reader(io.StringIO(exported(tmp_path, "csv"))))
    assert rows[0] == list(CSV_COLUMNS)
    (row,) = (dict(zip(CSV_COLUMNS, values, strict=True)) for values in rows[1:])
    assert (row["job_id"], row["status"], row["model"], row["n"], row["images"]) == (
        "mugs",
        "ok",
        "gpt-image-1",
        "12",
        "12",
    )
    assert row["image_paths"].split(" ") == [image["path"] for image in record["images"]]
    assert json.loads(row["metadata"]) == {"sku": "M-1"}
    assert row["error_kind"] == ""


def event(job_id: str, chunk: int, status: str, **fields: Any) -> dict[str, Any]:
    """A result event as the ledger holds it (only the fields export reads)."""
    images = fields.pop("images", 0)
    return {
        "event": "result",
        "key": f"{job_id}#{chunk}",
        "job_id": job_id,
        "chunk": chunk,
        "status": status,
        "model": "dall-e-3",
        "n": 1,
        "images": [
            {"index": chunk, "path": f"images/{job_id}/{chunk}.png", "revised_prompt": None}
        ][:images],
        "attempts": 1,
        "error": fields.pop("error", None),
        "finished_at": f"2026-11-21T10:00:0{chunk}.000Z",
        "usage": None,
        "metadata": {},
        **fields,
    }


def write_ledger(out: Path, *events: dict[str, Any]) -> Path:
    path = out / "ledger.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_requests_far_apart_in_the_ledger_merge_into_one_line(tmp_path: Path) -> None:
    """A job's requests recorded by different runs become one line, in last-recorded order."""
    error = {"kind": "server", "status": 500, "message": "boom", "request_id": "r1"}
    write_ledger(
        tmp_path,
        {"event": "run", "run_id": "1"},
        event("a", 0, "ok", images=1),
        event("a", 1, "failed", error=error),
        event("b", 0, "ok", images=1),
        {"event": "end", "run_id": "1"},
        {"event": "run", "run_id": "2"},
        event("c", 0, "ok", images=1),
        event("a", 1, "ok", images=1),
    )
    jobs = list(read_jobs(tmp_path))
    assert [job.job_id for job in jobs] == ["b", "c", "a"]
    assert jobs[2].status == "ok"
    assert [image["index"] for image in jobs[2].images] == [0, 1]


@pytest.mark.parametrize(
    ("statuses", "images", "expected"),
    [
        (["ok", "ok"], 2, "ok"),
        (["ok", "download_failed"], 1, "download_failed"),
        (["ok", "failed"], 1, "partial"),
        (["failed", "failed"], 0, "failed"),
        (["download_failed", "failed"], 0, "failed"),
    ],
)
def test_a_jobs_status_merges_its_requests(statuses: list[str], images: int, expected: str) -> None:
    """ok only when every request is; partial when some images were written."""
    requests = {
        chunk: event("j", chunk, status, images=1 if chunk < images else 0)
        for chunk, status in enumerate(statuses)
    }
    assert JobResults("j", requests).status == expected


def test_a_pending_download_is_an_error_line_saying_so() -> None:
    """A download_failed job exports as an error with code download_failed, not an API answer."""
    error = {"kind": "download", "status": 404, "message": "gone", "code": None}
    job = JobResults("j", {0: event("j", 0, "download_failed", error=error)})
    record = openai_batch_record(job)
    assert record["response"] is None
    assert record["error"] == {"code": "download_failed", "message": "gone"}


def test_export_only_reads_the_ledger(tmp_path: Path) -> None:
    """Exporting leaves the ledger byte for byte as it was, torn last line included."""
    path = write_ledger(tmp_path, event("a", 0, "ok", images=1))
    with path.open("a") as handle:
        handle.write('{"event": "result", "job_id": "b", "chu')
    before = path.read_bytes()
    for format in EXPORT_FORMATS:
        assert exported(tmp_path, format).count("a") >= 1
    assert path.read_bytes() == before
    assert [job.job_id for job in read_jobs(tmp_path)] == ["a"]


def test_a_folder_without_a_ledger_or_a_bad_format_is_refused(tmp_path: Path) -> None:
    """No ledger is a LedgerError before anything is written; a bad format a ConfigError."""
    stream = io.StringIO()
    with pytest.raises(LedgerError, match="nothing has run there yet"):
        export(tmp_path, "csv", stream)
    assert stream.getvalue() == ""
    write_ledger(tmp_path, event("a", 0, "ok", images=1))
    with pytest.raises(ConfigError, match="openai-batch, csv, jsonl"):
        export(tmp_path, "xml", stream)


def test_text_that_cannot_be_utf8_is_still_exported(tmp_path: Path) -> None:
    """A lone surrogate in a revised prompt is escaped in JSON and replaced in CSV."""
    ok = event("a", 0, "ok", images=1)
    ok["images"][0]["revised_prompt"] = "fox \ud800"
    write_ledger(tmp_path, ok)
    for format in EXPORT_FORMATS:
        exported(tmp_path, format).encode("utf-8")
    (line,) = records(tmp_path, "openai-batch")
    assert line["response"]["body"]["data"][0]["revised_prompt"] == "fox \ud800"


def test_control_characters_are_escaped_and_the_metadata_cell_stays_json(tmp_path: Path) -> None:
    """Controls, C1 codes and bidi overrides are \\u escapes in JSON lines (the same values)
    and visible escapes in CSV cells, whose metadata still parses to what was recorded."""
    ok = event("a", 0, "ok", images=1)
    ok["images"][0]["revised_prompt"] = "fox \x1b[2J\u202e"
    ok["metadata"] = {"tag": "\x9b31m \u202e \x07"}
    write_ledger(tmp_path, ok)
    for format in EXPORT_FORMATS:
        text = exported(tmp_path, format)
        assert not any(char in text for char in "\x1b\x9b\u202e\x07"), format
    (line,) = records(tmp_path, "jsonl")
    assert line["metadata"] == ok["metadata"]
    assert line["images"][0]["revised_prompt"] == "fox \x1b[2J\u202e"
    (row,) = list(csv.DictReader(io.StringIO(exported(tmp_path, "csv"))))
    assert row["revised_prompts"] == "fox \\x1b[2J\\u202e"
    assert json.loads(row["metadata"]) == ok["metadata"]


def write_manifest(path: Path, *jobs: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def test_csv_and_jsonl_carry_each_jobs_prompt_from_the_recorded_manifest(tmp_path: Path) -> None:
    """The prompt comes from the manifest the latest run recorded; a job it does not hold has
    none (an empty cell, null), and so does every job once the manifest is gone."""
    manifest = write_manifest(
        tmp_path / "jobs.jsonl",
        {"id": "a", "prompt": 'a fox\nin snow, "quoted"', "model": "dall-e-3"},
        {"id": "b", "prompt": "an owl", "model": "dall-e-3"},
    )
    run = {"event": "run", "run_id": "1", "manifest": str(manifest)}
    write_ledger(tmp_path, run, *(event(j, 0, "ok", images=1) for j in ("a", "b", "gone")))
    prompts = {"a": 'a fox\nin snow, "quoted"', "b": "an owl", "gone": None}
    assert {r["job_id"]: r["prompt"] for r in records(tmp_path, "jsonl")} == prompts
    rows = list(csv.DictReader(io.StringIO(exported(tmp_path, "csv"))))
    assert {row["job_id"]: row["prompt"] for row in rows} == {**prompts, "gone": ""}

    manifest.unlink()
    assert [r["prompt"] for r in records(tmp_path, "jsonl")] == [None, None, None]
    rows = list(csv.DictReader(io.StringIO(exported(tmp_path, "csv"))))
    assert [row["prompt"] for row in rows] == ["", "", ""]


def test_prompts_round_trip_through_the_prompt_file() -> None:
    """Prompts come back by id, a later one for the same id wins, lone surrogates survive."""
    with PromptFile() as prompts:
        prompts.add("a", "a fox")
        prompts.add("b", "an owl \udcff")
        assert prompts.get("a") == "a fox"
        prompts.add("a", "a red fox")
        assert (prompts.get("a"), prompts.get("b"), prompts.get("c")) == (
            "a red fox",
            "an owl \udcff",
            None,
        )
        prompts.clear()
        assert prompts.get("a") is None


class _ClosedPipe(io.StringIO):
    """A stdout whose reader went away: every write fails as a pipe does."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("format", EXPORT_FORMATS)
def test_export_stops_once_its_reader_is_gone(tmp_path: Path, format: str) -> None:
    """Writing into a guarded stream whose reader left ends the export instead of reading the
    rest of the ledger for nobody."""
    write_ledger(tmp_path, *(event(f"j{i}", 0, "ok", images=1) for i in range(50)))
    stream = GuardedStream(_ClosedPipe())
    assert export(tmp_path, format, cast(TextIO, stream)) <= 1
    assert stream.gone


@pytest.mark.parametrize("format", ["csv", "jsonl"])
def test_export_into_a_pipe_closed_early_ends_quietly(tmp_path: Path, format: str) -> None:
    """`cometbatch export … | head -1`: the reader leaves after one line, and the export ends
    with exit 0 (or SIGPIPE's code) and nothing on stderr, no "Broken pipe", no traceback."""
    # Far more than a pipe's buffer holds: the export is still writing when the reader leaves.
    write_ledger(tmp_path, *(event(f"j{i}", 0, "ok", images=1) for i in range(5_000)))
    process = subprocess.Popen(
        [sys.executable, "-m", "cometbatch", "export", str(tmp_path), "--format", format],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    process.stderr.close()
    code = process.wait(timeout=60)
    assert first.startswith(b"job_id," if format == "csv" else b'{"job_id": "j0"')
    assert code in (0, -signal.SIGPIPE)
    assert stderr == b""
