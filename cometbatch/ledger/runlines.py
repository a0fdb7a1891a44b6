"""The lines that open and close a run in the ledger: what ran, with what, and how it ended."""

from __future__ import annotations

import dataclasses
from typing import Any

from .._version import __version__
from ..manifest.reader import Manifest
from .events import now_iso


def run_line(
    run_id: str, manifest: Manifest | None, settings: dict[str, Any], *, simulated: bool
) -> dict[str, Any]:
    """The run line: the manifest (absolute and as given), the version and public settings."""
    return {
        "event": "run",
        "run_id": run_id,
        "started_at": now_iso(),
        # Absolute, so that status, export and gallery find it from any folder; and as it was
        # given (typed on the command line, or passed to load_manifest).
        "manifest": str(manifest.path.resolve()) if manifest is not None else None,
        "manifest_given": str(manifest.path) if manifest is not None else None,
        "manifest_sha256": manifest.sha256 if manifest is not None else None,
        "version": __version__,
        "settings": {**settings, "simulated": simulated},
        # --model/--size/--n, so that status and gallery can read the manifest as run.
        "defaults": dataclasses.asdict(manifest.defaults) if manifest is not None else None,
    }


def end_line(run_id: str, stopped: str | None, summary: dict[str, Any]) -> dict[str, Any]:
    """The end line: the cap that stopped the run (if one did) and the run's summary."""
    return {
        "event": "end",
        "run_id": run_id,
        "finished_at": now_iso(),
        "stopped": stopped,
        "summary": summary,
    }


def sent_line(run_id: str, key: str, attempt: int, n: int) -> dict[str, Any]:
    """The line written before a request leaves: a key with no later result may be billed."""
    return {
        "event": "sent",
        "run_id": run_id,
        "key": key,
        "attempt": attempt,
        "n": n,
        "sent_at": now_iso(),
    }
