"""`mova train` submitted with `ray job submit` to a real 2-node Ray cluster on this machine.

The cluster comes from cluster/local_cluster.py (token auth on, its token in ``handle.env``);
every ``ray job`` CLI call runs in a subprocess with that environment, so this process never
joins Ray. It is stopped by PID with cluster/local-cluster.sh stop (never ``ray stop``).

How the job is submitted, and why:

- ``--working-dir <repo>``: the repo is ~2 MB without ``.venv`` and ``.git``, which Ray 2.60
  leaves out of a working dir by default; ``--runtime-env-json`` adds ``excludes`` for the
  rest we do not need. The job driver and the Train workers import ``pipelines`` and ``mova``
  from the uploaded copy (it comes first on ``sys.path``), as on a real cluster, and
  ``--config jobs/pretrain.yaml`` is read relative to it.
- The entrypoint is the venv's python by absolute path (``sys.executable -m pipelines.cli``):
  the job driver inherits the PATH of whoever ran ``ray start``, and a bare ``python`` there is
  the system interpreter, not the venv the nodes run.
- The recipe leaves ``ray.address`` unset: the job manager sets ``RAY_ADDRESS`` and the
  driver's environment carries ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` from the nodes, so
  ``init_ray`` joins the cluster; had it started a private Ray instead, the workers' node ids
  would not be the cluster's and the placement assertion would fail.
- All paths passed to the job are absolute (its working dir is a Ray session folder).
- Placement: nodes of 3 logical CPUs and ``cpus_per_worker=2``. Ray Train packs workers
  (``PACK``), so two workers fit on one node only if their CPUs do; 2 + 2 > 3 forces one worker
  per node, and the spare CPU per node runs Ray Data's read tasks (with every CPU taken by
  workers, the dataset would never be read). Logical CPUs: the machine has 2 cores.

Run it under the shared lock: `flock /tmp/mova-ray.lock pytest tests/integration/...`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc"),
]

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
EXCLUDES = ["outputs/", "tests/", "docs/", "*.egg-info", ".ruff_cache/", ".ci/", "__pycache__/"]
DOMAINS = ("charts", "scenes")
EXPERTS = ["deplot", "pix2struct", "dinov2", "codetr"]  # the experts these domains route
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny synthetic manifest and a tiny 4-expert model (no Ray needed for either)."""
    from mova.factory import build_tiny_mova
    from pipelines.data.synth import SynthRecipe, generate

    root = tmp_path_factory.mktemp("train_cluster")
    data = generate(SynthRecipe(out=str(root / "data"), per_domain=4, test_per_domain=0,
                                routing_samples=2, domains=DOMAINS, image_size=64))
    init = root / "init"
    build_tiny_mova(seed=0, experts=EXPERTS).save_pretrained(init)
    return {"root": root, "manifest": Path(data.train_manifest).resolve(), "init": init}


@pytest.fixture(scope="module")
def cluster(local_cluster):
    """A 2-node local Ray cluster (3 logical CPUs a node, token auth), stopped by PID."""
    lc = local_cluster
    temp_dir = f"/tmp/mova-tc-{os.getpid()}"
    handle = lc.start_cluster(nodes=2, cpus_per_node=3, temp_dir=temp_dir)
    try:
        yield lc, handle
    finally:
        stop = subprocess.run(["bash", str(ROOT / "cluster" / "local-cluster.sh"), "stop",
                               "--state", handle.state_file], capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable}, timeout=120)
        left = [p for p in handle.processes if lc._alive(p)]
        leftover = lc.find_processes(temp_dir, handle.gcs_address)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert stop.returncode == 0, stop.stderr
    assert not left and not leftover, (left, leftover)


