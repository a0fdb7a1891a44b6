"""Messages a person can act on, and the foot-guns they guard: what each says, and that a
refusal comes before anything is written or sent."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ValidationError, field_validator
from support import no_sleep, run_all, settings_for

from cometbatch import (
    AuthenticationError,
    Engine,
    Job,
    ManifestError,
    ManifestFileError,
    Settings,
    SimConfig,
    Simulator,
    Summary,
    load_manifest,
)
from cometbatch.cli.main import main
from cometbatch.cli.report import fit_lines, summary_lines
from cometbatch.costs.budget import PlanFit
from cometbatch.engine.origin import other_manifest
from cometbatch.validation import first_problem, plain_message, problems

# What pydantic's own rendering of an error leaks; none of it may reach a person.
PYDANTIC_INTERNALS = ("Value error,", "Assertion failed,", "errors.pydantic.dev", "pydantic")


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


def write_jobs(path: Path, *jobs: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def assert_plain(text: str) -> None:
    for leak in PYDANTIC_INTERNALS:
        assert leak not in text, text


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=1, content_policy_marker="FORBIDDEN")) as server:
        yield server


# -- pydantic's errors in plain words ----------------------------------------------------------


class _Checked(BaseModel):
    size: int
    name: str = "x"

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is blank")
        return value


def test_a_pydantic_error_becomes_where_and_what_without_prefixes() -> None:
    """Each problem names its field (renamed as typed) and says what is wrong, nothing else."""
    with pytest.raises(ValidationError) as info:
        _Checked.model_validate({"size": "big", "name": " "})
    found = problems(info.value, {"size": "--size"})
    assert [str(p) for p in found] == [
        "--size: Input should be a valid integer, unable to parse string as an integer",
        "name: is blank",
    ]
    assert first_problem(info.value).where == "size"
    assert plain_message({"msg": "Assertion failed, too big"}) == "too big"  # type: ignore[typeddict-item]


@pytest.mark.parametrize(
    ("files", "args", "named"),
    [
        # A Settings validator (a fixed concurrency below its minimum).
        ({}, ["--concurrency", "4", "--min-concurrency", "8"], "min_concurrency"),
        # A models file entry, a per-model override, a price file and a settings file.
        ({"m.toml": "[models.flux]\nmax_n = -1\n"}, ["--models", "m.toml"], "models.flux.max_n"),
        ({}, ["--model-override", "dall-e-2.max_n=-1"], "max_n"),
        (
            {"p.toml": '[models.qwen-image]\nper_image = "free"\n'},
            ["--prices", "p.toml"],
            "models.qwen-image",
        ),
        # A validator of a price entry (its date).
        (
            {"p.toml": '[models.qwen-image]\nas_of = "2026-99-99"\n'},
            ["--prices", "p.toml"],
            "models.qwen-image.as_of: must be a date",
        ),
        ({"c.toml": 'rpm = "fast"\n'}, ["--config", "c.toml"], "'rpm'"),
    ],
)
def test_no_setting_error_shows_pydantic_internals(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    files: dict[str, str],
    args: list[str],
    named: str,
) -> None:
    """A bad setting from any source is one plain line naming it: no prefixes, no links."""
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    manifest = write_jobs(tmp_path / "m.jsonl", {"prompt": "a fox"})
    code, stdout, stderr = invoke("run", str(manifest), "--dry-run", *args)
    assert code == 2, stdout + stderr
    assert named in stderr
    assert_plain(stderr)


def test_a_manifest_line_error_shows_no_pydantic_internals(tmp_path: Path) -> None:
    """A validator's refusal and a type error read as plain text naming line and field."""
    manifest = write_jobs(tmp_path / "m.jsonl", {"prompt": "  "}, {"prompt": "x", "n": "many"})
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    shown = "\n".join(info.value.lines())
    assert "line 1, field 'prompt': prompt is blank" in shown
    assert "line 2, field 'n'" in shown
    assert_plain(shown)


# -- item by item --------------------------------------------------------------------------------


