"""Free image sizes: `WIDTHxHEIGHT` strings and the limits a model puts on them (pure)."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")


def parse_size(value: Any) -> tuple[int, int] | None:
    """(width, height) of a `WIDTHxHEIGHT` string, or None if `value` is not one."""
    if not isinstance(value, str):
        return None
    match = _SIZE.fullmatch(value)
    return None if match is None else (int(match[1]), int(match[2]))


class SizeRule(BaseModel):
    """Which `WIDTHxHEIGHT` sizes a model takes besides its named ones (gpt-image-2: any size
    with sides divisible by 16, ratio within 1:3..3:1, at most 3840x2160)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    multiple_of: int = Field(default=1, ge=1)
    max_edge: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    # The longer side over the shorter one, at most (3 means 1:3 to 3:1).
    max_ratio: float | None = Field(default=None, ge=1, allow_inf_nan=False)

    def problem(self, value: Any) -> str | None:
        """Why `value` breaks the rule (one short clause), or None if the rule takes it."""
        parsed = parse_size(value)
        if parsed is None:
            return "not a size of the form WIDTHxHEIGHT"
        width, height = parsed
        if width % self.multiple_of or height % self.multiple_of:
            return f"both sides must be divisible by {self.multiple_of}"
        if self.max_edge is not None and max(width, height) > self.max_edge:
            return f"the longer side must be at most {self.max_edge}"
        # Exact arithmetic: 3:1 itself is inside a 3.0 limit, whatever floats would say.
        ratio = Fraction(max(width, height), min(width, height))
        if self.max_ratio is not None and ratio > Fraction(self.max_ratio):
            return f"the aspect ratio must be within 1:{self.max_ratio:g} and {self.max_ratio:g}:1"
        if self.max_pixels is not None and width * height > self.max_pixels:
            return f"at most {self.max_pixels:,} pixels ({width * height:,} asked)"
        return None

    def describe(self) -> str:
        """The rule in words, for error messages and `cometbatch models`."""
        parts = []
        if self.multiple_of > 1:
            parts.append(f"sides divisible by {self.multiple_of}")
        if self.max_ratio is not None:
            parts.append(f"ratio 1:{self.max_ratio:g} to {self.max_ratio:g}:1")
        if self.max_edge is not None:
            parts.append(f"longer side at most {self.max_edge}")
        if self.max_pixels is not None:
            parts.append(f"at most {self.max_pixels:,} pixels")
        return "WIDTHxHEIGHT" + (f" with {', '.join(parts)}" if parts else "")
