"""Fixtures for integration tests: real local services (an S3 server from moto on loopback)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

S3_BUCKET = "mova-test"
S3_START_TIMEOUT_S = 15.0
_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + S3_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}: {log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answered, even if with an error status
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer at {url} within {S3_START_TIMEOUT_S:.0f} s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on loopback with bucket ``mova-test``; yields its endpoint URL.

    The S3 environment variables point at it for the whole session and are restored after.
    """
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.skip(f"moto_server not found next to {sys.executable} (install moto[server])")
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=handle, stderr=subprocess.STDOUT)
    env = {**_S3_ENV, "AWS_ENDPOINT_URL_S3": url}
    saved = {key: os.environ.get(key) for key in env}
    try:
        _wait_until_up(url, proc, log)
        os.environ.update(env)
        boto3.client("s3", endpoint_url=url, region_name=env["AWS_DEFAULT_REGION"],
                     aws_access_key_id="testing", aws_secret_access_key="testing"
                     ).create_bucket(Bucket=S3_BUCKET)
        yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One private local Ray (2 CPUs, own temp dir) shared by the integration tests.

    It starts after the S3 server so its workers inherit the S3 environment.
    """
    from pipelines.common.ray_init import init_ray

    temp_dir = f"/tmp/mova-test-ray-{os.getpid()}"
    init_ray("local", num_cpus=2, object_store_memory=300 * 1024 * 1024, temp_dir=temp_dir)
    import ray

    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)  # its session files and logs
