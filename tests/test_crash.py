"""SIGKILL a real `cometbatch run` at random moments, again and again; every rerun resumes.

The simulated API runs in this process, on a thread with its own event loop, so the test can
read what it generated (what a real API would bill) at each kill and compare that with what
the ledger kept. SIGKILL allows no cleanup: each rerun meets a stale lock file, maybe
half-written temporary images and maybe a torn last ledger line (also injected now and then,
since a kill rarely lands inside the write of one short line).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from cometbatch import SimConfig, Simulator, load_manifest
from cometbatch.ledger.events import LEDGER_NAME, iter_events
from cometbatch.ledger.index import LedgerState
from cometbatch.paths import EXTENSIONS
from cometbatch.plan import plan_job
from cometbatch.store.lock import LOCK_NAME

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 12
# The whole manifest takes some 5 s uninterrupted on an idle machine: 0.05-0.30 s a
# generation, 12 at a time, and 10 % of requests faulted (retried after a Retry-After or a
# backoff; each such answer also makes the engine lower its concurrency for a while).
SIM_CONFIG = SimConfig(
    latency=0.05,
    latency_jitter=0.25,
    rate_429=0.03,
    rate_429_bare=0.02,
    retry_after=0.25,
    rate_5xx=0.03,
    rate_drop=0.02,
    record_requests=False,
)
KILL_KINDS = ("timed", "first-wave", "progress")
# The final run must have work left: kills stop adding progress once this share remains.
RESERVE = 0.2
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
# Failures recorded after the API generated the images (the answer or its download was lost):
# the ledger keeps those generations too.
POST_GENERATION_KINDS = frozenset({"bad_response", "invalid_image", "download"})
WAIT_LIMIT = 60.0


# -- the simulated API on a thread ----------------------------------------------------------


class CountingSimulator(Simulator):
    """The simulator, also counting the generation requests it is answering right now."""

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config, host="127.0.0.1", port=0)
        # Written on the simulator's loop thread, read from the test's: plain ints suffice.
        self.in_flight = 0
        self.handled = 0

    async def _handle_generation(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await super()._handle_generation(request)
        finally:
            self.in_flight -= 1
            self.handled += 1


@contextlib.contextmanager
def simulator_on_thread(config: SimConfig) -> Iterator[CountingSimulator]:
    """The simulator serving on 127.0.0.1 from its own event loop on a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="simulator", daemon=True)
    thread.start()
    sim = CountingSimulator(config)
    try:
        asyncio.run_coroutine_threadsafe(sim.__aenter__(), loop).result(timeout=30)
        try:
            yield sim
        finally:
            asyncio.run_coroutine_threadsafe(sim.aclose(), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def settle(sim: CountingSimulator) -> None:
    """Wait until nothing is being answered and no request has arrived for a moment.

    Handlers are not cancelled when the client dies: a generation in flight at a kill is
    still finished (and billed), so it is counted only after this returns.
    """
    deadline = time.monotonic() + WAIT_LIMIT
    seen = sim.stats.requests
    quiet_since: float | None = None
    while True:
        now = time.monotonic()
        if sim.in_flight == 0 and sim.stats.requests == seen:
            quiet_since = now if quiet_since is None else quiet_since
            if now - quiet_since >= 0.15:
                return
        else:
            quiet_since = None
            seen = sim.stats.requests
        assert now < deadline, f"the simulator never went quiet: {sim!r}"
        time.sleep(0.01)


# -- the manifest and what it plans -------------------------------------------------------


def crash_jobs() -> Iterator[dict[str, Any]]:
    """280 requests, 668 images: every model, url and b64 answers, n > max_n fanned out."""
    for i in range(60):  # one image a request; url answers are webp links, b64 is png
        mode = "url" if i % 2 else "b64_json"
        yield {"id": f"d3-{i}", "prompt": f"lighthouse {i}", "model": "dall-e-3",
               "response_format": mode}  # fmt: skip
    for i in range(16):  # n=12 fans out into 10 + 2
        mode = "url" if i % 2 else "b64_json"
        yield {"id": f"d2-{i}", "prompt": f"forest spirit {i}", "model": "dall-e-2", "n": 12,
               "size": "256x256", "response_format": mode}  # fmt: skip
    for i in range(24):
        yield {"id": f"d2s-{i}", "prompt": f"chess set {i}", "model": "dall-e-2", "n": 3,
               "size": "512x512", "response_format": "b64_json"}  # fmt: skip
    for i in range(40):  # b64 only, in the asked output format
        fmt = ("png", "jpeg", "webp")[i % 3]
        yield {"id": f"g1-{i}", "prompt": f"ceramic mug {i}", "model": "gpt-image-1",
               "n": 1 + i % 4, "output_format": fmt, "quality": "low"}  # fmt: skip
    for i in range(12):
        yield {"id": f"g1m-{i}", "prompt": f"weather icons {i}", "model": "gpt-image-1-mini",
               "n": 12, "quality": "low"}  # fmt: skip
    for i in range(80):  # max n 1: n=2 becomes two requests
        mode = "url" if i % 3 else "b64_json"
        yield {"id": f"qw-{i}", "prompt": f"koi pond {i}", "model": "qwen-image",
               "n": 2 if i % 4 == 0 else 1, "response_format": mode}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """The request keys and (job id, image index) pairs the manifest asks for."""

    keys: frozenset[str]
    images: frozenset[tuple[str, int]]
    indexes: dict[str, range]


def plan_of(manifest_path: Path) -> Plan:
    manifest = load_manifest(manifest_path)
    indexes: dict[str, range] = {}
    for job in manifest:
        for request in plan_job(job, manifest.registry.get(job.model)):
            indexes[request.key] = request.indexes
    images = {(key.rpartition("#")[0], k) for key, ks in indexes.items() for k in ks}
    return Plan(frozenset(indexes), frozenset(images), indexes)


# -- reading the output folder --------------------------------------------------------------


@dataclass
class LedgerView:
    """What the ledger holds, its torn last line skipped the way events.py skips it."""

    ok: Counter[str] = field(default_factory=Counter)
    ok_events: list[dict[str, Any]] = field(default_factory=list)
    failed: int = 0
    failed_after_generation: int = 0
    torn_tail: bool = False

    @property
    def kept(self) -> int:
        """Generations the ledger accounts for: ok lines, and failures after generating."""
        return sum(self.ok.values()) + self.failed_after_generation


def read_ledger(out: Path) -> LedgerView:
    view = LedgerView()
    path = out / LEDGER_NAME
    if not path.exists():
        return view
    tail = path.read_bytes().rpartition(b"\n")[2]
    view.torn_tail = bool(tail.strip()) and not _is_event(tail)
    for _, event in iter_events(path):
        if event["event"] != "result":
            continue
        if event["status"] == "ok":
            view.ok[event["key"]] += 1
            view.ok_events.append(event)
        else:
            view.failed += 1
            if (event.get("error") or {}).get("kind") in POST_GENERATION_KINDS:
                view.failed_after_generation += 1
    return view


def _is_event(line: bytes) -> bool:
    try:
        event = json.loads(line)
    except ValueError:
        return False
    return isinstance(event, dict) and "event" in event


def check_ok_events(out: Path, view: LedgerView, plan: Plan) -> None:
    """Every ok line names complete files: right key, indexes, bytes, sha256 and type."""
    for event in view.ok_events:
        key = event["key"]
        assert key in plan.indexes, key
        assert [image["index"] for image in event["images"]] == list(plan.indexes[key]), event
        for image in event["images"]:
            path = out / image["path"]
            assert path.is_file(), (key, image)
            data = path.read_bytes()
            assert len(data) == image["bytes"], (key, image)
            assert hashlib.sha256(data).hexdigest() == image["sha256"], (key, image)
            assert path.suffix == f".{EXTENSIONS[image['format']]}", (key, image)


def _lock_holder(lock: Path) -> dict[str, Any]:
    """The holder info in the lock file ({} if absent, empty or cut short by the kill)."""
    try:
        info = json.loads(lock.read_bytes())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def temp_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.name.endswith(".tmp"))


