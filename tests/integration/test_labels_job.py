"""`mova labels` on a real local Ray and MLflow: a tiny set where one expert is clearly useful.

The checkpoint is a tiny MoVA whose ``vary`` branches were trained (mask forcing ``vary``) to
lower the answers' loss, whose ``deplot`` branches were trained to raise it, and whose
``dinov2`` branches were left at their zero initialisation (exactly the base model). The job
must label every sample with ``vary`` alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mova.checkpoint import expert_cache_keys
from mova.conversation import collate, tokenize_conversation
from mova.factory import build_tiny_mova
from mova.images import image_hash, load_image
from pipelines.cli import main
from pipelines.common.feature_cache import FeatureCache
from pipelines.common.manifests.validate import ManifestError, read_rows, validate_manifest
from pipelines.labels.job import run_labels
from pipelines.labels.recipe import LabelsRecipe

pytestmark = pytest.mark.integration

POOL = ["dinov2", "vary", "deplot"]
USEFUL, HARMFUL = "vary", "deplot"
WORDS = ["red", "green", "blue", "yellow"]
DOMAINS = ["charts", "scenes"]
N = 12
QUESTION = "<image>\nWhat colour is the mark?"


def _train_branch(model, inputs: dict, name: str, sign: float, steps: int = 8) -> None:
    """A few Adam steps on one expert's extractor branches, with the mask forcing it; ``sign``
    -1 raises the loss instead (a harmful expert)."""
    params = [p for block in model.adapter.blocks for p in block.extractors[name].parameters()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.Adam(params, lr=3e-3)
    mask = model.mask_from_names([[name]] * len(inputs["input_ids"]))
    model.train()
    for _ in range(steps):
        loss = model(**inputs, expert_mask=mask).loss
        optim.zero_grad()
        (sign * loss).backward()
        optim.step()
    model.eval()
    model.requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, noise_image):
    """Checkpoint, manifest (answers in two domains, one routing-instruction row, one
    text-only row, one unreadable image), and a feature cache holding half of the samples."""
    root = tmp_path_factory.mktemp("labels")
    torch.manual_seed(0)
    model = build_tiny_mova(seed=0, experts=POOL)
    images = [noise_image(i, 52, 40) for i in range(N)]
    answers = [WORDS[i % len(WORDS)] for i in range(N)]
    tokenized = [tokenize_conversation([{"from": "human", "value": QUESTION},
                                        {"from": "gpt", "value": a}],
                                       model.tokenizer, model.template,
                                       model.config.num_image_tokens) for a in answers]
    batch = collate(tokenized, model.tokenizer.pad_token_id)
    gate = model.tokenize_gate_text([[QUESTION]] * N)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "labels": batch["labels"], "pixel_values": model.processor.base(images),
              "gate_input_ids": gate["input_ids"], "gate_attention_mask": gate["attention_mask"],
              "expert_inputs": {n: model.processor.expert(n, images) for n in POOL}}
    _train_branch(model, inputs, USEFUL, 1.0)
    _train_branch(model, inputs, HARMFUL, -1.0)
    checkpoint = root / "model"
    model.save_pretrained(checkpoint)

    data = root / "data"
    (data / "img").mkdir(parents=True)
    rows = []
    for i, (image, answer) in enumerate(zip(images, answers, strict=True)):
        image.save(data / "img" / f"{i}.png")
        rows.append({"id": f"s{i}", "image": f"img/{i}.png", "domain": DOMAINS[i % 2],
                     "experts": [HARMFUL] if i % 3 else None,
                     "conversations": [{"from": "human", "value": QUESTION},
                                       {"from": "gpt", "value": answer}]})
    rows.append({"id": "route0", "image": "img/0.png", "kind": "routing", "experts": ["vary"],
                 "conversations": [{"from": "human", "value": "<image>\nPick experts."},
                                   {"from": "gpt", "value": "B"}]})
    rows.append({"id": "text0", "image": None, "experts": None,
                 "conversations": [{"from": "human", "value": "Say hi."},
                                   {"from": "gpt", "value": "hi"}]})
    (data / "img" / "broken.png").write_bytes(b"\x89PNG not an image")
    rows.append({"id": "broken", "image": "img/broken.png", "domain": "charts",
                 "conversations": [{"from": "human", "value": QUESTION},
                                   {"from": "gpt", "value": "red"}]})
    manifest = data / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # The feature cache holds every expert's features of the even samples only: odd samples
    # exercise the fallback that runs the experts.
    cache = FeatureCache(str(root / "cache"))
    keys = expert_cache_keys(checkpoint)
    even = list(range(0, N, 2))
    for name in POOL:
        feats = model.expert_features(name, model.processor.expert(name, [images[i]
                                                                          for i in even]))
        cache.write_shard(name, keys[name], [image_hash(load_image(images[i])) for i in even],
                          feats, "float16")
    return {"root": root, "checkpoint": checkpoint, "manifest": manifest,
            "cache": root / "cache", "rows": rows}


def test_labels_job_finds_the_useful_expert(ray_session, tiny_set, tmp_path, capsys,
                                            no_driver_rows):
    import mlflow
    from mlflow.tracking import MlflowClient

    out_dir = tmp_path / "out"
    output = out_dir / "train.labels"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary_json = tmp_path / "summary.json"
    code = main(["labels", "--config", str(Path(__file__).parents[2] / "jobs" / "labels.yaml"),
                 "--json", str(summary_json),
                 f"manifest={tiny_set['manifest']}", f"checkpoint={tiny_set['checkpoint']}",
                 f"cache={tiny_set['cache']}", f"output={output}", "batch_size=4",
                 "cpus_per_worker=1", "skip_bad_rows=true", f"mlflow.tracking_uri={tracking}"])
    assert code == 0
    no_driver_rows.undo()  # the test reads the outputs itself
    printed = capsys.readouterr().out
    summary = json.loads(summary_json.read_text())

    # Labels: the useful expert alone, for every answer sample.
    out_rows = {r["id"]: r for _, r in read_rows(str(output))}
    assert set(out_rows) == {f"s{i}" for i in range(N)} | {"route0", "text0"}
    for i in range(N):
        assert out_rows[f"s{i}"]["experts"] == [USEFUL], out_rows[f"s{i}"]
        assert out_rows[f"s{i}"]["domain"] == DOMAINS[i % 2]
    assert out_rows["route0"]["experts"] == ["vary"] and out_rows["route0"]["kind"] == "routing"
    assert out_rows["text0"]["experts"] is None
    # The new manifest lives in another folder: its image paths still resolve.
    report = validate_manifest(str(output), pool=POOL, check_images=True)
    assert report.ok, report.format()

    # Per-sample losses: the useful expert below the base, the harmful one above, the untrained
    # one equal; cached and computed features both used.
    assert (output / "_SUCCESS").is_file() and (Path(summary["losses"]) / "_SUCCESS").is_file()
    losses = pq.read_table(summary["losses"]).to_pylist()
    assert len(losses) == N
    for row in losses:
        assert row["loss_vary"] < row["base_loss"] < row["loss_deplot"]
        assert row["loss_dinov2"] == pytest.approx(row["base_loss"], abs=1e-6)
    assert {r["features"] for r in losses} == {"cache", "compute"}

    # Summary, bad-row report and printed table.
    assert summary["scored"] == N and summary["labelled"] == N and summary["skipped"] == 1
    assert summary["passed_through"] == 2
    assert summary["activation"] == {"dinov2": 0.0, "vary": 1.0, "deplot": 0.0}
    assert summary["activation_by_domain"]["charts"]["vary"] == 1.0
    assert summary["domain_counts"] == {"charts": N // 2, "scenes": N // 2}
    bad = [json.loads(line) for part in Path(summary["report"]).glob("*.jsonl")
           for line in part.read_text().splitlines()]
    assert [b["id"] for b in bad] == ["broken"]
    assert "activation rate" in printed and "charts" in printed and str(output) in printed
    assert Path(summary["plot"]).read_bytes().startswith(b"\x89PNG")

    # MLflow: params, activation metrics and the table/plot artifacts.
    client = MlflowClient(tracking)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["activation/vary"] == 1.0
    assert run.data.metrics["activation/deplot"] == 0.0
    assert run.data.metrics["activation/scenes/vary"] == 1.0
    assert run.data.params["max_experts"] == "3"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "labels")}
    assert {"labels/activation.png", "labels/activation.txt", "labels/losses"} <= artifacts
    table = Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="labels/activation.txt", tracking_uri=tracking,
        dst_path=str(tmp_path / "artifacts"))).read_text()
    assert "vary" in table and "scenes" in table


def test_errors_name_their_input(ray_session, tiny_set, tmp_path):
    base = {"manifest": str(tiny_set["manifest"]), "checkpoint": str(tiny_set["checkpoint"]),
            "output": str(tmp_path / "out")}
    with pytest.raises(ValueError, match="checkpoint .*nope.* not a usable MoVA checkpoint"):
        run_labels(LabelsRecipe(**{**base, "checkpoint": str(tmp_path / "nope")}))
    with pytest.raises(FileNotFoundError, match="manifest not found.*missing.jsonl"):
        run_labels(LabelsRecipe(**{**base, "manifest": str(tmp_path / "missing.jsonl")}))
    with pytest.raises(ValueError, match="output must differ"):
        run_labels(LabelsRecipe(**{**base, "output": base["manifest"]}))
    with pytest.raises(ValueError, match="only=\\['sam'\\]"):
        run_labels(LabelsRecipe(**base, only=["sam"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(tiny_set["manifest"].read_text() + "{not json\n")
    with pytest.raises(ManifestError, match=r"(?s)1 error.*line \d+: json: not valid JSON"):
        run_labels(LabelsRecipe(**{**base, "manifest": str(bad)}))
    assert not (tmp_path / "out").exists()
