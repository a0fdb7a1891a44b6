"""Manifest check: how many lines a second the up-front check takes, and its peak memory.

The check runs before the first request, so its time is start-up time: a 10,000,000-line
manifest at 36 s per million waited six minutes before anything was sent. Data (written to a
temporary folder): 1,000,000 lines in a realistic mix of models (dall-e-3, gpt-image-1,
gpt-image-2), sizes, n, qualities and formats, 30% with metadata; 80% with their own id, 10%
with a derived id, 10% in OpenAI Batch API shape. A child process runs `load_manifest` on it
(as `cometbatch run` does before sending) and reports its time; its peak RSS comes from wait4,
which covers the whole child. For scale, the same child times the full model line by line
(`parse_line`, what the check did for every line before) over the first 100,000 lines: the
ratio of the two rates holds better than either figure on a busy machine.

Targets: >= 200,000 lines/s (1,000,000 lines in <= 5 s), peak RSS <= 200 MB.
`--smoke` uses 2,000 lines to check that the script works.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import finish, manifest_line, median, options, verdict

LINES = 1_000_000
FULL_LINES = 100_000
SMOKE_LINES = 2_000
RATE_TARGET = 200_000.0
RSS_TARGET_MB = 200.0

# The child: check the manifest as a run does, then the full model over the first lines.
CHILD = """
import itertools, json, sys, time
from cometbatch import load_manifest
from cometbatch.manifest.lines import parse_line
from cometbatch.models.registry import ModelRegistry

path, full_lines = sys.argv[1], int(sys.argv[2])
started = time.perf_counter()
manifest = load_manifest(path)
seconds = time.perf_counter() - started
registry = ModelRegistry()
started = time.perf_counter()
with open(path, encoding="utf-8") as handle:
    for number, text in enumerate(itertools.islice(handle, full_lines), start=1):
        parse_line(text, number, registry=registry)
full = time.perf_counter() - started
print(json.dumps({"jobs": manifest.stats.jobs, "seconds": seconds, "full_seconds": full}))
"""

_SUBJECTS = ("a red fox", "an old lighthouse", "a bowl of ramen", "a robot gardener", "two cats")
_STYLES = ("watercolor", "oil painting", "35mm photo", "pencil sketch", "pixel art")


def _job(rng: random.Random, number: int) -> dict[str, Any]:
    """One job's fields: a realistic mix of models, sizes and options."""
    prompt = f"{rng.choice(_SUBJECTS)}, {rng.choice(_STYLES)}, variation {number}"
    job: dict[str, Any] = {"prompt": prompt}
    pick = rng.random()
    if pick < 0.4:
        job.update(model="dall-e-3", size=rng.choice(("1024x1024", "1792x1024", "1024x1792")))
        if rng.random() < 0.5:
            quality, style = rng.choice(("standard", "hd")), rng.choice(("vivid", "natural"))
            job.update(quality=quality, style=style)
    elif pick < 0.7:
        job.update(
            model="gpt-image-1",
            n=rng.choice((1, 2, 4)),
            size=rng.choice(("1024x1024", "1536x1024", "1024x1536")),
            quality=rng.choice(("low", "medium", "high")),
            output_format=rng.choice(("png", "jpeg", "webp")),
        )
    else:
        job.update(
            model="gpt-image-2",
            n=rng.choice((1, 3)),
            size=rng.choice(("1024x1024", "2048x1152", "1536x1024")),
            quality="high",
        )
    if rng.random() < 0.3:
        job["metadata"] = {"batch": number // 1000, "tags": ["bench", rng.choice(_STYLES)]}
    return job


def _line(rng: random.Random, number: int) -> str:
    """One manifest line (see manifest_line)."""
    return manifest_line(rng, number, _job(rng, number))


def write_manifest(path: Path, lines: int, *, seed: int = 13) -> None:
    """Write `lines` manifest lines to `path`."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for number in range(lines):
            handle.write(_line(rng, number) + "\n")


def check(path: Path, full_lines: int) -> tuple[dict[str, Any], float]:
    """The child's figures, and its peak RSS in MB."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(full_lines)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"the check failed (exit {child.returncode})")
    peak = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 1024**2
    return json.loads(output), peak


def main() -> None:
    opts = options(__doc__.splitlines()[0] if __doc__ else "manifest check")
    lines = SMOKE_LINES if opts.smoke else LINES
    full_lines = min(lines, FULL_LINES)
    rates: list[float] = []
    full_rates: list[float] = []
    peaks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.jsonl"
        write_manifest(path, lines)
        size_mb = path.stat().st_size / 1e6
        print(f"{lines:,} lines ({size_mb:.0f} MB), checked {opts.runs} time(s) in a child")
        for run in range(1, opts.runs + 1):
            figures, peak = check(path, full_lines)
            assert figures["jobs"] == lines, figures
            rate = lines / figures["seconds"]
            full_rate = full_lines / figures["full_seconds"]
            rates.append(rate)
            full_rates.append(full_rate)
            peaks.append(peak)
            print(
                f"run {run}: {figures['seconds']:.2f} s, {rate:,.0f} lines/s, peak RSS "
                f"{peak:.0f} MB; the full model line by line: {full_rate:,.0f} lines/s "
                f"({rate / full_rate:.1f}x)"
            )
    met = verdict("median lines/s", median(rates), RATE_TARGET, higher_is_better=True, unit="/s")
    met &= verdict("peak RSS", max(peaks), RSS_TARGET_MB, higher_is_better=False, unit=" MB")
    print(f"speed-up over the full model line by line: {median(rates) / median(full_rates):.1f}x")
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main()
