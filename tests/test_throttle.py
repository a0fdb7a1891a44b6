"""Tests for the limiter's pure decisions: pacing bucket shape, AIMD rounds and retry budget."""

from __future__ import annotations

import pytest

from cometbatch.throttle import AimdLimit, RetryBudget, pacing_bucket

# -- pacing bucket ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "capacity", "expected"),
    [(600, 1, (1, 60 / 599)), (61, 1, (1, 1.0)), (600, 10, (10, 600 / 590)), (70, 10, (10, 10.0))],
)
def test_pacing_bucket_shape(limit: float, capacity: float, expected: tuple[float, float]) -> None:
    """The bucket holds one request and drains (limit - capacity) per minute."""
    assert pacing_bucket(limit, capacity) == pytest.approx(expected)


@pytest.mark.parametrize(("limit", "capacity"), [(1, 1), (10, 10), (5, 10), (10, 0)])
def test_pacing_bucket_rejects_a_limit_not_above_capacity(limit: float, capacity: float) -> None:
    """A limit that a single request would fill is refused."""
    with pytest.raises(ValueError):
        pacing_bucket(limit, capacity)


# -- AIMD -------------------------------------------------------------------------------


def test_a_round_at_or_under_the_threshold_adds_one() -> None:
    """A round with at most 10 % throttled raises the limit by 1, up to the maximum."""
    aimd = AimdLimit(floor=1, ceiling=16, threshold=0.1, min_round=100)
    aimd.limit = 11
    changes = [aimd.record(throttled=i < 10) for i in range(100)]
    assert (changes[-1], sum(changes), aimd.limit) == (1, 1, 12)
    for _ in range(1000):
        aimd.record(throttled=False)
    assert aimd.limit == 16


# -- retry budget -----------------------------------------------------------------------


def test_retry_budget_spends_on_failure_and_earns_on_success() -> None:
    """Failures cost 1, successes earn the ratio, capped at capacity; half spent is probing."""
    budget = RetryBudget(capacity=10, ratio=0.5)
    for _ in range(5):
        budget.record(ok=False)
    assert (budget.tokens, budget.probing) == (5, True)
    budget.record(ok=True)
    assert (budget.tokens, budget.probing) == (5.5, False)
    for _ in range(20):
        budget.record(ok=True)
    assert budget.tokens == 10
