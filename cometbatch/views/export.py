"""An output folder's results as one line per job: OpenAI Batch API output, CSV or JSONL.

The ledger is read, never written (safe while a run appends to it). A job with more images than
its model takes per request has several requests (keys `<job_id>#<chunk>`); the latest result
of each request wins and a job's requests are merged into one line. Jobs come out in the order
their last result was recorded. The ledger knows only the requests it has recorded: a job whose
later requests were never sent (an interrupted run) shows just the ones that were. A job whose
n was lowered in the manifest the latest run names shows only the images that manifest asks
for (the requests and indexes past the new n are left out).

Job statuses: `ok` (every recorded request ok), `download_failed` (generated, some images still
to download: `cometbatch fetch`), `partial` (some images were written: a request failed, or
answered short and its rest is still to be asked for), `failed` (no image written).

`openai-batch`, one line per job in the shape of OpenAI's Batch API output file:

    {"id": "batch_req_<24 hex>", "custom_id": "<job id>",
     "response": {"status_code": 200, "request_id": "<the API's request id>",
                  "body": {"created": <unix time>, "data": [{"url": "images/<job>/0.png",
                           "revised_prompt": "..."}], "size": "1024x1024", ...,
                           "usage": {...}}},
     "error": null}

`url` is the image file's path relative to the output folder (a relative URL reference), not a
link; `revised_prompt` and `usage` appear when the API gave them. `request_id`, `created` and
the answer's `size`, `quality`, `output_format` and `background` are those the ledger recorded
for the job's first request that has them (a job of several requests had several answers);
`request_id` is null and `created` the time its result was recorded when the ledger has none
(written before answers were kept, or an API that sent none). A job that failed on an API
error answer carries that answer as OpenAI does, `"response": {"status_code": 400,
"request_id": "...", "body": {"error": {"message", "type", "param", "code"}}}, "error": null`;
a failure with no API answer (connection, timeout, download, bad image) has `"response": null,
"error": {"code", "message"}`. Failed and partial jobs list no images in this format.

`csv`: a header row, then one row per job with the columns in `CSV_COLUMNS`; `image_paths`
are separated by spaces, `revised_prompts` by newlines, `metadata` is a JSON object.

`jsonl`: one object per job with its prompt, every image record, pending downloads, the first
error (with its `chunk`), the request ids of its answers (in request order), summed usage,
attempts, and metadata. `csv`'s `request_id` is the first error's, or for a job without an
error, its first answer's.

`prompt` (csv and jsonl) is the job's prompt in the manifest the latest run recorded, as that
file reads now: empty (null) when it is gone or unreadable, or does not hold the job.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from ..errors import CometBatchError, ConfigError, LedgerError
from ..ledger.events import LEDGER_NAME, iter_events
from ..net.answered import Answered
from ..results import add_usage
from ..streams import stream_gone
from ..textsafe import printable, safe_json
from .prompts import PromptFile
from .scope import Scope
from .status import recorded_manifest

__all__ = [
    "CSV_COLUMNS",
    "EXPORT_FORMATS",
    "JobResults",
    "csv_row",
    "export",
    "jsonl_record",
    "openai_batch_record",
    "read_jobs",
]

EXPORT_FORMATS = ("openai-batch", "csv", "jsonl")

CSV_COLUMNS = (
    "job_id",
    "status",
    "model",
    "n",
    "images",
    "requests",
    "image_paths",
    "prompt",
    "revised_prompts",
    "error_kind",
    "error_status",
    "error_code",
    "error_message",
    "request_id",
    "pending_downloads",
    "attempts",
    "ambiguous_retries",
    "input_tokens",
    "output_tokens",
    "finished_at",
    "metadata",
)

OK = "ok"
FAILED = "failed"
PARTIAL = "partial"
DOWNLOAD_FAILED = "download_failed"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(slots=True)
class JobResults:
    """One job as the ledger has it now: the latest result event of each of its requests."""

    job_id: str
    requests: dict[int, dict[str, Any]]
    # From the manifest the latest run recorded: None when it is gone or does not hold the job.
    prompt: str | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        """The latest result of each request, in chunk order."""
        return [self.requests[chunk] for chunk in sorted(self.requests)]

    @property
    def model(self) -> str | None:
        model = self.events[0].get("model")
        return model if isinstance(model, str) else None

    @property
    def n(self) -> int:
        """Images asked for across the recorded requests."""
        return sum(_count(event.get("n")) for event in self.events)

    @property
    def images(self) -> list[dict[str, Any]]:
        """Every image on disk, by index."""
        found = [
            image
            for event in self.events
            for image in event.get("images") or ()
            if isinstance(image, dict)
        ]
        return sorted(found, key=lambda image: _count(image.get("index")))

    @property
    def downloads(self) -> list[dict[str, Any]]:
        """Generated images still to be downloaded."""
        return [
            pending
            for event in self.events
            for pending in event.get("downloads") or ()
            if isinstance(pending, dict)
        ]

    @property
    def status(self) -> str:
        statuses = {event.get("status") for event in self.events}
        if statuses == {OK}:
            return OK
        if statuses <= {OK, DOWNLOAD_FAILED}:
            return DOWNLOAD_FAILED
        return PARTIAL if self.images else FAILED

    @property
    def failed_requests(self) -> int:
        return sum(event.get("status") != OK for event in self.events)

    @property
    def error(self) -> dict[str, Any] | None:
        """The first request's error that is not ok, with its `chunk`."""
        for chunk in sorted(self.requests):
            event = self.requests[chunk]
            if event.get("status") != OK:
                error = event.get("error")
                found = dict(error) if isinstance(error, dict) else _no_error(event)
                return {**found, "chunk": chunk}
        return None

    @property
    def usage(self) -> dict[str, Any] | None:
        """Token usage summed over the requests that reported it."""
        total: dict[str, Any] = {}
        for event in self.events:
            usage = event.get("usage")
            if isinstance(usage, dict):
                add_usage(total, usage)
        return total or None

    @property
    def answers(self) -> list[Answered]:
        """What each request's answer said about itself (request id, created, size, ...), in
        chunk order; empty where its line recorded none."""
        return [Answered.of_line(event) for event in self.events]

    @property
    def request_ids(self) -> list[str]:
        """The request ids of the answers the ledger recorded, in chunk order."""
        return [answer.request_id for answer in self.answers if answer.request_id is not None]

    @property
    def finished_at(self) -> str | None:
        stamps = [event["finished_at"] for event in self.events if event.get("finished_at")]
        return max(map(str, stamps), default=None)

    @property
    def created(self) -> int | None:
        """finished_at as Unix seconds (the `created` of an API answer)."""
        stamp = self.finished_at
        try:
            return int(datetime.fromisoformat(stamp).timestamp()) if stamp else None
        except ValueError:
            return None

    @property
    def metadata(self) -> dict[str, Any]:
        metadata = self.events[-1].get("metadata")
        return metadata if isinstance(metadata, dict) else {}

    def total(self, name: str) -> int:
        """A per-request count (attempts, ambiguous_retries) summed over the requests."""
        return sum(_count(event.get(name)) for event in self.events)

    @property
    def latency_s(self) -> float:
        values = (event.get("latency_s") for event in self.events)
        total = sum(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))
        return round(total, 3)


