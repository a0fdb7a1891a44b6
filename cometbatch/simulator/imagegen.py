"""Small real images for the simulator: hand-written PNGs and embedded JPEG/WebP samples."""

from __future__ import annotations

import base64
import functools
import math
import random
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The IEND chunk that closes every PNG (it carries no data, so its bytes never change).
_IEND = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
# Bytes a PNG adds around its pixel data: signature, IHDR, IDAT header and CRC, IEND.
_PNG_OVERHEAD = len(PNG_SIGNATURE) + (12 + 13) + 12 + len(_IEND)
# A stored (uncompressed) deflate block holds at most this many bytes.
_STORED_BLOCK = 65535

# 16x16 samples made once with Pillow (quality 70) so no image library is needed at run time.
_JPEG_B64: tuple[str, ...] = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAoHBwgHBgoICAgLCgoLDhgQDg0NDh0VFhEYIx8lJCIfIiEmKzcvJik0"
    "KSEiMEExNDk7Pj4+JS5ESUM8SDc9Pjv/2wBDAQoLCw4NDhwQEBw7KCIoOzs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7"
    "Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozv/wAARCAAQABADASIAAhEBAxEB/8QAFgABAQEAAAAAAAAAAAAAAAAA"
    "AgAD/8QAFRABAQAAAAAAAAAAAAAAAAAAAQD/xAAVAQEBAAAAAAAAAAAAAAAAAAAEBf/EABgRAAIDAAAAAAAAAAAA"
    "AAAAAAAEBSEx/9oADAMBAAIRAxEAPwALZrSwWYijlFCQkNs//9k=",
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAoHBwgHBgoICAgLCgoLDhgQDg0NDh0VFhEYIx8lJCIfIiEmKzcvJik0"
    "KSEiMEExNDk7Pj4+JS5ESUM8SDc9Pjv/2wBDAQoLCw4NDhwQEBw7KCIoOzs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7"
    "Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozv/wAARCAAQABADASIAAhEBAxEB/8QAFgABAQEAAAAAAAAAAAAAAAAA"
    "BAAF/8QAFhABAQEAAAAAAAAAAAAAAAAAAwBh/8QAFQEBAQAAAAAAAAAAAAAAAAAABAb/xAAWEQADAAAAAAAAAAAA"
    "AAAAAAAAAwT/2gAMAwEAAhEDEQA/ANoimiOUI5NIqMe8FLKf/9k=",
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAoHBwgHBgoICAgLCgoLDhgQDg0NDh0VFhEYIx8lJCIfIiEmKzcvJik0"
    "KSEiMEExNDk7Pj4+JS5ESUM8SDc9Pjv/2wBDAQoLCw4NDhwQEBw7KCIoOzs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7"
    "Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozs7Ozv/wAARCAAQABADASIAAhEBAxEB/8QAFgABAQEAAAAAAAAAAAAAAAAA"
    "BAAC/8QAFRABAQAAAAAAAAAAAAAAAAAAAwD/xAAVAQEBAAAAAAAAAAAAAAAAAAAFBv/EABgRAAMBAQAAAAAAAAAA"
    "AAAAAAACBSEx/9oADAMBAAIRAxEAPwDJnKM6M5ZnUruGUKHdP//Z",
)
_WEBP_B64: tuple[str, ...] = (
    "UklGRj4AAABXRUJQVlA4IDIAAAAQAgCdASoQABAAAkA4JbACdLoBRANgABGgAP7Yf4NsnpiOnsfJ70O//nIH4z6M"
    "+R8gAA==",
    "UklGRkYAAABXRUJQVlA4IDoAAAAwAgCdASoQABAADcA4JbACdGaAAnd2LfQsAAD+jTe9tV9oJjj/5DRv/5z//5z/"
    "2Osf+GeHFL2iykAA",
    "UklGRkIAAABXRUJQVlA4IDYAAACQAQCdASoQABAACoA4JbACdLoAA5gA/sr3IOSb/Q78+j/zNHwK8l1aXIfZkdc4"
    "Kfn6rSgAAAA=",
)
_EMBEDDED: dict[str, tuple[bytes, ...]] = {
    "jpeg": tuple(base64.b64decode(b) for b in _JPEG_B64),
    "webp": tuple(base64.b64decode(b) for b in _WEBP_B64),
}

