"""The image sink: checks, hashes and atomically writes image bytes under OUT/images/."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import os
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from cometbatch.errors import ImageDataError, OutputError
from cometbatch.paths import image_relpath

__all__ = ["ImageRecord", "Sink", "decode_b64", "detect_format"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TEMP_SUFFIX = ".tmp"


def detect_format(data: bytes) -> str | None:
    """Return "png", "jpeg" or "webp" from the image's magic bytes, or None."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def decode_b64(text: str) -> bytes:
    """Decode strict base64 image data, allowing a `data:...;base64,` prefix and line breaks."""
    body = text.strip()
    if body[:5].lower() == "data:":
        header, comma, rest = body.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageDataError("invalid base64 image data", retryable=False)
        body = rest
    # Strict mode rejects whitespace, but wrapped base64 (MIME style) is still valid data.
    body = "".join(body.split())
    try:
        data = binascii.a2b_base64(body.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
        raise ImageDataError("invalid base64 image data", retryable=False) from exc
    if not data:
        raise ImageDataError("invalid base64 image data", retryable=False)
    return data


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image written to disk, as the ledger's `images` list records it."""

    index: int
    path: str
    format: str
    bytes: int
    sha256: str
    revised_prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ledger's image object (the fields, in order)."""
        return asdict(self)


def _sha256_hex(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


class Sink:
    """Writes images atomically under OUT/images/ so a file either is complete or is absent."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        offload_bytes: int = 512 * 1024,
        fsync: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.offload_bytes = offload_bytes
        self.fsync = fsync
        self.written = 0
        self.written_bytes = 0
        self._in_flight = 0

    def __repr__(self) -> str:
        return (
            f"<Sink out_dir={str(self.out_dir)!r} written={self.written} "
            f"bytes={self.written_bytes} in_flight={self._in_flight}>"
        )

    async def write(
        self, job_id: str, index: int, data: bytes, *, revised_prompt: str | None = None
    ) -> ImageRecord:
        """Check, hash and atomically write one image; return what the ledger records."""
        fmt = detect_format(data)
        if fmt is None:
            raise ImageDataError("not a PNG, JPEG or WebP image", retryable=False)
        relpath = image_relpath(job_id, index, fmt)
        if len(data) >= self.offload_bytes:
            # hashlib releases the GIL on large buffers, so the loop keeps serving other tasks.
            digest = await asyncio.to_thread(_sha256_hex, data)
        else:
            digest = _sha256_hex(data)
        self._in_flight += 1
        try:
            await self._write_atomic(self.out_dir / relpath, index, data)
        finally:
            self._in_flight -= 1
        self.written += 1
        self.written_bytes += len(data)
        return ImageRecord(index, relpath, fmt, len(data), digest, revised_prompt)

    async def decode_and_write(
        self, job_id: str, index: int, b64: str, *, revised_prompt: str | None = None
    ) -> ImageRecord:
        """Decode a base64 image (in a thread when large) and write it."""
        if len(b64) >= self.offload_bytes:
            data = await asyncio.to_thread(decode_b64, b64)
        else:
            data = decode_b64(b64)
        return await self.write(job_id, index, data, revised_prompt=revised_prompt)

    async def _write_atomic(self, final: Path, index: int, data: bytes) -> None:
        """Write to a temporary name in the final folder, then rename it into place.

        An OSError keeps its type and errno; its reason names the image folder.
        """
        folder = final.parent
        try:
            await aiofiles.os.makedirs(folder, exist_ok=True)
            await self._write_temp_then_rename(folder, final, index, data)
        except OSError as exc:
            if exc.errno is None or exc.strerror is None:
                raise
            # Callers show only the reason: put the folder in it. OSError(errno, ...) builds
            # the matching subclass again (PermissionError for EACCES, ...).
            raise OSError(exc.errno, f"{exc.strerror} ({folder})", exc.filename) from exc

    async def _write_temp_then_rename(
        self, folder: Path, final: Path, index: int, data: bytes
    ) -> None:
        """The write itself; on any failure (or cancellation) the temporary file is removed."""
        # Same folder as the final name: os.replace is atomic only within one filesystem.
        temp = folder / f".{index}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"
        try:
            async with aiofiles.open(temp, "xb") as handle:
                await handle.write(data)
                await handle.flush()
                if self.fsync:
                    await asyncio.to_thread(os.fsync, handle.fileno())
            # Replacing is deliberate: a regenerated request overwrites its earlier image.
            await aiofiles.os.replace(temp, final)
        except BaseException:
            # Also on cancellation: a half-written temp file must never outlive the attempt.
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def check_writable(self) -> None:
        """Raise OutputError unless OUT/images/ takes a new file: checked before the first
        request is paid for, so an unwritable folder costs nothing."""
        images = self.out_dir / "images"
        try:
            images.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=".probe.", suffix=_TEMP_SUFFIX, dir=images)
            os.close(handle)
            os.unlink(name)
        except OSError as exc:
            raise OutputError(
                f"cannot write images in {self.out_dir}: {exc.strerror or exc} ({images})"
            ) from exc

    def discard(self, records: Iterable[ImageRecord]) -> None:
        """Remove images that will not be recorded (their request failed to store); best effort."""
        for record in records:
            with contextlib.suppress(OSError):
                os.unlink(self.out_dir / record.path)

    def remove_stale_temp_files(self) -> int:
        """Delete temporary files left under OUT/images/ by a crash; call before writing.

        Raises OutputError when the images folder cannot be read or cleaned.
        """
        images = self.out_dir / "images"
        removed = 0
        try:
            folders = os.scandir(images)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise _cleanup_error(images, exc) from exc
        try:
            with folders:
                for folder in folders:
                    if folder.is_dir(follow_symlinks=False):
                        removed += _remove_temp_files(folder.path)
        except OSError as exc:
            raise _cleanup_error(images, exc) from exc
        return removed


def _remove_temp_files(folder: str) -> int:
    """Delete the temporary files directly inside `folder` and return how many."""
    with os.scandir(folder) as entries:
        stale = [
            e.path
            for e in entries
            if e.name.endswith(_TEMP_SUFFIX) and e.is_file(follow_symlinks=False)
        ]
    removed = 0
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed


def _cleanup_error(images: Path, exc: OSError) -> OutputError:
    """The run-stopping error for an images folder that cannot be scanned or cleaned."""
    where = f" ({exc.filename})" if exc.filename else ""
    return OutputError(
        f"cannot clean up unfinished image files in {images}: {exc.strerror or exc}{where}"
    )
