"""Local faults (an unwritable folder, a full disk, a read-only ledger): each stops the run with
one clear message and leaves a ledger from which the next run finishes without paying twice."""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image
from support import no_sleep, serve, settings_for

from cometbatch import Engine, Job, OutputError, Settings, SimConfig, Simulator
from cometbatch.ledger.writer import Ledger
from cometbatch.simulator.imagegen import make_png

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
# Root writes through any permission bits, so there a chmod cannot make a folder unwritable.
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_chmod = pytest.mark.skipif(
    IS_ROOT or sys.platform == "win32",
    reason="permission bits do not stop root (or Windows); the patched variant covers this",
)
EACCES = os.strerror(errno.EACCES)
ENOSPC = os.strerror(errno.ENOSPC)
EROFS = os.strerror(errno.EROFS)

# --- fault injection ---------------------------------------------------------------------
#
# Each fault patches the few entry points cometbatch reaches the filesystem through (os.mkdir
# under os.makedirs and Path.mkdir, os.open, open, os.replace) and refuses what the real fault
# would refuse, with the same errno. `install` takes the setattr to patch with: the test's
# monkeypatch.setattr in this process, builtins.setattr in a CLI subprocess.

Setattr = Callable[[Any, str, Any], None]
# (path, operation) -> errno to fail with, or None; operations: create, write, remove.
Rule = Callable[[Path, str], int | None]


def _path(file: Any) -> Path | None:
    """An absolute path for a path-like argument (None for file descriptors)."""
    if isinstance(file, str | bytes | os.PathLike):
        return Path(os.path.abspath(os.fsdecode(file)))
    return None


def deny_entries(folder: Path) -> Rule:
    """What `chmod a-w folder` does: no entry inside it can be created, renamed or removed."""

    def rule(path: Path, op: str) -> int | None:
        return errno.EACCES if op in ("create", "remove") and path.parent == folder else None

    return rule


def deny_writes(file: Path) -> Rule:
    """What `chmod a-w file` does: it cannot be opened for writing."""

    def rule(path: Path, op: str) -> int | None:
        return errno.EACCES if op == "write" and path == file else None

    return rule


def read_only_filesystem(top: Path) -> Rule:
    """A read-only mount at `top`: nothing under it can be created, written or removed."""

    def rule(path: Path, op: str) -> int | None:
        return errno.EROFS if path == top or top in path.parents else None

    return rule


def patch_filesystem(rule: Rule, set_attr: Setattr) -> None:
    """Make the filesystem entry points cometbatch uses obey `rule`."""
    real_mkdir, real_os_open, real_open = os.mkdir, os.open, io.open
    real_replace, real_rename, real_unlink = os.replace, os.rename, os.unlink

    def check(file: Any, *ops: str) -> None:
        path = _path(file)
        for op in ops:
            code = rule(path, op) if path is not None else None
            if code is not None:
                raise OSError(code, os.strerror(code), os.fsdecode(file))

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        check(path, "create")
        real_mkdir(path, *args, **kwargs)

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and not os.path.exists(path):
            check(path, "create")
        if flags & (os.O_WRONLY | os.O_RDWR):
            check(path, "write")
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "x" in mode or (("w" in mode or "a" in mode) and not os.path.exists(file)):
            check(file, "create")
        if any(flag in mode for flag in "wax+"):
            check(file, "write")
        return real_open(file, mode, *args, **kwargs)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        check(src, "remove")
        check(dst, "create")
        real_replace(src, dst, *args, **kwargs)

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        check(src, "remove")
        check(dst, "create")
        real_rename(src, dst, *args, **kwargs)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        check(path, "remove")
        real_unlink(path, *args, **kwargs)

    set_attr(os, "mkdir", mkdir)
    set_attr(os, "open", os_open)
    set_attr(os, "replace", replace)
    set_attr(os, "rename", rename)
    set_attr(os, "unlink", unlink)
    set_attr(os, "remove", unlink)
    set_attr(builtins, "open", open_)
    set_attr(io, "open", open_)


