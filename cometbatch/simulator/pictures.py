"""The pictures the simulator answers with, made once per format and variant, then reused."""

from __future__ import annotations

import base64

from .imagegen import make_image, png_of_size

# Distinct pictures cached per format: enough that prompts rarely share one, few enough
# that a long benchmark draws nearly every image from the cache.
_PICTURE_VARIANTS = 1024
_PAYLOAD_VARIANTS = 4


class PictureCache:
    """Image bytes and their base64 text by format and seed, drawn from a few variants each."""

    def __init__(self, image_px: int, payload_bytes: int | None) -> None:
        self._image_px = image_px
        self._payload_bytes = payload_bytes
        self._bytes_cache: dict[tuple[str, int], bytes] = {}
        self._b64_cache: dict[tuple[str, int], str] = {}

    def __repr__(self) -> str:
        return f"PictureCache(pictures={len(self._bytes_cache)}, encoded={len(self._b64_cache)})"

    def _key(self, fmt: str, seed: int) -> tuple[str, int]:
        variants = _PAYLOAD_VARIANTS if fmt == "png" and self._payload_bytes else None
        return fmt, seed % (variants or _PICTURE_VARIANTS)

    def image_bytes(self, fmt: str, seed: int) -> bytes:
        """The picture for `seed` in `fmt`: a PNG of payload_bytes if set, else image_px square."""
        key = self._key(fmt, seed)
        data = self._bytes_cache.get(key)
        if data is None:
            if fmt == "png" and self._payload_bytes:
                data = png_of_size(self._payload_bytes, key[1])
            else:
                px = self._image_px
                data = make_image(fmt, key[1], (px, px))
            self._bytes_cache[key] = data
        return data

    def image_b64(self, fmt: str, seed: int) -> str:
        """The same picture as base64 text, for b64_json answers."""
        key = self._key(fmt, seed)
        text = self._b64_cache.get(key)
        if text is None:
            text = base64.b64encode(self.image_bytes(fmt, seed)).decode("ascii")
            self._b64_cache[key] = text
        return text
