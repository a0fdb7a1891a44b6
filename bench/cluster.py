"""Cluster: images/s with 1, 2 and 4 Ray workers on a CPU-bound case, and pacing at a shared limit.

Each figure is one whole `python -m cometbatch run M --out DIR --base-url SIM --ray
--ray-address ADDR --workers N --json` process against the simulator (in its own process),
on a Ray head this script starts on 127.0.0.1 (the test suite's, with 4 CPUs) unless
`--ray-address` names a cluster to use.

- Throughput: 2 MB PNGs as base64, zero latency, so decoding, checking, hashing and writing
  bound the run (about 67 images/s on 2 cores in one process). Shown: images/s over the
  process's wall time (Ray start-up included) and over its working span (first send to last
  result, from the shards' ledgers), and each worker count's speed-up over one worker. No
  target: more workers than cores cannot go faster, so the figure is for the machine it ran on.
- Pacing: small pictures, 0.5 s latency, the simulator allowing LIMIT requests a minute and the
  run given `--rpm LIMIT` over 3 workers for `--seconds` of load. Targets (the issue's
  acceptance): zero 429s caused by the limit, and the busiest 60 s window of sends (from the
  `sent` lines of every shard's ledger) at least 0.9 x LIMIT.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import finish, median, settle, simulator_process, verdict

from cometbatch import SimConfig

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
KEY = "sk-bench"
MODEL = "gpt-image-1"
WORKERS = (1, 2, 4)
SMOKE_WORKERS = (1, 2)
BIG_BYTES = 2 * 1024 * 1024
IMAGES = 600
SMOKE_IMAGES = 8
CONCURRENCY = 32
LIMIT = 1_200  # requests a minute, at the server and given to the run
PACING_WORKERS = 3
PACING_CONCURRENCY = 16
LATENCY = 0.5
SECONDS = 120.0
SMOKE_SECONDS = 6.0
WINDOW = 60.0
TARGET_SHARE = 0.9
RAY_CPUS = 4


def write_manifest(path: Path, count: int, prefix: str) -> Path:
    """`count` single-image jobs, one per line."""
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            handle.write(json.dumps({"id": f"{prefix}{i:06d}", "prompt": f"still life {i}"}) + "\n")
    return path


def has_ray_option() -> bool:
    """Whether this cometbatch's `run` takes --ray (the cluster extra's command line)."""
    done = subprocess.run(
        [sys.executable, "-m", "cometbatch", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return "--ray" in done.stdout


@contextmanager
def ray_cluster(address: str | None) -> Iterator[dict[str, str]]:
    """The environment that points a driver at a Ray cluster: the one at `address`, else a
    head started here on 127.0.0.1 (the test suite's) and stopped afterwards."""
    if address:
        yield {"RAY_ADDRESS": address}
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from rayserver import running_ray_cluster

    # The nodes' workers read the key, and import this checkout, from their own environment.
    os.environ["COMETAPI_KEY"] = KEY
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    with running_ray_cluster(nodes=1, num_cpus=RAY_CPUS) as cluster:
        yield cluster.env


def run_cluster(
    manifest: Path, out: Path, base_url: str, env: dict[str, str], workers: int, *extra: str
) -> tuple[float, dict[str, Any]]:
    """One `cometbatch run --ray` process: its wall seconds and its --json summary."""
    command = [
        *(sys.executable, "-m", "cometbatch", "run", str(manifest), "--out", str(out)),
        *("--base-url", base_url, "--model", MODEL, "--ray", "--workers", str(workers)),
        *("--ray-address", env["RAY_ADDRESS"], "--json", *extra),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=out.parent, env=env)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"cometbatch run --ray exited {done.returncode}:\n{done.stderr[-3000:]}")
    return took, json.loads(done.stdout)


def ledger_times(out: Path) -> tuple[list[float], list[float]]:
    """Every shard's send times and result times (seconds since the epoch), each sorted."""
    sent: list[float] = []
    finished: list[float] = []
    for ledger in sorted(out.glob("shards/*/ledger.jsonl")):
        for line in ledger.read_text(encoding="utf-8").splitlines():
            event = json.loads(line) if line.strip() else {}
            if event.get("event") == "sent" and event.get("sent_at"):
                sent.append(datetime.fromisoformat(event["sent_at"]).timestamp())
            elif event.get("event") == "result" and event.get("finished_at"):
                finished.append(datetime.fromisoformat(event["finished_at"]).timestamp())
    return sorted(sent), sorted(finished)


def busiest_window(times: list[float], span: float = WINDOW) -> int:
    """The most sends in any window [t, t + span) that starts at a send."""
    return max((bisect.bisect_left(times, t + span) - k for k, t in enumerate(times)), default=0)


