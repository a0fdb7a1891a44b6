"""Property-based tests: hostile manifests, API answers and headers fail only as project errors."""

from __future__ import annotations

import asyncio
import base64
import copy
import email.utils
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ledger_results, no_sleep, run_all

from cometbatch import (
    APIError,
    APIResponseError,
    APIStatusError,
    ContentPolicyError,
    Engine,
    ImageDataError,
    IncompatibleAPIError,
    Job,
    ManifestError,
    ModelRegistry,
    ServerError,
    Settings,
    load_manifest,
)
from cometbatch.manifest.job import MAX_N, folder_key
from cometbatch.manifest.lines import MAX_NESTING, parse_line
from cometbatch.manifest.lineshapes import SDK_FIELDS
from cometbatch.net.client import Client
from cometbatch.net.response import ImagesResponse
from cometbatch.net.retry import make_status_error, parse_error_body, parse_retry_after
from cometbatch.paths import image_relpath, safe_component
from cometbatch.plan import plan_job
from cometbatch.simulator.imagegen import make_png
from cometbatch.store.imagecheck import detect_format
from cometbatch.store.sink import decode_b64

REGISTRY = ModelRegistry()
KEY = "sk-hostile-SECRET-0123456789"
BOM = b"\xef\xbb\xbf"

# Enough examples to find the classic crashes, few enough that the file runs in seconds.
FEW = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SOME = settings(FEW, max_examples=75)
MANY = settings(FEW, max_examples=150)


# --- JSON with raw fragments that json.dumps cannot write -------------------------------------


@dataclass(frozen=True)
class Raw:
    """A literal JSON fragment spliced into the serialised text (huge numbers, deep nesting)."""

    text: str


RAW_FRAGMENTS = [
    Raw("9" * 5000),
    Raw("-" + "1" * 4400),
    Raw("1e400"),
    Raw("-1e-400"),
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("[" * 3000 + "]" * 3000),
    Raw('{"a":' * 2000 + "0" + "}" * 2000),
    Raw("[" * 200 + "]" * 200),
]
# Nesting right around the interpreter's recursion limit, where parsing succeeds but
# re-serialising the same data a few frames deeper does not.
EDGE_NESTING = st.integers(900, 1010).map(lambda depth: Raw("[" * depth + "]" * depth))


def dump(value: Any, *, ensure_ascii: bool = True) -> str:
    """JSON text for `value`, with each Raw spliced in verbatim."""
    raws: list[str] = []

    def swap(item: Any) -> Any:
        if isinstance(item, Raw):
            raws.append(item.text)
            return f"@raw{len(raws) - 1}@"
        if isinstance(item, dict):
            return {key: swap(child) for key, child in item.items()}
        if isinstance(item, list):
            return [swap(child) for child in item]
        return item

    text = json.dumps(swap(value), ensure_ascii=ensure_ascii)
    for number, raw in enumerate(raws):
        text = text.replace(f'"@raw{number}@"', raw, 1)
    return text


def encode(text: str) -> bytes:
    """UTF-8 bytes; a lone surrogate becomes the (invalid) bytes that encode it."""
    return text.encode("utf-8", "surrogatepass")


# NUL, lone surrogates, BOM, line and paragraph separators, NEL, zero width space, a cat.
ODD_CHARS = st.sampled_from(
    list('\x00\ud800\udc00\udfff\ufeff\u2028\u0085\u200b\t\r\n\U0001f431\u00e9/\\."{[# ')
)
HOSTILE_TEXT = st.text(st.one_of(st.characters(), ODD_CHARS), max_size=24)
# Text that is valid Unicode (a manifest can hold it as UTF-8).
CLEAN_CHARS = st.characters(exclude_categories=["Cs"])
CLEAN_TEXT = st.text(CLEAN_CHARS, max_size=24)

HOSTILE_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 10**30, -(10**30), 10**4000]),
    st.floats(),
    HOSTILE_TEXT,
    st.sampled_from(RAW_FRAGMENTS),
    EDGE_NESTING,
)
HOSTILE_VALUES = st.recursive(
    HOSTILE_SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(HOSTILE_TEXT, children, max_size=3)
    ),
    max_leaves=8,
)
FINITE_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | CLEAN_TEXT,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(CLEAN_TEXT, children, max_size=3)
    ),
    max_leaves=6,
)


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from json_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from json_paths(child, (*prefix, index))


@st.composite
def mutated_json(draw: st.DrawFn, value: Any) -> Any:
    """`value` with one nested value deleted, nulled or replaced by a hostile one."""
    value = copy.deepcopy(value)
    path = draw(st.sampled_from(list(json_paths(value))))
    replacement = draw(st.one_of(st.none(), HOSTILE_VALUES))
    if not path:
        return replacement
    parent = value
    for part in path[:-1]:
        parent = parent[part]
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return value


# --- manifests --------------------------------------------------------------------------------

