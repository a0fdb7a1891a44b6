"""Security properties end to end: the key never leaks, credentials stay on the API's origin,
job ids cannot escape the output folder, plain http is refused, one run per folder.

Only what other test modules do not already prove is here (see test_client, test_paths,
test_sink, test_engine, test_ledger and test_simulator for the unit-level checks).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr
from support import Handler, no_sleep, serve

from cometbatch import (
    APIError,
    AuthenticationError,
    ConfigError,
    DownloadError,
    Engine,
    IncompatibleAPIError,
    Job,
    ManifestError,
    Settings,
    SimConfig,
    Simulator,
    load_manifest,
)
from cometbatch.ledger.writer import Ledger
from cometbatch.net.client import Client
from cometbatch.net.limits import Limiter
from cometbatch.simulator.imagegen import make_png
from cometbatch.store.lock import LOCK_NAME
from cometbatch.store.sink import Sink

ROOT = Path(__file__).resolve().parent.parent
ROUTE = "/v1/images/generations"
PNG = make_png(8, 8, 1)


# --- helpers: the leak detector -----------------------------------------------------------


def canary_key() -> str:
    """A key that is distinctive enough that any occurrence anywhere is a leak."""
    return f"sk-LEAKCANARY-{secrets.token_hex(16)}"


def _base64_cores(needle: bytes) -> set[bytes]:
    """What any base64 text that encodes `needle` must contain, at each of the 3 alignments."""
    cores = set()
    for shift in range(3):
        data = b"\x00" * shift + needle
        # The first group mixes in the bytes before the needle, the last partial group the
        # bytes after it: only the groups in between are fixed by the needle alone.
        core = base64.b64encode(data)[4 if shift else 0 : len(data) // 3 * 4]
        cores.add(core)
        cores.add(core.translate(bytes.maketrans(b"+/", b"-_")))
    return cores


@dataclass(frozen=True)
class Form:
    """One way the key could be written down."""

    name: str
    data: bytes
    caseless: bool = False


def leak_forms(key: str) -> list[Form]:
    """The key as written plainly, split, base64-, URL-, percent- and hex-encoded."""
    secret = key.rsplit("-", 1)[1]
    # A key split anywhere (a wrapped log line, "Bearer " + key cut in two) leaves one half
    # of its random part intact, so the halves are searched for in every encoding.
    halves = [secret[: len(secret) // 2], secret[len(secret) // 2 :]]
    forms = [
        Form("key", key.encode(), caseless=True),
        Form("Authorization header", f"Bearer {key}".encode(), caseless=True),
        Form("URL-encoded key", quote(key, safe="").encode()),
        Form("URL-encoded header", quote_plus(f"Bearer {key}").encode()),
        Form("percent-encoded key", "".join(f"%{b:02X}" for b in key.encode()).encode(), True),
        *(Form(f"base64 key {i}", core) for i, core in enumerate(_base64_cores(key.encode()))),
    ]
    for number, half in enumerate(halves):
        raw = half.encode()
        forms += [
            Form(f"key half {number}", raw, caseless=True),
            Form(f"hex of key half {number}", raw.hex().encode(), caseless=True),
            Form(
                f"percent-encoded key half {number}",
                "".join(f"%{b:02X}" for b in raw).encode(),
                caseless=True,
            ),
            *(
                Form(f"base64 key half {number}.{i}", core)
                for i, core in enumerate(_base64_cores(raw))
            ),
        ]
    return forms


def leaks(data: bytes | str, forms: Iterable[Form]) -> list[str]:
    """The names of the forms of the key found in `data`."""
    blob = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    lowered = blob.lower()
    return [
        form.name
        for form in forms
        if form.data in blob or (form.caseless and form.data.lower() in lowered)
    ]


def files_under(*roots: Path) -> list[Path]:
    """Every regular file below the roots, hidden ones included."""
    found = []
    for root in roots:
        for folder, _, names in os.walk(root):
            found += [Path(folder, name) for name in names]
    return found


def assert_no_leak(forms: list[Form], **texts: bytes | str | None) -> None:
    """None of the named texts contains any form of the key."""
    found = {name: leaks(text, forms) for name, text in texts.items() if text is not None}
    assert {name: hits for name, hits in found.items() if hits} == {}


# --- helpers: processes and servers ---------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any API settings, importing cometbatch from this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMETAPI_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def cometbatch(*args: str, env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion."""
    return subprocess.run(
        [sys.executable, "-m", "cometbatch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(env),
        cwd=cwd,
    )


def write_manifest(path: Path, jobs: Iterable[Mapping[str, Any]]) -> Path:
    """A JSONL manifest with one job per line."""
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def ledger_events(out: Path) -> list[dict[str, Any]]:
    """Every event of OUT/ledger.jsonl."""
    return [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines() if x]


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `condition` until it holds (the only waiting these tests do)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@dataclass
class SimProcess:
    """A `cometbatch simulate` subprocess: its base URL, and its log once stopped."""

    base_url: str
    log: Path


@contextlib.contextmanager
def simulator_process(
    *options: str, env: Mapping[str, str], cwd: Path, log: Path
) -> Iterator[SimProcess]:
    """`cometbatch simulate` on an ephemeral loopback port, logging to `log`; stopped after."""
    with log.open("w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "cometbatch", "simulate", "--port", "0", *options],
            stdout=sink,
            stderr=sink,
            env=dict(env),
            cwd=cwd,
        )
    try:
        wait_for(lambda: log.read_text().endswith("\n") or server.poll() is not None, 60)
        first = log.read_text().splitlines()[0]
        base_url = first.rsplit(" ", 1)[-1]
        assert base_url.startswith("http://127.0.0.1:"), first
        yield SimProcess(base_url, log)
    finally:
        server.terminate()
        server.wait(timeout=30)


@dataclass
class Recorder:
    """A second origin that records every request it gets: (method, path, Authorization)."""

    seen: list[tuple[str, str, str | None]]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen.append((request.method, request.path, request.headers.get("Authorization")))
        if request.method == "GET":
            return web.Response(body=PNG, content_type="image/png")
        return web.json_response({"data": [{"b64_json": base64.b64encode(PNG).decode()}]})

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {("*", "/{tail:.*}"): self.handle}


@contextlib.contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every record cometbatch and aiohttp log at DEBUG, formatted with its traceback."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("cometbatch", "aiohttp")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def cometbatch_parts(root: object, depth: int = 2) -> list[object]:
    """The cometbatch objects reachable from `root` through attributes, `depth` levels down."""
    found: list[object] = []
    seen = {id(root)}
    level = [root]
    for _ in range(depth):
        below = []
        for obj in level:
            for value in getattr(obj, "__dict__", {}).values():
                if id(value) not in seen and type(value).__module__.startswith("cometbatch."):
                    seen.add(id(value))
                    found.append(value)
                    below.append(value)
        level = below
    return found


def error_texts(exc: BaseException) -> str:
    """Everything an exception and its causes show: str, repr, args and ledger record."""
    parts = []
    pending: list[BaseException | None] = [exc]
    visited: set[int] = set()
    while pending:
        seen = pending.pop()
        if seen is None or id(seen) in visited:
            continue
        visited.add(id(seen))
        parts += [str(seen), repr(seen), repr(seen.args)]
        if isinstance(seen, APIError):
            parts.append(json.dumps(seen.to_record()))
        pending += [seen.__cause__, seen.__context__]
    return "\n".join(parts)


# --- 1. the key never leaks ----------------------------------------------------------------


def test_the_leak_detector_finds_every_form_of_the_key() -> None:
    """The detector itself works: plain, split, upper-cased and encoded keys are all found."""
    key = canary_key()
    forms = leak_forms(key)
    secret = key.rsplit("-", 1)[1]
    written = [
        f"Authorization: Bearer {key}",
        f"Bearer {key[:20]}\n{key[20:]}",
        f"...{secret[:7]}' + '{secret[7:]}...",
        key.upper(),
        quote_plus(f"headers=Authorization: Bearer {key}"),
        "".join(f"%{b:02x}" for b in key.encode()),
        key.encode().hex(),
        *(base64.b64encode(b"x" * i + f"Bearer {key}".encode()).decode() for i in range(3)),
        base64.urlsafe_b64encode(f"::{key}".encode()).decode(),
    ]
    for text in written:
        assert leaks(text, forms), text
    assert leaks(canary_key(), forms) == []
    assert leaks(PNG, forms) == []


# A manifest that exercises every path a key could travel: url downloads, inline base64,
# fan-out, a content-policy failure (marker below), retried faults.
LEAK_JOBS: list[dict[str, Any]] = [
    *(
        {"id": f"url2-{i}", "prompt": f"url pic {i}", "model": "dall-e-2", "n": 2,
         "size": "256x256", "response_format": "url"}
        for i in range(8)
    ),
    *({"id": f"url3-{i}", "prompt": f"dall-e-3 pic {i}", "model": "dall-e-3"} for i in range(6)),
    *({"id": f"b64-{i}", "prompt": f"inline pic {i}", "model": "gpt-image-1"} for i in range(8)),
    *(
        {"id": f"b64d2-{i}", "prompt": f"b64 pic {i}", "model": "dall-e-2",
         "size": "256x256", "response_format": "b64_json"}
        for i in range(4)
    ),
    {"id": "refused", "prompt": "a FORBIDDEN picture", "model": "dall-e-3"},
]  # fmt: skip


def test_the_key_never_leaks_from_a_faulty_verbose_cli_run(tmp_path: Path) -> None:
    """A -vv --json run against a faulty simulator that demands the key, then `status`, write
    no form of the key anywhere: output folder, stdout, stderr, cwd, HOME, TMPDIR."""
    key = canary_key()
    forms = leak_forms(key)
    cwd, home, temp = (tmp_path / name for name in ("cwd", "home", "tmp"))
    for folder in (cwd, home, temp):
        folder.mkdir()
    # The user's shell has the key exported for every command, the simulator included.
    env = clean_env(HOME=str(home), TMPDIR=str(temp), COMETAPI_KEY=key)
    manifest = write_manifest(tmp_path / "jobs.jsonl", LEAK_JOBS)
    out = tmp_path / "out"
    faults = (
        "--seed", "11", "--rate-429", "0.1", "--rate-429-bare", "0.05", "--rate-5xx", "0.1",
        "--rate-drop", "0.05", "--rate-malformed", "0.03", "--retry-after", "0",
        "--content-policy-marker", "FORBIDDEN",
    )  # fmt: skip
    sim_log = tmp_path / "simulator.log"
    with simulator_process(
        *faults, "--api-key-env", "COMETAPI_KEY", env=env, cwd=cwd, log=sim_log
    ) as sim:
        run = cometbatch(
            "run", str(manifest), "--base-url", sim.base_url, "--out", str(out),
            "--concurrency", "8", "-vv", "--json",
            env=env, cwd=cwd,
        )  # fmt: skip
    status_json = cometbatch("status", str(out), "--json", env=env, cwd=cwd)

    # The run really went through the key check, the faults, both image modes and a failure.
    assert run.returncode == 1, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["ok_requests"], summary["failed_requests"]) == (len(LEAK_JOBS) - 1, 1)
    assert summary["failures"] == {"content_policy": 1}
    assert summary["retries"] > 0 and summary["simulated"] is False
    assert re.search(r"retry \d+ of job \S+ \(key \S+\): ", run.stderr)
    events = ledger_events(out)
    (started,) = [e for e in events if e["event"] == "run"]
    assert "api_key" not in started["settings"]
    assert started["settings"]["base_url"] == sim.base_url
    formats = {i["format"] for e in events if e["event"] == "result" for i in e["images"]}
    assert {"png", "webp"} <= formats
    assert status_json.returncode == 0, status_json.stderr
    assert json.loads(status_json.stdout)["failed_requests"] == 1

    written = files_under(out, cwd, home, temp)
    assert out / "ledger.jsonl" in written and out / LOCK_NAME in written
    assert len([p for p in written if p.parent.parent == out / "images"]) == 34
    assert_no_leak(
        forms,
        run_stdout=run.stdout,
        run_stderr=run.stderr,
        status_json=status_json.stdout + status_json.stderr,
        simulator_log=sim.log.read_bytes(),
        **{str(path): path.read_bytes() for path in written},
    )


