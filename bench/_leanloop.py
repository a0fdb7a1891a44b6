"""The lean baseline: a hand-written aiohttp loop that writes every file on the event loop.

Per request it POSTs, parses the JSON, base64-decodes each image, hashes it, writes it with a
plain write + os.replace on the loop itself (no thread trip) and appends one ledger line:
the least a script can do and still leave the same files behind. Run as a script it is a
whole process, as a user would run it: `python bench/_leanloop.py MANIFEST OUT URL CONCURRENCY`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp


async def lean_loop(
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
    # Blocking file calls on the loop are this baseline's point: that is what scripts do.
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=max(100, 2 * concurrency))
    with open(out_dir / "ledger.jsonl", "ab") as ledger:  # noqa: ASYNC230
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(job_id: str, payload: dict[str, Any]) -> None:
                async with gate:
                    async with session.post(url, json=payload, headers=headers) as resp:
                        resp.raise_for_status()
                        body = await resp.json()
                    folder = out_dir / "images" / job_id
                    os.makedirs(folder, exist_ok=True)
                    images = []
                    for index, item in enumerate(body["data"]):
                        data = base64.b64decode(item["b64_json"])
                        final = folder / f"{index}.png"
                        temp = folder / f".{index}.png.tmp"
                        with open(temp, "wb") as handle:  # noqa: ASYNC230
                            handle.write(data)
                        os.replace(temp, final)
                        images.append(
                            {
                                "index": index,
                                "path": f"images/{job_id}/{index}.png",
                                "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest(),
                            }
                        )
                    line = {"event": "result", "job_id": job_id, "status": "ok", "images": images}
                    ledger.write(json.dumps(line).encode() + b"\n")
                    ledger.flush()

            async with asyncio.TaskGroup() as group:
                for job_id, payload in jobs:
                    group.create_task(one(job_id, payload))
    return time.perf_counter() - started


def read_manifest(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(id, request body) per JSONL line: the id is not sent."""
    jobs = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                fields = json.loads(line)
                jobs.append((fields.pop("id"), fields))
    return jobs


def main(argv: Sequence[str]) -> None:
    manifest, out, base_url, concurrency = argv
    key = os.environ.get("COMETAPI_KEY", "sk-bench")
    jobs = read_manifest(Path(manifest))
    asyncio.run(lean_loop(base_url, key, jobs, Path(out), int(concurrency)))


if __name__ == "__main__":
    main(sys.argv[1:])