FIELDS = list(Job.model_fields)
MODELS = ["dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "qwen-image", "flux-x"]
EVIL_IDS = [
    "../x",
    "../../etc/passwd",
    "/abs",
    "..",
    ".",
    "",
    "a/b",
    "a\\b",
    "C:\\x",
    "CON",
    "nul.txt",
    "x" * 257,
    "x" * 300,
    "a\x00b",
    "\ud800",
    ".hidden",
    "trailing.",
    "\U0001f431",
    " ",
]


@st.composite
def valid_jobs(draw: st.DrawFn, index: int) -> dict[str, Any]:
    """A job that every model rule accepts; its prompt is unique through `index`."""
    model = draw(st.sampled_from(MODELS))
    job: dict[str, Any] = {"prompt": f"{draw(CLEAN_TEXT)} #{index}"}
    if model != "dall-e-3" or draw(st.booleans()):
        job["model"] = model
    if draw(st.booleans()):
        job["id"] = f"job-{index}"
    if draw(st.booleans()):
        job["n"] = draw(st.integers(1, 25))
    spec = REGISTRY.get(model)
    if spec.sizes and draw(st.booleans()):
        job["size"] = draw(st.sampled_from(spec.sizes))
    options: dict[str, list[Any]] = {}
    if model == "dall-e-2":
        options = {"quality": ["standard"], "response_format": ["url", "b64_json"]}
    elif model == "dall-e-3":
        options = {
            "quality": ["standard", "hd"],
            "style": ["vivid", "natural"],
            "response_format": ["url", "b64_json"],
        }
    elif model.startswith("gpt-image"):
        fmt = draw(st.sampled_from([None, "png", "jpeg", "webp"]))
        if fmt is not None:
            job["output_format"] = fmt
        options = {
            "quality": ["low", "medium", "high", "auto"],
            "background": ["opaque", "auto"] + ([] if fmt == "jpeg" else ["transparent"]),
            "moderation": ["low", "auto"],
        }
        if fmt in ("jpeg", "webp"):
            options["output_compression"] = list(range(0, 101, 25))
    elif model == "flux-x":
        options = {"size": ["640x480"], "quality": ["whatever"]}
    for name, values in options.items():
        if draw(st.booleans()):
            job[name] = draw(st.sampled_from(values))
    if model != "qwen-image" and draw(st.booleans()):
        job["user"] = draw(CLEAN_TEXT)
    if draw(st.booleans()):
        job["extra"] = {"seed": draw(st.integers(0, 2**32)), "negative_prompt": draw(CLEAN_TEXT)}
    if draw(st.booleans()):
        job["metadata"] = draw(st.dictionaries(CLEAN_TEXT, FINITE_JSON, max_size=3))
    return job


def as_batch_line(job: dict[str, Any]) -> dict[str, Any]:
    """The same job in OpenAI Batch API shape."""
    body = {key: value for key, value in job.items() if key not in ("id", "metadata")}
    line: dict[str, Any] = {"method": "POST", "url": "/v1/images/generations", "body": body}
    if "id" in job:
        line["custom_id"] = job["id"]
    if "metadata" in job:
        line["metadata"] = job["metadata"]
    return line


# Values of the wrong JSON type for a field: a line carrying one must name that field.
CONTAINERS = st.one_of(st.lists(FINITE_JSON, max_size=2), st.dictionaries(CLEAN_TEXT, FINITE_JSON))
NOT_OBJECTS = st.one_of(st.lists(FINITE_JSON, max_size=2), CLEAN_TEXT, st.integers(), st.booleans())
WRONG_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "id": st.one_of(CONTAINERS, st.booleans(), st.sampled_from([1.5, -0.25, 1e-9])),
    "prompt": st.one_of(CONTAINERS, st.integers(), st.booleans()),
    "model": CONTAINERS,
    "n": st.one_of(CONTAINERS, st.sampled_from(["many", "", "1.5", "-"])),
    "size": st.one_of(CONTAINERS, st.integers()),
    "user": CONTAINERS,
    "extra": NOT_OBJECTS,
    "metadata": NOT_OBJECTS,
}


# Job fields a Batch API line holds outside its body, by their names there.
BATCH_NAMES = {"id": "custom_id", "metadata": "metadata"}


def is_unknown_field(name: str) -> bool:
    """Whether a top-level key is neither a job field, nor a Batch API key, nor one of
    openai-python's images.generate keywords."""
    return name not in (*FIELDS, *SDK_FIELDS, "custom_id", "method", "url", "body")


@dataclass
class Mutation:
    """A mutated manifest line and, when the mutation guarantees it, the field at fault."""

    line: bytes
    field: str | None = None


