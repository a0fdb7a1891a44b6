"""`gallery` and `export` from the command line: output where asked, clear errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cometbatch.cli.main import main


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a finished simulated run of three jobs."""
    folder = tmp_path_factory.mktemp("inspect")
    manifest = folder / "m.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": f"j{i}", "prompt": f"p {i}", "model": "qwen-image"}) + "\n"
            for i in range(3)
        )
    )
    out = folder / "out"
    result = CliRunner().invoke(main, ["run", str(manifest), "--simulate", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return out


def test_gallery_writes_the_page_and_prints_its_path(done: Path) -> None:
    """`gallery DIR` prints the path of index.html, a page naming the jobs."""
    result = CliRunner().invoke(main, ["gallery", str(done)])
    assert result.exit_code == 0, result.output
    page = Path(result.stdout.strip())
    assert page == done / "index.html" and "j1" in page.read_text()


def test_export_csv_to_stdout_and_jsonl_to_a_file(done: Path, tmp_path: Path) -> None:
    """CSV goes to stdout by default; -o writes the file and says how many jobs."""
    shown = CliRunner().invoke(main, ["export", str(done), "--format", "csv"])
    assert shown.exit_code == 0, shown.output
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    assert sorted(row["job_id"] for row in rows) == ["j0", "j1", "j2"]
    target = tmp_path / "r.jsonl"
    written = CliRunner().invoke(
        main, ["export", str(done), "--format", "jsonl", "-o", str(target)]
    )
    assert written.exit_code == 0, written.output
    assert len(target.read_text().splitlines()) == 3
    assert "3 job(s) written" in written.stderr
    batch = CliRunner().invoke(main, ["export", str(done), "--format", "openai-batch"])
    assert all("custom_id" in json.loads(line) for line in batch.stdout.splitlines())


@pytest.mark.parametrize("command", [["gallery"], ["export", "--format", "csv"], ["status"]])
def test_a_folder_without_a_ledger_is_one_clear_line(tmp_path: Path, command: list[str]) -> None:
    """No ledger: exit 2 with one line, no traceback, and no file left behind."""
    result = CliRunner().invoke(main, [command[0], str(tmp_path), *command[1:]])
    assert result.exit_code == 2
    assert "nothing has run there yet" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_an_unknown_format(done: Path) -> None:
    """A format that does not exist is a usage error listing the formats."""
    result = CliRunner().invoke(main, ["export", str(done), "--format", "xml"])
    assert result.exit_code == 2 and "openai-batch" in result.output
