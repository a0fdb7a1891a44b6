"""Text and CSV inputs: the same jobs, ids and line/field errors as JSONL manifests."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cometbatch import ConfigError, Job, Manifest, ManifestError, ModelRegistry, load_manifest
from cometbatch.manifest.inputs import CsvJobs, TextPrompts, input_format
from cometbatch.manifest.job import JobDefaults
from cometbatch.manifest.lines import job_from_data, parse_line

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ModelRegistry()


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path, **options: Any) -> list[tuple[int, str | None, str]]:
    """(line, field, message) of each problem load_manifest reports."""
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **options)
    return [(p.line, p.field, p.message) for p in info.value.problems]


def build(data: dict[str, Any], line: int) -> Job:
    return job_from_data(data, line, registry=REGISTRY)


# --- plain text -------------------------------------------------------------------------


def test_a_text_file_is_one_prompt_per_line(tmp_path: Path) -> None:
    """Each line is a trimmed prompt; blank lines and '#' lines are skipped."""
    path = write(tmp_path / "p.txt", "# my prompts\nA red fox\n\n   \n  A snowy owl  \r\n#skip\n")
    manifest = load_manifest(path)
    assert manifest.format == "txt"
    assert [job.prompt for job in manifest] == ["A red fox", "A snowy owl"]
    assert manifest.stats.jobs == 2


def test_text_lines_take_model_size_and_n_from_the_defaults(tmp_path: Path) -> None:
    """--model, --size and --n (JobDefaults) apply to every line of a text file."""
    path = write(tmp_path / "p.txt", "a\nb\n")
    for manifest in (
        load_manifest(path, model="dall-e-2", size="256x256", n=3),
        load_manifest(path, defaults=JobDefaults(model="dall-e-2", size="256x256", n=3)),
    ):
        assert {(j.model, j.size, j.n) for j in manifest} == {("dall-e-2", "256x256", 3)}
        assert manifest.stats.images == 6


def test_defaults_and_model_options_do_not_mix(tmp_path: Path) -> None:
    """Passing JobDefaults together with model/size/n is a programming error."""
    with pytest.raises(TypeError):
        load_manifest(write(tmp_path / "p.txt", "a\n"), model="x", defaults=JobDefaults())


def test_text_ids_are_stable_and_match_the_jsonl_equivalent(tmp_path: Path) -> None:
    """A text line gets the id the same JSONL line would, so reruns resume."""
    txt = write(tmp_path / "p.txt", "A red fox\n")
    jsonl = write(tmp_path / "p.jsonl", json.dumps({"prompt": "A red fox", "n": 2}) + "\n")
    (first,) = load_manifest(txt, model="gpt-image-1")
    (again,) = load_manifest(txt, model="gpt-image-1")
    (same,) = load_manifest(jsonl, model="gpt-image-1")
    assert first.id == again.id == same.id
    assert len(first.id) == 16


def test_text_errors_name_the_line_and_field(tmp_path: Path) -> None:
    """A prompt too long for the model is reported on its line, with field 'prompt'."""
    path = write(tmp_path / "p.txt", "fine\n# comment\n" + "x" * 1001 + "\nfine too\n")
    ((line, field, message),) = problems(path, model="dall-e-2")
    assert (line, field) == (3, "prompt")
    assert "at most 1000" in message


def test_a_default_the_model_cannot_take_fails_each_line(tmp_path: Path) -> None:
    """A --size the model cannot take is reported on every line, naming 'size'."""
    path = write(tmp_path / "p.txt", "a\nb\n")
    found = problems(path, model="dall-e-3", size="256x256")
    assert [(line, field) for line, field, _ in found] == [(1, "size"), (2, "size")]


def test_repeated_prompts_are_duplicate_ids(tmp_path: Path) -> None:
    """The same prompt twice names the line that had it first (ask for more with --n)."""
    path = write(tmp_path / "p.txt", "a\nb\na\n")
    ((line, field, message),) = problems(path)
    assert (line, field) == (3, "id")
    assert "already used on line 1" in message


def test_a_jsonl_file_named_txt_is_refused(tmp_path: Path) -> None:
    """A JSON object line in a text file is an error, not a prompt sent (and paid for)."""
    path = write(tmp_path / "p.txt", 'a cat\n{"prompt": "a dog", "n": 2}\n')
    ((line, field, message),) = problems(path)
    assert (line, field) == (2, None)
    assert ".jsonl" in message
    only_json = write(tmp_path / "only.txt", '{"prompt": "a dog"}\n')
    (loaded,) = load_manifest(only_json, format="jsonl")
    assert loaded.prompt == "a dog"
    braces = write(tmp_path / "braces.txt", "{a poster with curly braces}\n")
    assert [j.prompt for j in load_manifest(braces)] == ["{a poster with curly braces}"]


def test_undecodable_text_names_its_line(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 fail their own line of a text file."""
    path = write(tmp_path / "p.txt", b"ok\ncaf\xe9\nfine\n")
    assert problems(path) == [(2, None, "not UTF-8 text")]