def _no_error(event: dict[str, Any]) -> dict[str, Any]:
    """What a line that is not ok and records no error stands for."""
    if event.get("status") != PARTIAL:
        return {"kind": "unknown"}
    # A short answer recorded before its rest was asked for (the run stopped in between).
    written = len(event.get("images") or ())
    return {
        "kind": PARTIAL,
        "message": f"{written} of {_count(event.get('n'))} image(s) so far; the next run asks "
        "for the rest",
    }


def _where(event: dict[str, Any]) -> tuple[str, int] | None:
    """A result event's job id and chunk (from the key if the fields are missing)."""
    job_id, chunk = event.get("job_id"), event.get("chunk")
    if isinstance(job_id, str) and isinstance(chunk, int) and not isinstance(chunk, bool):
        return job_id, chunk
    key = event.get("key")
    if isinstance(key, str) and "#" in key:
        head, _, tail = key.rpartition("#")
        if tail.isdigit():
            return head, int(tail)
    return None


def read_jobs(out_dir: str | os.PathLike[str]) -> Iterator[JobResults]:
    """Each job of OUT's ledger with the latest result of each of its requests.

    Two passes over the ledger keep memory to the jobs whose requests are not all read yet,
    not the whole ledger: the first notes each job's last result line, the second emits a job
    on reaching it. Lines appended between the passes are left for the next export.
    """
    path = Path(out_dir) / LEDGER_NAME
    if not path.is_file():
        raise LedgerError(f"{out_dir} has no {LEDGER_NAME}: nothing has run there yet")
    return _merged_jobs(path)


