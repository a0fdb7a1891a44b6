"""A status line keeps its most important parts whole as the width shrinks."""

from __future__ import annotations

import pytest

from cometbatch.cli.statusline import Part, fit, join

PARTS = (
    Part("images 35/60", rank=0),
    Part("1.2/s", rank=2),
    Part("(auto)", rank=4, sep=" "),
    Part("failed 2", rank=1),
    Part("spent $2.10", rank=3),
)


@pytest.mark.parametrize(
    ("width", "line"),
    [
        (52, "images 35/60 · 1.2/s (auto) · failed 2 · spent $2.10"),
        (51, "images 35/60 · 1.2/s · failed 2 · spent $2.10"),
        (44, "images 35/60 · 1.2/s · failed 2"),
        (30, "images 35/60 · failed 2"),
        (22, "images 35/60"),
        (11, ""),
    ],
)
def test_the_lowest_ranked_parts_go_first_and_the_rest_keep_their_order(
    width: int, line: str
) -> None:
    """Each narrower width drops the lowest ranked part whole; what stays keeps its place."""
    assert join(fit(PARTS, width)) == line


def test_a_part_leaves_whole_even_when_a_lower_ranked_one_would_make_room() -> None:
    """Room is made by rank alone: a short unimportant part never outlasts a long important one."""
    parts = (Part("a" * 10, rank=0), Part("b", rank=2), Part("c" * 8, rank=1))
    assert join(fit(parts, 21)) == "aaaaaaaaaa · cccccccc"
    assert join(fit(parts, 20)) == "aaaaaaaaaa"


def test_wide_characters_count_as_the_cells_they_take() -> None:
    """A width is in terminal cells: a double-width character takes two."""
    parts = (Part("画像 3/6", rank=0), Part("x", rank=1))
    assert join(fit(parts, 9)) == "画像 3/6"
    assert join(fit(parts, 12)) == "画像 3/6 · x"
