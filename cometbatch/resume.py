"""Resume decisions: what to do with each planned request, given what the ledger recorded."""

from __future__ import annotations

from typing import Literal

from .state import KeyState

Verdict = Literal["send", "reuse", "keep", "changed"]


def decide(fingerprint: str, recorded: KeyState | None, *, retry_failed: bool) -> Verdict:
    """send it, reuse its ok images, keep a permanent failure, or flag that the job changed."""
    if recorded is None:
        return "send"
    same = recorded.fingerprint is None or recorded.fingerprint == fingerprint
    if recorded.status == "ok":
        # Old images that no longer match the request must not pass for its result.
        return "reuse" if same else "changed"
    if recorded.retryable is False and not retry_failed and same:
        return "keep"
    # Retryable, --retry-failed, or a failed job the user has since edited.
    return "send"