# --- CSV --------------------------------------------------------------------------------


def test_csv_columns_become_job_fields(tmp_path: Path) -> None:
    """Every job field can be a column; metadata.<k> and extra.<k> fill those objects."""
    path = write(
        tmp_path / "p.csv",
        "id,prompt,model,n,size,quality,output_format,output_compression,background,"
        "moderation,user,metadata.sku,extra.seed,extra.watermark,extra.cfg\n"
        "mug,A mug,gpt-image-1,3,1024x1024,low,webp,80,opaque,low,u1,007,42,false,7.5\n",
    )
    (job,) = load_manifest(path)
    assert (job.id, job.prompt, job.model, job.n, job.size, job.quality) == (
        "mug",
        "A mug",
        "gpt-image-1",
        3,
        "1024x1024",
        "low",
    )
    assert (job.output_format, job.output_compression, job.background, job.moderation) == (
        "webp",
        80,
        "opaque",
        "low",
    )
    assert job.user == "u1"
    assert job.metadata == {"sku": "007"}
    assert job.extra == {"seed": 42, "watermark": False, "cfg": 7.5}


def test_a_csv_row_is_the_same_job_as_its_jsonl_line(tmp_path: Path) -> None:
    """Empty cells are absent fields; the job (and its derived id) equals the JSONL one."""
    csv_path = write(
        tmp_path / "p.csv",
        "prompt,model,n,size,quality,metadata.sku\n"
        "A plate,dall-e-2,2,256x256,,P-1\n"
        "A bowl,,,,hd,\n",
    )
    lines = [
        {
            "prompt": "A plate",
            "model": "dall-e-2",
            "n": 2,
            "size": "256x256",
            "metadata": {"sku": "P-1"},
        },
        {"prompt": "A bowl", "quality": "hd"},
    ]
    jsonl = write(tmp_path / "p.jsonl", "\n".join(map(json.dumps, lines)) + "\n")
    assert list(load_manifest(csv_path)) == list(load_manifest(jsonl))


def test_defaults_fill_empty_csv_cells(tmp_path: Path) -> None:
    """--model/--size/--n apply where a CSV row leaves the cell empty."""
    path = write(tmp_path / "p.csv", "prompt,model,size\na,,\nb,dall-e-3,1024x1792\n")
    jobs = list(load_manifest(path, model="dall-e-2", size="512x512", n=2))
    assert [(j.model, j.size, j.n) for j in jobs] == [
        ("dall-e-2", "512x512", 2),
        ("dall-e-3", "1024x1792", 2),
    ]


def test_errors_name_the_physical_line_after_multi_line_cells(tmp_path: Path) -> None:
    """A quoted prompt over several lines counts them, so later errors name the right line."""
    path = write(
        tmp_path / "p.csv",
        'prompt,size\n"A long\nprompt over\nthree lines",1024x1024\nok,1024x1024\nbad,640x480\n',
    )
    ((line, field, message),) = problems(path)
    assert (line, field) == (6, "size")
    assert "does not take size '640x480'" in message


