"""The fast manifest check: each line decoded once, the full model run once per distinct set of
request fields, and every answer (job, error, total) the same as the full model's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from cometbatch import Job, Manifest, ManifestError, ModelRegistry, load_manifest
from cometbatch.manifest import lines as manifestlines
from cometbatch.manifest.job import JobDefaults
from cometbatch.manifest.lines import parse_line
from cometbatch.paths import PLAIN_COMPONENT, _renamed, safe_component

REGISTRY = ModelRegistry()
DALL_E_3 = {"model": "dall-e-3", "size": "1024x1024", "quality": "hd"}
GPT_IMAGE = {"model": "gpt-image-1", "n": 2, "output_format": "jpeg", "output_compression": 50}
BATCH = {"method": "POST", "url": "/v1/images/generations"}


def line(**fields: Any) -> str:
    return json.dumps(fields)


def batch(custom_id: Any = "b", *, metadata: Any = None, **body: Any) -> str:
    data: dict[str, Any] = {"custom_id": custom_id, **BATCH, "body": body}
    if metadata is not None:
        data["metadata"] = metadata
    return json.dumps(data)


# A line after one that taught the cache its request fields: good lines, and each way a line
# of the same request fields can go wrong (prompt, id, metadata, numbers, shapes, JSON).
CASES: dict[str, str] = {
    "same fields": line(id="b", prompt="y", **DALL_E_3),
    "no id": line(prompt="y", **DALL_E_3),
    "null id": line(id=None, prompt="y", **DALL_E_3),
    "int id": line(id=42, prompt="y", **DALL_E_3),
    "metadata": line(id="b", prompt="y", metadata={"k": [1, 2]}, **DALL_E_3),
    "fields in another order": line(quality="hd", size="1024x1024", model="dall-e-3", prompt="y"),
    "blank prompt": line(id="b", prompt=" \t ", **DALL_E_3),
    "empty prompt": line(id="b", prompt="", **DALL_E_3),
    "prompt too long": line(id="b", prompt="x" * 4001, **DALL_E_3),
    "prompt with a lone surrogate": '{"id": "b", "prompt": "a\\ud800", "model": "dall-e-3", '
    '"size": "1024x1024", "quality": "hd"}',
    "prompt not text": line(id="b", prompt=5, **DALL_E_3),
    "prompt null": line(id="b", prompt=None, **DALL_E_3),
    "no prompt": line(id="b", **DALL_E_3),
    "empty id": line(id="", prompt="y", **DALL_E_3),
    "id too long": line(id="i" * 257, prompt="y", **DALL_E_3),
    "id true": line(id=True, prompt="y", **DALL_E_3),
    "id a float": line(id=1.5, prompt="y", **DALL_E_3),
    "id with a lone surrogate": '{"id": "a\\udc00", "prompt": "y", "model": "dall-e-3", '
    '"size": "1024x1024", "quality": "hd"}',
    "id unsafe in a file name": line(id="../a b", prompt="y", **DALL_E_3),
    "metadata null": line(id="b", prompt="y", metadata=None, **DALL_E_3),
    "metadata a list": line(id="b", prompt="y", metadata=[1], **DALL_E_3),
    "n true": line(id="b", prompt="y", **{**GPT_IMAGE, "n": True}),
    "n a whole float": line(id="b", prompt="y", **{**GPT_IMAGE, "n": 2.0}),
    "compression true": line(id="b", prompt="y", **{**GPT_IMAGE, "output_compression": True}),
    "compression a float": line(id="b", prompt="y", **{**GPT_IMAGE, "output_compression": 50.0}),
    "size the model lacks": line(id="b", prompt="y", **{**DALL_E_3, "size": "512x512"}),
    "unknown field": line(id="b", prompt="y", sise="1024x1024", **DALL_E_3),
    "extra": line(id="b", prompt="y", extra={"seed": 1}, **DALL_E_3),
    "extra sets n": line(id="b", prompt="y", extra={"n": 2}, **DALL_E_3),
    "extra null": line(id="b", prompt="y", extra=None, **DALL_E_3),
    "stream": line(id="b", prompt="y", stream=True, **DALL_E_3),
    "extra_body": line(id="b", prompt="y", extra_body={"seed": 1}, **DALL_E_3),
    "batch": batch(prompt="y", **DALL_E_3),
    "batch without custom_id": batch(None, prompt="y", **DALL_E_3),
    "batch metadata": batch(prompt="y", metadata={"k": 1}, **DALL_E_3),
    "batch metadata null": '{"custom_id": "b", "method": "POST", "body": {"prompt": "y"}, '
    '"metadata": null}',
    "batch with an id in its body": batch(id="x", prompt="y", **DALL_E_3),
    "batch by GET": json.dumps({"custom_id": "b", "method": "GET", "body": {"prompt": "y"}}),
    "batch with a blank prompt": batch(prompt=" ", **DALL_E_3),
    "batch id a number": batch(7, prompt="y", **DALL_E_3),
    "batch body a list": json.dumps({"custom_id": "b", "body": []}),
    "trailing space": line(id="b", prompt="y", **DALL_E_3) + "  \u3000",
    "trailing garbage": line(id="b", prompt="y", **DALL_E_3) + " x",
    "leading space": "  " + line(id="b", prompt="y", **DALL_E_3),
    "broken JSON": '{"id": "b", "prompt": "y"',
    "NaN": '{"id": "b", "prompt": "y", "metadata": {"v": NaN}}',
    "a huge number": '{"id": "b", "prompt": "y", "metadata": {"v": 1e999}}',
    "nested too deep": '{"id": "b", "prompt": "y", "metadata": ' + "[" * 120 + "]" * 120 + "}",
    "a list": "[1, 2]",
    "comment": "# a comment",
    "blank": "   ",
}
TEACHERS = ("dall-e-3", "gpt-image-1")


def expected(text: str, number: int, defaults: JobDefaults) -> Job | list[Any] | None:
    """What the full model makes of a line: its Job, None, or its problems."""
    try:
        return parse_line(text, number, defaults=defaults, registry=REGISTRY)
    except ManifestError as exc:
        return [(p.line, p.field, p.message) for p in exc.problems]


def same_job(got: Job, want: Job) -> None:
    assert got == want
    assert got.model_fields_set == want.model_fields_set
    assert repr(got) == repr(want)
    assert got.model_dump_json() == want.model_dump_json()


FILLED = JobDefaults(model="dall-e-3", size="1024x1024")


@pytest.mark.parametrize("defaults", [JobDefaults(), FILLED])
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_line_after_its_fields_were_learnt_gets_the_full_models_answer(
    tmp_path: Path, case: str, teacher: str, defaults: JobDefaults
) -> None:
    """After a line of the same request fields, each line gets the very job, error (line,
    field, message) and totals that the full model gives it on its own."""
    text = CASES[case]
    fields = DALL_E_3 if teacher == "dall-e-3" else GPT_IMAGE
    taught = [line(id="a1", prompt="x", **fields), line(id="a2", prompt="x2", **fields)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([*taught, text]) + "\n", encoding="utf-8")
    first = [expected(taught[0], 1, defaults), expected(taught[1], 2, defaults)]
    want = expected(text, 3, defaults)
    manifest = Manifest(path, defaults=defaults, registry=REGISTRY)
    if isinstance(want, list):
        with pytest.raises(ManifestError) as info:
            manifest.validate()
        assert [(p.line, p.field, p.message) for p in info.value.problems] == want
        with pytest.raises(ManifestError) as again:
            list(manifest)
        assert [(p.line, p.field, p.message) for p in again.value.problems] == want
        return
    stats = manifest.validate()
    jobs = [job for job in (*first, want) if isinstance(job, Job)]
    assert stats.jobs == len(jobs)
    assert stats.images == sum(job.n for job in jobs)
    for got, job in zip(manifest, jobs, strict=True):
        same_job(got, job)


def test_each_line_is_decoded_once_and_validated_once_per_set_of_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking and then reading 3,000 lines of three sets of request fields runs the full
    model three times in all (the reading pass reuses what the check learnt), and decodes
    each line once per pass."""
    calls = {"full": 0, "decoded": 0}
    full, decode = manifestlines.job_from_fields, manifestlines.SCAN

    def counted_full(*args: Any, **kwargs: Any) -> Job:
        calls["full"] += 1
        return full(*args, **kwargs)

    def counted_decode(text: str, at: int) -> Any:
        calls["decoded"] += 1
        return decode(text, at)

    monkeypatch.setattr("cometbatch.manifest._shapecache.job_from_fields", counted_full)
    monkeypatch.setattr("cometbatch.manifest._fastcheck._SCAN", counted_decode)
    monkeypatch.setattr("cometbatch.manifest._shapecache._SCAN", counted_decode)
    fields: list[dict[str, Any]] = [DALL_E_3, GPT_IMAGE, {"model": "dall-e-2", "n": 3}]
    lines = [line(id=f"j{i}", prompt=f"p{i}", **fields[i % 3]) for i in range(2_001)]
    lines += [batch(f"b{i}", prompt=f"q{i}", **fields[i % 3]) for i in range(999)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest = load_manifest(path, registry=REGISTRY)
    assert calls == {"full": 3, "decoded": 3_000}
    assert manifest.stats.jobs == 3_000
    assert manifest.stats.images == 1_000 * (1 + 2 + 3)
    assert manifest.stats.requests == 1_000 * (1 + 1 + 1)
    calls.update(full=0, decoded=0)
    jobs = list(manifest)
    assert calls == {"full": 0, "decoded": 3_000}
    assert [job.id for job in jobs] == [f"j{i}" for i in range(2_001)] + [
        f"b{i}" for i in range(999)
    ]


def test_not_utf8_is_named_before_the_fields_are_looked_at(tmp_path: Path) -> None:
    """A line of known fields holding bytes that are not UTF-8 is still 'not UTF-8 text'."""
    path = tmp_path / "m.jsonl"
    good = line(id="a", prompt="x", **DALL_E_3).encode()
    bad = good.replace(b'"a"', b'"b"').replace(b'"x"', b'"x\xff"')
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert [(p.line, p.field, p.message) for p in info.value.problems] == [
        (2, None, "not UTF-8 text")
    ]


@pytest.mark.parametrize(
    "name",
    ["a", "A-b_c.9", "con1", "com0", "x" * 80, "x" * 81, ".a", "a.", "CON", "con.txt", "Lpt9.x",
     "a b", "é", "a/b", "..", "-", "_", "a\n", "K", "\u017f", "\u212a"],
)  # fmt: skip
def test_a_plain_id_is_its_own_folder_name(name: str) -> None:
    """The one-regex test for a plain id agrees with safe_component's steps: it lets through
    exactly the names those steps keep as they are."""
    assert bool(PLAIN_COMPONENT.fullmatch(name)) == (_renamed(name) == name)
    assert safe_component(name) == _renamed(name)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_the_recorded_sha256_is_the_files_bytes_after_a_byte_order_mark(
    tmp_path: Path, suffix: str
) -> None:
    """The sha256 a run records is that of the file's bytes (a leading BOM left out), however
    the lines are hashed: CRLF endings, records over several lines, long lines, many lines."""
    if suffix == ".jsonl":
        rows = [line(id=f"j{i}", prompt=f"p{i} " + "w" * (i % 7) * 600) for i in range(1500)]
    elif suffix == ".csv":
        rows = ["prompt,id", *(f'"p{i}\r\nsecond line",c{i}' for i in range(1500))]
    else:
        rows = [f"prompt {i} é" for i in range(1500)]
    body = ("\r\n".join(rows) + "\r\n").encode()
    path = tmp_path / f"m{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body)
    manifest = load_manifest(path)
    assert manifest.stats.jobs == 1500
    assert manifest.sha256 == hashlib.sha256(body).hexdigest()
