"""Tests of the MoV-Adapter (METHOD.md, stage 2) at tiny sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mova.adapter.adapter as adapter_module
from mova.adapter import (
    Downsampler,
    ExpertGate,
    MoVAdapter,
    Rotary2D,
    apply_rotary_2d,
    rotary_2d_angles,
    route_weights,
)
from mova.config import AdapterConfig

C, HEADS, G, T, D = 32, 2, 8, 20, 48
CHANNELS = {"alpha": 24, "beta": 16, "gamma": 40}
NAMES = list(CHANNELS)


def make_adapter(num_blocks: int = 2, top_k: int = 3, seed: int = 0) -> MoVAdapter:
    torch.manual_seed(seed)
    config = AdapterConfig(num_heads=HEADS, num_blocks=num_blocks, top_k=top_k)
    return MoVAdapter(config, hidden_size=C, grid_size=G, expert_channels=CHANNELS,
                      text_hidden_size=T, llm_hidden_size=D)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Break every zero init: weights ~ N(0, 0.1^2), LayerNorm weights ~ N(1, 0.1^2)."""
    torch.manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for p in model.parameters():
            nn.init.normal_(p, mean=1.0 if id(p) in norm_weights else 0.0, std=0.1)
    return model


def make_inputs(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, G * G, C, generator=g)
    text = torch.randn(batch, T, generator=g)
    feats = {n: torch.randn(batch, G * G, c, generator=g) for n, c in CHANNELS.items()}
    return base, text, feats


def expected_at_init(model: MoVAdapter, base: torch.Tensor) -> torch.Tensor:
    """mlp(avg_pool((B0 + pos + B0) / 2)) by hand: blocks and downsampler stages are identities."""
    x = (base + model.pos_embed.weight + base) / 2
    grid = x.transpose(1, 2).reshape(base.shape[0], C, G, G)
    pooled = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    fc1, fc2 = model.projector[0], model.projector[2]
    hidden = pooled @ fc1.weight.T + fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return hidden @ fc2.weight.T + fc2.bias


# ---- structure ---------------------------------------------------------------------------------
def test_structure_follows_method() -> None:
    model = make_adapter()
    assert model.expert_names == NAMES
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert all(m.approximate == "none" for m in model.modules() if isinstance(m, nn.GELU))
    attn = model.blocks[0].extractors["gamma"].attn
    assert attn.q_proj.bias is None and attn.k_proj.bias is None and attn.v_proj.bias is None
    assert attn.k_proj.in_features == 40 and attn.out_proj.bias is not None
    assert model.blocks[0].extractors["gamma"].norm_f.normalized_shape == (40,)
    assert model.blocks[0].mlp.w1.out_features == int(8 * C / 3)
    assert model.blocks[0].gate.fc1.in_features == T + C
    assert model.downsampler.stage1.se.reduce.out_channels == C // 4


# ---- shapes and gate ---------------------------------------------------------------------------
def test_output_shapes() -> None:
    model = make_adapter(num_blocks=3)
    base, text, feats = make_inputs(2)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    out = model(base, text, feats, mask)
    assert out.image_tokens.shape == (2, (G // 2) ** 2, D)
    assert out.gate_weights.shape == (2, 3, 3) and out.gate_weights.dtype == torch.float32
    assert model(base, text, feats, mask, return_gates=False).gate_weights is None


def test_route_weights_by_hand() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [5.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [False, True, True], [False, False, False]])
    weights = route_weights(logits, mask, top_k=2)
    e2, e1, e0 = math.exp(2), math.exp(1), 1.0
    expected = torch.tensor([[e2 / (e2 + e1), e1 / (e2 + e1), 0.0],
                             [0.0, e1 / (e1 + e0), e0 / (e1 + e0)],
                             [0.0, 0.0, 0.0]])
    torch.testing.assert_close(weights, expected)
    assert weights[1, 0] == 0


def test_gate_weights_sum_to_one_over_at_most_k() -> None:
    model = randomize(make_adapter(num_blocks=3, top_k=2))
    base, text, feats = make_inputs(4)
    mask = torch.tensor([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    gates = model(base, text, feats, mask).gate_weights
    sums = gates.sum(-1)
    torch.testing.assert_close(sums[[0, 1, 3]], torch.ones(3, 3))
    assert torch.equal(gates[2], torch.zeros(3, 3))
    assert ((gates > 0).sum(-1) <= 2).all()
    assert torch.equal(gates[1], torch.tensor([[0.0, 1.0, 0.0]] * 3))
    assert (gates[~mask[:, None, :].expand_as(gates)] == 0).all()


def test_top1_gives_one_nonzero_weight() -> None:
    model = randomize(make_adapter(num_blocks=2, top_k=1))
    base, text, feats = make_inputs(2)
    gates = model(base, text, feats, torch.ones(2, 3)).gate_weights
    assert torch.equal((gates > 0).sum(-1), torch.ones(2, 2, dtype=torch.long))
    assert torch.equal(gates.sum(-1), torch.ones(2, 2))


def test_gate_input_is_text_then_mean() -> None:
    torch.manual_seed(0)
    gate = ExpertGate(T, C, 3, top_k=3)
    nn.init.normal_(gate.fc2.weight)
    with torch.no_grad():
        gate.fc1.weight[:, T:] = 0  # the gate now reads the text only
    text, x, mask = torch.randn(2, T), torch.randn(2, 5, C), torch.ones(2, 3, dtype=torch.bool)
    w = gate(text, x, mask)
    assert torch.equal(w, gate(text, torch.randn(2, 5, C), mask))
    assert not torch.allclose(w, gate(torch.randn(2, T), x, mask))


# ---- identity at initialisation ----------------------------------------------------------------
def test_every_block_is_identity_at_init() -> None:
    model = make_adapter(num_blocks=3)
    base, text, feats = make_inputs(2)
    mask = torch.ones(2, 3, dtype=torch.bool)
    x = base + torch.randn_like(base)
    for block in model.blocks:
        out, _ = block(x, text, feats, mask, NAMES)
        assert torch.equal(out, x)


def test_downsampler_is_avg_pool_at_init() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, C, G, G)
    assert torch.equal(Downsampler(C, factor=2)(x), F.avg_pool2d(x, 2))


def test_adapter_at_init_is_mlp_of_pooled_base() -> None:
    model = make_adapter(num_blocks=3)
    base, text, feats = make_inputs(2)
    expected = expected_at_init(model, base)
    for mask in (torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 1]])):
        out = model(base, text, feats, mask).image_tokens
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # the final residual adds B0 without pos_embed
        model.pos_embed.weight.normal_()
    out = model(base, text, None, torch.zeros(2, 3)).image_tokens
    torch.testing.assert_close(out, expected_at_init(model, base), atol=1e-6, rtol=1e-6)


