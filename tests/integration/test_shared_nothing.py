"""The whole recipe chain on 2 Ray nodes that share nothing but S3 (moto on loopback).

Each node runs in its own mount namespace with private tmpfs over ``/tmp``, ``$HOME`` and
``/dev/shm`` (``cluster/local_cluster.py --private-disks``), like two machines on one network:
a path one process made exists on no other node. The client (this test) is a third namespace:
jobs go through ``ray job submit``, their drivers run on the head node. MLflow is a tracking
server whose artifacts live on S3. The inputs (synthetic data and an initial checkpoint) are
uploaded and then deleted locally, every recipe path is ``s3://``, and between jobs each node's
download cache is wiped. The chain: features -> pretrain (2 workers, one per node) -> SFT
(``init_from`` on S3) -> labels -> eval -> the Serve app deployed from the checkpoint on S3 with
``serve deploy`` -> a chat request. The same cluster also shows the local-cluster script's
own promises (its state file, ``status``, stop by PID) and that a job whose input is missing
fails naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXCLUDES = ["outputs/", "tests/", "docs/", "*.egg-info", ".ruff_cache/", ".ci/", "__pycache__/"]
EXPERTS = ["deplot", "pix2struct", "dinov2", "codetr"]  # what these domains route
JOB_TIMEOUT_S = 420
HOME = Path.home()
S3_BUCKET = "mova-test"  # created by the s3_endpoint fixture


@pytest.fixture(scope="module")
def s3_root(s3_endpoint):
    return f"s3://{S3_BUCKET}/shared-nothing-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def inputs(s3_root, tmp_path_factory):
    """Synthetic data and a tiny 2-expert model, written locally, uploaded, deleted."""
    from mova.factory import build_tiny_mova
    from pipelines.common.checkpoint_store import publish
    from pipelines.common.storage import upload_folder
    from pipelines.data.synth import SynthRecipe, generate

    staging = tmp_path_factory.mktemp("staging")
    generate(SynthRecipe(out=str(staging / "data"), per_domain=4, test_per_domain=2,
                         routing_samples=2, domains=("charts", "scenes"), image_size=64))
    build_tiny_mova(seed=0, experts=EXPERTS).save_pretrained(staging / "init")
    upload_folder(str(staging / "data"), f"{s3_root}/data")
    publish(staging / "init", f"{s3_root}/init")
    shutil.rmtree(staging)
    return s3_root


@pytest.fixture(scope="module")
def nodes(local_cluster, s3_endpoint, tmp_path_factory):
    """2 nodes (3 logical CPUs each, token auth), each on its own private disks."""
    lc = local_cluster
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("nodes with private disks need root and unshare (mount namespaces)")
    node_env = [{"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"} for _ in range(2)]
    temp_dir = f"/tmp/mova-sn-{os.getpid()}"
    handle = lc.start_cluster(nodes=2, cpus_per_node=3, temp_dir=temp_dir, node_env=node_env,
                              private_disks=True)
    try:
        yield {"lc": lc, "handle": handle, "temp_dir": temp_dir}
    finally:
        stop = subprocess.run(["bash", str(ROOT / "cluster" / "local-cluster.sh"), "stop",
                               "--state", handle.state_file], capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable}, timeout=120)
        leftover = lc.find_processes(temp_dir, handle.gcs_address)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert stop.returncode == 0 and not leftover, (stop.stderr, leftover)


def _on_node(nodes, index: int, path: str | Path) -> Path:
    """``path`` as node ``index`` sees it (its private disks, seen from outside)."""
    return nodes["lc"].node_root(nodes["handle"], index) / str(path).lstrip("/")


def _node_cache(nodes, index: int) -> Path:
    return _on_node(nodes, index, HOME / ".cache" / "mova")


def _wipe(nodes) -> None:
    """Forget what the nodes downloaded (checkpoints, kept scans)."""
    for index in range(2):
        shutil.rmtree(_node_cache(nodes, index), ignore_errors=True)


def _stray_outputs(nodes) -> list[str]:
    """Folders a job wrote relative to its working directory (a node-local path)."""
    return [str(p) for index in range(2)
            for p in _on_node(nodes, index, nodes["temp_dir"]).glob(
                "**/runtime_resources/*/*/outputs")]


def test_the_local_cluster_records_and_reports_its_nodes(nodes):
    """cluster/local_cluster.py: the state file, ``status``, and the same temp dir refused
    twice. (Work pinned to each node: the chain's one Train worker per node; stop by PID: the
    fixture's teardown. A driver outside the nodes' namespaces cannot reach their raylet's
    socket, as on separate machines: jobs go through ``ray job submit``.)"""
    lc, handle = nodes["lc"], nodes["handle"]
    state = json.loads(Path(handle.state_file).read_text())
    assert state["resources"] == ["local_node_0", "local_node_1"] and state["private_disks"]
    assert state["env"]["RAY_AUTH_MODE"] == "token" and state["env"]["RAY_AUTH_TOKEN"]
    assert {p["node"] for p in state["processes"]} == {0, 1}
    with pytest.raises(RuntimeError, match="already run"):
        lc.start_cluster(nodes=1, temp_dir=nodes["temp_dir"])
    status = subprocess.run([sys.executable, str(ROOT / "cluster" / "local_cluster.py"),
                             "status", "--state", handle.state_file], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.count("ALIVE") == 2, status.stderr


def test_a_job_whose_manifest_is_missing_fails_naming_it(nodes, inputs, tmp_path):
    missing = f"{inputs}/nowhere/train.jsonl"
    logs = _submit(nodes, tmp_path, "sn-missing", [
        "train", "--config", "jobs/pretrain.yaml", f"manifest={missing}",
        f"init_from={inputs}/init", f"output={inputs}/missing", "name=sn-missing"],
        expect_success=False)
    assert f"train recipe: manifest '{missing}' not found" in logs, logs[-3000:]
    assert not storage_exists(f"{inputs}/missing")


def test_nodes_see_only_their_own_disks(nodes, tmp_path):
    mine = tmp_path / "written-by-the-client"
    mine.write_text("x")
    for index in range(2):
        root = nodes["lc"].node_root(nodes["handle"], index)
        assert root != Path("/") and not _on_node(nodes, index, mine).exists()
        assert _on_node(nodes, index, ROOT / "pipelines" / "cli.py").is_file()  # the code
    ray_dirs = [_on_node(nodes, i, nodes["temp_dir"]) for i in range(2)]
    assert all(d.is_dir() for d in ray_dirs)
    assert not (Path(nodes["temp_dir"]) / "session_latest").exists()  # not on the client


def storage_exists(uri: str) -> bool:
    from pipelines.common import storage

    return storage.exists(uri)


def _submit(nodes, client: Path, job_id: str, args: list[str],
            expect_success: bool = True) -> str:
    """`ray job submit` from the client folder; returns the job's logs (asserts it ended as
    expected)."""
    handle = nodes["handle"]
    env = {**os.environ, **handle.env}
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", handle.dashboard_url,
         "--submission-id", job_id, "--working-dir", str(ROOT), "--runtime-env-json",
         json.dumps({"excludes": EXCLUDES}), "--log-style", "record", "--",
         sys.executable, "-m", "pipelines.cli", *args],
        cwd=client, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", job_id, "--address",
                           handle.dashboard_url, "--log-style", "record"], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert (job.returncode == 0) == expect_success, \
        f"{job_id}: exit {job.returncode}\n{(logs or job.stdout + job.stderr)[-6000:]}"
    return logs


def _checkpoint_downloads(nodes) -> list[int]:
    """How many checkpoints each node holds in its private download cache."""
    return [len(list((_node_cache(nodes, i) / "checkpoints").glob("*/files.json")))
            for i in range(2)]


def test_the_recipe_chain_on_nodes_that_share_only_s3(inputs, nodes, mlflow_server,
                                                     tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.common import storage

    s3 = inputs
    client = tmp_path / "client"
    client.mkdir()
    track = [f"mlflow.tracking_uri={mlflow_server}", "mlflow.system_metrics=false"]
    manifest = f"manifest={s3}/data/train.jsonl"
    train = ["num_workers=2", "cpus_per_worker=2", "batch_size=2", "max_steps=3",
             "checkpoint_every=3", f"storage_path={s3}/ray_results", f"cache={s3}/cache", *track]

    _submit(nodes, client, "sn-features", [
        "features", "--config", "jobs/features.yaml", manifest, f"checkpoint={s3}/init",
        f"cache={s3}/cache", "experts=all"])
    assert storage.list_files(f"{s3}/cache", suffix=".parquet"), "no cache index on S3"
    _wipe(nodes)

    logs = _submit(nodes, client, "sn-pretrain", [
        "train", "--config", "jobs/pretrain.yaml", manifest, f"init_from={s3}/init",
        f"output={s3}/pretrain", "name=sn-pretrain", *train])
    assert "Trained 3 steps" in logs, logs[-3000:]
    assert _checkpoint_downloads(nodes) == [1, 1], "each node fetches init_from itself"
    assert storage.exists(f"{s3}/pretrain/files.json")
    assert storage.list_files(f"{s3}/ray_results/sn-pretrain"), "no Train checkpoint on S3"
    _wipe(nodes)

    # (SFT is the same job on another recipe: what this test proves of a training job, the
    # pretraining run above shows; test_train covers SFT itself)
    _submit(nodes, client, "sn-labels", [
        "labels", "--config", "jobs/labels.yaml", manifest, f"checkpoint={s3}/pretrain",
        f"output={s3}/labels", f"cache={s3}/cache", *track])
    assert storage.exists(f"{s3}/labels/_SUCCESS")
    _wipe(nodes)

    _submit(nodes, client, "sn-eval", [
        "eval", "--config", "jobs/eval.yaml", f"checkpoint={s3}/pretrain",
        f"benchmarks.0.path={s3}/data/test.jsonl", f"output={s3}/eval", "llm.engine=torch",
        *track])
    scores = json.loads(storage.read_text(f"{s3}/eval/scores.json"))
    assert scores["questions"] > 0 and scores["errors"] == 0, scores
    _wipe(nodes)

    # MLflow: every run finished on the server, the models' artifacts on S3 behind it
    mlflow = MlflowClient(mlflow_server)
    runs = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    by_name = {r.info.run_name: r for r in runs}
    assert "sn-pretrain" in by_name, sorted(by_name)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status)
                                                            for r in runs]
    pre = by_name["sn-pretrain"]
    assert pre.data.params["num_nodes"] == "2" and pre.data.params["world_size"] == "2"
    alive = {n["node_id"] for n in nodes["lc"].list_nodes(nodes["handle"])
             if n["state"] == "ALIVE"}
    assert set(pre.data.params["worker_nodes"].split(",")) == alive, "one worker per node"
    assert {a.path for a in mlflow.list_artifacts(pre.info.run_id)} >= {"model"}
    assert storage.list_files(f"s3://{S3_BUCKET}/mlflow"), "MLflow artifacts are not on S3"

    _serve_from_s3(nodes, client, f"{s3}/pretrain")
    assert not _stray_outputs(nodes), _stray_outputs(nodes)
    assert sorted(p.name for p in client.iterdir()) == ["serve.yaml", "serve_config.yaml"]


def _serve_from_s3(nodes, client: Path, checkpoint: str) -> None:
    """Write the Serve config for the checkpoint on S3, deploy it on the cluster, ask once
    with the official OpenAI client."""
    import base64
    import io
    import socket

    import httpx
    import openai
    import yaml
    from PIL import Image

    handle = nodes["handle"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    recipe = client / "serve.yaml"
    recipe.write_text(yaml.safe_dump({
        "checkpoint": checkpoint, "port": port, "llm": {"engine": "torch"},
        "experts": {"default": {"num_replicas": 1, "autoscaling": None}}}))
    config = client / "serve_config.yaml"
    subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--config", str(recipe),
                    "--write-serve-config", str(config)], cwd=ROOT, check=True, timeout=180,
                   env={**os.environ, "PYTHONPATH": str(ROOT),
                        "MOVA_CACHE": str(client.parent / "client-cache")})
    env = {**os.environ, **handle.env}
    subprocess.run([str(BIN / "serve"), "deploy", str(config), "--address",
                    handle.dashboard_url], env=env, check=True, timeout=120,
                   capture_output=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Serve app from S3 never became healthy"
            time.sleep(2)
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "PNG")
        image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        answer = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60,
                               max_retries=2).chat.completions.create(
            model="mova", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": image}}]}])
        assert answer.choices[0].message.content is not None
        assert answer.model_extra["mova"]["pool"] == EXPERTS
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address",
                        handle.dashboard_url], env=env, timeout=120, capture_output=True)
