"""Recorded images against the disk: a run's quick look (is each file there?) and `verify`'s
full check (there, its recorded size and sha256, and a whole image), which marks bad keys."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from ..errors import LedgerError, OutputError
from ..paths import EXTENSIONS, safe_component, unlinked
from ..store.interface import Store
from ..store.setaside import (
    MISSING,
    SHA256,
    check_file,
    image_name,
    recorded_image,
    withdraw_event,
    withdrawal,
)
from ..store.shardfiles import read_members
from ..store.urls import is_url, store_of
from .clustered import ClusterOutput, read_cluster
from .events import LEDGER_NAME, SHARD_EVENT, now_iso, read_events
from .index import LedgerState
from .keystate import KeyState
from .writer import Ledger

# Files checked at once by `verify` (reading and hashing let go of the interpreter lock).
_READERS = 4
_BATCH = 256
# verify's problems are aside.check_file's and this one.
OUTSIDE = "outside"
# A file of a key an earlier check (or a regeneration cut short) took out of ok.
MARKED = "marked"
_EXTENSIONS = tuple(dict.fromkeys(EXTENSIONS.values()))


class ImagePresence:
    """Whether an ok key's files are still there, at a system call per image (local folders)."""

    # One access() per image, by its usual name, and an lstat() of its job folder (one that is
    # a symbolic link holds none, for a run). A compact ledger row does not hold its images'
    # formats, so the extension comes from the job's output_format, else from the last image
    # found; only when no name is there is the key's ledger line read and its recorded paths
    # looked at, so the common case reads nothing (a million keys in a few seconds).

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._images = os.path.join(out_dir, "images", "")
        self._ext = _EXTENSIONS[0]

    def __repr__(self) -> str:
        return f"<ImagePresence {self._images!r} guess={self._ext}>"

    def missing(
        self, job_id: str, indexes: range, state: KeyState, output_format: str | None = None
    ) -> bool:
        """Whether a file the ok `state` names is gone (for the request of `indexes`); files
        reached through a job folder that is a symbolic link are not there (paths.unlinked).
        It does a system call an image or more: a run calls it in a thread (Triage.looked)."""
        folder = f"{self._images}{safe_component(job_id)}/"
        if os.path.islink(folder[:-1]):
            return True
        ext = EXTENSIONS.get(output_format or "") or self._ext
        access = os.access
        for index in indexes:
            if not access(f"{folder}{index}.{ext}", os.F_OK) and not self._other(
                f"{folder}{index}.", ext, output_format is None
            ):
                return self._recorded_missing(state)
        return False

    def _other(self, stem: str, tried: str, learn: bool) -> bool:
        """Whether the image is there under another extension (remembered when `learn`)."""
        for ext in _EXTENSIONS:
            if ext != tried and os.access(stem + ext, os.F_OK):
                if learn:
                    self._ext = ext
                return True
        return False

    def _recorded_missing(self, state: KeyState) -> bool:
        """The exact answer from the paths the key's line records (read from the ledger)."""
        for image in state.images:
            name = image_name(image["path"])
            if (
                name is None
                or not unlinked(self.out_dir, name)
                or not (self.out_dir / name).is_file()
            ):
                return True
        return False


@dataclass(frozen=True, slots=True)
class BadImage:
    """One recorded image that is not what its ok line says."""

    key: str
    index: int
    path: str
    problem: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class VerifyReport:
    """What `verify` found in a folder, and how many keys it marked for the next run."""

    out_dir: str
    checked_keys: int = 0
    checked_images: int = 0
    bad: list[BadImage] = field(default_factory=list)
    marked_keys: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "ok": self.ok,
            "checked_keys": self.checked_keys,
            "checked_images": self.checked_images,
            "bad_images": len(self.bad),
            "bad_keys": len({bad.key for bad in self.bad}),
            "marked_keys": self.marked_keys,
            "bad": [bad.to_dict() for bad in self.bad],
        }


