"""End to end: `mova demo --quick` in its own process, as a newcomer runs it.

Synthetic data -> features -> pretrain -> labels -> SFT -> eval -> Serve -> openai client, on
one private local Ray that the demo must stop itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipelines.common.manifests.rows import manifest_files

pytestmark = pytest.mark.integration

STAGES = ("mova data synth", "mova model init", "mova features", "stage pretrain",
          "mova labels", "stage sft", "mova eval", "mova serve")


def _demo_ray_processes(since: float) -> list[str]:
    """Processes of a demo's private Ray (its gcs_server, raylet and helpers name the demo's
    temp dir, /tmp/mova-demo-ray-*, on their command line) started after ``since``. Leaked ones
    would be orphans, so they are looked for machine-wide, not among this process's children
    (which hold the tests' shared Ray)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "mova-demo-ray-" in cmdline and (proc.info["create_time"] or 0) >= since:
            found.append(f"{proc.info['pid']}: {cmdline[:120]}")
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    report = out.parent / "result.json"
    exe = Path(sys.executable).parent / "mova"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time() - 1
    proc = subprocess.run([str(exe), "demo", "--quick", "--out", str(out), "--json",
                           str(report)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return (out, json.loads(report.read_text()), proc.stdout + proc.stderr,
            _demo_ray_processes(started))


def test_every_stage_ran_and_left_its_outputs(demo):
    out, result, printed, _ = demo
    titles = list(result["steps_seconds"])
    for stage in STAGES:
        assert any(stage in t for t in titles), (stage, titles)
    for folder in ("data", "features", "init", "pretrain", "sft", "eval/trained",
                   "eval/untrained", "ray-logs"):
        assert (out / folder).is_dir(), folder
    assert (out / "data" / "train.labels" / "_SUCCESS").is_file()
    for ckpt in ("pretrain", "sft"):
        assert (out / ckpt / "config.json").is_file()
        assert (out / ckpt / "adapter.safetensors").is_file()
    assert "The MoVA demo finished" in printed and str(out) in printed
    # one line per step, not Ray Data's progress bars, and no library's warnings
    assert "MapBatches" not in printed and "it/s]" not in printed
    noise = [line for line in printed.splitlines() if "WARN" in line or "Warning" in line]
    assert not noise, noise[:10]


def test_the_trained_model_beats_the_untrained_one(demo):
    _, result, _, _ = demo
    trained, untrained = result["eval"]["trained"], result["eval"]["untrained"]
    assert trained["questions"] == untrained["questions"] > 0
    assert trained["score"] > untrained["score"], (trained["details"], untrained["details"])


def test_the_served_model_answered_through_the_openai_client(demo):
    out, result, printed, _ = demo
    served = result["served"]
    assert served["url"].startswith("http://127.0.0.1:")
    assert served["engine"] == "torch"  # the quick plan's (the full one: vLLM where installed)
    assert served["usage"]["completion_tokens"] > 0
    assert len(served["gate_weights"]) == 3  # one row per adapter block
    # greedy decoding of the same checkpoint: the server answers and routes exactly like the
    # offline evaluation (Ray Data) did for the same test question
    rows = [json.loads(line) for part in manifest_files(str(out / "eval" / "trained" /
                                                         "predictions"))
            for line in Path(part).read_text().splitlines()]
    offline = next(r for r in rows if Path(r["image"]).name == Path(served["image"]).name)
    assert served["answer"] == offline["prediction"]
    assert served["experts"] == offline["experts"]
    assert served["routing_reply"] == offline["routing_reply"]
    assert f"question      : {served['question']}" in printed


def test_mlflow_holds_the_runs_and_everything_was_stopped(demo):
    out, result, _, leftovers = demo
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mova-demo")
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"demo-pretrain", "demo-sft", "labels", "eval-untrained", "eval-trained"} <= names
    sft = next(r for r in runs if r.info.run_name == "demo-sft")
    losses = client.get_metric_history(sft.info.run_id, "loss")
    assert losses and losses[-1].value < losses[0].value
    assert any("Serve app" in s for s in result["stopped"])
    assert any(s.endswith("0 left)") for s in result["stopped"]), result["stopped"]
    assert not leftovers, leftovers


def test_ctrl_c_stops_everything_the_demo_started(tmp_path):
    """Ctrl-C at a terminal sends SIGINT to the whole foreground process group: the demo must
    stop its Ray (and say so), exit 130 and leave no process of its Ray behind."""
    exe = Path(sys.executable).parent / "mova"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.time() - 1
    proc = subprocess.Popen([str(exe), "demo", "--quick", "--no-serve", "--out",
                             str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    printed = []
    try:
        for line in proc.stdout:
            printed.append(line)
            if "local Ray started" in line:
                break
        time.sleep(5)  # inside the feature job, Ray Data actors up
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(printed) + rest
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted" in output and "Stopped:" in output, output[-3000:]
    assert "0 left)" in output, output[-3000:]
    assert not _demo_ray_processes(started)
