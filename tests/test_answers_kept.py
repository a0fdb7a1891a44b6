"""What the API answered is kept: a success's request id and self-description in its ledger
line (the key blanked, odd values left out), the Batch-API export fed from them, and a 400's
or 422's validation details in the recorded error message."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import ledger_results, no_sleep, run_all, serve, settings_for

from cometbatch import Engine, Job, ModelRegistry, Settings, SimConfig, Simulator
from cometbatch.ledger._scan import result_line
from cometbatch.ledger.index import LedgerState
from cometbatch.ledger.verify import verify_folder
from cometbatch.net.answered import RESPONSE_FIELDS, Answered, answered
from cometbatch.net.retry import make_status_error, parse_error_body
from cometbatch.simulator.imagegen import make_png
from cometbatch.simulator.response import described
from cometbatch.simulator.rules import ImageRequest, parse_request
from cometbatch.views.export import export
from cometbatch.views.gallery.content import read_gallery
from cometbatch.views.status import read_status

KEY = "sk-answers-SECRET-0123456789"
ROUTE = "/v1/images/generations"
PNG = base64.b64encode(make_png(8, 8, seed=1)).decode()
# The simulator's request ids: a UTC timestamp with nanoseconds, then eight letters or digits.
SIM_ID = re.compile(r"[0-9]{23}[A-Za-z0-9]{8}")


def exported(out: Path, format: str) -> list[Any]:
    stream = io.StringIO()
    export(out, format, stream)
    if format == "csv":
        return list(csv.DictReader(io.StringIO(stream.getvalue())))
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def answering(body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    """A handler that answers every generation with `body` (and `headers`)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(body, headers=headers)

    return handler


async def run_against(handler: Any, out: Path, *jobs: Job, **settings: Any) -> list[Any]:
    """Run `jobs` against a server answering with `handler`; the results."""
    async with serve({("POST", ROUTE): handler}) as origin:
        config = Settings(base_url=f"{origin}/v1", api_key=KEY, **settings)
        async with Engine(config, out_dir=out, sleep=no_sleep) as engine:
            return await run_all(engine, list(jobs))


# -- reading an answer -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "header", "kept"),
    [
        (
            {"created": 1713833628, "size": "1536x1024", "quality": "high",
             "output_format": "webp", "background": "transparent"},
            "req_1",
            Answered("req_1", 1713833628, "1536x1024", "high", "webp", "transparent"),
        ),
        ({"request_id": "body-id"}, "header-id", Answered(request_id="body-id")),
        ({"request_id": 7}, "header-id", Answered(request_id="header-id")),
        ({}, None, Answered()),
        ({"created": "yesterday", "size": 1024, "quality": None}, None, Answered()),
        ({"created": True, "output_format": ["png"], "background": {}}, None, Answered()),
        ({"created": -1}, None, Answered()),
        ({"created": 1.5e9}, None, Answered()),
        ({"size": ""}, "", Answered()),
        ({"size": "9" * 65}, "x" * 201, Answered()),
        ({"quality": "h\ud800gh"}, None, Answered(quality="h\ufffdgh")),
    ],
)  # fmt: skip
def test_an_answer_is_read_leniently(body: dict[str, Any], header: Any, kept: Answered) -> None:
    """Each field is kept when it has the type the schema gives it and a plausible length,
    left out otherwise; the body's request id wins over the header's."""
    assert answered(body, header) == kept


def test_only_what_was_answered_goes_into_a_line() -> None:
    """A line gets `response` and `request_id` only when there is something in them, and
    reads back as it was written; an older line reads as nothing answered."""
    full = Answered("r", 1, "auto", "low", "png", "opaque")
    assert full.line_fields() == {
        "response": {"created": 1, "size": "auto", "quality": "low", "output_format": "png",
                     "background": "opaque"},
        "request_id": "r",
    }  # fmt: skip
    assert Answered.of_line(full.line_fields()) == full
    assert Answered(request_id="r").line_fields() == {"request_id": "r"}
    assert Answered(size="1024x1024").line_fields() == {"response": {"size": "1024x1024"}}
    assert Answered().line_fields() == {}
    assert not Answered() and Answered(created=0)
    assert Answered.of_line({"event": "result", "usage": None}) == Answered()
    assert Answered.of_line({"response": "odd", "request_id": 5}) == Answered()
    assert tuple(full.response) == RESPONSE_FIELDS


