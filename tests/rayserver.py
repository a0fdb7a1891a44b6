"""Real Ray clusters for the tests: `ray start` nodes on 127.0.0.1, each stopped by its own pids."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3server import free_ports

__all__ = [
    "DRIVER_ENV",
    "RayCluster",
    "RayNode",
    "cluster_processes",
    "join_node",
    "ray_problem",
    "running_ray_cluster",
    "start_head",
    "stop_node",
]

HOST = "127.0.0.1"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0
# Ray's own unix sockets live at <temp dir>/session_<date>_<pid>/sockets/plasma_store: about
# 70 characters past the temp dir, against the 107 a socket path may have.
MAX_TEMP_DIR = 36
OBJECT_STORE_BYTES = 200_000_000
LOG_TAIL = 30

# What every process of a test cluster, and a driver that joins it, needs in its environment.
# Ray turns "127.0.0.1" into the machine's outward address unless it runs as a one-machine
# install (the switch below), so the nodes and the driver stay on the loopback interface. No
# token: a loopback cluster is reached by this machine only, and a driver without the token
# file (a clean CI machine) could not join one that wants it.
DRIVER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}

# `ray start --address` refuses to join as a one-machine install (the switch above), and
# without the switch it resolves 127.0.0.1 to the outward address. So a joining node runs the
# same command with the check let through and 127.0.0.1 kept as it is; the processes it starts
# inherit the switch and stay on loopback.
_JOIN = """
import sys
from ray._private import ray_constants, services
ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


@dataclass(frozen=True)
class RayNode:
    """One `ray start` node: its temp dir, and the process group all its processes are in."""

    temp_dir: Path
    group: int
    log: Path

    def log_tail(self, lines: int = LOG_TAIL) -> str:
        """The last lines `ray start` wrote (for failure messages)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class RayCluster:
    """A running cluster: its GCS address ("127.0.0.1:P") and its nodes, the head first."""

    address: str
    nodes: tuple[RayNode, ...]

    @property
    def env(self) -> dict[str, str]:
        """The environment a driver subprocess needs to join it (RAY_ADDRESS included)."""
        return {**DRIVER_ENV, "RAY_ADDRESS": self.address}


def ray_problem() -> str | None:
    """Why the Ray tests cannot run here, or None."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is missing: install it (pip install -e '.[test]' or 'cometbatch[ray]')"
    if _ray_command() is None:
        return "the `ray` command is missing beside this Python: reinstall ray"
    return None


def _ray_command() -> str | None:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.is_file() else shutil.which("ray")


def _has_ray_client() -> bool:
    """Whether Ray Client's dependencies are installed (ray[client], ray[default])."""
    from ray._private.utils import get_ray_client_dependency_error

    return get_ray_client_dependency_error() is None


def _temp_dir() -> Path:
    """A new, short folder for one node's sockets, logs and session files."""
    path = Path(tempfile.mkdtemp(prefix="ray-"))
    if len(str(path)) > MAX_TEMP_DIR:
        shutil.rmtree(path, ignore_errors=True)
        # The system temp dir (TMPDIR) is too deep: Ray's socket paths would be cut short.
        path = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    return path


def _start(command: list[str], temp_dir: Path, timeout: float) -> RayNode:
    """Run one `ray start` in a process group of its own; the node once the command returns."""
    log = temp_dir / "start.log"
    env = {**os.environ, **DRIVER_ENV}
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Every process the node starts stays in this group: stopping it is one killpg.
            start_new_session=True,
        )
    node = RayNode(temp_dir=temp_dir, group=process.pid, log=log)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    except BaseException:
        stop_node(node)
        raise
    if code != 0:
        tail = node.log_tail()
        stop_node(node)
        said = "did not finish" if code is None else f"exited with status {code}"
        raise RuntimeError(f"`ray start` {said}; the last lines of its output:\n{tail}")
    return node


def _common(temp_dir: Path, num_cpus: int, ports: list[int]) -> list[str]:
    listen, grpc, metrics, runtime_env = ports
    return [
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        # Each listener on a port of its own: two sessions on one machine must not collide.
        f"--dashboard-agent-listen-port={listen}",
        f"--dashboard-agent-grpc-port={grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        "--include-log-monitor=false",
        "--disable-usage-stats",
    ]


def start_head(num_cpus: int = 2, timeout: float = START_TIMEOUT) -> tuple[str, RayNode]:
    """Start a head node on 127.0.0.1; its GCS address and the node."""
    ray = _ray_command()
    if ray is None:
        raise RuntimeError(ray_problem())
    temp_dir = _temp_dir()
    port, client, dashboard, *rest = free_ports(7)
    command = [
        ray,
        "start",
        "--head",
        f"--node-ip-address={HOST}",
        f"--port={port}",
        # Ray Client's server only where its extra is installed (ray[client] or ray[default]):
        # a minimal ray refuses the option, and without it a full one takes port 10001.
        *([f"--ray-client-server-port={client}"] if _has_ray_client() else []),
        "--include-dashboard=false",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={dashboard}",
        *_common(temp_dir, num_cpus, rest),
    ]
    return f"{HOST}:{port}", _start(command, temp_dir, timeout)


def join_node(address: str, num_cpus: int = 2, timeout: float = START_TIMEOUT) -> RayNode:
    """Start a second node on this machine that joins the cluster at `address`."""
    temp_dir = _temp_dir()
    command = [sys.executable, "-c", _JOIN, "start", f"--address={address}"]
    command += [f"--node-ip-address={HOST}", *_common(temp_dir, num_cpus, free_ports(4))]
    return _start(command, temp_dir, timeout)


def cluster_processes(node: RayNode) -> list[Any]:
    """The node's live processes (psutil): its process group, and any that names its temp dir."""
    import psutil

    found = []
    marker = str(node.temp_dir)
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE or process.pid == os.getpid():
                continue  # a zombie holds nothing: it only waits for its parent to reap it
            ours = os.getpgid(process.pid) == node.group
            if ours or any(marker in part for part in process.info["cmdline"] or ()):
                found.append(process)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def stop_node(node: RayNode, timeout: float = STOP_TIMEOUT) -> None:
    """Kill the node's processes (its group, and any that names its temp dir); remove its
    folder. Nothing else on the machine is touched: no `ray stop`, which stops every node."""
    import psutil

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.group, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while left := cluster_processes(node):
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        if time.monotonic() > deadline:
            names = ", ".join(f"{p.pid}" for p in left)
            raise RuntimeError(f"Ray processes of {node.temp_dir} outlived SIGKILL: {names}")
        time.sleep(0.05)
    shutil.rmtree(node.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def running_ray_cluster(nodes: int = 1, num_cpus: int = 2) -> Iterator[RayCluster]:
    """A head (and `nodes - 1` joined nodes) for the span of a `with` block."""
    address, head = start_head(num_cpus)
    started = [head]
    try:
        for _ in range(nodes - 1):
            started.append(join_node(address, num_cpus))
        yield RayCluster(address, tuple(started))
    finally:
        # The joined nodes first: a node whose head is gone spends its time reconnecting.
        for node in reversed(started):
            stop_node(node)