async def test_no_object_repr_record_or_log_shows_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """repr and str of Settings, Client, Engine, Limiter, Simulator, Ledger, Sink, results and
    summaries, Settings.public() and the ledger's run event never show the key."""
    key = canary_key()
    forms = leak_forms(key)
    monkeypatch.setenv("COMETAPI_KEY", key)
    config = SimConfig(api_key=key, seed=4, rate_429=0.2, rate_5xx=0.2, rate_drop=0.1)
    jobs = [
        Job(id="u", prompt="url", model="dall-e-2", n=3, response_format="url"),
        Job(id="b", prompt="b64", model="gpt-image-1", n=2),
        Job(id="d", prompt="d3", model="dall-e-3"),
    ]
    shown: dict[str, str] = {}

    def show(name: str, obj: object) -> None:
        shown[f"repr {name}"] = repr(obj)
        shown[f"str {name}"] = str(obj)

    with captured_logs() as logs:
        async with Simulator(config) as sim:
            variants = {
                "plain": Settings(base_url=sim.base_url, api_key=key),
                "secret": Settings(base_url=sim.base_url, api_key=SecretStr(key)),
                # No api_key: it comes from COMETAPI_KEY.
                "env": Settings(base_url=sim.base_url),
            }
            for name, settings in variants.items():
                assert settings.resolved_key() == key
                show(f"settings {name}", settings)
                shown[f"public {name}"] = json.dumps(settings.public())
                shown[f"dump {name}"] = repr(settings.model_dump())
                shown[f"json {name}"] = settings.model_dump_json()
                assert "api_key" not in settings.public()
            engine = Engine(variants["plain"], out_dir=tmp_path, sleep=no_sleep)
            show("engine new", engine)
            async with engine:
                # Whatever the engine's parts are called, every one of them is shown.
                parts = cometbatch_parts(engine)
                assert {Client, Limiter, Ledger, Sink} <= {type(part) for part in parts}
                for number, part in enumerate(parts):
                    show(f"open {number} {type(part).__name__}", part)
                results = [result async for result in engine.run(jobs)]
                for number, part in enumerate(parts):
                    show(f"used {number} {type(part).__name__}", part)
                show("engine open", engine)
                show("simulator open", sim)
                show("simulator config", sim.config)
            for number, part in enumerate(parts):
                show(f"closed {number} {type(part).__name__}", part)
            show("engine closed", engine)
            show("summary", engine.summary)
            shown["summary dict"] = json.dumps(engine.summary.to_dict())
            show("results", results)
        show("simulator closed", sim)

    assert all(result.ok for result in results)
    assert sim.stats.faults.total() > 0
    run_event = ledger_events(tmp_path)[0]
    assert run_event["event"] == "run" and "api_key" not in run_event["settings"]
    assert_no_leak(
        forms,
        logs="\n".join(logs),
        ledger=(tmp_path / "ledger.jsonl").read_bytes(),
        **shown,
    )