@st.composite
def mutated_lines(draw: st.DrawFn, job: dict[str, Any]) -> Mutation:
    """One hostile variant of a valid job line, without line breaks inside it."""
    job = copy.deepcopy(job)
    op = draw(
        st.sampled_from(
            ["delete", "set", "retype", "unknown", "id", "long", "raw", "deep", "batch", "any"]
        )
    )
    expected: str | None = None
    batch = draw(st.booleans())
    if op == "delete":
        del job[draw(st.sampled_from(sorted(job)))]
    elif op == "set":
        job[draw(st.sampled_from(FIELDS))] = draw(HOSTILE_VALUES)
    elif op == "retype":
        name = draw(st.sampled_from(sorted(WRONG_TYPES)))
        job[name] = draw(WRONG_TYPES[name])
        expected = name
    elif op == "unknown":
        name = draw(st.text(CLEAN_CHARS, min_size=1, max_size=12).filter(is_unknown_field))
        job[name] = draw(FINITE_JSON)
        expected = name
    elif op == "id":
        job["id"] = draw(st.one_of(st.sampled_from(EVIL_IDS), HOSTILE_TEXT, st.integers()))
    elif op == "long":
        job["prompt"] = "x" * draw(st.integers(900, 40_000))
        expected = "prompt"
    elif op == "raw":
        job[draw(st.sampled_from(FIELDS))] = draw(st.sampled_from(RAW_FRAGMENTS))
    elif op == "deep":
        target = draw(st.sampled_from(["extra", "metadata"]))
        job[target] = {"k": draw(st.one_of(EDGE_NESTING, st.sampled_from(RAW_FRAGMENTS)))}
    elif op == "any":
        job = draw(mutated_json(job))
    value: Any = job
    if batch and isinstance(job, dict):
        value = as_batch_line(job)
        # A Batch API line names its fields as it holds them.
        expected = BATCH_NAMES.get(expected, f"body.{expected}") if expected else None
        if op == "batch":
            value = draw(mutated_json(value))
    text = dump(value, ensure_ascii=draw(st.booleans()))
    # Text-level damage: a torn line, a stray character, a BOM or comment marker up front.
    damage = draw(st.sampled_from(["none"] * 6 + ["torn", "insert", "prefix"]))
    if damage == "torn":
        text = text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    elif damage == "insert":
        at = draw(st.integers(0, len(text)))
        char = draw(st.one_of(st.characters(), ODD_CHARS).filter(lambda c: c not in "\r\n"))
        text = text[:at] + char + text[at:]
    elif damage == "prefix":
        text = draw(st.sampled_from(["\ufeff", " ", "\t", "\x00", "\u00a0"])) + text
    if damage != "none":
        expected = None
    return Mutation(encode(text), expected)


def count_lines(data: bytes) -> int:
    """How many lines a reader that splits on \\r\\n, \\r and \\n sees."""
    parts = re.split(rb"\r\n|\r|\n", data)
    return len(parts) - (parts[-1] == b"")


@st.composite
def hostile_manifests(draw: st.DrawFn) -> bytes:
    """A file mixing valid, mutated, duplicated, random-text and random-byte lines."""
    lines: list[bytes] = []
    valid: list[bytes] = []
    for index in range(draw(st.integers(0, 8))):
        kind = draw(
            st.sampled_from(
                ["valid", "valid", "mutated", "mutated", "dup", "text", "bytes", "json", "blank"]
            )
        )
        if kind in ("valid", "mutated"):
            job = draw(valid_jobs(index))
            if kind == "mutated":
                lines.append(draw(mutated_lines(job)).line)
            else:
                line = encode(dump(as_batch_line(job) if draw(st.booleans()) else job))
                valid.append(line)
                lines.append(line)
        elif kind == "dup" and valid:
            lines.append(draw(st.sampled_from(valid)))
        elif kind == "text":
            lines.append(encode(draw(HOSTILE_TEXT)))
        elif kind == "bytes":
            lines.append(draw(st.binary(max_size=40)))
        elif kind == "json":
            lines.append(encode(dump(draw(HOSTILE_VALUES))))
        else:
            lines.append(draw(st.sampled_from([b"", b"   ", b"# comment", b"\t#x"])))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = newline.join(lines)
    torn = draw(st.booleans())  # the last line has no newline at the end
    if lines and not torn:
        data += newline
    if draw(st.booleans()):
        data = BOM + data
    return data


def check_problems(exc: ManifestError, total_lines: int) -> None:
    """Every problem is on a line of the file, says what is wrong, and names a field or none."""
    assert exc.problems
    for problem in exc.problems:
        assert isinstance(problem.line, int)
        assert 1 <= problem.line <= total_lines, (problem, total_lines)
        assert isinstance(problem.message, str) and problem.message.strip()
        assert problem.field is None or (isinstance(problem.field, str) and problem.field)
    assert str(exc)


def check_loaded(path: Path, out: Path) -> list[Job]:
    """A manifest that loads yields valid jobs with unique ids, safe folders and plans."""
    manifest = load_manifest(path)
    jobs = list(manifest)
    assert len(jobs) == manifest.stats.jobs
    assert len({job.id for job in jobs}) == len(jobs)
    assert len({folder_key(job.id) for job in jobs}) == len(jobs)
    images = (out / "images").resolve()
    for job in jobs:
        assert isinstance(job, Job)
        assert job.prompt.strip()
        assert 1 <= job.n <= MAX_N
        relpath = image_relpath(job.id, job.n - 1, "png")
        parts = PurePosixPath(relpath).parts
        assert parts == ("images", safe_component(job.id), f"{job.n - 1}.png")
        assert PureWindowsPath(relpath).parts == parts
        assert not PureWindowsPath(relpath).drive
        assert parts[1] not in (".", "..")
        resolved = Path(os.path.normpath(out / relpath)).resolve()
        assert resolved.parent.parent == images
        # Whatever loads can be sent as standard JSON and recorded in the ledger.
        json.dumps(job.metadata, allow_nan=False)
        for request in plan_job(job, manifest.registry.get(job.model)):
            encode(json.dumps(request.payload, allow_nan=False)).decode("utf-8")
            assert re.fullmatch(r"[0-9a-f]{16}", request.fingerprint)
    return jobs


