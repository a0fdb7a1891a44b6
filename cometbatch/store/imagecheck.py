"""Whether image bytes are a structurally whole PNG, JPEG or WebP, and which of the three."""
# Structure, not pixels: a PNG is walked chunk by chunk to its IEND (every length in bounds,
# every CRC right), a JPEG's marker segments are walked to its first scan and the data must end
# with the EOI marker, and a WebP's RIFF length must match the data, its chunks filling it
# exactly. That catches what a cut-off transfer or a truncated answer leaves behind, at about
# the cost of one CRC pass over a PNG, without an image library. Zero bytes after the end are
# tolerated (a store or a transfer may pad); anything else after it is not.

from __future__ import annotations

import mmap
import struct
import zlib

from ..errors import ImageDataError

__all__ = ["ImageBytes", "check_image", "detect_format", "image_size"]

# An image in memory, or a file's mapped into it (a streamed download, checked in place).
ImageBytes = bytes | mmap.mmap

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAX_CHUNK = 2**31 - 1
# A chunk's length and type; a big-endian 32-bit number (a CRC); IHDR's width and height.
_PNG_CHUNK = struct.Struct(">I4s")
_U32 = struct.Struct(">I")
_PNG_SIZE = struct.Struct(">II")
# JPEG start-of-frame markers (C4, C8 and CC are other segments).
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# JPEG markers that stand alone, without a length: TEM and the restart markers RST0-7.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_WEBP_IMAGE_CHUNKS = frozenset({b"VP8 ", b"VP8L", b"ANMF"})
_WEBP_FIRST_CHUNKS = frozenset({b"VP8 ", b"VP8L", b"VP8X"})
_PAD_BLOCK = 64 * 1024


def detect_format(data: ImageBytes) -> str | None:
    """Return "png", "jpeg" or "webp" from the image's magic bytes, or None."""
    if data[: len(_PNG_MAGIC)] == _PNG_MAGIC:
        return "png"
    if data[: len(_JPEG_MAGIC)] == _JPEG_MAGIC:
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def check_image(data: ImageBytes) -> str:
    """Return "png", "jpeg" or "webp" for a structurally whole image; raise ImageDataError."""
    # A broken image is retryable (another answer or download may be whole); bytes that are not
    # one of the three formats are not.
    fmt = detect_format(data)
    if fmt is None:
        raise ImageDataError("not a PNG, JPEG or WebP image", retryable=False)
    reason = _CHECKS[fmt](data)
    if reason is not None:
        raise ImageDataError(f"incomplete or corrupt {_NAMES[fmt]} image: {reason}", retryable=True)
    return fmt


def _padding_only(data: ImageBytes, end: int) -> bool:
    """Whether everything from `end` on is zero bytes."""
    return _unpadded_end(data) <= end


def _unpadded_end(data: ImageBytes) -> int:
    """Where the data ends without the zero bytes at its end (looked at a block at a time)."""
    end = len(data)
    while end:
        block = data[max(0, end - _PAD_BLOCK) : end]
        kept = len(block.rstrip(b"\0"))
        end -= len(block) - kept
        if kept:
            break
    return end


def _check_png(data: ImageBytes) -> str | None:
    """Why `data` is not a whole PNG, or None."""
    # Released on return: a mapped file cannot be closed while a view of it is alive.
    with memoryview(data) as view:
        return _walk_png(data, view)


def _walk_png(data: ImageBytes, view: memoryview) -> str | None:
    """Why `data` (seen through `view`) is not a whole PNG, or None."""
    size = len(data)
    pos = len(_PNG_MAGIC)
    seen_data = False
    first = True
    while True:
        if pos + 8 > size:
            return f"cut short at byte {size} (no IEND chunk)"
        length, kind = _PNG_CHUNK.unpack_from(data, pos)
        if length > _PNG_MAX_CHUNK or not kind.isalpha():
            return f"no valid chunk at byte {pos}"
        end = pos + 12 + length
        if end > size:
            return (
                f"cut short: chunk {kind.decode()} at byte {pos} needs {end - pos} bytes, "
                f"{size - pos} left"
            )
        # The CRC covers the type and the data; zlib lets go of the GIL on large chunks.
        if zlib.crc32(view[pos + 4 : end - 4]) != _U32.unpack_from(data, end - 4)[0]:
            return f"chunk {kind.decode()} at byte {pos} fails its CRC"
        if first:
            if kind != b"IHDR" or length != 13:
                return "the first chunk is not a 13-byte IHDR"
            width, height = _PNG_SIZE.unpack_from(data, pos + 8)
            if not width or not height:
                return "IHDR gives a zero width or height"
            first = False
        elif kind == b"IDAT":
            seen_data = True
        elif kind == b"IEND":
            if not seen_data:
                return "no IDAT chunk before IEND"
            if not _padding_only(data, end):
                return f"{size - end} unexpected bytes after IEND"
            return None
        pos = end