def echoing_api(kinds: dict[str, str]) -> Handler:
    """An API that echoes the key it received inside its answer, in the way the prompt asks."""

    def error(message: str, code: str = "") -> dict[str, Any]:
        return {"error": {"message": f"{message} (request id: r-1)", "type": "x", "code": code}}

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        kind = kinds[body["prompt"]]
        if kind == "ok":
            return web.json_response({"data": [{"b64_json": base64.b64encode(PNG).decode()}]})
        if kind == "401":
            return web.json_response(error(f"Incorrect API key provided: {key}"), status=401)
        if kind == "policy":
            text = f"Your request was rejected by the safety system, key {key}"
            return web.json_response(error(text, "content_policy_violation"), status=400)
        if kind == "500":
            return web.json_response(error(f"upstream failed for {key}"), status=500)
        if kind == "plain-503":
            return web.Response(status=503, text=f"overloaded; Authorization: Bearer {key}")
        if kind == "html-502":
            page = f"<!DOCTYPE html><html><body>proxy error for Bearer {key}</body></html>"
            return web.Response(status=502, text=page, content_type="text/html")
        assert kind == "error-in-200"
        return web.json_response(error(f"bad request from {key}", "invalid_request"))

    return handler


async def test_keys_echoed_by_the_api_are_blanked_in_results_ledger_logs_and_errors(
    tmp_path: Path,
) -> None:
    """An API that echoes the key in error bodies (JSON, plain text, HTML, an error inside a
    200) leaves no key in results, the ledger, logs, or the AuthenticationError it raises."""
    key = canary_key()
    forms = leak_forms(key)
    kinds = {
        "fine": "ok",
        "policy": "policy",
        "server": "500",
        "plain": "plain-503",
        "html": "html-502",
        "inok": "error-in-200",
    }
    jobs = [Job(id=prompt, prompt=prompt, model="dall-e-3") for prompt in kinds]
    with captured_logs() as logs:
        async with serve({("POST", ROUTE): echoing_api({**kinds, "stop": "401"})}) as api:
            settings = Settings(base_url=f"{api}/v1", api_key=key, max_attempts=2)
            async with Engine(settings, out_dir=tmp_path / "a", sleep=no_sleep) as engine:
                results = {r.job.id: r for r in [r async for r in engine.run(jobs)]}
            async with Engine(settings, out_dir=tmp_path / "b", sleep=no_sleep) as engine:
                with pytest.raises(AuthenticationError) as stopped:
                    _ = [r async for r in engine.run([Job(id="stop", prompt="stop")])]

    assert results["fine"].ok
    messages = {job: (r.error or {}).get("message", "") for job, r in results.items()}
    for job in ("policy", "server", "plain", "inok"):
        assert not results[job].ok and "***" in messages[job], messages
    assert results["html"].error is not None and results["html"].error["kind"] == "server"
    assert "***" in str(stopped.value)
    assert_no_leak(
        forms,
        logs="\n".join(logs),
        results=repr(results),
        error=error_texts(stopped.value),
        **{str(p): p.read_bytes() for p in files_under(tmp_path)},
    )


