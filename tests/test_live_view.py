"""The live display fits its terminal: fields stay whole, the important ones go last."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from rich.cells import cell_len
from rich.console import Console
from support import PACE, show_progress

from cometbatch import Summary
from cometbatch.cli.progress import LiveView
from cometbatch.cli.snapshot import Snapshot
from cometbatch.net.limits import Limiter

# A run part way through, with every counter that can show: spend, retries, 429s, a pace.
RUN = Snapshot(
    done=35,
    failed=2,
    total=60,
    in_flight=8,
    limit=16,
    retries=3,
    rate_limited=1,
    probing=False,
    processed=37,
    pace=PACE,
    spent=2.1,
)
# A large run with auto concurrency and a cost cap: longer numbers, more details.
LARGE = Snapshot(
    done=35_000,
    failed=12,
    total=60_000,
    in_flight=61,
    limit=64,
    retries=140,
    rate_limited=37,
    probing=False,
    auto=True,
    ceiling=1000,
    pace=PACE,
    spent=812.5,
    cost_cap=2000.0,
    cost_counted=1250.0,
)


def drawn(view: LiveView, width: int) -> list[str]:
    """The lines a terminal of `width` columns shows for `view`."""
    console = Console(record=True, file=io.StringIO(), force_terminal=True, width=width)
    console.print(view)
    return console.export_text().splitlines()


def test_at_80_columns_the_essentials_show_whole() -> None:
    """80 columns: a bar, done/total, rate, ETA, in flight and failures; no field cut short."""
    lines = drawn(LiveView(RUN, rate=1.2, elapsed=31.0), 80)
    assert all(cell_len(line) <= 80 for line in lines), lines
    assert lines[0].startswith("━")
    for field in ("images 35/60", "1.2/s", "eta 19 s", "in flight 8/16", "failed 2"):
        assert field in lines[0]
    assert "…" not in "".join(lines)
    # The pace line keeps what holds the run back, the part a person acts on.
    assert lines[1] == "limited by concurrency 16: at 3.1 s per request, 600/min needs about 31"


def test_at_120_columns_lower_fields_show_too() -> None:
    """120 columns: the same essentials, plus spend, retries and the rate against the limit."""
    lines = drawn(LiveView(RUN, rate=1.2, elapsed=31.0), 120)
    assert all(cell_len(line) <= 120 for line in lines), lines
    assert "images 35/60 · 1.2/s · eta 19 s · in flight 8/16 · failed 2 · retries 3" in lines[0]
    assert "spent $2.10" in lines[0]
    assert lines[1].startswith("590 requests/min of 600 (98%), 590 images/min; limited by")
    assert "…" not in "".join(lines)


def test_a_large_run_keeps_its_essentials_at_80_columns() -> None:
    """Five-digit counts and auto concurrency: the bar narrows, the essentials stay whole."""
    lines = drawn(LiveView(LARGE, rate=20.0, elapsed=1750.0), 80)
    assert all(cell_len(line) <= 80 for line in lines), lines
    for field in ("images 35000/60000", "20.0/s", "eta 20:49", "in flight 61/64", "failed 12"):
        assert field in lines[0]
    assert "auto" not in lines[0] and "spent" not in lines[0]
    wide = drawn(LiveView(LARGE, rate=20.0, elapsed=1750.0), 240)[0]
    assert "in flight 61/64 (auto, max 1000)" in wide
    assert "spent $812.50 (folder $1,250.00 of max $2,000.00)" in wide


@pytest.mark.parametrize("snap", [RUN, LARGE, Snapshot(0, 0, 0, 0, 16, 0, 0, True)])
def test_no_width_draws_a_line_wider_than_itself_or_cuts_a_field(snap: Snapshot) -> None:
    """From a narrow pane to a wide screen, every line fits and no field ends in an ellipsis."""
    for width in range(4, 241):
        lines = drawn(LiveView(snap, rate=1.2, elapsed=5.0), width)
        assert all(cell_len(line) <= width for line in lines), (width, lines)
        assert "…" not in "".join(lines), (width, lines)


def test_plain_lines_hold_the_same_parts_in_the_same_order() -> None:
    """A pipe's line is what a wide enough terminal shows, without the bar, on one line."""
    counters, pace = drawn(LiveView(LARGE, rate=20.0, elapsed=1750.0), 400)
    shown = counters.split(" ", 1)[1].strip() + " · " + pace
    assert LARGE.line(rate=20.0, elapsed=1750.0) == shown


# Live redraws a frame by going back to its first line: carriage return, line up, erase.
REDRAW = re.compile(r"\r(?:\x1b\[2K|\x1b\[1A)+")
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_the_live_display_draws_every_frame_within_the_terminal() -> None:
    """The display on an 80-column terminal: each frame it draws fits and shows done/total."""
    engine = SimpleNamespace(
        summary=Summary(
            planned_images=60,
            images_written=35,
            failed_images=2,
            retries=3,
            rate_limited=1,
            spent_usd=2.1,
        ),
        limiter=Limiter(concurrency=16),
        waiting_to_retry=0,
    )
    screen = io.StringIO()
    show_progress(engine, Console(file=screen, force_terminal=True, width=80), mode="rich")
    frames = [ESCAPE.sub("", frame) for frame in REDRAW.split(screen.getvalue())]
    drawn_frames = [frame for frame in frames if frame.strip()]
    assert len(drawn_frames) >= 3
    for frame in drawn_frames:
        assert all(cell_len(line) <= 80 for line in frame.splitlines()), frame
        assert "images 35/60" in frame and "failed 2" in frame and "in flight 0/16" in frame
        assert "…" not in frame
