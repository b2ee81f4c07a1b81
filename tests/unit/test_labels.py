"""Loss-driven routing labels: the per-sample loss, the single-expert losses and the label rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mova.conversation import collate, tokenize_conversation
from mova.factory import build_tiny_mova
from mova.labels import (
    activation_rates,
    label_rows,
    per_sample_loss,
    select_experts,
    single_expert_losses,
)

POOL = ["dinov2", "vary", "deplot"]
USEFUL = "vary"


def _inputs(noise_image, model, n: int = 4) -> dict:
    questions = [f"<image>\nWhat is shown in picture {i}?" for i in range(n)]
    answers = ["a red square", "two blue dots", "a chart", "nothing at all"][:n]
    samples = [tokenize_conversation([{"from": "human", "value": q}, {"from": "gpt", "value": a}],
                                     model.tokenizer, model.template,
                                     model.config.num_image_tokens)
               for q, a in zip(questions, answers, strict=True)]
    batch = collate(samples, model.tokenizer.pad_token_id)
    gate = model.tokenize_gate_text([[q] for q in questions])
    images = [noise_image(i, 52, 40) for i in range(n)]
    return {
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
        "labels": batch["labels"], "pixel_values": model.processor.base(images),
        "gate_input_ids": gate["input_ids"], "gate_attention_mask": gate["attention_mask"],
        "expert_inputs": {n: model.processor.expert(n, images) for n in model.expert_names},
    }


def _forward_loss(model, inputs: dict, i: int, experts: list[str]) -> float:
    """The model's own training loss for sample ``i`` alone under the mask ``experts``."""
    one = {k: v[i:i + 1] for k, v in inputs.items() if k != "expert_inputs"}
    one["expert_inputs"] = {k: v[i:i + 1] for k, v in inputs["expert_inputs"].items()}
    # Drop the right padding of the batch so the single sample is unpadded.
    width = int(one["attention_mask"].sum())
    for key in ("input_ids", "attention_mask", "labels"):
        one[key] = one[key][:, :width]
    with torch.no_grad():
        out = model(**one, expert_mask=model.mask_from_names([experts]))
    return float(out.loss)


