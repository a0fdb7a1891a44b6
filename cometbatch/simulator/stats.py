"""What the simulated API saw and answered: the live counters tests and the CLI read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SimStats:
    """What the simulator saw and answered; never the API key."""

    requests: int = 0
    # Requests received whose answer never reached the client (it went away first).
    unanswered: int = 0
    generated: int = 0
    images: int = 0
    # Images in every answer that carried any, short and unreadable ones included: what the
    # server billed (`images` counts only answers generated in full).
    billed_images: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    limit_429s: int = 0
    downloads: int = 0
    download_auth_rejections: int = 0
    max_in_flight: int = 0
    requests_log: list[dict[str, Any]] = field(default_factory=list)
