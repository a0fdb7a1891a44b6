"""A key's images taken out of "ok": the line that says so, the files set aside, put back."""

# The order is what keeps the ledger true at every crash point: the withdrawing line is
# appended before a file moves, a file moves back before the ok line that names it again.
# A key is withdrawn when its job changed, or when its files went missing or bad.

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath
from typing import Any

from ..errors import ImageDataError
from ..net.answered import Answered, placed
from ..results import WITH_DOWNLOADS
from .imagecheck import check_image
from .interface import Store

REPLACED_DIR = "replaced"
# Error kinds of a failed line that withdraws a key's images (each lists them under
# "withdrawn"): the job changed and is being regenerated, or a file is gone or damaged.
WITHDRAWN_KINDS = frozenset({"replaced", "missing_image", "corrupt_image"})
# The error field of a later failed line for the key (the new request failed) that carries
# the withdrawn images on, with the request they belong to: they stay findable until an ok
# line records the key again.
CARRIED = "withdrawn"
# The fields of the request withdrawn images belong to (a carried list records its own).
REQUEST_FIELDS = ("fingerprint", "model", "n")
# What a withdrawn image keeps of its ok line (plus "aside", where its file was put); "url"
# only for an image that came as a link.
IMAGE_FIELDS = ("index", "path", "format", "bytes", "sha256", "revised_prompt", "url")
# What a stat says for a name that is not there (as Path.is_file takes them).
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})
# What `check_file` finds wrong with a file (verify's problems, and its mark's error kind).
MISSING, NOT_A_FILE = "missing", "not_a_file"
SIZE, SHA256, UNDECODABLE, FORMAT = "size", "sha256", "undecodable", "format"


def image_name(relpath: object) -> str | None:
    """The name a recorded path gives: images/<job>/<file>, or None for any other path (a
    hand-edited ledger must not make cometbatch read or move files outside OUT/images)."""
    if not isinstance(relpath, str):
        return None
    parts = PurePosixPath(relpath).parts
    if len(parts) != 3 or parts[0] != "images" or any(p in ("", ".", "..") for p in parts):
        return None
    if "\\" in relpath or "\x00" in relpath:
        return None
    return "/".join(parts)


def aside_name(run_id: str, relpath: str) -> str | None:
    """Where an image recorded at `relpath` goes: replaced/<run_id>/<job>/<k>.<ext>.

    None for a path that does not name a file under OUT/images/ (a hand-edited ledger).
    """
    if image_name(relpath) is None:
        return None
    parts = PurePosixPath(relpath).parts
    return f"{REPLACED_DIR}/{run_id}/{parts[1]}/{parts[2]}"


def set_aside(store: Store, run_id: str, relpaths: Iterable[str]) -> int:
    """Move the existing files among `relpaths` aside; returns how many were moved.

    Raises OSError (ELOOP) for a file reached through a symbolic link below OUT, moving it
    nowhere: a job folder that links elsewhere must not have files taken from out there."""
    moves = []
    for relpath in relpaths:
        source = image_name(relpath)
        target = aside_name(run_id, relpath)
        if source is None or target is None or not _is_file(store, source):
            continue
        moves.append((source, target))
    store.move(moves)
    return len(moves)


def _is_file(store: Store, name: str) -> bool:
    """Whether `name` is a file (an error that says it is not there is a no)."""
    try:
        return store.stat(name).is_file
    except OSError as exc:
        if exc.errno in _ABSENT:
            return False
        raise


def check_file(store: Store, name: str, image: dict[str, Any]) -> tuple[str, str] | None:
    """(problem, detail) for a file against the image a ledger line records, or None when it
    is exactly that image: its size, its sha256, a whole image of the recorded format
    (imagecheck)."""
    try:
        entry = store.stat(name)
    except FileNotFoundError:
        return MISSING, "missing"
    except OSError as exc:
        return MISSING, f"cannot be read: {exc.strerror or exc}"
    if not entry.is_file:
        return NOT_A_FILE, "not a file"
    if entry.size != image.get("bytes"):
        return SIZE, f"{entry.size} bytes, the ledger records {image.get('bytes')}"
    try:
        data = store.read(name)
    except OSError as exc:
        return MISSING, f"cannot be read: {exc.strerror or exc}"
    if hashlib.sha256(data).hexdigest() != image.get("sha256"):
        return SHA256, "its content differs from what was recorded (sha256)"
    try:
        fmt = check_image(data)
    except ImageDataError as exc:
        return UNDECODABLE, f"not a whole image: {exc}"
    if fmt != image.get("format"):
        return FORMAT, f"a {fmt} image, the ledger records {image.get('format')}"
    return None


