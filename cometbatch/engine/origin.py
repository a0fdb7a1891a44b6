"""Which manifest an output folder's ledger came from, so that a run of another one into it is
said out loud, with what it would pay for, before anything is sent."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..costs.prices import CostEstimate, format_usd
from ..errors import AuthenticationError
from ..ledger.clustered import refuse_cluster_output
from ..plan import Request
from ..settings import KEY_ENV, Settings
from ..store.interface import Store


def other_manifest(last_run: Mapping[str, Any] | None, path: Path, sha256: str) -> str | None:
    """The manifest the folder's last run recorded, when that was another file with other
    content than `path` (whose content hashes to `sha256`); else None.

    The same file edited (lines added, say) is not another manifest, and neither is the same
    content under another name."""
    if not last_run:
        return None
    recorded = last_run.get("manifest")
    if not isinstance(recorded, str) or not recorded or last_run.get("manifest_sha256") == sha256:
        return None
    return None if _same_file(recorded, path) else recorded


def _same_file(recorded: str, path: Path) -> bool:
    """Whether a recorded manifest path names `path` (a relative one read from here)."""
    try:
        return os.path.samefile(recorded, path)
    except OSError:  # gone, or never was here: compare the names as written
        return Path(recorded).resolve() == path.resolve()


@dataclass(slots=True)
class NewWork:
    """Requests a folder's ledger has no record of: what a run pays for afresh."""

    cost: CostEstimate = field(default_factory=CostEstimate)
    jobs: int = 0
    requests: int = 0

    @property
    def images(self) -> int:
        """Images of those requests: the estimate counts each, priced or not."""
        return self.cost.priced_images + self.cost.unpriced_images

    def add(self, requests: list[Request]) -> None:
        """Count one job's requests that the ledger has never recorded (none: nothing)."""
        if not requests:
            return
        self.jobs += 1
        self.requests += len(requests)
        self.cost.add_all(requests)


def other_manifest_text(
    out_dir: object,
    recorded: str,
    manifest: object,
    new: tuple[int, int, int],
    cost: float | None = None,
) -> str:
    """The warning for a run (or plan) of `manifest` into a folder filled from `recorded`;
    `new` counts the jobs, requests and images the folder has no record of, `cost` their
    estimate in dollars (None: not known)."""
    jobs, requests, images = new
    adds = f"{manifest} adds no new job to it"
    if requests:
        about = "" if cost is None else f", about {format_usd(cost)}"
        adds = (
            f"{manifest} adds {jobs} new job(s) to it: {requests} request(s), {images} image(s) "
            f"to pay for{about}"
        )
    return (
        f"{out_dir} holds the results of another manifest ({recorded}); {adds} "
        "(use another --out to keep them apart)"
    )


def refuse_to_open(settings: Settings, store: Store) -> None:
    """An engine does not open without a key (every request would be a 401) or on a cluster
    run's OUT (it would send again what the shards made). Blocking: one look at OUT."""
    # The simulated API too takes a key, any key, so `run --simulate` and tests pass one.
    if settings.resolved_key() is None:
        raise AuthenticationError(
            f"no API key: pass Settings(api_key=...) or set {KEY_ENV}; nothing was sent"
        )
    refuse_cluster_output(store)
