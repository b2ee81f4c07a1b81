"""Training on a real local Ray: Ray Train + DeepSpeed + MLflow, stages, resume, faults."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mova.factory import build_tiny_mova, from_pretrained
from pipelines.common.batches import PrepareSpec, collate, prepare_rows
from pipelines.common.manifests.validate import load_manifest
from pipelines.features.job import run_features
from pipelines.features.recipe import FeaturesRecipe
from pipelines.train.job import run_train
from pipelines.train.recipe import TrainRecipe

pytestmark = pytest.mark.integration

DOMAINS = ("charts",)  # routes deplot and pix2struct only
ROUTED = ("deplot", "pix2struct")


@pytest.fixture(scope="module")
def workspace(ray_session, tmp_path_factory):
    """Synthetic data, an initial tiny model and its feature cache, shared by the tests."""
    from pipelines.data.synth import SynthRecipe, generate

    root = tmp_path_factory.mktemp("train")
    data = generate(SynthRecipe(out=str(root / "data"), per_domain=24, test_per_domain=2,
                                routing_samples=8, domains=DOMAINS, image_size=64))
    init = root / "init"
    build_tiny_mova(seed=0).save_pretrained(init)
    run_features(FeaturesRecipe(manifest=str(data.train_manifest), checkpoint=str(init),
                                cache=str(root / "cache"), batch_size=16, dtype="float32",
                                only=list(ROUTED)).validate())  # no pool for the others
    return {"root": root, "manifest": data.train_manifest, "init": init,
            "cache": root / "cache"}


def _recipe(ws, name: str, **kw) -> TrainRecipe:
    base = {"stage": "pretrain", "init_from": str(ws["init"]), "manifest": str(ws["manifest"]),
            "cache": str(ws["cache"]), "output": str(ws["root"] / name / "model"),
            "name": name, "storage_path": str(ws["root"] / "ray_results"),
            "num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 4, "max_steps": 6,
            "checkpoint_every": 3}
    base.update(kw)
    recipe = TrainRecipe(**{k: v for k, v in base.items() if "." not in k})
    for key, value in base.items():
        if "." in key:
            section, field = key.split(".")
            setattr(getattr(recipe, section), field, value)
    return recipe.validate()


def test_cached_and_computed_features_give_the_same_loss(workspace):
    manifest = str(workspace["manifest"])
    samples = load_manifest(manifest, check_images=False)
    assert len(samples) == 24 * len(DOMAINS) + 8
    rows = [(manifest, s) for s in samples if s.kind == "answer"][:6]

    def prepared(features, cache=None):
        spec = PrepareSpec(checkpoint=str(workspace["init"]), cache=cache, features=features,
                           max_length=None)
        return prepare_rows(rows, spec)

    rows_a = prepared("cached", str(workspace["cache"]))
    rows_b = prepared("compute")
    assert [r["id"] for r in rows_a] == [r["id"] for r in rows_b]
    model = from_pretrained(workspace["init"])
    names, pad = model.expert_names, model.tokenizer.pad_token_id

    def batch(rows, mode):
        return collate({k: [r[k] for r in rows] for k in rows[0]}, names, pad, mode)

    a, b = batch(rows_a, "cached"), batch(rows_b, "compute")
    assert a["expert_features"] and b["expert_inputs"] and "expert_inputs" not in a
    with torch.no_grad():
        loss_a = model(**a).loss
        loss_b = model(**b).loss
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pretrained(workspace):
    """One uninterrupted pretraining run: the model the SFT test starts from, and the batches
    the interrupted runs must match batch for batch."""
    result = run_train(_recipe(workspace, "reference", max_steps=9,
                               **{"data.record_batches": True}))
    batches = _batches(workspace, "reference")
    assert result.steps == 9 and len(batches) == 2 * 9  # 2 workers, 9 batches each
    return result, batches


@pytest.fixture(scope="module")
def reference(pretrained):
    return pretrained[1]


def test_pretrain_then_sft_with_lora_and_zero3(workspace, pretrained):
    pre = pretrained[0]
    assert pre.steps == 9
    init, trained = from_pretrained(workspace["init"]), from_pretrained(pre.output)
    for part, should_change in (("llm", False), ("adapter", True), ("text_encoder", True),
                                ("experts", False)):
        a, b = getattr(init, part).state_dict(), getattr(trained, part).state_dict()
        changed = any(not torch.equal(a[k], b[k]) for k in a)
        assert changed == should_change, part
    meta = json.loads((Path(pre.output) / "training.json").read_text())
    assert meta["stage"] == "pretrain" and meta["steps"] == 9
    client = MlflowClient(pre.tracking_uri)
    run = client.get_run(pre.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["stage"] == "pretrain" and run.data.params["deepspeed.zero_stage"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(
        range(1, 10))
    for key in ("lr", "grad_norm", "tokens_per_s", "routing/experts_per_sample"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "recipe.yaml"} <= artifacts

    # bf16 on CPU with experts computed each step: they follow the engine's dtype and device,
    # and the export keeps the training precision (export_dtype=auto).
    sft = run_train(_recipe(workspace, "sft", stage="sft", init_from=pre.output,
                            features="compute", max_steps=4, checkpoint_every=4,
                            precision="bf16",
                            **{"deepspeed.zero_stage": 3, "lora.enabled": True,
                               "lora.target_modules": ["q_proj", "v_proj"]}))
    assert sft.steps == 4 and sft.final_loss is not None and math.isfinite(sft.final_loss)
    tuned = from_pretrained(sft.output)  # LoRA merged: a plain transformers Llama again
    assert type(tuned.llm).__name__ == "LlamaForCausalLM"
    assert tuned.config.dtype == "bfloat16"
    assert {p.dtype for p in tuned.parameters()} == {torch.bfloat16}
    a, b = trained.llm.state_dict(), tuned.llm.state_dict()
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k].to(torch.bfloat16), b[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    assert all(torch.equal(trained.experts.state_dict()[k].to(v.dtype), v)
               for k, v in tuned.experts.state_dict().items())
    with pytest.raises(ValueError, match="already holds a model"):
        run_train(_recipe(workspace, "sft", stage="sft", init_from=pre.output))


def _batches(workspace, name: str) -> dict[tuple[int, int, int], list[str]]:
    """(rank, epoch, batch) -> sample ids, from a run's batch records."""
    out = {}
    for path in (workspace["root"] / "ray_results" / name / "batches").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out[(r["rank"], r["epoch"], r["batch"])] = r["ids"]
    return out


