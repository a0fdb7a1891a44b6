"""Server text is data: escape codes, controls and lone surrogates from the API are shown
escaped on the terminal and in the gallery, and stored as valid UTF-8."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
from aiohttp import web
from support import ROOT, Handler, cli_bytes, serve

from cometbatch.simulator.imagegen import make_png
from cometbatch.textsafe import PrintableFormatter, printable, safe_json, storable

ROUTE = "/v1/images/generations"
PNG = make_png(8, 8, 1)
# Retitles the window, clears the screen, reverses what follows, cannot be encoded, and a
# C1 CSI (what ESC [ is in one byte).
HOSTILE = "t\x1b]0;pwned\x07 \x1b[2J \u202e \ud800 \x9b31m end"
# Raw characters a terminal would act on, as they would appear in decoded output.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e\ud800-\udfff]")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain é 🐱\tand a tab", "plain é 🐱\tand a tab"),
        ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
        ("\x1b[2J", "\\x1b[2J"),
        ("a\u202eb\u2066c", "a\\u202eb\\u2066c"),
        ("\ud800x\udfff", "\\ud800x\\udfff"),
        ("\x9b\x85\x7f\x00", "\\x9b\\x85\\x7f\\x00"),
        ("one\ntwo\r", "one\\ntwo\\r"),
    ],
)
def test_printable_shows_controls_as_escapes(text: str, shown: str) -> None:
    """Controls, bidi overrides and lone surrogates become visible escapes; the rest stays."""
    assert printable(text) == shown


def test_printable_can_keep_line_breaks_and_storable_encodes() -> None:
    """`newlines` keeps line breaks only; storable replaces just the lone surrogates."""
    assert printable("a\nb\x1b", newlines=True) == "a\nb\\x1b"
    assert storable("a\ud800b\U0001f431\x1b") == "a\ufffdb\U0001f431\x1b"
    storable(HOSTILE).encode("utf-8")


@pytest.mark.parametrize("value", [HOSTILE, "del \x7f only", "plain", {"k\u2066": ["\x85"]}])
def test_safe_json_keeps_the_value_and_writes_no_raw_control(value: object) -> None:
    """JSON text gets \\u escapes instead of raw controls: valid UTF-8, the same value."""
    text = safe_json(json.dumps(value, ensure_ascii=False))
    assert RAW.findall(text) == [] and "\x7f" not in text
    assert json.loads(text.encode("utf-8")) == value


def test_log_lines_show_server_text_escaped_in_messages_and_tracebacks() -> None:
    """The CLI's log formatter escapes a message (newlines too) and keeps a traceback's lines."""
    formatter = PrintableFormatter("%(levelname)s: %(message)s")
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        info = sys.exc_info()
    record = logging.LogRecord(
        "cometbatch", logging.INFO, "x", 1, "why: %s", (HOSTILE + "\nINFO: forged",), info
    )
    text = formatter.format(record)
    assert RAW.findall(text) == []
    first, *rest = text.splitlines()
    assert first.startswith("INFO: why: t\\x1b]0;pwned\\x07") and "\\nINFO: forged" in first
    assert rest[0] == "Traceback (most recent call last):" and "ValueError: t\\x1b" in rest[-1]


def hostile_api() -> Handler:
    """An API whose revised prompts and error messages carry escape codes and surrogates."""
    seen: dict[str, int] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        prompt = (await request.json())["prompt"]
        seen[prompt] = seen.get(prompt, 0) + 1
        error = {"error": {"message": HOSTILE, "type": "x", "code": HOSTILE}}
        if prompt == "refused":
            error["error"]["code"] = "content_policy_violation"
            return web.json_response(error, status=400)
        if prompt == "flaky" and seen[prompt] == 1:
            return web.json_response(error, status=500, headers={"Retry-After": "0"})
        image = {"b64_json": base64.b64encode(PNG).decode(), "revised_prompt": HOSTILE}
        return web.json_response({"created": 1, "data": [image]})

    return handler


async def cli(*args: str, cwd: Path) -> tuple[int, bytes, bytes]:
    """Run the CLI in a subprocess with a test key; its exit code, stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMETAPI_")}
    env |= {"COMETAPI_KEY": "sk-test", "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}
    return await cli_bytes(*args, cwd=cwd, env=env)


def assert_safe(name: str, data: bytes) -> str:
    """`data` decodes as strict UTF-8 and holds no character a terminal would act on."""
    text = data.decode("utf-8")
    assert RAW.findall(text) == [], f"{name}: {text!r}"
    return text


async def test_hostile_server_text_reaches_no_terminal_raw_and_is_stored_as_utf8(
    tmp_path: Path,
) -> None:
    """run -v, status, gallery, export and fetch print server text escaped; the ledger is
    strict UTF-8 JSON line by line; the gallery page is written, escaped, as UTF-8."""
    jobs = [{"id": p, "prompt": p, "model": "dall-e-3"} for p in ("fine", "flaky", "refused")]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    out = tmp_path / "out"
    async with serve({("POST", ROUTE): hostile_api()}) as api:
        code, run_out, run_err = await cli(
            "run", str(manifest), "--out", str(out), "--base-url", f"{api}/v1",
            "--max-attempts", "2", "-v", cwd=tmp_path,
        )  # fmt: skip
    assert code == 1, run_err
    stderr = assert_safe("run", run_out + run_err)
    assert "\\x1b]0;pwned\\x07" in stderr  # the retry's reason, shown escaped

    lines = (out / "ledger.jsonl").read_bytes().splitlines()
    events = [json.loads(line.decode("utf-8", "strict")) for line in lines]
    assert RAW.findall(b"\n".join(lines).decode()) == []
    revised = [i["revised_prompt"] for e in events if e["event"] == "result" for i in e["images"]]
    assert len(revised) == 2 and all("pwned" in text for text in revised)

    for args in (
        ("status", str(out)),
        ("status", str(out), "--json"),
        ("gallery", str(out)),
        ("export", str(out), "--format", "csv"),
        ("export", str(out), "--format", "jsonl"),
        ("export", str(out), "--format", "openai-batch"),
        ("export", str(out), "--format", "csv", "-o", str(tmp_path / "x.csv")),
        ("fetch", str(out)),
    ):
        code, stdout, stderr_bytes = await cli(*args, cwd=tmp_path)
        assert code in (0, 1), (args, stderr_bytes)
        shown = assert_safe(" ".join(args), stdout + stderr_bytes)
        assert "internal error" not in shown
        if args == ("status", str(out)):
            assert "\\x1b]0;pwned\\x07" in shown  # the failure example, escaped
    page = assert_safe("gallery page", (out / "index.html").read_bytes())
    assert "\\x1b]0;pwned\\x07" in page and "\\u202e" in page
    assert_safe("csv file", (tmp_path / "x.csv").read_bytes())