# ---- routing semantics -------------------------------------------------------------------------
def test_unrouted_expert_cannot_change_output_routed_can() -> None:
    model = randomize(make_adapter())
    base, text, feats = make_inputs(2)
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    ref = model(base, text, feats, mask).image_tokens

    noisy = dict(feats, beta=feats["beta"].clone())
    noisy["beta"][0] = torch.randn_like(noisy["beta"][0]) * 10  # beta routed by sample 1 only
    assert torch.equal(model(base, text, noisy, mask).image_tokens, ref)

    noisy = dict(feats, alpha=feats["alpha"].clone())
    noisy["alpha"][0] = torch.randn_like(noisy["alpha"][0])  # alpha routed by sample 0
    out = model(base, text, noisy, mask).image_tokens
    assert (out[0] - ref[0]).abs().max() > 1e-4
    assert torch.equal(out[1], ref[1])

    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])  # beta routed by nobody: absent or noise
    ref = model(base, text, feats, mask).image_tokens
    without = {k: v for k, v in feats.items() if k != "beta"}
    assert torch.equal(model(base, text, without, mask).image_tokens, ref)
    noisy = dict(feats, beta=torch.randn_like(feats["beta"]))
    assert torch.equal(model(base, text, noisy, mask).image_tokens, ref)


