"""Resume decisions: what to do with each planned request, given what the ledger recorded."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from ..ledger.keystate import KeyState
from ..results import PAID, WITH_DOWNLOADS

Verdict = Literal[
    "send", "reuse", "keep", "fetch", "changed", "rest", "restore", "redownload", "hold"
]


# A generated image's link is given up once downloads of it failed in this many runs, or this
# long after its first failure: no provider keeps a link longer (OpenAI's last 60 minutes,
# some providers' 24 hours). Its request then counts as a failed generation, which
# retry_failed generates again (paid again).
LINK_TRIES = 3
LINK_LIFETIME_S = 24 * 3600.0
# Why a link no longer works, as every message says it.
LINK_GONE = (
    f"gone, its downloads failed in {LINK_TRIES} runs, or it is over "
    f"{LINK_LIFETIME_S / 3600:g} hours old"
)


def link_given_up(tries: int, first_failed_at: str | None, now: float) -> bool:
    """Whether a link that failed in `tries` runs, first at `first_failed_at`, is given up."""
    # first_failed_at is the ledger's ISO time, `now` a Unix time.
    if tries >= LINK_TRIES:
        return True
    age = _age_s(first_failed_at, now)
    return age is not None and age >= LINK_LIFETIME_S


def links_given_up(links: Iterable[tuple[int, str | None]], now: float | None = None) -> bool:
    """Whether any of (tries, first_failed_at) pairs is given up (`now`: the time now)."""
    at = time.time() if now is None else now
    return any(link_given_up(tries, since, at) for tries, since in links)


def links_fresh(recorded_at: str | None, now: float | None = None) -> bool:
    """Whether links a line finished at `recorded_at` (None: not all links) may still work."""
    # Within LINK_LIFETIME_S, the bound the download-failure rule uses: a link dead sooner
    # costs a refused download, after which the request is generated as it would have been.
    age = _age_s(recorded_at, time.time() if now is None else now)
    return age is not None and age < LINK_LIFETIME_S


def _age_s(iso: str | None, now: float) -> float | None:
    """Seconds from the ledger's ISO time `iso` to `now`; None for no time or an unreadable one."""
    if not iso:
        return None
    try:
        return now - datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def links_gone(
    status: str,
    retryable: bool | None,
    links: Iterable[tuple[int, str | None]],
    now: float | None = None,
) -> bool:
    """Whether a line's pending links no longer work: one is given up, or its error is final."""
    # Only a download_failed line's error is a download's: a partial line's final error may
    # be its follow-up's, so only given-up links count there.
    if status == "download_failed" and retryable is False:
        return True
    return status in WITH_DOWNLOADS and links_given_up(links, now)


def changed(fingerprint: str, recorded: KeyState | None, *, withdrawn: str | None = None) -> bool:
    """Whether a request's recorded images belong to another version of its job (see decide)."""
    if recorded is None:
        return False
    if withdrawn is not None:
        if withdrawn in ("", fingerprint):
            return False
        if withdrawn == recorded.fingerprint:
            # The line that withdrew them: another request is a changed job, as it was
            # before the images were withdrawn.
            return True
        # A later request under the key failed (its line carries them): decided as below.
    same = recorded.fingerprint is None or recorded.fingerprint == fingerprint
    # Old images that no longer match the request must not pass for its result.
    return recorded.status in PAID and not same


def decide(
    fingerprint: str,
    recorded: KeyState | None,
    *,
    retry_failed: bool,
    now: float | None = None,
    missing: bool = False,
    withdrawn: str | None = None,
    links_at: str | None = None,
) -> Verdict:
    """What to do with one planned request, given what the ledger recorded for it."""
    # send it; reuse its ok images; keep a permanent failure; fetch the images it generated
    # but could not download; send the rest of a partial one (only its missing images);
    # restore the images of an ok line that are no longer on disk (`missing`) or of a line
    # that withdrew them (`withdrawn`: the fingerprint of the request they belong to, ""
    # when not recorded), downloading them again first ("redownload") while the links a
    # line finished at `links_at` recorded are fresh; or flag that the job changed.
    if recorded is None:
        return "send"
    if withdrawn in ("", fingerprint):
        # Put back if they are whole where they were set aside, else downloaded again from
        # their links while fresh, else generated again.
        return "redownload" if links_fresh(links_at, now) else "restore"
    if changed(fingerprint, recorded, withdrawn=withdrawn):
        return "changed"
    same = recorded.fingerprint is None or recorded.fingerprint == fingerprint
    if recorded.status == "ok":
        if not missing:
            return "reuse"
        return "redownload" if links_fresh(links_at, now) else "restore"
    if recorded.status in WITH_DOWNLOADS:
        # Paid for already: download again, never generate again, while the links may work.
        # Links gone for good or given up make it a failed generation: kept, unless the user
        # asks for that (retry_failed pays for those images again: all of a download_failed
        # key, only the missing ones of a partial key).
        links = [(tries, since) for _, _, _, tries, since in recorded.downloads]
        gone = links_gone(recorded.status, recorded.retryable, links, now)
        if recorded.status == "partial":
            # Its images are paid for and kept; only the missing ones are asked for again.
            failed = gone or recorded.retryable is False
            return "keep" if failed and not retry_failed else "rest"
        if not gone:
            return "fetch"
        return "send" if retry_failed else "keep"
    if recorded.retryable is False and not retry_failed and same:
        return "keep"
    # Retryable, --retry-failed, or a failed job the user has since edited.
    return "send"