def _escaped(text: str) -> str:
    """Every character of `text` as a JSON \\u escape (valid JSON, same string when parsed)."""
    return "".join(f"\\u{ord(ch):04x}" for ch in text)


@pytest.mark.parametrize(
    "echo",
    [
        "json-escaped-401",
        "json-escaped-error-in-200",
        "redirect-location",
        "request-id-header",
        "image-url",
    ],
)
async def test_the_key_in_any_server_supplied_text_is_blanked(echo: str) -> None:
    """Whatever server-supplied text carries the key back, the client's error does not."""
    key = canary_key()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        escaped = '{"error": {"message": "bad key ' + _escaped(key) + '", "code": ""}}'
        if echo == "json-escaped-401":
            return web.Response(status=401, text=escaped, content_type="application/json")
        if echo == "json-escaped-error-in-200":
            return web.Response(status=200, text=escaped, content_type="application/json")
        if echo == "redirect-location":
            return web.Response(status=302, headers={"Location": f"/login?token={key}"})
        assert echo == "request-id-header"
        body = {"error": {"message": "internal error", "code": ""}}
        return web.json_response(body, status=500, headers={"X-Request-Id": key})

    async with (
        serve({("POST", ROUTE): handler}) as api,
        Client(base_url=f"{api}/v1", api_key=key) as client,
    ):
        with pytest.raises(APIError) as info:
            if echo == "image-url":
                # An out-of-range port: refused by the URL parser, nothing is connected.
                await client.download(f"http://127.0.0.1:99999/{key}.png")
            else:
                await client.generate({"prompt": "p"})
    if echo == "image-url":
        assert isinstance(info.value, DownloadError)
    shown = [str(info.value), repr(info.value), json.dumps(info.value.to_record())]
    assert [text for text in shown if key in text] == []