def check_final_folder(out: Path, plan: Plan) -> int:
    """OUT holds the ledger, the lock file, metadata.jsonl and each planned image once,
    decodable; its count."""
    assert temp_files(out) == []
    images: Counter[tuple[str, int]] = Counter()
    others = []
    for path in out.rglob("*"):
        if path.is_dir():
            continue
        rel = path.relative_to(out)
        if rel.parts in ((LEDGER_NAME,), (LOCK_NAME,), ("metadata.jsonl",)):
            continue
        if len(rel.parts) != 3 or rel.parts[0] != "images" or not rel.stem.isdigit():
            others.append(rel)
            continue
        with Image.open(path) as picture:
            picture.load()
            assert picture.format == PIL_FORMATS[rel.suffix[1:]], rel
        images[(rel.parts[1], int(rel.stem))] += 1
    assert others == []
    assert set(images) == plan.images
    assert max(images.values()) == 1
    return sum(images.values())


# -- one CLI run ------------------------------------------------------------------------------


class CliRun:
    """A `cometbatch run` subprocess whose output goes to files (a pipe could fill up)."""

    def __init__(self, manifest: Path, out: Path, base_url: str, logs: Path, name: str) -> None:
        self.stdout_path = logs / f"{name}.out"
        self.stderr_path = logs / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMETAPI_")}
        env["COMETAPI_KEY"] = "sk-crash-test"
        self.started = time.monotonic()
        # The child keeps its own copies of the two files; ours close at once.
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "cometbatch", "run", str(manifest),
                    "--out", str(out), "--base-url", base_url,
                    "--concurrency", str(CONCURRENCY), "--quiet", "--json",
                ],
                stdout=stdout,
                stderr=stderr,
                cwd=ROOT,
                env=env,
            )  # fmt: skip

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL and reap it; seconds it ran."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return time.monotonic() - self.started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def output(self) -> tuple[str, str]:
        return self.stdout_path.read_text(), self.stderr_path.read_text()

    def describe(self) -> str:
        stdout, stderr = self.output()
        return f"exit {self.proc.returncode}\nstdout: {stdout}\nstderr: {stderr}"


