"""The README and the pages under docs/: every setting and option documented, every link
resolving, the README short, and its library example running as a file."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import click
import pytest

from cometbatch import Settings, SimConfig, Simulator, load_manifest
from cometbatch.cli.config import FileSettings
from cometbatch.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
DOCS = "\n".join(page.read_text() for page in PAGES)
# Absolute links into this repository (the README's image must be one to show on the package
# index): they name a file of the checkout, so they are checked like relative ones.
REPO_URL = re.compile(
    r"https://(?:raw\.githubusercontent\.com/cometbatch/cometbatch/main"
    r"|github\.com/cometbatch/cometbatch/(?:blob|tree|raw)/main)/(?P<path>[^#?]+)(?P<anchor>#.*)?$"
)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text: str) -> Iterator[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(page.read_text()):
        if match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> Iterator[str]:
    """The targets of a page's Markdown links and images (whose text may wrap onto the next
    line), code spans and blocks left out."""
    text = re.sub(r"`[^`]*`", "", "\n".join(prose(page.read_text())))
    for match in LINK.finditer(text):
        yield match.group("target")


def broken(page: Path, target: str) -> str | None:
    """Why a link of `page` does not resolve in the checkout, or None when it does."""
    if repo := REPO_URL.match(target):
        target = os.path.relpath(ROOT / repo.group("path"), page.parent) + (repo["anchor"] or "")
    elif re.match(r"[a-z][a-z0-9+.-]*:", target):
        return None  # another site: not checked, no network in tests
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
        return "no such file"
    if ROOT not in file.parents and file != ROOT:
        return "outside the repository"
    if anchor and (file.suffix != ".md" or anchor not in anchors(file)):
        return f"no heading #{anchor}"
    return None


def test_the_readme_is_a_front_door() -> None:
    """The README stays short: the reference lives under docs/."""
    assert len(README.read_text().splitlines()) <= 300


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Try it (one command, no key, no network)", "try-it-one-command-no-key-no-network"),
        ("Dry run: the plan and its cost", "dry-run-the-plan-and-its-cost"),
        ("openai-python's keyword arguments", "openai-pythons-keyword-arguments"),
        ("Raising a job's `n`", "raising-a-jobs-n"),
        ("Ctrl-C, SIGTERM, SIGHUP and crashes", "ctrl-c-sigterm-sighup-and-crashes"),
        ("max_images and __init__", "max_images-and-__init__"),
    ],
)
def test_slug_is_githubs(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_every_link_resolves() -> None:
    """Each relative link (and each absolute link into this repository) in README.md and
    docs/*.md names a file that exists, and its #anchor a heading of that file."""
    bad = [
        f"{page.relative_to(ROOT)}: {target}: {why}"
        for page in PAGES
        for target in links(page)
        if (why := broken(page, target))
    ]
    assert bad == []
    assert any(REPO_URL.match(target) for target in links(README))


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    """The link check itself: a missing file, a missing heading, and a good link."""
    page = ROOT / "docs" / "cli.md"
    assert broken(page, "settings.md#settings-file") is None
    assert broken(page, "#budget-caps") is None
    assert broken(page, "nowhere.md") == "no such file"
    assert broken(page, "settings.md#no-such-part") == "no heading #no-such-part"
    repository = "https://github.com/cometbatch/cometbatch/blob/main/"
    assert broken(page, f"{repository}docs/resume.md#regenerating-is-crash-safe") is None
    assert broken(page, f"{repository}gone.md") == "no such file"
    assert broken(page, f"{repository}docs/resume.md#gone") == "no heading #gone"


def test_the_readme_images_work_on_the_package_index() -> None:
    """The package index shows the README alone: an image there needs an absolute URL."""
    images = [
        match.group(1)
        for line in prose(README.read_text())
        for match in re.finditer(r"!\[[^\]]*\]\(([^)\s]+)", line)
    ]
    assert images
    assert [target for target in images if not REPO_URL.match(target)] == []


def test_every_settings_field_is_in_a_table() -> None:
    """Each Settings field heads a row of a table in the README or a docs page."""
    rows = "\n".join(line for line in DOCS.splitlines() if line.startswith("| `"))
    missing = [name for name in Settings.model_fields if f"`{name}`" not in rows]
    assert missing == []


def test_every_settings_file_key_is_documented() -> None:
    """Each key the settings file takes is named on the Settings page (a table by its name)."""
    page = (ROOT / "docs" / "settings.md").read_text()
    missing = [
        name
        for name in FileSettings.model_fields
        if f"`{name}`" not in page and f"`[{name}." not in page
    ]
    assert missing == []


def test_every_command_and_option_is_documented() -> None:
    """Each CLI command and each of its long options is named in the README or a docs page."""
    assert isinstance(main, click.Group)
    missing = []
    for name, command in main.commands.items():
        if f"cometbatch {name}" not in DOCS:
            missing.append(name)
        for param in command.params:
            for option in getattr(param, "opts", []):
                if option.startswith("--") and option not in DOCS:
                    missing.append(f"{name} {option}")
    assert missing == []


def test_the_readme_test_command_is_what_ci_runs() -> None:
    """The README says `.ci/run` runs exactly its test command: it ends with the same line."""
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("no .ci/run: a source distribution leaves the CI script out")
    command = code_block(README.read_text(), "## Run the tests", "sh").strip()
    ci_line = ci.read_text().strip().splitlines()[-1]
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert command.endswith(ci_line)


def code_block(text: str, heading: str, language: str) -> str:
    """The first `language` code block after `heading`."""
    section = text[text.index(f"\n{heading}\n") :]
    start = section.index(f"```{language}\n") + len(f"```{language}\n")
    return section[start : section.index("```", start)]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=1)) as server:
        yield server


async def test_the_readme_library_example_runs_as_a_file(sim: Simulator, tmp_path: Path) -> None:
    """The README's library example, saved as a file and run by Python from a folder holding
    the demo manifest, generates every image against the simulated API."""
    example = tmp_path / "example.py"
    example.write_text(code_block(README.read_text(), "## As a library", "python"))
    (tmp_path / "jobs").mkdir()
    demo = tmp_path / "jobs" / "demo.jsonl"
    shutil.copy(ROOT / "jobs" / "demo.jsonl", demo)
    env = {
        **os.environ,
        "COMETAPI_BASE_URL": sim.base_url,
        "COMETAPI_KEY": "sk-readme",
        "PYTHONPATH": str(ROOT),  # this checkout's package, wherever it is installed from
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(example),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    out = stdout.decode()
    manifest = load_manifest(demo)
    assert "lighthouse-dawn#0 ok ['images/lighthouse-dawn/0." in out
    assert f"{manifest.stats.images} images written, complete: True" in out
    assert sim.stats.requests == manifest.stats.requests
    assert len(list((tmp_path / "out" / "library" / "images").rglob("*.*"))) == (
        manifest.stats.images
    )