def throughput(
    tmp: Path, env: dict[str, str], smoke: bool, runs: int
) -> dict[int, tuple[float, float]]:
    """Median images/s (wall, working span) per worker count, 2 MB images at zero latency."""
    count = SMOKE_IMAGES if smoke else IMAGES
    workers = SMOKE_WORKERS if smoke else WORKERS
    manifest = write_manifest(tmp / "big.jsonl", count, "big-")
    config = SimConfig(seed=1, payload_bytes=BIG_BYTES, record_requests=False)
    print(f"throughput: {count} images of ~2 MB, concurrency {CONCURRENCY}, zero latency")
    figures: dict[int, tuple[float, float]] = {}
    with simulator_process(config) as sim:
        for n in workers:
            walls: list[float] = []
            spans: list[float] = []
            for run in range(1, runs + 1):
                out = tmp / f"big-{n}-{run}"
                took, summary = run_cluster(
                    manifest, out, sim.base_url, env, n, "--concurrency", str(CONCURRENCY)
                )
                written = summary.get("images_written")
                if written != count:
                    raise SystemExit(f"{out}: {written} images written for {count} jobs")
                sent, finished = ledger_times(out)
                span = finished[-1] - sent[0] if sent and finished else took
                walls.append(count / took)
                spans.append(count / span)
                cluster = summary.get("cluster", {})
                print(
                    f"  run {run}, {n} worker(s): {count / took:6.1f} images/s wall "
                    f"({took:5.1f} s), {count / span:6.1f} images/s working, "
                    f"cluster {cluster}"
                )
                settle(out)
            figures[n] = (median(walls), median(spans))
    return figures


def pacing(tmp: Path, env: dict[str, str], smoke: bool) -> tuple[int, int, float]:
    """(limit 429s, busiest 60 s window of sends, seconds) of one run at the shared limit."""
    seconds = SMOKE_SECONDS if smoke else SECONDS
    count = round(LIMIT / WINDOW * seconds)
    manifest = write_manifest(tmp / "paced.jsonl", count, "paced-")
    config = SimConfig(seed=2, latency=LATENCY, rpm_limit=LIMIT, record_requests=False)
    print(
        f"pacing: {count} requests, --rpm {LIMIT} (the server's limit), "
        f"{PACING_WORKERS} workers, concurrency {PACING_CONCURRENCY}, latency {LATENCY} s"
    )
    with simulator_process(config) as sim:
        out = tmp / "paced"
        took, summary = run_cluster(
            manifest, out, sim.base_url, env, PACING_WORKERS,
            *("--rpm", str(LIMIT), "--concurrency", str(PACING_CONCURRENCY)),
        )  # fmt: skip
        limit_429s = sim.stats.limit_429s
    sent, _ = ledger_times(out)
    busiest = busiest_window(sent)
    print(
        f"  {len(sent)} sends in {took:.1f} s; busiest 60 s window {busiest} "
        f"({busiest / LIMIT:.3f} x the limit); 429s from the limit {limit_429s}; "
        f"summary rate_limited {summary.get('rate_limited')}, cluster {summary.get('cluster')}"
    )
    return limit_429s, busiest, took


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script")
    parser.add_argument("--runs", type=int, default=1, help="runs to take the median of")
    parser.add_argument("--ray-address", help="a running Ray cluster to use (else one is started)")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if not has_ray_option():
        # The cluster command line comes with the cluster part of the package.
        print("this cometbatch's `run` has no --ray: nothing measured (target: not checked)")
        finish(False, smoke=args.smoke)
        return
    runs = 1 if args.smoke else max(1, args.runs)
    with ExitStack() as stack:
        env = {**os.environ, "COMETAPI_KEY": KEY, "PYTHONPATH": str(ROOT)}
        env.update(stack.enter_context(ray_cluster(args.ray_address)))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cometbatch-bench-")))
        figures = throughput(tmp, env, args.smoke, runs)
        one = figures[min(figures)][1]
        for n, (wall, span) in figures.items():
            print(
                f"{n} worker(s): {wall:.1f} images/s wall, {span:.1f} images/s working, "
                f"{span / one:.2f} x one worker"
            )
        limit_429s, busiest, _ = pacing(tmp, env, args.smoke)
    met = verdict("429s from the limit", limit_429s, 0, higher_is_better=False, unit="")
    met &= verdict(
        "busiest 60 s window / limit",
        busiest / LIMIT,
        TARGET_SHARE,
        higher_is_better=True,
        unit="x",
    )
    finish(met, smoke=args.smoke)


if __name__ == "__main__":
    main()
