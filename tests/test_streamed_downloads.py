"""URL-mode images stream to local staging and are handed to the store, never held whole."""

from __future__ import annotations

import contextlib
import hashlib
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from support import Handler, no_sleep, run_all, serve, settings_for
from support import ledger_results as results

from cometbatch import DownloadError, Engine, Job, Settings, SimConfig, Simulator
from cometbatch.net.client import Client
from cometbatch.simulator.imagegen import png_of_size
from cometbatch.store.imagecheck import check_image
from cometbatch.store.interface import Store
from cometbatch.store.local import LocalStore
from cometbatch.store.sink import SPOOL_BYTES, Sink
from cometbatch.store.staging import STAGING_FOLDER, Staging

BIG = 20 * 1024 * 1024
URL_JOB = Job(id="big", prompt="a glacier", model="dall-e-2", n=1, response_format="url")


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.glob("*") if p.is_file()]


def staged_files(out: Path) -> list[Path]:
    """The files in OUT's download staging folder."""
    return files_in(out.joinpath(*STAGING_FOLDER.split("/")))


def leave_staged_file(staging: Staging) -> Path:
    """A staged download as a killed run leaves it."""
    Path(staging.folder).mkdir(parents=True)
    leftover = Path(staging.folder, "0123456789abcdef.part")
    leftover.write_bytes(b"\x89PNG half of it")
    return leftover


def images(out: Path) -> list[Path]:
    return [p for p in (out / "images").rglob("*") if p.is_file()]


@contextlib.asynccontextmanager
async def image_api(body: bytes, *, cut_at: int | None = None) -> AsyncIterator[str]:
    """An images API whose one link serves `body` in chunks with no Content-Length (its size
    unknown until the end), or drops the connection after `cut_at` bytes; yields its base URL."""

    async def generate(request: web.Request) -> web.StreamResponse:
        origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        return web.json_response({"created": 1, "data": [{"url": f"{origin}/files/x.png"}]})

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        view = memoryview(body)
        end = len(body) if cut_at is None else cut_at
        for start in range(0, end, 256 * 1024):
            await response.write(view[start : min(end, start + 256 * 1024)])
        if cut_at is not None:
            assert request.transport is not None
            request.transport.close()  # cut off: no last chunk
            return response
        await response.write_eof()
        return response

    routes: dict[tuple[str, str], Handler] = {
        ("POST", "/v1/images/generations"): generate,
        ("GET", "/files/{name}"): download,
    }
    async with serve(routes) as origin:
        yield f"{origin}/v1"


async def test_a_large_url_image_is_stored_whole_and_right(tmp_path: Path) -> None:
    """A 20 MB image from the simulator's link lands whole, with the recorded size and sha256,
    and nothing stays in staging."""
    async with (
        Simulator(SimConfig(seed=1, payload_bytes=BIG)) as sim,
        Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine,
    ):
        (result,) = await run_all(engine, [URL_JOB])
    assert result.ok
    ((image,),) = [line["images"] for line in results(tmp_path)]
    data = (tmp_path / image["path"]).read_bytes()
    assert len(data) == image["bytes"] >= BIG
    assert hashlib.sha256(data).hexdigest() == image["sha256"]
    assert check_image(data) == "png"
    assert staged_files(tmp_path) == []


async def test_the_download_path_holds_a_fraction_of_the_image_in_memory(tmp_path: Path) -> None:
    """Peak memory while a 20 MB image of unknown size is downloaded and stored stays far
    below its size."""
    body = png_of_size(BIG, 7)
    store = LocalStore(tmp_path)
    sink = Sink(store)
    async with image_api(body) as base, Client(base_url=base, api_key=None) as client:
        url = base.removesuffix("/v1") + "/files/x.png"
        tracemalloc.start()
        try:
            async with client.open_download(url) as answer:
                record = await sink.write_stream("j", 0, answer.chunks)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (tmp_path / record.path).read_bytes() == body
    assert record.sha256 == hashlib.sha256(body).hexdigest()
    assert peak < BIG / 5, f"peak {peak} bytes"


