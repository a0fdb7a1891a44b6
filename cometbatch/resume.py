"""Resume decisions: what to do with each planned request, given what the ledger recorded."""

from __future__ import annotations

from typing import Literal

from .state import KeyState

Verdict = Literal["send", "reuse", "keep", "fetch", "changed", "rest", "restore"]


def decide(
    fingerprint: str,
    recorded: KeyState | None,
    *,
    retry_failed: bool,
    missing: bool = False,
    withdrawn: bool = False,
) -> Verdict:
    """What to do with one planned request.

    send it; reuse its ok images; keep a permanent failure; fetch the images it generated
    but could not download; send the rest of a partial one (only its missing images);
    restore the images of an ok line that are no longer on disk (`missing`) or of a line
    that withdrew them (`withdrawn`: set aside, or found missing or damaged); or flag that
    the job changed since its images were written.
    """
    if recorded is None:
        return "send"
    same = recorded.fingerprint is None or recorded.fingerprint == fingerprint
    held = recorded.status in ("ok", "download_failed", "partial") or withdrawn
    if held and not same:
        # Old images that no longer match the request must not pass for its result.
        return "changed"
    if recorded.status == "ok":
        return "restore" if missing else "reuse"
    if withdrawn:
        # Put back if they are whole where they were set aside, else generated again.
        return "restore"
    if recorded.status == "partial":
        # Its images are paid for and kept; only the missing count is ever asked for again.
        return "keep" if recorded.retryable is False and not retry_failed else "rest"
    if recorded.status == "download_failed":
        # Paid for already: download again, never generate again, unless the links are gone
        # for good and the user asks for that (retry_failed pays for the images again).
        if recorded.retryable is not False:
            return "fetch"
        return "send" if retry_failed else "keep"
    if recorded.retryable is False and not retry_failed and same:
        return "keep"
    # Retryable, --retry-failed, or a failed job the user has since edited.
    return "send"
