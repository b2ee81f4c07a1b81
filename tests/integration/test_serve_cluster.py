"""`mova serve` from the command line: the blocking server with a clean shutdown; and the
Serve config the RayService manifest carries, applied with `serve deploy` to a real `ray start`
head on loopback with the checkpoint on S3 (moto). (A config written by `mova serve
--write-serve-config` is deployed the same way in test_shared_nothing.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.update({"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "RAY_USAGE_STATS_ENABLED": "0"})
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mova.factory import build_tiny_mova

    path = tmp_path_factory.mktemp("serve-cli") / "ckpt"
    build_tiny_mova(seed=0, experts=["sam"]).save_pretrained(path)
    return path


def write_recipe(path: Path, checkpoint: Path, port: int, temp_dir: str) -> Path:
    recipe = {"checkpoint": str(checkpoint), "port": port,
              "experts": {"default": {"num_replicas": 1, "autoscaling": None}},
              "llm": {"engine": "torch"},
              "ray": {"num_cpus": 2, "temp_dir": temp_dir}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def wait_healthy(url: str, proc: subprocess.Popen | None, log: Path, timeout: float,
                 key: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"mova serve exited with {proc.returncode}:\n"
                                 f"{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url}/health did not answer within {timeout} s:\n"
                         f"{log.read_text()[-3000:]}")


def chat(url: str, key: str | None = None) -> httpx.Response:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "mova", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url",
                                                    "image_url": {"url": uri}}]}]}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def processes_of(marker: str) -> list[psutil.Process]:
    """Processes whose command line names ``marker`` (a temp dir), with their descendants."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_cluster(marker: str) -> None:
    """Stop our own `ray start` head by PID: raylet first, gcs_server last (never `ray stop`)."""
    procs = processes_of(marker)

    def rank(p: psutil.Process) -> int:
        try:
            name = " ".join(p.cmdline())
        except psutil.Error:
            return 1
        return 0 if "raylet" in name else 2 if "gcs_server" in name else 1

    for proc in sorted(procs, key=rank):
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
        time.sleep(0.1)
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def test_mova_serve_blocks_until_interrupted_then_shuts_down(checkpoint, tmp_path):
    port, temp_dir = free_port(), f"/tmp/mova-serve-cli-{os.getpid()}"
    recipe = write_recipe(tmp_path / "serve.yaml", checkpoint, port, temp_dir)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--config",
                                 str(recipe), "limits.max_tokens=8"], cwd=REPO, env=env(),
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout=180)
        resp = chat(url)
        assert resp.status_code == 200 and resp.json()["object"] == "chat.completion"
        assert proc.poll() is None  # still serving: it blocks
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped" in log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)
    deadline = time.monotonic() + 30
    while processes_of(temp_dir) and time.monotonic() < deadline:
        time.sleep(1)
    assert not processes_of(temp_dir), "Ray processes outlived `mova serve`"


def shipped_serve_config(port: int) -> dict:
    """The Serve config cluster/kuberay/rayservice.yaml carries, with what only a test changes:
    loopback and a free port instead of 0.0.0.0:8000, the repository as the working dir
    instead of the image's path, replicas sized for 2 CPUs and no GPU, and the torch loop
    for the LLM (a vLLM engine's start would double the test). The application's
    args (jobs/serve.yaml plus the overrides: the checkpoint on S3, the key's env var) and the
    deployments' names and autoscaling are as shipped."""
    doc = next(d for d in yaml.safe_load_all((REPO / "cluster/kuberay/rayservice.yaml")
                                             .read_text()) if d["kind"] == "RayService")
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"]["overrides"] = [o if not o.startswith("host=") else "host=127.0.0.1"
                                for o in app["args"]["overrides"]] + ["llm.engine=torch"]
    app["runtime_env"]["working_dir"] = f"local://{REPO}"
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0.1, "num_gpus": 0}
    return config


def test_the_rayservice_serve_config_deploys_on_a_ray_start_head(s3_endpoint, tmp_path):
    """`serve deploy` of the RayService's config on a `ray start` head against S3 (moto): the
    replicas fetch the checkpoint from the s3:// URI the manifest names and the ingress takes
    its key from the environment variable the Kubernetes Secret fills."""
    import boto3

    from mova.factory import build_tiny_mova
    from pipelines.common.checkpoint_store import publish
    from pipelines.serve.app import recipe_from_args

    port, temp_dir, key = free_port(), f"/tmp/mova-serve-head-{os.getpid()}", "secret-key"
    config = shipped_serve_config(port)
    recipe = recipe_from_args({**config["applications"][0]["args"], "config": str(
        REPO / config["applications"][0]["args"]["config"])})
    bucket = recipe.checkpoint.removeprefix("s3://").split("/")[0]
    boto3.client("s3").create_bucket(Bucket=bucket)
    model = build_tiny_mova(seed=0)  # the whole default pool: the manifest names every expert
    publish(model.save_pretrained(tmp_path / "ckpt"), recipe.checkpoint)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    head_env = {**env(), recipe.api_key_env: key, "MOVA_CACHE": str(tmp_path / "cache")}
    dashboard = free_port()
    log = tmp_path / "cluster.log"
    try:
        with open(log, "ab") as out:
            subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=2",
                            f"--port={free_port()}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
                            f"--ray-client-server-port={free_port()}",
                            "--include-dashboard=true", "--disable-usage-stats"],
                           env=head_env, stdout=out, stderr=subprocess.STDOUT, check=True,
                           timeout=120)
            subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address",
                            f"http://127.0.0.1:{dashboard}"], env=env(), stdout=out,
                           stderr=subprocess.STDOUT, check=True, timeout=120)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, None, log, timeout=300, key=key)
        assert chat(url).status_code == 401  # no key
        resp = chat(url, key)
        assert resp.status_code == 200, resp.text
        assert resp.json()["mova"]["pool"] == model.expert_names
    finally:
        stop_cluster(temp_dir)
