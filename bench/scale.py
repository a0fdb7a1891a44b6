"""Scale: a 1,000,000-line manifest planned, resumed and run in bounded memory.

Data (written to a temporary folder): a manifest of 1,000,000 jobs in a realistic mix of
models (dall-e-3, gpt-image-1 and -mini, dall-e-2, qwen-image), sizes, options, metadata,
explicit ids, derived ids and OpenAI Batch API lines; and a ledger holding one `run` event and
an ok `result` for every request, in the contract's format, with the keys and fingerprints
the planner computes (each manifest line is parsed and planned the way a run does it), so
that a resume finds every request done. Every figure comes from a child process running the
real code, measured by the operating system (peak RSS from wait4, which covers the whole
child whatever allocated it).

(a) Dry run: `cometbatch run M --dry-run --out D --json` into a fresh folder (validate and
    plan every line). Target: peak RSS <= 200 MB.
(b) Resume over the 1,000,000-result ledger (every image it records is on disk: one small
    file hard-linked under each recorded path, so a run's check that they exist finds them).
    Start-up: a child opens the folder as the engine does (`async with Ledger(out)`: lock,
    torn-tail repair, load of the ledger) and reports how long that took. Targets: <= 10 s,
    peak RSS <= 200 MB. The same child then checks that every ok key's images exist, as a run
    does for each request while it reads the manifest (`ImagePresence`, an access() per
    image and an lstat() per job folder, in a thread 256 keys at a time as a run does it,
    after the start-up, spread over the manifest's reading): that cost is reported on its
    own (total, per key, and the part left on the event loop), and is part of the full
    resume's wall time.
    Full resume: `cometbatch run M --out D --base-url <simulator> --json`, which must skip
    every request and send none (checked against the summary and the simulator's count).
    Target: peak RSS <= 200 MB; its wall time is reported.
(c) Memory against manifest length. A real 1,000,000-request run is too long, so manifests of
    10,000, 100,000 and 1,000,000 lines are run where the ledger already holds all but the
    last 2,000 jobs: the run streams the whole manifest through validation, planning and
    triage, then sends the last 2,000 requests for real (a fast model, zero latency, small
    images). What a resume must hold per recorded key, the ledger index, necessarily grows
    with the ledger (about 60 bytes a key); it is measured separately, by a child that only
    loads the same ledger (for the 1,000,000 lines, the (b) start-up child, whose ledger holds
    2,000 results more: some 0.1 MB). The run's peak RSS minus that load-only peak is what
    running adds: the engine, the bounded queues, the sends. Target: that addition grows by
    <= 16 MB from 10,000 to 1,000,000 lines (it does not grow with the manifest).

`--runs N` takes medians of N runs. The two 1,000,000-line run steps (the full resume and the
1,000,000-line step of (c)) take minutes each, so they run once unless `--runs` is given.
`--smoke` uses 2,000 lines (and 500 and 2,000 in (c)) to check that the script works.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from _common import Options, finish, manifest_line, median, options, simulator_process, verdict

from cometbatch import ModelRegistry, SimConfig
from cometbatch.manifest.lines import parse_line
from cometbatch.paths import image_relpath
from cometbatch.plan import plan_job

LINES = 1_000_000
RUN_SIZES = (10_000, 100_000, 1_000_000)
PENDING = 2_000
SMOKE_LINES = 2_000
SMOKE_RUN_SIZES = (500, 2_000)
SMOKE_PENDING = 100
RSS_TARGET_MB = 200.0
STARTUP_TARGET_S = 10.0
GROWTH_TARGET_MB = 16.0
KEY = "sk-bench"
RUN_ID = "bench0000001"

# A child that opens an output folder the way the engine does and says how long it took.
STARTUP = """
import asyncio, json, resource, sys, time
from pathlib import Path
from cometbatch.ledger.writer import Ledger
from cometbatch.ledger.verify import ImagePresence