@pytest.mark.parametrize("name", [field.name for field in dataclasses.fields(Answered)])
def test_an_answer_that_said_anything_is_true(name: str) -> None:
    """An Answered with any one field set is true (its line keeps it); with none, false."""
    value: Any = 0 if name == "created" else "x"
    assert Answered(**{name: value})
    assert not Answered()


# -- the simulator answers like the real API ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (
            {"model": "gpt-image-1", "prompt": "p"},
            {"size": "1024x1024", "quality": "medium", "output_format": "png",
             "background": "opaque"},
        ),
        (
            {"model": "gpt-image-1", "prompt": "p", "size": "auto", "quality": "auto",
             "background": "auto"},
            {"size": "1024x1024", "quality": "medium", "output_format": "png",
             "background": "opaque"},
        ),
        (
            {"model": "gpt-image-1", "prompt": "p", "size": "1024x1536", "quality": "low",
             "output_format": "webp", "background": "transparent"},
            {"size": "1024x1536", "quality": "low", "output_format": "webp",
             "background": "transparent"},
        ),
        ({"model": "dall-e-3", "prompt": "p", "quality": "hd"}, {}),
        ({"model": "dall-e-2", "prompt": "p", "size": "256x256"}, {}),
    ],
)  # fmt: skip
def test_the_simulator_describes_gpt_image_answers(
    body: dict[str, Any], fields: dict[str, str]
) -> None:
    """GPT image models describe their images ("auto" resolved as the model chose); dall-e
    answers only `created`."""
    request = parse_request(body, ModelRegistry())
    assert isinstance(request, ImageRequest)
    assert described(request, body) == fields


async def test_the_simulator_sends_a_request_id_on_every_answer() -> None:
    """A success, an error (the same id in its message) and a cut-off answer each carry an
    X-Request-Id header; successes have fresh ids."""
    body = {"model": "gpt-image-1", "prompt": "a kite", "size": "1536x1024"}
    async with Simulator(SimConfig(seed=1)) as sim, aiohttp.ClientSession() as session:
        sim.enqueue("400")
        ids = []
        for _ in range(3):
            async with session.post(
                f"{sim.base_url}/images/generations",
                json=body,
                headers={"Authorization": "Bearer k"},
            ) as resp:
                answer = await resp.json()
                ids.append(resp.headers["X-Request-Id"])
                if resp.status == 400:
                    assert f"(request id: {ids[-1]})" in answer["error"]["message"]
                else:
                    assert answer["size"] == "1536x1024" and answer["created"] > 0
        sim.enqueue("malformed")
        async with session.post(
            f"{sim.base_url}/images/generations", json=body, headers={"Authorization": "Bearer k"}
        ) as resp:
            assert SIM_ID.fullmatch(resp.headers["X-Request-Id"])
    assert all(SIM_ID.fullmatch(request_id) for request_id in ids)
    assert len(set(ids)) == 3


# -- the ledger keeps it ------------------------------------------------------------------


