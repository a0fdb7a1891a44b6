"""Storage: images/s and peak memory writing the same images to a local folder and to S3.

Each run is a whole `python -m cometbatch run MANIFEST --out TARGET --base-url SIM` process
against the simulator (in its own process), timed from start to exit; its peak RSS is the
child's own (wait4). Two image sizes: small (64 px PNGs) and 2 MB PNGs. Targets: the local
folder always; an object store when given (`--target s3://bucket/prefix`, credentials and
endpoint from the environment), or `--seaweedfs` to start the test suite's SeaweedFS server on
127.0.0.1 and write to a new bucket there. `--layout files,webdataset,parquet` runs each layout
on the same manifest and target, so the packing cost of the shard layouts shows against files.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import finish, in_turn, median, settle, simulator_process, timed_process, verdict

from cometbatch import SimConfig

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
KEY = "sk-bench"
MODEL = "gpt-image-1"
CONCURRENCY = 16
BIG_BYTES = 2 * 1024 * 1024
# (name, payload bytes or None for the small default pictures, images, smoke images)
SIZES = (("small", None, 2_000, 20), ("2 MB", BIG_BYTES, 150, 4))
LAYOUTS = ("files", "webdataset", "parquet")
# Images per shard: several shards a run even at the 2 MB size.
SHARD_SIZE = 50
# Memory stays flat: a run of 2 MB images peaks under this, whatever it writes to.
TARGET_RSS_MB = 400.0


@dataclass(frozen=True)
class Figure:
    """One whole run: images per second (wall clock) and the process's peak RSS."""

    rate: float
    rss_mb: float


def write_manifest(path: Path, count: int) -> Path:
    """`count` single-image jobs, one per line."""
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            handle.write(json.dumps({"id": f"s{i:05d}", "prompt": f"still life {i}"}) + "\n")
    return path


def run_once(
    manifest: Path, out: str, base_url: str, env: dict[str, str], layout: str, cwd: Path
) -> tuple[float, float]:
    """Seconds from start to exit and the peak RSS (MB) of one `cometbatch run` process."""
    command = [
        *(sys.executable, "-m", "cometbatch", "run", str(manifest), "--out", out),
        *("--base-url", base_url, "--concurrency", str(CONCURRENCY), "--model", MODEL),
        *("--layout", layout, "--shard-size", str(SHARD_SIZE)),
    ]
    took, usage = timed_process(command, cwd, env)
    return took, usage.ru_maxrss / 1024  # Linux reports KiB


def images_written(out: str, env: dict[str, str], layout: str) -> int:
    """How many images a run left: image files, or the samples its shards' stats count."""
    if "://" in out:
        import s3fs

        fs = s3fs.S3FileSystem(
            key=env.get("AWS_ACCESS_KEY_ID"),
            secret=env.get("AWS_SECRET_ACCESS_KEY"),
            client_kwargs={"endpoint_url": env.get("AWS_ENDPOINT_URL")},
            skip_instance_cache=True,
        )
        base = out.removeprefix("s3://").rstrip("/")
        if layout == "files":
            return len(fs.find(f"{base}/images"))
        stats = [name for name in fs.find(f"{base}/shards") if name.endswith("_stats.json")]
        return sum(int(json.loads(fs.cat_file(name))["count"]) for name in stats)
    if layout == "files":
        return sum(1 for p in Path(out, "images").rglob("*") if p.is_file())
    files = Path(out, "shards").glob("*_stats.json")
    return sum(int(json.loads(path.read_text())["count"]) for path in files)


