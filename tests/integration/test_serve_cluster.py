"""`mova serve` from the command line: the blocking server with a clean shutdown, and a
written Serve config applied with `serve deploy` to a real `ray start` head on loopback."""

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
              "ray": {"num_cpus": 2, "temp_dir": temp_dir}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def wait_healthy(url: str, proc: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"mova serve exited with {proc.returncode}:\n"
                                 f"{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url}/health did not answer within {timeout} s:\n"
                         f"{log.read_text()[-3000:]}")


def chat(url: str) -> httpx.Response:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "mova", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url",
                                                    "image_url": {"url": uri}}]}]}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


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


def test_written_serve_config_deploys_on_a_ray_start_head(checkpoint, tmp_path):
    port, temp_dir = free_port(), f"/tmp/mova-serve-head-{os.getpid()}"
    recipe = write_recipe(tmp_path / "serve.yaml", checkpoint, port, temp_dir)
    config = tmp_path / "out.yaml"
    subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--config", str(recipe),
                    "--write-serve-config", str(config)], cwd=REPO, env=env(), check=True,
                   timeout=120)
    written = yaml.safe_load(config.read_text())
    assert written["http_options"]["port"] == port
    assert written["applications"][0]["args"]["checkpoint"] == str(checkpoint)
    dashboard = free_port()
    log = tmp_path / "cluster.log"
    try:
        with open(log, "ab") as out:
            subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=2",
                            f"--port={free_port()}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
                            f"--ray-client-server-port={free_port()}",
                            "--include-dashboard=true", "--disable-usage-stats"],
                           env=env(), stdout=out, stderr=subprocess.STDOUT, check=True,
                           timeout=120)
            subprocess.run([str(BIN / "serve"), "deploy", str(config), "--address",
                            f"http://127.0.0.1:{dashboard}"], env=env(), stdout=out,
                           stderr=subprocess.STDOUT, check=True, timeout=120)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, None, log, timeout=180)
        resp = chat(url)
        assert resp.status_code == 200, resp.text
        assert resp.json()["mova"]["pool"] == ["sam"]
    finally:
        stop_cluster(temp_dir)