async def cometbatch_async(
    *args: str, env: Mapping[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion without blocking the event loop a test server runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cometbatch",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())


# What an API that echoes the key in its successful answers is asked for, by prompt: "plain"
# echoes it in every string of the answer, "escaped" the same as JSON \u escapes, "link"
# answers an image URL carrying the key whose download then keeps failing.
ECHO_PROMPTS = ("plain", "escaped", "link")


def key_echoing_api() -> dict[tuple[str, str], Handler]:
    """An API whose answers carry the key: revised prompt, usage values and keys, an extra
    field of the image, and an image URL that cannot be downloaded."""

    async def generation(request: web.Request) -> web.StreamResponse:
        prompt = (await request.json())["prompt"]
        bearer = request.headers.get("Authorization", "")
        key = bearer.removeprefix("Bearer ")
        item: dict[str, Any] = {"revised_prompt": f"a cat, for {bearer}"}
        if prompt == "link":
            origin = request.url.origin()
            item["url"] = f"{origin}/img/{key}.png?auth={quote(bearer)}"
        else:
            item["b64_json"] = base64.b64encode(PNG).decode()
            item["echo"] = {"headers": [f"Authorization: {bearer}"]}
        usage = {"total_tokens": 3, "note": f"billed to {key}", key: {"by": [key]}}
        text = json.dumps({"created": 1, "data": [item], "usage": usage})
        if prompt == "escaped":
            text = text.replace(key, _escaped(key))
        return web.Response(text=text, content_type="application/json")

    async def image(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="image host down")

    return {("POST", ROUTE): generation, ("GET", "/img/{name}"): image}


def check_echoes_blanked(out: Path) -> None:
    """The echoed texts are kept in the ledger, with the key blanked where it stood."""
    results = {e["job_id"]: e for e in ledger_events(out) if e["event"] == "result"}
    assert {job: e["status"] for job, e in results.items()} == {
        "plain": "ok",
        "escaped": "ok",
        "link": "download_failed",
    }
    for job in ("plain", "escaped"):
        assert results[job]["images"][0]["revised_prompt"] == "a cat, for Bearer ***"
        assert results[job]["usage"] == {
            "total_tokens": 3,
            "note": "billed to ***",
            "***": {"by": ["***"]},
        }
    (pending,) = results["link"]["downloads"]
    assert pending["url"].endswith("/img/***.png?auth=Bearer%20***")


async def test_a_key_echoed_in_answers_reaches_no_ledger_result_or_log(tmp_path: Path) -> None:
    """An API that echoes the key in revised prompts, usage, extra image fields and an image
    URL whose download fails leaves no form of it in results, the output folder or logs."""
    key = canary_key()
    out = tmp_path / "out"
    jobs = [Job(id=prompt, prompt=prompt) for prompt in ECHO_PROMPTS]
    with captured_logs() as logs:
        async with serve(key_echoing_api()) as api:
            settings = Settings(base_url=f"{api}/v1", api_key=key, max_attempts=2)
            async with Engine(settings, out_dir=out, sleep=no_sleep) as engine:
                results = [r async for r in engine.run(jobs)]

    check_echoes_blanked(out)
    assert_no_leak(
        leak_forms(key),
        logs="\n".join(logs),
        results=repr(results),
        **{str(p): p.read_bytes() for p in files_under(tmp_path)},
    )


async def test_a_key_echoed_in_answers_is_in_no_cli_output_or_file(tmp_path: Path) -> None:
    """The same API through `run -v --json` with COMETAPI_KEY set, then `status`, `gallery`
    and every `export` format: no form of the key on the terminal or in any file."""
    key = canary_key()
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=str(home), COMETAPI_KEY=key)
    manifest = write_manifest(tmp_path / "m.jsonl", ({"id": p, "prompt": p} for p in ECHO_PROMPTS))
    out = tmp_path / "out"
    async with serve(key_echoing_api()) as api:
        run = await cometbatch_async(
            "run", str(manifest), "--base-url", f"{api}/v1", "--out", str(out),
            "--max-attempts", "2", "-v", "--json",
            env=env, cwd=tmp_path,
        )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert json.loads(run.stdout)["ok_requests"] == 2
    check_echoes_blanked(out)
    shown = {"run": run.stdout + run.stderr}
    commands = [
        ("status", str(out)),
        ("status", str(out), "--json"),
        ("gallery", str(out)),
        *(("export", str(out), "--format", f) for f in ("openai-batch", "csv", "jsonl")),
    ]
    for command in commands:
        done = await cometbatch_async(*command, env=env, cwd=tmp_path)
        assert done.returncode in (0, 1), done.stderr
        assert "Traceback" not in done.stderr
        shown[" ".join(command[::2])] = done.stdout + done.stderr
    assert (out / "index.html").is_file()
    assert_no_leak(
        leak_forms(key),
        **shown,
        **{str(p): p.read_bytes() for p in files_under(tmp_path)},
    )


# --- 2. credentials go only to the API's origin ---------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_generation_redirect_to_another_origin_is_not_followed(
    status: int, tmp_path: Path
) -> None:
    """An API answering a redirect to another origin stops the run; that origin gets nothing."""
    key = canary_key()
    recorder = Recorder(seen=[])
    api_auth: list[str | None] = []
    async with serve(recorder.routes()) as other:

        async def redirect(request: web.Request) -> web.StreamResponse:
            await request.read()
            api_auth.append(request.headers.get("Authorization"))
            return web.Response(status=status, headers={"Location": f"{other}{ROUTE}"})

        async with serve({("POST", ROUTE): redirect}) as api:
            settings = Settings(base_url=f"{api}/v1", api_key=key)
            async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
                with pytest.raises(IncompatibleAPIError, match=f"{status} redirect to {other}"):
                    _ = [r async for r in engine.run([Job(id="r", prompt="p")])]
    assert api_auth == [f"Bearer {key}"]
    assert recorder.seen == []


