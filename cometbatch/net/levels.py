"""The limiter's settings checked, and the concurrency level its mode calls for (pure)."""

from __future__ import annotations

from ..errors import ConfigError
from .throttle import AimdLimit, AutoLimit, RateLimit, auto_start, request_rate

__all__ = ["check_limits", "concurrency_level", "rate_of"]


def check_limits(
    *,
    concurrency: int,
    min_concurrency: int,
    max_images_per_request: int,
    min_round: int,
    throttle_threshold: float,
    budget_tokens: float,
    budget_ratio: float,
    outage_limit: float,
    pacing_margin: float,
    pacing_burst: float,
) -> None:
    """Raise ConfigError for limiter settings that cannot work."""
    if concurrency < 1 or not 1 <= min_concurrency <= concurrency:
        raise ConfigError(
            f"concurrency must be at least min_concurrency (>= 1); "
            f"got concurrency={concurrency}, min_concurrency={min_concurrency}"
        )
    if max_images_per_request < 1 or min_round < 1:
        raise ConfigError("max_images_per_request and min_round must be at least 1")
    if not 0 <= throttle_threshold < 1:
        raise ConfigError(f"throttle_threshold must be in [0, 1), got {throttle_threshold}")
    if budget_tokens <= 0 or budget_ratio < 0 or outage_limit <= 0:
        raise ConfigError("budget_tokens and outage_limit must be > 0, budget_ratio >= 0")
    if pacing_margin < 0 or pacing_burst < 0:
        raise ConfigError("pacing_margin and pacing_burst must be >= 0")


def concurrency_level(
    *,
    auto: bool,
    follow_rate: bool,
    floor: int,
    ceiling: int,
    threshold: float,
    min_round: int,
    adaptive: bool,
    start: int | None,
    rpm: float | None,
    ipm: float | None,
) -> AimdLimit:
    """The AIMD level of a mode: fixed (AIMD under the ceiling), auto, or following the rate."""
    if auto and not adaptive:
        raise ConfigError("auto concurrency adapts the limit: it needs adaptive=True")
    if follow_rate and (auto or (rpm is None and ipm is None)):
        raise ConfigError("following the rate needs rpm or ipm, and not auto concurrency")
    if follow_rate:
        return RateLimit(
            floor=floor,
            ceiling=ceiling,
            threshold=threshold,
            min_round=min_round,
            rate=rate_of(rpm, ipm, 1.0),
        )
    if auto:
        begin = auto_start(floor, ceiling) if start is None else start
        if not floor <= begin <= ceiling:
            raise ConfigError(
                f"start must be within [min_concurrency, concurrency] = "
                f"[{floor}, {ceiling}], got {begin}"
            )
        return AutoLimit(
            floor=floor, ceiling=ceiling, threshold=threshold, min_round=min_round, start=begin
        )
    return AimdLimit(floor=floor, ceiling=ceiling, threshold=threshold, min_round=min_round)


def rate_of(rpm: float | None, ipm: float | None, images_per_request: float) -> float:
    """Requests a second that rpm/ipm allow at `images_per_request` (one of them is set)."""
    rate = request_rate(rpm, ipm, images_per_request)
    assert rate is not None, "following the rate needs rpm or ipm"
    return rate