def wait_for(run: CliRun, count: Callable[[], int], at_least: int) -> bool:
    """Poll until `count()` reaches `at_least` (True) or the run exits on its own (False)."""
    deadline = time.monotonic() + WAIT_LIMIT
    while count() < at_least:
        if not run.running():
            return False
        assert time.monotonic() < deadline, "the kill trigger never came"
        time.sleep(0.002)
    return True


def sleep_while_running(run: CliRun, seconds: float) -> bool:
    """Sleep `seconds` unless the run exits first; whether it is still running."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not run.running():
            return False
        time.sleep(min(0.002, max(0.0, end - time.monotonic())))
    return run.running()


# -- the crash loop ---------------------------------------------------------------------------


@dataclass
class Kill:
    """One SIGKILL and what the simulator and the ledger said after it."""

    cycle: int
    kind: str
    ran_s: float
    requests: int  # generation requests this run sent before it died
    generated_at_kill: int  # cumulative, read as soon as the process was reaped
    in_flight_at_kill: int  # simulator handlers still running then
    generated: int  # cumulative, once those handlers finished
    kept: int  # cumulative ok lines (+ failures after generating) in the ledger
    excess: int  # generated - kept added by this kill
    stale_lock: bool  # the lock file still names the killed process
    new_temp_files: int  # temporary images this run left behind
    torn: str  # "" whole lines, "new" torn by this kill, "left" an earlier torn line unrepaired
    injected_torn: bool = False
    injected_temp: bool = False

    def row(self) -> str:
        flags = (
            ("L", self.stale_lock),
            ("T", self.torn == "new"),
            ("t", self.torn == "left"),
            ("I", self.injected_torn),
            ("P", self.injected_temp),
        )
        marks = "".join(mark for mark, on in flags if on)
        return (
            f"  {self.cycle:>5} {self.kind:<10} {self.ran_s:5.2f} {self.requests:>4} "
            f"{self.generated_at_kill:>8} {self.in_flight_at_kill:>4} {self.generated:>5} "
            f"{self.kept:>4} {self.excess:>3} {self.new_temp_files:>3} {marks}"
        )


TABLE_HEAD = (
    "  cycle kind       ran_s reqs gen@kill infl   gen kept exc tmp flags "
    "(L stale lock, T torn by the kill, t torn line left unrepaired, "
    "I torn line injected, P partial temp image injected)"
)


def ledger_tail(ledger: Path) -> bytes:
    """The bytes after the ledger's last newline (a torn line, if any)."""
    return ledger.read_bytes().rpartition(b"\n")[2] if ledger.exists() else b""


def inject_torn_line(ledger: Path, rng: random.Random) -> bool:
    """Append a prefix of the last line without its newline, as a kill mid-write leaves it."""
    data = ledger.read_bytes() if ledger.exists() else b""
    if not data.endswith(b"\n"):
        return False
    last = data[:-1].rpartition(b"\n")[2]
    if len(last) < 4:
        return False
    with open(ledger, "ab") as handle:
        handle.write(last[: rng.randint(1, len(last) - 2)])
    return True


