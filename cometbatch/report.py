"""What the command line shows: summaries, plans, status and models as data and lines (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .events import LEDGER_NAME
from .manifest import ModelPlan
from .models import ModelSpec
from .results import Summary


def summary_data(summary: Summary, out: Path) -> dict[str, Any]:
    """The `run --json` object."""
    return {**summary.to_dict(), "out_dir": str(out), "ledger": str(out / LEDGER_NAME)}


def summary_lines(summary: Summary, out: Path) -> list[str]:
    """The end-of-run report for a person."""
    sim = " [simulated API]" if summary.simulated else ""
    if summary.planned_requests == 0:
        return [f"nothing to do: the manifest has no jobs{sim}"]
    if summary.ok_requests == summary.failed_requests == 0 and summary.skipped_requests:
        return [
            f"everything was already done: {summary.skipped_requests} request(s), "
            f"{summary.skipped_images} image(s) in {out}; nothing was sent{sim}"
        ]
    rate = summary.images_written / summary.elapsed_s if summary.elapsed_s else 0.0
    lines = [
        f"{summary.images_written} image(s) written in {summary.elapsed_s:.1f} s "
        f"({rate:.1f}/s) to {out / 'images'}{sim}",
        f"requests: {summary.ok_requests} ok, {summary.failed_requests} failed, "
        f"{summary.skipped_requests} already done, {summary.pending_requests} pending; "
        f"retries {summary.retries} (429s {summary.rate_limited}), "
        f"possibly billed twice: {summary.ambiguous_retries}",
    ]
    lines += [f"  failed ({kind}): {count}" for kind, count in sorted(summary.failures.items())]
    if summary.kept_failures:
        lines.append(
            f"  {summary.kept_failures} permanent failure(s) from earlier runs kept; "
            "use --retry-failed to try them again"
        )
    if summary.stopped:
        lines.append(f"stopped: {summary.stopped}")
    if summary.interrupted:
        lines.append("interrupted: run the same command again to resume")
    return lines


def plan_data(by_model: Mapping[str, ModelPlan], out: Path, done: int) -> dict[str, Any]:
    """The `run --dry-run --json` object."""
    models = {
        name: {"jobs": p.jobs, "requests": p.requests, "images": p.images}
        for name, p in sorted(by_model.items())
    }
    return {"out_dir": str(out), "models": models, "done_requests": done}


def plan_lines(data: dict[str, Any]) -> list[str]:
    """The dry-run plan for a person, from `plan_data`."""
    lines = [
        f"{name:<20} {p['jobs']:>7} jobs {p['requests']:>8} requests {p['images']:>8} images"
        for name, p in data["models"].items()
    ]
    lines.append(
        f"already done in {data['out_dir']}: {data['done_requests']} request(s); "
        "nothing was sent (dry run)"
    )
    return lines


def status_lines(data: dict[str, Any]) -> list[str]:
    """`status` for a person, from `FolderStatus.to_dict()`."""
    lines = [
        f"{data['out_dir']}: {data['runs']} run(s), last ended cleanly: {data['last_run_ended']}"
    ]
    lines += [
        f"  {name:<20} ok {item['ok_requests']} requests / {item['ok_images']} images, "
        f"failed {item['failed_requests']} / {item['failed_images']}"
        for name, item in data["by_model"].items()
    ]
    lines += [
        f"  failures {kind}: {count} (e.g. {data['failure_examples'][kind]})"
        for kind, count in data["failures"].items()
    ]
    lines.append(f"  retries {data['retries']}, possibly billed twice {data['ambiguous_retries']}")
    return lines


def model_lines(specs: Iterable[ModelSpec]) -> list[str]:
    """`models` for a person: one line per model."""
    lines = []
    for spec in specs:
        sizes = ", ".join(spec.sizes) if spec.sizes else "any"
        params = ", ".join(sorted([*spec.params, *spec.int_ranges])) or "-"
        answers = "/".join(spec.response_formats)
        lines.append(
            f"{spec.name:<18} max n {spec.max_n:<3} answers {answers:<13} "
            f"sizes {sizes}; params {params}"
        )
    return lines
