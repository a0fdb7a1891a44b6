"""The baseline the engine is measured against: a minimal hand-written aiohttp loop.

It does the same work per request as cometbatch (send, decode the base64 image, hash it,
write it atomically under OUT/images/<job_id>/<k>.png, append one JSON line to a ledger) and
nothing else: no retries, no limiter, no resume, no validation. Files are written the way a
careful asyncio script would: the whole temp-write-and-rename in one worker-thread call.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp


def _write_atomic(folder: Path, final: Path, data: bytes) -> str:
    """Hash, write a temp file in the final folder, os.replace it onto the final name."""
    digest = hashlib.sha256(data).hexdigest()
    os.makedirs(folder, exist_ok=True)
    temp = folder / f".{final.name}.tmp"
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, final)
    return digest


async def raw_loop(
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
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=max(100, 2 * concurrency))
    ledger = await asyncio.to_thread(open, out_dir / "ledger.jsonl", "ab")
    try:
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(job_id: str, payload: dict[str, Any]) -> None:
                async with gate:
                    async with session.post(url, json=payload, headers=headers) as resp:
                        resp.raise_for_status()
                        body = await resp.json()
                    images = []
                    for index, item in enumerate(body["data"]):
                        data = await _decode(item["b64_json"])
                        folder = out_dir / "images" / job_id
                        path = folder / f"{index}.png"
                        digest = await asyncio.to_thread(_write_atomic, folder, path, data)
                        images.append(
                            {
                                "index": index,
                                "path": path.relative_to(out_dir).as_posix(),
                                "bytes": len(data),
                                "sha256": digest,
                            }
                        )
                    line = {"event": "result", "job_id": job_id, "status": "ok", "images": images}
                    # A short append to a local file: written and flushed on the loop itself.
                    ledger.write(json.dumps(line).encode() + b"\n")
                    ledger.flush()

            async with asyncio.TaskGroup() as group:
                for job_id, payload in jobs:
                    group.create_task(one(job_id, payload))
    finally:
        ledger.close()
    return time.perf_counter() - started


async def _decode(b64: str) -> bytes:
    """Base64 to bytes; large payloads off the event loop (as any careful script would)."""
    if len(b64) >= 512 * 1024:
        return await asyncio.to_thread(base64.b64decode, b64)
    return base64.b64decode(b64)
