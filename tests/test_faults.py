"""The fault matrix: every injected fault ends as a retried success, a classified failure in
the ledger, or a clean stop that a second run completes; never a lost job or a stray file."""

from __future__ import annotations

import hashlib
import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from support import settings_for

from cometbatch import (
    APIConnectionError,
    CometBatchError,
    DownloadError,
    Engine,
    IncompatibleAPIError,
    Job,
    Settings,
    SimConfig,
    Simulator,
    UpstreamDownError,
)
from cometbatch.net.client import Client
from cometbatch.simulator.faults import DOWNLOAD_FAULTS, FAULTS

RETRY_AFTER = 2.5
BACKOFF_BASE = Settings().backoff_base
# dall-e-2 takes n=2 in one request, so "fewer-images" really answers fewer (one, not none).
JOB = Job(id="boat", prompt="a paper boat", model="dall-e-2", n=2, response_format="b64_json")


class Sleeps:
    """An injected sleep that takes no time and remembers every wait it was asked for."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.waits.append(delay)


@dataclass(frozen=True)
class Ok:
    """The request succeeds after `attempts`, `ambiguous` of its retries possibly billed."""

    attempts: int
    ambiguous: int = 0
    # The exact wait before the retry (a Retry-After), else a backoff within the first step.
    wait: float | None = None
    # A short answer: its image is recorded (a partial line), the rest asked for at once.
    short: bool = False


@dataclass(frozen=True)
class Failed:
    """The request fails after `attempts`, recorded with this classification."""

    kind: str
    status: int | None
    retryable: bool
    message: str
    attempts: int = 1
    code: str | None = None
    request_id: bool = True


@dataclass(frozen=True)
class Stops:
    """Every request would fail alike: the run stops with `error`, the job left pending."""

    error: type[CometBatchError]
    message: str


Outcome = Ok | Failed | Stops

MATRIX: dict[str, Outcome] = {
    "429": Ok(2, wait=RETRY_AFTER),
    "429-bare": Ok(2),
    "500": Ok(2),
    "502": Ok(2),
    "503": Ok(2),
    # Gateway timeouts: the generation behind the gateway may have run (and been billed).
    "504": Ok(2, ambiguous=1),
    "524": Ok(2, ambiguous=1),
    "500-invalid-request": Failed(
        "server", 500, False, "invalid request: upstream rejected", code="invalid_request"
    ),
    "400": Failed("bad_request", 400, False, "could not be processed"),
    "content-policy": Failed(
        "content_policy", 400, False, "safety system", code="content_policy_violation"
    ),
    "drop": Ok(2, ambiguous=1),
    "drop-midway": Ok(2, ambiguous=1),
    "slow": Ok(2, ambiguous=1),
    "malformed": Ok(2, ambiguous=1),
    # A readable answer with no images paid for nothing: retried, not counted as billed.
    "empty-data": Ok(2),
    "fewer-images": Ok(2, short=True),
    "short": Ok(2, short=True),
    # A cut-off image in the answer was generated (and billed): retried, counted as such.
    "truncated-image": Ok(2, ambiguous=1),
    # The answer came: its request id (X-Request-Id) is the one to ask about.
    "bad-base64": Failed("invalid_image", None, False, "invalid base64 image data"),
    "html": Stops(IncompatibleAPIError, "does not look like an OpenAI-compatible API"),
    "redirect": Stops(IncompatibleAPIError, "answered 301 redirect"),
}
# A "slow" answer outlasts this timeout; every other answer comes back in milliseconds.
SLOW = {"timeout": 0.2}
SIM = SimConfig(seed=11, retry_after=RETRY_AFTER, slow_seconds=0.5)


def events(out: Path) -> list[dict[str, Any]]:
    """The ledger's result events."""
    lines = (out / "ledger.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "result"]


def assert_files_match_ledger(out: Path) -> None:
    """No temp file is left, and the image files are exactly those the ok lines name, intact."""
    named = {
        image["path"]: image["sha256"]
        for event in events(out)
        if event["status"] == "ok"
        for image in event["images"]
    }
    images = out / "images"
    on_disk = [p for p in images.rglob("*") if p.is_file()] if images.exists() else []
    assert [p.name for p in on_disk if p.name.endswith(".tmp")] == []
    assert {p.relative_to(out).as_posix() for p in on_disk} == set(named)
    for path in on_disk:
        assert (
            hashlib.sha256(path.read_bytes()).hexdigest() == named[path.relative_to(out).as_posix()]
        )
        with Image.open(path) as image:
            image.load()


def assert_stopped_with_the_job_pending(engine: Engine, out: Path, pending: int = 1) -> None:
    """A clean stop: no result line, the requests pending, and an end event saying why."""
    summary = engine.summary
    assert (summary.stopped is not None, summary.pending_requests) == (True, pending)
    assert events(out) == []
    last = json.loads((out / "ledger.jsonl").read_text().splitlines()[-1])
    assert (last["event"], last["summary"]["stopped"]) == ("end", summary.stopped)
    assert_files_match_ledger(out)


async def run_one(sim: Simulator, out: Path, sleep: Sleeps, **overrides: Any) -> list[Any]:
    async with Engine(settings_for(sim, **overrides), out_dir=out, sleep=sleep) as engine:
        return [result async for result in engine.run([JOB])]


def free_port() -> int:
    """A loopback port that was just bound and released, so nothing listens on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SIM) as server:
        yield server


def test_the_matrix_covers_every_generation_fault() -> None:
    """Every fault the generation route can inject has a row (download faults: below)."""
    assert set(MATRIX) == set(FAULTS) - set(DOWNLOAD_FAULTS)


@pytest.mark.parametrize("fault", [f for f, o in MATRIX.items() if isinstance(o, Ok)])
async def test_transient_faults_succeed_after_retry(
    sim: Simulator, tmp_path: Path, fault: str
) -> None:
    """A transient fault is retried: one ok line with its attempts and possibly-billed retries."""
    expect = MATRIX[fault]
    assert isinstance(expect, Ok)
    sim.enqueue(fault)
    sleeps = Sleeps()
    (result,) = await run_one(sim, tmp_path, sleeps, **(SLOW if fault == "slow" else {}))
    assert result.ok
    assert sim.stats.requests == expect.attempts
    *partial, event = events(tmp_path)
    assert [(e["status"], [i["index"] for i in e["images"]]) for e in partial] == (
        [("partial", [0])] if expect.short else []
    )
    assert (event["status"], event["error"]) == ("ok", None)
    assert (event["attempts"], event["ambiguous_retries"]) == (expect.attempts, expect.ambiguous)
    assert [image["index"] for image in event["images"]] == [0, 1]
    assert len(sleeps.waits) == (0 if expect.short else expect.attempts - 1)
    if expect.wait is not None:
        assert sleeps.waits == [expect.wait]
    else:
        assert all(0 <= wait <= BACKOFF_BASE for wait in sleeps.waits)
    assert_files_match_ledger(tmp_path)


@pytest.mark.parametrize("fault", [f for f, o in MATRIX.items() if isinstance(o, Failed)])
async def test_permanent_faults_are_classified_in_the_ledger(
    sim: Simulator, tmp_path: Path, fault: str
) -> None:
    """A fault a retry cannot fix fails its job at once, classified, with no image written."""
    expect = MATRIX[fault]
    assert isinstance(expect, Failed)
    sim.enqueue(fault)
    (result,) = await run_one(sim, tmp_path, Sleeps())
    assert result.status == "failed"
    assert sim.stats.requests == expect.attempts
    (event,) = events(tmp_path)
    error = event["error"]
    assert (event["status"], event["attempts"], event["images"]) == ("failed", expect.attempts, [])
    assert (error["kind"], error["status"], error["code"], error["retryable"]) == (
        expect.kind,
        expect.status,
        expect.code,
        expect.retryable,
    )
    assert expect.message in error["message"]
    assert bool(error["request_id"]) is expect.request_id
    assert_files_match_ledger(tmp_path)


@pytest.mark.parametrize("fault", [f for f, o in MATRIX.items() if isinstance(o, Stops)])
async def test_faults_every_request_would_get_stop_the_run_resumably(
    sim: Simulator, tmp_path: Path, fault: str
) -> None:
    """A wrong-API answer stops the run with a clear error; a second run without it completes."""
    expect = MATRIX[fault]
    assert isinstance(expect, Stops)
    sim.enqueue(fault)
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=Sleeps()) as engine:
        with pytest.raises(expect.error, match=expect.message) as info:
            _ = [r async for r in engine.run([JOB])]
    assert "check --base-url" in str(info.value)
    assert sim.stats.requests == 1
    assert_stopped_with_the_job_pending(engine, tmp_path)

    (result,) = await run_one(sim, tmp_path, Sleeps())
    assert result.ok
    assert [(e["status"], e["attempts"]) for e in events(tmp_path)] == [("ok", 1)]
    assert_files_match_ledger(tmp_path)


# -- possibly billed twice ----------------------------------------------------------------


@pytest.mark.parametrize("fault", ["drop-midway", "slow", "drop", "truncated-image"])
async def test_ambiguous_failures_are_not_retried_when_turned_off(
    sim: Simulator, tmp_path: Path, fault: str
) -> None:
    """With retry_ambiguous off, an answer lost after sending fails as "ambiguous" at once."""
    sim.enqueue(fault)
    (result,) = await run_one(sim, tmp_path, Sleeps(), retry_ambiguous=False, **SLOW)
    assert sim.stats.requests == 1
    (event,) = events(tmp_path)
    assert (result.status, event["status"], event["attempts"]) == ("failed", "failed", 1)
    assert event["ambiguous_retries"] == 0
    error = event["error"]
    assert (error["kind"], error["status"]) == ("ambiguous", None)
    assert error["message"]
    assert_files_match_ledger(tmp_path)

    # A rerun sends it again exactly when the ledger line says a retry may help.
    rerun = await run_one(sim, tmp_path, Sleeps(), retry_ambiguous=False)
    assert [r.ok for r in rerun] == ([True] if error["retryable"] else [])
    assert sim.stats.requests == 1 + len(rerun)
    assert_files_match_ledger(tmp_path)


async def test_a_dropped_answer_is_retried_and_counted_as_possibly_billed_twice(
    sim: Simulator, tmp_path: Path
) -> None:
    """By default a cut-off answer is retried; the retry is counted, and it was billed twice."""
    sim.enqueue("drop-midway")
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=Sleeps()) as engine:
        (result,) = [r async for r in engine.run([JOB])]
    assert (result.ok, result.attempts, result.ambiguous_retries) == (True, 2, 1)
    assert engine.summary.ambiguous_retries == 1
    assert events(tmp_path)[0]["ambiguous_retries"] == 1
    # The simulator generated the first answer before cutting it off: paid for twice.
    assert sim.stats.generated == 2
    assert_files_match_ledger(tmp_path)


# -- the API is not there at all -------------------------------------------------------------


def closed_port_settings(**overrides: Any) -> Settings:
    return Settings(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="sk-test", **overrides)


async def test_connection_refused_stops_the_run_with_every_job_pending(
    tmp_path: Path,
) -> None:
    """A closed port: after its retries the first request stops the run (nothing was sent, and
    every other request would fare the same); no job is failed, and a rerun completes them."""
    jobs = [Job(id=f"r{i}", prompt=f"p{i}", model="qwen-image") for i in range(4)]
    settings = closed_port_settings(max_attempts=3)
    async with Engine(settings, out_dir=tmp_path, sleep=Sleeps()) as engine:
        with pytest.raises(UpstreamDownError) as info:
            _ = [r async for r in engine.run(jobs)]
    message = str(info.value)
    assert message.startswith(f"cannot connect to {settings.base_url}")
    assert "check --base-url" in message and "run the same command again" in message
    assert_stopped_with_the_job_pending(engine, tmp_path, pending=4)

    async with (
        Simulator(SIM) as server,
        Engine(settings_for(server), out_dir=tmp_path, sleep=Sleeps()) as engine,
    ):
        assert len([r async for r in engine.run(jobs)]) == 4
    assert engine.summary.complete
    assert [e["status"] for e in events(tmp_path)] == ["ok"] * 4
    assert_files_match_ledger(tmp_path)


async def test_refused_after_the_api_answered_fails_only_that_job(tmp_path: Path) -> None:
    """Once the API has answered this run, a refused connection is an outage (judged by
    outage_limit): that job fails retryably, the run is not stopped by it."""
    async with Simulator(SIM) as sim:
        settings = settings_for(sim, max_attempts=2)
        async with Engine(settings, out_dir=tmp_path, sleep=Sleeps()) as engine:
            (first,) = await engine.generate(JOB)
            await sim.aclose()  # the API goes away (closing twice is harmless)
            (second,) = await engine.generate(Job(id="later", prompt="p", model="qwen-image"))
    assert first.ok
    assert second.status == "failed" and second.error is not None
    assert (second.error["kind"], second.error["retryable"]) == ("connection", True)
    assert engine.summary.stopped is None
    assert [e["status"] for e in events(tmp_path)] == ["ok", "failed"]


async def test_connection_refused_past_the_outage_limit_stops_the_run(tmp_path: Path) -> None:
    """Refused past the outage limit: the run stops as upstream-down, every job still pending."""
    jobs = [Job(id=f"r{i}", prompt=f"p{i}", model="qwen-image") for i in range(4)]
    settings = closed_port_settings(max_attempts=100, outage_limit=0.005)
    async with Engine(settings, out_dir=tmp_path, sleep=Sleeps()) as engine:
        with pytest.raises(UpstreamDownError, match="run the same command again") as info:
            _ = [r async for r in engine.run(jobs)]
    assert "cannot connect to" in str(info.value)
    assert_stopped_with_the_job_pending(engine, tmp_path, pending=4)

    async with Simulator(SIM) as server:
        async with Engine(settings_for(server), out_dir=tmp_path, sleep=Sleeps()) as engine:
            assert len([r async for r in engine.run(jobs)]) == 4
        assert engine.summary.complete
    assert_files_match_ledger(tmp_path)


# -- url-mode download faults, at the client ------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "message", "second"),
    [
        ("download-404", 404, "the image URL is no longer valid (404)", True),
        ("download-expired", 404, "the image URL is no longer valid (404)", False),
        ("download-huge", None, "image larger than 4096 bytes", True),
        ("download-not-image", 200, "not an image: the URL answered text/html", True),
    ],
)
async def test_download_faults_raise_a_clear_permanent_download_error(
    fault: str, status: int | None, message: str, second: bool
) -> None:
    """Each download fault is a DownloadError, not retryable, saying what is wrong with the link."""
    async with (
        Simulator(SimConfig(seed=3, huge_download_bytes=8192)) as server,
        Client(base_url=server.base_url, api_key="sk-test", max_download_bytes=4096) as client,
    ):
        answer = await client.generate({"model": "dall-e-2", "prompt": "a kite"})
        url = answer.data[0].url
        assert url is not None
        server.enqueue(fault)
        with pytest.raises(DownloadError) as info:
            await client.download(url)
        # One 404, one huge or one interstitial page passes; an expired link stays gone.
        if second:
            data, content_type = await client.download(url)
            assert (data[:4], content_type) == (b"\x89PNG", "image/png")
        else:
            with pytest.raises(DownloadError, match=r"no longer valid \(404\)"):
                await client.download(url)
    exc = info.value
    assert (str(exc), exc.status, exc.retryable, exc.kind) == (message, status, False, "download")
    assert server.stats.faults == {fault: 1}


# -- a cut-off answer, at the client ---------------------------------------------------------


async def cut_off_error() -> APIConnectionError:
    """The error Client.generate raises for an answer cut off after its headers."""
    async with (
        Simulator(SIM) as server,
        Client(base_url=server.base_url, api_key="sk-test") as client,
    ):
        server.enqueue("drop-midway")
        with pytest.raises(APIConnectionError) as info:
            await client.generate({"model": "dall-e-2", "prompt": "a kite"})
    return info.value


async def test_a_cut_off_answer_is_an_ambiguous_retryable_error() -> None:
    """An answer cut off mid-body was sent and maybe billed: ambiguous, sent, retryable."""
    exc = await cut_off_error()
    assert (exc.kind, exc.sent, exc.retryable, exc.status) == ("ambiguous", True, True, None)
    assert "cut off" in exc.message


async def test_a_cut_off_answer_is_explained_plainly() -> None:
    """The message says the image may have been generated and shows no misleading status."""
    exc = await cut_off_error()
    assert "the image may have been generated" in exc.message
    # The URL's random port may contain "400"; the rest of the message must not.
    assert "400" not in re.sub(r"http://\S+", "URL", exc.message)
