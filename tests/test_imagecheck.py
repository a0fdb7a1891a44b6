"""Tests for the structural image check: whole images pass, cut or damaged ones never do."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from cometbatch import ImageDataError
from cometbatch.simulator.imagegen import make_image, make_png, png_of_size
from cometbatch.store.imagecheck import check_image, detect_format


def pillow(fmt: str, mode: str = "RGB", size: tuple[int, int] = (40, 30), **options: Any) -> bytes:
    """A real image encoded by Pillow, with some detail so that it compresses unevenly."""
    width, height = size
    image = Image.new("RGB", size)
    pixels = [(x * 7 % 256, y * 13 % 256, x * y % 256) for y in range(height) for x in range(width)]
    image.putdata(pixels)
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def animated_webp() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


WHOLE: dict[str, tuple[bytes, str]] = {
    "png rgb": (pillow("PNG"), "png"),
    "png rgba": (pillow("PNG", "RGBA"), "png"),
    "png grey": (pillow("PNG", "L"), "png"),
    "png interlaced": (pillow("PNG", interlace=1), "png"),
    # Pillow writes large images as several IDAT chunks.
    "png many idat": (pillow("PNG", size=(400, 300), compress_level=0), "png"),
    "png imagegen": (make_png(16, 16, 1), "png"),
    "png imagegen noise": (png_of_size(150_000, 2), "png"),
    "jpeg baseline": (pillow("JPEG", quality=80), "jpeg"),
    "jpeg progressive": (pillow("JPEG", progressive=True, quality=60), "jpeg"),
    "jpeg grey optimized": (pillow("JPEG", "L", optimize=True), "jpeg"),
    "jpeg with exif": (pillow("JPEG", exif=Image.Exif()), "jpeg"),
    "jpeg restart markers": (pillow("JPEG", size=(64, 64), restart_marker_blocks=1), "jpeg"),
    "jpeg imagegen": (make_image("jpeg", 1, (16, 16)), "jpeg"),
    "webp lossy": (pillow("WEBP"), "webp"),
    "webp lossless": (pillow("WEBP", lossless=True), "webp"),
    "webp alpha": (pillow("WEBP", "RGBA"), "webp"),
    "webp animated": (animated_webp(), "webp"),
    "webp imagegen": (make_image("webp", 2, (16, 16)), "webp"),
}


@pytest.mark.parametrize("name", WHOLE)
def test_whole_images_pass_and_name_their_format(name: str) -> None:
    """Real images made by Pillow and by imagegen pass, in the format their bytes say."""
    data, fmt = WHOLE[name]
    assert check_image(data) == fmt == detect_format(data)


@pytest.mark.parametrize("name", WHOLE)
def test_every_cut_is_refused(name: str) -> None:
    """An image cut anywhere (every length for small images, many for large) is refused;
    once its magic bytes are there, as a retryable broken image."""
    data, fmt = WHOLE[name]
    size = len(data)
    if size <= 4096:
        cuts: list[int] = list(range(size))
    else:
        cuts = sorted({*range(64), *range(size - 64, size), *range(0, size, size // 97)})
    for cut in cuts:
        with pytest.raises(ImageDataError) as caught:
            check_image(data[:cut])
        assert caught.value.kind == "invalid_image"
        assert caught.value.retryable is (detect_format(data[:cut]) == fmt), cut


@pytest.mark.parametrize("share", [0.25, 0.5, 0.6, 0.9])
@pytest.mark.parametrize("name", ["png rgb", "jpeg baseline", "webp lossy"])
def test_a_cut_image_says_it_was_cut(name: str, share: float) -> None:
    """The reason names the format and that the image was cut short."""
    data, _ = WHOLE[name]
    reason = r"^incomplete or corrupt (PNG|JPEG|WebP) image: .*cut"
    with pytest.raises(ImageDataError, match=reason):
        check_image(data[: int(len(data) * share)])


def test_a_40_byte_png_is_refused() -> None:
    """A PNG with its signature and header but nothing after is not an image."""
    with pytest.raises(ImageDataError, match="cut short"):
        check_image(WHOLE["png rgb"][0][:40])


def png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of each chunk of a whole PNG."""
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append((pos, data[pos + 4 : pos + 8], length))
        pos += 12 + length
    return chunks


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize("name", ["png rgb", "png many idat", "png imagegen"])
def test_a_flipped_crc_or_data_byte_is_refused(name: str) -> None:
    """Each chunk's CRC is checked: a flipped CRC byte, or a flipped byte it covers, fails."""
    data, _ = WHOLE[name]
    for pos, kind, length in png_chunks(data):
        end = pos + 12 + length
        with pytest.raises(ImageDataError, match=f"chunk {kind.decode()} at byte {pos} fails"):
            check_image(flip(data, end - 1))
        if length:
            with pytest.raises(ImageDataError, match="fails its CRC"):
                check_image(flip(data, pos + 8 + length // 2))


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


SIGNATURE = b"\x89PNG\r\n\x1a\n"
IHDR = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
IDAT = chunk(b"IDAT", zlib.compress(b"\0\0"))
IEND = chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (SIGNATURE + IHDR + IDAT + IEND, None),
        (SIGNATURE + IDAT + IHDR + IEND, "first chunk is not a 13-byte IHDR"),
        (SIGNATURE + IHDR + IEND, "no IDAT chunk before IEND"),
        (SIGNATURE + IHDR + IDAT, "no IEND chunk"),
        (SIGNATURE + IHDR + IDAT + IEND + b"\0" * 7, None),
        (SIGNATURE + IHDR + IDAT + IEND + b"junk", "4 unexpected bytes after IEND"),
        (SIGNATURE + IHDR + IDAT + b"\0" * 40, "no valid chunk at byte"),
        (SIGNATURE + chunk(b"IHDR", bytes(13)) + IDAT + IEND, "zero width or height"),
        (SIGNATURE + IHDR + b"\xff\xff\xff\xffIDAT" + bytes(8), "no valid chunk"),
    ],
)
def test_png_structure(data: bytes, reason: str | None) -> None:
    """IHDR first, an IDAT, IEND at the end; zero padding after it is tolerated."""
    if reason is None:
        assert check_image(data) == "png"
    else:
        with pytest.raises(ImageDataError, match=reason):
            check_image(data)


