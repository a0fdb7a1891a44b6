"""The gallery's prompts and sizes: read from the manifest the run recorded (or one given)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ...errors import CometBatchError, ManifestError, ManifestProblem
from ...manifest.job import Job
from ...manifest.reader import Manifest
from ...models.registry import recorded_registry
from .model import Gallery, JobText


def read_job_texts(manifest: Iterable[Job], wanted: set[str]) -> dict[str, JobText]:
    """Prompt and size of the manifest's jobs whose ids are `wanted`."""
    found: dict[str, JobText] = {}
    for position, job in enumerate(manifest):
        if job.id in wanted:
            found[job.id] = JobText(job.prompt, job.size, position)
            if len(found) == len(wanted):
                break
    return found


def attach_manifest(gallery: Gallery, given: Path | None) -> None:
    """Fill gallery.jobs from the manifest (the one the latest run names unless given)."""
    path = given or (Path(gallery.manifest) if gallery.manifest else None)
    if path is None:
        gallery.manifest_note = "no manifest recorded: prompts and sizes are not shown"
        return
    gallery.manifest = str(path)
    try:
        # Quiet: the run already gave its warnings about unknown models.
        registry = recorded_registry(gallery.run_settings)
        manifest = Manifest(path, defaults=gallery.defaults, registry=registry)
        if given is None and gallery.manifest_sha256:
            # The digest the run recorded, computed the same way: did the file change since?
            manifest.validate()
            if manifest.sha256 != gallery.manifest_sha256:
                gallery.manifest_note = f"{path} changed since the run: its prompts may differ"
        gallery.jobs = read_job_texts(manifest, {tile.job_id for tile in gallery.tiles})
        # Manifest order reads best; jobs it does not hold keep their ledger order, last.
        unknown = JobText("", position=1 << 62)
        gallery.tiles.sort(key=lambda tile: gallery.jobs.get(tile.job_id, unknown).position)
    except ManifestError as exc:
        first = exc.problems[0] if exc.problems else ManifestProblem(0, None, "unreadable")
        reason = first.message if first.line == 0 else str(first)
        gallery.manifest_note = f"cannot read the manifest {path}: {reason}"
    except CometBatchError as exc:
        gallery.manifest_note = f"cannot read the manifest {path}: {exc}"