IMAGE_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC over type and data."""
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _stored_zlib(raw: bytes) -> bytes:
    """A zlib stream of uncompressed deflate blocks, so its size is known in advance."""
    parts = [b"\x78\x01"]
    view = memoryview(raw)
    for start in range(0, max(len(raw), 1), _STORED_BLOCK):
        block = view[start : start + _STORED_BLOCK]
        final = 1 if start + _STORED_BLOCK >= len(raw) else 0
        parts.append(struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF))
        parts.append(bytes(block))
    parts.append(struct.pack(">I", zlib.adler32(raw)))
    return b"".join(parts)


def _png(width: int, height: int, idat: bytes) -> bytes:
    """Wrap a zlib stream of filtered RGB scanlines in a complete 8-bit truecolour PNG."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join((PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _IEND))


def _pattern_rows(width: int, height: int, seed: int) -> bytes:
    """Scanlines of a diagonal colour gradient whose palette and slopes come from the seed."""
    rng = random.Random(seed)
    r0, g0, b0 = (rng.randrange(256) for _ in range(3))
    rx, gy, bd = (max(1, rng.choice((1, 2, 3, 5)) * 256 // max(width, height)) for _ in range(3))
    # Filter type Sub stores each byte minus the one a pixel to its left: a linear gradient
    # becomes one repeated step, which is cheap to build and deflates to almost nothing.
    step = bytes((rx & 0xFF, 0, bd & 0xFF)) * (width - 1)
    return b"".join(
        bytes((1, r0, (g0 + y * gy) & 0xFF, (b0 + y * bd) & 0xFF)) + step for y in range(height)
    )


def _noise_rows(width: int, height: int, seed: int) -> bytes:
    """Filtered scanlines of pseudo-random pixels, which deflate cannot shrink."""
    stride = 3 * width + 1
    rows = bytearray(random.Random(seed).randbytes(stride * height))
    rows[0::stride] = bytes(height)
    return bytes(rows)


@functools.lru_cache(maxsize=1024)
def _pattern_png(width: int, height: int, seed: int) -> bytes:
    return _png(width, height, zlib.compress(_pattern_rows(width, height, seed), 1))


@functools.lru_cache(maxsize=4)
def _noise_png(width: int, height: int, seed: int) -> bytes:
    # Stored blocks: compressing noise only costs time, and this way the size is exact.
    return _png(width, height, _stored_zlib(_noise_rows(width, height, seed)))


def make_png(width: int, height: int, seed: int, *, noise: bool = False) -> bytes:
    """A decodable RGB PNG: a seed-coloured gradient, or incompressible noise."""
    if width < 1 or height < 1:
        raise ValueError(f"PNG edges must be positive, got {width}x{height}")
    if noise:
        return _noise_png(width, height, seed)
    return _pattern_png(width, height, seed)


def noise_png_size(width: int, height: int) -> int:
    """The exact file size of `make_png(width, height, seed, noise=True)`."""
    raw = (3 * width + 1) * height
    blocks = max(1, math.ceil(raw / _STORED_BLOCK))
    return _PNG_OVERHEAD + 2 + raw + 5 * blocks + 4


def noise_dimensions(target_bytes: int) -> tuple[int, int]:
    """Width and height of a near-square noise PNG whose file size is closest to the target."""
    width = max(1, math.isqrt(max(target_bytes, 0) // 3))
    best = (1, 1)
    best_gap = abs(noise_png_size(1, 1) - target_bytes)
    # Nudging the width lets the size land within a few bytes instead of a whole row.
    for w in range(max(1, width - 32), width + 33):
        h = max(1, round((target_bytes - _PNG_OVERHEAD) / (3 * w + 1)))
        gap = abs(noise_png_size(w, h) - target_bytes)
        if gap < best_gap:
            best, best_gap = (w, h), gap
    return best


def png_of_size(target_bytes: int, seed: int) -> bytes:
    """A noise PNG whose file size is about `target_bytes`."""
    width, height = noise_dimensions(target_bytes)
    return make_png(width, height, seed, noise=True)


def make_image(fmt: str, seed: int, size: tuple[int, int]) -> bytes:
    """A real image in `fmt`: a generated PNG, or one of the embedded JPEG/WebP samples."""
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt == "png":
        return make_png(size[0], size[1], seed)
    samples = _EMBEDDED.get(fmt)
    if samples is None:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {IMAGE_FORMATS}")
    return samples[seed % len(samples)]