def test_hostile_manifests_load_or_name_their_lines(tmp_path: Path) -> None:
    """Any file either loads as valid jobs or fails as a ManifestError naming real lines."""
    path = tmp_path / "m.jsonl"

    @SOME
    @given(data=hostile_manifests())
    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            check_loaded(path, tmp_path / "out")
        except ManifestError as exc:
            check_problems(exc, count_lines(data.removeprefix(BOM)))

    check()


def test_one_mutated_line_is_the_one_named(tmp_path: Path) -> None:
    """Among valid lines, a mutated line is the one named, with the field when it is clear."""
    path = tmp_path / "m.jsonl"

    @SOME
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        count = data.draw(st.integers(1, 5))
        jobs = [data.draw(valid_jobs(index)) for index in range(count)]
        target = data.draw(st.integers(0, count - 1))
        mutation = data.draw(mutated_lines(jobs[target]))
        lines = [encode(dump(job)) for job in jobs]
        lines[target] = mutation.line
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            check_loaded(path, tmp_path / "out")
        except ManifestError as exc:
            check_problems(exc, count)
            line = target + 1
            for problem in exc.problems:
                # A mutated id may clash with another line's id; the later line is named.
                assert problem.line == line or problem.field == "id", problem
            if mutation.field is not None:
                named = [p.field for p in exc.problems if p.field and p.line == line]
                assert any(
                    name == mutation.field or name.startswith(f"{mutation.field}.")
                    for name in named
                ), (mutation, exc.problems)
        else:
            # Only a long prompt may still be valid (a model without a prompt limit).
            assert mutation.field in (None, "prompt", "body.prompt"), mutation

    check()


def test_valid_manifests_with_hostile_ids_load_into_safe_folders(tmp_path: Path) -> None:
    """Valid lines whose ids are hostile strings load, one job each, each in its own folder."""
    path = tmp_path / "m.jsonl"
    ids = st.one_of(st.sampled_from(EVIL_IDS), st.text(CLEAN_CHARS, max_size=40)).filter(
        lambda job_id: 1 <= len(job_id) <= 256 and "\ud800" not in job_id
    )

    @FEW
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        chosen = data.draw(st.lists(ids, max_size=6, unique_by=folder_key))
        jobs = [data.draw(valid_jobs(index)) for index in range(len(chosen))]
        lines = []
        for job, job_id in zip(jobs, chosen, strict=True):
            job["id"] = job_id
            lines.append(dump(as_batch_line(job) if data.draw(st.booleans()) else job))
        newline = data.draw(st.sampled_from(["\n", "\r\n"]))
        path.write_bytes(BOM + encode(newline.join(lines)))
        loaded = check_loaded(path, tmp_path / "out")
        assert [job.id for job in loaded] == chosen

    check()


@MANY
@given(text=st.one_of(HOSTILE_TEXT, HOSTILE_VALUES.map(dump)), number=st.integers(1, 10**9))
def test_parse_line_fails_only_as_manifest_error(text: str, number: int) -> None:
    """Any single line is a Job, nothing, or a ManifestError naming that line."""
    try:
        job = parse_line(text, number, registry=REGISTRY)
    except ManifestError as exc:
        assert exc.problems
        assert all(problem.line == number for problem in exc.problems)
    else:
        assert job is None or isinstance(job, Job)


# --- API answers ------------------------------------------------------------------------------


@dataclass
class Answer:
    """What the scripted server says next."""

    status: int
    body: bytes
    headers: dict[str, str]


class ScriptedServer:
    """A loopback server whose one route answers whatever `answer` holds."""

    def __init__(self) -> None:
        self.answer = Answer(200, b"", {})
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        answer = self.answer
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@st.composite
def image_items(draw: st.DrawFn) -> dict[str, Any]:
    """One image of a successful answer: base64, a URL, or both."""
    item: dict[str, Any] = {}
    kind = draw(st.sampled_from(["b64", "url", "both"]))
    if kind in ("b64", "both"):
        item["b64_json"] = base64.b64encode(draw(st.binary(min_size=1, max_size=16))).decode()
    if kind in ("url", "both"):
        item["url"] = "http://127.0.0.1:9/x.png"
    if draw(st.booleans()):
        item["revised_prompt"] = draw(CLEAN_TEXT)
    return item


