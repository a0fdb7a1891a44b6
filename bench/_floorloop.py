"""The contract floor: the lean loop plus only what the ledger and output contracts require.

Per request, beyond the lean loop (bench/_leanloop.py): a `sent` line flushed before the
request leaves, the image checked whole (cometbatch's own checker), a result line with every
field the ledger contract names, and metadata.jsonl at the end. Nothing else cometbatch does
is here: no limiter, no resume index, no retries, no run lock, no progress display, no summary.
It shows how close to the lean loop any tool keeping those contracts can get. Run as a script
it is a whole process: `python bench/_floorloop.py MANIFEST OUT URL CONCURRENCY`.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from _leanloop import read_manifest

from cometbatch.store.imagecheck import check_image

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ANSWER_FIELDS = ("created", "size", "quality", "output_format", "background")


def _now() -> str:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _line(event: dict[str, Any]) -> bytes:
    return (_ENCODER.encode(event) + "\n").encode()


async def floor_loop(
    base_url: str,
    api_key: str,
    jobs: Sequence[tuple[str, dict[str, Any]]],
    out_dir: Path,
    concurrency: int,
) -> float:
    """Send every (job_id, payload) with at most `concurrency` in flight; return the seconds."""
    url = f"{base_url.rstrip('/')}/images/generations"
    headers = {"Authorization": f"Bearer {api_key}"}
    gate = asyncio.Semaphore(concurrency)
    run_id = os.urandom(6).hex()
    loop = asyncio.get_running_loop()
    rows: list[dict[str, Any]] = []
    # Blocking file calls on the loop, as in the lean loop.
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=max(100, 2 * concurrency))
    with open(out_dir / "ledger.jsonl", "ab") as ledger:  # noqa: ASYNC230
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(job_id: str, payload: dict[str, Any]) -> None:
                async with gate:
                    key = f"{job_id}#0"
                    fingerprint = hashlib.sha256(_ENCODER.encode(payload).encode()).hexdigest()
                    sent = {"event": "sent", "run_id": run_id, "key": key, "attempt": 1, "n": 1}
                    ledger.write(_line({**sent, "sent_at": _now()}))
                    ledger.flush()
                    asked = loop.time()
                    async with session.post(url, json=payload, headers=headers) as resp:
                        resp.raise_for_status()
                        body = await resp.json()
                        request_id = resp.headers.get("x-request-id")
                    folder = out_dir / "images" / job_id
                    os.makedirs(folder, exist_ok=True)
                    images = []
                    for index, item in enumerate(body["data"]):
                        data = base64.b64decode(item["b64_json"])
                        fmt = check_image(data)
                        path = f"images/{job_id}/{index}.{fmt}"
                        final = out_dir / path
                        temp = folder / f".{index}.{fmt}.tmp"
                        with open(temp, "wb") as handle:  # noqa: ASYNC230
                            handle.write(data)
                        os.replace(temp, final)
                        digest = hashlib.sha256(data).hexdigest()
                        revised = item.get("revised_prompt")
                        images.append(
                            {"index": index, "path": path, "format": fmt, "bytes": len(data)}
                            | {"sha256": digest, "revised_prompt": revised}
                        )
                        rows.append(
                            {"file_name": path, "prompt": payload["prompt"], "job_id": job_id}
                            | {"model": payload["model"], "index": index, "sha256": digest}
                        )
                    result = {
                        "event": "result", "run_id": run_id, "key": key, "job_id": job_id,
                        "chunk": 0, "status": "ok", "fingerprint": fingerprint[:16],
                        "model": payload["model"], "n": 1, "images": images, "downloads": [],
                        "attempts": 1, "ambiguous_retries": 0, "rate_limited": 0,
                        "error": None, "latency_s": round(loop.time() - asked, 3),
                        "finished_at": _now(), "usage": body.get("usage"),
                        "response": {name: body.get(name) for name in _ANSWER_FIELDS},
                        "request_id": request_id, "metadata": {},
                    }  # fmt: skip
                    ledger.write(_line(result))
                    ledger.flush()

            async with asyncio.TaskGroup() as group:
                for job_id, payload in jobs:
                    group.create_task(one(job_id, payload))
    with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as metadata:  # noqa: ASYNC230
        metadata.writelines(json.dumps(row) + "\n" for row in rows)
    return time.perf_counter() - started


def main(argv: Sequence[str]) -> None:
    manifest, out, base_url, concurrency = argv
    key = os.environ.get("COMETAPI_KEY", "sk-bench")
    jobs = read_manifest(Path(manifest))
    asyncio.run(floor_loop(base_url, key, jobs, Path(out), int(concurrency)))


if __name__ == "__main__":
    main(sys.argv[1:])
