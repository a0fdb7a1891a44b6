"""Downloads of generated images: retried on their own, never by generating the image again."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import RetryCallState

from .._version import __version__
from ..errors import APIError, DownloadError, ImageDataError, OutputError
from ..ledger.events import now_iso, read_events
from ..ledger.lines import ResultEvent
from ..ledger.writer import Ledger
from ..net.client import Client
from ..net.response import MASK
from ..net.retry import RetryPolicy, retrying
from ..results import DOWNLOAD_FAILED, OK, ImageRecord, PendingDownload
from ..settings import DEFAULT_CONCURRENCY, Settings
from ..store.interface import Store
from ..store.sink import Sink
from ..store.urls import store_of
from .resume import LINK_GONE, links_given_up
from .summary import Summary

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
DOWNLOAD_ATTEMPTS = 4


@dataclass(slots=True)
class Fetched:
    """What fetching a request's image URLs came to: files written, URLs still pending."""

    images: list[ImageRecord] = field(default_factory=list)
    pending: list[PendingDownload] = field(default_factory=list)
    # The last download failure, when some URL is still pending.
    error: APIError | None = None


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.info("retrying a download after attempt %d failed: %s", state.attempt_number, exc)


class Fetcher:
    """Downloads image URLs (retrying each a few times) and writes them through the sink."""

    def __init__(
        self,
        client: Client,
        sink: Sink,
        policy: RetryPolicy,
        sleep: Sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.sink = sink
        self.sleep = sleep
        # Wall-clock time: a link's age is compared across runs, in the ledger's timestamps.
        self.clock = clock
        # The generation policy's backoff, with fewer attempts: a link either works or expires.
        self.policy = RetryPolicy(
            max_attempts=DOWNLOAD_ATTEMPTS,
            backoff_base=policy.backoff_base,
            backoff_max=policy.backoff_max,
            rand=policy.rand,
        )
        # A link the key was blanked out of is tried once: it can hardly work again.
        self.once = dataclasses.replace(self.policy, max_attempts=1)

    def __repr__(self) -> str:
        return f"<Fetcher attempts={self.policy.max_attempts} sink={self.sink!r}>"

    async def fetch(
        self, job_id: str, pending: Iterable[PendingDownload], *, failures: int = logging.WARNING
    ) -> Fetched:
        """Download and write each pending image; failures stay pending, with their URL and
        one more failed try, logged at `failures`; links given up make the error final (see
        resume.LINK_TRIES)."""
        fetched = Fetched()
        for item in pending:
            try:
                record = await self._download_whole(job_id, item)
            except DownloadError as exc:
                if MASK in item.url:
                    exc = key_in_link_error(exc)
                log.log(
                    failures, "image %d of job %r was not downloaded: %s", item.index, job_id, exc
                )
                fetched.pending.append(self._failed_again(item))
                if fetched.error is None or fetched.error.retryable:
                    fetched.error = exc  # a link gone for good makes the request's error final
                continue
            except BaseException as exc:
                # Nothing of this fetch will be recorded: its new files must not stay behind.
                self.sink.discard(fetched.images)
                if isinstance(exc, OSError):
                    raise output_error(self.sink, exc) from exc
                raise
            fetched.images.append(record)
        links = [(item.tries, item.first_failed_at) for item in fetched.pending]
        error = fetched.error
        if error is not None and error.retryable and links_given_up(links, self.clock()):
            fetched.error = given_up_error(error)
        return fetched

    async def _download_whole(self, job_id: str, item: PendingDownload) -> ImageRecord:
        """Download one image and write it; a file that is not a whole image is downloaded
        again, as a failed download is (never generated again)."""
        policy = self.once if MASK in item.url else self.policy
        retry = retrying(policy, sleep=self.sleep, before_sleep=_log_retry)
        async for attempt in retry:
            with attempt:
                try:
                    # Streamed: an image of any size (up to the cap) is never held whole.
                    async with self.client.open_download(item.url) as body:
                        record = await self.sink.write_stream(
                            job_id, item.index, body.chunks, revised_prompt=item.revised_prompt
                        )
                except ImageDataError as exc:
                    raise DownloadError(
                        f"the image host sent a bad file: {exc}", retryable=exc.retryable
                    ) from exc
                # The link is recorded (redacted, as it was parsed): while it works, an image
                # lost later is downloaded again instead of generated again.
                return dataclasses.replace(record, url=item.url)
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _failed_again(self, item: PendingDownload) -> PendingDownload:
        """`item` after one more run failed to download it."""
        first = item.first_failed_at
        if first is None:
            first = datetime.fromtimestamp(self.clock(), UTC).isoformat(timespec="milliseconds")
            first = first.replace("+00:00", "Z")
        return dataclasses.replace(item, tries=item.tries + 1, first_failed_at=first)


def given_up_error(last: APIError) -> DownloadError:
    """The final error of a request whose links are given up: a failed generation now."""
    return DownloadError(
        f"{last.message}; its image link no longer works ({LINK_GONE}), so it counts as a "
        "failed generation: run again with --retry-failed to generate it again (paid again)",
        status=last.status,
        retryable=False,
    )


def key_in_link_error(last: DownloadError) -> DownloadError:
    """The final error of a link the API put the key into: blanked to MASK before it was used
    or stored, it cannot be downloaded, now or by a later run."""
    return DownloadError(
        f"the API put the API key into this image's link, which was blanked ({MASK}) before "
        f"the link was used or stored, so the image cannot be downloaded ({last.message}); it "
        "counts as a failed generation: run again with --retry-failed to generate it again "
        "(paid again)",
        status=last.status,
        retryable=False,
    )


def output_error(sink: Sink, exc: OSError) -> OutputError:
    """The run-stopping error for a failed image write."""
    return OutputError(f"cannot write images in {sink.out_dir}: {exc.strerror or exc}")


def _pending_events(path: Path) -> list[dict[str, Any]]:
    """The latest result event of each key whose status is download_failed."""
    latest: dict[str, dict[str, Any]] = {}
    for event in read_events(path):
        if not isinstance(event, ResultEvent):
            continue
        if event.status == DOWNLOAD_FAILED:
            latest[event.key] = event.fields
        else:
            latest.pop(event.key, None)
    return list(latest.values())


def _fetched_event(
    old: dict[str, Any], fetched: Fetched, run_id: str, took: float
) -> dict[str, Any]:
    """The result line that replaces a download_failed line after another try."""
    images = [*old.get("images", ()), *(image.to_dict() for image in fetched.images)]
    images.sort(key=lambda image: image["index"])
    status = DOWNLOAD_FAILED if fetched.pending else OK
    return {
        **old,
        "run_id": run_id,
        "status": status,
        "images": images,
        "downloads": [item.to_dict() for item in fetched.pending],
        # Nothing was generated this time: no attempts, nothing billed.
        "attempts": 0,
        "ambiguous_retries": 0,
        "error": fetched.error.to_record() if fetched.error is not None else None,
        "latency_s": round(took, 3),
        "finished_at": now_iso(),
    }


async def fetch_pending(
    out_dir: Store | str | os.PathLike[str],
    settings: Settings | None = None,
    *,
    session: aiohttp.ClientSession | None = None,
    sleep: Sleep = asyncio.sleep,
) -> Summary:
    """Download again the images of every download_failed request of an output (no key)."""
    # Nothing is generated: the links the API gave are fetched while they are still valid,
    # and each request gets a new ledger line (ok, or download_failed).
    settings = settings or Settings()
    summary = Summary()
    store = store_of(out_dir)
    async with Ledger(store.root, fsync=settings.fsync, store=store) as ledger:
        pending = await asyncio.to_thread(_pending_events, ledger.path)
        if not pending:
            return summary
        run_id = summary.run_id = uuid.uuid4().hex[:12]
        summary.planned_requests = len(pending)
        summary.planned_images = sum(len(event.get("downloads") or ()) for event in pending)
        started = time.monotonic()
        await ledger.append(
            {
                "event": "run",
                "run_id": run_id,
                "started_at": now_iso(),
                "manifest": None,
                "manifest_sha256": None,
                "version": __version__,
                "settings": {**settings.public(), "command": "fetch"},
            }
        )
        # Downloads carry no key, whatever the settings hold.
        client = Client(
            base_url=settings.base_url,
            api_key=None,
            connect_timeout=settings.connect_timeout,
            download_timeout=settings.download_timeout,
            max_download_bytes=settings.max_download_bytes,
            session=session,
            allow_insecure_http=True,
        )
        async with client:
            sink = Sink(store, fsync=settings.fsync == "always")
            await asyncio.to_thread(sink.remove_stale_temp_files)
            fetcher = Fetcher(client, sink, RetryPolicy.from_settings(settings), sleep)
            # Downloads at a time: the concurrency given, else 16 (rpm and ipm pace
            # generations, not downloads).
            gate = asyncio.Semaphore(settings.concurrency or DEFAULT_CONCURRENCY)
            try:
                async for event, fetched in _fetch_each(fetcher, pending, gate, run_id):
                    await ledger.append(event)
                    _count(summary, fetched)
            finally:
                sink.staging.remove_folder()
                summary.elapsed_s = time.monotonic() - started
                await ledger.append(
                    {
                        "event": "end",
                        "run_id": run_id,
                        "finished_at": now_iso(),
                        "summary": summary.to_dict(),
                    }
                )
    return summary


async def _fetch_each(
    fetcher: Fetcher, pending: list[dict[str, Any]], gate: asyncio.Semaphore, run_id: str
) -> AsyncIterator[tuple[dict[str, Any], Fetched]]:
    """Fetch each request's links (a few requests at a time); yield their new ledger lines."""

    async def one(old: dict[str, Any]) -> tuple[dict[str, Any], Fetched]:
        async with gate:
            began = time.monotonic()
            items = [PendingDownload(**item) for item in old.get("downloads") or ()]
            fetched = await fetcher.fetch(old["job_id"], items)
            return _fetched_event(old, fetched, run_id, time.monotonic() - began), fetched

    tasks = [asyncio.ensure_future(one(old)) for old in pending]
    try:
        for done in asyncio.as_completed(tasks):
            yield await done
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _count(summary: Summary, fetched: Fetched) -> None:
    summary.images_written += len(fetched.images)
    if fetched.error is None:
        summary.ok_requests += 1
    else:
        summary.failed_requests += 1
        summary.failed_images += len(fetched.pending)
        summary.failures[fetched.error.kind] += 1