def test_nothing_sent_with_kept_failures_says_how_many_and_how_to_retry(tmp_path: Path) -> None:
    """Done but for earlier permanent failures: not "everything was already done", but how
    many failed and the flag that tries them again."""
    summary = Summary(planned_requests=3, skipped_requests=2, skipped_images=2, kept_failures=1)
    lines = summary_lines(summary, tmp_path)
    assert not any("everything was already done" in line for line in lines)
    assert any("1 request(s) failed permanently" in line for line in lines)
    assert any("--retry-failed" in line for line in lines)
    done = Summary(planned_requests=2, skipped_requests=2, skipped_images=2)
    assert summary_lines(done, tmp_path)[0].startswith("everything was already done")


async def test_a_rerun_keeping_a_refused_prompt_names_it_in_the_summary(
    sim: Simulator, tmp_path: Path
) -> None:
    """End to end: a content-policy refusal is kept on the rerun, and the summary says so."""
    jobs = [Job(id="ok", prompt="a fox"), Job(id="no", prompt="a FORBIDDEN fox")]
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, jobs)
    async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
        await run_all(engine, jobs)
    text = "\n".join(summary_lines(engine.summary, tmp_path))
    assert "1 request(s) failed permanently" in text and "--retry-failed" in text


def test_a_missing_manifest_is_file_not_found_naming_the_path(tmp_path: Path) -> None:
    """One line, "file not found: PATH", not a list of bad lines with a line 0."""
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ManifestFileError) as info:
        load_manifest(missing)
    assert info.value.lines() == [f"file not found: {missing}"]
    code, stdout, stderr = invoke("run", str(missing), "--dry-run", "--json")
    assert code == 2
    assert f"file not found: {missing}" in stderr
    assert json.loads(stdout)["error"] == f"file not found: {missing}"
    assert "line 0" not in stderr and "invalid manifest line" not in stderr


