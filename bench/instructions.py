"""CPU a request as instructions: the lean loop, the contract floor and `cometbatch run`.

Wall-clock and CPU-time figures at zero latency swing with what else the machine does (the
disk's system time most of all). Instruction counts do not: each contender runs as a whole
process under valgrind's callgrind (user-space instructions, all threads) at two manifest
sizes against the simulator (its own process, not counted), and the difference gives the
instructions each further request costs; the rest is the fixed cost (start-up, the manifest
check, the end). The projection to 16,000 requests is the overhead benchmark's size; the
target is bench/overhead.py's: cometbatch at >= 0.8 x the lean loop.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from _common import finish, simulator_process, verdict
from overhead import (
    CONCURRENCY,
    KEY,
    ROOT,
    TARGET_RATIO,
    cometbatch_command,
    make_jobs,
    script_command,
    warm_up,
    write_manifest,
)

from cometbatch import SimConfig

PROJECTED = 16_000
_COLLECTED = re.compile(r"Collected : (\d+)")


def instructions(command: list[str], cwd: Path, *, count: bool = True) -> int:
    """User-space instructions `command` executed, counted by callgrind (`count` False: the
    command only runs, natively, and 0 is returned: the smoke run's check of the script)."""
    env = {**os.environ, "COMETAPI_KEY": KEY, "PYTHONPATH": str(ROOT)}
    counter = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"] if count else []
    done = subprocess.run(
        [*counter, *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode == 0 and not count:
        return 0
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{command[1:3]} under valgrind failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script")
    parser.add_argument("--small", type=int, default=500, help="requests of the smaller run")
    parser.add_argument("--large", type=int, default=1500, help="requests of the larger run")
    args = parser.parse_args()
    # Under valgrind a process runs some 50 times slower: the smoke run only runs each one.
    small, large = (20, 60) if args.smoke else (args.small, args.large)
    if shutil.which("valgrind") is None and not args.smoke:
        print("valgrind is not installed: no instruction counts (target not checked)")
        return
    contenders = [
        ("lean loop", script_command("_leanloop.py")),
        ("contract floor", script_command("_floorloop.py")),
        ("cometbatch run", cometbatch_command),
    ]
    jobs = make_jobs(large)
    totals: dict[str, float] = {}
    print(f"{small} and {large} requests, concurrency {CONCURRENCY}, simulator latency 0")
    config = SimConfig(seed=1, record_requests=False)
    with simulator_process(config) as sim, tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        warm_up(sim.base_url, jobs, tmp / "warm-up", CONCURRENCY)
        manifests = {n: write_manifest(jobs[:n], tmp / f"m{n}.jsonl") for n in (small, large)}
        for label, command in contenders:
            counts = {}
            for n, manifest in manifests.items():
                out = tmp / f"out-{n}"
                counts[n] = instructions(
                    command(manifest, out, sim.base_url), tmp, count=not args.smoke
                )
                shutil.rmtree(out, ignore_errors=True)
            each = (counts[large] - counts[small]) / (large - small)
            fixed = counts[small] - small * each
            totals[label] = fixed + PROJECTED * each
            print(
                f"{label:>14}: {each / 1e3:7.0f} k instructions a request, fixed "
                f"{fixed / 1e6:6.0f} M; {PROJECTED:,} requests {totals[label] / 1e9:.2f} G"
            )
    if args.smoke:
        print("smoke run: instructions not counted (target not checked)")
        return
    lean = totals["lean loop"]
    print(f"contract floor / lean loop: {lean / totals['contract floor']:.2f} x")
    ratio = lean / totals["cometbatch run"]
    met = verdict("cometbatch run / lean loop, instructions", ratio, TARGET_RATIO,
                  higher_is_better=True, unit="x")  # fmt: skip
    finish(met, smoke=args.smoke)


if __name__ == "__main__":
    main()
