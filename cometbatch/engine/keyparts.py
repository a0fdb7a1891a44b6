"""A key's parts, pure: what a request starts from, what to ask next, what its lines say."""

from __future__ import annotations

import time

from ..errors import APIError
from ..net.retry import possibly_billed
from ..plan import Request, part
from ..results import DOWNLOAD_FAILED, FAILED, OK, PARTIAL, ImageRecord, PendingDownload, Result
from .attempts import Sent
from .resume import link_given_up
from .triage import Work

__all__ = ["key_status", "made_images", "maybe_billed", "next_part", "recorded_sent"]


def next_part(request: Request, sent: Sent) -> Request:
    """The first run of indexes `sent` has no image for (a short answer's tail, or a gap)."""
    have = {image.index for image in sent.images} | {item.index for item in sent.pending}
    first = next(index for index in request.indexes if index not in have)
    stop = next((index for index in range(first, request.indexes.stop) if index in have), None)
    return part(request, first, (request.indexes.stop if stop is None else stop) - first)


def recorded_sent(work: Work) -> Sent:
    """The images (and pending downloads) a fetch or a partial key starts from."""
    recorded = work.recorded
    if work.verdict not in ("fetch", "rest") or recorded is None:
        return Sent()
    pending = [PendingDownload(*item) for item in recorded.downloads]
    if work.verdict == "rest":
        # A partial key's given-up links are not downloaded again: asked for with the rest.
        now = time.time()
        pending = [p for p in pending if not link_given_up(p.tries, p.first_failed_at, now)]
    return Sent(
        images=[ImageRecord(**image) for image in recorded.images],
        pending=pending,
        usage=recorded.usage if work.verdict == "rest" else None,
        # The answer these images came in, until a later answer brings more.
        answered=recorded.answered,
    )


def key_status(sent: Sent, n: int) -> str:
    """The status a key's images so far make: all (ok, or download_failed), none, or some."""
    if sent.generated >= n:
        return DOWNLOAD_FAILED if sent.pending else OK
    return PARTIAL if sent.generated else FAILED


def made_images(result: Result) -> int:
    """Images a recorded line says were generated."""
    return 0 if result.status == FAILED else len(result.images) + len(result.downloads)


def maybe_billed(error: APIError) -> bool:
    """A final failure that may have generated (and billed) images all the same."""
    return error.kind == "ambiguous" or possibly_billed(error)
