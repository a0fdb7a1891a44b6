"""The storage seam: the local store keeps the Store promises, and the engine writes only
through the store it was handed, each image whole there before its ok line."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from support import ledger_results, no_sleep, run_all, settings_for

from cometbatch import Engine, Job, LedgerError, SimConfig, Simulator
from cometbatch.store.interface import Store
from cometbatch.store.local import LocalStore


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("loop_bytes", [0, 10**9])
async def test_put_writes_the_whole_object_and_replaces_an_earlier_one(
    tmp_path: Path, loop_bytes: int
) -> None:
    """A put makes its folders, leaves only the named file (no temporary one), and a second
    put at the same name replaces it; stat and read tell what is there."""
    store: Store = LocalStore(tmp_path, loop_bytes=loop_bytes)
    await store.put("images/a/0.png", b"first")
    await store.put("images/a/0.png", b"second!", sync=True)
    assert files_under(tmp_path) == ["images/a/0.png"]
    assert store.read("images/a/0.png") == b"second!"
    entry = store.stat("images/a/0.png")
    assert (entry.size, entry.is_file) == (7, True)
    assert not store.stat("images/a").is_file
    with pytest.raises(FileNotFoundError):
        store.stat("images/a/1.png")
    store.remove("images/a/0.png")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("sync", [False, True])
async def test_put_file_hands_a_finished_file_over_whole(tmp_path: Path, sync: bool) -> None:
    """put_file moves a finished local file to its name (folders made) and the source is
    gone; names lists every object below a folder, sorted, without unfinished writes."""
    store: Store = LocalStore(tmp_path / "out")
    source = tmp_path / "download.part"
    source.write_bytes(b"streamed image")
    await store.put_file("images/j/3.png", str(source), sync=sync)
    assert not source.exists()
    assert store.read("images/j/3.png") == b"streamed image"
    await store.put("images/a/0.png", b"a")
    (tmp_path / "out" / "images" / "a" / ".0.x1.tmp").write_bytes(b"cut short")
    await store.put("ledger.jsonl", b"l")
    assert store.names("images") == ["images/a/0.png", "images/j/3.png"]
    assert store.names("") == ["images/a/0.png", "images/j/3.png", "ledger.jsonl"]
    assert store.names("nothing-here") == []


def test_move_refuses_a_linked_name_before_moving_anything(tmp_path: Path) -> None:
    """A batch of moves with one name reached through a symbolic link raises ELOOP and moves
    none of them; without links every file moves, its target's folder made."""
    store = LocalStore(tmp_path)
    for name in ("images/a/0.png", "images/b/0.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (tmp_path / "images" / "c").symlink_to(elsewhere, target_is_directory=True)
    moves = [("images/a/0.png", "kept/a/0.png"), ("images/b/0.png", "images/c/0.png")]
    with pytest.raises(OSError) as refused:
        store.move(moves)
    assert refused.value.errno == errno.ELOOP
    assert files_under(tmp_path) == ["images/a/0.png", "images/b/0.png"]
    store.move([("images/a/0.png", "kept/a/0.png"), ("images/b/0.png", "kept/b/0.png")])
    assert files_under(tmp_path) == ["kept/a/0.png", "kept/b/0.png"]
    assert (tmp_path / "kept/b/0.png").read_bytes() == b"images/b/0.png"


def test_escapes_tells_a_link_out_of_its_folder(tmp_path: Path) -> None:
    """A name whose link leads out of the folder escapes it; one that stays inside does not."""
    store = LocalStore(tmp_path)
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"y")
    (tmp_path / "images" / "a" / "1.png").symlink_to(tmp_path / "outside.png")
    (tmp_path / "images" / "a" / "2.png").symlink_to(tmp_path / "images" / "a" / "0.png")
    assert store.escapes("images/a/1.png", "images")
    assert not store.escapes("images/a/2.png", "images")
    assert not store.escapes("images/a/0.png", "images")


def test_clean_removes_only_temporary_files(tmp_path: Path) -> None:
    """Temporary files in the subfolders are removed and counted; images and a missing
    folder are left alone; a subfolder that is a link is refused (ELOOP)."""
    store = LocalStore(tmp_path)
    assert store.clean("images") == 0
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"x")
    (tmp_path / "images" / "a" / ".1.ab12.tmp").write_bytes(b"half")
    assert store.clean("images") == 1
    assert files_under(tmp_path) == ["images/a/0.png"]
    (tmp_path / "images" / "b").symlink_to(tmp_path / "images" / "a", target_is_directory=True)
    with pytest.raises(OSError) as refused:
        store.clean("images")
    assert refused.value.errno == errno.ELOOP


