"""Cluster recipes (KubeRay, cluster launcher, Dockerfile) and the local cluster's stop logic.

Every YAML under cluster/ is loaded and checked; the RayService's embedded Serve config is
validated with Ray Serve's own schema and the launcher YAML with the autoscaler's. The
local-cluster tests here start no Ray: they exercise the state file and the PID-based stop.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mova.experts.registry import DEFAULT_POOL

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
KUBERAY_KINDS = {"RayCluster": "spec", "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
WORKDIR_URI = "local:///home/ray/mova"
SERVE_DEPLOYMENTS = {"Ingress", "Adapter", "LLM", *(f"Expert_{n}" for n in DEFAULT_POOL)}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAMLS for d in _docs(p) if d.get("kind") in KUBERAY_KINDS]


def _by_kind(kind: str) -> dict:
    found = [d for _, d in _kuberay_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under cluster/, found {len(found)}"
    return found[0]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"][KUBERAY_KINDS[doc["kind"]]]


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _serve_config() -> dict:
    return yaml.safe_load(_by_kind("RayService")["spec"]["serveConfigV2"])


def test_every_cluster_yaml_loads():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAMLS}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayservice.yaml",
            "ray-cluster.yaml"} <= names
    for path in YAMLS:
        docs = _docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
    for path, doc in _kuberay_docs():
        assert doc["apiVersion"] == "ray.io/v1", path
        assert doc["metadata"]["name"] and isinstance(doc["spec"], dict), path


@pytest.mark.parametrize("kind", sorted(KUBERAY_KINDS))
def test_kuberay_cluster_specs(kind):
    import ray

    spec = _cluster_spec(_by_kind(kind))
    assert spec["rayVersion"] == ray.__version__  # the image and the project pin one Ray
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and "nvidia.com/gpu" not in head["resources"].get("limits", {})
    env = {e["name"]: e for e in head["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"], key
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head["image"]
        assert container["env"] == head["env"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert _quantity(limits["nvidia.com/gpu"]) >= 1
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]


def test_raycluster_autoscales():
    spec = _by_kind("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert any(g["minReplicas"] < g["maxReplicas"] for g in spec["workerGroupSpecs"])


def test_rayjob_runs_mova_train_with_every_path_on_s3():
    from pipelines.common.recipe import load_recipe
    from pipelines.train.recipe import TrainRecipe

    spec = _by_kind("RayJob")["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:4] == ["mova", "train", "--config", "jobs/sft.yaml"]
    recipe = load_recipe(TrainRecipe, ROOT / "jobs" / "sft.yaml", words[4:]).validate()
    for name in TrainRecipe.paths:  # the pods share no disk: every path is on object storage
        assert str(getattr(recipe, name)).startswith("s3://"), (name, getattr(recipe, name))
    assert recipe.use_gpu and recipe.precision == "bf16"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == WORKDIR_URI
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayservice_serve_config_passes_ray_serve_schema(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    config = _serve_config()
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    schema = validate(config)
    (app,) = schema.applications
    assert app.import_path == "pipelines.serve.app:build_app"
    assert app.args["config"] == "jobs/serve.yaml"
    assert app.runtime_env["working_dir"] == WORKDIR_URI
    assert {d.name for d in app.deployments} == SERVE_DEPLOYMENTS
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 120}


def test_rayservice_deploys_as_shipped_checkpoint_from_s3_key_from_a_secret(monkeypatch):
    """build_app reads the recipe named by the Serve config's args (relative to the working
    dir, the repo root in the image): the checkpoint is an s3:// URI, the API key comes from a
    Kubernetes Secret through the env var the recipe names, and an endpoint bound beyond
    loopback refuses to start without it."""
    from pipelines.serve.app import recipe_from_args

    config = _serve_config()
    (app,) = config["applications"]
    monkeypatch.chdir(ROOT)
    recipe = recipe_from_args(app["args"])
    assert recipe.checkpoint.startswith("s3://")
    assert recipe.host == config["http_options"]["host"] == "0.0.0.0"
    assert not recipe.allow_unauthenticated and not recipe.api_key
    spec = _by_kind("RayService")["spec"]["rayClusterConfig"]
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for container in containers:  # every node hosts replicas: every pod gets the key
        env = {e["name"]: e for e in container["env"]}
        ref = env[recipe.api_key_env]["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] and "value" not in env[recipe.api_key_env]
    monkeypatch.delenv(recipe.api_key_env, raising=False)
    with pytest.raises(ValueError, match="without an API key"):
        recipe.check_exposure(config["http_options"]["host"])
    monkeypatch.setenv(recipe.api_key_env, "from-the-secret")
    recipe.check_exposure(config["http_options"]["host"])
    assert recipe.resolve_api_key() == "from-the-secret"


def test_rayservice_deployments_fit_the_worker_groups():
    deployments = _serve_config()["applications"][0]["deployments"]
    groups = _by_kind("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = cpus = 0.0
    for group in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["maxReplicas"] * _quantity(limits.get("nvidia.com/gpu", 0))
        cpus += group["maxReplicas"] * _quantity(limits["cpu"])
    need_gpus = need_cpus = 0.0
    for d in deployments:
        scaling, actor = d["autoscaling_config"], d["ray_actor_options"]
        assert 0 <= scaling["min_replicas"] <= scaling["max_replicas"], d["name"]
        assert {"num_cpus", "num_gpus"} <= set(actor), d["name"]
        need_gpus += scaling["max_replicas"] * actor["num_gpus"]
        need_cpus += scaling["max_replicas"] * actor["num_cpus"]
    # every replica at max_replicas must be placeable, or some stay pending forever
    assert need_gpus <= gpus and need_cpus <= cpus


def test_cluster_launcher_config_passes_the_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _docs(CLUSTER / "ray-cluster.yaml")[0]
    validate_config(prepare_config(raw))
    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert "." in raw["file_mounts"].values()
    setup = raw["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c and "--index-url" in c)
    project_at = next(i for i, c in enumerate(setup) if "mova" in c and "pip install" in c)
    assert torch_at < project_at and "torch==" in setup[project_at]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_torch_before_the_project():
    steps = _dockerfile_instructions()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for word, rest in steps if word == "ARG"
            and "=" in rest}
    assert "py311" in args["BASE_IMAGE"] and steps[[w for w, _ in steps].index("FROM")]
    runs = [rest for word, rest in steps if word == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \"?torch==", r))
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_at < project_at
    assert "--index-url" in runs[torch_at] and "torch==" in runs[project_at]
    workdir = next(rest for word, rest in steps if word == "WORKDIR")
    assert WORKDIR_URI == "local://" + workdir
    assert any(word == "COPY" and "jobs" in rest for word, rest in steps)


# --------------------------------------------------------------------------------------------
# cluster/local_cluster.py without Ray: state file, argument checks, PID-based stop
# --------------------------------------------------------------------------------------------

def test_local_cluster_state_round_trip(tmp_path, capsys, local_cluster):
    lc = local_cluster
    handle = lc.ClusterHandle(
        temp_dir=str(tmp_path), gcs_address="127.0.0.1:1", dashboard_url="http://127.0.0.1:2",
        env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "secret"}, resources=["local_node_0"],
        processes=[lc.Proc(11, 22, "raylet", 0)], state_file=str(tmp_path / "state.json"))
    handle.save()
    assert os.stat(handle.state_file).st_mode & 0o777 == 0o600  # it holds the token
    assert lc.ClusterHandle.load(handle.state_file) == handle
    assert lc.main(["env", "--state", handle.state_file]) == 0
    assert capsys.readouterr().out.splitlines() == ["export RAY_AUTH_MODE=token",
                                                    "export RAY_AUTH_TOKEN=secret"]


def test_local_cluster_rejects_bad_arguments_before_starting_anything(tmp_path, local_cluster):
    lc = local_cluster
    with pytest.raises(ValueError, match="nodes=0"):
        lc.start_cluster(nodes=0, temp_dir=str(tmp_path))
    with pytest.raises(ValueError, match="auth='none'"):
        lc.start_cluster(nodes=1, temp_dir=str(tmp_path), auth="none")
    with pytest.raises(ValueError, match="characters"):
        lc.start_cluster(nodes=1, temp_dir="/tmp/" + "x" * 80)
    with pytest.raises(ValueError, match="Ray rewrites"):
        lc.loopback_alias("localhost")  # a literal loopback name is what Ray rewrites
    assert lc.loopback_alias() not in lc.LITERAL_LOOPBACK


def _spawn(ignore_term: bool) -> subprocess.Popen:
    code = ("import signal, sys, time\n"
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
            + "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"  # the signal handler is in place
    return proc


def test_local_cluster_stop_terms_then_kills_only_recorded_processes(tmp_path, local_cluster):
    lc = local_cluster
    polite, stubborn, bystander = _spawn(False), _spawn(True), _spawn(False)
    try:
        procs = []
        for proc, name in ((polite, "raylet"), (stubborn, "gcs_server")):
            procs.append(lc.Proc(proc.pid, lc._stat(proc.pid)[2], name))
        # a recorded PID whose start time no longer matches (PID reuse) is left alone
        procs.append(lc.Proc(bystander.pid, lc._stat(bystander.pid)[2] + 1, "raylet"))
        handle = lc.ClusterHandle(str(tmp_path), "127.0.0.1:1", "http://127.0.0.1:2", {}, [],
                                  procs, str(tmp_path / "s.json"))
        started = time.monotonic()
        killed = lc.stop_cluster(handle, grace_s=1.0)
        assert killed == [stubborn.pid]
        assert polite.wait(timeout=5) == -signal.SIGTERM
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None
        assert time.monotonic() - started < 10
    finally:
        for proc in (polite, stubborn, bystander):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