def test_the_order_is_a_seeded_shuffle_per_epoch(workspace, reference):
    per_epoch = {}
    for (rank, epoch, _), ids in sorted(reference.items()):
        per_epoch.setdefault((rank, epoch), []).extend(ids)
    assert per_epoch[(0, 0)] != per_epoch[(0, 1)], "each epoch has its own order"
    assert not set(per_epoch[(0, 0)]) & set(per_epoch[(1, 0)]), "ranks share no sample"
    manifest_order = [s.id for s in load_manifest(str(workspace["manifest"]),
                                                  check_images=False)]
    assert per_epoch[(0, 0)] != manifest_order[:len(per_epoch[(0, 0)])], "shuffled"
    # that the same seed repeats the order is shown below: the runs resumed after a fault
    # recompute it and must meet the reference batch for batch


def test_a_killed_worker_restarts_and_a_failed_run_resumes(workspace, ray_session, reference,
                                                           no_driver_rows):
    """One run (max_failures=1): worker 1 dies at step 5 (Ray Train restarts the run from
    the checkpoint of step 3) and again at step 8 (failures exhausted: the run fails, no model
    is written). Re-running the same command resumes the same MLflow run from step 6. Every
    batch equals the uninterrupted run's."""
    recipe = _recipe(workspace, "faulty", max_steps=9, max_failures=1,
                     **{"data.record_batches": True, "data.inject_faults": ["1:5", "1:8"]})
    with pytest.raises(RuntimeError, match="training failed"):
        run_train(recipe)
    assert not Path(recipe.output).exists()
    assert sorted((workspace["root"] / "ray_results" / "faulty").glob("checkpoint_*"))
    first_run = MlflowClient(f"sqlite:///{workspace['root'] / 'faulty' / 'mlflow.db'}")
    result = run_train(recipe)
    no_driver_rows.undo()  # the drivers only scanned; the workers read their own rows
    assert result.steps == 9
    runs = first_run.search_runs([first_run.get_experiment_by_name("mova").experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id], "resumed the same run"
    client = MlflowClient(result.tracking_uri)
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert steps[0] == 1 and max(steps) == 9
    resumed = client.get_metric_history(result.mlflow_run_id, "resumed_from_step")
    assert sorted(m.value for m in resumed) == [3.0, 6.0], "restarted at 3, resumed at 6"
    assert _batches(workspace, "faulty") == reference, "exactly the uninterrupted run's batches"


def test_bad_inputs_fail_before_ray_work(workspace, tmp_path):
    with pytest.raises(ValueError, match="init_from=.*not a usable MoVA checkpoint"):
        run_train(_recipe(workspace, "bad1", init_from=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="manifest .* not found"):
        run_train(_recipe(workspace, "bad2", manifest=str(tmp_path / "none.jsonl")))
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(ValueError, match="storage_path .* is not writable"):
        run_train(_recipe(workspace, "bad3", storage_path=str(blocked / "sub")))
