"""Fixtures for integration tests: real local services (an S3 server from moto on loopback)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Feature jobs record each image decode here (read by test_features' one-decode check); set
# before any Ray starts, so every worker inherits it.
os.environ.setdefault("MOVA_TRACE_DECODES", tempfile.mkdtemp(prefix="mova-test-decodes-"))

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


MLFLOW_START_TIMEOUT_S = 90.0


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """An MLflow tracking server on loopback (sqlite store) whose artifacts live on the moto
    S3 (``s3://mova-test/mlflow``, proxied: clients upload through the server); yields its
    URL. Stopped by PID."""
    exe = Path(sys.executable).parent / "mlflow"
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{S3_BUCKET}/mlflow"],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: "
                                   f"{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server not up at {url} within "
                                       f"{MLFLOW_START_TIMEOUT_S:.0f} s: "
                                       f"{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)  # its own session: the server and its gunicorn/uvicorn worker
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


@pytest.fixture
def no_driver_rows(monkeypatch):
    """Fail if this (driver) process validates a manifest row: every stage streams its manifest
    through Ray tasks, so the driver never holds or parses the rows. Undo with
    ``monkeypatch.undo()`` where a test reads a manifest itself."""
    def driver_parse(*args, **kwargs):
        raise AssertionError("the driver parsed a manifest row: stages stream the manifest")

    for module in ("validate", "stream", "scan", "ids"):
        monkeypatch.setattr(f"pipelines.common.manifests.{module}.check_row", driver_parse)
    return monkeypatch
