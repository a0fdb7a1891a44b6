"""Lines about requests sent and never answered: what a run did with them, what status shows."""

from __future__ import annotations

from typing import Any

from ..engine.summary import Summary
from ..views.crashes import crash_text

# Keys named in status; the rest are counted.
_MAX_NAMED = 10


def unanswered_lines(summary: Summary) -> list[str]:
    """What the run did with requests earlier runs sent and never heard back about."""
    lines = []
    if summary.resent_unanswered:
        lines.append(
            f"  {summary.resent_unanswered} request(s) ({summary.resent_unanswered_images} "
            "image(s)) an earlier run sent unanswered were sent again: possibly billed twice"
        )
    if summary.held_unanswered:
        lines.append(
            f"  {summary.held_unanswered} request(s) an earlier run sent unanswered were held "
            "back (they may have been billed): --retry-ambiguous sends them"
        )
    return lines


def crash_lines(data: dict[str, Any]) -> list[str]:
    """`status`: requests sent and never answered, per run, with what they may have cost."""
    lines = [f"  {crash_text(crash)}" for crash in data.get("crashes") or ()]
    if data.get("unanswered_requests"):
        keys = data["unanswered_keys"]
        shown = ", ".join(keys[:_MAX_NAMED]) + (", ..." if len(keys) > _MAX_NAMED else "")
        lines.append(
            f"  {data['unanswered_requests']} request(s) ({data['unanswered_images']} image(s)) "
            f"sent and never answered, may have been billed: {shown}; the next run sends them "
            "again unless --no-retry-ambiguous holds them back"
        )
    return lines
