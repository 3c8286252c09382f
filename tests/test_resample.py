"""Tests for pipelocal.models.resample: the same values as PyTorch's adaptive pooling and
bilinear interpolation, from ops that are deterministic on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelocal.models.resample import AdaptiveAvgPool2d, BilinearUpsample, adaptive_pool_matrix


def _assert_same(ours: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> None:
    """Equal values, and equal gradients for the same output gradient."""
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    (a,) = torch.autograd.grad(ours, x, g)
    (b,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("hw", "size"), [((8, 8), (2, 2)), ((7, 7), (2, 2)), ((1, 1), (7, 7)),
                                          ((7, 7), (7, 7)), ((5, 9), (3, 4)), ((2, 2), (7, 7))])
def test_adaptive_pool_equals_torch(hw: tuple[int, int], size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *hw, requires_grad=True)
    _assert_same(AdaptiveAvgPool2d(hw, size)(x), F.adaptive_avg_pool2d(x, size), x)


def test_adaptive_pool_uses_avg_pool_where_sizes_divide() -> None:
    assert AdaptiveAvgPool2d((8, 4), 2).kernel == (4, 2)
    assert AdaptiveAvgPool2d((7, 7), 2).kernel is None
    # windows [0, 4) and [3, 7) of 7 inputs, as ATen's start/end indices
    torch.testing.assert_close(adaptive_pool_matrix(7, 2)[1], torch.tensor([0, 0, 0] + [0.25] * 4))


def test_adaptive_pool_refuses_another_input_size() -> None:
    with pytest.raises(ValueError, match="built for 8x8 maps got 4x4"):
        AdaptiveAvgPool2d((8, 8), 2)(torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize(("hw", "size"), [((4, 4), (16, 16)), ((3, 5), (28, 28)), ((1, 1), (8, 8)),
                                          ((8, 8), (8, 8))])
def test_bilinear_equals_torch(hw: tuple[int, int], size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *hw, requires_grad=True)
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    _assert_same(BilinearUpsample(hw, size)(x), ref, x)


def test_matrices_are_not_checkpointed() -> None:
    assert BilinearUpsample((4, 4), (8, 8)).state_dict() == {}
    assert AdaptiveAvgPool2d((7, 7), 2).state_dict() == {}
