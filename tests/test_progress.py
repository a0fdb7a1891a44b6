"""Progress lines are built from a plain snapshot, so their wording is tested without a terminal."""

from __future__ import annotations

import asyncio
import io
import os
from types import SimpleNamespace
from typing import TextIO, cast

import pytest
from rich.console import Console
from support import PACE, show_progress

from cometbatch import Engine, Summary
from cometbatch.cli.progress import (
    ProgressDisplay,
    RateMeter,
    choose_mode,
    make_console,
    wants_no_color,
)
from cometbatch.cli.snapshot import Snapshot, eta_text
from cometbatch.net.limits import Limiter
from cometbatch.streams import GuardedStream, stream_gone


def snap(**fields: object) -> Snapshot:
    values: dict[str, object] = {
        "done": 40,
        "failed": 2,
        "total": 100,
        "in_flight": 8,
        "limit": 16,
        "retries": 3,
        "rate_limited": 1,
        "probing": False,
    }
    values.update(fields)
    return Snapshot(**values)  # type: ignore[arg-type]


def test_plain_line_shows_counts_rate_and_eta() -> None:
    """A plain line has done/total, the rate, an ETA from what is left, and the counters."""
    line = snap().line(rate=2.0)
    assert line.startswith("images 40/100 · 2.0/s · eta 29 s · in flight 8/16 · failed 2")
    assert "in flight 8/16" in line and "retries 3" in line and "429s 1" in line
    assert "failed 2" in line


def test_probing_is_called_out() -> None:
    """When the limiter probes a failing API, the line says so."""
    assert "probing" in snap(probing=True).line(rate=1.0)
    assert "probing" not in snap().line(rate=1.0)


def test_no_eta_without_a_rate() -> None:
    """Before anything lands there is no ETA to show."""
    assert "eta" not in snap().line(rate=0.0)


def test_mode_follows_the_stream_and_flags() -> None:
    """Rich on a terminal, plain on a pipe, off with --quiet or --json."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert choose_mode(quiet=False, json_output=False, stream=Tty()) == "rich"
    assert choose_mode(quiet=False, json_output=False, stream=io.StringIO()) == "plain"
    assert choose_mode(quiet=True, json_output=False, stream=Tty()) == "off"
    assert choose_mode(quiet=False, json_output=True, stream=Tty()) == "off"


def test_requests_waiting_to_retry_are_shown_only_when_there_are_some() -> None:
    """During a long Retry-After the line says how many requests are waiting, else stays short."""
    assert "waiting to retry 12" in snap(waiting=12).line(rate=1.0)
    assert "waiting" not in snap(waiting=0).line(rate=1.0)


def test_rate_counts_only_this_runs_images_over_a_sliding_window() -> None:
    """The rate comes from images processed in the window, not from a resume's skipped ones."""
    meter = RateMeter(window=10)
    assert meter.add(0.0, 0) == 0.0
    assert meter.add(2.0, 20) == 10.0
    assert meter.add(4.0, 40) == 10.0
    # Old samples fall out of the window: a slowdown shows within it.
    assert meter.add(20.0, 50) == pytest.approx(10 / 16)
    assert meter.add(25.0, 55) == pytest.approx(5 / 5)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "?"), (0.4, "0 s"), (42, "42 s"), (185, "3:05"), (7385, "2:03:05")],
)
def test_eta_text(seconds: float | None, text: str) -> None:
    """Time left reads as seconds, minutes:seconds or hours:minutes:seconds."""
    assert eta_text(seconds) == text


def test_eta_is_zero_when_everything_is_done() -> None:
    """A finished run shows no time left rather than an unknown one."""
    assert snap(done=98, failed=2).eta(rate=0.0) == 0.0


def test_auto_concurrency_shows_the_level_it_chose_and_its_maximum() -> None:
    """With auto concurrency the line shows the chosen limit and the most it may grow to."""
    line = snap(in_flight=60, limit=64, auto=True, ceiling=500).line(rate=1.0)
    assert "in flight 60/64 (auto, max 500) · failed" in line
    assert "auto" not in snap().line(rate=1.0)


def test_a_level_that_follows_the_rate_and_what_holds_it_back_are_shown() -> None:
    """With a level sized from the rate, the line says so, then the rate against the limit."""
    pace = PACE
    line = snap(in_flight=40, limit=61, follows_rate=True, ceiling=1000).line(rate=1.0)
    assert "in flight 40/61 (follows the rate, max 1000) · failed" in line
    shown = snap(pace=pace).line(rate=1.0)
    assert "590 requests/min of 600 (98%), 590 images/min; limited by concurrency 16: at " in shown
    assert "3.1 s per request, 600/min needs about 31" in shown


