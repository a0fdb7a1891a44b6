"""A fast start: `import cometbatch` and `cometbatch --help` load no optional or heavy part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# What neither `import cometbatch` nor `--help` may load: the HTTP stack, the engine, the
# simulator's web server, the views (gallery, export) and the live display.
HEAVY = (
    "aiohttp",
    "cometbatch.engine.engine",
    "cometbatch.net.client",
    "cometbatch.simulator.server",
    "cometbatch.views.export",
    "cometbatch.views.gallery.content",
    "cometbatch.cli.progress",
    "fsspec",
    "s3fs",
    "ray",
    "cometbatch.cluster.driver",
)


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_import_loads_no_heavy_part() -> None:
    """`import cometbatch` defers every public name (and pydantic) to its first use."""
    loaded = loaded_after("import cometbatch")
    assert not loaded & {*HEAVY, "pydantic", "cometbatch.settings"}


@pytest.mark.parametrize("command", [[], ["run"], ["status"], ["export"], ["simulate"]])
def test_help_loads_no_heavy_part(command: list[str]) -> None:
    """`--help` of the group and of each command reads options only, never the machinery."""
    code = (
        "import sys\nfrom cometbatch.cli.main import main\n"
        f"sys.argv = ['cometbatch', *{command!r}, '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass"
    )
    assert not loaded_after(code) & set(HEAVY)


def test_a_public_name_loads_on_first_use() -> None:
    """The deferred names are the real classes, loaded when first asked for."""
    loaded = loaded_after("import cometbatch\ncometbatch.Engine")
    assert "cometbatch.engine.engine" in loaded


def test_a_run_without_simulate_loads_no_web_server(tmp_path: Path) -> None:
    """A run against a URL never imports the simulator's web server (it is --simulate's)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "prompt": "p", "model": "gpt-image-1"}\n')
    code = (
        "import sys\nfrom cometbatch.cli.main import main\n"
        f"sys.argv = ['cometbatch', 'run', {str(manifest)!r}, '--out', {str(tmp_path / 'o')!r},"
        " '--base-url', 'http://127.0.0.1:9/v1', '--max-attempts', '1', '--quiet']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass"
    )
    loaded = loaded_after(code)
    assert "cometbatch.cli.runner" in loaded  # the run got as far as sending
    assert "cometbatch.simulator.server" not in loaded
