"""Tests for image format detection, base64 decoding and the atomic image sink."""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import errno
import hashlib
import io
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cometbatch import Engine, ImageDataError, Job, Settings, SimConfig, Simulator
from cometbatch.results import ImageRecord
from cometbatch.store import sink as sink_module
from cometbatch.store._writers import Writers
from cometbatch.store.imagecheck import check_image, detect_format
from cometbatch.store.local import LocalStore
from cometbatch.store.sink import Sink, decode_b64


def make_image(fmt: str, size: tuple[int, int] = (4, 4)) -> bytes:
    """Encode a small real image with Pillow."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = make_image("PNG")
JPEG = make_image("JPEG")
WEBP = make_image("WEBP")


def files_under(root: Path) -> list[str]:
    """Every file below `root`, as sorted relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (PNG, "png"),
        (JPEG, "jpeg"),
        (WEBP, "webp"),
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"", None),
        (b"GIF89a", None),
        (b"RIFF\x00\x00\x00\x00WAVE", None),
        (b"RIFF", None),
        (b"\x89PNG\r\n", None),
        (b"\xff\xd8", None),
        (b"<html>not an image</html>", None),
        (b'{"error": {}}', None),
    ],
)
def test_detect_format(data: bytes, expected: str | None) -> None:
    """The format comes from the magic bytes alone, and unknown bytes give None."""
    assert detect_format(data) == expected


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(PNG).decode(),
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
        "DATA:image/png;BASE64," + base64.b64encode(PNG).decode(),
        base64.encodebytes(PNG).decode(),
        "  " + base64.b64encode(PNG).decode() + "\r\n",
    ],
)
def test_decode_b64_accepts_prefix_and_line_breaks(text: str) -> None:
    """Base64 decodes with or without a data: prefix and with MIME line breaks."""
    assert decode_b64(text) == PNG


@pytest.mark.parametrize(
    "text",
    [
        "not base64!",
        "abc",
        "=YWJj",
        "YW=j",
        "YWI",
        "YW Jj*",
        "\u00e9\u00e9\u00e9\u00e9",
        "",
        "   ",
        "data:image/png,iVBORw0KGgo=",
        "data:image/png;base64",
    ],
)
def test_decode_b64_rejects_invalid_data(text: str) -> None:
    """Invalid base64 raises a non-retryable ImageDataError."""
    with pytest.raises(ImageDataError, match="invalid base64 image data") as info:
        decode_b64(text)
    assert info.value.retryable is False
    assert info.value.kind == "invalid_image"


def _strict_or_none(decode: Callable[[str], bytes], text: str) -> bytes | None:
    try:
        return decode(text)
    except (binascii.Error, ValueError):
        return None


def test_large_base64_is_decoded_in_slices_exactly_as_in_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decoding slice by slice (so a worker thread lets go of the GIL between slices) accepts
    and refuses exactly what one strict call does, padding rules included."""
    monkeypatch.setattr(sink_module, "_B64_SLICE", 8)
    rng = random.Random(7)
    texts = ["", "=", "YQ==YQ==", "YWJjZGVmZ2hpamts", "YWJjZGVmZ2hpamt=", "YWJjZGVmZ2hpamtsbQ=="]
    texts += ["YWJjZGVmZ2hp=mts", "YWJjZGVm Z2hpamts", "YWJjZGVmZ2hpamtsbQ==A", "YWJjZGVmZ2hpamts="]
    for _ in range(3000):
        text = base64.b64encode(rng.randbytes(rng.randint(0, 40))).decode()
        for _ in range(rng.randint(0, 2)):
            if text:
                at = rng.randrange(len(text))
                text = text[:at] + rng.choice("A/+= \né") + text[at + 1 :]
        texts.append(text + rng.choice(["", "", "=", "A", "AB=="]))

    def whole(text: str) -> bytes:
        return binascii.a2b_base64(text, strict_mode=True)

    for text in texts:
        assert _strict_or_none(sink_module._a2b_strict, text) == _strict_or_none(whole, text), text


def _reference_decode(text: str) -> bytes | None:
    """decode_b64's contract with binascii alone: strict, else strict without whitespace."""
    body = text.strip()
    for candidate in (body, "".join(body.split())):
        decoded = _strict_or_none(lambda t: binascii.a2b_base64(t, strict_mode=True), candidate)
        if decoded is not None:
            return decoded or None
    return None