def test_check_writable_probes_and_leaves_nothing(tmp_path: Path) -> None:
    """The probe makes the folder and leaves no file; a folder that is a file cannot be."""
    store = LocalStore(tmp_path / "out")
    store.check_writable("images")
    assert (tmp_path / "out" / "images").is_dir()
    assert files_under(tmp_path) == []
    (tmp_path / "out" / "blocked").write_bytes(b"")
    with pytest.raises(OSError):
        store.check_writable("blocked")


@pytest.mark.parametrize("sync", [False, True])
def test_log_appends_whole_lines_in_order(tmp_path: Path, sync: bool) -> None:
    """Appends go after what is there, each returning the log's new size; close keeps them."""
    (tmp_path / "log.jsonl").write_bytes(b"old\n")
    log = LocalStore(tmp_path).open_log("log.jsonl", sync=sync)
    assert log.append(b"a\n", sync) == 6
    assert log.append(b"b\nc\n", sync) == 10
    log.close(sync)
    assert (tmp_path / "log.jsonl").read_bytes() == b"old\na\nb\nc\n"


def test_one_lock_per_store(tmp_path: Path) -> None:
    """A second lock on the same folder is refused while the first is held, then taken."""
    first, second = LocalStore(tmp_path).lock(), LocalStore(tmp_path).lock()
    first.acquire()
    try:
        with pytest.raises(LedgerError, match="in use by another cometbatch run"):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()


class WatchedStore(LocalStore):
    """A local store that notes each image put and what the ledger said at that moment."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[tuple[str, bytes]] = []

    async def put(self, name: str, data: bytes, *, sync: bool = False) -> None:
        ledger = self.path / "ledger.jsonl"
        self.puts.append((name, ledger.read_bytes() if ledger.exists() else b""))
        await super().put(name, data, sync=sync)


async def test_the_engine_writes_through_the_store_it_was_handed(tmp_path: Path) -> None:
    """Every image an ok line names was put through the engine's store, before any ledger
    line named it."""
    out = tmp_path / "out"
    store = WatchedStore(out)
    jobs = [Job(id=f"j{i}", prompt=f"picture {i}", model="gpt-image-1", n=2) for i in range(3)]
    async with Simulator(SimConfig(seed=4)) as sim:
        settings = settings_for(sim, concurrency=2)
        async with Engine(settings, out_dir=out, store=store, sleep=no_sleep) as engine:
            assert engine.store is store
            results = await run_all(engine, jobs)
    assert all(result.ok for result in results)
    named = {
        image["path"]
        for line in ledger_results(out)
        if line["status"] == "ok"
        for image in line["images"]
    }
    assert len(named) == 6
    assert {name for name, _ in store.puts} == named
    for name, ledger_then in store.puts:
        lines = [json.loads(line) for line in ledger_then.splitlines()]
        assert not any(
            image["path"] == name for line in lines for image in line.get("images") or ()
        )


def test_a_store_elsewhere_than_the_output_folder_is_refused(tmp_path: Path) -> None:
    """The ledger is read from out_dir on resume, so a store rooted elsewhere would pay twice."""
    from cometbatch import ConfigError, Settings

    with pytest.raises(ConfigError, match="must be out_dir"):
        Engine(Settings(), out_dir=tmp_path / "a", store=LocalStore(tmp_path / "b"))
    Engine(Settings(), out_dir=tmp_path / "a", store=LocalStore(tmp_path / "a"))


async def test_removing_a_folders_last_file_removes_the_folder(tmp_path: Path) -> None:
    """A local folder left empty by remove goes too, as on an object store, and a later put
    into it makes it again."""
    store = LocalStore(tmp_path)
    await store.put("images/a/0.png", b"one")
    await store.put("images/a/1.png", b"two")
    store.remove("images/a/0.png")
    assert (tmp_path / "images" / "a").is_dir()
    store.remove("images/a/1.png")
    assert not (tmp_path / "images" / "a").exists() and (tmp_path / "images").is_dir()
    await store.put("images/a/2.png", b"three")
    assert store.names("images") == ["images/a/2.png"]
