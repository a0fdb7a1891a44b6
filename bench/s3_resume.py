"""Resume on an object store: how long a run takes to open a ledger of 1,000,000 images on S3.

A local S3 server (SeaweedFS on 127.0.0.1, started here) gets a ledger of 500,000 two-image
results written as a run writes it: one segment object per group commit (2,000 lines each),
compacted as it goes. Then a resuming run opens it as the engine does (takes the lock object,
merges the segments into its local copy, loads the per-key index) and the figures are the
seconds that takes, the objects it read and the peak memory. Target: <= 30 s, and a bounded
number of ledger objects (<= 40), however many group commits wrote it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from _common import finish, options, peak_rss_mb, verdict
from ledger_writes import event

from cometbatch.ledger.writer import Ledger
from cometbatch.store.remote import FsspecStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3server import s3_problem, start_s3_server, stop_s3_server

RESULTS = 500_000  # two images each
SMOKE_RESULTS = 2_000
GROUP = 2_000  # lines per group commit (one segment object)
SMOKE_GROUP = 50
TARGET_S = 30.0
TARGET_OBJECTS = 40


def write_ledger(store: FsspecStore, results: int, group: int) -> tuple[float, int, int]:
    """Append `results` lines in group commits; (seconds, segments written, bytes)."""
    log = store.open_log("ledger.jsonl", sync=False)
    started = time.perf_counter()
    written = segments = 0
    try:
        log.append(json.dumps({"event": "run", "run_id": "0123456789ab"}).encode() + b"\n", False)
        for first in range(0, results, group):
            data = "".join(
                json.dumps(event(n), separators=(",", ":")) + "\n"
                for n in range(first, min(first + group, results))
            ).encode()
            log.append(data, False)
            written += len(data)
            segments += 1
    finally:
        log.close(False)
    return time.perf_counter() - started, segments, written


async def open_ledger(url: str, storage: dict[str, object]) -> tuple[float, int, int]:
    """Open the ledger as a resuming run does; (seconds, objects it holds, keys loaded)."""
    store = FsspecStore.from_url(url, {**storage, "skip_instance_cache": True})
    started = time.perf_counter()
    async with Ledger(url, store=store) as ledger:
        seconds = time.perf_counter() - started
        objects = len(store.names("ledger"))
        keys = len(ledger.state)
    return seconds, objects, keys


def main() -> None:
    opts = options(__doc__.splitlines()[0] if __doc__ else "s3 resume", runs=1)
    results = SMOKE_RESULTS if opts.smoke else RESULTS
    group = SMOKE_GROUP if opts.smoke else GROUP
    problem = s3_problem()
    if problem is not None:
        print(f"skipped: {problem} (target <= {TARGET_S:g} s not measured)")
        return
    import s3fs

    server = start_s3_server()
    try:
        storage: dict[str, object] = dict(server.storage_options)
        s3fs.S3FileSystem(skip_instance_cache=True, **storage).mkdir("bench")
        url = "s3://bench/resume"
        store = FsspecStore.from_url(url, {**storage, "skip_instance_cache": True})
        seconds, segments, size = write_ledger(store, results, group)
        print(
            f"wrote {results:,} results ({2 * results:,} images, {size / 1e6:.0f} MB) in "
            f"{segments} group commits: {seconds:.1f} s, {results / seconds:,.0f} lines/s"
        )
        met = True
        for run in range(1, opts.runs + 1):
            opened, objects, keys = asyncio.run(open_ledger(url, storage))
            print(
                f"run {run}: resume opened {keys:,} keys from {objects} objects in {opened:.2f} s"
            )
            met &= verdict("resume start", opened, TARGET_S, higher_is_better=False, unit=" s")
            met &= verdict(
                "ledger objects", objects, TARGET_OBJECTS, higher_is_better=False, unit=""
            )
            started = time.perf_counter()
            store.log_copy("ledger.jsonl")
            print(
                f"  of which the merge of its objects into a local copy: "
                f"{time.perf_counter() - started:.2f} s"
            )
        print(f"peak memory of this process: {peak_rss_mb():.0f} MB")
    finally:
        stop_s3_server(server)
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main()
