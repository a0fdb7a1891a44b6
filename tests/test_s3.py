"""`--out s3://...` against a real S3 server (SeaweedFS on 127.0.0.1): runs, reruns, SIGKILLs,
the read-only commands and the lock of a live run."""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from s3server import S3Server
from test_crash import (
    CONCURRENCY,
    PIL_FORMATS,
    POST_GENERATION_KINDS,
    SIM_CONFIG,
    WAIT_LIMIT,
    CountingSimulator,
    crash_jobs,
    plan_of,
    settle,
    simulator_on_thread,
)

from cometbatch import SimConfig
from cometbatch.store.remote import FsspecStore

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "jobs" / "demo.jsonl"


@pytest.fixture
def bucket_url(s3_server: S3Server) -> str:
    """A new bucket on the server; the output is a prefix in it."""
    import s3fs

    bucket = f"run-{secrets.token_hex(4)}"
    s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options).mkdir(bucket)
    return f"s3://{bucket}/out"


def env_for(server: S3Server) -> dict[str, str]:
    """A child's environment: the server found through the S3 library's own variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMETAPI_", "AWS_"))}
    return {**env, **server.env, "COMETAPI_KEY": "sk-s3-test"}


def store_at(url: str, server: S3Server) -> FsspecStore:
    return FsspecStore.from_url(url, {**server.storage_options, "skip_instance_cache": True})


def spawn(server: S3Server, logs: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    """`cometbatch ARGS` in a child whose output goes to files (a pipe could fill up)."""
    with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "cometbatch", *args],
            stdout=out,
            stderr=err,
            cwd=ROOT,
            env=env_for(server),
        )


def cometbatch(server: S3Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cometbatch", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env_for(server),
        timeout=300,
    )


def ledger_events(store: FsspecStore) -> list[dict[str, Any]]:
    copy = store.log_copy("ledger.jsonl")
    if copy is None:
        return []
    return [json.loads(line) for line in Path(copy).read_text().splitlines() if line.strip()]


@pytest.fixture
def sim() -> Iterator[CountingSimulator]:
    with simulator_on_thread(SimConfig(seed=3, latency=0.01, record_requests=False)) as server:
        yield server


def test_a_run_on_s3_completes_and_a_rerun_sends_nothing(
    s3_server: S3Server, bucket_url: str, sim: CountingSimulator
) -> None:
    """run, rerun, status, verify and export on s3://, credentials from the environment."""
    args = ("run", str(DEMO), "--out", bucket_url, "--base-url", sim.base_url, "--json")
    first = cometbatch(s3_server, *args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["complete"]
    sent = sim.stats.requests
    again = cometbatch(s3_server, *args)
    assert again.returncode == 0, again.stderr
    assert sim.stats.requests == sent
    store = store_at(bucket_url, s3_server)
    images = store.names("images")
    assert len(images) == json.loads(first.stdout)["planned_images"]
    assert not (ROOT / "s3:").exists()
    status = json.loads(cometbatch(s3_server, "status", bucket_url, "--json").stdout)
    assert status["state"] == "finished" and status["runs"] == 2
    verify = cometbatch(s3_server, "verify", bucket_url, "--json")
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["checked_images"] == len(images)
    exported = cometbatch(s3_server, "export", bucket_url, "--format", "jsonl")
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) == 24
    # No lock object stays behind, and the ledger is a few segment objects.
    assert ".cometbatch.lock" not in store.names("")
    assert 0 < len(store.names("ledger")) < 20


def test_storage_options_reach_the_filesystem_and_are_never_shown(
    s3_server: S3Server, bucket_url: str, sim: CountingSimulator
) -> None:
    """--storage-option endpoint and keys work alone (no AWS_ variables) and are not printed."""
    env = {k: v for k, v in env_for(s3_server).items() if not k.startswith("AWS_")}
    options = [
        f"--storage-option=key={s3_server.access_key}",
        f"--storage-option=secret={s3_server.secret_key}",
        f"--storage-option=endpoint_url={s3_server.endpoint}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "cometbatch", "run", str(DEMO), "--out", bucket_url,
         "--base-url", sim.base_url, "--json", "-v", *options],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert s3_server.secret_key not in done.stdout + done.stderr
    store = store_at(bucket_url, s3_server)
    for name in store.names("ledger"):
        assert s3_server.secret_key.encode() not in store.read(name)