async def test_a_gpt_image_answer_is_kept_in_its_result_line(tmp_path: Path) -> None:
    """The line of a GPT image answer records its request id and how it describes its
    images; it still takes the ledger's fast path, and the Result carries the same."""
    job = Job(id="kite", prompt="a kite", model="gpt-image-1", n=2, size="1536x1024",
              quality="high", output_format="webp", background="transparent")  # fmt: skip
    async with (
        Simulator(SimConfig(seed=1)) as sim,
        Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine,
    ):
        (result,) = await run_all(engine, [job])
    (line,) = ledger_results(tmp_path)
    assert SIM_ID.fullmatch(line["request_id"])
    assert line["response"] == {
        "created": line["response"]["created"], "size": "1536x1024", "quality": "high",
        "output_format": "webp", "background": "transparent",
    }  # fmt: skip
    assert isinstance(line["response"]["created"], int)
    assert result.answered == Answered.of_line(line)
    lines = (tmp_path / "ledger.jsonl").read_bytes().splitlines(keepends=True)
    raw = next(line for line in lines if line.startswith(b'{"event":"result"'))
    assert result_line().fullmatch(raw) is not None
    assert list(line).index("response") == list(line).index("usage") + 1


async def test_a_dall_e_answer_keeps_created_and_its_request_id(tmp_path: Path) -> None:
    """dall-e answers say only when they were made: the line has that and the request id."""
    async with (
        Simulator(SimConfig(seed=1)) as sim,
        Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine,
    ):
        await run_all(engine, [Job(id="fox", prompt="a fox", model="dall-e-3")])
    (line,) = ledger_results(tmp_path)
    assert set(line["response"]) == {"created"}
    assert SIM_ID.fullmatch(line["request_id"])


@pytest.mark.parametrize(
    ("header", "body_id", "expected"),
    [
        ({"X-Request-Id": "req_abc"}, None, "req_abc"),
        ({"X-Oneapi-Request-Id": "20261121000000001abcdefgh"}, None, "20261121000000001abcdefgh"),
        ({"X-Request-Id": "from-header"}, "from-body", "from-body"),
    ],
)  # fmt: skip
async def test_the_request_id_comes_from_the_body_or_a_header(
    tmp_path: Path, header: dict[str, str], body_id: str | None, expected: str
) -> None:
    """A request id in the body is kept, else the X-Request-Id (or one-api's) header's."""
    body: dict[str, Any] = {"created": 1, "data": [{"b64_json": PNG}]}
    if body_id is not None:
        body["request_id"] = body_id
    (result,) = await run_against(answering(body, header), tmp_path, Job(id="a", prompt="p"))
    assert result.ok
    (line,) = ledger_results(tmp_path)
    assert (line["request_id"], line["response"]) == (expected, {"created": 1})


async def test_an_answer_that_says_nothing_writes_the_line_as_before(tmp_path: Path) -> None:
    """No request id, no created: the line has neither field (it reads like an older one)."""
    handler = answering({"data": [{"b64_json": PNG}]})
    (result,) = await run_against(handler, tmp_path, Job(id="a", prompt="p"))
    assert result.ok and not result.answered
    (line,) = ledger_results(tmp_path)
    assert "response" not in line and "request_id" not in line


async def test_an_odd_field_never_fails_paid_images(tmp_path: Path) -> None:
    """An answer whose created or size is of a type the schema does not give is still a
    success at the first attempt (its images were paid for); the odd fields are left out."""
    body = {"created": "yesterday", "size": 1024, "quality": "high", "data": [{"b64_json": PNG}]}
    (result,) = await run_against(answering(body), tmp_path, Job(id="a", prompt="p"))
    assert (result.status, result.attempts) == ("ok", 1)
    (line,) = ledger_results(tmp_path)
    assert line["response"] == {"quality": "high"}


@pytest.mark.parametrize(
    "odd",
    [{"usage": "x"}, {"usage": [1]}, {"usage": 7}, {"revised_prompt": 5}, {"revised_prompt": {}}],
    ids=["usage-text", "usage-list", "usage-number", "revised-number", "revised-object"],
)
async def test_an_odd_usage_or_revised_prompt_never_fails_paid_images(
    tmp_path: Path, odd: dict[str, Any]
) -> None:
    """`usage` that is not an object, or a revised prompt that is not text, is left out: the
    answer's images were paid for, so it is a success at the first attempt (not retried as
    malformed, which would pay for them again)."""
    item: dict[str, Any] = {"b64_json": PNG}
    body: dict[str, Any] = {"created": 5, "data": [item]}
    if "usage" in odd:
        body["usage"] = odd["usage"]
    else:
        item["revised_prompt"] = odd["revised_prompt"]
    (result,) = await run_against(answering(body), tmp_path, Job(id="a", prompt="p"))
    assert (result.status, result.attempts) == ("ok", 1)
    (line,) = ledger_results(tmp_path)
    assert line["usage"] is None and line["ambiguous_retries"] == 0