OK_ANSWERS = st.fixed_dictionaries(
    {"created": st.integers(0, 2**40), "data": st.lists(image_items(), min_size=1, max_size=3)},
    optional={"usage": st.fixed_dictionaries({"total_tokens": st.integers(0, 10**6)})},
)
ERROR_MESSAGES = st.one_of(
    HOSTILE_TEXT,
    st.sampled_from(
        [
            "Rejected by the safety system",
            "violates our content policy (request id: abc)",
            f"Incorrect API key provided: {KEY}",
            "(request id: only)",
            "   ",
            "",
        ]
    ),
    HOSTILE_TEXT.map(lambda text: f"{text} (request id: {text})"),
)
ERROR_CODES = st.sampled_from(
    ["", "invalid_request", "content_policy_violation", "moderation_blocked", "rate_limit"]
)
ERROR_BODIES = st.one_of(
    HOSTILE_VALUES.map(lambda error: {"error": error}),
    st.fixed_dictionaries(
        {},
        optional={
            "message": st.one_of(ERROR_MESSAGES, HOSTILE_VALUES),
            "type": HOSTILE_VALUES,
            "param": HOSTILE_VALUES,
            "code": st.one_of(ERROR_CODES, HOSTILE_VALUES),
            "detail": HOSTILE_VALUES,
        },
    ).map(lambda error: {"error": error}),
    ERROR_MESSAGES.map(lambda message: {"error": message}),
    ERROR_MESSAGES.map(lambda message: {"detail": message}),
)
HTML = st.sampled_from(
    [
        b"<!DOCTYPE html><html><body>Welcome</body></html>",
        b"  <HTML><head></head></html>",
        b"<?xml version='1.0'?><error/>",
        b"<!-- proxy --><html>",
    ]
)


