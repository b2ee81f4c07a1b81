"""cluster/local_cluster.py: a real 2-node Ray cluster on this machine, joined by a driver.

The driver runs in a subprocess with the environment the state file records (auth token
included), so this test checks that environment too and leaves this process's Ray alone.
Run it under the shared lock: `flock /tmp/mova-ray.lock pytest tests/integration/...`.
"""

from __future__ import annotations

import json
import os
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
SCRIPT = ROOT / "cluster" / "local_cluster.py"

DRIVER = r"""
import json, sys
import ray

state = json.load(open(sys.argv[1]))
ray.init(address=state["gcs_address"], log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=0)
def where():
    return ray.get_runtime_context().get_node_id()

ran_on = {r: ray.get(where.options(resources={r: 1}).remote(), timeout=60)
          for r in state["resources"]}
owner = {r: n["NodeID"] for n in alive for r in n["Resources"] if r in state["resources"]}
print(json.dumps({"alive": len(alive), "ran_on": ran_on, "owner": owner}))
"""


def test_two_node_local_cluster_runs_pinned_tasks_and_stops_by_pid(local_cluster):
    lc = local_cluster
    temp_dir = f"/tmp/mova-lc-{os.getpid()}"
    handle = lc.start_cluster(nodes=2, cpus_per_node=1, temp_dir=temp_dir)
    try:
        state = json.loads(Path(handle.state_file).read_text())
        assert state["resources"] == ["local_node_0", "local_node_1"]
        assert state["env"]["RAY_AUTH_MODE"] == "token" and state["env"]["RAY_AUTH_TOKEN"]
        assert {p["node"] for p in state["processes"]} == {0, 1}
        assert sorted(p["name"] for p in state["processes"]
                      if p["name"] in ("raylet", "gcs_server")) == ["gcs_server", "raylet",
                                                                    "raylet"]
        with pytest.raises(RuntimeError, match="already run"):
            lc.start_cluster(nodes=1, temp_dir=temp_dir)  # the same temp dir is refused

        env = {**os.environ, **handle.env}
        result = subprocess.run([sys.executable, "-c", DRIVER, handle.state_file], env=env,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["alive"] == 2
        assert report["ran_on"] == report["owner"]  # each pinned task ran on its own node
        assert len(set(report["ran_on"].values())) == 2

        status = subprocess.run([sys.executable, str(SCRIPT), "status", "--state",
                                 handle.state_file], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert status.stdout.count("ALIVE") == 2
    finally:
        stop = subprocess.run(["bash", str(ROOT / "cluster" / "local-cluster.sh"), "stop",
                               "--state", handle.state_file], capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert stop.returncode == 0, stop.stderr
    # every recorded process is gone (a zombie left for init to reap counts as gone)
    left = [p for p in handle.processes if lc._alive(p)]
    assert not left, left
    assert not lc.find_processes(temp_dir, handle.gcs_address)
    shutil.rmtree(temp_dir, ignore_errors=True)