def test_the_snapshot_reads_auto_concurrency_from_the_engine() -> None:
    """Snapshot.of takes the auto flag and the maximum from the engine's limiter."""
    engine = SimpleNamespace(
        summary=Summary(planned_images=10),
        limiter=Limiter(concurrency=300, auto=True),
        waiting_to_retry=0,
    )
    shot = Snapshot.of(cast(Engine, engine))
    assert (shot.auto, shot.limit, shot.ceiling) == (True, 16, 300)


def test_plain_mode_prints_one_line_per_period_without_escapes() -> None:
    """Off a terminal the display prints a plain line every period (the first one sooner)."""
    engine = SimpleNamespace(
        summary=Summary(planned_images=10, images_written=4),
        limiter=Limiter(concurrency=8),
        waiting_to_retry=0,
    )
    printed = io.StringIO()
    naps = show_progress(engine, Console(file=printed, width=200), mode="plain", plain_every=10)
    # The first line comes sooner than a period; then one every period.
    assert naps[0] < 10 and naps[1:] == [10, 10]
    lines = printed.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("images 4/10") for line in lines)
    assert "\x1b" not in printed.getvalue()


def test_no_color_console_writes_no_style_codes() -> None:
    """NO_COLOR (any non-empty value) turns off colour and every other style code."""
    assert wants_no_color({"NO_COLOR": "1"}) and not wants_no_color({"NO_COLOR": ""})
    console = make_console(environ={"NO_COLOR": "1"})
    assert console.no_color and console.color_system is None
    with console.capture() as captured:
        console.print("[bold red]error:[/bold red] x")
    assert captured.get() == "error: x\n"


def test_a_dumb_terminal_gets_plain_lines() -> None:
    """TERM=dumb cannot redraw a bar: plain lines instead."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    mode = choose_mode(quiet=False, json_output=False, stream=Tty(), environ={"TERM": "dumb"})
    assert mode == "plain"
    assert choose_mode(quiet=False, json_output=False, stream=Tty(), environ={}) == "rich"


def test_spend_so_far_is_shown_and_a_cap_with_the_folders_figures() -> None:
    """The run's spend is always shown; with caps, the folder's count (in flight included)
    against each cap."""
    assert "spent $0.420" in snap(spent=0.42).line(rate=1.0)
    line = snap(spent=0.5, cost_cap=2.0, cost_counted=1.25, images_cap=40, images_counted=31)
    text = line.line(rate=1.0)
    assert "spent $0.500 (folder $1.25 of max $2.00)" in text
    assert "folder images 31 of max 40" in text
    assert "max" not in snap(spent=0.5).line(rate=1.0)


class ReaderGone(io.StringIO):
    """A stream whose reader went away after `keep` writes (EPIPE from then on)."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep
        self.attempts = 0

    def write(self, text: str) -> int:
        self.attempts += 1
        if self.attempts > self.keep:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_a_stream_whose_reader_left_is_silenced_for_good() -> None:
    """A closed pipe: the failed write and every later one are dropped, nothing raises."""
    read, write = os.pipe()
    os.close(read)
    with open(write, "w") as raw:
        guarded = GuardedStream(raw)
        assert not stream_gone(guarded)
        assert guarded.write("x" * 200_000) == 200_000
        guarded.flush()
        assert stream_gone(guarded) and not guarded.isatty()
        guarded.write("more")
        guarded.flush()
    # The descriptor now points at /dev/null: flushing what was left (at exit) succeeds.
    stream = ReaderGone(keep=1)
    guarded = GuardedStream(stream)
    guarded.write("kept\n")
    guarded.write("lost\n")
    guarded.write("never tried\n")
    assert stream.getvalue() == "kept\n" and stream.attempts == 2


def test_the_display_stops_when_its_reader_goes_away() -> None:
    """After the first failed write the plain display stops for good; the run is untouched."""
    engine = SimpleNamespace(
        summary=Summary(planned_images=10, images_written=4),
        limiter=Limiter(concurrency=8),
        waiting_to_retry=0,
    )
    stream = ReaderGone(keep=1)
    naps: list[float] = []
    went_on: list[int] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        await asyncio.sleep(0)  # no time passes; the run gets its turn

    async def scenario() -> None:
        console = Console(file=cast(TextIO, GuardedStream(stream)), width=200)
        display = ProgressDisplay(
            cast(Engine, engine), mode="plain", console=console, plain_every=10, sleep=sleep
        )
        async with display:
            for step in range(200):
                await asyncio.sleep(0)
                went_on.append(step)
            naps_after_a_while = len(naps)
            for _ in range(50):
                await asyncio.sleep(0)
            # Stopped for good: it neither writes nor waits to write again.
            assert len(naps) == naps_after_a_while

    asyncio.run(scenario())
    # One line written, the second write failed: none tried after it.
    assert stream.attempts == 2
    assert went_on == list(range(200))
    assert stream.getvalue().startswith("images 4/10")