def _ray_job(handle, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``ray job <args>`` against the cluster's dashboard, with its auth environment."""
    return subprocess.run([str(RAY), "job", *args, "--address", handle.dashboard_url,
                           "--log-style", "record"], env={**os.environ, **handle.env},
                          capture_output=True, text=True, timeout=timeout)


def _submit_train(handle, job_id: str, overrides: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python -m pipelines.cli train ...`; waits."""
    return subprocess.run(
        [str(RAY), "job", "submit", "--address", handle.dashboard_url, "--submission-id",
         job_id, "--working-dir", str(ROOT), "--runtime-env-json",
         json.dumps({"excludes": EXCLUDES}), "--log-style", "record", "--",
         sys.executable, "-m", "pipelines.cli", "train", "--config", "jobs/pretrain.yaml",
         *overrides],
        env={**os.environ, **handle.env}, capture_output=True, text=True,
        timeout=JOB_TIMEOUT_S)


def _status(handle, job_id: str) -> str:
    """The job's status from `ray job status` (it words terminal states differently)."""
    out = _ray_job(handle, "status", job_id)
    assert out.returncode == 0, out.stderr[-2000:]
    text, job = out.stdout + out.stderr, re.escape(job_id)
    for pattern, status in ((rf"Job '{job}' succeeded", "SUCCEEDED"),
                            (rf"Job '{job}' failed", "FAILED"),
                            (rf"Job '{job}' was stopped", "STOPPED")):
        if re.search(pattern, text):
            return status
    found = re.search(rf"Status for job '{job}': (\w+)", text)
    assert found, text
    return found.group(1)


def _logs(handle, job_id: str) -> str:
    out = _ray_job(handle, "logs", job_id)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _overrides(ws, name: str, **extra: str) -> list[str]:
    run = ws["root"] / name
    values = {"init_from": str(ws["init"]), "manifest": str(ws["manifest"]), "cache": "null",
              "features": "compute", "output": str(run / "model"), "name": name,
              "storage_path": str(ws["root"] / "ray_results"), "num_workers": "2",
              "cpus_per_worker": "2", "batch_size": "2", "max_steps": "3",
              "checkpoint_every": "3", "mlflow.system_metrics": "false", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def test_missing_manifest_fails_the_job_naming_the_file(workspace, cluster):
    _, handle = cluster
    missing = workspace["root"] / "nowhere" / "train.jsonl"
    job = _submit_train(handle, "mova-train-missing",
                        _overrides(workspace, "missing", manifest=str(missing)))
    assert job.returncode != 0, job.stdout[-3000:]
    assert _status(handle, "mova-train-missing") == "FAILED"
    logs = _logs(handle, "mova-train-missing")
    assert f"mova train: error: train recipe: manifest '{missing}' not found" in logs, logs
    assert not (workspace["root"] / "missing").exists()


def test_train_job_runs_one_worker_per_node(workspace, cluster):
    import torch
    from mlflow.tracking import MlflowClient

    from mova.factory import from_pretrained

    lc, handle = cluster
    run = workspace["root"] / "pretrain"
    job = _submit_train(handle, "mova-train-2nodes",
                        ["--json", str(run / "result.json"), *_overrides(workspace, "pretrain")])
    logs = _logs(handle, "mova-train-2nodes")
    assert job.returncode == 0, (job.stdout + job.stderr)[-5000:]
    assert _status(handle, "mova-train-2nodes") == "SUCCEEDED"
    assert "Trained 3 steps" in logs, logs[-5000:]
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 3 and result["final_loss"] > 0

    output = run / "model"
    trained, init = from_pretrained(output), from_pretrained(workspace["init"])
    assert trained.expert_names == EXPERTS
    a, b = init.adapter.state_dict(), trained.adapter.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a), "the adapter was trained"
    meta = json.loads((output / "training.json").read_text())
    assert meta["stage"] == "pretrain" and meta["steps"] == 3

    # MLflow: the default store, a sqlite file beside the output
    assert meta["tracking_uri"] == f"sqlite:///{run / 'mlflow.db'}"
    assert result["tracking_uri"] == meta["tracking_uri"]
    client = MlflowClient(meta["tracking_uri"])
    mlflow_run = client.get_run(meta["mlflow_run_id"])
    assert mlflow_run.info.run_id == result["mlflow_run_id"]
    assert mlflow_run.info.status == "FINISHED"
    losses = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert all(m.value > 0 for m in losses)

    # one Train worker on each node of this cluster (so the job joined it, not a private Ray)
    params = mlflow_run.data.params
    assert params["world_size"] == "2" and params["num_nodes"] == "2"
    ranks = params["worker_nodes"].split(",")
    cluster_nodes = {n["node_id"] for n in lc.list_nodes(handle) if n["state"] == "ALIVE"}
    assert len(ranks) == 2 and set(ranks) == cluster_nodes, (ranks, cluster_nodes)
