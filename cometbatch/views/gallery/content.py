"""The gallery's content: an output folder's ledger (and the manifest it ran) as plain data."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from ...errors import ConfigError
from ...layouts.samples import SHARDS
from ...ledger.clustered import ClusterOutput, Shard, read_cluster, shard_manifest
from ...ledger.events import ledger_path, read_events
from ...manifest.reader import Manifest
from ...models.registry import recorded_registry
from ...paths import unlinked
from ...store.interface import Store
from ...store.local import LocalStore
from ...store.urls import store_of
from ..clusterstatus import read_cluster_status
from ..recorded import recorded_defaults
from ..status import read_status
from .model import GALLERY_NAME, LINKED, MAX_TILES, Bucket, Failure, Gallery, Tile
from .page import render_page
from .prompts import attach_manifest, read_job_texts

# Chart buckets: the narrowest width (seconds) that covers the run in at most MAX_BUCKETS.
MAX_BUCKETS = 120
_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


def parse_time(stamp: Any) -> float | None:
    """A ledger timestamp as seconds since the epoch (None when absent or unreadable)."""
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def safe_relpath(path: Any) -> str | None:
    """A ledger image path if it stays inside the folder (relative, no '..'), else None."""
    if not isinstance(path, str) or not path or "\\" in path:
        return None
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or ":" in pure.parts[0]:
        return None
    return path


def _mapping(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (a hand-edited ledger may differ)."""
    return value if isinstance(value, dict) else {}


