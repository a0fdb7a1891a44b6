"""Lines in other shapes: openai-python's images.generate keyword arguments and OpenAI Batch
API lines, checked like plain lines and named as the line spells each field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, cli_bytes

from cometbatch import ManifestError, ModelRegistry, SimConfig, Simulator, load_manifest
from cometbatch.manifest.lines import parse_line

REGISTRY = ModelRegistry()

# A line written as the keyword arguments of openai-python's client.images.generate(...).
SDK_CALL: dict[str, Any] = {
    "prompt": "A lighthouse at dawn, watercolour",
    "model": "gpt-image-1",
    "n": 2,
    "size": "1024x1536",
    "quality": "low",
    "output_format": "webp",
    "output_compression": 80,
    "background": "opaque",
    "moderation": "low",
    "user": "team-7",
    "stream": False,
    "partial_images": 0,
    "extra_headers": None,
    "extra_query": None,
    "extra_body": {"seed": 7, "negative_prompt": "fog"},
}


def line(**fields: Any) -> str:
    return json.dumps(fields)


def batch(body: Any, **envelope: Any) -> str:
    return json.dumps({"custom_id": "c1", "body": body, **envelope})


def problems(text: str) -> list[tuple[int, str | None, str]]:
    with pytest.raises(ManifestError) as info:
        parse_line(text, 4, registry=REGISTRY)
    return [(p.line, p.field, p.message) for p in info.value.problems]


def only_problem(text: str) -> tuple[str | None, str]:
    ((number, field, message),) = problems(text)
    assert number == 4
    return field, message


def test_openai_python_keyword_arguments_are_a_job() -> None:
    """extra_body becomes extra; stream false, partial_images 0 and null options are dropped;
    the job is the one the same line written with `extra` gives (same id)."""
    job = parse_line(json.dumps(SDK_CALL), 1, registry=REGISTRY)
    plain = {
        k: v
        for k, v in SDK_CALL.items()
        if k not in ("stream", "partial_images", "extra_headers", "extra_query", "extra_body")
    }
    same = parse_line(line(**plain, extra=SDK_CALL["extra_body"]), 1, registry=REGISTRY)
    assert job is not None and same is not None
    assert job.extra == {"seed": 7, "negative_prompt": "fog"}
    assert job == same


def test_extra_body_merges_with_extra() -> None:
    """A line with both extra and extra_body sends the fields of both."""
    job = parse_line(
        line(prompt="x", model="flux", extra={"seed": 1}, extra_body={"steps": 30}),
        1,
        registry=REGISTRY,
    )
    assert job is not None and job.extra == {"seed": 1, "steps": 30}


@pytest.mark.parametrize(
    ("fields", "field", "fragments"),
    [
        (
            {"extra": {"seed": 1}, "extra_body": {"seed": 2, "steps": 3}},
            "extra_body.seed",
            ["also set in extra"],
        ),
        ({"extra_body": [1]}, "extra_body", ["JSON object"]),
        ({"extra_body": {"size": "1024x1024"}}, "extra_body", ["must not set size"]),
        ({"timeout": 120}, "timeout", ["client option", "--timeout", "settings file"]),
        ({"timeout": None}, "timeout", ["--timeout", "Settings.timeout"]),
        ({"extra_headers": {"X-Trace": "1"}}, "extra_headers", ["no custom headers"]),
        ({"extra_query": {"api-version": "1"}}, "extra_query", ["no query parameters"]),
        ({"stream": True}, "stream", ["streamed events", "remove `stream`", "--timeout"]),
        ({"partial_images": 2}, "partial_images", ["streamed", "remove `partial_images`"]),
        ({"extra": {"stream": True}}, "extra", ["must not set stream", "--timeout"]),
    ],
)
def test_openai_python_options_cometbatch_cannot_honour_are_named(
    fields: dict[str, Any], field: str, fragments: list[str]
) -> None:
    """Each refused option names the line, the field and what to use instead."""
    found, message = only_problem(line(prompt="x", model="gpt-image-1", **fields))
    assert found == field
    for fragment in fragments:
        assert fragment in message


def test_refused_options_are_listed_with_the_lines_other_problems() -> None:
    """A refused option does not hide a bad field of the same line: both are named."""
    found = problems(line(prompt="x", timeout=5, stream=True, sise="1024x1024"))
    assert [(number, field) for number, field, _ in found] == [
        (4, "timeout"),
        (4, "stream"),
        (4, "sise"),
    ]


def test_batch_api_body_passes_provider_fields_through_extra() -> None:
    """custom_id becomes id; body.extra and body.extra_body are sent as extra."""
    job = parse_line(
        batch({"model": "flux", "prompt": "p", "extra": {"seed": 5}, "extra_body": {"steps": 4}}),
        1,
        registry=REGISTRY,
    )
    assert job is not None and (job.id, job.extra) == ("c1", {"seed": 5, "steps": 4})


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        (batch({"prompt": "x", "sise": "1024x1024"}), "body.sise", "did you mean 'size'?"),
        (batch({"prompt": "x", "seed": 5}), "body.seed", "unknown field"),
        (batch({"prompt": "x", "extra_bdy": {}}), "body.extra_bdy", "did you mean 'extra_body'?"),
        (batch({"prompt": "x", "n": 0}), "body.n", "greater than or equal to 1"),
        (batch({"prompt": "x", "size": "640x480"}), "body.size", "does not take size"),
        (batch({"prompt": "x", "extra": [1]}), "body.extra", "dictionary"),
        (batch({"prompt": "x", "extra_body": {"n": 2}}), "body.extra_body", "must not set n"),
        (batch({"prompt": "x", "stream": True}), "body.stream", "remove `stream`"),
        (batch({"prompt": "x", "timeout": 30}), "body.timeout", "--timeout"),
        (batch({"prompt": "x", "id": "a"}), "body.id", "custom_id"),
        (batch({"prompt": "x", "metadata": {}}), "body.metadata", "beside custom_id"),
        (batch({"model": "dall-e-3"}), "body.prompt", "required"),
        (json.dumps({"custom_id": "", "body": {"prompt": "x"}}), "custom_id", "at least 1"),
        (batch({"prompt": "x"}, metadata=[1]), "metadata", "dictionary"),
    ],
)
def test_batch_api_body_fields_are_checked_like_a_plain_line(
    text: str, field: str, fragment: str
) -> None:
    """A bad field in a Batch API body is named as the line holds it (body.<field>)."""
    found, message = only_problem(text)
    assert found == field
    assert fragment in message


def test_batch_envelope_and_body_problems_are_named_together() -> None:
    """A wrong method and a typo in the body are both reported."""
    found = problems(batch({"prompt": "x", "sise": "1"}, method="GET"))
    assert [(number, field) for number, field, _ in found] == [(4, "method"), (4, "body.sise")]


def test_validate_lists_shape_problems_with_other_lines(tmp_path: Path) -> None:
    """Manifest validation names each bad line in any shape, and only those."""
    path = tmp_path / "m.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(SDK_CALL),
                line(prompt="x", timeout=30),
                batch({"prompt": "y", "sise": "1024x1024"}),
                line(prompt="z", n=0),
            ]
        )
        + "\n"
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert [(p.line, p.field) for p in info.value.problems] == [
        (2, "timeout"),
        (3, "body.sise"),
        (4, "n"),
    ]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMETAPI_")}
    return env | {"COMETAPI_KEY": "sk-test", "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}


async def test_a_line_of_openai_python_keyword_arguments_runs(tmp_path: Path) -> None:
    """`cometbatch run` sends images.generate(...) lines with extra_body's fields in the body
    and without the options that ask for nothing; every image lands."""
    # gpt-image-1 refuses fields it does not know (as the API does): its extra_body is empty.
    calls = [
        {**SDK_CALL, "n": 3, "extra_body": {}},
        {"prompt": "A fox", "model": "flux-1.1-pro", "stream": None, "extra_body": {"seed": 7}},
    ]
    manifest = tmp_path / "sdk.jsonl"
    manifest.write_text("".join(json.dumps(call) + "\n" for call in calls))
    out = tmp_path / "out"
    async with Simulator(SimConfig(seed=3)) as sim:
        code, stdout, stderr = await cli_bytes(
            "run", str(manifest), "--out", str(out), "--base-url", sim.base_url, "--json",
            env=cli_env(),
        )  # fmt: skip
        bodies = [entry["body"] for entry in sim.stats.requests_log]
    assert code == 0, stderr.decode()
    assert json.loads(stdout)["complete"]
    assert sum(body.get("n", 1) for body in bodies) == 4
    unsent = {"extra_body", "stream", "partial_images", "extra_headers", "extra_query"}
    assert all(body.keys().isdisjoint(unsent) for body in bodies)
    assert [body.get("seed") for body in bodies if body["model"] == "flux-1.1-pro"] == [7]
    sizes = {body["size"] for body in bodies if body["model"] == "gpt-image-1"}
    assert sizes == {"1024x1536"}
    images = sorted(p.name for p in (out / "images").rglob("*") if p.is_file())
    assert len(images) == 4 and images.count("0.webp") == 1


async def test_refused_shapes_exit_2_naming_line_and_field(tmp_path: Path) -> None:
    """A streaming line and a Batch body typo stop the run with exit 2, each named."""
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(
        line(prompt="x", model="gpt-image-1", stream=True)
        + "\n"
        + batch({"prompt": "y", "sise": "1024x1024"})
        + "\n"
    )
    code, _, stderr_bytes = await cli_bytes(
        "run", str(manifest), "--simulate", "--out", str(tmp_path / "out"), env=cli_env()
    )
    stderr = stderr_bytes.decode()
    assert code == 2, stderr
    assert "line 1, field 'stream'" in stderr
    assert "line 2, field 'body.sise': unknown field (did you mean 'size'?)" in stderr
    assert "Traceback" not in stderr
