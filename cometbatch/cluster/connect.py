"""Reaching Ray: the extra imported on use, a cluster joined or started on 127.0.0.1, its nodes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from ..errors import ConfigError
from ..settings import KEY_ENV, Settings
from ..store.interface import Store
from .worker import sees

__all__ = ["RAY_MISSING", "check_nodes", "connect", "import_ray", "loopback_only"]

RAY_MISSING = "--ray needs the ray extra: pip install 'cometbatch[ray]'"
PROBE_TIMEOUT_S = 120.0


# Set before ray is first imported, this makes Ray a one-machine install: the instance a run
# starts itself binds every port to 127.0.0.1 (otherwise Ray swaps 127.0.0.1 for the machine's
# outward address and listens on every interface).
_ONE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray(address: str | None = None) -> ModuleType:
    """The ray module, loopback-only when a local instance will be started (no `address`, no
    RAY_ADDRESS); ConfigError naming the extra when it is not installed."""
    if not (address or os.environ.get("RAY_ADDRESS")) and "ray" not in sys.modules:
        os.environ.setdefault(_ONE_MACHINE, "0")
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def connect(ray: ModuleType, address: str | None, workers: int | None, settings: Settings) -> bool:
    """Join the cluster at `address` (else RAY_ADDRESS), or start a local one; True if started."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, namespace="cometbatch", **quiet)
        else:
            # The local instance's workers inherit this process's environment: the key too.
            with _key_in_environment(settings), loopback_only(ray):
                ray.init(
                    address="local", num_cpus=workers, include_dashboard=False,
                    _node_ip_address="127.0.0.1", namespace="cometbatch", **quiet,
                )  # fmt: skip
    except ConnectionError as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    return True


@contextlib.contextmanager
def loopback_only(ray: ModuleType) -> Iterator[None]:
    """Ray as a one-machine install while a local instance starts (every port on 127.0.0.1),
    also when ray was imported before the switch in the environment could take effect."""
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is None or not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    before = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def _key_in_environment(settings: Settings) -> Iterator[None]:
    """A key given in Settings is in the environment while a local instance starts."""
    key = settings.resolved_key()
    if key is None or os.environ.get(KEY_ENV):
        yield
        return
    os.environ[KEY_ENV] = key
    try:
        yield
    finally:
        os.environ.pop(KEY_ENV, None)


async def check_nodes(ray: ModuleType, root: Store) -> None:
    """On a cluster of several nodes, a local OUT must be a folder every node sees."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < 2 or root.local_folder is None:
        return
    pinned = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
    name = f"cluster/probe-{uuid.uuid4().hex[:12]}"
    await root.put(name, b"probe\n")
    path = os.path.join(root.local_folder, name)
    probe = ray.remote(num_cpus=0, max_retries=0)(sees)
    try:
        refs = [
            probe.options(scheduling_strategy=pinned(node["NodeID"], soft=False)).remote(path)
            for node in nodes
        ]
        found = await asyncio.wait_for(
            asyncio.gather(*(asyncio.wrap_future(ref.future()) for ref in refs)),
            PROBE_TIMEOUT_S,
        )
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(root.remove, name)
    blind = [
        str(node.get("NodeManagerAddress"))
        for node, seen in zip(nodes, found, strict=True)
        if not seen
    ]
    if blind:
        raise ConfigError(
            f"--out {root.root} is a local folder that {len(blind)} of the cluster's "
            f"{len(nodes)} nodes do not see ({', '.join(blind)}): give an object store's URL "
            "(s3://...) or a folder every node mounts at the same path"
        )