def inject_temp_file(out: Path, plan: Plan, rng: random.Random) -> None:
    """Leave a half-written temporary image where the sink writes, as a kill mid-write does."""
    job_id, index = rng.choice(sorted(plan.images))
    folder = out / "images" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f".{index}.{rng.getrandbits(48):012x}.tmp").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")


def run_crash_cycles(tmp_path: Path, cycles: int, seed: int) -> None:
    """Kill `cycles` runs at seeded random moments, then one run must finish; check it all."""
    begun = time.monotonic()
    rng = random.Random(seed)
    manifest = tmp_path / "crash.jsonl"
    manifest.write_text("".join(json.dumps(job) + "\n" for job in crash_jobs()))
    plan = plan_of(manifest)
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    ledger = out / LEDGER_NAME
    kinds = list(KILL_KINDS * math.ceil(cycles / len(KILL_KINDS)))[:cycles]
    rng.shuffle(kinds)
    kills: list[Kill] = []
    startups: list[float] = []  # seconds from spawn to the first request reaching the API
    excess_so_far = 0
    config = SIM_CONFIG.model_copy(update={"seed": seed})
    with simulator_on_thread(config) as sim:
        for cycle, kind in enumerate(kinds, 1):
            remaining = len(plan.keys) - len(read_ledger(out).ok)
            budget = max(1, (remaining - int(RESERVE * len(plan.keys))) // (cycles - cycle + 1))
            tail0, temps0 = ledger_tail(ledger), set(temp_files(out))
            requests0, generated0 = sim.stats.requests, sim.stats.generated
            run = CliRun(manifest, out, sim.base_url, logs, f"cycle{cycle}")
            try:
                if kind == "timed":
                    # Any moment of the start-up (imports, the lock, the ledger's repair and
                    # load, stale temp files) up to just after the first request; how long
                    # that takes depends on the machine, so it is measured, not assumed.
                    startup = sorted(startups)[len(startups) // 2] if startups else 1.0
                    alive = sleep_while_running(run, rng.uniform(0.0, 1.1 * startup))
                elif kind == "first-wave":
                    alive = wait_for(run, lambda: sim.stats.requests, requests0 + 1)
                    startups.append(time.monotonic() - run.started)
                    alive = alive and sleep_while_running(run, rng.uniform(0.0, 0.12))
                else:
                    target = generated0 + rng.randint(1, budget)
                    alive = wait_for(run, lambda: sim.stats.generated, target)
                    alive = alive and sleep_while_running(run, rng.uniform(0.0, 0.15))
                assert alive, f"cycle {cycle} ended before its kill: {run.describe()}"
                ran = run.kill()
                generated_at_kill, in_flight_at_kill = sim.stats.generated, sim.in_flight
            finally:
                run.close()
            requests = sim.stats.requests - requests0
            settle(sim)
            view = read_ledger(out)
            assert max(view.ok.values(), default=0) <= 1, f"a key is ok twice: {view.ok}"
            check_ok_events(out, view, plan)
            torn = ""
            if view.torn_tail:
                torn = "left" if ledger_tail(ledger) == tail0 else "new"
            kill = Kill(
                cycle=cycle,
                kind=kind,
                ran_s=ran,
                requests=requests,
                generated_at_kill=generated_at_kill,
                in_flight_at_kill=in_flight_at_kill,
                generated=sim.stats.generated,
                kept=view.kept,
                excess=sim.stats.generated - view.kept - excess_so_far,
                stale_lock=_lock_holder(out / LOCK_NAME).get("pid") == run.proc.pid,
                new_temp_files=len(set(temp_files(out)) - temps0),
                torn=torn,
            )
            kills.append(kill)
            excess_so_far += kill.excess
            # The generations the ledger did not keep were in flight at the kill, at most one
            # per worker (one request each, from sending to its ledger line).
            assert 0 <= kill.excess <= CONCURRENCY, kill
            # A kill lands inside the write of a short line or a small image only by rare
            # luck: leave what such a kill would, now and then.
            if not view.torn_tail and rng.random() < 0.3:
                kill.injected_torn = inject_torn_line(ledger, rng)
            if rng.random() < 0.3:
                inject_temp_file(out, plan, rng)
                kill.injected_temp = True

        final = CliRun(manifest, out, sim.base_url, logs, "final")
        try:
            final.proc.wait(timeout=120)
            final_s = time.monotonic() - final.started
        finally:
            final.close()
        assert final.proc.returncode == 0, final.describe()
        summary = json.loads(final.output()[0])
        assert summary["complete"], summary
        assert summary["ok_requests"] + summary["skipped_requests"] == len(plan.keys), summary
        settle(sim)
        stats = sim.stats
        assert sim.handled == stats.requests, "the in-flight counter missed requests"

    view = read_ledger(out)
    assert not view.torn_tail
    assert max(view.ok.values()) == 1, "a key is ok twice"
    assert set(view.ok) == plan.keys
    check_ok_events(out, view, plan)
    on_disk = check_final_folder(out, plan)
    assert _lock_holder(out / LOCK_NAME) == {}, "the final run left its lock info behind"
    total_excess = stats.generated - view.kept
    # The run that was not killed wasted nothing: all excess comes from the kills.
    assert total_excess == excess_so_far

    worst = max(kills, key=lambda k: (k.excess, -k.cycle))
    lines = [
        "",
        f"crash test (seed {seed}): {len(kills)} SIGKILL cycles "
        f"({', '.join(f'{kinds.count(k)} {k}' for k in KILL_KINDS)}), then a final run: "
        f"exit 0 in {final_s:.1f} s; total {time.monotonic() - begun:.1f} s",
        f"  planned: {len(plan.keys)} requests, {len(plan.images)} images; on disk: "
        f"{on_disk} images, each once, each decodes as its extension says; no temp files",
        f"  simulator: {stats.requests} requests, {stats.generated} generated (billed), "
        f"{stats.images} images generated, {stats.downloads} downloads, max in flight "
        f"{stats.max_in_flight}; faults {dict(sorted(stats.faults.items()))}",
        f"  ledger: {sum(view.ok.values())} ok lines kept (one per planned key), "
        f"{view.failed} failed lines ({view.failed_after_generation} after a generation)",
        f"  excess generated - kept: {total_excess} in all over {len(kills)} kills, "
        f"0 in the final run; worst per kill {worst.excess} (cycle {worst.cycle}, "
        f"{worst.kind}: simulator had {worst.in_flight_at_kill} in flight at the kill, "
        f"{max(k.in_flight_at_kill for k in kills)} at most at any kill); "
        f"bound --concurrency {CONCURRENCY}",
        f"  generations finished after their kill: "
        f"{sum(k.generated - k.generated_at_kill for k in kills)}; kills before any request: "
        f"{sum(k.requests == 0 for k in kills)}; stale locks: "
        f"{sum(k.stale_lock for k in kills)}; temp images left by kills: "
        f"{sum(k.new_temp_files for k in kills)} (+{sum(k.injected_temp for k in kills)} "
        f"injected); torn ledger lines: {sum(k.torn == 'new' for k in kills)} by kills "
        f"(+{sum(k.injected_torn for k in kills)} injected), "
        f"{sum(k.torn == 'left' for k in kills)} times left unrepaired by a quick kill",
        f"  final run: {summary['ok_requests']} ok, {summary['skipped_requests']} skipped, "
        f"{summary['retries']} retries, {summary['ambiguous_retries']} possibly billed twice",
        TABLE_HEAD,
        *(kill.row() for kill in kills),
    ]
    print("\n".join(lines))


def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    """Ten SIGKILLs at random moments lose nothing and waste at most the requests in flight
    at each; the final rerun completes with every image exactly once."""
    run_crash_cycles(tmp_path, cycles=10, seed=20240611)


@pytest.mark.long
def test_sigkill_at_random_moments_then_resume_long(tmp_path: Path) -> None:
    """The crash test with sixty SIGKILLs."""
    run_crash_cycles(tmp_path, cycles=60, seed=7)


# -- stop signals: a graceful stop, never a crash ---------------------------------------------

SIGNAL_JOBS = 60


def signal_manifest(tmp_path: Path) -> Path:
    manifest = tmp_path / "signals.jsonl"
    jobs = (
        {"id": f"g{i}", "prompt": f"dune {i}", "model": "qwen-image"} for i in range(SIGNAL_JOBS)
    )
    manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return manifest


def result_lines(out: Path) -> list[dict[str, Any]]:
    return [e for _, e in iter_events(out / LEDGER_NAME) if e["event"] == "result"]


def last_event(out: Path) -> dict[str, Any]:
    return list(iter_events(out / LEDGER_NAME))[-1][1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_mid_run_lands_every_sent_request(tmp_path: Path, sig: int) -> None:
    """SIGTERM (a polite kill) and SIGHUP (the terminal closed) stop as Ctrl-C does: no new
    request, those already sent land and are recorded, the end line is written, exit 130."""
    manifest, out = signal_manifest(tmp_path), tmp_path / "out"
    with simulator_on_thread(SimConfig(latency=0.3, record_requests=False)) as sim:
        run = CliRun(manifest, out, sim.base_url, tmp_path, "run")
        try:
            assert wait_for(run, lambda: len(read_ledger(out).ok), 5), run.describe()
            run.proc.send_signal(sig)
            run.proc.wait(timeout=60)
        finally:
            run.close()
        settle(sim)
        sent = sim.stats.requests
    assert run.proc.returncode == 130, run.describe()
    recorded = result_lines(out)
    # Every request the server saw has its line: nothing paid for is left unrecorded.
    assert len(recorded) == sent < SIGNAL_JOBS, run.describe()
    end = last_event(out)
    assert end["event"] == "end", end
    assert end["summary"]["interrupted"] is True
    assert end["summary"]["cut_off_requests"] == 0
    assert json.loads(run.output()[0])["ok_requests"] == sent


def test_closing_the_terminal_is_a_graceful_stop(tmp_path: Path) -> None:
    """The terminal goes away under a run drawing its live display: every write to it fails
    from then on (EIO) and SIGHUP comes. The run stops as for Ctrl-C: every sent request is
    recorded, the end line is written, exit 130."""
    import pty

    manifest, out = signal_manifest(tmp_path), tmp_path / "out"
    with simulator_on_thread(SimConfig(latency=0.3, record_requests=False)) as sim:
        master, slave = pty.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMETAPI_")}
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "cometbatch", "run", str(manifest), "--out", str(out),
                "--base-url", sim.base_url, "--concurrency", "6",
            ],
            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
            env={**env, "COMETAPI_KEY": "sk-terminal", "TERM": "xterm-256color"},
        )  # fmt: skip
        os.close(slave)
        # Keep reading what it draws (a full terminal would block it) until the terminal goes.
        reader = threading.Thread(target=_drain, args=(master,), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + WAIT_LIMIT
            while len(read_ledger(out).ok) < 5:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.002)
            os.close(master)
            proc.send_signal(signal.SIGHUP)
            returncode = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        settle(sim)
        sent = sim.stats.requests
    assert returncode == 130
    assert len(result_lines(out)) == sent < SIGNAL_JOBS
    end = last_event(out)
    assert end["event"] == "end" and end["summary"]["interrupted"] is True


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 65536):
            pass