def test_a_live_run_holds_the_lock_and_a_killed_one_does_not(
    s3_server: S3Server, bucket_url: str, tmp_path: Path
) -> None:
    """A second run is refused naming the live one; after a SIGKILL the next run goes on."""
    slow = SimConfig(seed=4, latency=2.0, record_requests=False)
    with simulator_on_thread(slow) as server:
        args = ("run", str(DEMO), "--out", bucket_url, "--base-url", server.base_url, "--json")
        first = spawn(s3_server, tmp_path, "first", *args, "--concurrency", "2")
        try:
            deadline = time.monotonic() + WAIT_LIMIT
            while server.stats.requests == 0:
                assert first.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            second = cometbatch(s3_server, *args)
            assert second.returncode == 2
            assert f"in use by another cometbatch run (pid {first.pid} on " in second.stderr
            status = json.loads(cometbatch(s3_server, "status", bucket_url, "--json").stdout)
            assert status["state"] == "running"
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        settle(server)
    with simulator_on_thread(SimConfig(seed=5, latency=0.01, record_requests=False)) as fast:
        args = ("run", str(DEMO), "--out", bucket_url, "--base-url", fast.base_url, "--json")
        resumed = cometbatch(s3_server, *args)
    assert resumed.returncode == 0, resumed.stderr


def test_sigkills_mid_run_then_every_image_once(
    s3_server: S3Server, bucket_url: str, tmp_path: Path
) -> None:
    """3 SIGKILLs mid-run, then a final run: each planned image object once, decodable; the
    generations billed beyond what the ledger kept are at most kills x concurrency."""
    manifest = tmp_path / "crash.jsonl"
    manifest.write_text("".join(json.dumps(job) + "\n" for job in crash_jobs()))
    plan = plan_of(manifest)
    store = store_at(bucket_url, s3_server)
    kills = 3
    args = ("run", str(manifest), "--out", bucket_url, "--concurrency", str(CONCURRENCY))
    with simulator_on_thread(SIM_CONFIG.model_copy(update={"seed": 11})) as sim:
        for cycle in range(kills):
            generated0 = sim.stats.generated
            run = spawn(s3_server, tmp_path, f"kill{cycle}", *args, "--base-url", sim.base_url)
            try:
                deadline = time.monotonic() + WAIT_LIMIT * 2
                while sim.stats.generated < generated0 + 20:
                    assert run.poll() is None, (tmp_path / f"kill{cycle}.err").read_text()
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
            finally:
                run.send_signal(signal.SIGKILL)
                run.wait(30)
            settle(sim)
        final = cometbatch(s3_server, *args, "--base-url", sim.base_url, "--json")
        assert final.returncode == 0, final.stderr
        assert json.loads(final.stdout)["complete"]
        settle(sim)
        stats = sim.stats
    ok: Counter[str] = Counter()
    kept = 0  # images the ledger accounts for: ok lines, and failures after generating
    for event in ledger_events(store):
        if event["event"] != "result":
            continue
        if event["status"] == "ok":
            ok[event["key"]] += 1
            kept += len(event["images"])
        elif (event.get("error") or {}).get("kind") in POST_GENERATION_KINDS:
            kept += event["n"]
    assert set(ok) == plan.keys and max(ok.values()) == 1
    # A request is at most 10 images; a kill cuts off what is in flight.
    assert 0 <= stats.billed_images - kept <= kills * CONCURRENCY * 10, (stats, kept)
    images: Counter[tuple[str, int]] = Counter()
    for name in store.names("images"):
        _, job, file = name.split("/")
        stem, _, ext = file.partition(".")
        with Image.open(io.BytesIO(store.read(name))) as picture:
            picture.load()
            assert picture.format == PIL_FORMATS[ext], name
        images[(job, int(stem))] += 1
    assert set(images) == plan.images and max(images.values()) == 1
    assert ".cometbatch.lock" not in store.names("")


def test_the_lock_object_is_created_only_if_absent_on_the_server(
    s3_server: S3Server, bucket_url: str
) -> None:
    """On the S3 server the lock is put with If-None-Match: of two runs that both read the
    output as free, the second is refused (the server's precondition failure)."""
    from cometbatch import LedgerError

    first, second = store_at(bucket_url, s3_server).lock(), store_at(bucket_url, s3_server).lock()
    second.holder = lambda: None  # type: ignore[method-assign]  # it read before the first wrote
    first.acquire()
    try:
        with pytest.raises(LedgerError, match="in use by another cometbatch run"):
            second.acquire()
        # The first run's lock object is as it wrote it: the second did not replace it.
        assert not second.held and first.holder() == first._info
    finally:
        first.release()