@pytest.mark.parametrize("simd", [True, False])
def test_fast_decoding_accepts_and_refuses_exactly_what_strict_binascii_does(simd: bool) -> None:
    """The SIMD fast path refuses some paddings strict binascii accepts; those fall through
    to the exact path, so decode_b64 answers exactly as binascii alone would."""
    rng = random.Random(11)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    texts = ["YWJjZGVmZ2hpamts=", "294Z=", "YQ", "YQ=", "YR==", "a===", "Y\nQ==", " YQ== "]
    for _ in range(20_000):
        text = base64.b64encode(rng.randbytes(rng.randint(0, 40))).decode()
        for _ in range(rng.randint(0, 3)):
            if text:
                at = rng.randrange(len(text))
                keep = rng.random() < 0.7
                text = text[:at] + rng.choice("A/+= \né-_\x00" + alphabet[:5]) + text[at + keep :]
        texts.append(text + rng.choice(["", "", "=", "==", "A", "AB==", "\n"]))
    accepted = 0
    for text in texts:
        expected = _reference_decode(text)
        try:
            got: bytes | None = sink_module.decode_b64(text, simd=simd)
        except ImageDataError:
            got = None
        assert got == expected, text
        accepted += expected is not None
    assert accepted > 1000  # the corpus exercises the accepting side too


def test_valid_base64_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Well-formed data never reaches the slow exact path (10+ ms per 2 MB image)."""

    def slow_path(body: str) -> bytes:
        raise AssertionError("the exact path was used for valid data")

    monkeypatch.setattr(sink_module, "_a2b_strict", slow_path)
    data = os.urandom(3 * 1024 * 1024)
    assert decode_b64(base64.b64encode(data).decode(), simd=True) == data


def test_image_record_to_dict_has_exactly_the_ledger_keys() -> None:
    """An ImageRecord serializes to the ledger's image object."""
    record = ImageRecord(0, "images/a/0.png", "png", 3, "ab" * 32, "a cat")
    assert record.to_dict() == {
        "index": 0,
        "path": "images/a/0.png",
        "format": "png",
        "bytes": 3,
        "sha256": "ab" * 32,
        "revised_prompt": "a cat",
    }


@pytest.mark.parametrize(("data", "fmt", "ext"), [(PNG, "png", "png"), (JPEG, "jpeg", "jpg")])
async def test_write_is_atomic_and_recorded(
    tmp_path: Path, data: bytes, fmt: str, ext: str
) -> None:
    """A written image is complete at its final name, with no temp file left."""
    sink = Sink(tmp_path)
    record = await sink.write("cat-01", 2, data, revised_prompt="a red cat")
    assert record == ImageRecord(
        2, f"images/cat-01/2.{ext}", fmt, len(data), hashlib.sha256(data).hexdigest(), "a red cat"
    )
    final = tmp_path / record.path
    assert final.read_bytes() == data
    assert files_under(tmp_path) == [record.path]
    assert "written=1" in repr(sink)


