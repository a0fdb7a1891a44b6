"""Outputs on an object store (memory://, no server): the store, the segment ledger, the
leased lock and every command on the URL."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from support import ROOT, run_all, settings_for

from cometbatch import ConfigError, Engine, LedgerError, SimConfig, Simulator, load_manifest
from cometbatch.cli.main import main
from cometbatch.ledger.index import LedgerState
from cometbatch.ledger.writer import Ledger
from cometbatch.store.lease import LeaseLock
from cometbatch.store.local import LocalStore
from cometbatch.store.remote import FsspecStore
from cometbatch.store.segments import FANOUT, Piece, SegmentLog, covering, merge_plan
from cometbatch.store.urls import open_store, parse_storage_options
from cometbatch.views.status import read_status

fsspec = pytest.importorskip("fsspec")

DEMO = ROOT / "jobs" / "demo.jsonl"
RUN = {"event": "run", "run_id": "r1", "started_at": "2026-01-01T00:00:00Z"}


def objects(url: str, folder: str = "") -> list[str]:
    """The names of the objects under `folder` of the output."""
    return FsspecStore.from_url(url).names(folder)


def result(key: str) -> dict[str, Any]:
    job, _, chunk = key.partition("#")
    return {
        "event": "result",
        "run_id": "r1",
        "key": key,
        "job_id": job,
        "chunk": int(chunk),
        "status": "failed",
        "fingerprint": "f",
        "model": "m",
        "n": 1,
        "images": [],
        "attempts": 1,
        "error": {"kind": "server", "message": "x", "retryable": True},
    }


def test_urls_pick_the_store(tmp_path: Path, url: str) -> None:
    """A path and a file:// URL are local folders; other URLs are object stores."""
    assert isinstance(open_store(tmp_path), LocalStore)
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalStore) and local.root == str(tmp_path)
    remote = open_store(url)
    assert isinstance(remote, FsspecStore) and remote.root == url


def test_missing_extra_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without s3fs, --out s3://... is a usage error naming the extra; no folder `s3:` appears."""
    monkeypatch.setitem(sys.modules, "s3fs", None)
    # A test that ran before may have had fsspec load (and remember) the s3 filesystem.
    registry = sys.modules["fsspec.registry"]._registry
    monkeypatch.delitem(registry, "s3", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'cometbatch\[s3\]'"):
        open_store("s3://bucket/x")
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(main, ["run", str(DEMO), "--simulate", "--out", "s3://bucket/x"])
    assert done.exit_code == 2, done.output
    assert "pip install 'cometbatch[s3]'" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_storage_options_parse_and_refuse_without_values() -> None:
    """KEY=VALUE pairs become options; a bad pair is named by position, its value unshown."""
    pairs = ["anon=true", "endpoint_url=http://h:1", "max_concurrency=4"]
    assert parse_storage_options(pairs) == {
        "anon": True,
        "endpoint_url": "http://h:1",
        "max_concurrency": 4,
    }
    with pytest.raises(ConfigError, match="#2") as info:
        parse_storage_options(["a=b", "hunter2"])
    assert "hunter2" not in str(info.value)


async def test_store_operations(url: str, tmp_path: Path) -> None:
    """put, put_file, stat, names, read, move and remove work on an object store."""
    store = FsspecStore.from_url(url)
    await store.put("images/a/0.png", b"png")
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * 1000)
    await store.put_file("images/b/0.png", str(source))
    assert not source.exists()
    assert store.names("images") == ["images/a/0.png", "images/b/0.png"]
    assert store.names("nothing") == []
    assert store.stat("images/b/0.png").size == 1000 and store.stat("images/b/0.png").is_file
    store.move([("images/a/0.png", "replaced/r/a/0.png")])
    assert store.read("replaced/r/a/0.png") == b"png"
    store.remove("replaced/r/a/0.png")
    with pytest.raises(FileNotFoundError):
        store.remove("replaced/r/a/0.png")
    with pytest.raises(FileNotFoundError):
        store.read("images/a/0.png")
    store.check_writable("images")
    assert store.clean("images") == 0 and not store.escapes("images/b/0.png", "images")