@pytest.fixture(scope="module")
def useful_model(noise_image):
    """A tiny model in which one expert (``vary``) clearly lowers the loss of every sample.

    A few Adam steps train only ``vary``'s knowledge-extractor branches with the mask forcing
    it; other experts' branches keep their zero-initialised output layers, so using them alone
    is exactly the base model.
    """
    torch.manual_seed(0)
    model = build_tiny_mova(seed=0, experts=POOL)
    inputs = _inputs(noise_image, model)
    params = [p for block in model.adapter.blocks
              for p in block.extractors[USEFUL].parameters()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.Adam(params, lr=3e-3)
    mask = model.mask_from_names([[USEFUL]] * 4)
    model.train()
    for _ in range(8):
        out = model(**{k: v for k, v in inputs.items()}, expert_mask=mask)
        optim.zero_grad()
        out.loss.backward()
        optim.step()
    model.eval()
    model.requires_grad_(False)
    return model, inputs


def test_per_sample_loss_matches_the_llm_loss_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[1, 4:] = -100  # padding
    labels[2] = -100  # nothing supervised
    losses = per_sample_loss(logits, labels)
    for i in range(2):
        targets = labels[i, 1:]
        keep = targets != -100
        expected = torch.nn.functional.cross_entropy(logits[i, :-1][keep], targets[keep])
        torch.testing.assert_close(losses[i], expected)
    assert math.isnan(float(losses[2]))
    with pytest.raises(ValueError, match="logits must be"):
        per_sample_loss(logits, labels[:, :4])


def test_at_initialisation_no_expert_changes_the_loss(noise_image):
    """Zero inits make every expert branch exactly zero: nothing beats the base, nothing is
    labelled (the rule is strict)."""
    model = build_tiny_mova(seed=0, experts=POOL)
    inputs = _inputs(noise_image, model, 2)
    losses = single_expert_losses(model, **inputs)
    assert losses.shape == (2, 1 + len(POOL))
    for j in range(1, 1 + len(POOL)):
        torch.testing.assert_close(losses[:, j], losses[:, 0], rtol=0, atol=0)
    assert label_rows(losses, POOL) == [[], []]


def test_one_clearly_useful_expert_is_labelled_and_the_others_are_not(useful_model):
    model, inputs = useful_model
    losses = single_expert_losses(model, **inputs)
    base, by_expert = losses[:, 0], dict(zip(POOL, losses[:, 1:].T, strict=True))
    assert bool((by_expert[USEFUL] < base - 0.05).all()), losses
    for name in POOL:
        if name != USEFUL:
            torch.testing.assert_close(by_expert[name], base, rtol=0, atol=1e-6)
    assert label_rows(losses, POOL) == [[USEFUL]] * 4
    # A margin larger than the gain turns the label off.
    gain = float((base - by_expert[USEFUL]).max())
    assert label_rows(losses, POOL, margin=gain + 0.01) == [[]] * 4


def test_losses_equal_the_model_forward_loss_of_each_sample(useful_model):
    model, inputs = useful_model
    losses = single_expert_losses(model, **inputs)
    for i in range(4):
        assert float(losses[i, 0]) == pytest.approx(_forward_loss(model, inputs, i, []),
                                                    abs=1e-5)
        assert float(losses[i, 2]) == pytest.approx(_forward_loss(model, inputs, i, [USEFUL]),
                                                    abs=1e-5)


def test_cached_features_give_the_same_losses_as_computed_ones(useful_model):
    model, inputs = useful_model
    computed = single_expert_losses(model, **inputs)
    features = {n: model.expert_features(n, x) for n, x in inputs["expert_inputs"].items()}
    cached_inputs = {k: v for k, v in inputs.items() if k != "expert_inputs"}
    cached = single_expert_losses(model, **cached_inputs, expert_features=features)
    torch.testing.assert_close(cached, computed)
    subset = single_expert_losses(model, **cached_inputs, expert_features=features,
                                  experts=[USEFUL])
    torch.testing.assert_close(subset, computed[:, [0, 2]])
    with pytest.raises(ValueError, match="neither its features nor its inputs"):
        single_expert_losses(model, **cached_inputs, expert_features={USEFUL: features[USEFUL]})
    with pytest.raises(ValueError, match="unknown expert"):
        single_expert_losses(model, **inputs, experts=["sam"])


def test_select_experts_rule():
    losses = {"a": 1.0, "b": 0.5, "c": 0.7, "d": 0.9, "e": 2.0, "f": 0.95}
    assert select_experts(0.97, losses) == ["b", "c", "d"]
    assert select_experts(0.97, losses, max_experts=5) == ["b", "c", "d", "f"]
    assert select_experts(0.97, losses, max_experts=1) == ["b"]
    assert select_experts(0.97, losses, margin=0.1) == ["b", "c"]
    assert select_experts(0.4, losses) == []
    assert select_experts(1.0, {"a": 1.0}) == []  # equal is not better
    assert select_experts(1.0, {"x": 0.5, "y": 0.5}) == ["x", "y"]  # ties: mapping order
    assert select_experts(math.nan, {"a": 0.1}) == []
    assert select_experts(1.0, {"a": math.nan, "b": 0.2}) == ["b"]
    with pytest.raises(ValueError, match="margin"):
        select_experts(1.0, losses, margin=-1)
    with pytest.raises(ValueError, match="max_experts"):
        select_experts(1.0, losses, max_experts=-1)
    with pytest.raises(ValueError, match="losses must be"):
        label_rows([[1.0, 0.5]], ["a", "b"])


def test_activation_rates():
    rates = activation_rates([["a", "b"], ["a"], [], ["a", "a"]], ["a", "b", "c"])
    assert rates == {"a": 0.75, "b": 0.25, "c": 0.0}
    assert activation_rates([], ["a"]) == {"a": 0.0}


def _object_array(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def test_loss_worker_reads_the_cache_falls_back_to_the_experts_and_reports_bad_images(
        useful_model, tmp_path, noise_image):
    """The Ray Data actor class, called in-process: cached features (whole or partial) and
    computed ones give the same losses; an unreadable image is an error row, not a crash."""
    from mova.checkpoint import expert_cache_keys
    from mova.images import image_hash
    from pipelines.common.feature_cache import FeatureCache
    from pipelines.common.manifests.schema import Sample
    from pipelines.labels.workers import LabelSpec, LossWorker

    model, _ = useful_model
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    (tmp_path / "img").mkdir()
    images = [noise_image(i, 52, 40) for i in range(3)]
    for i, image in enumerate(images):
        image.save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    manifest = tmp_path / "train.jsonl"
    cache = FeatureCache(str(tmp_path / "cache"))
    keys = expert_cache_keys(checkpoint)
    for name in POOL:  # image 0: every expert cached; image 1: only vary; image 2: nothing
        cached = [0, 1] if name == USEFUL else [0]
        feats = model.expert_features(name, model.processor.expert(
            name, [images[i] for i in cached]))
        cache.write_shard(name, keys[name], [image_hash(images[i]) for i in cached], feats)
    conversation = [{"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": "a red square"}]
    rows = [Sample(id=i, image=f"img/{name}.png", conversations=conversation)
            for i, name in zip(["a", "b", "c", "bad"], ["0", "1", "2", "broken"], strict=True)]
    batch = {"file": _object_array([str(manifest)] * 4), "line": np.arange(1, 5),
             "sample": _object_array([json.dumps(r.to_dict()) for r in rows])}

    def worker(cache, experts=tuple(POOL), precision="auto"):
        return LossWorker(LabelSpec(checkpoint=str(checkpoint), cache=cache,
                                    experts=tuple(experts), max_experts=3, margin=0.0,
                                    max_length=None, precision=precision,
                                    output=str(tmp_path / "out"), input_files=(str(manifest),)))

    def losses(out):
        return [json.loads(x) for x in out["loss"]]

    with_cache = worker(str(tmp_path / "cache"))(batch)
    without = worker(None)(batch)
    assert [json.loads(x)["id"] for x in with_cache["sample"]] == ["a", "b", "c", "bad"]
    assert [x and x["source"] for x in losses(with_cache)] == ["cache", "compute", "compute",
                                                                None]
    assert [x and x["source"] for x in losses(without)] == ["compute"] * 3 + [None]
    assert with_cache["error"][:3] == ["", "", ""] and with_cache["error"][3]
    cached_losses, computed_losses = (np.array([x["losses"] for x in losses(r)[:3]])
                                      for r in (with_cache, without))
    assert cached_losses.shape == (3, 1 + len(POOL))
    np.testing.assert_allclose(cached_losses, computed_losses, atol=2e-3)
    assert (cached_losses[:, 2] < cached_losses[:, 0]).all()  # vary beats the base
    fp32 = losses(worker(None, [USEFUL, "dinov2"], "fp32")(batch))
    assert fp32[0]["losses"][1] == pytest.approx(computed_losses[0, 2], abs=1e-5)


@pytest.mark.parametrize("override, message", [
    ("margin=-0.1", "margin=-0.1 must be a number >= 0"),
    ("max_experts=0", "max_experts=0 must be >= 1"),
    ("precision=fp16", "precision='fp16'"),
    ("workers=0", "workers must be >= 1"),
    ("only=[vary,vary]", "names an expert twice"),
    ("checkpoint=", "checkpoint must be set"),
    ("marginn=1", "unknown config key.*marginn"),
])
def test_labels_recipe_errors(override, message):
    from pathlib import Path

    from pipelines.common.recipe import load_recipe
    from pipelines.labels.recipe import LabelsRecipe

    recipe = Path(__file__).resolve().parents[2] / "jobs" / "labels.yaml"
    assert load_recipe(LabelsRecipe, recipe).max_experts == 3
    with pytest.raises(ValueError, match=message):
        load_recipe(LabelsRecipe, recipe, [override])