@st.composite
def answer_bodies(draw: st.DrawFn) -> bytes:
    """A body: a real answer, a mutated one, an error object, random JSON, bytes or HTML."""
    kind = draw(st.sampled_from(["ok", "mutated", "error", "json", "bytes", "html", "text"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "html":
        return draw(HTML)
    if kind == "text":
        return encode(draw(HOSTILE_TEXT))
    if kind == "ok":
        value: Any = draw(OK_ANSWERS)
    elif kind == "mutated":
        value = draw(mutated_json(draw(OK_ANSWERS)))
    elif kind == "error":
        value = draw(ERROR_BODIES)
    else:
        value = draw(HOSTILE_VALUES)
    text = dump(value, ensure_ascii=draw(st.booleans()))
    codec = draw(st.sampled_from(["utf-8"] * 5 + ["utf-8-sig", "utf-16", "latin-1"]))
    data = encode(text) if codec == "utf-8" else text.encode(codec, "replace")
    if draw(st.integers(0, 5)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


STATUSES = st.one_of(
    st.sampled_from(
        [
            *(200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308),
            *(400, 401, 403, 404, 408, 409, 410, 413, 422, 429, 451),
            *(500, 501, 502, 503, 504, 505, 520, 521, 522, 523, 524, 599),
        ]
    ),
    st.integers(200, 599),
)
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/problem+json",
            "text/html; charset=utf-8",
            "TEXT/HTML",
            "text/plain",
            "application/octet-stream",
            "image/png",
            "",
            ";;;",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
)
HTTP_DATES = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(
        lambda when: email.utils.format_datetime(when, usegmt=True)
    ),
    st.sampled_from(
        [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Mon, 31 Feb 2020 00:00:00 GMT",
            "Sun, 06 Nov 1994 08:49:37 +9999",
            "Thu, 01 Jan 1970 00:00:00 -0000",
            "Fri, 31 Dec 9999 23:59:59 -2359",
            "Mon, 01 Jan 0001 00:00:00 +2359",
            "01 Jan 99999999999999999999 00:00:00 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ]
    ),
)
NUMBERS = st.one_of(
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(
        ["nan", "inf", "-inf", "1e400", "-5", "0", "1_0", " 3 ", "0x10", "٣", "1e-400"]
    ),
)
HEADER_TEXT = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=20),
)
HEADER_VALUES: dict[str, st.SearchStrategy[str]] = {
    "Retry-After": st.one_of(NUMBERS, HTTP_DATES, HEADER_TEXT),
    "retry-after-ms": st.one_of(NUMBERS, HEADER_TEXT),
    "X-Request-Id": HEADER_TEXT,
    "X-Oneapi-Request-Id": HEADER_TEXT,
    "Location": HEADER_TEXT,
    "Content-Type": CONTENT_TYPES,
    "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "identity", "zstd", "x-what"]),
    "Connection": st.sampled_from(["close", "keep-alive"]),
    "X-Other": HEADER_TEXT,
}


@st.composite
def header_sets(draw: st.DrawFn) -> dict[str, str]:
    """A few response headers with hostile values."""
    names = draw(st.lists(st.sampled_from(sorted(HEADER_VALUES)), unique=True, max_size=4))
    return {name: draw(HEADER_VALUES[name]) for name in names}


ANSWERS = st.builds(Answer, status=STATUSES, body=answer_bodies(), headers=header_sets())
NEVER_RETRIED = frozenset({400, 401, 403, 404, 413, 422})


def check_api_error(exc: APIError, *, redacted: bool = True) -> None:
    """A project error with a message, a kind and a ledger record that is plain JSON."""
    assert isinstance(exc.message, str) and exc.message.strip()
    assert str(exc)
    assert isinstance(exc.kind, str) and exc.kind
    assert isinstance(exc.retryable, bool)
    assert exc.retry_after is None or (math.isfinite(exc.retry_after) and exc.retry_after >= 0)
    record = exc.to_record()
    text = json.dumps(record, allow_nan=False)
    assert json.loads(text)["kind"] == exc.kind
    if redacted:
        assert KEY not in text
        assert KEY not in repr(exc)


def test_client_answers_only_images_or_api_errors() -> None:
    """Whatever the server answers, generate returns images or raises a well-formed APIError."""
    loop = asyncio.new_event_loop()
    server = ScriptedServer()
    try:
        base = loop.run_until_complete(server.start())
        client = Client(base_url=base, api_key=KEY, timeout=10, connect_timeout=5)
        loop.run_until_complete(client.__aenter__())
        try:

            @MANY
            @given(answer=ANSWERS)
            def check(answer: Answer) -> None:
                server.answer = answer
                try:
                    result = loop.run_until_complete(client.generate({"prompt": "p"}))
                except APIError as exc:
                    check_api_error(exc)
                    if answer.headers.get("Content-Encoding", "identity") != "identity":
                        # A body that fails to decompress is a cut-off answer, whatever the status.
                        return
                    if 300 <= answer.status < 400:
                        assert isinstance(exc, IncompatibleAPIError)
                    if answer.status >= 400:
                        # Classified by status, or (a plain web server's page) not the API.
                        assert isinstance(exc, APIStatusError | IncompatibleAPIError)
                        assert exc.status == answer.status
                    if answer.status in NEVER_RETRIED:
                        assert not exc.retryable
                else:
                    assert 200 <= answer.status < 300
                    assert isinstance(result, ImagesResponse)
                    assert result.data
                    assert all(item.b64_json or item.url for item in result.data)

            check()
        finally:
            loop.run_until_complete(client.aclose())
    finally:
        loop.run_until_complete(server.stop())
        loop.close()


@pytest.mark.parametrize("body", [b"{}", b'{"created": 1, "data": []}'], ids=["empty", "no-images"])
async def test_answers_without_images_are_retried_but_not_counted_as_billed_twice(
    body: bytes, tmp_path: Path
) -> None:
    """7 jobs answered `{}` (or no images) 3 times each: retried, failed as malformed, and
    none of the retries counted as "possibly billed twice" (no image could have been paid)."""
    server = ScriptedServer()
    server.answer = Answer(200, body, {"Content-Type": "application/json"})
    base = await server.start()
    try:
        settings = Settings(base_url=base, api_key=KEY, max_attempts=3)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            results = await run_all(engine, [Job(id=f"e{i}", prompt="p") for i in range(7)])
    finally:
        await server.stop()
    assert [(r.status, r.attempts, r.error and r.error["kind"]) for r in results] == [
        ("failed", 3, "bad_response")
    ] * 7
    assert (engine.summary.retries, engine.summary.ambiguous_retries) == (14, 0)
    assert sum(e["ambiguous_retries"] for e in ledger_results(tmp_path)) == 0


async def test_an_answer_over_the_size_cap_is_recorded_as_a_failure(tmp_path: Path) -> None:
    """An answer over max_response_bytes fails its job in the ledger (sent once, may have been
    billed), and the run goes on; a later run with a higher cap sends it again on request."""
    server = ScriptedServer()
    png = base64.b64encode(make_png(64, 64, 1)).decode()
    big = json.dumps({"data": [{"b64_json": png}], "pad": "x" * 50_000}).encode()
    server.answer = Answer(200, big, {"Content-Type": "application/json"})
    base = await server.start()
    try:
        settings = Settings(base_url=base, api_key=KEY, max_response_bytes=10_000)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            (failed,) = await run_all(engine, [Job(id="big", prompt="p")])
        roomy = Settings(base_url=base, api_key=KEY, retry_failed=True)
        async with Engine(roomy, out_dir=tmp_path, sleep=no_sleep) as engine:
            (done,) = await run_all(engine, [Job(id="big", prompt="p")])
    finally:
        await server.stop()
    assert (failed.status, failed.attempts) == ("failed", 1)
    assert failed.error is not None and failed.error["kind"] == "bad_response"
    assert "max_response_bytes" in failed.error["message"]
    assert "may have been billed" in failed.error["message"]
    assert done.ok
    assert [e["status"] for e in ledger_results(tmp_path)] == ["failed", "ok"]


# --- pure parsing functions -------------------------------------------------------------------


@MANY
@given(
    headers=st.dictionaries(
        st.one_of(
            st.sampled_from(["Retry-After", "retry-after", "RETRY-AFTER", "retry-after-ms"]),
            st.sampled_from(["Retry-After-Ms", "x"]),
        ),
        st.one_of(NUMBERS, HTTP_DATES, HOSTILE_TEXT),
        max_size=3,
    ),
    now=st.floats(0, 4e9),
)
def test_parse_retry_after_is_none_or_a_finite_wait(headers: dict[str, str], now: float) -> None:
    """Any Retry-After headers give no wait or a finite, non-negative number of seconds."""
    wait = parse_retry_after(headers, now=now)
    assert wait is None or (isinstance(wait, float) and math.isfinite(wait) and wait >= 0)


BODY_TEXTS = st.one_of(
    HOSTILE_TEXT,
    ERROR_BODIES.map(dump),
    HOSTILE_VALUES.map(dump),
    st.binary(max_size=40).map(lambda data: data.decode("utf-8", "replace")),
)


@MANY
@given(text=BODY_TEXTS)
def test_parse_error_body_never_raises(text: str) -> None:
    """Any body text gives a message string and optional string code and request id."""
    message, code, request_id = parse_error_body(text)
    assert isinstance(message, str)
    assert code is None or isinstance(code, str)
    assert request_id is None or isinstance(request_id, str)


@MANY
@given(
    status=st.integers(100, 999),
    text=BODY_TEXTS,
    headers=header_sets(),
    now=st.floats(0, 4e9),
)
def test_make_status_error_is_always_well_formed(
    status: int, text: str, headers: dict[str, str], now: float
) -> None:
    """Any error answer becomes a status error with a message, a kind and a JSON record."""
    exc = make_status_error(status, text, headers=headers, now=now)
    assert isinstance(exc, APIStatusError)
    assert exc.status == status
    # The client redacts the key from the body before this; this function sees it as sent.
    check_api_error(exc, redacted=False)
    if status in NEVER_RETRIED:
        assert not exc.retryable


@MANY
@given(text=st.one_of(HOSTILE_TEXT, st.text(st.sampled_from("AZaz09+/=-_ \n\r\t:;,data"))))
def test_decode_b64_fails_only_as_image_data_error(text: str) -> None:
    """Any text decodes to some bytes or fails as an ImageDataError."""
    try:
        data = decode_b64(text)
    except ImageDataError as exc:
        check_api_error(exc)
    else:
        assert isinstance(data, bytes) and data


@MANY
@given(
    data=st.binary(min_size=1, max_size=64),
    prefix=st.sampled_from(["", "data:image/png;base64,", "DATA:image/webp;BASE64,"]),
    wrap=st.integers(0, 20),
    pad=st.sampled_from(["", " ", "\n", "\r\n"]),
)
def test_decode_b64_round_trips(data: bytes, prefix: str, wrap: int, pad: str) -> None:
    """Encoded bytes decode back, with a data: prefix, wrapped lines and outer whitespace."""
    encoded = base64.b64encode(data).decode()
    if wrap:
        encoded = "\n".join(encoded[i : i + wrap * 4] for i in range(0, len(encoded), wrap * 4))
    assert decode_b64(f"{pad}{prefix}{encoded}{pad}") == data


@MANY
@given(
    head=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP"]),
    tail=st.binary(max_size=32),
)
def test_detect_format_names_only_known_formats(head: bytes, tail: bytes) -> None:
    """Any bytes are PNG, JPEG, WebP or unknown; a magic prefix always wins."""
    found = detect_format(head + tail)
    assert found in (None, "png", "jpeg", "webp")
    expected = {b"\x89P": "png", b"\xff\xd8": "jpeg", b"RI": "webp"}.get(head[:2])
    if expected is not None:
        assert found == expected


# --- regressions: bugs these properties found -------------------------------------------------


def manifest_problems(tmp_path: Path, data: bytes) -> list[tuple[int, str | None, str]]:
    """(line, field, message) of each problem load_manifest reports for a file."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(data)
    try:
        load_manifest(path)
    except ManifestError as exc:
        return [(p.line, p.field, p.message) for p in exc.problems]
    raise AssertionError("the manifest loaded")


def nested(depth: int, *, kind: str = "list") -> str:
    """JSON text of `depth` lists or objects inside each other."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "0" + "}" * depth