def test_each_csv_record_is_read_once_per_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A good CSV is split into records and their cells in one reading: parse() never reads
    a record again, whether the manifest is checked or streamed."""
    read_again: list[int] = []
    reread = CsvJobs._row

    def counted(self: CsvJobs, text: str, line: int) -> list[str]:
        read_again.append(line)
        return reread(self, text, line)

    monkeypatch.setattr(CsvJobs, "_row", counted)
    rows = "".join(f'"p{i}\nover two lines",1024x1024,{i}\n' for i in range(50))
    path = write(tmp_path / "p.csv", f"prompt,size,metadata.k\n{rows}")
    manifest = load_manifest(path)
    jobs = list(manifest)
    assert [job.metadata for job in jobs] == [{"k": str(i)} for i in range(50)]
    assert read_again == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prompt,sise\na,b\n", [(1, "sise", "did you mean 'size'?")]),
        ("Prompt\na\n", [(1, "Prompt", "did you mean 'prompt'?"), (1, "prompt", "no 'prompt'")]),
        ("sku,prompt\nA1,a\n", [(1, "sku", "'metadata.sku'")]),
        ("id,prompt,id\nx,a,y\n", [(1, "id", "column 3 repeats column 1")]),
        ("prompt,metadata.\na,b\n", [(1, "metadata.", "no key after the dot")]),
        ("prompt,n\na,two\n", [(2, "n", "valid integer")]),
        ("prompt,n\na,0\n", [(2, "n", "greater than or equal to 1")]),
        ("prompt,model,quality\na,dall-e-3,low\n", [(2, "quality", "does not take quality")]),
        ("prompt,model\n,dall-e-2\n", [(2, "prompt", "Field required")]),
        ("prompt,size\na,1024x1024,extra\n", [(2, None, "3 values, but the header names 2")]),
        ("prompt,\na,b\n", [(2, None, "a value in column 2, which has no name")]),
        ('prompt\nok\n"never closed\nmore\n', [(3, None, "quoted value is not closed")]),
        ('prompt\n"a"b\nok\n', [(2, None, "not valid CSV")]),
        ("prompt,extra.prompt\na,b\n", [(2, "extra", "must not set prompt")]),
    ],
)
def test_bad_csv_names_line_and_field(
    tmp_path: Path, text: str, expected: list[tuple[int, str | None, str]]
) -> None:
    """Header and row problems name their line and column, as JSONL errors name fields."""
    found = problems(write(tmp_path / "p.csv", text))
    assert [(line, field) for line, field, _ in found] == [(line, f) for line, f, _ in expected]
    for (_, _, message), (_, _, fragment) in zip(found, expected, strict=True):
        assert fragment in message


def test_a_bad_header_is_reported_once_not_per_row(tmp_path: Path) -> None:
    """With a header that cannot be used, only the header's problems are listed."""
    path = write(tmp_path / "p.csv", "promt,size\na,1\nb,2\nc,3\n")
    assert [(line, field) for line, field, _ in problems(path)] == [(1, "promt"), (1, "prompt")]


def test_blank_rows_and_trailing_empty_cells_are_ignored(tmp_path: Path) -> None:
    """Blank lines (before the header too), rows of empty cells and unnamed empty columns."""
    path = write(tmp_path / "p.csv", "\n\nprompt,size,\n\na,,\n,,\nb,1024x1024,,\n")
    manifest = load_manifest(path)
    assert [(j.prompt, j.size) for j in manifest] == [("a", None), ("b", "1024x1024")]


def test_semicolons_tabs_and_a_byte_order_mark_are_understood(tmp_path: Path) -> None:
    """Excel's BOM and semicolon or tab delimiters (decided by the header) all read."""
    semi = write(tmp_path / "s.csv", '\ufeffprompt;n\n"a; b";2\n'.encode())
    tab = write(tmp_path / "t.csv", "prompt\tn\na, b\t2\n")
    for path in (semi, tab):
        (job,) = load_manifest(path)
        assert (job.prompt, job.n) == ("a; b" if path is semi else "a, b", 2)


