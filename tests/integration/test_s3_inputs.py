"""Checkpoints and recipe inputs on S3 (a moto server on loopback, no Ray): publishing is
atomic, reading downloads once per node, and bad inputs fail before any work, naming the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mova.checkpoint import CheckpointError
from mova.factory import build_tiny_mova, from_pretrained
from pipelines.common import storage
from pipelines.common.checkpoint_store import local_checkpoint, publish

pytestmark = pytest.mark.integration

S3_BUCKET = "mova-test"  # created by the s3_endpoint fixture
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("s3ckpt") / "model"
    build_tiny_mova(seed=0, experts=["sam"]).save_pretrained(path)
    return path


@pytest.fixture
def prefix(s3_endpoint) -> str:
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:8]}"


def test_publish_download_once_and_load(saved, prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("MOVA_CACHE", str(tmp_path / "cache"))
    uri = publish(saved, f"{prefix}/model")
    local = Path(local_checkpoint(uri))
    assert local.is_relative_to(tmp_path / "cache")
    stamp = (local / "files.json").stat().st_mtime_ns
    assert local_checkpoint(uri) == str(local)  # the second read reuses the download
    assert (local / "files.json").stat().st_mtime_ns == stamp
    model = from_pretrained(local)
    assert model.expert_names == ["sam"]


FETCH = """
import json, sys
from pipelines.common.checkpoint_store import FETCHED, local_checkpoint
path = local_checkpoint(sys.argv[1], parts=sys.argv[2].split(","))
print(json.dumps({"path": path, **FETCHED}))
"""


def test_a_node_fetches_each_file_once_and_a_replica_only_its_part(saved, prefix, tmp_path):
    """Four processes of one node ask for the same checkpoint at once: one downloads, the
    others wait and reuse it. An expert replica's process fetches the configs and its
    expert's weights, nothing else."""
    uri = publish(saved, f"{prefix}/model")
    env = {**os.environ, "MOVA_CACHE": str(tmp_path / "node"), "PYTHONPATH": str(REPO)}

    def start(parts: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", FETCH, uri, parts], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    expert = start("expert:sam")
    out = json.loads(expert.communicate(timeout=120)[0])
    local = Path(out["path"])
    listing = json.loads((saved / "files.json").read_text())["files"]
    weights = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.safetensors"))
    assert weights == sorted(n for n in listing if n.endswith(".safetensors")
                             and n.startswith("experts/sam/")), weights
    procs = [start("all") for _ in range(4)]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    missing = len(listing) - out["files"]
    assert sorted(r["files"] for r in results) == [0, 0, 0, missing], results
    assert {r["path"] for r in results} == {out["path"]}
    assert from_pretrained(local).expert_names == ["sam"]


def test_incomplete_checkpoints_on_s3_are_refused_naming_what_is_missing(
        saved, prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("MOVA_CACHE", str(tmp_path / "cache"))
    uri = publish(saved, f"{prefix}/model")
    storage.delete(storage.join(uri, "adapter.safetensors"))
    with pytest.raises(CheckpointError, match="adapter.safetensors.*not there"):
        local_checkpoint(uri)
    storage.delete(storage.join(uri, "files.json"))  # a publish that never finished
    with pytest.raises(CheckpointError, match=r"has no files\.json.*incomplete"):
        local_checkpoint(uri)
    kept = [p for p in (tmp_path / "cache" / "checkpoints").rglob("*") if p.is_file()]
    assert not [p for p in kept if p.suffix == ".part" or p.name == "adapter.safetensors"], \
        "nothing half-written or unverified is kept"
    with pytest.raises(CheckpointError, match="has no files.json"):
        local_checkpoint(f"{prefix}/nothing-here")


def test_recipes_refuse_bad_s3_inputs_before_any_work(saved, prefix, tmp_path, monkeypatch):
    from pipelines.evaluate.job import check_inputs as eval_inputs
    from pipelines.evaluate.recipe import EvalRecipe
    from pipelines.labels.job import check_inputs as labels_inputs
    from pipelines.labels.recipe import LabelsRecipe
    from pipelines.train.job import check_inputs as train_inputs
    from pipelines.train.recipe import TrainRecipe

    monkeypatch.setenv("MOVA_CACHE", str(tmp_path / "cache"))
    good = publish(saved, f"{prefix}/model")
    missing = f"{prefix}/missing"
    train = TrainRecipe(init_from=missing, manifest=f"{prefix}/m.jsonl", features="compute",
                        output=f"{prefix}/out", name="x", storage_path=f"{prefix}/runs")
    with pytest.raises(ValueError, match=f"init_from='{missing}' is not a usable"):
        train_inputs(train)
    train.init_from = good
    with pytest.raises(ValueError, match=f"manifest '{prefix}/m.jsonl' not found"):
        train_inputs(train)
    # another architecture: a plain transformers model where a MoVA checkpoint should be
    from transformers import BertConfig, BertModel

    other = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8, vocab_size=30)).save_pretrained(other)
    storage.upload_folder(str(other), f"{prefix}/bert")
    train.init_from = f"{prefix}/bert"
    with pytest.raises(ValueError, match="not a usable MoVA checkpoint"):
        train_inputs(train)
    with pytest.raises(CheckpointError, match=f"{prefix}/missing"):
        eval_inputs(EvalRecipe(checkpoint=missing, output=f"{prefix}/eval"))
    labels = LabelsRecipe(manifest=f"{prefix}/m.jsonl", checkpoint=missing,
                          output=f"{prefix}/labels")
    with pytest.raises(ValueError, match=f"checkpoint '{missing}'"):
        labels_inputs(labels)
    # a finished output is never overwritten
    train.init_from, train.output = good, good
    storage.write_text_atomic(f"{prefix}/m.jsonl", "")
    with pytest.raises(ValueError, match="already holds a model"):
        train_inputs(train)