@pytest.mark.parametrize("caller_session", [False, True])
async def test_an_image_redirected_to_another_origin_is_fetched_without_credentials(
    caller_session: bool, tmp_path: Path
) -> None:
    """An image URL that redirects to another origin is downloaded there with no Authorization,
    also through a caller's session that sends an Authorization header by default."""
    key = canary_key()
    recorder = Recorder(seen=[])
    seen_by_api: list[tuple[str, str | None]] = []
    async with contextlib.AsyncExitStack() as stack:
        other = await stack.enter_async_context(serve(recorder.routes()))

        async def generation(request: web.Request) -> web.StreamResponse:
            await request.read()
            seen_by_api.append((request.path, request.headers.get("Authorization")))
            return web.json_response({"data": [{"url": str(request.url.with_path("/img.png"))}]})

        async def image(request: web.Request) -> web.StreamResponse:
            seen_by_api.append((request.path, request.headers.get("Authorization")))
            raise web.HTTPFound(location=f"{other}/cdn/img.png")

        api = await stack.enter_async_context(
            serve({("POST", ROUTE): generation, ("GET", "/img.png"): image})
        )
        session = None
        if caller_session:
            session = await stack.enter_async_context(
                aiohttp.ClientSession(headers={"Authorization": "Bearer caller-default"})
            )
        settings = Settings(base_url=f"{api}/v1", api_key=key)
        async with Engine(settings, out_dir=tmp_path, session=session, sleep=no_sleep) as engine:
            (result,) = [r async for r in engine.run([Job(id="img", prompt="p")])]
        if session is not None:
            assert not session.closed
    assert result.ok
    assert (tmp_path / result.images[0].path).read_bytes() == PNG
    assert seen_by_api == [(ROUTE, f"Bearer {key}"), ("/img.png", None)]
    assert recorder.seen == [("GET", "/cdn/img.png", None)]


# --- 3. job ids cannot escape the output folder ---------------------------------------------

ESCAPING_IDS = [
    "../../etc/x",
    "/abs/path",
    "..",
    ".",
    "a/../../b",
    "a\x00b",
    "a\nb",
    "..\\..\\x",
    "C:\\Windows\\x",
    "\\\\server\\share\\x",
    "%2e%2e%2fx",
    "CON",
    "nul.txt",
    "COM1",
    "LPT9",
    "aux",
    "PRN.tar.gz",
    "trailing.",
    "trailing ",
    "dots...",
    " lead",
    ".hidden",
    "~",
    "$HOME",
    "-rf",
    "x" * 256,
    "\u00e9" * 256,
    "\uff0e\uff0e\uff0fx",  # fullwidth "../x"
    "\u2024\u2024\u2215etc",  # one-dot leaders and a division slash: "../etc"
    "\u2025\u2044x",  # two-dot leader and a fraction slash: "../x"
    "\u0430ux",  # Cyrillic a: looks like "aux"
]


async def test_escaping_job_ids_land_strictly_inside_images_end_to_end(tmp_path: Path) -> None:
    """Every hostile id (and a Batch API custom_id) goes manifest -> engine -> simulator ->
    disk, and each image is a real file directly in its own folder under OUT/images/."""
    lines: list[dict[str, Any]] = [
        {"id": job_id, "prompt": f"picture {n}", "model": "qwen-image",
         "response_format": "url" if n % 2 else "b64_json"}
        for n, job_id in enumerate(ESCAPING_IDS)
    ]  # fmt: skip
    lines.append({"custom_id": "../../batch", "body": {"prompt": "batch", "model": "qwen-image"}})
    manifest = load_manifest(write_manifest(tmp_path / "jobs.jsonl", lines))
    # Deep enough that an escape by ".." would still land inside tmp_path, where it is seen.
    out = tmp_path / "a" / "b" / "out"
    async with Simulator(SimConfig(seed=2)) as sim:
        settings = Settings(base_url=sim.base_url, api_key="sk-test")
        async with Engine(settings, out_dir=out, sleep=no_sleep) as engine:
            results = [r async for r in engine.run(manifest)]

    assert sorted(r.job.id for r in results) == sorted([*ESCAPING_IDS, "../../batch"])
    assert all(r.ok and len(r.images) == 1 for r in results)
    images = (out / "images").resolve()
    written = set()
    for result in results:
        path = out / result.images[0].path
        assert not path.is_symlink() and not path.parent.is_symlink()
        real = path.resolve(strict=True)
        assert real.parent.parent == images and real.is_file(), (result.job.id, real)
        written.add(real)
    assert len({p.parent for p in written}) == len(results)
    assert {p.resolve() for p in files_under(tmp_path)} == {
        (tmp_path / "jobs.jsonl").resolve(),
        (out / "ledger.jsonl").resolve(),
        (out / LOCK_NAME).resolve(),
        (out / "metadata.jsonl").resolve(),
        *written,
    }
    # metadata.jsonl names exactly those files, each from inside the output.
    named = (out / "metadata.jsonl").read_text().splitlines()
    assert {(out / json.loads(line)["file_name"]).resolve() for line in named} == written
    recorded = {e["job_id"] for e in ledger_events(out) if e["event"] == "result"}
    assert recorded == {*ESCAPING_IDS, "../../batch"}


