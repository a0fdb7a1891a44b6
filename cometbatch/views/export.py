"""An output folder's results as one line per job: OpenAI Batch API output, CSV or JSONL."""

# The ledger is read, never written (safe while a run appends to it); jobs come merged from
# jobresults. Job statuses: ok (every recorded request ok), download_failed (images still to
# download: `cometbatch fetch`), partial (some images written), failed (none written).
# `prompt` (csv, jsonl) is the job's prompt in the manifest the latest run recorded, as that
# file reads now (null when it is gone or does not hold the job).

from __future__ import annotations

import csv
import hashlib
import json
import os
from typing import Any, TextIO

from ..errors import ConfigError
from ..results import DOWNLOAD_FAILED
from ..store.interface import Store
from ..streams import stream_gone
from ..textsafe import printable, safe_json
from . import EXPORT_FORMATS
from .jobresults import JobResults, read_jobs

__all__ = [
    "CSV_COLUMNS",
    "csv_row",
    "export",
    "jsonl_record",
    "openai_batch_record",
]


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


def _batch_id(job_id: str) -> str:
    digest = hashlib.blake2b(job_id.encode("utf-8", "surrogatepass"), digest_size=12)
    return f"batch_req_{digest.hexdigest()}"


def openai_batch_record(job: JobResults) -> dict[str, Any]:
    """The job as one line of an OpenAI Batch API output file."""
    # `url` is the image's path relative to OUT, not a link. An answer's request_id, created
    # and fields are those of the job's first request that recorded any (request_id null and
    # created its finish time when none did). A failure with an API answer carries it as
    # OpenAI does (status_code, body.error); one without (connection, timeout, download, bad
    # image) has `"response": null, "error": {"code", "message"}`. Failures list no images.
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
    """A CSV cell: controls, bidi overrides and lone surrogates as escapes, line breaks kept."""
    # Server text is data, and a table is read on screens.
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


def export(out_dir: Store | str | os.PathLike[str], format: str, stream: TextIO) -> int:
    """Write one line per job of OUT's ledger to `stream` in `format`; how many it wrote."""
    # Reads the ledger only; stops early when `stream`'s reader went away (`| head`).
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
