"""The test S3 server: a real S3 client can use it, and it listens on 127.0.0.1 only."""

from __future__ import annotations

import ipaddress
import secrets
from typing import Any

import pytest
from s3server import S3Server


def _filesystem(**options: Any) -> Any:
    import s3fs

    # skip_instance_cache: each test its own client, whatever the environment was for another.
    return s3fs.S3FileSystem(skip_instance_cache=True, **options)


def test_an_s3_client_makes_a_bucket_and_puts_gets_lists_and_deletes(s3_server: S3Server) -> None:
    fs = _filesystem(**s3_server.storage_options)
    bucket = f"test-{secrets.token_hex(4)}"
    fs.mkdir(bucket)
    data = secrets.token_bytes(300_000)
    fs.pipe(f"{bucket}/images/a/0.png", data)
    assert fs.cat(f"{bucket}/images/a/0.png") == data
    assert fs.find(bucket) == [f"{bucket}/images/a/0.png"]
    fs.rm(f"{bucket}/images/a/0.png")
    fs.invalidate_cache()
    assert fs.find(bucket) == []
    with pytest.raises(FileNotFoundError):
        fs.cat(f"{bucket}/images/a/0.png")


def test_the_environment_alone_points_a_client_at_it(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    fs = _filesystem()
    bucket = f"env-{secrets.token_hex(4)}"
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/x.txt", b"hello")
    assert fs.cat(f"{bucket}/x.txt") == b"hello"


def test_unsigned_requests_are_refused(s3_server: S3Server) -> None:
    fs = _filesystem(anon=True, client_kwargs={"endpoint_url": s3_server.endpoint})
    with pytest.raises(PermissionError):
        fs.mkdir(f"anon-{secrets.token_hex(4)}")


def test_every_listener_is_on_127_0_0_1(s3_server: S3Server) -> None:
    import psutil

    process = psutil.Process(s3_server.process.pid)
    sockets = process.net_connections(kind="inet")
    listening = [s.laddr for s in sockets if s.status == psutil.CONN_LISTEN or not s.raddr]
    assert listening, "no listening socket found"
    outside = [a for a in listening if not ipaddress.ip_address(a.ip).is_loopback]
    assert outside == []
    assert int(s3_server.endpoint.rsplit(":", 1)[1]) in {a.port for a in listening}