async def test_large_images_are_hashed_and_written_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below offload_bytes an image is hashed on the event loop, at or above it in a worker
    thread; a file is written (renamed into place) in a writer thread, or on the loop when
    below the store's loop_bytes and not fsynced; the records are the same either way."""
    on_loop: list[bool] = []
    renamed_on_loop: list[bool] = []
    real_sha256, real_replace = hashlib.sha256, os.replace

    def sha256(data: bytes = b"") -> Any:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return real_sha256(data)

    def replace(*args: Any) -> None:
        renamed_on_loop.append(threading.current_thread() is threading.main_thread())
        real_replace(*args)

    monkeypatch.setattr(hashlib, "sha256", sha256)
    monkeypatch.setattr(os, "replace", replace)
    on_the_loop = LocalStore(tmp_path, loop_bytes=len(WEBP) + 1)
    small = await Sink(on_the_loop, offload_bytes=len(WEBP) + 1).write("a", 0, WEBP)
    assert (on_loop, renamed_on_loop) == ([True], [True])
    synced = await Sink(on_the_loop, offload_bytes=len(WEBP) + 1, fsync=True).write("s", 0, WEBP)
    assert (on_loop, renamed_on_loop) == ([True, True], [True, False])
    large = await Sink(tmp_path, offload_bytes=len(WEBP)).write("b", 0, WEBP)
    assert (on_loop[2:], renamed_on_loop[2:]) == ([False], [False])
    b64 = base64.b64encode(WEBP).decode()
    await Sink(tmp_path, offload_bytes=len(b64)).decode_and_write("c", 0, b64)
    await Sink(tmp_path, offload_bytes=len(b64) + 1).decode_and_write("d", 0, b64)
    assert on_loop[3:] == [False, True]
    assert small.sha256 == synced.sha256 == large.sha256 == real_sha256(WEBP).hexdigest()


