"""Starting or joining Ray the same way from the CLI, jobs and tests."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

log = logging.getLogger(__name__)

# Environment every Ray process of ours needs on a CPU machine (see docs/platform notes).
BASE_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # makes a local Ray bind 127.0.0.1
    "GLOO_SOCKET_IFNAME": "lo",
    "DS_ACCELERATOR": "cpu",
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def prepare_env(gpu: bool = False) -> dict[str, str]:
    """Set the environment our Ray processes need (before ``import ray``); returns it."""
    env = {k: v for k, v in BASE_ENV.items()
           if not gpu or k not in ("DS_ACCELERATOR", "GLOO_SOCKET_IFNAME")}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return env


# Passed on to Ray workers when set in the driver: where S3 and MLflow are.
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")


def worker_env(gpu: bool = False) -> dict[str, str]:
    """The environment variables a job's Ray workers need: ours (CPU or GPU flavour) plus the
    driver's S3 and MLflow settings."""
    env = {k: v for k, v in BASE_ENV.items()
           if not gpu or k not in ("DS_ACCELERATOR", "GLOO_SOCKET_IFNAME")}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    return env


def init_ray(address: str | None = None, *, num_cpus: int | None = None,
             object_store_memory: int | None = None, temp_dir: str | None = None,
             runtime_env: dict[str, Any] | None = None, log_to_driver: bool = True) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) when given, else start a private local Ray.

    A local Ray never attaches to someone else's cluster (``address="local"``) and keeps its
    files in its own temp dir. Calling it when Ray is already initialised does nothing.
    ``log_to_driver=False`` keeps worker output in the session's log files only.
    """
    prepare_env()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="mova-ray-", dir="/tmp")
    kwargs: dict[str, Any] = {}
    if object_store_memory:
        kwargs["object_store_memory"] = object_store_memory
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             _temp_dir=temp_dir, runtime_env=runtime_env, configure_logging=True,
             logging_level=logging.WARNING, log_to_driver=log_to_driver, **kwargs)
    log.info("started a local Ray (%s CPUs, temp dir %s)", num_cpus or os.cpu_count(), temp_dir)


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a Serve HTTP proxy started on loopback)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