JPEG = WHOLE["jpeg baseline"][0]
APP0_END = 4 + int.from_bytes(JPEG[4:6], "big")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (JPEG + b"\0" * 9, None),
        (JPEG[:-2], "no end-of-image marker"),
        (JPEG[: int(len(JPEG) * 0.6)] + b"\0" * 100, "no end-of-image marker"),
        (JPEG + b"trailing", "no end-of-image marker"),
        (b"\xff\xd8\xff\xd9", "unexpected marker FFD9"),
        (b"\xff\xd8\xff\xda\x00\x02\xff\xd9", "a scan before any frame header"),
        (JPEG[:2] + b"\xff\xfe\x00\x01" + JPEG[2:], "invalid length"),
        (JPEG[:APP0_END] + b"\x00" + JPEG[APP0_END:], f"no marker at byte {APP0_END}"),
    ],
)
def test_jpeg_structure(data: bytes, reason: str | None) -> None:
    """Segments walked to the first scan, then the EOI marker at the end (zero padding ok)."""
    if reason is None:
        assert check_image(data) == "jpeg"
    else:
        with pytest.raises(ImageDataError, match=reason):
            check_image(data)


WEBP = WHOLE["webp lossy"][0]


def riff(body: bytes, size: int | None = None) -> bytes:
    return b"RIFF" + struct.pack("<I", len(body) + 4 if size is None else size) + b"WEBP" + body


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (WEBP + b"\0\0", None),
        (riff(WEBP[12:], len(WEBP)), "RIFF header says"),
        (WEBP + b"x", "1 unexpected bytes"),
        (riff(b"ICCP" + struct.pack("<I", 0) + WEBP[12:]), "first chunk is b'ICCP'"),
        (riff(WEBP[12:16] + struct.pack("<I", 10**6) + WEBP[20:]), "cut short: chunk b'VP8 '"),
        (riff(WEBP[12:23] + b"\0\0\0" + WEBP[26:]), "no frame header"),
        (riff(b"VP8X" + struct.pack("<I", 10) + bytes(10)), "no image chunk"),
        (riff(WEBP[12:] + b"EXIF"), "chunk header cut short"),
    ],
)
def test_webp_structure(data: bytes, reason: str | None) -> None:
    """The RIFF length matches the data, its chunks fill it, the first is VP8, VP8L or VP8X."""
    if reason is None:
        assert check_image(data) == "webp"
    else:
        with pytest.raises(ImageDataError, match=reason):
            check_image(data)


@pytest.mark.parametrize("data", [b"", b"GIF89a....", b"<html>gone</html>", b"RIFF\0\0\0\0WAVE"])
def test_other_bytes_are_not_retryable(data: bytes) -> None:
    """Bytes that are none of the three formats are refused for good: no retry makes them so."""
    with pytest.raises(ImageDataError, match="not a PNG, JPEG or WebP image") as caught:
        check_image(data)
    assert caught.value.retryable is False