async def test_writer_threads_batch_start_on_demand_and_leave_when_idle() -> None:
    """Writer threads return every result and error to its own caller, leave once idle, and
    start again for the next write."""

    def work(i: int) -> int:
        if i % 7 == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return i * i

    writers = Writers(size=2, idle=0.01)

    def submit(i: int) -> asyncio.Future[int]:
        future = asyncio.get_running_loop().create_future()

        def report(result: int, exc: BaseException | None) -> None:
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)

        writers.submit(work, (i,), report)
        return future

    outcomes = await asyncio.gather(*(submit(i) for i in range(200)), return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if i % 7 == 3:
            assert isinstance(outcome, OSError) and outcome.errno == errno.ENOSPC
        else:
            assert outcome == i * i
    for _ in range(500):
        if writers._threads == 0:
            break
        await asyncio.sleep(0.01)
    assert writers._threads == 0
    assert await submit(5) == 25


async def test_write_rejects_unknown_bytes_without_touching_disk(tmp_path: Path) -> None:
    """Bytes that are not PNG, JPEG or WebP raise ImageDataError and write nothing."""
    with pytest.raises(ImageDataError, match="not a PNG, JPEG or WebP image") as info:
        await Sink(tmp_path).write("a", 0, b"<html>oops</html>")
    assert info.value.retryable is False
    assert files_under(tmp_path) == []


def _cut(data: bytes) -> bytes:
    return data[: int(len(data) * 0.6)]


def _zero_filled(data: bytes) -> bytes:
    return data[: len(data) // 2] + bytes(len(data) - len(data) // 2)


# A WebP is checked as a container (its RIFF and chunk lengths), not as compressed data: one
# whose lengths are right but whose data was zeroed is not caught, and is not tested here.
BROKEN = {
    "png 60%": _cut(PNG),
    "png 40 bytes": PNG[:40],
    "png zero-filled": _zero_filled(PNG),
    "jpeg 60%": _cut(JPEG),
    "jpeg 40 bytes": JPEG[:40],
    "jpeg zero-filled": _zero_filled(JPEG),
    "webp 60%": _cut(WEBP),
    "webp 40 bytes": WEBP[:40],
}


@pytest.mark.parametrize("offload_bytes", [0, 10**9])
@pytest.mark.parametrize("base64_answer", [False, True])
@pytest.mark.parametrize("name", BROKEN)
async def test_write_refuses_an_image_that_is_not_whole(
    tmp_path: Path, name: str, base64_answer: bool, offload_bytes: int
) -> None:
    """A cut image is checked, not sniffed: on the loop and in the writer threads, as bytes and
    as base64, it raises a retryable ImageDataError and writes nothing."""
    sink = Sink(tmp_path, offload_bytes=offload_bytes)
    broken = BROKEN[name]
    with pytest.raises(ImageDataError, match="incomplete or corrupt") as info:
        if base64_answer:
            await sink.decode_and_write("a", 0, base64.b64encode(broken).decode())
        else:
            await sink.write("a", 0, broken)
    assert (info.value.kind, info.value.retryable) == ("invalid_image", True)
    assert files_under(tmp_path) == []
    assert sink.written == 0


async def test_write_replaces_an_existing_image(tmp_path: Path) -> None:
    """Regenerating a request overwrites the earlier file at the same name."""
    sink = Sink(tmp_path)
    await sink.write("a", 0, make_image("PNG", (2, 2)))
    record = await sink.write("a", 0, PNG)
    assert (tmp_path / record.path).read_bytes() == PNG
    assert files_under(tmp_path) == ["images/a/0.png"]


async def test_dangerous_job_id_is_written_inside_images(tmp_path: Path) -> None:
    """A job id that tries to escape is written under its sanitized folder in OUT/images."""
    out = tmp_path / "out"
    record = await Sink(out).write("../../escape", 0, PNG)
    assert (out / record.path).resolve().parent.parent == (out / "images").resolve()
    assert files_under(tmp_path) == [f"out/{record.path}"]


class FailingFile:
    """A file stand-in that writes part of the data, then hits a full disk."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, data: bytes) -> int:
        self.real.write(data[:10])
        self.real.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()


class FailingOpen:
    """Replaces open() for temporary image files: opens the real file, then fails the write."""

    def __init__(self) -> None:
        self.opened: list[Path] = []
        self.real_open: Any = builtins.open

    def __call__(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real = self.real_open(path, mode, *args, **kwargs)
        if not str(path).endswith(".tmp"):
            return real
        self.opened.append(Path(path))
        return FailingFile(real)


@pytest.mark.parametrize("loop_bytes", [0, 10**9])
async def test_failed_write_leaves_no_temp_and_no_final_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_bytes: int
) -> None:
    """A write that fails midway removes its temp file, writes no final file, and re-raises."""
    fake = FailingOpen()
    monkeypatch.setattr(builtins, "open", fake)
    with pytest.raises(OSError) as info:
        await Sink(LocalStore(tmp_path, loop_bytes=loop_bytes)).write("a", 0, PNG)
    assert info.value.errno == errno.ENOSPC
    # Opened once: a new job folder is made first (by trying), then the temp file in it.
    assert len(fake.opened) == 1
    assert fake.opened[0].name.startswith(".0.")
    assert fake.opened[0].name.endswith(".tmp")
    assert fake.opened[0].parent == tmp_path / "images" / "a"
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("loop_bytes", [0, 10**9])
async def test_failed_rename_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_bytes: int
) -> None:
    """If the final rename fails, the temp file is removed and the error propagates."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        await Sink(LocalStore(tmp_path, loop_bytes=loop_bytes)).write("a", 0, PNG)
    assert files_under(tmp_path) == []


class Stall:
    """Holds the worker thread inside a file operation until the test releases it."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        self.release.wait(30)
        return self.real(*args, **kwargs)


class StalledWrites:
    """Replaces open() for temporary image files: their write waits in `stall`."""

    def __init__(self, stall: Stall) -> None:
        self.stall = stall
        self.real_open: Any = builtins.open

    def __call__(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real = self.real_open(path, mode, *args, **kwargs)
        if not str(path).endswith(".tmp"):
            return real
        self.stall.real = real.write
        file = FailingFile(real)
        file.write = self.stall  # type: ignore[method-assign]
        return file


@pytest.mark.parametrize("stalled", ["write", "rename"])
async def test_cancelled_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stalled: str
) -> None:
    """A write cancelled while its thread writes or renames leaves neither a temp file nor an
    unrecorded image; called off before its rename, it leaves the earlier image alone."""
    # Written in a writer thread (a write on the event loop cannot be cancelled midway).
    sink = Sink(LocalStore(tmp_path, loop_bytes=0))
    earlier = make_image("PNG", (2, 2))
    await sink.write("a", 0, earlier)
    stall = Stall(os.replace)
    if stalled == "write":
        monkeypatch.setattr(builtins, "open", StalledWrites(stall))
    else:
        monkeypatch.setattr(os, "replace", stall)
    task = asyncio.create_task(sink.write("a", 0, PNG))
    assert await asyncio.to_thread(stall.started.wait, 30)
    assert len(files_under(tmp_path)) == 2  # the earlier image and the temp file
    task.cancel()
    await asyncio.sleep(0)
    # The cancellation waits for the thread, which cannot be interrupted, to finish.
    assert not task.done()
    stall.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    if stalled == "write":
        assert files_under(tmp_path) == ["images/a/0.png"]
        assert (tmp_path / "images" / "a" / "0.png").read_bytes() == earlier
    else:
        assert files_under(tmp_path) == []
    assert "in_flight=0" in repr(sink)


@pytest.mark.parametrize("offload_bytes", [0, 10**9])
async def test_decode_and_write(tmp_path: Path, offload_bytes: int) -> None:
    """Base64 image data is decoded (in a thread when large) and written."""
    sink = Sink(tmp_path, offload_bytes=offload_bytes)
    record = await sink.decode_and_write(
        "j", 1, "data:image/webp;base64," + base64.b64encode(WEBP).decode(), revised_prompt="p"
    )
    assert record.path == "images/j/1.webp"
    assert record.revised_prompt == "p"
    assert (tmp_path / record.path).read_bytes() == WEBP


async def test_decode_and_write_rejects_bad_base64(tmp_path: Path) -> None:
    """Bad base64 raises ImageDataError before anything is written."""
    with pytest.raises(ImageDataError):
        await Sink(tmp_path).decode_and_write("j", 0, "%%%")
    assert files_under(tmp_path) == []


def test_remove_stale_temp_files(tmp_path: Path) -> None:
    """Leftover temp files under OUT/images are deleted and counted; images stay."""
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "b").mkdir()
    (tmp_path / "images" / "a" / "0.png").write_bytes(PNG)
    (tmp_path / "images" / "a" / ".1.0a1b2c.tmp").write_bytes(b"half")
    (tmp_path / "images" / "b" / ".0.ffee.tmp").write_bytes(b"")
    (tmp_path / "images" / "stray.txt").write_bytes(b"not a folder")
    sink = Sink(tmp_path)
    assert sink.remove_stale_temp_files() == 2
    assert files_under(tmp_path) == ["images/a/0.png", "images/stray.txt"]
    assert sink.remove_stale_temp_files() == 0


def test_remove_stale_temp_files_without_images_folder(tmp_path: Path) -> None:
    """A fresh output folder has nothing to clean."""
    assert Sink(tmp_path / "missing").remove_stale_temp_files() == 0


# -- through the engine and real HTTP -------------------------------------------------------


async def test_an_answer_whose_image_stays_cut_off_never_gives_an_ok_line(
    tmp_path: Path,
) -> None:
    """Cut-off base64 images on every attempt: the request fails as a retryable invalid_image,
    its retries counted as possibly billed, no file stays; the next run sends it again."""
    job = Job(id="b", prompt="a bell", model="gpt-image-1", n=1)
    async with Simulator(SimConfig(seed=5)) as sim:
        sim.enqueue("truncated-image", "truncated-image")
        settings = Settings(base_url=sim.base_url, api_key="sk-test", max_attempts=2)
        async with Engine(settings, out_dir=tmp_path, sleep=_no_sleep) as engine:
            (result,) = [r async for r in engine.run([job])]
        assert (result.status, result.attempts, result.ambiguous_retries) == ("failed", 2, 1)
        assert result.error is not None
        assert (result.error["kind"], result.error["retryable"]) == ("invalid_image", True)
        assert "cut short" in result.error["message"]
        assert engine.summary.ambiguous_retries == 1
        assert files_under(tmp_path / "images") == []
        async with Engine(settings, out_dir=tmp_path, sleep=_no_sleep) as engine:
            (again,) = [r async for r in engine.run([job])]
        assert again.ok and sim.stats.requests == 3
    (image,) = again.images
    assert check_image((tmp_path / image.path).read_bytes()) == image.format == "png"


async def _no_sleep(_: float) -> None:
    """Retry waits take no real time."""