def test_covering_prefers_merged_pieces() -> None:
    """A merged piece wins over the segments it covers; those are reported for removal."""
    chosen, covered = covering([Piece(1, 1), Piece(2, 2), Piece(1, 2), Piece(3, 3)])
    assert chosen == [Piece(1, 2), Piece(3, 3)]
    assert sorted(covered, key=lambda p: p.first) == [Piece(1, 1), Piece(2, 2)]
    assert merge_plan([0] * (FANOUT - 1)) is None
    assert merge_plan([1, *[0] * FANOUT]) == 1
    assert merge_plan([2, *[1] * FANOUT, 0]) == 1  # appends went on during a merge
    assert Piece(1, FANOUT).tier == 1 and Piece(5, 5).tier == 0


def log_at(url: str) -> SegmentLog:
    store = FsspecStore.from_url(url)
    return store.open_log("ledger.jsonl", sync=False)


def test_segments_keep_order_across_runs(url: str) -> None:
    """Each append is one segment object; a second writer continues the sequence."""
    first = log_at(url)
    first.append(b'{"n":1}\n', False)
    first.append(b'{"n":2}\n{"n":3}\n', False)
    first.close(False)
    second = log_at(url)
    assert Path(second.path).read_bytes() == b'{"n":1}\n{"n":2}\n{"n":3}\n'
    second.append(b'{"n":4}\n', False)
    second.close(False)
    assert objects(url, "ledger") == [f"ledger/{n:012d}.jsonl" for n in (1, 2, 3)]
    copy = FsspecStore.from_url(url).log_copy("ledger.jsonl")
    assert copy is not None
    assert [json.loads(line)["n"] for line in Path(copy).read_text().splitlines()] == [1, 2, 3, 4]


def test_a_torn_segment_loses_only_its_incomplete_line(url: str) -> None:
    """A half-written segment's whole lines are read; its torn tail is dropped."""
    log = log_at(url)
    log.append(b'{"n":1}\n', False)
    log.close(False)
    fs = fsspec.filesystem("memory")
    base = url.removeprefix("memory://")
    fs.pipe_file(f"/{base}/ledger/{2:012d}.jsonl", b'{"n":2}\n{"n":')
    again = log_at(url)
    assert Path(again.path).read_bytes() == b'{"n":1}\n{"n":2}\n'
    again.append(b'{"n":3}\n', False)
    again.close(False)
    copy = FsspecStore.from_url(url).log_copy("ledger.jsonl")
    assert copy is not None and Path(copy).read_bytes() == b'{"n":1}\n{"n":2}\n{"n":3}\n'


def test_compaction_keeps_the_object_count_small(url: str) -> None:
    """Thousands of group commits leave a few dozen objects holding every line in order."""
    log = log_at(url)
    appends = 3000
    for n in range(appends):
        log.append(f'{{"n":{n}}}\n'.encode(), False)
    log.close(False)
    count = len(objects(url, "ledger"))
    # At most FANOUT - 1 pieces per tier, one tier per power of FANOUT.
    assert count <= (FANOUT - 1) * 4, count
    copy = FsspecStore.from_url(url).log_copy("ledger.jsonl")
    assert copy is not None
    numbers = [json.loads(line)["n"] for line in Path(copy).read_text().splitlines()]
    assert numbers == list(range(appends))


def test_a_compaction_cut_short_repeats_no_line(url: str) -> None:
    """A merged object next to the segments it covers (a crash before their removal) is read
    once, and the next writer removes the covered segments."""
    fs = fsspec.filesystem("memory")
    base = "/" + url.removeprefix("memory://") + "/ledger"
    for n in (1, 2, 3):
        fs.pipe_file(f"{base}/{n:012d}.jsonl", f'{{"n":{n}}}\n'.encode())
    fs.pipe_file(f"{base}/{1:012d}-{2:012d}.jsonl", b'{"n":1}\n{"n":2}\n')
    copy = FsspecStore.from_url(url).log_copy("ledger.jsonl")
    assert copy is not None and Path(copy).read_bytes() == b'{"n":1}\n{"n":2}\n{"n":3}\n'
    log_at(url).close(False)
    assert objects(url, "ledger") == [
        f"ledger/{1:012d}-{2:012d}.jsonl",
        f"ledger/{3:012d}.jsonl",
    ]


