"""What an installed package shows: its links on the package index, its lowest versions, no
warning at import on any pydantic it allows, and the shell completion the docs describe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from cometbatch.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPOSITORY = "https://github.com/cometbatch/cometbatch"

# Imports every module of the package (a model's class body runs at import), then builds the
# models a caller builds first, with every warning an error.
IMPORT_ALL = """
import importlib, pkgutil, warnings
warnings.simplefilter("error")
{before}
import cometbatch
for module in pkgutil.walk_packages(cometbatch.__path__, "cometbatch."):
    if not module.name.endswith(".__main__"):  # that one runs the command line
        importlib.import_module(module.name)
from cometbatch import Job, Settings
Settings(model_overrides={{"dall-e-2": {{"max_n": 4}}}})
Job(prompt="a fox")
print("quiet")
"""
# pydantic before 2.10 protected the whole "model_" namespace: a field named model_* warned
# when its class was defined. Its own default, set back, recreates that check here.
OLD_PYDANTIC = """
from pydantic._internal import _config
_config.config_defaults["protected_namespaces"] = ("model_",)
"""


def lowest(requirement: str) -> tuple[int, ...]:
    """The version after `>=` in a requirement, as numbers."""
    return tuple(int(part) for part in requirement.split(">=")[1].split("."))


def requirement(name: str, requirements: list[str]) -> str:
    (found,) = (r for r in requirements if re.match(rf"{name}\s*[<>=!~]", r))
    return found


@pytest.mark.parametrize("before", ["", OLD_PYDANTIC], ids=["installed-pydantic", "pydantic-2.6"])
def test_settings_and_job_build_without_a_warning(before: str) -> None:
    """No module warns at import and building Settings and Job warns nothing, on the installed
    pydantic and under the namespace rule of the lowest one allowed (2.6)."""
    from pydantic._internal import _config

    assert "protected_namespaces" in _config.config_defaults  # else the old rule is not set
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL.format(before=before)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "quiet"


def test_lowest_versions_are_ones_that_work() -> None:
    """hatchling 1.24 and 1.25 cannot build the package (they want `license-files` as a
    table); below these, aiohttp, aiolimiter and click fail tests of this suite (see
    docs/development.md); pydantic from 2.6 is checked above."""
    build = PYPROJECT["build-system"]["requires"]
    dependencies = PYPROJECT["project"]["dependencies"]
    assert isinstance(PYPROJECT["project"]["license-files"], list)
    assert lowest(requirement("hatchling", build)) >= (1, 26)
    assert lowest(requirement("aiohttp", dependencies)) >= (3, 10, 7)
    assert lowest(requirement("aiolimiter", dependencies)) >= (1, 2)
    assert lowest(requirement("click", dependencies)) >= (8, 2)
    assert lowest(requirement("pydantic", dependencies)) >= (2, 6)


def test_project_urls_lead_to_the_repository() -> None:
    """The package index page links home, the docs, the changelog and the issues, and the
    files they name are in the repository."""
    urls = PYPROJECT["project"]["urls"]
    assert set(urls) == {"Homepage", "Documentation", "Changelog", "Issues"}
    assert urls["Homepage"] == REPOSITORY
    assert urls["Issues"] == f"{REPOSITORY}/issues"
    for name in ("Documentation", "Changelog"):
        path = urls[name].removeprefix(f"{REPOSITORY}/blob/main/")
        assert path != urls[name], name
        assert (ROOT / path).is_file(), name


def completion_lines() -> list[str]:
    """The shell completion lines the command-line page tells users to add."""
    page = (ROOT / "docs" / "cli.md").read_text()
    section = page[page.index("## Shell completion") :]
    start = section.index("```sh\n") + len("```sh\n")
    block = section[start : section.index("```", start)]
    return [line for line in block.splitlines() if "_COMPLETE=" in line]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_works_as_documented(shell: str) -> None:
    """Each documented line's variable, given to the `cometbatch` command, prints that shell's
    completion script, which completes through the same variable."""
    (line,) = (line for line in completion_lines() if f"={shell}_source cometbatch" in line)
    variable, value = re.search(r"(_\w+_COMPLETE)=(\w+)", line).groups()  # type: ignore[union-attr]
    result = CliRunner().invoke(main, [], env={variable: value}, prog_name="cometbatch")
    assert result.exit_code == 0
    assert "_cometbatch_completion" in result.output
    assert f"{variable}={shell}_complete" in result.output