def test_mixed_masks_match_per_sample_runs() -> None:
    model = randomize(make_adapter(num_blocks=3, top_k=2))
    base, text, feats = make_inputs(4)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    batched = model(base, text, feats, mask)
    for i in range(4):
        routed = {n: feats[n][i:i + 1] for j, n in enumerate(NAMES) if mask[i, j]}
        single = model(base[i:i + 1], text[i:i + 1], routed, mask[i:i + 1])
        torch.testing.assert_close(batched.image_tokens[i:i + 1], single.image_tokens,
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(batched.gate_weights[i:i + 1], single.gate_weights,
                                   atol=1e-6, rtol=1e-6)


def test_zero_mask_needs_no_expert_features() -> None:
    model = randomize(make_adapter())
    base, text, feats = make_inputs(2)
    zeros = torch.zeros(2, 3, dtype=torch.bool)
    out = model(base, text, None, zeros)
    assert torch.equal(out.gate_weights, torch.zeros(2, 2, 3))
    assert torch.equal(model(base, text, {}, zeros).image_tokens, out.image_tokens)
    assert torch.equal(model(base, text, feats, zeros).image_tokens, out.image_tokens)


# ---- input errors ------------------------------------------------------------------------------
def test_missing_routed_expert_raises() -> None:
    model = make_adapter()
    base, text, feats = make_inputs(2)
    del feats["beta"]
    with pytest.raises(ValueError, match=r"beta.*routed"):
        model(base, text, feats, torch.tensor([[0, 0, 0], [0, 1, 0]]))


@pytest.mark.parametrize("field", ["base", "text", "mask", "expert", "unknown", "mask_values"])
def test_bad_inputs_raise(field: str) -> None:
    model = make_adapter()
    base, text, feats = make_inputs(2)
    mask = torch.ones(2, 3)
    match = {"base": "base_features", "text": "text_features", "mask": "expert_mask",
             "expert": "gamma", "unknown": "delta", "mask_values": "expert_mask"}[field]
    if field == "base":
        base = base[:, :-1]
    elif field == "text":
        text = text[:, :-1]
    elif field == "mask":
        mask = torch.ones(2, 4)
    elif field == "expert":
        feats["gamma"] = feats["gamma"][..., :-1]
    elif field == "unknown":
        feats["delta"] = feats["alpha"]
    else:
        mask = torch.full((2, 3), 0.5)
    with pytest.raises(ValueError, match=match):
        model(base, text, feats, mask)


# ---- rotary ------------------------------------------------------------------------------------
def _rotated_at_all_positions(rotary: Rotary2D, v: torch.Tensor) -> torch.Tensor:
    x = v.expand(1, 1, rotary.grid_size ** 2, v.shape[-1])
    return rotary(x)[0, 0]


def test_rotary_scores_depend_on_relative_offset_only() -> None:
    torch.manual_seed(0)
    rotary = Rotary2D(16, G)
    q = _rotated_at_all_positions(rotary, torch.randn(16))
    k = _rotated_at_all_positions(rotary, torch.randn(16))

    def score(p1: tuple[int, int], p2: tuple[int, int]) -> torch.Tensor:
        return q[p1[0] * G + p1[1]] @ k[p2[0] * G + p2[1]]

    torch.testing.assert_close(score((1, 2), (3, 5)), score((4, 1), (6, 4)))
    torch.testing.assert_close(score((5, 0), (2, 6)), score((7, 1), (4, 7)))
    assert not torch.allclose(score((0, 0), (0, 3)), score((0, 0), (3, 0)))


def test_rotary_preserves_norm_and_position_zero() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, HEADS, G * G, 16)
    out = Rotary2D(16, G)(x)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert not torch.allclose(out[:, :, 1:], x[:, :, 1:])


def test_rotary_interleaved_pair_layout_by_hand() -> None:
    rotary = Rotary2D(4, 2)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = _rotated_at_all_positions(rotary, v)
    c, s = math.cos(1.0), math.sin(1.0)
    row = [1 * c - 2 * s, 2 * c + 1 * s]
    col = [3 * c - 4 * s, 4 * c + 3 * s]
    torch.testing.assert_close(out[3], torch.tensor(row + col))  # row 1, col 1
    torch.testing.assert_close(out[2], torch.tensor(row + [3.0, 4.0]))  # row 1, col 0
    torch.testing.assert_close(out[1], torch.tensor([1.0, 2.0] + col))  # row 0, col 1


def test_rotary_angles_for_head_dim_8() -> None:
    angles = rotary_2d_angles(8, 3)
    for r in range(3):
        for c in range(3):
            expected = torch.tensor([r, r, r * 0.01, r * 0.01, c, c, c * 0.01, c * 0.01])
            torch.testing.assert_close(angles[r * 3 + c], expected)


def test_rotary_dtype_and_bad_shape() -> None:
    rotary = Rotary2D(16, G).to(torch.bfloat16)
    assert rotary.cos.dtype == torch.float32
    x = torch.randn(1, HEADS, G * G, 16, dtype=torch.bfloat16)
    assert rotary(x).dtype == torch.bfloat16
    exact = apply_rotary_2d(x.float(), rotary.cos, rotary.sin).to(torch.bfloat16)
    assert torch.equal(rotary(x), exact)
    with pytest.raises(ValueError, match="rotary input"):
        rotary(torch.randn(1, HEADS, G * G - 1, 16))


# ---- dtype and training ------------------------------------------------------------------------
def test_bf16_smoke() -> None:
    model = randomize(make_adapter())
    base, text, feats = make_inputs(2)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    ref = model(base, text, feats, mask).image_tokens
    out = model.to(torch.bfloat16)(base, text, feats, mask)
    assert out.image_tokens.dtype == torch.bfloat16
    assert torch.isfinite(out.image_tokens).all()
    assert out.gate_weights.dtype == torch.float32
    torch.testing.assert_close(out.image_tokens.float(), ref, atol=0.1, rtol=0.1)


def test_gradient_checkpointing_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    model = randomize(make_adapter()).train()
    base, text, feats = make_inputs(2)
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(base, text, feats, mask)
        (out.image_tokens.square().mean() + out.gate_weights.square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    calls = []
    real = adapter_module.checkpoint
    monkeypatch.setattr(adapter_module, "checkpoint",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    model.gradient_checkpointing = True
    checkpointed = grads()
    assert len(calls) == 2 and all(k["use_reentrant"] is False for k in calls)
    assert plain.keys() == checkpointed.keys() and "blocks.0.gate.fc1.weight" in plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