REFUSED_IDS: list[Any] = ["", "y" * 257, "\ud800", ["a"], {"p": 1}, True, 1.5]


def refused_manifest(path: Path) -> Path:
    """A good first line, then one line per id that cannot be used."""
    jobs = [{"id": "fine", "prompt": "p"}, *({"id": i, "prompt": "p"} for i in REFUSED_IDS)]
    return write_manifest(path, jobs)


def test_unusable_job_ids_are_refused_naming_line_and_field(tmp_path: Path) -> None:
    """Empty, too long, lone-surrogate and non-string ids are each a ManifestError on their
    line and field 'id', through the loader and the CLI (exit 2, nothing written)."""
    manifest = refused_manifest(tmp_path / "bad.jsonl")
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    problems = info.value.problems
    assert [(p.line, p.field) for p in problems] == [
        (line, "id") for line in range(2, len(REFUSED_IDS) + 2)
    ]
    assert all(p.message for p in problems)

    out = tmp_path / "out"
    result = cometbatch(
        "run", str(manifest), "--simulate", "--out", str(out), env=clean_env(), cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    for line in range(2, len(REFUSED_IDS) + 2):
        assert f"line {line}, field 'id'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


# --- 4. plain http to a remote host is refused before anything is sent ------------------------

# Runs the CLI with every way of opening a connection replaced by a tripwire.
NO_CONNECTIONS = """
import socket
import sys

import aiohttp


def tripwire(*args, **kwargs):
    sys.stderr.write("TRIPWIRE: cometbatch tried to open a connection\\n")
    raise OSError("no connections in this test")


socket.socket.connect = tripwire
socket.socket.connect_ex = tripwire
socket.create_connection = tripwire
aiohttp.ClientSession = tripwire
aiohttp.TCPConnector = tripwire

from cometbatch.cli.main import main

main()
"""


@pytest.mark.parametrize("source", ["--base-url", "COMETAPI_BASE_URL"])
def test_cli_refuses_plain_http_to_a_remote_host_before_any_connection(
    source: str, tmp_path: Path
) -> None:
    """http:// to a TEST-NET host, from the option or the environment: exit 2 at once with a
    clear message, no traceback, no connection attempted, no output folder."""
    key = canary_key()
    url = "http://192.0.2.1/v1"
    script = tmp_path / "guarded.py"
    script.write_text(NO_CONNECTIONS)
    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "prompt": "p"}])
    out = tmp_path / "out"
    args = ["run", str(manifest), "--out", str(out), "--json"]
    env = clean_env(COMETAPI_KEY=key)
    if source == "--base-url":
        args += ["--base-url", url]
    else:
        env["COMETAPI_BASE_URL"] = url
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert "refusing to send the API key in clear text to 192.0.2.1" in result.stderr
    assert "clear text" in json.loads(result.stdout)["error"]
    assert "TRIPWIRE" not in result.stderr and "Traceback" not in result.stderr
    assert key not in result.stdout + result.stderr
    assert not out.exists()
    assert elapsed < 30  # far below any connect timeout


@pytest.mark.parametrize(
    "base_url",
    [
        "http://127.0.0.1@192.0.2.1/v1",  # userinfo that looks like loopback
        "http://127.0.0.1.example/v1",
        "http://localhost.example/v1",
        "http://0.0.0.0:8000/v1",
        "http://[::]:8000/v1",
        "http://[::ffff:192.0.2.1]/v1",
        "HTTP://192.0.2.1:80/v1",
    ],
)
def test_hosts_that_only_look_local_are_refused_plain_http(base_url: str) -> None:
    """Hosts that merely resemble loopback are remote: plain http to them is refused."""
    key = canary_key()
    settings = Settings(base_url=base_url, api_key=key)
    with pytest.raises(ConfigError, match="clear text") as info:
        Client.from_settings(settings)
    assert key not in str(info.value)


