"""Fixtures for services a plain machine may lack: each skips, or fails when required."""

from __future__ import annotations

import os

import pytest
from support import chromium_problem, need


@pytest.fixture
def chromium() -> str:
    """The headless Chromium to drive (COMETBATCH_CHROMIUM, else /usr/bin/chromium)."""
    path = os.environ.get("COMETBATCH_CHROMIUM", "/usr/bin/chromium")
    need("BROWSER", chromium_problem(path))
    return path