def test_csv_ids_must_be_unique(tmp_path: Path) -> None:
    """Two rows with one id are refused, naming the first row's line."""
    path = write(tmp_path / "p.csv", "id,prompt\nx,a\ny,b\nX,c\n")
    ((line, field, message),) = problems(path)
    assert (line, field) == (4, "id")
    assert "line 2" in message


def test_undecodable_csv_rows_name_their_line(tmp_path: Path) -> None:
    """A row with bytes that are not UTF-8 fails on its own line."""
    path = write(tmp_path / "p.csv", b"prompt\nok\ncaf\xe9\nfine\n")
    assert problems(path) == [(3, None, "not UTF-8 text")]


# --- picking the reader, streaming, examples -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "format", "expected"),
    [
        ("a.jsonl", None, "jsonl"),
        ("a.json", None, "jsonl"),
        ("a.ndjson", None, "jsonl"),
        ("a", None, "jsonl"),
        ("a.manifest", None, "jsonl"),
        ("a.TXT", None, "txt"),
        ("a.Csv", None, "csv"),
        ("a.txt", "jsonl", "jsonl"),
        ("a.data", "csv", "csv"),
    ],
)
def test_the_reader_follows_the_suffix_unless_told(
    name: str, format: str | None, expected: str
) -> None:
    """.txt and .csv pick their readers; anything else is JSONL; format= overrides."""
    assert input_format(Path(name), format) == expected


def test_an_unknown_format_is_a_config_error(tmp_path: Path) -> None:
    """Asking for a format cometbatch does not read is a ConfigError."""
    with pytest.raises(ConfigError, match="formats: jsonl, txt, csv"):
        Manifest(tmp_path / "a.xml", format="xml")


def numbered_forever(first: str, row: str) -> Iterator[tuple[int, str]]:
    """An endless file: a first line, then the same row again and again."""
    yield 1, first
    for number in itertools.count(2):
        yield number, row.replace("N", str(number))


def test_readers_stream_without_reading_ahead() -> None:
    """Records come out as lines go in: an endless input yields its first jobs at once."""
    text = TextPrompts(build)
    got = itertools.islice(text.records(numbered_forever("a\n", "prompt N\n")), 3)
    assert [text.parse(t, n).prompt for n, t in got] == ["a", "prompt 2", "prompt 3"]  # type: ignore[union-attr]
    table = CsvJobs(build)
    records = itertools.islice(table.records(numbered_forever("id,prompt\n", "jN,p N\n")), 3)
    jobs = [table.parse(t, n) for n, t in records]
    assert [job.id if job else None for job in jobs] == [None, "j2", "j3"]


def test_the_example_inputs_are_valid() -> None:
    """jobs/prompts.txt, jobs/products.csv and jobs/openai-batch.jsonl load as documented."""
    text = load_manifest(ROOT / "jobs" / "prompts.txt", model="gpt-image-1-mini", n=2)
    assert text.stats.jobs >= 3 and text.stats.images == 2 * text.stats.jobs
    table = load_manifest(ROOT / "jobs" / "products.csv")
    assert 3 <= table.stats.jobs <= 8
    assert all(job.metadata.get("sku") for job in table)
    batch = load_manifest(ROOT / "jobs" / "openai-batch.jsonl")
    assert 3 <= batch.stats.jobs <= 8
    # Some Batch lines ask for more images than their model takes per request.
    assert batch.stats.requests > batch.stats.jobs
    raw = (ROOT / "jobs" / "openai-batch.jsonl").read_text().splitlines()
    assert all(json.loads(line)["url"] == "/v1/images/generations" for line in raw)


def test_jsonl_parsing_is_unchanged() -> None:
    """parse_line still validates through the shared job_from_data."""
    job = parse_line(json.dumps({"prompt": "x", "model": "dall-e-2"}), 1, registry=REGISTRY)
    assert job == build({"prompt": "x", "model": "dall-e-2"}, 1)