async def test_ledger_on_a_store_writes_off_the_loop(url: str) -> None:
    """With fsync=end the remote ledger's appends run in worker threads, never on the loop."""
    store = FsspecStore.from_url(url)
    threads: list[int] = []
    real = store.fs.pipe_file

    def pipe(path: str, data: bytes, **kwargs: Any) -> None:
        threads.append(threading.get_ident())
        real(path, data, **kwargs)

    store.fs.pipe_file = pipe
    try:
        async with Ledger(url, store=store) as ledger:
            await ledger.append(RUN)
            await ledger.append(result("a#0"))
    finally:
        del store.fs.pipe_file
    segment_puts = threads[1:-1]  # after the lock object, before its removal
    assert segment_puts and threading.get_ident() not in segment_puts
    state = LedgerState.load(Path(FsspecStore.from_url(url).log_copy("ledger.jsonl") or ""))
    assert state.runs == 1 and state.get("a#0") is not None


async def test_a_second_run_is_refused_naming_the_holder(url: str) -> None:
    """While a run holds the output, another gets a LedgerError naming its pid and host."""
    async with Ledger(url, store=FsspecStore.from_url(url)):
        second = Ledger(url, store=FsspecStore.from_url(url))
        message = rf"{url} is in use by another cometbatch run \(pid {os.getpid()} on "
        with pytest.raises(LedgerError, match=message + rf"{socket.gethostname()}.*lease until"):
            await second.__aenter__()
    async with Ledger(url, store=FsspecStore.from_url(url)):
        pass  # released: the next run takes it


def lease_of(url: str, clock: list[float]) -> LeaseLock:
    lock = FsspecStore.from_url(url).lock()
    lock._clock = lambda: clock[0]
    return lock


def plant_lock(url: str, **info: Any) -> None:
    FsspecStore.from_url(url).fs.pipe_file(
        "/" + url.removeprefix("memory://") + "/.cometbatch.lock", json.dumps(info).encode()
    )


def test_a_dead_runs_lock_is_taken_over_at_once(url: str) -> None:
    """A lock left by a process of this host that is gone is taken without waiting."""
    dead = 2**22 + 12345  # above pid_max: no such process
    plant_lock(url, pid=dead, host=socket.gethostname(), started_at="x", expires_at=1e12)
    lock = FsspecStore.from_url(url).lock()
    lock.acquire()
    lock.release()


def test_a_lease_from_another_host_holds_until_it_expires(url: str) -> None:
    """Another host's run holds the output while its lease runs; an expired one is taken."""
    plant_lock(url, pid=1, host="elsewhere", started_at="x", expires_at=1000.0)
    clock = [999.0]
    with pytest.raises(LedgerError, match="pid 1 on elsewhere"):
        lease_of(url, clock).acquire()
    clock[0] = 1001.0
    lock = lease_of(url, clock)
    lock.acquire()
    try:
        before = json.loads(FsspecStore.from_url(url).read(".cometbatch.lock"))
        clock[0] = 1500.0
        lock.renew()
        after = json.loads(FsspecStore.from_url(url).read(".cometbatch.lock"))
        assert after["expires_at"] - before["expires_at"] == 499.0
    finally:
        lock.release()
    assert ".cometbatch.lock" not in objects(url)


def test_a_lease_taken_over_is_not_renewed_back(url: str) -> None:
    """A run whose lease another run took over stops renewing instead of taking it back."""
    clock = [1000.0]
    lock = lease_of(url, clock)
    lock.acquire()
    try:
        plant_lock(url, pid=1, host="elsewhere", started_at="x", expires_at=9999.0, token="t")
        lock.renew()
        assert json.loads(FsspecStore.from_url(url).read(".cometbatch.lock"))["token"] == "t"
    finally:
        lock.release()
    assert ".cometbatch.lock" in objects(url)  # the other run's, left alone