@pytest.fixture
def strict_s3(tmp_path):
    """A second moto server that checks credentials (any key it does not know is denied)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "moto not up"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_wrong_credentials_are_named_before_any_work(strict_s3, monkeypatch, tmp_path):
    from pipelines.train.job import check_inputs
    from pipelines.train.recipe import TrainRecipe

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", strict_s3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    monkeypatch.setenv("MOVA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(storage.StorageError, match="access denied: check the credentials"):
        storage.read_bytes(f"s3://{S3_BUCKET}/x")
    recipe = TrainRecipe(init_from=f"s3://{S3_BUCKET}/init", manifest=f"s3://{S3_BUCKET}/m",
                         features="compute", output=f"s3://{S3_BUCKET}/out", name="x",
                         storage_path=f"s3://{S3_BUCKET}/runs")
    with pytest.raises(ValueError, match=f"init_from='s3://{S3_BUCKET}/init'.*credentials"):
        check_inputs(recipe)


def test_model_cli_writes_reads_and_publishes_on_s3(saved, prefix, tmp_path, monkeypatch,
                                                    capsys):
    from pipelines.cli import main

    monkeypatch.setenv("MOVA_CACHE", str(tmp_path / "cache"))
    assert main(["model", "init", "--out", f"{prefix}/init"]) in (0, None)
    assert storage.exists(f"{prefix}/init/files.json")
    capsys.readouterr()
    assert main(["model", "info", f"{prefix}/init"]) in (0, None)
    assert '"sam"' in capsys.readouterr().out
    assert main(["model", "publish", str(saved), f"{prefix}/copy"]) in (0, None)
    assert from_pretrained(local_checkpoint(f"{prefix}/copy")).expert_names == ["sam"]
    assert main(["model", "publish", str(tmp_path), f"{prefix}/bad"]) == 1
    assert "files.json" in capsys.readouterr().err
