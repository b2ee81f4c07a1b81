"""The adapter's debug view: per block, the raw router logits and the top-k picks beside the
renormalised weights; off by default and without effect on the outputs."""

from __future__ import annotations

import torch
from torch import nn

from mova.adapter import MoVAdapter, route_top_k, route_weights
from mova.config import AdapterConfig

C, HEADS, G, T, D = 32, 2, 8, 20, 48
CHANNELS = {"alpha": 24, "beta": 16, "gamma": 40, "delta": 8}


def make_adapter(top_k: int = 2) -> MoVAdapter:
    torch.manual_seed(0)
    model = MoVAdapter(AdapterConfig(num_heads=HEADS, num_blocks=3, top_k=top_k),
                       hidden_size=C, grid_size=G, expert_channels=CHANNELS,
                       text_hidden_size=T, llm_hidden_size=D)
    with torch.no_grad():
        for p in model.parameters():
            nn.init.normal_(p, std=0.1)
    return model.eval()


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, G * G, C, generator=g), torch.randn(batch, T, generator=g),
            {n: torch.randn(batch, G * G, c, generator=g) for n, c in CHANNELS.items()})


def test_route_top_k_by_hand():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    weights, picks = route_top_k(logits, mask, top_k=2)
    assert torch.equal(weights, route_weights(logits, mask, top_k=2))
    assert picks.tolist() == [[0, 2], [1, -1], [-1, -1]]
    assert weights[1].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_debug_off_by_default_and_outputs_unchanged():
    model = make_adapter()
    base, text, feats = inputs(3)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        plain = model(base, text, feats, mask)
        debug = model(base, text, feats, mask, debug=True)
    assert plain.router_logits is None and plain.top_k is None
    assert torch.equal(plain.image_tokens, debug.image_tokens)
    assert torch.equal(plain.gate_weights, debug.gate_weights)
    assert debug.router_logits.shape == (3, 3, 4) and debug.router_logits.dtype == torch.float32
    assert debug.top_k.shape == (3, 3, 2) and debug.top_k.dtype == torch.long
    # block 0 reads the text and the mean of base + pos_embed
    x0 = model.pos_embed(base)
    torch.testing.assert_close(debug.router_logits[:, 0], model.blocks[0].gate.logits(text, x0))
    for b in range(3):
        weights = debug.gate_weights[:, b]
        assert debug.top_k[0, b].tolist() == weights[0].topk(2).indices.tolist()
        assert debug.top_k[1, b].tolist() == [2, -1]  # one routed expert, k = 2
        assert debug.top_k[2, b].tolist() == [-1, -1]  # routes nothing
        recomputed = route_top_k(debug.router_logits[:, b], mask, 2)[0]
        torch.testing.assert_close(recomputed, weights)


def test_debug_with_an_all_zero_mask_reads_no_expert():
    model = make_adapter(top_k=3)
    base, text, _ = inputs(2)
    out = model(base, text, None, torch.zeros(2, 4, dtype=torch.bool), debug=True)
    assert (out.top_k == -1).all() and torch.isfinite(out.router_logits).all()
