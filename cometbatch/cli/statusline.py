"""A status line as ranked parts, fitted into a width by dropping the least important whole."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.text import Text

SEP = " · "


@dataclass(frozen=True, slots=True)
class Part:
    """One field of a status line: `rank` 0 is kept longest, `sep` goes before it after another."""

    # A detail hangs on its field with sep=" " (`in flight 8/16 (auto)`) and ranks below it, so
    # it never outlives the field.
    text: str
    rank: int
    sep: str = SEP
    style: str = ""


def width_of(parts: Iterable[Part]) -> int:
    """Terminal cells the parts take when joined."""
    return cell_len(join(parts))


def fit(parts: Sequence[Part], width: int) -> tuple[Part, ...]:
    """The parts that fit in `width` cells, in their order: the lowest ranked go first, each
    whole (a field is never cut short: half a number misleads more than none)."""
    kept = list(parts)
    while kept and width_of(kept) > width:
        kept.remove(max(reversed(kept), key=lambda part: part.rank))
    return tuple(kept)


def join(parts: Iterable[Part]) -> str:
    """The parts as one plain line."""
    return rich_text(parts).plain


def rich_text(parts: Iterable[Part]) -> Text:
    """The parts as one styled line."""
    text = Text()
    for part in parts:
        if text:
            text.append(part.sep)
        text.append(part.text, style=part.style)
    return text
