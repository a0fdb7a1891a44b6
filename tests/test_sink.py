"""Tests for image format detection, base64 decoding and the atomic image sink."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import pytest
from PIL import Image

from cometbatch.errors import ImageDataError
from cometbatch.sink import ImageRecord, Sink, decode_b64, detect_format


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


async def test_write_offloads_large_images_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images at or above offload_bytes are hashed in a thread, with the same result."""
    calls: list[Callable[..., Any]] = []
    real_to_thread = asyncio.to_thread

    async def spy(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        calls.append(func)
        return await real_to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    small = await Sink(tmp_path, offload_bytes=len(WEBP) + 1).write("a", 0, WEBP)
    assert calls == []
    large = await Sink(tmp_path, offload_bytes=len(WEBP), fsync=True).write("b", 0, WEBP)
    assert calls
    assert small.sha256 == large.sha256 == hashlib.sha256(WEBP).hexdigest()


async def test_write_rejects_unknown_bytes_without_touching_disk(tmp_path: Path) -> None:
    """Bytes that are not PNG, JPEG or WebP raise ImageDataError and write nothing."""
    with pytest.raises(ImageDataError, match="not a PNG, JPEG or WebP image") as info:
        await Sink(tmp_path).write("a", 0, b"<html>oops</html>")
    assert info.value.retryable is False
    assert files_under(tmp_path) == []


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
    """An aiofiles handle stand-in that writes part of the data, then hits a full disk."""

    def __init__(self, real: Any) -> None:
        self.real = real

    async def write(self, data: bytes) -> int:
        await self.real.write(data[:10])
        await self.real.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    async def flush(self) -> None:
        await self.real.flush()

    def fileno(self) -> int:
        return int(self.real.fileno())


class FailingOpen:
    """Replaces aiofiles.open: opens the real temp file, then fails the write midway."""

    def __init__(self) -> None:
        self.opened: list[Path] = []
        self.real_open: Any = aiofiles.open

    def __call__(self, path: Any, mode: str = "r", **kwargs: Any) -> FailingOpen:
        self.opened.append(Path(path))
        self.path, self.mode = path, mode
        return self

    async def __aenter__(self) -> FailingFile:
        self.cm = self.real_open(self.path, self.mode)
        return FailingFile(await self.cm.__aenter__())

    async def __aexit__(self, *exc: Any) -> None:
        await self.cm.__aexit__(*exc)


async def test_failed_write_leaves_no_temp_and_no_final_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails midway removes its temp file, writes no final file, and re-raises."""
    fake = FailingOpen()
    monkeypatch.setattr(aiofiles, "open", fake)
    with pytest.raises(OSError) as info:
        await Sink(tmp_path).write("a", 0, PNG)
    assert info.value.errno == errno.ENOSPC
    assert len(fake.opened) == 1
    assert fake.opened[0].name.startswith(".0.")
    assert fake.opened[0].name.endswith(".tmp")
    assert fake.opened[0].parent == tmp_path / "images" / "a"
    assert files_under(tmp_path) == []


async def test_failed_rename_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the final rename fails, the temp file is removed and the error propagates."""

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "denied")

    monkeypatch.setattr(aiofiles.os, "replace", refuse)
    with pytest.raises(PermissionError):
        await Sink(tmp_path).write("a", 0, PNG)
    assert files_under(tmp_path) == []


async def test_cancelled_write_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling a write while it is in progress removes its temp file."""
    started = asyncio.Event()
    real_replace = aiofiles.os.replace

    async def stall(*args: Any, **kwargs: Any) -> None:
        started.set()
        await asyncio.Event().wait()
        await real_replace(*args, **kwargs)

    monkeypatch.setattr(aiofiles.os, "replace", stall)
    task = asyncio.create_task(Sink(tmp_path).write("a", 0, PNG))
    await started.wait()
    assert len(files_under(tmp_path)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_under(tmp_path) == []


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