async def test_a_cut_off_download_leaves_no_object_and_no_staging_file(tmp_path: Path) -> None:
    """A link whose connection drops midway is retried, then recorded download_failed, with no
    image and no staged file left."""
    body = png_of_size(4 * SPOOL_BYTES, 2)
    async with image_api(body, cut_at=3 * SPOOL_BYTES) as base:
        settings = Settings(base_url=base, api_key="sk-test")
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [URL_JOB])
    assert result.status == "download_failed"
    assert results(tmp_path)[-1]["error"]["kind"] == "download"
    assert images(tmp_path) == []
    assert staged_files(tmp_path) == []


async def test_the_size_cap_holds_for_a_download_of_unknown_size(tmp_path: Path) -> None:
    """A body with no Content-Length is refused once it passes max_download_bytes; nothing of
    it stays in the store or in staging."""
    body = png_of_size(4 * SPOOL_BYTES, 3)
    async with image_api(body) as base:
        settings = Settings(base_url=base, api_key="sk-test", max_download_bytes=2 * SPOOL_BYTES)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (result,) = await run_all(engine, [URL_JOB])
    assert result.status == "download_failed"
    assert f"larger than {2 * SPOOL_BYTES} bytes" in results(tmp_path)[-1]["error"]["message"]
    assert images(tmp_path) == []
    assert staged_files(tmp_path) == []


async def test_a_download_that_is_not_a_whole_image_is_not_stored(tmp_path: Path) -> None:
    """A large body that ends early (but cleanly) fails the image check: no object, no staged
    file."""
    body = png_of_size(4 * SPOOL_BYTES, 4)[: 3 * SPOOL_BYTES]
    sink = Sink(LocalStore(tmp_path))
    async with image_api(body) as base, Client(base_url=base, api_key=None) as client:
        url = base.removesuffix("/v1") + "/files/x.png"
        async with client.open_download(url) as answer:
            with pytest.raises(Exception, match="incomplete or corrupt PNG"):
                await sink.write_stream("j", 0, answer.chunks)
    assert images(tmp_path) == []
    assert staged_files(tmp_path) == []


async def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path: Path) -> None:
    """A staged download a killed run left behind is gone once the next run has started."""
    leftover = leave_staged_file(Staging.for_store(LocalStore(tmp_path)))
    async with (
        Simulator(SimConfig(seed=1)) as sim,
        Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep),
    ):
        assert staged_files(tmp_path) == []
    assert leftover.parent == tmp_path.joinpath(*STAGING_FOLDER.split("/"))


async def test_a_broken_download_raises_the_download_error(tmp_path: Path) -> None:
    """The cut-off stream reaches the caller as a retryable DownloadError."""
    body = png_of_size(4 * SPOOL_BYTES, 5)
    sink = Sink(LocalStore(tmp_path))
    async with (
        image_api(body, cut_at=2 * SPOOL_BYTES) as base,
        Client(base_url=base, api_key=None) as client,
    ):
        url = base.removesuffix("/v1") + "/files/x.png"
        with pytest.raises(DownloadError) as caught:
            async with client.open_download(url) as answer:
                await sink.write_stream("j", 0, answer.chunks)
    assert caught.value.retryable
    assert staged_files(tmp_path) == []


class ElsewhereStore:
    """A store that is not a local folder (it forwards to one), recording what it was handed."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.handed: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def root(self) -> str:
        return "elsewhere://bucket/out"

    @property
    def local_folder(self) -> None:
        return None  # not a folder on this machine

    async def put_file(self, name: str, source: str, *, sync: bool = False) -> None:
        self.handed.append((name, source))
        await self.inner.put_file(name, source, sync=sync)


async def test_for_a_store_elsewhere_downloads_stage_in_a_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is staged in the output: the file is staged in the temporary folder and handed
    to the store with put_file."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "temp"))
    store = ElsewhereStore(LocalStore(tmp_path / "out"))
    sink = Sink(cast(Store, store))
    body = png_of_size(2 * SPOOL_BYTES, 6)
    async with image_api(body) as base, Client(base_url=base, api_key=None) as client:
        url = base.removesuffix("/v1") + "/files/x.png"
        async with client.open_download(url) as answer:
            record = await sink.write_stream("j", 0, answer.chunks)
    ((name, source),) = store.handed
    assert name == record.path
    assert Path(source).parent.parent == tmp_path / "temp" / "cometbatch-staging"
    assert (tmp_path / "out" / record.path).read_bytes() == body
    assert files_in(Path(source).parent) == []
    assert staged_files(tmp_path / "out") == []