def report_lines(report: VerifyReport) -> list[str]:
    """`verify` for a person (the CLI escapes what it prints)."""
    checked = (
        f"{report.checked_images} image(s) of {report.checked_keys} ok request(s) "
        f"in {report.out_dir}"
    )
    if report.ok:
        return [f"checked {checked}: all good"]
    lines = [f"checked {checked}: {len(report.bad)} bad"]
    lines += [f"  {bad.path} ({bad.key}): {bad.detail}" for bad in report.bad]
    if report.marked_keys:
        lines.append(
            f"marked {report.marked_keys} request(s) in the ledger: the next `cometbatch run` "
            "of the manifest restores them (downloaded again while their links work, else "
            "generated again)"
        )
    return lines


def check_recorded(store: Store, image: dict[str, Any]) -> tuple[str, str] | None:
    """(problem, detail) for one recorded image, or None when it is exactly as recorded
    (aside.check_file, at its path under OUT/images, reached through no link outside it)."""
    name = image_name(image.get("path"))
    if name is None:
        return OUTSIDE, "the ledger names a path outside the images folder"
    try:
        if store.escapes(name, "images"):
            return OUTSIDE, "a link that leads outside the images folder"
    except OSError as exc:
        return MISSING, f"cannot be read: {exc.strerror or exc}"
    return check_file(store, name, image)


def _recorded_images(state: LedgerState) -> Iterator[tuple[KeyState, dict[str, Any], str | None]]:
    """Each image of an ok key (None), and each image a line withdrew (that line's kind)."""
    for key, recorded in state.items():
        if recorded.status == "ok" and key not in state.packed:
            for image in recorded.images:
                yield recorded, image, None
        elif recorded.status == "failed" and recorded.withdraws:
            # Only a line flagged when the ledger was read is read again, for its images.
            taken = withdrawal(recorded.line_event())
            if taken is not None:
                for image in taken["images"]:
                    yield recorded, image, str(taken["kind"])


def _check(store: Store, image: dict[str, Any], marked: str | None) -> tuple[str, str] | None:
    if marked is None:
        return check_recorded(store, image)
    if check_recorded(store, image) is None:
        return None
    return MARKED, f"marked earlier ({marked}): the next run restores it"


def check_folder(store: Store, state: LedgerState, report: VerifyReport) -> dict[str, KeyState]:
    """Check every ok image (a few files at a time) and every image a line took out of ok
    and not put back yet; the bad ones go into `report`; returns the ok keys to mark."""
    bad: dict[str, KeyState] = {}
    keys: set[str] = set()
    images = _recorded_images(state)
    with ThreadPoolExecutor(_READERS, thread_name_prefix="cometbatch-verify") as pool:
        while batch := list(islice(images, _BATCH)):
            found = pool.map(lambda item: _check(store, item[1], item[2]), batch)
            for (recorded, image, marked), problem in zip(batch, found, strict=True):
                if marked is None:
                    keys.add(recorded.key)
                    report.checked_images += 1
                if problem is None:
                    continue
                if marked is None:
                    bad[recorded.key] = recorded
                path = str(image.get("path"))
                report.bad.append(BadImage(recorded.key, image.get("index", -1), path, *problem))
    report.checked_keys = len(keys)
    return bad


def check_shards(store: Store, path: Path, report: VerifyReport) -> None:
    """Check each committed shard's samples: there, with the sha256 recorded at packing."""
    # Bad ones are reported, not marked: the shard holds them, no run would restore them.
    for event in read_events(path):
        if event.kind != SHARD_EVENT:
            continue
        shard, samples = str(event.fields["shard"]), event.fields["samples"]
        report.checked_images += len(samples)
        report.checked_keys += len({sample["key"] for sample in samples})
        try:
            # Read and hashed a few samples at a time: a shard can be gigabytes.
            with store.open_read(shard) as source:
                members = {
                    key: hashlib.sha256(data).hexdigest()
                    for key, data in read_members(source, str(event.fields["layout"]))
                }
            problem = None
        except (OSError, ValueError) as exc:
            members, problem = {}, f"the shard cannot be read: {exc}"
        for sample in samples:
            digest = members.get(sample["sample"])
            if digest is None:
                detail = problem or "not in the shard"
                found = (MISSING, detail)
            elif digest != sample["sha256"]:
                found = (SHA256, "its sha256 is not the one recorded when it was packed")
            else:
                continue
            where = f"{shard}#{sample['sample']}"
            report.bad.append(BadImage(sample["key"], sample["index"], where, *found))