def test_a_second_signal_counts_exactly_the_requests_it_cut_off(tmp_path: Path) -> None:
    """Ctrl-C twice while the server holds every request in flight: the run quits at once and
    `cut_off_requests` equals the requests the server saw that have no ledger line."""
    manifest, out = signal_manifest(tmp_path), tmp_path / "out"
    config = SimConfig(latency=0.02, slow_seconds=30, record_requests=False)
    with simulator_on_thread(config) as sim:
        run = CliRun(manifest, out, sim.base_url, tmp_path, "run")
        try:
            assert wait_for(run, lambda: len(read_ledger(out).ok), 10), run.describe()
            # From now on the server holds each new request for 30 s; the fast ones land, so
            # every slot fills with a held request.
            sim.enqueue(*["slow"] * CONCURRENCY)
            assert wait_for(run, lambda: sim.in_flight, CONCURRENCY), run.describe()
            run.proc.send_signal(signal.SIGINT)
            assert wait_for(run, lambda: "stopping:" in run.output()[1], 1), run.describe()
            started = time.monotonic()
            run.proc.send_signal(signal.SIGINT)
            run.proc.wait(timeout=30)
            quit_s = time.monotonic() - started
        finally:
            run.close()
        seen = sim.stats.requests
    assert run.proc.returncode == 130, run.describe()
    recorded = len(result_lines(out))
    end = last_event(out)
    assert end["event"] == "end"
    cut_off = end["summary"]["cut_off_requests"]
    print(
        f"\ndouble Ctrl-C against a server holding {CONCURRENCY} requests: the server saw "
        f"{seen} requests, the ledger recorded {recorded}; cut_off_requests {cut_off}; "
        f"quit {quit_s:.2f} s after the second signal"
    )
    assert cut_off == seen - recorded == CONCURRENCY
    # Each request cut off left its `sent` line without a result: the next run knows.
    assert len(LedgerState.load(out / LEDGER_NAME).unanswered()) == cut_off
    assert json.loads(run.output()[0])["cut_off_requests"] == cut_off
    assert quit_s < 10