def _merged_jobs(path: Path) -> Iterator[JobResults]:
    last: dict[str, int] = {}
    run: dict[str, Any] = {}
    end = 0
    for lineno, event in iter_events(path):
        end = lineno
        kind = event.get("event")
        where = _where(event) if kind == "result" else None
        if where is not None:
            last[where[0]] = lineno
        elif kind == "run" and event.get("manifest"):
            run = event
    with PromptFile() as prompts:
        scope = _read_manifest(run, set(last), prompts)
        pending: dict[str, dict[int, dict[str, Any]]] = {}
        for lineno, event in iter_events(path):
            if lineno > end:
                break
            where = _where(event) if event.get("event") == "result" else None
            if where is None:
                continue
            job_id, chunk = where
            kept = _within(event, job_id, chunk, scope)
            if kept is not None:
                pending.setdefault(job_id, {})[chunk] = kept
            if last.get(job_id) == lineno and job_id in pending:
                yield JobResults(job_id, pending.pop(job_id), prompts.get(job_id))
        # Only when the ledger changed between the passes (it was repaired or replaced).
        for job_id, requests in pending.items():
            yield JobResults(job_id, requests, prompts.get(job_id))


def _read_manifest(run: dict[str, Any], recorded: set[str], prompts: PromptFile) -> Scope:
    """In one pass over the manifest the latest run names: what it still asks of the recorded
    jobs, and their prompts (into `prompts`). When it cannot be read, everything recorded
    counts and no prompt is known."""
    scope = Scope()
    if not isinstance(run.get("manifest"), str):
        return scope
    try:
        manifest = recorded_manifest(run, run["manifest"])
        for job in manifest:
            if job.id in recorded:
                scope.add(job, manifest.registry.get(job.model).max_n)
                prompts.add(job.id, job.prompt)
    except (CometBatchError, OSError):
        prompts.clear()
        return Scope()
    return scope


def _within(event: dict[str, Any], job_id: str, chunk: int, scope: Scope) -> dict[str, Any] | None:
    """A result line as far as the manifest still asks for it (None: not at all), after a
    job's n was lowered: its n and its images cut to the new n."""
    n = _count(event.get("n"))
    counted = scope.images(job_id, chunk, n)
    if counted is None or counted == n:
        return None if counted is None else event

    def kept(items: Any) -> list[Any]:
        return [
            item
            for item in items or ()
            if not isinstance(item, dict) or scope.keeps_index(job_id, _count(item.get("index")))
        ]

    return {**event, "n": counted, "images": kept(event.get("images")),
            "downloads": kept(event.get("downloads"))}  # fmt: skip


def _batch_id(job_id: str) -> str:
    digest = hashlib.blake2b(job_id.encode("utf-8", "surrogatepass"), digest_size=12)
    return f"batch_req_{digest.hexdigest()}"


def openai_batch_record(job: JobResults) -> dict[str, Any]:
    """The job as one line of an OpenAI Batch API output file (see the module docstring)."""
    record: dict[str, Any] = {"id": _batch_id(job.job_id), "custom_id": job.job_id}
    error = job.error
    if error is None:
        data = []
        for image in job.images:
            item = {"url": image.get("path")}
            if image.get("revised_prompt") is not None:
                item["revised_prompt"] = image["revised_prompt"]
            data.append(item)
        # One answer describes the job: the first (by chunk) that recorded anything, so that
        # its request id and its fields never come from two different answers.
        first = next((a for a in job.answers if a.response or a.request_id is not None), None)
        response = first.response if first is not None else {}
        body: dict[str, Any] = {"created": response.get("created", job.created), "data": data}
        body.update((name, value) for name, value in response.items() if name != "created")
        if job.usage is not None:
            body["usage"] = job.usage
        request_id = first.request_id if first is not None else None
        record["response"] = {"status_code": 200, "request_id": request_id, "body": body}
        record["error"] = None
        return record
    status = error.get("status")
    answered = (
        job.status != DOWNLOAD_FAILED
        and isinstance(status, int)
        and not isinstance(status, bool)
        and error.get("kind") != "download"
    )
    if answered:
        body = {
            "error": {
                "message": error.get("message"),
                "type": error.get("kind"),
                "param": None,
                "code": error.get("code"),
            }
        }
        record["response"] = {
            "status_code": status,
            "request_id": error.get("request_id"),
            "body": body,
        }
        record["error"] = None
    else:
        code = DOWNLOAD_FAILED if job.status == DOWNLOAD_FAILED else error.get("kind")
        record["response"] = None
        record["error"] = {"code": error.get("code") or code, "message": error.get("message")}
    return record


