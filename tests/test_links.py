"""A symbolic link under OUT/images is never followed out of OUT: not to write, not to show."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import no_sleep, settings_for

from cometbatch import Engine, Job, OutputError, SimConfig, Simulator
from cometbatch.paths import unlinked
from cometbatch.simulator.imagegen import make_png
from cometbatch.views.gallery.content import write_gallery

JOBS = [Job(id="a", prompt="a fox", model="dall-e-3"), Job(id="b", prompt="a bird")]


async def run(out: Path) -> list[str]:
    """Run JOBS into `out` against the simulator; the ids of the results."""
    async with (
        Simulator(SimConfig(seed=1)) as sim,
        Engine(settings_for(sim), out_dir=out, sleep=no_sleep) as engine,
    ):
        return [result.job.id async for result in engine.run(JOBS)]


@pytest.mark.parametrize("linked", ["images/a", "images"])
async def test_a_run_refuses_a_linked_folder_under_out_and_writes_nothing_through_it(
    tmp_path: Path, linked: str
) -> None:
    """A job folder (or OUT/images) that is a link to another place stops the run with an
    OutputError naming it, before any image lands in that place."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    (out / linked).parent.mkdir(parents=True)
    (out / linked).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputError, match="symbolic link") as info:
        await run(out)
    assert linked in str(info.value)
    assert list(elsewhere.rglob("*")) == []


async def test_a_link_made_while_a_sink_writes_is_not_followed(tmp_path: Path) -> None:
    """The check is where the folder is made too: a link planted after the start is refused."""
    from cometbatch.store.sink import Sink

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sink = Sink(tmp_path / "out")
    sink.check_writable()
    assert sink.remove_stale_temp_files() == 0
    (tmp_path / "out" / "images" / "a").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OSError, match="symbolic link"):
        await sink.write("a", 0, make_png(4, 4, 1))
    assert list(elsewhere.rglob("*")) == []


async def test_the_gallery_shows_no_image_behind_a_link(tmp_path: Path) -> None:
    """An image whose folder was swapped for a link after the run is shown as a placeholder,
    not linked from the page."""
    out = tmp_path / "out"
    assert sorted(await run(out)) == ["a", "b"]
    elsewhere = tmp_path / "elsewhere"
    (out / "images" / "a").rename(elsewhere)
    (out / "images" / "a").symlink_to(elsewhere, target_is_directory=True)
    page = write_gallery(out).read_text(encoding="utf-8")
    assert "images/b/0." in page and "images/a/0." not in page
    assert "symbolic link" in page


def test_unlinked_checks_every_part_below_out(tmp_path: Path) -> None:
    """A path is reached without a link only when no folder or file below OUT is one."""
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"x")
    (tmp_path / "images" / "a" / "1.png").symlink_to(tmp_path / "images" / "a" / "0.png")
    (tmp_path / "images" / "b").symlink_to(tmp_path / "images" / "a")
    assert unlinked(tmp_path, "images/a/0.png")
    assert not unlinked(tmp_path, "images/a/1.png")
    assert not unlinked(tmp_path, "images/b/0.png")
    assert unlinked(tmp_path, "images/c/0.png")  # missing is not a link
