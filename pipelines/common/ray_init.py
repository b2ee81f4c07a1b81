"""Starting or joining Ray the same way from the CLI, jobs and tests."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from typing import Any

from mova.device import cuda_available

log = logging.getLogger(__name__)

# Environment every process of ours gets (quiet, offline-friendly libraries).
COMMON_ENV = {
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # Serve's HTTP proxy refuses chunked bodies itself (read by each proxy at its start; see
    # pipelines/serve/proxy_guard.py: the replica would otherwise pull the whole body)
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "pipelines.serve.proxy_guard:middlewares",
}
# Without a GPU DeepSpeed's CPU accelerator is the one (said explicitly, it does not warn).
CPU_ENV = {"DS_ACCELERATOR": "cpu"}
# A private Ray on this machine only: loopback addresses (read once, at `import ray`: the CLI
# sets it first thing) and gloo over loopback. Never applied when joining a cluster (RAY_ADDRESS
# or ray.address): its nodes talk over real networks.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GLOO_SOCKET_IFNAME": "lo",
}
# A private Ray on a small machine runs more worker processes than CPUs (a Serve app's ten
# fractional replicas, a feature job's actor pools): let up to 4 start at once, so that Ray
# does not warn (at 4x this limit) about a worker pool that is as large as intended.
LOCAL_SYSTEM_CONFIG = {"worker_maximum_startup_concurrency": 4}
# Ray's notice that a new local cluster uses token authentication (its default, and ours).
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
# Passed on to Ray workers when set in the driver: where S3 and MLflow are, how gloo talks.
# Never credentials: a runtime_env is shown in the dashboard and frozen for the job's life (an
# STS session token would expire in it), so every node takes S3 and MLflow credentials from
# its own environment (a pod's Secret, an instance role), as cluster/kuberay/*.yaml set them.
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "GLOO_SOCKET_IFNAME")
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")


def _process_env(gpu: bool | None) -> dict[str, str]:
    if gpu is None:
        gpu = cuda_available()
    return {**COMMON_ENV, **({} if gpu else CPU_ENV)}


def prepare_env(*, local: bool = False, gpu: bool | None = None) -> dict[str, str]:
    """Set (without overriding) the environment this process needs; ``local`` adds the
    loopback settings of a private Ray. ``gpu`` None: whether torch sees CUDA."""
    env = {**_process_env(gpu), **(LOOPBACK_ENV if local else {})}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return env


def worker_env(gpu: bool = False) -> dict[str, str]:
    """The environment variables a job's Ray workers need: ours (CPU or GPU flavour) plus the
    driver's S3, MLflow and gloo settings."""
    env = _process_env(gpu)
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
    address = address or os.environ.get("RAY_ADDRESS")
    joining = bool(address and address != "local")
    prepare_env(local=not joining)
    import ray

    if ray.is_initialized():
        return
    if joining:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="mova-ray-", dir="/tmp")
    kwargs: dict[str, Any] = {}
    if object_store_memory:
        kwargs["object_store_memory"] = object_store_memory
    notice = logging.getLogger(_TOKEN_NOTICE_LOGGER)
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 _temp_dir=temp_dir, runtime_env=runtime_env, configure_logging=True,
                 logging_level=logging.WARNING, log_to_driver=log_to_driver,
                 _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)
    finally:
        notice.setLevel(level)
    log.info("started a local Ray (%s CPUs, temp dir %s)", num_cpus or os.cpu_count(), temp_dir)


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a Serve HTTP proxy started on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
