"""The image sink: checks and hashes image bytes, then puts them whole in the store."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import errno
import hashlib
import os
from collections.abc import AsyncIterator, Iterable

import pybase64

from ..errors import ImageDataError, OutputError
from ..paths import image_relpath
from ..results import ImageRecord
from .imagecheck import check_image, detect_format
from .interface import Store
from .local import LocalStore
from .staging import Staging, check_file

__all__ = ["ImageRecord", "Sink", "decode_b64", "detect_format"]

# Characters of base64 decoded at a time (a multiple of 4): about a millisecond of work.
_B64_SLICE = 256 * 1024
# The folder under OUT that holds the images.
_IMAGES = "images"
# A download is held in memory up to this size; a larger one streams to local staging.
SPOOL_BYTES = 1024 * 1024


def _a2b_strict(body: str) -> bytes:
    """Strict base64 decoding, in slices of _B64_SLICE characters when large."""
    # binascii holds the GIL while it decodes (about 5 ms per MB): slices let the event loop's
    # thread in between, so a large image decoded in a worker thread does not stall the loop.
    if len(body) < 2 * _B64_SLICE:
        return binascii.a2b_base64(body, strict_mode=True)
    # Whole slices first; the last one (one to two slices long) holds the end of the data,
    # where strict mode's rules about padding apply, exactly as in a single call.
    last = (len(body) // _B64_SLICE - 1) * _B64_SLICE
    if body.find("=", 0, last) >= 0:
        raise binascii.Error("padding before the end of the data")
    out = bytearray()
    for start in range(0, last, _B64_SLICE):
        out += binascii.a2b_base64(body[start : start + _B64_SLICE], strict_mode=True)
    out += binascii.a2b_base64(body[last:], strict_mode=True)
    return bytes(out)


def decode_b64(text: str, *, simd: bool = False) -> bytes:
    """Decode strict base64 image data, allowing a `data:...;base64,` prefix and line breaks."""
    # `simd` (for worker threads): try pybase64 first. It lets go of the GIL on every call,
    # which on the event loop's thread can cost a wait of up to the switch interval, so the
    # loop decodes its small images with binascii alone; the accepted data is the same.
    body = text.strip()
    if body[:5].lower() == "data:":
        header, comma, rest = body.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageDataError("invalid base64 image data", retryable=False)
        body = rest
    if simd:
        try:
            # pybase64 decodes a 2 MB image in about 0.3 ms where binascii takes 10+: it never
            # accepts what binascii's strict mode refuses, but refuses a few odd paddings that
            # strict mode accepts, which the exact path below then settles.
            data = pybase64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if data:
            return data
    try:
        # Strict mode rejects whitespace; the usual answer has none, so it is decoded in one
        # pass without first copying a multi-megabyte string.
        data = _a2b_strict(body)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        # Wrapped base64 (MIME style) is still valid data: decode it without the breaks.
        try:
            data = _a2b_strict("".join(body.split()))
        except (binascii.Error, ValueError) as exc:
            raise ImageDataError("invalid base64 image data", retryable=False) from exc
    if not data:
        raise ImageDataError("invalid base64 image data", retryable=False)
    return data


def _describe(job_id: str, index: int, data: bytes) -> tuple[str, str, str]:
    """The image's format, its path relative to OUT and its hex sha256; raises ImageDataError
    for bytes that are not a whole image (checked, not sniffed: see imagecheck)."""
    fmt = check_image(data)
    return fmt, image_relpath(job_id, index, fmt), hashlib.sha256(data).hexdigest()


class Sink:
    """Writes checked images under OUT/images/ through a store: each is complete or absent."""

    # Images (and base64) of `offload_bytes` or more are decoded (with SIMD), checked and
    # hashed in a worker thread, so large payloads never stall the loop; smaller ones here.

    def __init__(
        self,
        out: str | os.PathLike[str] | Store,
        *,
        offload_bytes: int = 64 * 1024,
        fsync: bool = False,
        spool_bytes: int = SPOOL_BYTES,
    ) -> None:
        # A path is shorthand for the local folder there.
        self.store: Store = LocalStore(out) if isinstance(out, str | os.PathLike) else out
        self.out_dir = self.store.root
        self.offload_bytes = offload_bytes
        self.spool_bytes = spool_bytes
        self.staging = Staging.for_store(self.store)
        self.fsync = fsync
        self.written = 0
        self.written_bytes = 0

    def __repr__(self) -> str:
        return (
            f"<Sink out_dir={self.out_dir!r} written={self.written} "
            f"bytes={self.written_bytes} store={self.store!r}>"
        )

    async def write(
        self, job_id: str, index: int, data: bytes, *, revised_prompt: str | None = None
    ) -> ImageRecord:
        """Check, hash and atomically write one image; return what the ledger records."""
        if len(data) >= self.offload_bytes:
            described = await asyncio.to_thread(_describe, job_id, index, data)
        else:
            described = _describe(job_id, index, data)
        return await self._put(index, data, described, revised_prompt)

    async def write_stream(
        self,
        job_id: str,
        index: int,
        chunks: AsyncIterator[bytes],
        *,
        revised_prompt: str | None = None,
    ) -> ImageRecord:
        """Write an image of unknown size as it arrives, never holding it whole when large."""
        # Held in memory up to spool_bytes; past that streamed to local staging (hashed as it
        # comes), checked there and handed to the store.
        head = bytearray()
        async for chunk in chunks:
            head += chunk
            if len(head) >= self.spool_bytes:
                break
        else:
            return await self.write(job_id, index, bytes(head), revised_prompt=revised_prompt)
        staged = await self.staging.receive(head, chunks)
        del head
        try:
            fmt = await asyncio.to_thread(check_file, staged.path)
            relpath = image_relpath(job_id, index, fmt)
            await self.store.put_file(relpath, staged.path, sync=self.fsync)
        except BaseException:
            # The store removes the file it takes; one it refused is removed here.
            with contextlib.suppress(OSError):
                os.unlink(staged.path)
            raise
        self.written += 1
        self.written_bytes += staged.size
        return ImageRecord(index, relpath, fmt, staged.size, staged.sha256, revised_prompt)

    async def decode_and_write(
        self, job_id: str, index: int, b64: str, *, revised_prompt: str | None = None
    ) -> ImageRecord:
        """Decode a base64 image (in a worker thread when large) and write it."""
        if len(b64) < self.offload_bytes:
            data = decode_b64(b64)
            return await self.write(job_id, index, data, revised_prompt=revised_prompt)
        data, described = await asyncio.to_thread(_decode_and_describe, job_id, index, b64)
        return await self._put(index, data, described, revised_prompt)

    async def _put(
        self,
        index: int,
        data: bytes,
        described: tuple[str, str, str],
        revised_prompt: str | None,
    ) -> ImageRecord:
        """Put checked bytes in the store at their path; count them."""
        fmt, relpath, digest = described
        await self.store.put(relpath, data, sync=self.fsync)
        self.written += 1
        self.written_bytes += len(data)
        return ImageRecord(index, relpath, fmt, len(data), digest, revised_prompt)

    def check_writable(self) -> None:
        """Raise OutputError unless OUT/images/ takes a new file: checked before the first
        request is paid for, so an unwritable folder costs nothing."""
        try:
            self.store.check_writable(_IMAGES)
        except OSError as exc:
            raise OutputError(
                f"cannot write images in {self.out_dir}: {exc.strerror or exc} "
                f"({self.out_dir}/{_IMAGES})"
            ) from exc

    def discard(self, records: Iterable[ImageRecord]) -> None:
        """Remove images that will not be recorded (their request failed to store); best effort."""
        for record in records:
            with contextlib.suppress(OSError):
                self.store.remove(record.path)

    def remove_stale_temp_files(self) -> int:
        """Delete what writes and downloads cut short by a crash left; call before writing."""
        # OutputError when the images folder or the staging folder cannot be cleaned.
        images = f"{self.out_dir}/{_IMAGES}"
        try:
            removed = self.staging.clean()
        except OSError as exc:
            raise OutputError(
                f"cannot clean up unfinished downloads in {self.staging.folder}: "
                f"{exc.strerror or exc}"
            ) from exc
        try:
            return removed + self.store.clean(_IMAGES)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                # Before anything is written or moved aside: no job folder is a link.
                raise OutputError(
                    f"cannot write images in {self.out_dir}: {exc.strerror} ({exc.filename})"
                ) from exc
            where = f" ({exc.filename})" if exc.filename else ""
            raise OutputError(
                f"cannot clean up unfinished image files in {images}: {exc.strerror or exc}{where}"
            ) from exc


def _decode_and_describe(job_id: str, index: int, b64: str) -> tuple[bytes, tuple[str, str, str]]:
    """Decode (with SIMD), check and hash a large image (in a worker thread)."""
    data = decode_b64(b64, simd=True)
    return data, _describe(job_id, index, data)