def test_every_repeat_of_an_id_is_named(tmp_path: Path) -> None:
    """An id used three times names both repeats, each pointing at the first line."""
    manifest = write_jobs(
        tmp_path / "m.jsonl",
        {"id": "a", "prompt": "one"},
        {"id": "b", "prompt": "two"},
        {"id": "a", "prompt": "three"},
        {"id": "a", "prompt": "four"},
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    assert [(p.line, p.field) for p in info.value.problems] == [(3, "id"), (4, "id")]
    assert all("already used on line 1" in p.message for p in info.value.problems)


def test_an_unknown_field_points_to_extra_with_its_value(tmp_path: Path) -> None:
    """A field no job has is shown the way to the API through `extra`; a near miss is a typo."""
    manifest = write_jobs(
        tmp_path / "m.jsonl", {"prompt": "x", "seed": 7}, {"prompt": "x", "qualty": "hd"}
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    seed, typo = info.value.problems
    assert (seed.line, seed.field) == (1, "seed")
    assert "not a request field cometbatch knows" in seed.message
    assert 'put it in extra: {"extra": {"seed": 7}}' in seed.message
    assert typo.message == "unknown field (did you mean 'quality'?)"


def test_an_unknown_csv_column_points_to_extra_and_metadata(tmp_path: Path) -> None:
    """A CSV column no job has is shown both ways it can go: to the API, or into the ledger."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,seed\na fox,7\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    (problem,) = info.value.problems
    assert problem.field == "seed"
    assert "'extra.seed' to send it to the API" in problem.message
    assert "'metadata.seed'" in problem.message


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--rate-429", "1.5"], "--rate-429"),
        (["--rate-429", "0.6", "--rate-5xx", "0.6"], "add up to 1.2, more than 1"),
    ],
)
def test_simulate_names_the_option_it_refuses(args: list[str], named: str) -> None:
    """A fault rate out of range names its option; rates adding up past 1 say so; exit 2."""
    code, _, stderr = invoke("simulate", "--port", "0", *args)
    assert code == 2
    assert named in stderr
    assert_plain(stderr)


def test_simulate_and_base_url_together_are_refused(tmp_path: Path) -> None:
    """--simulate would silently ignore --base-url: exit 2, a plain message, nothing written."""
    manifest = write_jobs(tmp_path / "m.jsonl", {"prompt": "x"})
    out = tmp_path / "out"
    code, _, stderr = invoke(
        "run",
        str(manifest),
        "--simulate",
        "--base-url",
        "https://example.com/v1",
        "--out",
        str(out),
    )
    assert code == 2
    assert "--simulate and --base-url cannot be used together" in stderr
    assert not out.exists()


def test_an_empty_out_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--out "" would write into the current folder: exit 2 naming --out, nothing written."""
    monkeypatch.chdir(tmp_path)
    manifest = write_jobs(tmp_path / "m.jsonl", {"prompt": "x"})
    code, _, stderr = invoke("run", str(manifest), "--simulate", "--out", "")
    assert code == 2
    assert "--out" in stderr and "empty" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


# -- another manifest into the same folder ---------------------------------------------------------


class _SentSoFar(logging.Handler):
    """Records, with each warning, how many requests the simulator had answered by then."""

    def __init__(self, sim: Simulator) -> None:
        super().__init__(logging.WARNING)
        self.sim = sim
        self.seen: list[tuple[str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), self.sim.stats.requests))


async def test_a_run_of_another_manifest_into_a_folder_warns_before_sending(
    sim: Simulator, tmp_path: Path
) -> None:
    """The warning names the folder's manifest and what the new one pays for, and comes
    before this run's first request; the same manifest again (or edited) gives none."""
    first = write_jobs(tmp_path / "cats.jsonl", {"id": "c", "prompt": "a cat"})
    other = write_jobs(
        tmp_path / "dogs.jsonl",
        {"id": "c", "prompt": "a cat"},
        {"id": "d", "prompt": "a dog", "model": "dall-e-2", "n": 3},
        {"id": "e", "prompt": "an eel"},
    )
    out = tmp_path / "out"
    handler = _SentSoFar(sim)
    logger = logging.getLogger("cometbatch")
    logger.addHandler(handler)
    try:
        for manifest in (first, first):
            async with Engine(settings_for(sim), out_dir=out, sleep=no_sleep) as engine:
                await run_all(engine, load_manifest(manifest))
        assert handler.seen == []
        sent = sim.stats.requests
        async with Engine(settings_for(sim), out_dir=out, sleep=no_sleep) as engine:
            await run_all(engine, load_manifest(other))
    finally:
        logger.removeHandler(handler)
    warnings = [(text, count) for text, count in handler.seen if "another manifest" in text]
    assert len(warnings) == 1
    text, count = warnings[0]
    assert count == sent
    assert f"({first})" in text
    assert f"{other} adds 2 new job(s) to it: 2 request(s), 4 image(s) to pay for" in text
    assert "about $" in text


def test_the_dry_run_says_the_folder_holds_another_manifest(tmp_path: Path) -> None:
    """The plan shows the same warning (and --json names the folder's manifest)."""
    first = write_jobs(tmp_path / "cats.jsonl", {"id": "c", "prompt": "a cat"})
    other = write_jobs(tmp_path / "dogs.jsonl", {"id": "d", "prompt": "a dog"})
    out = tmp_path / "out"
    assert invoke("run", str(first), "--simulate", "--out", str(out), "-q")[0] == 0
    same = invoke("run", str(first), "--dry-run", "--out", str(out), "--json")[1]
    assert json.loads(same)["other_manifest"] is None
    _, stdout, _ = invoke("run", str(other), "--dry-run", "--out", str(out))
    assert f"holds the results of another manifest ({first})" in stdout
    assert "adds 1 new job(s) to it: 1 request(s), 1 image(s) to pay for" in stdout
    data = json.loads(invoke("run", str(other), "--dry-run", "--out", str(out), "--json")[1])
    assert data["other_manifest"] == str(first)


def test_other_manifest_tells_another_file_from_the_same_one(tmp_path: Path) -> None:
    """Another file with other content counts; the same file edited, or the same content
    elsewhere, or a run that recorded no manifest, does not."""
    here = tmp_path / "a.jsonl"
    here.write_text("{}\n")
    run = {"manifest": str(tmp_path / "b.jsonl"), "manifest_sha256": "1"}
    assert other_manifest(run, here, "2") == str(tmp_path / "b.jsonl")
    assert other_manifest(run, here, "1") is None
    assert other_manifest({**run, "manifest": str(here)}, here, "2") is None
    assert other_manifest({"manifest": None}, here, "2") is None
    assert other_manifest(None, here, "2") is None


# -- the plan against the caps ---------------------------------------------------------------------


def test_plan_fit_says_whether_and_by_how_much() -> None:
    """Earlier figures plus the plan against each cap; an unpriced image defeats a cost cap."""
    fits = PlanFit(10, 1.0, 4, 0.25, 5, 0.5)
    assert fits.fits and (fits.images_over, fits.cost_over) == (0, 0.0)
    over = PlanFit(8, 0.6, 4, 0.25, 5, 0.5)
    assert not over.fits and over.images_over == 1 and over.cost_over == pytest.approx(0.15)
    lines = fit_lines(over.to_dict())
    assert lines[0].startswith("does not fit under --max-images 8: 4 made in the folder + 5 to")
    assert "1 over" in lines[0] and "$0.150 over" in lines[1]
    unpriced = PlanFit(None, 5.0, 0, 0.0, 3, 0.0, unpriced_images=3)
    assert not unpriced.fits
    assert fit_lines(unpriced.to_dict())[0].startswith("cannot tell whether it fits")


def test_a_dry_run_with_caps_says_whether_the_plan_fits(tmp_path: Path) -> None:
    """--max-images and --max-cost on a dry run: fits, or over by how much (also in --json)."""
    manifest = write_jobs(
        tmp_path / "m.jsonl", {"id": "a", "prompt": "x", "model": "dall-e-2", "n": 6}
    )
    out = str(tmp_path / "out")
    _, stdout, _ = invoke("run", str(manifest), "--dry-run", "--out", out, "--max-images", "10")
    assert "fits under --max-images 10: 0 made in the folder + 6 to send = 6" in stdout
    _, stdout, _ = invoke("run", str(manifest), "--dry-run", "--out", out, "--max-images", "4")
    assert "does not fit under --max-images 4" in stdout and "2 over" in stdout
    _, stdout, _ = invoke(
        "run", str(manifest), "--dry-run", "--out", out, "--max-cost", "0.01", "--json"
    )
    budget = json.loads(stdout)["budget"]
    assert budget["fits"] is False and budget["cost_over_usd"] > 0
    _, stdout, _ = invoke("run", str(manifest), "--dry-run", "--out", out)
    assert (
        "fits under" not in stdout
        and json.loads(invoke("run", str(manifest), "--dry-run", "--out", out, "--json")[1])[
            "budget"
        ]
        is None
    )


# -- the library without a key ---------------------------------------------------------------------


async def test_an_engine_without_a_key_refuses_at_async_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No api_key and no COMETAPI_KEY: AuthenticationError on entry, before the folder is made."""
    monkeypatch.delenv("COMETAPI_KEY", raising=False)
    engine = Engine(Settings(base_url="https://api.cometapi.com/v1"), out_dir=tmp_path / "out")
    with pytest.raises(AuthenticationError, match=r"no API key.*COMETAPI_KEY"):
        async with engine:
            pass
    assert not (tmp_path / "out").exists()


async def test_an_engine_without_a_key_sends_nothing(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a server that would answer, too: the refusal comes before any request."""
    monkeypatch.delenv("COMETAPI_KEY", raising=False)
    with pytest.raises(AuthenticationError):
        async with Engine(Settings(base_url=sim.base_url), out_dir=tmp_path) as engine:
            await run_all(engine, [Job(prompt="a fox")])
    assert sim.stats.requests == 0
    monkeypatch.setenv("COMETAPI_KEY", "sk-from-the-environment")
    async with Engine(Settings(base_url=sim.base_url), out_dir=tmp_path) as engine:
        await run_all(engine, [Job(prompt="a fox")])
    assert engine.summary.complete
