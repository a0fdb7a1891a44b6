"""Every benchmark still runs: each script under bench/ at smoke size (figures unchecked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_runs_at_smoke_size(script: Path) -> None:
    """`python bench/<name>.py --smoke` exits 0 and prints its figures against a target."""
    done = subprocess.run(
        [sys.executable, str(script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "target" in done.stdout
    assert "Traceback" not in done.stderr
