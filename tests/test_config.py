"""A settings file (cometbatch.toml or [tool.cometbatch]): read, checked, and below the flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cometbatch import ConfigError
from cometbatch.cli.config import load_config, merge_options, parse_config
from cometbatch.cli.main import main


def write_manifest(folder: Path) -> Path:
    manifest = folder / "m.jsonl"
    manifest.write_text('{"id": "a", "prompt": "p", "model": "dall-e-2", "n": 5}\n')
    return manifest


def run_settings(out: Path) -> dict[str, object]:
    first = json.loads((out / "ledger.jsonl").read_text().splitlines()[0])
    settings = first["settings"]
    assert isinstance(settings, dict)
    return settings


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"conurrency": 4}, "unknown setting 'conurrency' (did you mean 'concurrency'?)"),
        ({"rpm": "fast"}, "'rpm': Input should be a valid number"),
        ({"concurrency": "lots"}, "'concurrency': should be a whole number or 'auto'"),
        ({"models": {"dall-e-2": 4}}, "'models.dall-e-2'"),
        ({"api_key": "x"}, "never read from a file; set COMETAPI_KEY"),
        ({"models": {"m": {"token": "x"}}}, "'models.m.token'"),
    ],
)
def test_bad_files_name_the_file_and_the_key(table: dict[str, object], words: str) -> None:
    """Each problem is one ConfigError naming the file and the key."""
    with pytest.raises(ConfigError) as caught:
        parse_config(table, "team.toml")
    assert str(caught.value).startswith("team.toml: ")
    assert words in str(caught.value)


def test_a_key_is_refused_without_being_repeated(tmp_path: Path) -> None:
    """A value that looks like a key is refused with exit 2; the key is not printed."""
    (tmp_path / "cometbatch.toml").write_text('base_url = "sk-secret-canary-123"\n')
    manifest = write_manifest(tmp_path)
    result = CliRunner().invoke(
        main, ["run", str(manifest), "--dry-run", "--config", str(tmp_path / "cometbatch.toml")]
    )
    assert result.exit_code == 2
    assert "looks like an API key" in result.output
    assert "sk-secret-canary-123" not in result.output


def test_the_file_is_found_in_the_current_folder(tmp_path: Path) -> None:
    """cometbatch.toml first, else [tool.cometbatch] in pyproject.toml, else nothing."""
    assert load_config(cwd=tmp_path).values == {}
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert load_config(cwd=tmp_path).values == {}
    (tmp_path / "pyproject.toml").write_text("[tool.cometbatch]\nrpm = 60\n")
    found = load_config(cwd=tmp_path)
    assert found.values == {"rpm": 60.0} and "[tool.cometbatch]" in str(found.source)
    (tmp_path / "cometbatch.toml").write_text("rpm = 30\n")
    assert load_config(cwd=tmp_path).values == {"rpm": 30.0}
    (tmp_path / "cometbatch.toml").write_text("rpm = [\n")
    with pytest.raises(ConfigError, match=r"cometbatch\.toml: not valid TOML"):
        load_config(cwd=tmp_path)


def test_merge_puts_flags_over_the_environment_over_the_file() -> None:
    """A given flag wins; COMETAPI_BASE_URL beats the file's base URL; the file fills the rest."""
    config = parse_config(
        {"base_url": "https://file/v1", "rpm": 60, "concurrency": 4, "retry_ambiguous": False},
        "f.toml",
    )
    flags = {"base_url": None, "rpm": None, "concurrency": 16, "no_retry_ambiguous": False}
    merged = merge_options(flags, set(), config, {})
    assert merged == {
        "base_url": "https://file/v1",
        "rpm": 60.0,
        "concurrency": 4,
        "no_retry_ambiguous": True,
    }
    env = {"COMETAPI_BASE_URL": "https://env/v1"}
    assert merge_options(flags, set(), config, env)["base_url"] is None  # Settings reads env
    given = {**flags, "base_url": "https://flag/v1", "concurrency": 8}
    merged = merge_options(given, {"base_url", "concurrency"}, config, env)
    bounded = parse_config({"concurrency": "auto", "max_concurrency": 64}, "f.toml")
    fixed = merge_options({"concurrency": 8, "max_concurrency": None}, {"concurrency"}, bounded, {})
    assert fixed == {"concurrency": 8, "max_concurrency": None}
    assert (merged["base_url"], merged["concurrency"], merged["rpm"]) == (
        "https://flag/v1",
        8,
        60.0,
    )


@pytest.mark.parametrize(
    ("env", "flag", "named"),
    [
        ({}, None, "192.0.2.1"),
        ({"COMETAPI_BASE_URL": "http://192.0.2.2/v1"}, None, "192.0.2.2"),
        ({"COMETAPI_BASE_URL": "http://192.0.2.2/v1"}, "http://192.0.2.3/v1", "192.0.2.3"),
    ],
)
def test_base_url_precedence_file_then_environment_then_flag(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    flag: str | None,
    named: str,
) -> None:
    """The base URL that is used (and refused for plain http) comes from the right place."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COMETAPI_BASE_URL", raising=False)
    (tmp_path / "cometbatch.toml").write_text('base_url = "http://192.0.2.1/v1"\n')
    args = ["run", str(write_manifest(tmp_path)), "--dry-run"]
    if flag:
        args += ["--base-url", flag]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2
    assert f"clear text to {named}" in result.output


def test_file_settings_reach_the_run_and_flags_override_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Limits, a Settings-only field and a per-model override come from the file; a flag wins."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cometbatch.toml").write_text(
        "concurrency = 3\nrpm = 6000\nmax_attempts = 4\noutage_limit = 90\n"
        "retry_ambiguous = false\n[models.dall-e-2]\nmax_n = 2\n"
    )
    manifest = write_manifest(tmp_path)
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main, ["run", str(manifest), "--simulate", "--out", str(out), "--json", "--rpm", "9000"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["planned_requests"] == 3  # n=5 at max_n 2
    settings = run_settings(out)
    assert (settings["concurrency"], settings["rpm"], settings["max_attempts"]) == (3, 9000, 4)
    assert (settings["outage_limit"], settings["retry_ambiguous"]) == (90, False)
    assert settings["model_overrides"] == {"dall-e-2": {"max_n": 2}}


def test_file_job_defaults_and_prices_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model/size/n fill a .txt manifest's jobs; a [prices] table changes the estimate."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cometbatch.toml").write_text(
        'model = "qwen-image"\nn = 2\n[prices.models.qwen-image.per_image."*"]\n"*" = 0.5\n'
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    result = CliRunner().invoke(main, ["run", str(prompts), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["totals"]["images"] == 4 and plan["cost"]["estimated_usd"] == 2.0
    assert "cometbatch.toml [prices]" in plan["prices"]
    flagged = CliRunner().invoke(main, ["run", str(prompts), "--dry-run", "--json", "--n", "1"])
    assert json.loads(flagged.stdout)["totals"]["images"] == 2


def test_run_help_shows_examples() -> None:
    """`cometbatch run --help` has examples, including the settings file."""
    shown = CliRunner().invoke(main, ["run", "--help"])
    assert shown.exit_code == 0
    assert (
        "Examples:" in shown.output and "cometbatch run jobs/demo.jsonl --simulate" in shown.output
    )
    assert "--config" in shown.output and "--prices" in shown.output
