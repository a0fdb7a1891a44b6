"""A key's recorded images set aside before it is generated again, and put back when whole."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..ledger.events import now_iso
from ..ledger.keystate import KeyState
from ..ledger.writer import Ledger
from ..results import OK, PendingDownload
from ..store.interface import Store
from ..store.setaside import (
    REPLACED_DIR,
    UNSENT,
    WITHDRAWN_KINDS,
    find_whole,
    plan_aside,
    put_back,
    reinstated_event,
    set_aside,
    withdraw_event,
    withdrawal,
    withdrawn,
)
from ..store.sink import Sink
from .fetch import Fetcher
from .triage import Work

log = logging.getLogger(__name__)


class Restorer:
    """Moves a key's images aside (a line first) and back (then a line), in the ledger's order."""

    def __init__(
        self, *, out_dir: Path | str, run_id: str, ledger: Ledger, fetcher: Fetcher, sink: Sink
    ) -> None:
        self.out_dir = out_dir
        # Where the images are: the store the sink writes to.
        self.store: Store = sink.store
        self.run_id = run_id
        self._ledger = ledger
        self._fetcher = fetcher
        self._sink = sink

    def __repr__(self) -> str:
        return f"<Restorer out_dir={str(self.out_dir)!r} run_id={self.run_id}>"

    async def set_aside(self, verdict: str, recorded: KeyState) -> tuple[dict[str, Any], str]:
        """Take a key's images out of ok before it is generated again; the line and its kind."""
        # First a line that says so, then the files moved to OUT/replaced/<run>/ (never
        # overwritten): a kill at any point leaves a ledger naming only files that are there.
        latest = await asyncio.to_thread(recorded.line_event_or_rebuilt)
        earlier = withdrawal(latest)
        images = earlier["images"] if earlier is not None else list(latest.get("images") or ())
        where = f"{REPLACED_DIR}/{self.run_id}/"
        # Restoring: the kind of the withdrawal it continues, or files an ok line names gone.
        kind = "replaced" if verdict == "changed" else "missing_image"
        if verdict != "changed" and earlier is not None and earlier["kind"] in WITHDRAWN_KINDS:
            kind = earlier["kind"]
        if verdict == "changed":
            message = f"the job changed: its images were set aside in {where} to generate it again"
        elif kind == "replaced":
            message = (
                f"the images set aside when its job changed are not all whole; the rest were set "
                f"aside in {where} to generate it again"
            )
        else:
            message = (
                f"images of this request were gone or damaged; the rest were set aside in "
                f"{where} to generate it again"
            )
        try:
            planned = await asyncio.to_thread(plan_aside, self.store, self.run_id, images)
            line = withdraw_event(
                latest,
                planned,
                run_id=self.run_id,
                kind=kind,
                message=message,
                finished_at=now_iso(),
            )
            await self._ledger.append(line)
            relpaths = [image["path"] for image in images]
            moved = await asyncio.to_thread(set_aside, self.store, self.run_id, relpaths)
        except OSError as exc:
            raise OutputError(
                f"cannot move the old images of job {recorded.job_id!r} aside in "
                f"{self.out_dir}: {exc.strerror or exc}"
            ) from exc
        if moved:
            log.info(
                "job %r: %d old image(s) moved to %s",
                recorded.job_id,
                moved,
                f"{self.out_dir}/{REPLACED_DIR}/{self.run_id}",
            )
        return line, kind

    async def put_back(self, work: Work) -> tuple[dict[str, Any], int] | None:
        """Record a key's images again if each is whole; the line and their count, else None."""
        # Whole at its path, where it was set aside (moved back first), or, for a
        # "redownload", downloaded again from the link it came from (nothing is generated).
        recorded = work.recorded
        if recorded is None:
            return None
        latest = await asyncio.to_thread(recorded.line_event)
        if latest is None:
            return None
        images = withdrawn(latest)
        taken = withdrawal(latest)
        if images is None and latest.get("status") == OK and work.verdict == "redownload":
            # Files gone from under an ok line: downloaded to their paths, the line repeated.
            images = list(latest.get("images") or ())
        # (A download_failed line may have withdrawn no image, only links to download.)
        if images is None or not (images or (taken is not None and taken.get("downloads"))):
            return None
        found = await asyncio.to_thread(find_whole, self.store, images)
        if found is None and work.verdict == "redownload":
            found = await self._download_again(recorded.job_id, images)
        if found is None:
            return None
        try:
            await asyncio.to_thread(put_back, self.store, images, found)
        except OSError as exc:
            raise OutputError(
                f"cannot move the images of job {recorded.job_id!r} back in {self.out_dir}: "
                f"{exc.strerror or exc}"
            ) from exc
        if taken is not None:
            line = reinstated_event(latest, run_id=self.run_id, finished_at=now_iso())
        else:
            line = repeated_event(latest, run_id=self.run_id, finished_at=now_iso())
        await self._ledger.append(line)
        return line, len(images)

    async def _download_again(self, job_id: str, images: list[dict[str, Any]]) -> list[str] | None:
        """Download the images whole nowhere from their links; where each is whole, or None."""
        # The Fetcher's retries, nothing generated; a dead link or a file that is not the
        # recorded one gives None (such files are removed).
        lost = await asyncio.to_thread(_whole_nowhere, self.store, images)
        if not all(type(image.get("url")) is str for image in lost):
            return None
        links = [
            PendingDownload(image["index"], image["url"], image.get("revised_prompt"))
            for image in lost
        ]
        # A link that no longer works is expected here: the request is generated instead.
        fetched = await self._fetcher.fetch(job_id, links, failures=logging.INFO)
        by_index = {image["index"]: image for image in lost}
        other = [
            record
            for record in fetched.images
            if (record.sha256, record.bytes) != _digest(by_index[record.index])
        ]
        if other:
            # Not the image that was paid for: it must not stand under the recorded name.
            self._sink.discard(other)
        if fetched.pending or other:
            log.info(
                "job %r: %d image(s) could not be downloaded again; generating them again",
                job_id,
                len(fetched.pending) + len(other),
            )
            return None
        log.info("job %r: %d image(s) downloaded again from their links", job_id, len(lost))
        return await asyncio.to_thread(find_whole, self.store, images)


def repeated_event(latest: dict[str, Any], *, run_id: str, finished_at: str) -> dict[str, Any]:
    """An ok line recorded again once its lost files were downloaded again; nothing sent."""
    # The same images, usage and cost; attempts 0, so paid.py counts no new payment.
    return {**latest, "run_id": run_id, **UNSENT, "finished_at": finished_at}


def _whole_nowhere(store: Store, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The images whole neither at their path nor where they were set aside."""
    return [image for image in images if find_whole(store, [image]) is None]


def _digest(image: dict[str, Any]) -> tuple[object, object]:
    return image.get("sha256"), image.get("bytes")