@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize("depth", [MAX_NESTING - 1, 500, 985, 988, 990, 995, 1200, 5000])
def test_deep_nesting_is_a_manifest_error(tmp_path: Path, kind: str, depth: int) -> None:
    """A line nested too deeply fails as its own line, never as a RecursionError."""
    text = f'{{"prompt": "x", "extra": {{"a": {nested(depth, kind=kind)}}}}}'
    problems = manifest_problems(tmp_path, b'{"prompt": "ok"}\n' + text.encode() + b"\n")
    assert problems == [(2, None, f"invalid JSON: nested more than {MAX_NESTING} levels deep")]


def test_nesting_up_to_the_limit_loads(tmp_path: Path) -> None:
    """A line nested exactly MAX_NESTING deep (the line's own object counts) still loads."""
    path = tmp_path / "m.jsonl"
    extra = nested(MAX_NESTING - 2)
    path.write_text(f'{{"prompt": "x", "extra": {{"a": {extra}}}}}\n', encoding="utf-8")
    (job,) = load_manifest(path)
    assert job.extra == {"a": json.loads(extra)}


def test_number_with_too_many_digits_is_a_manifest_error(tmp_path: Path) -> None:
    """An integer past Python's digit limit is invalid JSON, never a bare ValueError."""
    text = '{"prompt": "x", "n": ' + "9" * 5000 + "}"
    problems = manifest_problems(tmp_path, text.encode())
    assert problems == [(1, None, "invalid JSON: a number has too many digits")]