def bucket_series(per_second: Mapping[int, list[int]]) -> tuple[int, list[Bucket]]:
    """Per-second counts (images, retries, 429s, failed) as at most MAX_BUCKETS buckets."""
    if not per_second:
        return 60, []
    first, last = min(per_second), max(per_second)
    fits = (w for w in _WIDTHS if last // w - first // w < MAX_BUCKETS)
    width = next(fits, math.ceil((last - first + 1) / (MAX_BUCKETS - 1)))
    origin = first - first % width
    buckets = [Bucket(float(origin + i * width)) for i in range((last - origin) // width + 1)]
    for second, (images, retries, throttled, failed) in per_second.items():
        bucket = buckets[(second - origin) // width]
        bucket.images += images
        bucket.retries += retries
        bucket.throttled += throttled
        bucket.failed += failed
    return width, buckets


def build_gallery(events: Iterable[dict[str, Any]], title: str = "") -> Gallery:
    """The page's content from ledger events, in ledger order (prompts come separately)."""
    gallery = Gallery(title=title)
    # Each key's latest outcome, kept as its tiles: the event dicts themselves are let go.
    latest: dict[str, tuple[list[Tile], Failure | None]] = {}
    per_second: dict[int, list[int]] = {}
    # Images a key's partial line listed: its next line lists them again, with the rest.
    listed: dict[str, int] = {}
    line_429s = summary_429s = 0
    for event in events:
        kind = event.get("event")
        if kind == "run":
            gallery.runs += 1
            settings = event.get("settings")
            gallery.simulated = gallery.simulated or bool(_mapping(settings).get("simulated"))
            gallery.first_at = gallery.first_at or event.get("started_at")
            if event.get("manifest"):
                gallery.manifest = str(event["manifest"])
                gallery.manifest_sha256 = event.get("manifest_sha256")
                gallery.run_settings = _mapping(settings)
                gallery.defaults = recorded_defaults(event)
        elif kind == "end":
            summary = event.get("summary")
            counted = _mapping(summary).get("rate_limited")
            # A hand-edited end line may hold anything here: only a count counts.
            summary_429s += counted if type(counted) is int and counted > 0 else 0
            gallery.last_at = event.get("finished_at") or gallery.last_at
        elif kind == "result":
            key = str(event.get("key"))
            latest[key] = _outcome(key, event)
            retries = max(int(event.get("attempts") or 1) - 1, 0)
            gallery.retries += retries
            gallery.last_at = event.get("finished_at") or gallery.last_at
            throttled = event.get("rate_limited")
            if not isinstance(throttled, int) or isinstance(throttled, bool) or throttled < 0:
                # Written before results counted their 429s: only a final 429 is known.
                gallery.per_result_429s = False
                throttled = int(_mapping(event.get("error")).get("status") == 429)
            line_429s += throttled
            images = len(event.get("images") or ())
            new_images = images - listed.pop(key, 0)
            if _pending(event):
                listed[key] = images
            moment = parse_time(event.get("finished_at"))
            if moment is not None:
                row = per_second.setdefault(math.floor(moment), [0, 0, 0, 0])
                row[0] += max(new_images, 0)
                row[1] += retries
                row[2] += throttled
                row[3] += event.get("status") != "ok" and not _pending(event)
    gallery.rate_limited = line_429s if gallery.per_result_429s else summary_429s
    gallery.bucket_s, gallery.buckets = bucket_series(per_second)
    gallery.tiles = [tile for tiles, _ in latest.values() for tile in tiles]
    gallery.failures = [failure for _, failure in latest.values() if failure is not None]
    # A job's images side by side, jobs in the order the ledger first saw them.
    order = {job_id: i for i, job_id in enumerate(dict.fromkeys(t.job_id for t in gallery.tiles))}
    gallery.tiles.sort(key=lambda t: (order[t.job_id], t.index if t.index is not None else -1))
    if len(gallery.tiles) > MAX_TILES:
        gallery.dropped_tiles = len(gallery.tiles) - MAX_TILES
        gallery.tiles = gallery.tiles[-MAX_TILES:]
    return gallery


def _outcome(key: str, event: dict[str, Any]) -> tuple[list[Tile], Failure | None]:
    """The tiles of one result line, and its failure when it is not ok."""
    job_id, model = str(event.get("job_id")), str(event.get("model"))
    status = str(event.get("status"))
    tiles = []
    for image in event.get("images") or ():
        image = _mapping(image)
        path = safe_relpath(image.get("path"))
        if path is not None:
            index, revised = image.get("index"), image.get("revised_prompt")
            index = index if isinstance(index, int) else None
            tiles.append(Tile(job_id, model, "ok", index, path, revised and str(revised)))
    if status == "ok":
        return tiles, None
    if _pending(event):
        # A short answer recorded before its rest was asked for: the rest is pending, not failed.
        missing = max(int(event.get("n") or 0) - len(tiles), 0)
        tiles.append(Tile(job_id, model, status, n=missing, reason="pending"))
        return tiles, None
    error = _mapping(event.get("error"))
    reason = str(error.get("kind") or "unknown")
    missing = max(int(event.get("n") or 0) - len(tiles), 0)
    tiles.append(Tile(job_id, model, status, n=missing, reason=reason))
    code = error.get("status")
    failure = Failure(
        key=key,
        job_id=job_id,
        model=model,
        kind=reason,
        message=str(error.get("message") or ""),
        status=code if isinstance(code, int) else None,
        code=str(error.get("code") or ""),
        request_id=str(error.get("request_id") or ""),
        finished_at=str(event.get("finished_at") or ""),
    )
    return tiles, failure


def _pending(event: dict[str, Any]) -> bool:
    """A partial line without an error: its missing images are still to be asked for."""
    return event.get("status") == "partial" and not event.get("error")


def read_gallery(
    out_dir: Store | str | os.PathLike[str], manifest: str | os.PathLike[str] | None = None
) -> Gallery:
    """The gallery of an output, read without its lock (a run may be writing it)."""
    store = store_of(out_dir)
    cluster = read_cluster(store)
    if cluster is not None:
        return _cluster_gallery(cluster, manifest)
    # Read once (on a store, merged from its segments), for the tiles and for status.
    ledger = ledger_path(store)
    events = (event.fields for event in read_events(ledger))
    if store.local_folder is not None:
        folder = Path(store.local_folder)
        gallery = build_gallery(events, title=folder.resolve().name)
        gallery.tiles = [_unfollowed(tile, folder) for tile in gallery.tiles]
    else:
        # An object store has no links to follow out of it.
        gallery = build_gallery(events, title=store.root.rpartition("/")[2])
    attach_manifest(gallery, Path(manifest) if manifest else None)
    # What crashes cost is counted once, by status (its prices and the manifest's sizes).
    listed = Path(manifest) if manifest else None
    gallery.crashes = read_status(store, manifest=listed, ledger=ledger).crashes
    return gallery


def _cluster_gallery(cluster: ClusterOutput, manifest: str | os.PathLike[str] | None) -> Gallery:
    """The gallery of every shard of a cluster output, its image paths relative to OUT."""
    store = cluster.store
    shards = cluster.started()
    events = (event for shard in shards for event in _shard_events(shard))
    gallery = build_gallery(events, title=_title(store))
    if store.local_folder is not None:
        gallery.tiles = [_unfollowed(tile, Path(store.local_folder)) for tile in gallery.tiles]
    gallery.runs = cluster.runs() or gallery.runs
    # Prompts: from the manifest given, else the one the plan names if it is here, else from
    # the manifest lines each shard was given (in the store).
    gallery.manifest, gallery.manifest_sha256 = cluster.manifest, cluster.manifest_sha256
    if manifest is not None or (cluster.manifest and Path(cluster.manifest).is_file()):
        attach_manifest(gallery, Path(manifest) if manifest else None)
    else:
        wanted = {tile.job_id for tile in gallery.tiles}
        for shard in shards:
            with shard_manifest(cluster, shard) as lines:
                if lines is not None:
                    registry = recorded_registry(gallery.run_settings)
                    shard_jobs = Manifest(lines, defaults=gallery.defaults, registry=registry)
                    gallery.jobs.update(read_job_texts(shard_jobs, wanted - set(gallery.jobs)))
    gallery.crashes = read_cluster_status(cluster, out_dir=store.root).crashes
    return gallery


def _shard_events(shard: Shard) -> Iterator[dict[str, Any]]:
    """A shard's ledger events, its result lines' image paths made relative to OUT."""
    for event in read_events(ledger_path(shard.store)):
        fields = event.fields
        if fields.get("event") == "result" and isinstance(fields.get("images"), list):
            images = [
                {**image, "path": shard.under_out(image["path"])}
                if isinstance(image, dict) and isinstance(image.get("path"), str) else image
                for image in fields["images"]
            ]  # fmt: skip
            fields = {**fields, "images": images}
        yield fields


def _title(store: Store) -> str:
    folder = store.local_folder
    return Path(folder).resolve().name if folder is not None else store.root.rpartition("/")[2]


def _unfollowed(tile: Tile, folder: Path) -> Tile:
    """`tile`, or a placeholder when its image is reached through a symbolic link."""
    # The page must not show a file from out of the folder.
    if tile.path is None or unlinked(folder, tile.path):
        return tile
    return dataclasses.replace(tile, status="not shown", path=None, n=1, reason=LINKED)


def publish_gallery(
    out: Store | str | os.PathLike[str], manifest: str | os.PathLike[str] | None = None
) -> str:
    """write_gallery for any output: the page put as OUT/index.html; where it is."""
    store = store_of(out)
    if store.local_folder is not None:
        return str(write_gallery(store.local_folder, manifest))
    _require_files_layout(store)
    page = render_page(read_gallery(store, manifest))
    asyncio.run(store.put(GALLERY_NAME, page.encode("utf-8")))
    return f"{store.root}/{GALLERY_NAME}"


def write_gallery(
    out_dir: str | os.PathLike[str], manifest: str | os.PathLike[str] | None = None
) -> Path:
    """Write OUT/index.html, a self-contained page of the folder's images; return its path."""
    _require_files_layout(LocalStore(out_dir), str(out_dir))
    gallery = read_gallery(out_dir, manifest)
    target = Path(out_dir) / GALLERY_NAME
    temporary = target.with_name(f".{GALLERY_NAME}.tmp")
    temporary.write_text(render_page(gallery), encoding="utf-8")
    os.replace(temporary, target)
    return target


def _require_files_layout(store: Store, name: str | None = None) -> None:
    """ConfigError when the output keeps its images in shards: the gallery shows files."""
    cluster = read_cluster(store)
    outputs = [shard.store for shard in cluster.shards] if cluster is not None else [store]
    if any(output.names(SHARDS) for output in outputs):
        raise ConfigError(
            f"{name or store.root} keeps its images in dataset shards ({SHARDS}/): the gallery "
            "shows an output of the files layout (run with --layout files)"
        )