@contextmanager
def seaweedfs_target() -> Iterator[tuple[str, dict[str, str]]]:
    """The test suite's SeaweedFS server on 127.0.0.1 and a new bucket: (URL, environment)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import s3fs
    from s3server import running_s3_server

    with running_s3_server() as server:
        bucket = f"bench-{secrets.token_hex(4)}"
        s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options).mkdir(bucket)
        yield f"s3://{bucket}/run", server.env


def measure(
    targets: list[tuple[str, str, dict[str, str]]],
    sim_base: str,
    tmp: Path,
    count: int,
    runs: int,
    layouts: list[str],
) -> dict[str, Figure]:
    """Each target and layout's median images/s and highest peak RSS over `runs` runs in
    alternating order; keyed "target layout"."""
    manifest = write_manifest(tmp / f"manifest-{count}.jsonl", count)
    contenders = [
        (f"{name} {layout}", base, extra, layout)
        for name, base, extra in targets
        for layout in layouts
    ]
    rates: dict[str, list[float]] = {name: [] for name, _, _, _ in contenders}
    rss: dict[str, list[float]] = {name: [] for name, _, _, _ in contenders}
    for run in range(1, runs + 1):
        for name, base, extra, layout in in_turn(run, contenders):
            local = "://" not in base
            label = name.replace(" ", "-")
            out = str(tmp / f"{label}-{run}") if local else f"{base}-{label}-{count}-{run}"
            env = {**os.environ, "COMETAPI_KEY": KEY, "PYTHONPATH": str(ROOT), **extra}
            seconds, peak = run_once(manifest, out, sim_base, env, layout, tmp)
            written = images_written(out, env, layout)
            if written != count:
                raise SystemExit(f"{out}: {written} images for {count} jobs")
            rates[name].append(count / seconds)
            rss[name].append(peak)
            rate = count / seconds
            print(f"  run {run} {name:>16}: {rate:8.1f} images/s, peak RSS {peak:.0f} MB")
            if local:
                settle(Path(out))
    return {name: Figure(median(rates[name]), max(rss[name])) for name in rates}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script")
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of")
    parser.add_argument("--target", help="an object-store URL to compare (s3://bucket/prefix)")
    parser.add_argument(
        "--seaweedfs", action="store_true", help="start a SeaweedFS server and use it as target"
    )
    parser.add_argument(
        "--layout",
        default="files",
        help="layouts to run, comma-separated (files,webdataset,parquet); default files",
    )
    return parser.parse_args()


def main() -> None:
    args = arguments()
    runs = 1 if args.smoke else max(1, args.runs)
    layouts = [name.strip() for name in args.layout.split(",") if name.strip()]
    if not layouts or set(layouts) - set(LAYOUTS):
        raise SystemExit(f"--layout takes a comma-separated list of {', '.join(LAYOUTS)}")
    met = True
    with ExitStack() as stack:
        targets: list[tuple[str, str, dict[str, str]]] = [("local", "local", {})]
        if args.seaweedfs:
            url, env = stack.enter_context(seaweedfs_target())
            targets.append(("s3", url, env))
        elif args.target:
            targets.append(("s3", args.target.rstrip("/"), {}))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        results: dict[str, dict[str, Figure]] = {}
        for size, payload, count, smoke_count in SIZES:
            count = smoke_count if args.smoke else count
            config: dict[str, Any] = {"seed": 1, "record_requests": False}
            if payload:
                config["payload_bytes"] = payload
            print(f"{size} images: {count} a run, concurrency {CONCURRENCY}, {runs} run(s)")
            with simulator_process(SimConfig(**config)) as sim:
                figures = measure(targets, sim.base_url, tmp, count, runs, layouts)
            results[size] = figures
            for name, figure in figures.items():
                print(
                    f"{size} {name}: {figure.rate:.1f} images/s (median), "
                    f"peak RSS {figure.rss_mb:.0f} MB"
                )
            for layout in layouts:
                if f"s3 {layout}" in figures:
                    ratio = figures[f"s3 {layout}"].rate / figures[f"local {layout}"].rate
                    print(f"{size} {layout}: s3 / local throughput {ratio:.2f} x")
            for name, _, _ in targets:
                for layout in layouts:
                    if layout != "files" and "files" in layouts:
                        # Packing cost: this layout's run time against the files layout's.
                        cost = figures[f"{name} files"].rate / figures[f"{name} {layout}"].rate
                        print(f"{size} {name}: {layout} run takes {cost:.2f} x the files run")
        for name, figure in results["2 MB"].items():
            met &= verdict(
                f"peak RSS, 2 MB images, {name}",
                figure.rss_mb,
                TARGET_RSS_MB,
                higher_is_better=False,
                unit=" MB",
            )
    finish(met, smoke=args.smoke)


if __name__ == "__main__":
    main()