async def test_the_key_and_control_characters_an_answer_echoes_are_not_stored(
    tmp_path: Path,
) -> None:
    """A server that puts the key into the request id (header and body) and the fields has it
    blanked; a terminal escape in a field is stored as a JSON escape, not as itself."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY)  # the key spelled with JSON escapes
    text = (
        '{"created": 5, "data": [{"b64_json": "' + PNG + '"}], "size": "' + KEY + '", '
        '"quality": "\\u001b[2Jhigh", "background": "x' + escaped + '"}'
    )

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = {"X-Request-Id": f"id-{KEY}"}
        return web.Response(text=text, content_type="application/json", headers=headers)

    (result,) = await run_against(handler, tmp_path, Job(id="a", prompt="p"))
    assert result.ok
    raw = (tmp_path / "ledger.jsonl").read_text(encoding="utf-8")
    assert KEY not in raw and "\x1b" not in raw
    (line,) = ledger_results(tmp_path)
    assert line["request_id"] == "id-***"
    assert line["response"] == {"created": 5, "size": "***", "quality": "\x1b[2Jhigh",
                                "background": "x***"}  # fmt: skip
    assert KEY not in repr(result)


async def test_a_short_answer_and_its_rest_each_keep_their_answer(tmp_path: Path) -> None:
    """A short answer's partial line has its request id; the ok line of the rest has the
    rest's; when the rest fails, the partial line keeps the first answer's (its images came
    in it), also when a later run asks for the rest again and fails again."""
    job = Job(id="owls", prompt="owls", model="gpt-image-1", n=4)
    async with Simulator(SimConfig(seed=1)) as sim:
        settings = settings_for(sim, max_attempts=1)
        sim.enqueue("short")
        async with Engine(settings, out_dir=tmp_path / "a", sleep=no_sleep) as engine:
            await run_all(engine, [job])
        partial, ok = ledger_results(tmp_path / "a")
        assert (partial["status"], ok["status"]) == ("partial", "ok")
        assert SIM_ID.fullmatch(partial["request_id"]) and SIM_ID.fullmatch(ok["request_id"])
        assert partial["request_id"] != ok["request_id"]

        sim.enqueue("short", "400")
        async with Engine(settings, out_dir=tmp_path / "b", sleep=no_sleep) as engine:
            await run_all(engine, [job])
        first, failed = ledger_results(tmp_path / "b")
        assert (first["status"], failed["status"]) == ("partial", "partial")
        assert failed["error"]["kind"] == "bad_request"
        assert failed["request_id"] == first["request_id"] != failed["error"]["request_id"]
        assert failed["response"] == first["response"]

        sim.enqueue("400")
        again = settings_for(sim, max_attempts=1, retry_failed=True)
        async with Engine(again, out_dir=tmp_path / "b", sleep=no_sleep) as engine:
            await run_all(engine, [job])
        *_, latest = ledger_results(tmp_path / "b")
        assert latest["status"] == "partial" and latest["run_id"] != failed["run_id"]
        assert latest["request_id"] == first["request_id"]


async def test_an_image_that_is_not_whole_names_its_answers_request_id(tmp_path: Path) -> None:
    """A failed line for an answer whose image was broken records that answer's request id
    in its error (no images were kept from it, so the line has no top-level one)."""
    async with Simulator(SimConfig(seed=1)) as sim:
        sim.enqueue("bad-base64")
        settings = settings_for(sim, max_attempts=1)
        async with Engine(settings, out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, [Job(id="a", prompt="p", model="gpt-image-1")])
    (line,) = ledger_results(tmp_path)
    assert line["status"] == "failed" and line["error"]["kind"] == "invalid_image"
    assert SIM_ID.fullmatch(line["error"]["request_id"])
    assert "request_id" not in line and "response" not in line


async def test_images_put_back_keep_their_answer(tmp_path: Path) -> None:
    """An image verify found missing is set aside with its answer; found whole again, its
    line is recorded again with the same request id and response."""
    job = Job(id="a", prompt="p", model="gpt-image-1")
    async with Simulator(SimConfig(seed=1)) as sim:
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, [job])
        (ok,) = ledger_results(tmp_path)
        image = tmp_path / ok["images"][0]["path"]
        data = image.read_bytes()
        image.unlink()
        assert (await verify_folder(tmp_path)).marked_keys == 1
        withdrawn = ledger_results(tmp_path)[-1]["withdrawn"]
        assert (withdrawn["request_id"], withdrawn["response"]) == (
            ok["request_id"],
            ok["response"],
        )
        image.write_bytes(data)
        requests = sim.stats.requests
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, [job])
        assert sim.stats.requests == requests
    again = ledger_results(tmp_path)[-1]
    assert again["status"] == "ok"
    assert (again["request_id"], again["response"]) == (ok["request_id"], ok["response"])
    raw = (tmp_path / "ledger.jsonl").read_bytes().splitlines(keepends=True)[-2]
    assert json.loads(raw)["event"] == "result" and result_line().fullmatch(raw) is not None


# -- readers take lines with and without it -----------------------------------------------


async def test_every_reader_takes_lines_with_and_without_the_answer(tmp_path: Path) -> None:
    """A ledger with one line as written now and one as written before answers were kept is
    read alike by the resume state, status, gallery, verify and every export; a rerun sends
    nothing. The Batch-API export fills request_id and the answer's fields where recorded."""
    jobs = [
        Job(id="new", prompt="a kite", model="gpt-image-1", size="1024x1536", quality="low"),
        Job(id="old", prompt="a fox", model="gpt-image-1"),
    ]
    async with Simulator(SimConfig(seed=1)) as sim:
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, jobs)
        ledger = tmp_path / "ledger.jsonl"
        lines = [json.loads(line) for line in ledger.read_text().splitlines()]
        for line in lines:
            if line.get("job_id") == "old":
                del line["response"], line["request_id"]
        ledger.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))
        new = next(line for line in lines if line.get("job_id") == "new")

        state = LedgerState.load(ledger)
        assert state.counts()["ok"] == 2 and not state._whole
        status = read_status(tmp_path)
        assert (status.keys, status.by_model["gpt-image-1"].ok_images) == (2, 2)
        assert len(read_gallery(tmp_path).tiles) == 2
        assert (await verify_folder(tmp_path)).ok

        batch = {line["custom_id"]: line["response"] for line in exported(tmp_path, "openai-batch")}
        assert batch["new"]["request_id"] == new["request_id"]
        assert batch["new"]["body"]["created"] == new["response"]["created"]
        assert (batch["new"]["body"]["size"], batch["new"]["body"]["quality"]) == (
            "1024x1536",
            "low",
        )
        assert batch["new"]["body"]["output_format"] == "png"
        assert batch["old"]["request_id"] is None
        assert isinstance(batch["old"]["body"]["created"], int)
        assert "size" not in batch["old"]["body"]
        rows = {row["job_id"]: row for row in exported(tmp_path, "csv")}
        assert (rows["new"]["request_id"], rows["old"]["request_id"]) == (new["request_id"], "")
        records = {record["job_id"]: record for record in exported(tmp_path, "jsonl")}
        assert records["new"]["request_ids"] == [new["request_id"]]
        assert records["old"]["request_ids"] == []

        requests = sim.stats.requests
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            results = await run_all(engine, jobs)
        assert sim.stats.requests == requests and all(result.reused for result in results)