async def main(out):
    cpu = time.process_time()
    started = time.perf_counter()
    async with Ledger(out) as ledger:
        took = time.perf_counter() - started
        state = ledger.state
        # What triage does for each ok key of the manifest (all of them here, chunk 0 each),
        # in a thread a batch at a time as a run does (Triage.looked); the time the loop waits
        # for the threads is not the loop's. Without the manifest's output_format the
        # extension is guessed from the last image found, which the mix of formats here often
        # misses: slower than a run would be.
        presence = ImagePresence(Path(out))
        look = lambda batch: sum(presence.missing(r.job_id, range(r.n), r) for r in batch)
        missing = 0
        waited = 0.0
        batch = []
        for key, recorded in state.items():
            if recorded.status == "ok":
                batch.append(recorded)
            if len(batch) == 256:
                at = time.perf_counter()
                missing += await asyncio.to_thread(look, batch)
                waited += time.perf_counter() - at
                batch = []
        missing += look(batch)
        checked = time.perf_counter() - started - took
        print(json.dumps({
            "seconds": took + checked, "load_seconds": took, "check_seconds": checked,
            "loop_seconds": checked - waited,
            "cpu_seconds": time.process_time() - cpu, "keys": len(state),
            "ok": state.counts().get("ok", 0), "missing": missing,
            "loadavg": __import__("os").getloadavg()[0],
        }))

