"""A test needing a service a plain machine may lack skips with the fix, unless required."""

from __future__ import annotations

import pytest
from support import chromium_problem, need


def test_a_present_service_neither_skips_nor_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing missing the test runs, required or not."""
    monkeypatch.setenv("COMETBATCH_REQUIRE_BROWSER", "1")
    need("BROWSER", None)


def test_a_missing_service_skips_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing browser skips, and the reason says how to install it and how to require it."""
    monkeypatch.delenv("COMETBATCH_REQUIRE_BROWSER", raising=False)
    problem = chromium_problem("/nonexistent/chromium")
    with pytest.raises(pytest.skip.Exception) as skipped:
        need("BROWSER", problem)
    reason = str(skipped.value)
    assert "no Chromium found at /nonexistent/chromium" in reason
    assert "apt-get install chromium" in reason
    assert "COMETBATCH_REQUIRE_BROWSER=1" in reason


def test_a_required_missing_service_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """COMETBATCH_REQUIRE_BROWSER=1 turns the skip into a failure, so CI cannot pass without it."""
    monkeypatch.setenv("COMETBATCH_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        need("BROWSER", chromium_problem("/nonexistent/chromium"))