# -- validation details of a 400 or 422 ----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"error": {"message": "Invalid value: '7x7'. Supported values are: 'auto'.",
                       "type": "invalid_request_error", "param": "size",
                       "code": "invalid_value"}},
            "Invalid value: '7x7'. Supported values are: 'auto'. (param: size)",
        ),
        (
            {"error": {"message": "Invalid 'n': integer above maximum value.", "param": "n",
                       "code": None}},
            "Invalid 'n': integer above maximum value.",
        ),
        (
            {"error": {"message": "Invalid value (request id: r1)", "param": "n", "code": ""}},
            "Invalid value (param: n)",
        ),
        ({"error": {"message": "bad (request id: r1)", "param": "", "code": ""}}, "bad"),
        ({"error": {"message": "", "param": "quality"}}, "param: quality"),
        ({"error": {"message": "m", "param": 7}}, "m"),
        (
            {"detail": [
                {"type": "literal_error", "loc": ["body", "size"],
                 "msg": "Input should be '1024x1024' or 'auto'", "input": "7x7"},
                {"type": "less_than_equal", "loc": ["body", "n"],
                 "msg": "Input should be less than or equal to 10"},
            ]},
            "body.size: Input should be '1024x1024' or 'auto'; "
            "body.n: Input should be less than or equal to 10",
        ),
        (
            {"detail": [{"loc": ["body", "images", 0, "url"], "msg": "bad url"}, "plain",
                        {"msg": "no place"}, {"loc": "query", "msg": 5}]},
            "body.images.0.url: bad url; plain; no place; query: 5",
        ),
        ({"detail": "Not authenticated"}, "Not authenticated"),
        (
            {"detail": [{"loc": ["body", f"f{i}"], "msg": "x"} for i in range(12)]},
            "; ".join(f"body.f{i}: x" for i in range(10)) + "; and 2 more",
        ),
    ],
)  # fmt: skip
def test_validation_details_are_kept_in_the_message(body: dict[str, Any], message: str) -> None:
    """OpenAI's `param` is named unless the message names it already; FastAPI's `detail`
    list names each location with its message."""
    assert parse_error_body(json.dumps(body))[0] == message