async def test_engine_runs_and_resumes_on_a_store(url: str) -> None:
    """A run writes every image object and its ledger to the store; a rerun sends nothing."""
    manifest = load_manifest(DEMO)
    async with Simulator(SimConfig(seed=1)) as sim:
        async with Engine(settings_for(sim), out_dir=url) as engine:
            await run_all(engine, manifest)
        sent = sim.stats.requests
        assert engine.summary.ok_requests == manifest.stats.requests
        async with Engine(settings_for(sim), out_dir=url) as engine:
            await run_all(engine, manifest)
        assert sim.stats.requests == sent
        assert engine.summary.skipped_requests == manifest.stats.requests
    images = objects(url, "images")
    assert len(images) == engine.summary.planned_images
    assert not await asyncio.to_thread(os.path.exists, "memory:")


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_every_command_takes_the_url(url: str) -> None:
    """run, a rerun, status, verify, export, gallery and fetch all work on memory://."""
    first = invoke("run", str(DEMO), "--simulate", "--out", url, "--json")
    assert first.exit_code == 0, first.stderr
    data = json.loads(first.output)
    assert data["out_dir"] == url and data["simulator_requests"] > 0
    again = json.loads(invoke("run", str(DEMO), "--simulate", "--out", url, "--json").output)
    assert again["simulator_requests"] == 0
    status = json.loads(invoke("status", url, "--json").output)
    assert status["state"] == "finished" and status["runs"] == 2
    verify = invoke("verify", url, "--json")
    assert verify.exit_code == 0 and json.loads(verify.output)["bad"] == []
    exported = invoke("export", url, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(exported.output)))
    assert {row["job_id"] for row in rows} == {job.id for job in load_manifest(DEMO)}
    gallery = invoke("gallery", url)
    assert gallery.output.strip() == f"{url}/index.html"
    assert b"<html" in FsspecStore.from_url(url).read("index.html").lower()
    assert invoke("fetch", url).exit_code == 0


def test_verify_on_a_store_names_a_missing_object(url: str) -> None:
    """verify finds an image object that is gone and marks it; the next run restores it."""
    assert invoke("run", str(DEMO), "--simulate", "--out", url).exit_code == 0
    store = FsspecStore.from_url(url)
    gone = store.names("images")[0]
    store.remove(gone)
    checked = invoke("verify", url)
    assert checked.exit_code == 1 and gone in checked.output
    rerun = json.loads(invoke("run", str(DEMO), "--simulate", "--out", url, "--json").output)
    assert rerun["simulator_requests"] >= 1
    assert gone in FsspecStore.from_url(url).names("images")


def test_a_secret_option_is_written_and_printed_nowhere(url: str) -> None:
    """A storage option's value appears in no output, object, ledger line or summary."""
    secret = "S3cr3t-" + uuid.uuid4().hex
    option = f"--storage-option=secret_token={secret}"
    outputs = [
        invoke("run", str(DEMO), "--simulate", "--out", url, "--json", option),
        invoke("status", url, option),
        invoke("verify", url, "--json", option),
        invoke("export", url, "--format", "jsonl", option),
        invoke("run", str(DEMO), "--simulate", "--out", url, "-vv", option),
    ]
    for done in outputs:
        assert done.exit_code == 0, done.stderr
        assert secret not in done.output and secret not in done.stderr
    store = FsspecStore.from_url(url)
    for name in store.names(""):
        assert secret.encode() not in store.read(name), name
    assert secret not in repr(open_store(url, {"secret_token": secret}))


class _Refusing:
    """A filesystem whose library fails with an error of its own (not an OSError)."""

    def find(self, path: str, detail: bool = False) -> list[str]:
        raise RuntimeError("Partial credentials found in explicit, missing: key")

    def invalidate_cache(self, path: str | None = None) -> None:
        pass


def test_a_filesystem_librarys_own_error_is_a_clear_ledger_error() -> None:
    """An error of the filesystem's library (bad credentials) reads as an OSError from the
    store, and `status` names the output and the reason instead of a traceback."""
    store = FsspecStore("memory://x/run", _Refusing(), "/x/run")
    with pytest.raises(OSError, match="RuntimeError: Partial credentials") as info:
        store.names("images")
    # Not chained: the library's own text may hold a credential, and -vv shows tracebacks.
    assert info.value.__suppress_context__
    with pytest.raises(LedgerError, match=r"cannot read the ledger of memory://x/run: Runtime"):
        read_status(store)


