"""The MoVA model's separable steps, training forward, routing and batched generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mova.conversation import collate, tokenize_conversation
from mova.factory import build_tiny_mova
from mova.routing import build_routing_prompt, format_routing_answer
from mova.tokenizers import IMAGE_TOKEN


@pytest.fixture(scope="module")
def model():
    m = build_tiny_mova(seed=0)
    # Randomise the zero-initialised adapter layers so that experts really change the output.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.adapter.named_parameters():
            if p.dim() >= 1 and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def _batch(model, images, questions, answers, experts):
    samples = [
        tokenize_conversation([{"from": "human", "value": q}, {"from": "gpt", "value": a}],
                              model.tokenizer, model.template, model.config.num_image_tokens)
        for q, a in zip(questions, answers, strict=True)
    ]
    batch = collate(samples, model.tokenizer.pad_token_id)
    gate = model.tokenize_gate_text([[q] for q in questions])
    return {
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
        "labels": batch["labels"], "pixel_values": model.processor.base(images),
        "gate_input_ids": gate["input_ids"], "gate_attention_mask": gate["attention_mask"],
        "expert_mask": model.mask_from_names(experts),
    }


def test_separable_steps_shapes(model, noise_image):
    cfg = model.config
    images = [noise_image(0, 81, 72), noise_image(1, 81, 72)]
    base = model.encode_base(model.processor.base(images))
    grid = cfg.base.grid_size
    assert base.shape == (2, grid * grid, cfg.base.hidden_size)
    text = model.encode_questions([["what is this?"], ["count the dots", "and the lines"]])
    assert text.shape == (2, cfg.text_encoder.hidden_size)
    routing = model.routing_tokens(base, text)
    assert routing.shape == (2, cfg.num_routing_tokens, cfg.llm.hidden_size)
    for name in model.expert_names:
        feats = model.expert_features(name, model.processor.expert(name, images))
        r = model.resolved[name]
        assert feats.shape == (2, r.size.out_grid ** 2, r.channels), name
    mask = model.mask_from_names([["sam"], ["vary", "deplot"]])
    inputs = model.processor.experts_inputs(["sam", "vary", "deplot"], images)
    fused = model.fuse(base, text, model.routed_expert_features(inputs, mask), mask)
    assert fused.image_tokens.shape == (2, cfg.num_image_tokens, cfg.llm.hidden_size)
    assert fused.gate_weights.shape == (2, cfg.adapter.num_blocks, len(model.expert_names))


def test_unrouted_expert_cannot_change_output_routed_one_can(model, noise_image):
    images = [noise_image(2, 81, 72)]
    base = model.encode_base(model.processor.base(images))
    text = model.encode_questions([["where is the cat?"]])
    mask = model.mask_from_names([["dinov2", "sam"]])
    inputs = model.processor.experts_inputs(["dinov2", "sam"], images)
    feats = model.routed_expert_features(inputs, mask)
    ref = model.fuse(base, text, feats, mask).image_tokens
    noisy_unrouted = dict(feats, vary=torch.randn(1, 16, model.resolved["vary"].channels))
    assert torch.equal(model.fuse(base, text, noisy_unrouted, mask).image_tokens, ref)
    noisy_routed = dict(feats, sam=torch.randn_like(feats["sam"]))
    assert not torch.allclose(model.fuse(base, text, noisy_routed, mask).image_tokens, ref)


def test_routed_features_only_computed_for_routed_rows(model, noise_image):
    images = [noise_image(3, 81, 72), noise_image(4, 81, 72)]
    mask = model.mask_from_names([["codetr"], []])
    inputs = model.processor.experts_inputs(["codetr"], images)
    feats = model.routed_expert_features(inputs, mask)
    assert set(feats) == {"codetr"}
    assert torch.count_nonzero(feats["codetr"][1]) == 0
    direct = model.expert_features("codetr", inputs["codetr"][:1])
    torch.testing.assert_close(feats["codetr"][:1], direct)


def test_training_forward_cached_equals_computed_and_grads(model, noise_image):
    images = [noise_image(5, 81, 72), noise_image(6, 81, 72)]
    questions = ["How many squares?", "What does the chart show?"]
    experts = [["codetr", "dinov2"], ["deplot"]]
    batch = _batch(model, images, questions, ["3", "sales"], experts)
    inputs = model.processor.experts_inputs(["codetr", "dinov2", "deplot"], images)
    cached = {n: model.expert_features(n, x) for n, x in inputs.items()}
    out_cached = model(**batch, expert_features=cached)
    out_computed = model(**batch, expert_inputs=inputs)
    torch.testing.assert_close(out_cached.loss, out_computed.loss, rtol=0, atol=0)
    model.train()
    try:
        assert not any(e.training for e in model.experts.values())
        out = model(**batch, expert_features=cached)
        assert torch.isfinite(out.loss)
        out.loss.backward()
    finally:
        model.eval()
    assert model.adapter.blocks[0].gate.fc1.weight.grad is not None
    assert any(p.grad is not None for p in model.base_encoder.parameters())
    assert any(p.grad is not None for p in model.text_encoder.parameters())
    assert all(p.grad is None for p in model.experts.parameters())
    assert all(not p.requires_grad for p in model.experts.parameters())
    model.zero_grad(set_to_none=True)


def test_labels_cover_only_the_answer(model, noise_image):
    batch = _batch(model, [noise_image(7, 81, 72)], ["What colour?"], ["red"], [[]])
    kept = batch["labels"][batch["labels"] != -100].tolist()
    assert model.tokenizer.decode(kept).startswith("red")


def test_forward_errors_name_the_missing_expert(model, noise_image):
    batch = _batch(model, [noise_image(8, 81, 72)], ["q?"], ["a"], [["sam"]])
    with pytest.raises(ValueError, match="sam"):
        model(**batch)
    with pytest.raises(ValueError, match="unknown expert 'nope'"):
        model.mask_from_names([["nope"]])


def test_batched_generate_with_mixed_routing_equals_per_sample(model, noise_image):
    images = [noise_image(9, 81, 72), noise_image(10, 81, 72), noise_image(11, 81, 72)]
    questions = ["What is shown?", "Read the title.", "How many dots?"]
    experts = [["dinov2"], ["vary", "pix2struct", "deplot"], []]
    batched = model.generate(images, questions, experts=experts, max_new_tokens=6)
    for i in range(3):
        single = model.generate([images[i]], [questions[i]], experts=[experts[i]],
                                max_new_tokens=6)[0]
        assert single.answer == batched[i].answer
        assert single.experts == batched[i].experts
        np.testing.assert_allclose(single.gate_weights, batched[i].gate_weights, atol=1e-6)
    gates = np.array(batched[1].gate_weights)
    np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-6)
    assert (np.count_nonzero(gates, axis=-1) <= model.config.adapter.top_k).all()
    assert np.array(batched[2].gate_weights).sum() == 0


def test_sampling_is_seeded(model, noise_image):
    kwargs = {"experts": [["sam"]], "max_new_tokens": 8, "do_sample": True, "temperature": 1.5}
    a = model.generate([noise_image(12, 81, 72)], ["Describe it."], seed=7, **kwargs)[0].answer
    b = model.generate([noise_image(12, 81, 72)], ["Describe it."], seed=7, **kwargs)[0].answer
    assert a == b


def test_route_parses_what_the_llm_says(noise_image):
    """Teach the tiny LLM one routing reply, then check route() turns it into the mask."""
    model = build_tiny_mova(seed=3)
    question = "What is the value of the tallest bar?"
    target = format_routing_answer([3, 4])  # "D, E" -> pix2struct, deplot
    images = [noise_image(13, 81, 72)]
    descriptions = model.routing_descriptions()
    prompt = build_routing_prompt(question, descriptions, image_token=IMAGE_TOKEN)
    sample = tokenize_conversation(
        [{"from": "human", "value": prompt}, {"from": "gpt", "value": target}],
        model.tokenizer, model.template, model.config.num_routing_tokens)
    ids = torch.tensor([sample["input_ids"]])
    labels = torch.tensor([sample["labels"]])
    optimizer = torch.optim.AdamW(model.llm.parameters(), lr=3e-3)
    with torch.no_grad():
        base = model.encode_base(model.processor.base(images))
        text = model.encode_questions([[question]])
        routing = model.routing_tokens(base, text)
    model.llm.train()
    for _ in range(60):
        loss = model.llm(inputs_embeds=model.embed(ids, routing), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    result = model.route(routing, [question])
    assert result.replies == [target]
    assert result.experts == [["pix2struct", "deplot"]]
    assert result.mask.tolist() == [[False, False, False, True, True, False, False]]
    full = model.generate(images, [question], max_new_tokens=2)[0]
    assert full.experts == ["pix2struct", "deplot"]
    assert full.routing_reply == target


def test_routing_rows_train_on_the_routing_pass(model, noise_image):
    """A routing-instruction row sees the pooled zero-mask adapter output, like route()."""
    images = [noise_image(14, 81, 72), noise_image(15, 81, 72)]
    question = "What is in the picture?"
    prompt = build_routing_prompt(question, model.routing_descriptions(), image_token=IMAGE_TOKEN)
    routing_sample = tokenize_conversation(
        [{"from": "human", "value": prompt}, {"from": "gpt", "value": "A, C"}],
        model.tokenizer, model.template, model.config.num_routing_tokens)
    answer_sample = tokenize_conversation(
        [{"from": "human", "value": question}, {"from": "gpt", "value": "a cat"}],
        model.tokenizer, model.template, model.config.num_image_tokens)
    batch = collate([routing_sample, answer_sample], model.tokenizer.pad_token_id)
    gate = model.tokenize_gate_text([[prompt], [question]])
    inputs = model.processor.experts_inputs(["dinov2", "codetr"], images)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=model.processor.base(images),
                    gate_input_ids=gate["input_ids"], gate_attention_mask=gate["attention_mask"],
                    expert_mask=model.mask_from_names([["dinov2", "codetr"], ["dinov2"]]),
                    expert_inputs=inputs, routing_rows=torch.tensor([True, False]))
        base = model.encode_base(model.processor.base(images[:1]))
        text = model.encode_questions([[prompt]])
        ids = torch.tensor([routing_sample["input_ids"]])
        expected = model.llm(inputs_embeds=model.embed(ids, model.routing_tokens(base, text)))
    n = len(routing_sample["input_ids"])
    torch.testing.assert_close(out.logits[0, :n], expected.logits[0], atol=1e-5, rtol=1e-5)
    assert out.gate_weights[0].sum() == 0  # the routing row routes no expert


def test_sync_experts_change_the_graph_not_the_result(model, noise_image):
    """Branches run for experts another rank routed leave this rank's loss unchanged."""
    images = [noise_image(16, 81, 72), noise_image(17, 81, 72)]
    batch = _batch(model, images, ["q one?", "q two?"], ["a", "b"], [["sam"], []])
    inputs = model.processor.experts_inputs(["sam"], images)
    plain = model(**batch, expert_inputs=inputs)
    synced = model(**batch, expert_inputs=inputs, sync_experts=["sam", "vary", "deplot"])
    torch.testing.assert_close(plain.loss, synced.loss, rtol=0, atol=1e-6)
    model.train()
    try:
        out = model(**batch, expert_inputs=inputs, sync_experts=["sam", "vary"])
        out.loss.backward()
        extractor = [n for n, p in model.adapter.named_parameters()
                     if "vary" in n and p.grad is not None]
        assert extractor, "the synced expert's branch is in the graph"
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
