"""Running one manifest on a Ray cluster (the `ray` extra); ray is imported on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .driver import ClusterOutcome, ClusterProgress, run_on_ray

__all__ = ["ClusterOutcome", "ClusterProgress", "run_on_ray"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".driver", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
