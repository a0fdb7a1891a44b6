"""`status` of any output: an ordinary one as read_status reads it; a cluster output as the sum
of its shards, each read the same way against the manifest lines it was given."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..costs.prices import PriceTable
from ..engine.forecast import forecast, ledger_verdicts
from ..errors import CometBatchError, ConfigError
from ..ledger.clustered import ClusterOutput, Shard, read_cluster, shard_manifest
from ..store.interface import Store
from ..store.liverun import RunState
from ..store.urls import is_url, store_of
from .recorded import recorded_manifest
from .status import FolderStatus, ModelStatus, read_status

__all__ = ["read_cluster_status", "read_output_status", "shard_done"]

_READERS = 8
# The whole's state, from its shards' (the first that any shard is in wins).
_STATES: tuple[RunState, ...] = ("running", "crashed", "interrupted", "unknown", "finished")


def read_output_status(
    out: Store | str | Path,
    *,
    manifest: str | Path | None = None,
    prices: PriceTable | None = None,
) -> FolderStatus:
    """read_status of OUT, or of every shard summed when OUT is a cluster run's output."""
    cluster = read_cluster(out)
    if cluster is None:
        return read_status(out, manifest=manifest, prices=prices)
    if manifest is not None:
        raise ConfigError(
            "--manifest does not apply to a cluster output: each shard's pending work comes "
            "from the manifest lines it was given (cluster/shards/)"
        )
    shown = str(out) if isinstance(out, str | os.PathLike) and not is_url(out) else None
    return read_cluster_status(cluster, out_dir=shown or store_of(out).root, prices=prices)


def shard_done(status: FolderStatus) -> bool:
    """Whether a shard's ledger has every planned request of its manifest ok."""
    totals = status.to_dict()
    # A shard the cut left empty is done once its (empty) manifest lines are there.
    return status.pending_known and totals["pending_requests"] == totals["failed_requests"] == 0


def read_cluster_status(
    cluster: ClusterOutput, *, out_dir: str, prices: PriceTable | None = None
) -> FolderStatus:
    """Every shard's status, summed; `cluster` says how many shards there are and are done."""
    whole = FolderStatus(out_dir=out_dir, pending_known=True, manifest=cluster.manifest)
    states: set[RunState] = set()
    done = 0
    # Shards are read a few at a time: on an object store each read is a few round trips.
    with ThreadPoolExecutor(_READERS, thread_name_prefix="cometbatch-status") as pool:
        parts = pool.map(lambda shard: _shard_status(cluster, shard, prices), cluster.shards)
    for shard, part in zip(cluster.shards, parts, strict=True):
        done += shard_done(part)
        if part.runs:
            states.add(part.state)
        _add(whole, part, shard)
    # Each cluster run is a run of every shard it reached: counted once.
    whole.runs = cluster.runs() or whole.runs
    whole.state = next((state for state in _STATES if state in states), "unknown")
    whole.state_detail = "" if len(states) <= 1 else f"shards are {', '.join(sorted(states))}"
    whole.last_run_ended = whole.state in ("finished", "interrupted")
    whole.cluster = {"shards": len(cluster.shards), "shards_done": done}
    return whole


def _shard_status(cluster: ClusterOutput, shard: Shard, prices: PriceTable | None) -> FolderStatus:
    """One shard as read_status reads it (pending from its manifest lines)."""
    with shard_manifest(cluster, shard) as lines:
        if shard.has_ledger():
            return read_status(shard.store, manifest=lines, prices=prices)
        status = FolderStatus(out_dir=shard.store.root)
        if lines is None:
            status.manifest_note = f"pending work is unknown: no {shard.manifest_name}"
            return status
        try:
            manifest = recorded_manifest({}, lines)
            manifest.validate()
            plan = forecast(manifest, ledger_verdicts(manifest.registry, lambda key: None))
        except (CometBatchError, OSError) as exc:
            status.manifest_note = (
                f"pending work is unknown: cannot read {shard.manifest_name}: {exc}"
            )
            return status
    for name, item in plan.by_model.items():
        status.by_model[name] = ModelStatus(
            pending_requests=item.new_requests, pending_images=item.new_images
        )
    status.pending_known = True
    return status


def _add(whole: FolderStatus, part: FolderStatus, shard: Shard) -> None:
    """Fold one shard's status into the whole (counts summed, the span widened)."""
    whole.keys += part.keys
    whole.runs = max(whole.runs, part.runs)
    for name, model in part.by_model.items():
        total = whole.by_model.setdefault(name, ModelStatus(pending_requests=0, pending_images=0))
        total.ok_requests += model.ok_requests
        total.failed_requests += model.failed_requests
        total.ok_images += model.ok_images
        total.failed_images += model.failed_images
        total.pending_requests = (total.pending_requests or 0) + (model.pending_requests or 0)
        total.pending_images = (total.pending_images or 0) + (model.pending_images or 0)
    whole.failures.update(part.failures)
    for kind, example in part.failure_examples.items():
        whole.failure_examples.setdefault(kind, example)
    whole.awaiting_download += part.awaiting_download
    whole.links_gone += part.links_gone
    whole.retries += part.retries
    whole.ambiguous_retries += part.ambiguous_retries
    starts = [at for at in (whole.first_at, part.first_at) if at]
    ends = [at for at in (whole.last_at, part.last_at) if at]
    whole.first_at = min(starts, default=None)
    whole.last_at = max(ends, default=None)
    whole.spend_usd += part.spend_usd
    whole.paid_images += part.paid_images
    whole.unpriced_images += part.unpriced_images
    whole.prices = part.prices or whole.prices
    whole.simulated_runs = max(whole.simulated_runs, part.simulated_runs)
    whole.layout = part.layout if part.runs else whole.layout
    whole.shards += part.shards
    whole.packed_images += part.packed_images
    # Jobs are cut into shards whole: a key is in one shard only.
    whole.unanswered.update(part.unanswered)
    whole.crashes += part.crashes
    whole.pending_known = whole.pending_known and part.pending_known
    if part.manifest_note and not whole.manifest_note:
        whole.manifest_note = f"shard {shard.id}: {part.manifest_note}"
