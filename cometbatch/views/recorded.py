"""What a run recorded of its manifest: the defaults and models to read it again as it was read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..manifest.job import JobDefaults
from ..manifest.reader import Manifest
from ..models.registry import recorded_registry

__all__ = ["recorded_defaults", "recorded_manifest"]


def recorded_defaults(run: dict[str, Any]) -> JobDefaults:
    """The --model/--size/--n a run event recorded (none for older ledgers or odd values)."""
    given = run.get("defaults")
    if not isinstance(given, dict):
        return JobDefaults()
    model, size, n = given.get("model"), given.get("size"), given.get("n")
    return JobDefaults(
        model=model if isinstance(model, str) else None,
        size=size if isinstance(size, str) else None,
        n=n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None,
    )


def recorded_manifest(run: dict[str, Any], path: str | Path) -> Manifest:
    """The manifest at `path`, read as the run event `run` read it (defaults, models)."""
    # Without the run's warnings about unknown models: they were said when it ran.
    registry = recorded_registry(run.get("settings"))
    return Manifest(path, defaults=recorded_defaults(run), registry=registry)