@pytest.mark.parametrize(
    "base_url", ["http://LOCALHOST:9/v1", "http://127.8.9.10:9/v1", "http://[::1]:9/v1"]
)
def test_every_loopback_spelling_may_use_plain_http(base_url: str) -> None:
    """The whole loopback range, in any case, may use plain http (no connection is made)."""
    assert Client.from_settings(Settings(base_url=base_url, api_key="k")).base_url == base_url


def test_allow_insecure_http_lets_settings_and_client_accept_a_remote_host() -> None:
    """With allow_insecure_http the same URL is accepted (constructed only, never opened)."""
    url = "http://192.0.2.1/v1"
    settings = Settings(base_url=url, api_key="k", allow_insecure_http=True)
    client = Client.from_settings(settings)
    assert client.base_url == url and not client.closed
    assert "unopened" in repr(client)
    assert settings.public()["allow_insecure_http"] is True


# What plain web servers answer a POST to /images/generations: (status, content type, body).
WEB_SERVERS = {
    "html-404": (404, "text/html", "<!DOCTYPE html><html><body>Not Found</body></html>"),
    "405": (405, "text/plain", "405: Method Not Allowed"),
    "501": (501, "text/html", "<html><body>Unsupported method ('POST')</body></html>"),
    "html-200": (200, "text/html", "<!DOCTYPE html><html><body>Welcome!</body></html>"),
}


@pytest.mark.parametrize("server", list(WEB_SERVERS))
async def test_a_base_url_that_is_not_the_api_stops_the_cli_and_fails_no_job(
    server: str, tmp_path: Path
) -> None:
    """A plain web server as --base-url: exit 2 at once with one message naming --base-url,
    no traceback, no failed line; the same command with the right URL then sends every job."""
    status, content_type, text = WEB_SERVERS[server]

    async def page(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=status, content_type=content_type, text=text)

    env = clean_env(COMETAPI_KEY=canary_key())
    jobs = [{"id": f"j{i}", "prompt": f"picture {i}", "model": "qwen-image"} for i in range(6)]
    manifest = write_manifest(tmp_path / "m.jsonl", jobs)
    out = tmp_path / "out"
    args = ("run", str(manifest), "--out", str(out), "--max-attempts", "3", "--base-url")
    async with serve({("*", "/{tail:.*}"): page}) as web_server:
        wrong = await cometbatch_async(*args, f"{web_server}/v1", env=env, cwd=tmp_path)

    assert wrong.returncode == 2, wrong.stderr
    assert "Traceback" not in wrong.stderr
    named = [line for line in wrong.stderr.splitlines() if "--base-url" in line]
    assert len(named) == 1 and named[0].startswith("error: "), wrong.stderr
    assert f"{web_server}/v1" in named[0] and "<" not in named[0]
    assert [e for e in ledger_events(out) if e["event"] == "result"] == []

    async with Simulator(SimConfig(latency=0)) as sim:
        right = await cometbatch_async(*args, sim.base_url, "--json", env=env, cwd=tmp_path)
    assert right.returncode == 0, right.stderr
    assert json.loads(right.stdout)["ok_requests"] == len(jobs)


# --- 5. one run per output folder ------------------------------------------------------------


def test_a_second_cli_run_on_a_busy_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    """While a slow run holds OUT, a second run exits 2 naming the first's pid, host and start
    time, writes nothing; the first then stops cleanly on SIGINT."""
    env = clean_env()
    # The built-in simulated API answers in 0.2-0.8 s: one at a time, 200 jobs take minutes.
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        ({"id": f"s{i}", "prompt": f"slow {i}", "model": "qwen-image"} for i in range(200)),
    )
    out = tmp_path / "out"
    ledger = out / "ledger.jsonl"
    args = ["run", str(manifest), "--simulate", "--out", str(out)]
    first = subprocess.Popen(
        [sys.executable, "-m", "cometbatch", *args, "--concurrency", "1", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        # The run event is written after the lock is taken and Ctrl-C is handled.
        wait_for(lambda: ledger.exists() and '"event":"run"' in ledger.read_text())
        holder = json.loads((out / LOCK_NAME).read_text())
        second = cometbatch(*args, "--json", env=env, cwd=tmp_path)
        assert first.poll() is None, "the first run ended too early"
        first.send_signal(signal.SIGINT)
        _, first_stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()

    assert second.returncode == 2, second.stderr
    named = (
        f"is in use by another cometbatch run (pid {first.pid} on host "
        f"{socket.gethostname()}, started {holder['started_at']})"
    )
    assert named in second.stderr
    assert named in json.loads(second.stdout)["error"]
    assert holder["pid"] == first.pid
    started = datetime.fromisoformat(holder["started_at"])
    assert abs((datetime.now(UTC) - started).total_seconds()) < 300
    assert "Traceback" not in second.stderr

    assert first.returncode == 130, first_stderr
    events = ledger_events(out)
    assert [e["event"] for e in events].count("run") == 1
    assert {e["run_id"] for e in events} == {events[0]["run_id"]}
    assert events[-1]["event"] == "end" and events[-1]["summary"]["interrupted"] is True