asyncio.run(main(sys.argv[1]))
"""

_SUBJECTS = (
    "a red fox", "an old lighthouse", "a bowl of ramen", "a robot gardener", "two cats",
    "a mountain village", "a paper boat", "a vintage car", "a koi pond", "a city at night",
    "a violin", "a desert caravan", "a glass teapot", "an astronaut", "a sunflower field",
)  # fmt: skip
_STYLES = (
    "watercolor", "oil painting", "isometric 3D render", "35mm photo", "pencil sketch",
    "ukiyo-e print", "pixel art", "studio photograph", "low-poly", "charcoal drawing",
)  # fmt: skip
_MOODS = ("at dawn", "in the rain", "under neon light", "in winter", "at golden hour", "")


def _job(rng: random.Random, number: int, *, fast: bool) -> dict[str, Any]:
    """One job's fields: a realistic mix of models, sizes and options (n within max n)."""
    detail = " with soft shadows and a shallow depth of field" * rng.randrange(3)
    prompt = f"{rng.choice(_SUBJECTS)} {rng.choice(_MOODS)}, {rng.choice(_STYLES)}{detail}"
    job: dict[str, Any] = {"prompt": f"{prompt}, variation {number}".replace("  ", " ")}
    pick = rng.random()
    if fast:
        # What (c) sends for real: one small base64 image, no download round trip.
        job.update(model="gpt-image-1-mini", quality="low", size="1024x1024")
    elif pick < 0.45:
        job.update(model="dall-e-3", size=rng.choice(("1024x1024", "1792x1024", "1024x1792")))
        if rng.random() < 0.5:
            job.update(
                quality=rng.choice(("standard", "hd")), style=rng.choice(("vivid", "natural"))
            )
    elif pick < 0.75:
        job.update(
            model=rng.choice(("gpt-image-1", "gpt-image-1-mini")),
            n=rng.choice((1, 1, 2, 4)),
            quality=rng.choice(("low", "medium", "high")),
            output_format=rng.choice(("png", "jpeg", "webp")),
        )
    elif pick < 0.9:
        job.update(model="dall-e-2", n=rng.choice((1, 2, 3)), size="512x512")
    else:
        job.update(model="qwen-image")
    if rng.random() < 0.3:
        job["metadata"] = {"batch": number // 1000, "tags": ["scale", rng.choice(_STYLES)]}
    return job


def _line(rng: random.Random, number: int, *, fast: bool) -> str:
    """One manifest line (see manifest_line)."""
    return manifest_line(rng, number, _job(rng, number, fast=fast))


@dataclass
class Dataset:
    """A manifest and an output folder whose ledger covers it (up to `done_size` bytes)."""

    manifest: Path
    out: Path
    requests: int
    pending_requests: int
    # The ledger's size holding every result, and holding all but the last `pending` jobs'.
    full_size: int
    done_size: int
    # The image folders of the last `pending` jobs (what a run over the shorter ledger writes).
    pending_folders: list[Path]


def make_dataset(folder: Path, lines: int, pending: int, *, seed: int = 6) -> Dataset:
    """Write the manifest and a ledger of ok results for all of its requests; the last
    `pending` jobs use a fast model and their results come last."""
    rng = random.Random(seed)
    registry = ModelRegistry()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    out = folder / "out"
    (out / "images").mkdir(parents=True, exist_ok=True)
    ledger = out / "ledger.jsonl"
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    requests = pending_requests = done_size = 0
    pending_folders: list[Path] = []
    # Every recorded image exists (a run checks): a small file, hard-linked at each path.
    seeds = _Seeds(folder)
    with open(manifest, "w", encoding="utf-8") as m, open(ledger, "w", encoding="utf-8") as led:
        run = {
            "event": "run", "run_id": RUN_ID, "started_at": "2026-01-01T00:00:00.000Z",
            "manifest": str(manifest), "manifest_sha256": None, "version": "0.1.0",
            "settings": {"concurrency": 16, "simulated": True},
        }  # fmt: skip
        led.write(encode(run) + "\n")
        for number in range(lines):
            if number % 50_000 == 0:
                m.write(f"# part {number // 50_000}\n")
            fast = number >= lines - pending
            if fast and not done_size:
                led.flush()
                done_size = led.tell()
            text = _line(rng, number, fast=fast)
            m.write(text + "\n")
            # Parsed and planned exactly as a run does, so keys and fingerprints match.
            job = parse_line(text, number + 1, registry=registry)
            assert job is not None
            for request in plan_job(job, registry.get(job.model)):
                requests += 1
                pending_requests += fast
                result = _result(rng, job, request)
                led.write(encode(result) + "\n")
                _link_images(seeds, out, result["images"], pending_folders if fast else None)
    if not done_size:
        done_size = ledger.stat().st_size
    size = ledger.stat().st_size
    return Dataset(manifest, out, requests, pending_requests, size, done_size, pending_folders)


class _Seeds:
    """Small files to hard-link, a new one before a file system's link limit (ext4: 65,000)."""

    LINKS = 60_000

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made = 0

    def link(self, path: Path) -> None:
        seed = self.folder / f"image-{self.made // self.LINKS}.bin"
        if self.made % self.LINKS == 0:
            seed.write_bytes(bytes(64))
        os.link(seed, path)
        self.made += 1


def _link_images(
    seeds: _Seeds, out: Path, images: list[dict[str, Any]], folders: list[Path] | None
) -> None:
    """Put a file at each recorded image path (`folders`: note the job's folder there)."""
    for image in images:
        path = out / image["path"]
        if not path.parent.is_dir():
            path.parent.mkdir()
            if folders is not None:
                folders.append(path.parent)
        seeds.link(path)


def _result(rng: random.Random, job: Any, request: Any) -> dict[str, Any]:
    """The ok result event the engine would have written for `request`."""
    fmt = job.output_format or "png"
    revised = f"A detailed rendering of {job.prompt}." if job.model == "dall-e-3" else None
    images = [
        {
            "index": index,
            "path": image_relpath(job.id, index, fmt),
            "format": fmt,
            "bytes": rng.randrange(40_000, 2_500_000),
            "sha256": rng.randbytes(32).hex(),
            "revised_prompt": revised,
        }
        for index in request.indexes
    ]
    usage = {"input_tokens": 20, "output_tokens": 272 * request.n}
    return {
        "event": "result", "run_id": RUN_ID, "key": request.key, "job_id": job.id,
        "chunk": request.chunk, "status": "ok", "fingerprint": request.fingerprint,
        "model": job.model, "n": request.n, "images": images, "downloads": [], "attempts": 1,
        "ambiguous_retries": 0, "error": None, "latency_s": round(rng.uniform(5, 40), 3),
        "finished_at": "2026-01-01T01:23:45.678Z",
        "usage": usage if job.model.startswith("gpt-image") else None,
        "metadata": job.metadata,
    }  # fmt: skip


def reset(data: Dataset, size: int) -> None:
    """Put the ledger back to `size` bytes; below the full ledger, drop the pending jobs'
    images (a run over the shorter ledger writes them)."""
    os.truncate(data.out / "ledger.jsonl", size)
    if size < data.full_size:
        for folder in data.pending_folders:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Child:
    """What a child process printed, how long it took and its peak resident memory."""

    stdout: str
    seconds: float
    peak_mb: float


def run_child(args: list[str], *, env: dict[str, str] | None = None) -> Child:
    """Run `python args...` to the end; wait4 gives this child's own peak RSS."""
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=errors, env=env
        )
        assert child.stdout is not None
        stdout = _read_all(child.stdout)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{args[:4]} exited {child.returncode}: {stdout[-500:]}\n{tail}")
    return Child(stdout, seconds, usage.ru_maxrss / 1024)