def jsonl_record(job: JobResults) -> dict[str, Any]:
    """The job as one flat JSON object (every image record, the first error, summed usage)."""
    return {
        "job_id": job.job_id,
        "status": job.status,
        "model": job.model,
        "prompt": job.prompt,
        "n": job.n,
        "requests": len(job.requests),
        "failed_requests": job.failed_requests,
        "images": job.images,
        "downloads": job.downloads,
        "error": job.error,
        "request_ids": job.request_ids,
        "attempts": job.total("attempts"),
        "ambiguous_retries": job.total("ambiguous_retries"),
        "latency_s": job.latency_s,
        "finished_at": job.finished_at,
        "usage": job.usage,
        "metadata": job.metadata,
    }


def _cell(value: Any) -> str:
    """A CSV cell: controls, bidi overrides and lone surrogates (server text is data, and a
    table is read on screens) shown as escapes; line breaks kept."""
    if value is None:
        return ""
    return printable(value if isinstance(value, str) else str(value), newlines=True)


def csv_row(job: JobResults) -> list[str]:
    """The job as one CSV row, in CSV_COLUMNS order."""
    images = job.images
    error = job.error or {}
    usage = job.usage or {}
    revised = [str(image["revised_prompt"]) for image in images if image.get("revised_prompt")]
    values: dict[str, Any] = {
        "job_id": job.job_id,
        "status": job.status,
        "model": job.model,
        "n": job.n,
        "images": len(images),
        "requests": len(job.requests),
        "image_paths": " ".join(str(image.get("path")) for image in images),
        "prompt": job.prompt,
        "revised_prompts": "\n".join(revised),
        "error_kind": error.get("kind"),
        "error_status": error.get("status"),
        "error_code": error.get("code"),
        "error_message": error.get("message"),
        # The failure's own request id; for a job without one, its first answer's.
        "request_id": error.get("request_id") if error else next(iter(job.request_ids), None),
        "pending_downloads": len(job.downloads),
        "attempts": job.total("attempts"),
        "ambiguous_retries": job.total("ambiguous_retries"),
        "input_tokens": usage.get("input_tokens"),
        "output_tokens": usage.get("output_tokens"),
        "finished_at": job.finished_at,
        # As \u escapes, so that the cell stays JSON when _cell shows the rest escaped.
        "metadata": safe_json(json.dumps(job.metadata, ensure_ascii=False)) if job.metadata else "",
    }
    return [_cell(values[column]) for column in CSV_COLUMNS]


def _json_line(record: dict[str, Any]) -> str:
    # Controls and lone surrogates as \u escapes: the same values, and valid UTF-8.
    return safe_json(json.dumps(record, ensure_ascii=False)) + "\n"


def export(out_dir: str | os.PathLike[str], format: str, stream: TextIO) -> int:
    """Write one line per job of OUT's ledger to `stream` in `format` (EXPORT_FORMATS);
    returns the number of jobs written. Opens no file for writing; reads the ledger only.
    Stops early when `stream` is a guarded stream whose reader went away (`| head`)."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; formats: {', '.join(EXPORT_FORMATS)}")
    jobs = read_jobs(out_dir)
    count = 0
    if format == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for job in jobs:
            if stream_gone(stream):
                break
            writer.writerow(csv_row(job))
            count += 1
        return count
    make = openai_batch_record if format == "openai-batch" else jsonl_record
    for job in jobs:
        if stream_gone(stream):
            break
        stream.write(_json_line(make(job)))
        count += 1
    return count