@pytest.mark.parametrize("status", [400, 422])
async def test_a_validation_failure_is_recorded_with_its_details(
    tmp_path: Path, status: int
) -> None:
    """A 422 (or 400) whose body lists validation details fails its job (not retried) with
    each location and message in the ledger's error message."""
    detail = {"detail": [{"loc": ["body", "size"], "msg": "Input should be 'auto'",
                          "type": "literal_error"}]}  # fmt: skip

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(detail, status=status, headers={"X-Request-Id": "req-9"})

    (result,) = await run_against(handler, tmp_path, Job(id="a", prompt="p"))
    assert (result.status, result.attempts) == ("failed", 1)
    (line,) = ledger_results(tmp_path)
    assert line["error"]["message"] == "body.size: Input should be 'auto'"
    assert line["error"]["request_id"] == "req-9"
    assert line["error"]["kind"] == ("unprocessable" if status == 422 else "bad_request")
    exc = make_status_error(status, json.dumps(detail))
    assert not exc.retryable


async def test_the_batch_export_takes_its_request_id_and_fields_from_one_answer(
    tmp_path: Path,
) -> None:
    """A job of two requests where the first recorded only its request id: the exported
    response is that answer's, request id and fields alike, never a mix of two answers."""
    job = Job(id="tiles", prompt="tiles", model="gpt-image-1", n=12, size="1536x1024")
    async with (
        Simulator(SimConfig(seed=1)) as sim,
        Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine,
    ):
        await run_all(engine, [job])
    ledger = tmp_path / "ledger.jsonl"
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    first = next(line for line in lines if line.get("chunk") == 0)
    del first["response"]
    ledger.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))
    (record,) = exported(tmp_path, "openai-batch")
    assert record["response"]["request_id"] == first["request_id"]
    assert "size" not in record["response"]["body"]
