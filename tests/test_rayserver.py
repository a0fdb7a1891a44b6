"""The test Ray clusters: tasks run on every node, they listen on 127.0.0.1 only, and stopping
one leaves none of its processes behind."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from typing import Any

from rayserver import RayCluster, cluster_processes, ray_problem, running_ray_cluster
from support import need

JOIN_TIMEOUT = 30.0


def _alive_nodes(ray: Any) -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node["Alive"]]


def test_a_task_runs_on_each_node_of_the_two_node_cluster(ray_two_nodes: RayCluster) -> None:
    """A task pinned to each node runs there: the cluster really has two working nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=ray_two_nodes.address, include_dashboard=False, log_to_driver=False)
    deadline = time.monotonic() + JOIN_TIMEOUT
    while len(_alive_nodes(ray)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    nodes = _alive_nodes(ray)
    assert len(nodes) == 2
    assert {node["NodeManagerAddress"] for node in nodes} == {"127.0.0.1"}

    @ray.remote(num_cpus=1)
    def where() -> str:
        return str(ray.get_runtime_context().get_node_id())

    ids = [node["NodeID"] for node in nodes]
    pinned = [
        where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(i, soft=False)).remote()
        for i in ids
    ]
    assert ray.get(pinned, timeout=60) == ids


def test_a_driver_subprocess_joins_with_the_clusters_environment(
    ray_two_nodes: RayCluster,
) -> None:
    """A separate process (a `cometbatch run --ray` driver) joins through RAY_ADDRESS alone."""
    code = "import ray; ray.init(log_to_driver=False); print(ray.cluster_resources()['CPU'])"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**_plain_env(), **ray_two_nodes.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) == 4.0


def _plain_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def test_stopping_a_cluster_leaves_none_of_its_processes_and_no_folder() -> None:
    """After the block, no raylet, GCS server or worker of either node is alive, and both temp
    dirs are gone; while it ran, every listener was on 127.0.0.1."""
    need("RAY", ray_problem())
    import psutil

    with running_ray_cluster(nodes=2) as cluster:
        started = [process for node in cluster.nodes for process in cluster_processes(node)]
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "raylet" in names
        assert "gcs_server" in names
        listening = [
            conn.laddr
            for process in started
            for conn in _connections(process)
            if conn.status == psutil.CONN_LISTEN
        ]
        assert listening
        assert [a for a in listening if not _loopback(a.ip)] == []
    for node in cluster.nodes:
        assert cluster_processes(node) == []
        assert not node.temp_dir.exists()
    alive = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []


def _loopback(ip: str) -> bool:
    """Whether `ip` is a loopback address (also as IPv4 mapped into IPv6: ::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


def _connections(process: Any) -> list[Any]:
    import psutil

    try:
        return list(process.net_connections(kind="inet"))
    except psutil.Error:
        return []


def test_the_head_fixture_is_a_working_one_node_cluster(ray_head: str) -> None:
    """`ray_head` is an address this process joins, with its 2 CPUs, where a task runs."""
    import ray

    assert ray_head.startswith("127.0.0.1:")
    ray.init(address=ray_head, include_dashboard=False, log_to_driver=False)
    assert ray.cluster_resources()["CPU"] == 2.0  # type: ignore[no-untyped-call]

    @ray.remote
    def double(x: int) -> int:
        return 2 * x

    assert ray.get(double.remote(21), timeout=60) == 42