def is_whole(store: Store, name: str, image: dict[str, Any]) -> bool:
    """Whether `name` holds exactly the recorded image (see `check_file`)."""
    return check_file(store, name, image) is None


def recorded_image(image: dict[str, Any]) -> dict[str, Any]:
    """What an image of an ok line records (IMAGE_FIELDS), without what other lines add."""
    return {name: image[name] for name in IMAGE_FIELDS if name in image}


def withdraws(error: object) -> bool:
    """Whether a failed line's error says that the line lists withdrawn images: it took them
    out of ok (WITHDRAWN_KINDS), or it carries them on from the line that did (CARRIED)."""
    if not isinstance(error, dict):
        return False
    kind = error.get("kind")
    return (type(kind) is str and kind in WITHDRAWN_KINDS) or error.get(CARRIED) is True


def withdrawn(event: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The images a line took out of ok, or None when it is not such a line."""
    if not event or event.get("status") != "failed" or not withdraws(event.get("error")):
        return None
    taken = event.get("withdrawn")
    images = taken.get("images") if isinstance(taken, dict) else None
    if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
        return None
    return images


def plan_aside(store: Store, run_id: str, images: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each image with "aside": where its file will be kept once `set_aside` ran (its own
    file is at its path now), else where an earlier run kept it, else None (gone or bad)."""
    planned = []
    for image in images:
        entry = recorded_image(image)
        source = image_name(image.get("path"))
        earlier = image.get("aside")
        if source is not None and is_whole(store, source, image):
            entry["aside"] = aside_name(run_id, image["path"])
        elif isinstance(earlier, str) and _kept(earlier) is not None:
            entry["aside"] = earlier
        else:
            entry["aside"] = None
        planned.append(entry)
    return planned


def _kept(relpath: str) -> str | None:
    """The name a recorded "aside" path gives under OUT/replaced/, or None."""
    parts = PurePosixPath(relpath).parts
    if len(parts) != 4 or parts[0] != REPLACED_DIR or any(p in ("", ".", "..") for p in parts):
        return None
    return "/".join(parts)


def find_whole(store: Store, images: Sequence[dict[str, Any]]) -> list[str] | None:
    """Where each withdrawn image is whole now (at its path, or where it was set aside), or
    None if any of them is whole nowhere."""
    found = []
    for image in images:
        candidates = [image_name(image.get("path"))]
        if isinstance(image.get("aside"), str):
            candidates.append(_kept(image["aside"]))
        place = next((p for p in candidates if p is not None and is_whole(store, p, image)), None)
        if place is None:
            return None
        found.append(place)
    return found


def put_back(store: Store, images: Sequence[dict[str, Any]], found: Sequence[str]) -> int:
    """Move each image found aside back to its path (see `find_whole`); how many moved.

    Raises OSError (ELOOP) for a place or a path reached through a symbolic link below OUT,
    moving nothing."""
    moves = []
    for image, place in zip(images, found, strict=True):
        home = image_name(image["path"])
        assert home is not None  # find_whole checked the path
        if place != home:
            moves.append((place, home))
    store.move(moves)
    return len(moves)


def withdraw_event(
    latest: dict[str, Any],
    images: list[dict[str, Any]],
    *,
    run_id: str,
    kind: str,
    message: str,
    finished_at: str,
) -> dict[str, Any]:
    """The failed line that takes a key out of ok (appended before any of its files move);
    `latest` is its ok line or an earlier withdrawing line, whose usage and cost it keeps."""
    taken = latest.get("withdrawn") if withdrawn(latest) is not None else None
    origin = taken if isinstance(taken, dict) else latest
    return {
        "event": "result",
        "run_id": run_id,
        **{name: latest.get(name) for name in ("key", "job_id", "chunk")},
        "status": "failed",
        **{name: origin.get(name, latest.get(name)) for name in REQUEST_FIELDS},
        "images": [],
        "downloads": [],
        "attempts": 0,
        "ambiguous_retries": 0,
        "rate_limited": 0,
        "error": {
            "kind": kind,
            "status": None,
            "code": None,
            "message": message,
            "request_id": None,
            "retryable": True,
        },
        "latency_s": 0.0,
        "finished_at": finished_at,
        "usage": None,
        "cost": {"usd": 0.0, "basis": "none"},
        "metadata": latest.get("metadata"),
        # What the ok line held, so that the images can be recorded again as they were (and
        # when it was written: links recorded there are downloaded again only while fresh).
        "withdrawn": {
            "images": images,
            "usage": origin.get("usage"),
            "cost": origin.get("cost"),
            "run_id": origin.get("run_id"),
            "finished_at": origin.get("finished_at"),
            # The answer they came in (its request id, size, ...), when the line kept it.
            **Answered.of_line(origin).line_fields(),
            **_origin_state(origin),
        },
    }


def _origin_state(origin: dict[str, Any]) -> dict[str, Any]:
    """The status, links still to download and error of the partial or download_failed line
    a withdrawal took images from (or of the withdrawal it continues), written back with the
    images so that the rest is asked for or downloaded, never passed off as ok; nothing for
    an ok line, or a withdrawal recorded before they were kept."""
    if origin.get("status") not in WITH_DOWNLOADS:
        return {}
    downloads = origin.get("downloads")
    return {
        "status": origin["status"],
        "downloads": downloads if isinstance(downloads, list) else [],
        "error": origin.get("error"),
    }


# A line that records images again without sending anything: no attempt (paid.py counts no
# new payment), no wait.
UNSENT: dict[str, Any] = {
    "attempts": 0,
    "ambiguous_retries": 0,
    "rate_limited": 0,
    "latency_s": 0.0,
}


def reinstated_event(
    withdrawing: dict[str, Any], *, run_id: str, finished_at: str
) -> dict[str, Any]:
    """The line that records withdrawn images again, found whole (nothing was sent: no
    attempt, as `withdrawing` may be a failed request's): ok, or the partial or
    download_failed line they were withdrawn from, with its links still to download. Never
    ok with fewer images than the request's n: partial then, its rest asked for."""
    taken = withdrawing["withdrawn"]
    images = [recorded_image(image) for image in taken["images"]]
    event = {**withdrawing, "run_id": run_id}
    event.update({name: taken[name] for name in REQUEST_FIELDS if name in taken})
    status, error = taken.get("status"), taken.get("error")
    downloads = taken.get("downloads") if status in WITH_DOWNLOADS else None
    downloads = downloads if isinstance(downloads, list) else []
    n = event.get("n")
    if type(n) is int and len(images) + len(downloads) < n:
        # Short of the request (a partial line, or a withdrawal that did not record one).
        status, error = "partial", error if status == "partial" else None
    elif downloads:
        status = "download_failed"
    else:
        status, error = "ok", None
    event.update(status=status, images=images, downloads=downloads, error=error)
    event.update(UNSENT)
    event.update(finished_at=finished_at, usage=taken.get("usage"), cost=taken.get("cost"))
    del event["withdrawn"]
    return placed(event, Answered.of_line(taken))


def withdrawal(event: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a line withdrew (its "withdrawn" object), with the request the images belong to
    and the kind of withdrawal (a carried list records them; a withdrawing line is itself
    that request); None when it withdrew nothing."""
    if event is None or withdrawn(event) is None:
        return None
    taken = event["withdrawn"]
    error = event["error"]
    return {
        **taken,
        **{name: taken.get(name, event.get(name)) for name in REQUEST_FIELDS},
        "kind": taken.get("kind", error.get("kind")),
    }


def carry(failed: dict[str, Any], withdrawing: dict[str, Any]) -> dict[str, Any]:
    """A failed line for a key whose latest line withdrew images, carrying them on (without
    it, a rerun would no longer know that they were set aside, and would pay for them)."""
    taken = withdrawal(withdrawing)
    if taken is None:
        return failed
    return {**failed, "error": {**failed["error"], CARRIED: True}, "withdrawn": taken}
