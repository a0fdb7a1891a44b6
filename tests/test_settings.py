"""One Settings schema: a bad value gets the same answer from a flag, a settings file and Python."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cometbatch import Settings
from cometbatch.cli.main import main

INF = math.inf

# A bad value (as Settings fields, as run flags), the setting it names and the bound it states.
BAD = [
    pytest.param({"rpm": INF}, ["--rpm", "inf"], "rpm", "finite number", id="rpm-inf"),
    pytest.param({"timeout": INF}, ["--timeout", "inf"], "timeout", "finite number", id="t-inf"),
    pytest.param({"rpm": 1}, ["--rpm", "1"], "rpm", "greater than 1", id="rpm-1"),
    pytest.param({"ipm": INF}, ["--ipm", "inf"], "ipm", "finite number", id="ipm-inf"),
    pytest.param({"ipm": 1}, ["--ipm", "1"], "ipm", "greater than 1", id="ipm-1"),
    pytest.param({"timeout": 0}, ["--timeout", "0"], "timeout", "greater than 0", id="t-0"),
    pytest.param({"max_cost": INF}, ["--max-cost", "inf"], "max_cost", "finite", id="cost-inf"),
    pytest.param({"max_images": 0}, ["--max-images", "0"], "max_images", "greater than 0", id="i0"),
    pytest.param(
        {"max_attempts": 101},
        ["--max-attempts", "101"],
        "max_attempts",
        "less than or equal to 100",
        id="attempts-101",
    ),
    pytest.param(
        {"concurrency": 0},
        ["--concurrency", "0"],
        "concurrency",
        "greater than or equal to 1",
        id="c-0",
    ),
    pytest.param(
        {"max_concurrency": 10_001},
        ["--concurrency", "auto", "--max-concurrency", "10001"],
        "max_concurrency",
        "less than or equal to 10000",
        id="max-c",
    ),
    pytest.param(
        {"min_concurrency": 10_001},
        ["--concurrency", "auto", "--min-concurrency", "10001"],
        "min_concurrency",
        "less than or equal to 10000",
        id="min-c",
    ),
    # Pacing both holds one request back from the rpm bucket, which must still pace one.
    pytest.param(
        {"rpm": 2, "ipm": 100}, ["--rpm", "2", "--ipm", "100"], "ipm", "more than 2", id="rpm+ipm"
    ),
]
# Settings a file may set that have no flag.
FILE_ONLY = [
    pytest.param({"connect_timeout": INF}, "connect_timeout", "finite number", id="connect-inf"),
    pytest.param({"grace_period": INF}, "grace_period", "finite number", id="grace-inf"),
    pytest.param({"max_retry_after": -1}, "max_retry_after", "greater than or equal to 0", id="ra"),
    pytest.param({"outage_limit": 0}, "outage_limit", "greater than 0", id="outage-0"),
]


def toml(fields: dict[str, Any]) -> str:
    """The fields as TOML lines (inf is TOML's own word for it)."""
    return "".join(
        f"{name} = {'inf' if value == INF else value}\n" for name, value in fields.items()
    )


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def run_in(folder: Path, *args: str) -> tuple[int, list[str], Path]:
    """`run` of a one-line manifest in `folder`: exit code, stderr lines, output folder."""
    manifest = folder / "m.jsonl"
    manifest.write_text('{"id": "a", "prompt": "a fox"}\n')
    out = folder / "out"
    result = CliRunner().invoke(main, ["run", str(manifest), "--out", str(out), *args])
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return result.exit_code, lines_of(result.stderr), out


@pytest.mark.parametrize(("fields", "flags", "name", "bound"), BAD)
def test_settings_refuses_a_bad_value_naming_the_setting_and_the_bound(
    fields: dict[str, Any], flags: list[str], name: str, bound: str
) -> None:
    """Settings(...) raises a ValueError that names the setting and the bound."""
    with pytest.raises(ValueError, match=name) as caught:
        Settings(**fields)
    assert bound in str(caught.value)


@pytest.mark.parametrize("mode", ["--simulate", "--dry-run"])
@pytest.mark.parametrize(("fields", "flags", "name", "bound"), BAD)
def test_a_bad_flag_is_one_line_and_exit_2_before_anything_is_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fields: dict[str, Any],
    flags: list[str],
    name: str,
    bound: str,
    mode: str,
) -> None:
    """A flag out of bounds exits 2 with one line naming the flag and the bound; no folder."""
    monkeypatch.chdir(tmp_path)
    code, lines, out = run_in(tmp_path, mode, *flags)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "--" + name.replace("_", "-") in lines[0] and bound in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("where", ["cometbatch.toml", "pyproject.toml"])
@pytest.mark.parametrize(
    ("fields", "name", "bound"),
    [*(pytest.param(*p.values[:1], *p.values[2:], id=p.id) for p in BAD), *FILE_ONLY],
)
def test_a_bad_file_value_is_one_line_and_exit_2_before_anything_is_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fields: dict[str, Any],
    name: str,
    bound: str,
    where: str,
) -> None:
    """The same value in the settings file gets the same answer, naming the file and key."""
    monkeypatch.chdir(tmp_path)
    table = "[tool.cometbatch]\n" if where == "pyproject.toml" else ""
    if "max_concurrency" in fields or "min_concurrency" in fields:
        table += 'concurrency = "auto"\n'
    (tmp_path / where).write_text(table + toml(fields))
    code, lines, out = run_in(tmp_path, "--simulate")
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert name in lines[0] and bound in lines[0], lines
    if len(fields) == 1:  # a value wrong on its own is named where it is written
        assert f"{where}" in lines[0] and f"'{name}'" in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize(("fields", "name", "bound"), FILE_ONLY)
def test_settings_without_a_flag_have_the_same_bounds(
    fields: dict[str, Any], name: str, bound: str
) -> None:
    """A setting only the file and Python can set is refused by Settings(...) alike."""
    with pytest.raises(ValueError, match=name) as caught:
        Settings(**fields)
    assert bound in str(caught.value)


def test_fetch_concurrency_is_bounded_by_the_same_schema(tmp_path: Path) -> None:
    """`fetch --concurrency 0` is one line naming the flag and the bound, exit 2."""
    result = CliRunner().invoke(main, ["fetch", str(tmp_path), "--concurrency", "0"])
    assert result.exit_code == 2
    assert lines_of(result.stderr) == [
        "error: --concurrency: Input should be greater than or equal to 1"
    ]


def test_run_help_shows_the_bounds_settings_checks() -> None:
    """--help states each bound as Settings has it (rpm above 1, not at least 1)."""
    rows: dict[str, str] = {}
    for line in CliRunner().invoke(main, ["run", "--help"]).output.splitlines():
        if line.startswith("  --"):  # an option's first line; deeper lines continue it
            option = line.split()[0]
            rows[option] = line
        elif rows and line.startswith("    "):
            rows[option] += " " + line.strip()
    assert "[x>1]" in rows["--rpm"] and "[x>1]" in rows["--ipm"]
    assert "[default: 8; 1<=x<=100]" in rows["--max-attempts"]
    assert "[default: 600.0; x>0]" in rows["--timeout"]
    assert "1<=x<=10000" in rows["--max-concurrency"] and "1<=x<=10000" in rows["--min-concurrency"]