def _read_all(stream: IO[bytes]) -> str:
    with stream:
        return stream.read().decode()


def cli(*args: str) -> list[str]:
    return ["-m", "cometbatch", "run", *args, "--json", "--quiet"]


def child_env() -> dict[str, str]:
    return {**os.environ, "COMETAPI_KEY": KEY}


def dry_run(data: Dataset, lines: int, folder: Path, runs: int) -> bool:
    peaks, walls = [], []
    for run in range(runs):
        fresh = folder / f"dry-{run}"
        done = run_child(cli(str(data.manifest), "--dry-run", "--out", str(fresh)))
        plan = json.loads(done.stdout)
        assert plan["done_requests"] == 0, plan
        peaks.append(done.peak_mb)
        walls.append(done.seconds)
        shutil.rmtree(fresh, ignore_errors=True)
    print(f"(a) dry run of {lines} lines: wall {median(walls):.1f} s (runs {_list(walls)})")
    return verdict(
        "(a) dry run peak RSS", median(peaks), RSS_TARGET_MB, higher_is_better=False, unit=" MB"
    )


def startup(data: Dataset, runs: int) -> tuple[bool, float]:
    seconds, loading, checking, on_loop, cpu, peaks, loads = [], [], [], [], [], [], []
    for _ in range(runs):
        done = run_child(["-c", STARTUP, str(data.out)])
        report = json.loads(done.stdout)
        assert report["ok"] == data.requests and report["missing"] == 0, report
        seconds.append(report["seconds"])
        loading.append(report["load_seconds"])
        checking.append(report["check_seconds"])
        on_loop.append(report["loop_seconds"])
        cpu.append(report["cpu_seconds"])
        loads.append(report["loadavg"])
        peaks.append(done.peak_mb)
    print(
        f"(b) resume start-up over {data.requests} results: {_list(loading)} s wall, "
        f"{_list(cpu)} s CPU (with the file check), machine load average {_list(loads)}"
    )
    check = median(checking)
    print(
        f"(b) file check of every ok key's images (during the manifest's reading, in "
        f"threads): {_list(checking)} s, {check / max(data.requests, 1) * 1e6:.1f} us per key, "
        f"of which on the event loop {_list(on_loop)} s; start-up and check together "
        f"{_list(seconds)} s"
    )
    met = verdict(
        "(b) resume start-up time", median(loading), STARTUP_TARGET_S,
        higher_is_better=False, unit=" s",
    )  # fmt: skip
    met &= verdict(
        "(b) resume start-up peak RSS", median(peaks), RSS_TARGET_MB,
        higher_is_better=False, unit=" MB",
    )  # fmt: skip
    return met, median(peaks)


def run_manifest(data: Dataset, base_url: str, sim: Any) -> tuple[Child, dict[str, Any], int]:
    """`cometbatch run` of the dataset in a child: the child, its JSON summary, requests sent."""
    before = sim.stats.requests
    done = run_child(
        cli(str(data.manifest), "--out", str(data.out), "--base-url", base_url),
        env=child_env(),
    )
    return done, json.loads(done.stdout), sim.stats.requests - before


def full_resume(data: Dataset, base_url: str, sim: Any, runs: int) -> bool:
    walls, peaks = [], []
    for _ in range(runs):
        done, summary, sent = run_manifest(data, base_url, sim)
        if sent or summary["skipped_requests"] != data.requests or not summary["complete"]:
            raise SystemExit(f"the resume was not a no-op: sent {sent}, summary {summary}")
        walls.append(done.seconds)
        peaks.append(done.peak_mb)
        reset(data, data.full_size)
    print(
        f"(b) full resume of {data.requests} requests, 0 sent, all skipped: "
        f"wall {median(walls):.1f} s (runs {_list(walls)}), peak RSS runs {_list(peaks)} MB"
    )
    return verdict(
        "(b) full resume peak RSS", median(peaks), RSS_TARGET_MB,
        higher_is_better=False, unit=" MB",
    )  # fmt: skip