class FullDisk:
    """Replaces open(): the chosen files take `budget` writes, then the disk is full.

    The write that hits the full disk puts half its bytes on disk first, as a real one can.
    With `by_line`, the budget counts lines instead of writes (the ledger writes several
    queued lines at once), and the line that hits the full disk is the one cut in half.
    """

    def __init__(
        self, chosen: Callable[[Path], bool], budget: int, *, by_line: bool = False
    ) -> None:
        self.chosen = chosen
        self.budget = budget
        self.by_line = by_line
        self.failures = 0
        self.real_open: Any = builtins.open

    def __call__(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = self.real_open(file, mode, *args, **kwargs)
        path = _path(file)
        reading = mode.startswith("r") and "+" not in mode
        if reading or path is None or not self.chosen(path):
            return opened
        return _FullFile(opened, self)

    def install(self, set_attr: Setattr) -> FullDisk:
        set_attr(builtins, "open", self)
        set_attr(io, "open", self)
        return self


class _FullFile:
    """A file whose writes spend the disk's budget."""

    def __init__(self, real: Any, disk: FullDisk) -> None:
        self.real = real
        self.disk = disk

    def write(self, data: bytes) -> int:
        pieces = bytes(data).splitlines(keepends=True) if self.disk.by_line else [data]
        written = 0
        for piece in pieces:
            if self.disk.budget > 0:
                self.disk.budget -= 1
                written += int(self.real.write(piece))
                continue
            self.disk.failures += 1
            self.real.write(piece[: len(piece) // 2])
            self.real.flush()
            raise OSError(errno.ENOSPC, ENOSPC)
        return written

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def ledger_full(out: Path) -> str:
    """What a run says when the disk fills up while it appends to the ledger."""
    ledger = out / "ledger.jsonl"
    return f"cannot write the ledger {ledger}: {ENOSPC}; fix the cause and run again to resume"


def is_image(path: Path) -> bool:
    return path.name.endswith(".tmp") and path.parent.parent.name == "images"


def is_ledger(path: Path) -> bool:
    return path.name == "ledger.jsonl"


def install(fault: str, target: str, set_attr: Setattr) -> None:
    """Install a fault by name (for the CLI subprocess); "none" installs nothing."""
    where = Path(os.path.abspath(target))
    kind, _, count = fault.partition(":")
    if kind == "deny-entries":
        patch_filesystem(deny_entries(where), set_attr)
    elif kind == "deny-writes":
        patch_filesystem(deny_writes(where), set_attr)
    elif kind == "read-only-fs":
        patch_filesystem(read_only_filesystem(where), set_attr)
    elif kind == "full-disk-images":
        FullDisk(is_image, int(count)).install(set_attr)
    elif kind == "full-disk-ledger":
        FullDisk(is_ledger, int(count), by_line=True).install(set_attr)
    elif kind != "none":
        raise ValueError(f"unknown fault {fault!r}")


@contextlib.contextmanager
def chmod(path: Path, mode: int) -> Iterator[None]:
    """Real permission bits, restored afterwards (so tmp_path can be cleaned up)."""
    before = path.stat().st_mode & 0o7777
    path.chmod(mode)
    try:
        yield
    finally:
        path.chmod(before)


@contextlib.contextmanager
def unwritable(how: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`folder` refuses new entries: by chmod 0o500, or by the patched equivalent."""
    if how == "chmod":
        with chmod(folder, 0o500):
            yield
    else:
        with monkeypatch.context() as patch:
            patch_filesystem(deny_entries(folder), patch.setattr)
            yield


WAYS = [pytest.param("chmod", marks=needs_chmod), "patched"]

# --- engine level ------------------------------------------------------------------------


def make_jobs(count: int, **fields: Any) -> list[Job]:
    fields = {"model": "qwen-image", "response_format": "b64_json", **fields}
    return [Job(id=f"j{i}", prompt=f"picture {i}", **fields) for i in range(count)]


JOBS = make_jobs(8)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=3)) as server:
        yield server


async def run_jobs(sim: Simulator, out: Path, jobs: list[Job], **overrides: Any) -> Engine:
    settings = settings_for(sim, **{"concurrency": 2, **overrides})
    async with Engine(settings, out_dir=out, sleep=no_sleep) as engine:
        async for _ in engine.run(jobs):
            pass
    return engine


def ledger_events(out: Path) -> list[dict[str, Any]]:
    """Every ledger line, each of which must be a whole JSON event with its newline."""
    data = (out / "ledger.jsonl").read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def ok_images(events: list[dict[str, Any]]) -> dict[str, str]:
    """Image path -> sha256, for every image an ok line names."""
    return {
        image["path"]: image["sha256"]
        for event in events
        if event["event"] == "result" and event["status"] == "ok"
        for image in event["images"]
    }


def ok_keys(events: list[dict[str, Any]]) -> set[str]:
    return {e["key"] for e in events if e["event"] == "result" and e["status"] == "ok"}


def recorded_ok(out: Path) -> set[str]:
    """The keys the ledger has as ok (none without a ledger; a torn last line records none)."""
    path = out / "ledger.jsonl"
    whole = path.read_bytes().rpartition(b"\n")[0] if path.exists() else b""
    return ok_keys([json.loads(line) for line in whole.splitlines()])


def image_files(out: Path) -> set[str]:
    """Image files under OUT/images, relative to OUT; a temporary file fails the test."""
    images = out / "images"
    found = {p for p in images.rglob("*") if p.is_file()} if images.exists() else set()
    assert [p for p in found if p.name.endswith(".tmp")] == []
    return {p.relative_to(out).as_posix() for p in found}


def assert_files_match_ledger(out: Path) -> None:
    """The image files are exactly those the ok lines name, complete and decodable."""
    named = ok_images(ledger_events(out))
    assert image_files(out) == set(named)
    for path, digest in named.items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digest
        with Image.open(out / path) as image:
            image.load()


async def assert_rerun_sends_only_what_is_missing(
    sim: Simulator, out: Path, jobs: list[Job]
) -> None:
    """The next run sends exactly the requests the ledger lacks as ok, and finishes them all."""
    missing = {f"{job.id}#0" for job in jobs} - recorded_ok(out)
    before = sim.stats.requests
    engine = await run_jobs(sim, out, jobs)
    assert engine.summary.complete
    assert sim.stats.requests - before == len(missing)
    assert engine.summary.ok_requests == len(missing)
    assert ok_keys(ledger_events(out)) == {f"{job.id}#0" for job in jobs}
    assert_files_match_ledger(out)


@pytest.mark.parametrize("how", WAYS)
async def test_an_unwritable_images_folder_stops_the_run_and_the_rerun_finishes(
    sim: Simulator, tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUT/images refusing new files stops the run naming it before anything more is paid for;
    the rerun pays only once."""
    out = tmp_path / "out"
    await run_jobs(sim, out, JOBS[:3])
    sent_before = sim.stats.requests
    with unwritable(how, out / "images", monkeypatch), pytest.raises(OutputError) as info:
        await run_jobs(sim, out, JOBS)
    # Checked before the first request of the run: nothing was sent into an unwritable folder.
    assert sim.stats.requests == sent_before
    message = str(info.value)
    assert message.startswith(f"cannot write images in {out}: {EACCES} ({out / 'images'}")
    events = ledger_events(out)
    assert events[-1]["event"] == "end"
    assert {"j0#0", "j1#0", "j2#0"} == ok_keys(events)
    assert_files_match_ledger(out)
    await assert_rerun_sends_only_what_is_missing(sim, out, JOBS)


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize("blocked", ["out", "parent"])
async def test_an_output_folder_that_cannot_be_written_refuses_before_sending(
    sim: Simulator, tmp_path: Path, how: str, blocked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUT (or the folder it would be made in) refusing new entries stops the run at the start."""
    parent = tmp_path / "parent"
    out = parent / "out"
    out.mkdir(parents=True)
    if blocked == "parent":
        out.rmdir()
    with (
        unwritable(how, out if blocked == "out" else parent, monkeypatch),
        pytest.raises(OutputError) as info,
    ):
        await run_jobs(sim, out, JOBS)
    assert str(info.value).startswith(f"cannot use {out} as the output folder: {EACCES}")
    assert sim.stats.requests == 0
    assert not (out / "ledger.jsonl").exists()
    await assert_rerun_sends_only_what_is_missing(sim, out, JOBS)


async def test_a_full_disk_while_writing_images_stops_cleanly(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on the fourth image stops the run; no partial image is left, nothing is lost."""
    out = tmp_path / "out"
    disk = FullDisk(is_image, budget=3).install(monkeypatch.setattr)
    with pytest.raises(OutputError) as info:
        await run_jobs(sim, out, JOBS)
    assert disk.failures >= 1
    assert str(info.value).startswith(f"cannot write images in {out}: {ENOSPC} ({out}")
    events = ledger_events(out)
    assert events[-1]["event"] == "end"
    assert len(ok_keys(events)) == 3
    assert_files_match_ledger(out)
    monkeypatch.undo()
    await assert_rerun_sends_only_what_is_missing(sim, out, JOBS)


async def test_a_full_disk_inside_a_multi_image_request_leaves_no_unrecorded_image(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the second image of a three-image request hits ENOSPC, its first is not kept."""
    out = tmp_path / "out"
    jobs = make_jobs(1, model="dall-e-2", n=3, size="256x256")
    FullDisk(is_image, budget=1).install(monkeypatch.setattr)
    with pytest.raises(OutputError, match=ENOSPC):
        await run_jobs(sim, out, jobs)
    assert ok_keys(ledger_events(out)) == set()
    assert image_files(out) == set()


async def test_a_full_disk_while_appending_to_the_ledger_leaves_only_a_torn_last_line(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC mid-line stops the run; nothing is appended after the torn line, which the rerun
    drops before regenerating exactly the requests without an ok line."""
    out = tmp_path / "out"
    # The run line and seven more fit (results, and the sent line before each request); the
    # ninth line is cut in half.
    disk = FullDisk(is_ledger, budget=8, by_line=True).install(monkeypatch.setattr)
    with pytest.raises(OutputError) as info:
        await run_jobs(sim, out, JOBS)
    assert disk.failures == 1
    assert str(info.value) == ledger_full(out)
    whole, _, torn = (out / "ledger.jsonl").read_bytes().rpartition(b"\n")
    assert torn and not torn.endswith(b"}")
    events = [json.loads(line) for line in whole.splitlines()]
    assert len(events) == 8
    results = [e for e in events if e["event"] == "result"]
    assert [e["event"] for e in events if e["event"] != "sent"] == ["run"] + ["result"] * len(
        results
    )
    assert len(ok_keys(events)) == len(results) >= 1
    # Images written but not recorded may stay: the rerun regenerates and overwrites them.
    assert set(ok_images(events)) <= image_files(out)
    monkeypatch.undo()
    await assert_rerun_sends_only_what_is_missing(sim, out, JOBS)
    rerun = [e["event"] for e in ledger_events(out)][8:]
    assert [kind for kind in rerun if kind != "sent"][:2] == ["run", "result"]


async def test_a_failed_ledger_write_refuses_every_later_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a torn write, no line (not even the end event) can be buried after the torn one."""
    disk = FullDisk(is_ledger, budget=1, by_line=True).install(monkeypatch.setattr)
    async with Ledger(tmp_path) as ledger:
        await ledger.append({"event": "run", "run_id": "r"})
        with pytest.raises(OutputError) as first:
            await ledger.append({"event": "end", "run_id": "r", "summary": {"x": "y"}})
        assert str(first.value) == ledger_full(tmp_path)
        disk.budget = 10  # the disk has room again: still no append after a torn line
        with pytest.raises(OutputError) as later:
            await ledger.append({"event": "end", "run_id": "r"})
        assert str(later.value) == ledger_full(tmp_path)
    data = (tmp_path / "ledger.jsonl").read_bytes()
    assert data.startswith(b'{"event":"run","run_id":"r"}\n')
    assert data.count(b"\n") == 1 and len(data.split(b"\n")[1]) > 0
    monkeypatch.undo()
    async with Ledger(tmp_path) as again:
        assert again.repaired and again.state.runs == 1
    assert (tmp_path / "ledger.jsonl").read_bytes() == b'{"event":"run","run_id":"r"}\n'


async def test_a_failing_fsync_when_the_ledger_closes_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync failure when closing the ledger is an OutputError naming it, and frees the lock."""

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    ledger = await Ledger(tmp_path).__aenter__()
    await ledger.append({"event": "run", "run_id": "r"})
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputError) as info:
        await ledger.aclose()
    monkeypatch.undo()
    path = tmp_path / "ledger.jsonl"
    assert str(info.value) == f"cannot finish writing the ledger {path}: {os.strerror(errno.EIO)}"
    async with Ledger(tmp_path) as again:
        assert again.state.runs == 1


READ_ONLY_LEDGER = [
    pytest.param("chmod", marks=needs_chmod),
    "patched",
    "read-only-ledger-mount",
    "read-only-folder-mount",
]


@pytest.mark.parametrize("how", READ_ONLY_LEDGER)
async def test_a_read_only_ledger_refuses_the_run_before_anything_is_sent(
    sim: Simulator, tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger that cannot be written stops the run at the start, naming it; nothing is sent."""
    out = tmp_path / "out"
    await run_jobs(sim, out, JOBS[:2])
    ledger = out / "ledger.jsonl"
    before, sent = ledger.read_bytes(), sim.stats.requests
    with contextlib.ExitStack() as stack:
        if how == "chmod":
            stack.enter_context(chmod(ledger, 0o400))
        else:
            patch = stack.enter_context(monkeypatch.context())
            rule = {
                "patched": deny_writes(ledger),
                "read-only-ledger-mount": read_only_filesystem(ledger),
                "read-only-folder-mount": read_only_filesystem(out),
            }[how]
            patch_filesystem(rule, patch.setattr)
        with pytest.raises(OutputError) as info:
            await run_jobs(sim, out, JOBS)
    if how == "read-only-folder-mount":
        # The folder lock is the first thing written, so the message names the folder.
        expected = f"cannot use {out} as the output folder: {EROFS} ({out / '.cometbatch.lock'})"
    else:
        reason = EROFS if how.startswith("read-only") else EACCES
        expected = f"cannot open the ledger {ledger}: {reason}"
    assert str(info.value) == expected
    assert sim.stats.requests == sent
    assert ledger.read_bytes() == before
    await assert_rerun_sends_only_what_is_missing(sim, out, JOBS)


async def test_an_unreadable_images_folder_is_a_clear_error_at_the_start(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up scan for unfinished image files names an images folder it cannot read."""
    out = tmp_path / "out"
    await run_jobs(sim, out, JOBS[:1])
    real_scandir = os.scandir

    def refuse(path: Any = ".") -> Any:
        if _path(path) == out / "images":
            raise PermissionError(errno.EACCES, EACCES, os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    sent = sim.stats.requests
    with pytest.raises(OutputError) as info:
        await run_jobs(sim, out, JOBS)
    images = out / "images"
    assert str(info.value) == (
        f"cannot clean up unfinished image files in {images}: {EACCES} ({images})"
    )
    assert sim.stats.requests == sent
    monkeypatch.undo()
    await assert_rerun_sends_only_what_is_missing(sim, out, JOBS)


# --- through the CLI ---------------------------------------------------------------------

# Runs `cometbatch` with a fault installed first: argv is [tests folder, fault, target, *args].
CHILD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import test_local_faults as faults; "
    "faults.install(sys.argv.pop(1), sys.argv.pop(1), setattr); "
    "from cometbatch.cli.main import main; main(prog_name='cometbatch')"
)


def write_manifest(path: Path, count: int) -> Path:
    lines = [
        {
            "id": f"j{i}",
            "prompt": f"picture {i}",
            "model": "qwen-image",
            "response_format": "b64_json",
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_cli(
    manifest: Path,
    out: Path,
    base_url: str,
    *options: str,
    fault: str = "none",
    target: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(TESTS), fault, str(target), "run", str(manifest),
         "--out", str(out), "--base-url", base_url, "--concurrency", "2", *options],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COMETAPI_KEY": "sk-test"},
        cwd=ROOT,
    )  # fmt: skip


def earlier_run(out: Path, base_url: str, count: int) -> None:
    """A finished run of the first `count` jobs (in this process: one CLI start-up less)."""

    async def run() -> None:
        settings = Settings(base_url=base_url, api_key="sk-test")
        async with Engine(settings, out_dir=out, sleep=no_sleep) as engine:
            async for _ in engine.run(make_jobs(count)):
                pass

    asyncio.run(run())
    assert len(recorded_ok(out)) == count


def assert_one_clear_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2 and one line on stderr: the error, with `message` in it; no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr, result.stderr


def assert_cli_rerun_finishes(manifest: Path, out: Path, base_url: str, planned: int) -> None:
    """The same command without the fault sends exactly what the ledger lacks, and completes."""
    done = len(recorded_ok(out))
    rerun = run_cli(manifest, out, base_url, "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["complete"]
    assert (summary["ok_requests"], summary["failed_requests"]) == (planned - done, 0)
    assert summary["skipped_requests"] == done
    assert_files_match_ledger(out)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    from test_cli import simulate_server

    with simulate_server() as url:
        yield url


def test_cli_an_unwritable_images_folder_exits_2_with_one_line(
    tmp_path: Path, base_url: str
) -> None:
    """`run` stops with exit 2 naming the images folder; the same command then finishes."""
    out = tmp_path / "out"
    earlier_run(out, base_url, 3)
    manifest = write_manifest(tmp_path / "six.jsonl", 6)
    images = out / "images"
    with chmod(images, 0o500) if not IS_ROOT else contextlib.nullcontext():
        fault = "deny-entries" if IS_ROOT else "none"
        result = run_cli(manifest, out, base_url, "--quiet", fault=fault, target=images)
    assert_one_clear_line(result, f"error: cannot write images in {out}: {EACCES} ({images}")
    assert ok_keys(ledger_events(out)) == {"j0#0", "j1#0", "j2#0"}
    assert_cli_rerun_finishes(manifest, out, base_url, planned=6)


def test_cli_an_output_folder_that_cannot_be_created_exits_2_with_one_line(
    tmp_path: Path, base_url: str
) -> None:
    """`run --out` inside an unwritable folder refuses at once (exit 2); then it works."""
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "out"
    manifest = write_manifest(tmp_path / "m.jsonl", 4)
    with chmod(parent, 0o500) if not IS_ROOT else contextlib.nullcontext():
        fault = "deny-entries" if IS_ROOT else "none"
        result = run_cli(manifest, out, base_url, fault=fault, target=parent)
    assert_one_clear_line(result, f"error: cannot use {out} as the output folder: {EACCES}")
    assert not out.exists()
    assert_cli_rerun_finishes(manifest, out, base_url, planned=4)


def test_cli_a_full_disk_while_writing_images_exits_2_with_one_line(
    tmp_path: Path, base_url: str
) -> None:
    """ENOSPC on an image: exit 2 with the folder and "No space left on device"; then it works."""
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.jsonl", 6)
    result = run_cli(manifest, out, base_url, fault="full-disk-images:2")
    assert_one_clear_line(result, f"error: cannot write images in {out}: {ENOSPC}")
    assert len(ok_keys(ledger_events(out))) == 2
    assert_files_match_ledger(out)
    assert_cli_rerun_finishes(manifest, out, base_url, planned=6)


def test_cli_a_full_disk_while_appending_to_the_ledger_exits_2_with_one_line(
    tmp_path: Path, base_url: str
) -> None:
    """ENOSPC mid-line in the ledger: exit 2 naming it; the rerun drops the torn line."""
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.jsonl", 6)
    # The run line and six more (results, and the sent line before each request) fit.
    result = run_cli(manifest, out, base_url, "--json", fault="full-disk-ledger:7")
    assert result.returncode == 2, result.stderr
    assert json.loads(result.stdout)["error"] == ledger_full(out)
    assert_one_clear_line(result, f"error: {ledger_full(out)}")
    whole, _, torn = (out / "ledger.jsonl").read_bytes().rpartition(b"\n")
    assert torn
    kept = len(ok_keys([json.loads(line) for line in whole.splitlines()]))
    assert kept >= 1
    rerun = run_cli(manifest, out, base_url, "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert (summary["ok_requests"], summary["skipped_requests"], summary["complete"]) == (
        6 - kept,
        kept,
        True,
    )
    assert_files_match_ledger(out)


def test_cli_a_read_only_ledger_exits_2_naming_it_before_sending(
    tmp_path: Path, base_url: str
) -> None:
    """A read-only ledger: exit 2 naming the ledger, the ledger untouched; then it works."""
    out = tmp_path / "out"
    earlier_run(out, base_url, 2)
    ledger = out / "ledger.jsonl"
    before = ledger.read_bytes()
    manifest = write_manifest(tmp_path / "five.jsonl", 5)
    with chmod(ledger, 0o400):
        fault = "deny-writes" if IS_ROOT else "none"
        result = run_cli(manifest, out, base_url, fault=fault, target=ledger)
    assert_one_clear_line(result, f"error: cannot open the ledger {ledger}: {EACCES}")
    assert ledger.read_bytes() == before
    assert_cli_rerun_finishes(manifest, out, base_url, planned=5)


async def test_a_request_whose_second_image_is_corrupt_leaves_no_file(tmp_path: Path) -> None:
    """A good first image and a bad second one: the request fails and writes nothing."""
    good = base64.b64encode(make_png(8, 8, 1)).decode()

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        body = {"created": 1, "data": [{"b64_json": good}, {"b64_json": "%%% not base64"}]}
        return web.json_response(body)

    job = Job(id="two", prompt="p", model="gpt-image-1", n=2)
    async with serve({("POST", "/v1/images/generations"): handler}) as origin:
        settings = Settings(base_url=f"{origin}/v1", api_key="sk-test")
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = [r async for r in engine.run([job])]
    assert result.status == "failed"
    assert result.error is not None and result.error["kind"] == "invalid_image"
    assert [p for p in (tmp_path / "images").rglob("*") if p.is_file()] == []
