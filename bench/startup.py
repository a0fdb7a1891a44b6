"""Start-up: what `import cometbatch` costs (`python -X importtime`) and how long
`cometbatch --help` takes as a whole process, medians over the runs. Optional parts (the
engine's aiohttp, the simulator, the gallery) must not be paid for before they are used.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from _common import finish, median, options, verdict

IMPORT_TARGET_MS = 150.0
HELP_TARGET_MS = 350.0
# The cumulative microseconds of the top-level `cometbatch` line of -X importtime's report.
_TOTAL = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| cometbatch$", re.M)


def import_ms() -> float:
    """`import cometbatch` in a fresh interpreter, as -X importtime reports it."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import cometbatch"],
        capture_output=True,
        text=True,
        check=True,
    )
    found = _TOTAL.search(done.stderr)
    assert found, done.stderr[-500:]
    return int(found[1]) / 1000


def help_ms() -> float:
    """`cometbatch --help` as a whole process, wall time."""
    # `python -m cometbatch` runs the same `main` the installed script runs.
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cometbatch", "--help"], capture_output=True, check=True)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    opts = options(__doc__ or "")
    imports = [import_ms() for _ in range(opts.runs)]
    helps = [help_ms() for _ in range(opts.runs)]
    print(f"import cometbatch, runs (ms): {', '.join(f'{v:.0f}' for v in imports)}")
    print(f"cometbatch --help, runs (ms): {', '.join(f'{v:.0f}' for v in helps)}")
    met = verdict(
        "import cometbatch (median)",
        median(imports),
        IMPORT_TARGET_MS,
        higher_is_better=False,
        unit=" ms",
    )
    met &= verdict(
        "cometbatch --help (median)",
        median(helps),
        HELP_TARGET_MS,
        higher_is_better=False,
        unit=" ms",
    )
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main()
