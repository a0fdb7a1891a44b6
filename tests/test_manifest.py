"""Manifest loading: fields, defaults, Batch API lines, and errors that name line and field."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from cometbatch import Job, ManifestError, ModelRegistry, load_manifest
from cometbatch.manifest._iddigests import IdDigests
from cometbatch.manifest.job import JobDefaults
from cometbatch.manifest.lines import parse_line

REGISTRY = ModelRegistry()


def line(**fields: Any) -> str:
    return json.dumps(fields)


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_documented_field_is_accepted() -> None:
    """A line with every manifest field parses into a Job with those values."""
    job = parse_line(
        line(
            id="a",
            prompt="p",
            model="gpt-image-1",
            n=3,
            size="1024x1024",
            quality="high",
            output_format="webp",
            output_compression=50,
            background="opaque",
            moderation="low",
            user="u1",
            extra={"seed": 7},
            metadata={"k": "v"},
        ),
        1,
        registry=REGISTRY,
    )
    assert job is not None
    assert (job.id, job.n, job.output_compression, job.extra, job.metadata) == (
        "a",
        3,
        50,
        {"seed": 7},
        {"k": "v"},
    )


def test_blank_and_comment_lines_are_ignored(tmp_path: Path) -> None:
    """Blank lines and '#' lines do not become jobs."""
    path = write(tmp_path, "# comment", "", line(prompt="x"), "   ")
    manifest = load_manifest(path)
    assert [job.prompt for job in manifest] == ["x"]
    assert manifest.stats.jobs == 1


def test_default_model_is_dall_e_3_and_cli_defaults_fill_gaps() -> None:
    """A line without model gets dall-e-3; CLI defaults apply only where the line is silent."""
    assert parse_line(line(prompt="x"), 1, registry=REGISTRY).model == "dall-e-3"  # type: ignore[union-attr]
    defaults = JobDefaults(model="dall-e-2", size="256x256", n=2)
    job = parse_line(line(prompt="x", n=5), 1, defaults=defaults, registry=REGISTRY)
    assert job is not None
    assert (job.model, job.size, job.n) == ("dall-e-2", "256x256", 5)


def test_default_id_is_stable_and_ignores_n_and_metadata() -> None:
    """The default id depends on what is sent, not on n or metadata, and is 16 hex digits."""
    a = parse_line(line(prompt="x", n=1, metadata={"a": 1}), 1, registry=REGISTRY)
    b = parse_line(line(prompt="x", n=4), 9, registry=REGISTRY)
    c = parse_line(line(prompt="y"), 1, registry=REGISTRY)
    assert a is not None and b is not None and c is not None
    assert a.id == b.id != c.id
    assert len(a.id) == 16


def test_numeric_id_becomes_a_string() -> None:
    """An id written as a number is accepted as its decimal string."""
    job = parse_line(line(prompt="x", id=42), 1, registry=REGISTRY)
    assert job is not None and job.id == "42"


def test_batch_api_line_becomes_a_job() -> None:
    """custom_id becomes id; body fields become job fields; body.extra is passed through."""
    text = json.dumps(
        {
            "custom_id": "req-1",
            "method": "POST",
            "url": "/v1/images/generations",
            "body": {"model": "dall-e-2", "prompt": "p", "n": 2, "extra": {"seed": 5}},
        }
    )
    job = parse_line(text, 1, registry=REGISTRY)
    assert job is not None
    assert (job.id, job.model, job.n, job.extra) == ("req-1", "dall-e-2", 2, {"seed": 5})


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("{not json", None, "invalid JSON"),
        ("[1, 2]", None, "JSON object"),
        (line(model="dall-e-3"), "prompt", "required"),
        (line(prompt="   "), "prompt", "blank"),
        (line(prompt="x", promt="y"), "promt", "did you mean 'prompt'"),
        (line(prompt="x", n=0), "n", "greater than or equal to 1"),
        (line(prompt="x", size="640x480"), "size", "does not take size"),
        (line(prompt="x", model="dall-e-3", quality="low"), "quality", "does not take quality"),
        (line(prompt="x", model="gpt-image-1", response_format="url"), "response_format", "b64"),
        (
            line(prompt="x", model="gpt-image-1", background="transparent", output_format="jpeg"),
            "output_format",
            "needs output_format",
        ),
        (
            line(prompt="x", model="gpt-image-1", output_compression=50),
            "output_compression",
            "needs output_format",
        ),
        (line(prompt="x" * 4001, model="dall-e-3"), "prompt", "at most 4000"),
        (line(prompt="x", extra={"prompt": "y"}), "extra", "must not set prompt"),
        (line(prompt="x", extra=[1]), "extra", "dictionary"),
        (
            json.dumps({"custom_id": "c", "method": "GET", "body": {"prompt": "x"}}),
            "method",
            "POST",
        ),
    ],
)
def test_bad_lines_name_line_and_field(text: str, field: str | None, fragment: str) -> None:
    """Each kind of bad line is reported with its line number, its field and a clear reason."""
    with pytest.raises(ManifestError) as info:
        parse_line(text, 12, registry=REGISTRY)
    (problem,) = info.value.problems
    assert problem.line == 12
    assert problem.field == field
    assert fragment in problem.message


def test_all_bad_lines_are_listed_at_once(tmp_path: Path) -> None:
    """Validation lists every bad line, not just the first."""
    path = write(
        tmp_path,
        line(prompt="ok"),
        "{bad",
        line(prompt="x", n=0),
        line(prompt="x", size="1x1"),
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert [p.line for p in info.value.problems] == [2, 3, 4]
    assert "3 invalid manifest line(s)" in str(info.value)


def test_problem_list_is_capped(tmp_path: Path) -> None:
    """A manifest with many bad lines reports up to the cap and says there are more."""
    path = write(tmp_path, *["{bad"] * 30)
    with pytest.raises(ManifestError) as info:
        load_manifest(path, max_problems=5)
    assert len(info.value.problems) == 5
    assert info.value.truncated


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    """A repeated id (explicit or default) names the line that used it first."""
    path = write(tmp_path, line(prompt="a", id="x"), line(prompt="b"), line(prompt="c", id="x"))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (problem,) = info.value.problems
    assert (problem.line, problem.field) == (3, "id")
    assert "line 1" in problem.message


def test_stats_count_fan_out_per_model(tmp_path: Path) -> None:
    """Stats count jobs, requests after fan-out by max n, and images per model."""
    path = write(
        tmp_path,
        line(prompt="a", model="dall-e-3", n=3),
        line(prompt="b", model="gpt-image-1", n=14),
    )
    stats = load_manifest(path).stats
    assert (stats.jobs, stats.requests, stats.images) == (2, 5, 17)
    assert stats.by_model["gpt-image-1"].requests == 2


def test_missing_file_is_a_manifest_error(tmp_path: Path) -> None:
    """A manifest path that does not exist is a ManifestError, not an OSError."""
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "nope.jsonl")


def test_unknown_model_is_accepted_with_pass_through(tmp_path: Path) -> None:
    """Unknown models are allowed (with max n 1) and their parameters pass unchecked."""
    job = parse_line(line(prompt="x", model="flux-pro", size="640x480"), 1, registry=REGISTRY)
    assert isinstance(job, Job)
    assert REGISTRY.get("flux-pro").max_n == 1


def test_stats_know_the_largest_request(tmp_path: Path) -> None:
    """The largest images-per-request is min(n, model max n) over all jobs."""
    path = write(
        tmp_path,
        line(prompt="a", model="dall-e-3", n=3),
        line(prompt="b", model="dall-e-2", n=4),
        line(prompt="c", model="gpt-image-1", n=1),
    )
    assert load_manifest(path).stats.max_request_images == 4


@pytest.mark.parametrize(
    ("first", "second"),
    [("Cat", "cat"), ("a/b", "a_b-c14cddc0")],
)
def test_ids_sharing_an_image_folder_are_refused(tmp_path: Path, first: str, second: str) -> None:
    """Ids that differ only in case, or map to the same safe folder name, are duplicates."""
    from cometbatch.paths import safe_component

    assert safe_component(first).casefold() == safe_component(second).casefold()
    path = write(tmp_path, line(prompt="a", id=first), line(prompt="b", id=second))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (problem,) = info.value.problems
    assert (problem.line, problem.field) == (2, "id")
    assert f"share an image folder with id {first!r} on line 1" in problem.message


def test_a_model_added_by_override_checks_its_declared_sizes() -> None:
    """A model added with only max_n and sizes passes other params but enforces its sizes."""
    registry = ModelRegistry().with_overrides({"my-model": {"max_n": 4, "sizes": ["512x512"]}})
    ok = parse_line(
        line(prompt="x", model="my-model", size="512x512", extra={"seed": 1}), 1, registry=registry
    )
    assert ok is not None and registry.get("my-model").max_n == 4
    with pytest.raises(ManifestError, match="does not take size"):
        parse_line(line(prompt="x", model="my-model", size="64x64"), 2, registry=registry)


def test_duplicates_are_found_among_many_ids(tmp_path: Path) -> None:
    """Duplicate detection keeps working as its table grows, far into a long manifest."""
    lines = [line(prompt=f"p{i}", id=f"id-{i}") for i in range(5000)]
    path = write(tmp_path, *lines, line(prompt="again", id="id-1234"))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (problem,) = info.value.problems
    assert (problem.line, problem.field) == (5001, "id")
    assert "already used on line 1235" in problem.message


def test_id_digests_name_exactly_the_repeated_ones() -> None:
    """The id digests report every digest noted twice or more, and none noted once, over
    every top-bits list (0 and 2**64 - 1 included)."""
    rng = random.Random(3)
    once = {rng.getrandbits(64) for _ in range(5_000)} | {0, 2**64 - 1, 2**63}
    twice = set(rng.sample(sorted(once), 300)) | {0, 2**64 - 1}
    digests = IdDigests()
    for digest in [*once, *twice, *list(twice)[:10]]:
        digests.add(digest)
    assert len(digests) == len(once) + len(twice) + 10
    assert digests.repeated() == twice
    assert len(digests) == 0  # the lists are given back as they are read


def test_ids_whose_digests_collide_are_not_called_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repeat is confirmed on the ids' folders: two ids that only share a digest load."""
    monkeypatch.setattr("cometbatch.manifest._iddigests.MASK", 0)  # every digest is 0
    path = write(tmp_path, line(prompt="a", id="one"), line(prompt="b", id="two"))
    assert load_manifest(path).stats.jobs == 2
    again = write(tmp_path, line(prompt="a", id="one"), line(prompt="b", id="ONE"))
    with pytest.raises(ManifestError) as info:
        load_manifest(again)
    (problem,) = info.value.problems
    assert (problem.line, problem.field) == (2, "id")
    assert "would share an image folder with id 'one' on line 1" in problem.message


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".csv"])
def test_a_line_over_the_cap_is_named_without_reading_it_whole(tmp_path: Path, suffix: str) -> None:
    """A 24 MiB line (a binary or a log given as a manifest) is a ManifestError naming its
    line, read in pieces: memory stays far below the line's size, earlier problems are kept."""
    path = tmp_path / f"m{suffix}"
    head = "prompt\n" if suffix == ".csv" else ""
    first = line(prompt="ok") if suffix == ".jsonl" else "ok"
    bad = line(prompt="x", n=0) if suffix == ".jsonl" else ""
    with path.open("w", encoding="utf-8") as handle:
        handle.write(f"{head}{first}\n{bad}\n")
        for _ in range(24):
            handle.write("y" * (1 << 20))
        handle.write("\n" + first.replace("ok", "after") + "\n")
    number = 3 + bool(head)
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError) as info:
            load_manifest(path, model="dall-e-3")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    problems = info.value.problems
    assert problems[-1].line == number and "longer than" in problems[-1].message
    if suffix == ".jsonl":
        assert [p.line for p in problems] == [2, 3]
    assert peak < 8 << 20


def test_a_repeated_id_before_a_line_over_the_cap_is_named_with_it(tmp_path: Path) -> None:
    """A repeated id and a later line too long to read are both reported: naming the repeat's
    first line does not read up to the long line again."""
    path = tmp_path / "m.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        handle.write(f"{line(prompt='a', id='x')}\n{line(prompt='b', id='x')}\n")
        handle.write("y" * (2 << 20) + "\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert [(p.line, p.field) for p in info.value.problems] == [(2, "id"), (3, None)]
    assert "already used on line 1" in info.value.problems[0].message