def _check_jpeg(data: ImageBytes) -> str | None:
    """Why `data` is not a whole JPEG, or None."""
    size = len(data)
    pos = 2
    seen_frame = False
    while True:
        if pos >= size:
            return f"cut short at byte {size} (before its image data)"
        if data[pos] != 0xFF:
            return f"no marker at byte {pos}"
        while pos < size and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= size:
            return f"cut short at byte {size} (before its image data)"
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9):
            return f"unexpected marker FF{marker:02X} at byte {pos - 2} (before its image data)"
        if pos + 2 > size:
            return f"cut short at byte {size} (a segment's length)"
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            return f"segment FF{marker:02X} at byte {pos - 2} has an invalid length"
        if pos + length > size:
            return (
                f"cut short: segment FF{marker:02X} at byte {pos - 2} needs {length + 2} "
                f"bytes, {size - pos + 2} left"
            )
        seen_frame = seen_frame or marker in _JPEG_FRAMES
        pos += length
        if marker == 0xDA:
            if not seen_frame:
                return "a scan before any frame header"
            break
    # The compressed data cannot hold an FF D9 (a data byte FF is always followed by 00), so
    # an image that ends with one was not cut short in its scans.
    end = _unpadded_end(data)
    if end < pos + 2 or data[end - 2 : end] != b"\xff\xd9":
        return "cut short (no end-of-image marker)"
    return None


def _check_webp(data: ImageBytes) -> str | None:
    """Why `data` is not a whole WebP, or None."""
    size = len(data)
    end = 8 + int.from_bytes(data[4:8], "little")
    if end > size:
        return f"cut short: its RIFF header says {end} bytes, the data has {size}"
    if not _padding_only(data, end):
        return f"{size - end} unexpected bytes after its RIFF data"
    pos = 12
    first: bytes | None = None
    seen_image = False
    while pos < end:
        if pos + 8 > end:
            return f"a chunk header cut short at byte {pos}"
        kind = data[pos : pos + 4]
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if body + length > end:
            return f"cut short: chunk {kind!r} at byte {pos} needs {length + 8} bytes"
        if first is None:
            first = kind
            if kind not in _WEBP_FIRST_CHUNKS:
                return f"the first chunk is {kind!r}, not VP8, VP8L or VP8X"
        if kind == b"VP8 " and (length < 10 or data[body + 3 : body + 6] != b"\x9d\x01\x2a"):
            return f"the VP8 chunk at byte {pos} has no frame header"
        if kind == b"VP8L" and (length < 5 or data[body] != 0x2F):
            return f"the VP8L chunk at byte {pos} has no signature"
        seen_image = seen_image or kind in _WEBP_IMAGE_CHUNKS
        # Chunks are padded to an even length; a last pad byte left out of the RIFF is harmless.
        pos = body + length + (length & 1)
    if not seen_image:
        return "no image chunk"
    return None


_CHECKS = {"png": _check_png, "jpeg": _check_jpeg, "webp": _check_webp}
_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP"}


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or WebP header; None when the header does not say."""
    fmt = detect_format(data)
    try:
        if fmt == "png":
            return _PNG_SIZE.unpack_from(data, 16) if data[12:16] == b"IHDR" else None
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "webp":
            return _webp_size(data)
    except (struct.error, IndexError):
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The size in the first start-of-frame segment."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in _JPEG_STANDALONE or marker == 0xFF:
            at += 1 if marker == 0xFF else 2
            continue
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack_from(">HH", data, at + 5)
            return width, height
        at += 2 + struct.unpack_from(">H", data, at + 2)[0]
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The size in a WebP's first chunk (lossy, lossless or extended)."""
    chunk, body = data[12:16], 20
    if chunk == b"VP8 ":
        width, height = struct.unpack_from("<HH", data, body + 6)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[body + 1 : body + 5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[body + 4 : body + 7], "little") + 1
        return width, int.from_bytes(data[body + 7 : body + 10], "little") + 1
    return None