async def test_a_run_that_lost_its_lease_writes_nothing_more(url: str) -> None:
    """Once another run took the lock over (or the lease ran out while this run stalled),
    images, removals and ledger segments are refused instead of overwriting that run's."""
    store = FsspecStore.from_url(url)
    lock = store.lock()
    lock.acquire()
    try:
        log = store.open_log("ledger.jsonl", sync=False)
        log.append(b'{"event":"run"}\n', False)
        await store.put("images/j/0.png", b"png")
        taken = {"pid": 1, "host": "elsewhere", "token": "theirs", "expires_at": 4e9}
        store.fs.pipe_file(f"{store.base}/.cometbatch.lock", json.dumps(taken).encode())
        lock.renew()
        with pytest.raises(LedgerError, match="taken over by another run"):
            await store.put("images/j/1.png", b"png")
        with pytest.raises(LedgerError, match="taken over"):
            log.append(b'{"event":"end"}\n', False)
        with pytest.raises(LedgerError):
            store.remove("images/j/0.png")
        log.close(False)
    finally:
        lock.release()
    assert objects(url, "images") == ["images/j/0.png"]


async def test_a_stalled_run_whose_lease_ran_out_stops_writing(url: str) -> None:
    """A run paused past most of its lease (another run may have taken over) writes nothing."""
    store = FsspecStore.from_url(url)
    lock = store.lock()
    lock.acquire()
    try:
        await store.put("images/j/0.png", b"png")
        now = lock._clock()
        lock._clock = lambda: now + lock.lease_s
        with pytest.raises(LedgerError, match="ran out"):
            await store.put("images/j/1.png", b"png")
    finally:
        lock._clock = lambda: now
        lock.release()


def test_two_logs_from_one_listing_never_replace_a_segment(url: str, tmp_path: Path) -> None:
    """Two writers that numbered from the same listing: the second is refused, the first's
    lines stay."""
    store = FsspecStore.from_url(url)
    first = store.open_log("ledger.jsonl", sync=False)
    second = store.open_log("ledger.jsonl", sync=False)
    first.append(b'{"a":1}\n', False)
    with pytest.raises(LedgerError, match="another run wrote the ledger segment"):
        second.append(b'{"b":2}\n', False)
    first.close(False)
    second.close(False)
    copy = store.log_copy("ledger.jsonl")
    assert copy is not None and Path(copy).read_bytes() == b'{"a":1}\n'


def test_credentials_in_the_url_are_refused_without_being_echoed() -> None:
    """A URL with a user name or password would be printed in every message: refused."""
    with pytest.raises(ConfigError) as info:
        open_store("memory://AKIAEXAMPLE:SECRETXYZ@bucket/x")
    assert "SECRETXYZ" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)
    done = CliRunner().invoke(main, ["status", "s3://AKIAEXAMPLE:SECRETXYZ@bucket/x"])
    assert done.exit_code != 0 and "SECRETXYZ" not in done.output


class _Leaky:
    """A filesystem whose library puts an option's value, or an unknown option, in errors."""

    def find(self, path: str, **kwargs: Any) -> list[str]:
        raise ValueError("Invalid endpoint: https://SECRETHOST.example:9000")

    def info(self, path: str) -> dict[str, Any]:
        raise TypeError("AioSession.__init__() got an unexpected keyword argument 'bogus_opt'")

    def invalidate_cache(self, path: str | None = None) -> None:
        pass


def test_library_errors_name_no_option_value_and_name_an_unknown_option() -> None:
    """An option's value in a library's message is blanked; an unknown option is named."""
    store = FsspecStore("memory://x/run", _Leaky(), "/x/run", ["https://SECRETHOST.example:9000"])
    with pytest.raises(OSError) as leaked:
        store.names("images")
    assert "SECRETHOST" not in str(leaked.value) and "***" in str(leaked.value)
    with pytest.raises(OSError, match="does not take the storage option 'bogus_opt'"):
        store.stat("images/j/0.png")


def test_two_runs_that_found_the_output_free_at_once_cannot_both_take_it(url: str) -> None:
    """The lock object is created with a write that fails when it exists: the second of two
    runs that both read "free" is refused, and the first keeps its lock."""
    first, second = FsspecStore.from_url(url).lock(), FsspecStore.from_url(url).lock()
    free = second.holder
    second.holder = lambda: None  # type: ignore[method-assign]  # it read before the first wrote
    first.acquire()
    try:
        with pytest.raises(LedgerError, match="in use by another cometbatch run"):
            second.acquire()
        second.holder = free  # type: ignore[method-assign]
        assert not second.held and first.holder() == first._info
    finally:
        first.release()
