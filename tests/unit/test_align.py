"""Tests for aligning expert features to the base grid and pooling routing tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mova.align import align_to_grid, grid_side, pool_routing_tokens


def _manual(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Reference: (B, L, C) -> (B, C, S, S), fp32 bilinear, back to (B, grid*grid, C)."""
    batch, length, channels = features.shape
    side = int(length ** 0.5)
    x = features.float().permute(0, 2, 1).reshape(batch, channels, side, side)
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False,
                      antialias=False)
    return x.reshape(batch, channels, grid * grid).permute(0, 2, 1)


def test_grid_side() -> None:
    assert grid_side(64) == 8
    assert grid_side(1) == 1
    with pytest.raises(ValueError, match="12 tokens"):
        grid_side(12)


@pytest.mark.parametrize(("side", "grid"), [(8, 16), (16, 8), (6, 6), (5, 7)])
def test_output_shape(side: int, grid: int) -> None:
    out = align_to_grid(torch.randn(2, side * side, 3), grid)
    assert out.shape == (2, grid * grid, 3)
    assert out.is_contiguous()


def test_identity_at_target_size() -> None:
    features = torch.randn(2, 36, 5)
    out = align_to_grid(features, 6)
    assert torch.equal(out, features)
    assert out.data_ptr() == features.data_ptr()  # no copy, no interpolation


def test_identity_only_casts() -> None:
    features = torch.randn(1, 16, 4)
    out = align_to_grid(features, 4, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, features.to(torch.bfloat16))


@pytest.mark.parametrize(("side", "grid"), [(12, 5), (37, 16), (4, 9), (8, 16)])
def test_matches_manual_interpolation(side: int, grid: int) -> None:
    features = torch.randn(2, side * side, 3)
    out = align_to_grid(features, grid)
    assert out.dtype == torch.float32
    assert torch.allclose(out, _manual(features, grid), atol=1e-6)


def test_shrinking_does_not_antialias() -> None:
    features = torch.randn(1, 16 * 16, 2)
    out = align_to_grid(features, 4)
    x = features.permute(0, 2, 1).reshape(1, 2, 16, 16)
    antialiased = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False,
                                antialias=True).reshape(1, 2, 16).permute(0, 2, 1)
    assert not torch.allclose(out, antialiased, atol=1e-3)


def test_row_major_layout() -> None:
    side, grid = 5, 9
    rows = torch.arange(side, dtype=torch.float32).repeat_interleave(side)  # token r*S+c -> r
    cols = torch.arange(side, dtype=torch.float32).repeat(side)
    features = torch.stack([rows, cols], dim=-1)[None]
    out = align_to_grid(features, grid)[0].reshape(grid, grid, 2)
    row_map, col_map = out[..., 0], out[..., 1]
    # the row feature is constant along each row and non-decreasing down the rows
    assert torch.allclose(row_map, row_map[:, :1].expand(grid, grid), atol=1e-6)
    assert (row_map[1:, 0] >= row_map[:-1, 0]).all()
    assert row_map[-1, 0] > row_map[0, 0]
    assert torch.allclose(col_map, col_map[:1, :].expand(grid, grid), atol=1e-6)
    assert (col_map[0, 1:] >= col_map[0, :-1]).all()
    assert col_map[0, -1] > col_map[0, 0]


@pytest.mark.parametrize("target", [None, torch.bfloat16])
def test_bf16_computed_in_fp32(target: torch.dtype | None) -> None:
    features = torch.randn(2, 7 * 7, 4).to(torch.bfloat16)
    out = align_to_grid(features, 12, dtype=target)
    assert out.dtype == torch.bfloat16
    expected = _manual(features.float(), 12).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_cast_to_base_dtype_before_interpolating() -> None:
    features = torch.randn(1, 6 * 6, 3, dtype=torch.float64)
    out = align_to_grid(features, 4, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    expected = _manual(features.to(torch.bfloat16).float(), 4).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_fp32_to_bf16_base() -> None:
    features = torch.randn(1, 8 * 8, 3)
    out = align_to_grid(features, 6, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _manual(features.to(torch.bfloat16).float(), 6).to(torch.bfloat16))


@pytest.mark.parametrize("length", [10, 50, 2])
def test_non_square_rejected(length: int) -> None:
    with pytest.raises(ValueError, match=f"{length} tokens.*not a square"):
        align_to_grid(torch.randn(1, length, 3), 4)


def test_wrong_rank_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(B, L, C\)"):
        align_to_grid(torch.randn(16, 3), 4)


# ---- routing-token pooling ---------------------------------------------------------------------
def test_pool_24_to_12() -> None:
    tokens = torch.randn(2, 24 * 24, 8)
    out = pool_routing_tokens(tokens)
    assert out.shape == (2, 144, 8)
    grid = tokens.reshape(2, 24, 24, 8)
    assert torch.allclose(out[:, 0], grid[:, :2, :2].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(out[:, 12 * 3 + 5], grid[:, 6:8, 10:12].mean(dim=(1, 2)), atol=1e-6)


def test_pool_by_hand() -> None:
    # 4x4 grid, one channel holding the token index r*4+c, a second holding its negative
    values = torch.arange(16, dtype=torch.float32)
    tokens = torch.stack([values, -values], dim=-1)[None]
    out = pool_routing_tokens(tokens, pool=2)
    # blocks: (0,1,4,5) -> 2.5, (2,3,6,7) -> 4.5, (8,9,12,13) -> 10.5, (10,11,14,15) -> 12.5
    expected = torch.tensor([2.5, 4.5, 10.5, 12.5])
    assert torch.equal(out[0, :, 0], expected)
    assert torch.equal(out[0, :, 1], -expected)


def test_pool_other_factor() -> None:
    tokens = torch.arange(36, dtype=torch.float32).reshape(1, 36, 1)
    out = pool_routing_tokens(tokens, pool=3)
    assert out.shape == (1, 4, 1)
    assert out[0, 0, 0].item() == pytest.approx((0 + 1 + 2 + 6 + 7 + 8 + 12 + 13 + 14) / 9)


def test_pool_errors() -> None:
    with pytest.raises(ValueError, match="5x5 is not divisible by pool=2"):
        pool_routing_tokens(torch.randn(1, 25, 4))
    with pytest.raises(ValueError, match="not a square"):
        pool_routing_tokens(torch.randn(1, 20, 4))
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        pool_routing_tokens(torch.randn(16, 4))
