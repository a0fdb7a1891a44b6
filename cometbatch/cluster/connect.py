"""Reaching Ray: the extra imported on use, a cluster joined or started on 127.0.0.1, its nodes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
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


# Before ray.init joins a cluster: how long its GCS port may take to accept a connection.
REACH_TIMEOUT_S = 5.0
# Addresses Ray resolves itself (a cluster found on this machine, a new local instance).
_RAY_WORDS = ("auto", "local")


def import_ray() -> ModuleType:
    """The ray module; ConfigError naming the extra when it is not installed."""
    # A local instance is loopback-only through loopback_only, for its start alone: the
    # process's environment is left as it was (a later run may join a remote cluster).
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
    if address:
        reach(address)
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
    except (ConnectionError, ValueError) as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    return True


def host_port(address: str) -> tuple[str, int] | None:
    """The host and port of a Ray address (ray://host:port too); None for auto or local."""
    if address.strip().lower() in _RAY_WORDS:
        return None
    bare = address.strip().removeprefix("ray://")
    host, colon, port = bare.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or any(c.isspace() for c in host) or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} is not host:port (e.g. 10.0.0.5:6379)")
    number = int(port)
    if not 0 < number < 65536:
        raise ConfigError(f"--ray-address {address!r}: the port must be 1 to 65535")
    return host, number


def reach(address: str) -> None:
    """Refuse an address whose GCS port does not accept a connection within a few seconds
    (ray.init would retry for minutes)."""
    found = host_port(address)
    if found is None:
        return
    try:
        with socket.create_connection(found, timeout=REACH_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(
            f"cannot reach the Ray cluster at {address}: {reason}; is `ray start --head` "
            "running there, and is the port open?"
        ) from None


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