@dataclass
class Step:
    lines: int
    run_peak: float
    load_peak: float
    wall: float

    @property
    def added(self) -> float:
        return self.run_peak - self.load_peak


def run_step(
    data: Dataset, lines: int, base_url: str, sim: Any, runs: int, load_peak: float | None
) -> Step:
    """(c) at one manifest length: run peak RSS, and the peak of only loading the ledger
    (measured here unless given)."""
    if load_peak is None:
        reset(data, data.done_size)
        load_peak = median([run_child(["-c", STARTUP, str(data.out)]).peak_mb for _ in range(runs)])
    walls, peaks = [], []
    for _ in range(runs):
        reset(data, data.done_size)
        done, summary, sent = run_manifest(data, base_url, sim)
        if sent != data.pending_requests or summary["ok_requests"] != data.pending_requests:
            raise SystemExit(f"expected {data.pending_requests} sends, got {sent}: {summary}")
        walls.append(done.seconds)
        peaks.append(done.peak_mb)
    step = Step(lines, median(peaks), load_peak, median(walls))
    print(
        f"(c) {lines:>9} lines, {data.pending_requests} sent: run peak RSS {step.run_peak:.1f} MB "
        f"(runs {_list(peaks)}), ledger load alone {step.load_peak:.1f} MB, run adds "
        f"{step.added:.1f} MB, wall {step.wall:.1f} s"
    )
    return step


def _list(values: list[float]) -> str:
    return "/".join(f"{value:.1f}" for value in values)


def main(opts: Options) -> None:
    lines = SMOKE_LINES if opts.smoke else LINES
    sizes = SMOKE_RUN_SIZES if opts.smoke else RUN_SIZES
    pending = SMOKE_PENDING if opts.smoke else PENDING
    # The million-line run steps take minutes each: once, unless a number of runs is asked.
    slow_runs = opts.runs if any(a.startswith("--runs") for a in sys.argv[1:]) else 1
    met = True
    config = SimConfig(image_px=8, record_requests=False)
    with (
        tempfile.TemporaryDirectory(prefix="cometbatch-scale-") as tmp,
        simulator_process(config) as sim,
    ):
        base_url = sim.base_url
        folder = Path(tmp)
        started = time.perf_counter()
        big = make_dataset(folder / "big", lines, pending)
        print(
            f"data: {lines} manifest lines, {big.requests} requests, ledger "
            f"{big.full_size / 1e6:.0f} MB, written in {time.perf_counter() - started:.0f} s"
        )
        met &= dry_run(big, lines, folder, opts.runs)
        startup_met, big_load_peak = startup(big, opts.runs)
        met &= startup_met
        met &= full_resume(big, base_url, sim, slow_runs)
        steps = []
        for size in sizes:
            if size == lines:
                data = big
            else:
                data = make_dataset(folder / f"c{size}", size, pending, seed=size)
            runs = slow_runs if size == lines and not opts.smoke else opts.runs
            # The (b) start-up child loaded this ledger already, with `pending` more results:
            # the same figure within a fraction of a megabyte.
            load_peak = big_load_peak if data is big else None
            steps.append(run_step(data, size, base_url, sim, runs, load_peak))
            if data is not big:
                shutil.rmtree(data.manifest.parent, ignore_errors=True)
        growth = steps[-1].added - steps[0].added
        print(
            f"(c) ledger index growth {steps[0].lines}->{steps[-1].lines} lines: "
            f"{steps[-1].load_peak - steps[0].load_peak:.1f} MB (what a resume must know per key)"
        )
        met &= verdict(
            f"(c) run memory growth beyond the ledger, {steps[0].lines}->{steps[-1].lines} lines",
            growth, GROWTH_TARGET_MB, higher_is_better=False, unit=" MB",
        )  # fmt: skip
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main(options(__doc__.splitlines()[0] if __doc__ else "scale", runs=3))