@pytest.mark.parametrize(
    ("literal", "reason"),
    [
        ("NaN", "NaN is not a JSON number"),
        ("Infinity", "Infinity is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
        ("1e400", "1e400 is out of range for a number"),
        ("-1E+999", "-1E+999 is out of range for a number"),
    ],
)
@pytest.mark.parametrize("where", ["extra", "metadata"])
def test_non_finite_numbers_are_a_manifest_error(
    tmp_path: Path, literal: str, reason: str, where: str
) -> None:
    """NaN and infinities are not JSON: a line carrying one fails instead of being sent."""
    text = f'{{"prompt": "x", "{where}": {{"seed": {literal}}}}}'
    assert manifest_problems(tmp_path, text.encode()) == [(1, None, f"invalid JSON: {reason}")]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"prompt": "x\\ud800"}', "prompt"),
        ('{"prompt": "x", "extra": {"seed": "\\udfff"}}', "extra"),
        ('{"prompt": "x", "id": "a", "extra": {"\\ud800": 1}}', "extra"),
        ('{"custom_id": "a", "body": {"prompt": "x", "extra": {"seed\\ud800": 1}}}', "body.extra"),
        ('{"prompt": "x", "id": "a", "user": "\\udc00"}', "user"),
        ('{"prompt": "x", "id": "a", "model": "flux", "size": "1x\\ud800"}', "size"),
    ],
)
def test_lone_surrogates_in_sent_fields_name_the_field(text: str, field: str) -> None:
    """A \\ud800 escape in a field that is sent fails naming that field."""
    with pytest.raises(ManifestError) as info:
        parse_line(text, 3, registry=REGISTRY)
    assert [(p.line, p.field) for p in info.value.problems] == [(3, field)]


def test_undecodable_bytes_name_their_line(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 fail their own line; the other lines are still checked."""
    data = b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{bad\n\xff\xfe\n{"prompt": "fine"}'
    problems = manifest_problems(tmp_path, data)
    assert [(line, field) for line, field, _ in problems] == [(2, None), (3, None), (4, None)]
    assert problems[0][2] == problems[2][2] == "not UTF-8 text"


def test_unreadable_manifest_is_a_manifest_error(tmp_path: Path) -> None:
    """A manifest path that cannot be read as a file is a ManifestError, not an OSError."""
    with pytest.raises(ManifestError, match="cannot read the file"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    "body",
    [
        '{"created": ' + "9" * 5000 + ', "data": [{"url": "http://127.0.0.1/x.png"}]}',
        '{"data": [{"url": "http://127.0.0.1/x.png"}], "usage": ' + nested(5000) + "}",
    ],
    ids=["huge-number", "deep-nesting"],
)
async def test_unreadable_json_answer_is_a_malformed_response(body: str) -> None:
    """A 200 whose JSON Python cannot read is a malformed answer, not a ValueError."""
    server = ScriptedServer()
    server.answer = Answer(200, body.encode(), {"Content-Type": "application/json"})
    base = await server.start()
    try:
        async with Client(base_url=base, api_key=KEY) as client:
            with pytest.raises(APIResponseError) as info:
                await client.generate({"prompt": "p"})
    finally:
        await server.stop()
    assert info.value.message.startswith("malformed response")
    assert (info.value.status, info.value.retryable) == (200, True)


def test_error_body_nested_too_deeply_is_read_as_plain_text() -> None:
    """An error body too deep for Python's JSON reader is shown as text, not a RecursionError."""
    body = '{"error": ' + nested(5000) + "}"
    message, code, request_id = parse_error_body(body)
    assert (code, request_id) == (None, None)
    assert message.startswith('{"error": [[[') and message.endswith("...")
    exc = make_status_error(502, body)
    assert isinstance(exc, ServerError) and exc.retryable


async def test_content_policy_code_without_message_still_has_a_message() -> None:
    """A success status carrying only a content-policy code gives an error with a message."""
    server = ScriptedServer()
    body = b'{"error": {"code": "content_policy_violation"}}'
    server.answer = Answer(200, body, {"Content-Type": "application/json"})
    base = await server.start()
    try:
        async with Client(base_url=base, api_key=KEY) as client:
            with pytest.raises(ContentPolicyError) as info:
                await client.generate({"prompt": "p"})
    finally:
        await server.stop()
    assert info.value.message == "the API answered 200 with error code content_policy_violation"
    assert (info.value.kind, info.value.retryable) == ("content_policy", False)