def _mark(run_id: str, recorded: KeyState, problems: list[BadImage]) -> dict[str, Any]:
    """The line that takes a bad key out of ok, so that the next run restores it."""
    latest = recorded.line_event_or_rebuilt()
    kind = "missing_image" if all(p.problem == MISSING for p in problems) else "corrupt_image"
    named = ", ".join(f"{p.path} ({p.detail})" for p in problems)
    # verify moves nothing: no image is kept aside, the whole ones are still at their paths.
    images = [{**recorded_image(image), "aside": None} for image in latest.get("images") or []]
    return withdraw_event(
        latest,
        images,
        run_id=run_id,
        kind=kind,
        message=(
            f"cometbatch verify found {named}; the next run restores it (downloaded again "
            "while its links work, else generated again)"
        ),
        finished_at=now_iso(),
    )


async def verify_folder(
    out_dir: Store | str | os.PathLike[str], *, mark: bool = True
) -> VerifyReport:
    """Check every ok image of an output (under its lock); with `mark`, append a line per bad
    key that the next run reads as "restore these"."""
    store = store_of(out_dir)
    # A local folder is named as given (as before); a store by its URL.
    shown = store.root
    if isinstance(out_dir, str | os.PathLike) and not is_url(out_dir):
        shown = str(Path(out_dir))
    try:
        cluster = await asyncio.to_thread(read_cluster, store)
        if cluster is not None:
            return await _verify_shards(cluster, shown, mark)
        present = await asyncio.to_thread(store.has_log, LEDGER_NAME)
    except OSError as exc:
        raise OutputError(f"cannot read {shown}: {exc.strerror or exc}") from exc
    if not present:
        raise LedgerError(f"{shown} has no {LEDGER_NAME}: nothing to verify there")
    report = VerifyReport(out_dir=shown)
    async with Ledger(store.root, store=store) as ledger:
        # Reading and hashing a large folder takes a while: keep the event loop free.
        bad = await asyncio.to_thread(check_folder, store, ledger.state, report)
        if ledger.state.shards:
            await asyncio.to_thread(check_shards, store, ledger.path, report)
        if not bad or not mark:
            return report
        # Its lines carry a run id of their own, without run and end events: verify is not a
        # run, and `status` reads the latest run event for the manifest a run used.
        run_id = uuid.uuid4().hex[:12]
        problems: dict[str, list[BadImage]] = {}
        for found in report.bad:
            problems.setdefault(found.key, []).append(found)
        for key, recorded in bad.items():
            event = await asyncio.to_thread(_mark, run_id, recorded, problems[key])
            await ledger.append(event)
            report.marked_keys += 1
    return report


async def _verify_shards(cluster: ClusterOutput, shown: str, mark: bool) -> VerifyReport:
    """verify_folder of each shard a run wrote to, as one report naming paths under OUT."""
    started = await asyncio.to_thread(cluster.started)
    if not started:
        raise LedgerError(f"{shown} is a cluster output no run wrote to yet: nothing to verify")
    report = VerifyReport(out_dir=shown)
    for shard in started:
        part = await verify_folder(shard.store, mark=mark)
        report.checked_keys += part.checked_keys
        report.checked_images += part.checked_images
        report.marked_keys += part.marked_keys
        report.bad += [dataclasses.replace(bad, path=shard.under_out(bad.path)) for bad in part.bad]
    return report
