"""Resampling of feature maps from ops whose CUDA backward is deterministic.

``nn.AdaptiveAvgPool2d`` (to any size but 1x1) and ``F.interpolate(mode="bilinear")`` are on
the list of ops that ``torch.use_deterministic_algorithms(True)`` refuses to differentiate on
CUDA (their backward kernels accumulate with atomic adds; see :mod:`pipelocal.cuda_ops`). The
two modules here compute the same values from kernels that are deterministic on every device:

* :class:`AdaptiveAvgPool2d`: identity where the size is unchanged, ``avg_pool2d`` with
  kernel = stride where the output size divides the input size (the same windows as adaptive
  pooling), else a product with the adaptive windows' averaging matrices,
  ``P_h [H', H] @ x [B, C, H, W] @ P_w^T [W, W']`` (matmul's backward is two more matmuls).
* :class:`BilinearUpsample`: bilinear interpolation with ``align_corners=True`` as the same
  kind of matrix product, ``A_h [H', H] @ x @ A_w^T``.

Both equal their PyTorch counterparts up to float rounding (the tests compare them); the
matrices are built once, at construction, in float32, and are not part of the state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AdaptiveAvgPool2d", "BilinearUpsample", "adaptive_pool_matrix", "bilinear_matrix"]


def adaptive_pool_matrix(size_in: int, size_out: int) -> Tensor:
    """[size_out, size_in]: row i averages adaptive pooling's window i.

    The window of output i is [floor(i n / m), ceil((i + 1) n / m)) for n inputs and m outputs,
    as ATen's ``adaptive_avg_pool2d`` (``start_index`` / ``end_index``) computes it.
    """
    m = torch.zeros(size_out, size_in)
    for i in range(size_out):
        lo, hi = (i * size_in) // size_out, math.ceil((i + 1) * size_in / size_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def bilinear_matrix(size_in: int, size_out: int) -> Tensor:
    """[size_out, size_in]: linear interpolation weights with ``align_corners=True``.

    Output i samples input position i (n - 1) / (m - 1) (0 when m = 1) and mixes its two
    neighbours by the fractional part, as ``F.interpolate(..., align_corners=True)``.
    """
    m = torch.zeros(size_out, size_in)
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    for i in range(size_out):
        src = i * scale
        lo = min(math.floor(src), size_in - 1)
        hi = min(lo + 1, size_in - 1)
        frac = src - lo
        m[i, lo] += 1.0 - frac
        m[i, hi] += frac
    return m


class _Separable(nn.Module):
    """``rows [H', H] @ x [..., H, W] @ cols^T [W, W']`` with fixed matrices."""

    def __init__(self, rows: Tensor, cols: Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", rows, persistent=False)  # [H', H]
        self.register_buffer("cols_t", cols.t().contiguous(), persistent=False)  # [W, W']

    def forward(self, x: Tensor) -> Tensor:
        # Under autocast both matmuls run in the autocast dtype, as a conv would.
        return self.rows.to(x.dtype) @ x @ self.cols_t.to(x.dtype)  # [B, C, H', W']


class AdaptiveAvgPool2d(nn.Module):
    """Adaptive average pooling of [B, C, H, W] (H, W given) to ``size``, deterministic on CUDA."""

    def __init__(self, in_hw: tuple[int, int], size: int | tuple[int, int]) -> None:
        super().__init__()
        self.in_hw = (int(in_hw[0]), int(in_hw[1]))
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        (h, w), (oh, ow) = self.in_hw, self.size
        self.kernel: tuple[int, int] | None = None
        self.matrices: _Separable | None = None
        if (h, w) != (oh, ow) and h % oh == 0 and w % ow == 0:
            self.kernel = (h // oh, w // ow)
        elif (h, w) != (oh, ow):
            self.matrices = _Separable(adaptive_pool_matrix(h, oh), adaptive_pool_matrix(w, ow))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.in_hw:
            raise ValueError(f"AdaptiveAvgPool2d built for {self.in_hw[0]}x{self.in_hw[1]} "
                             f"maps got {x.shape[-2]}x{x.shape[-1]}")
        if self.kernel is not None:
            return F.avg_pool2d(x, self.kernel, self.kernel)
        if self.matrices is not None:
            return self.matrices(x)
        return x

    def extra_repr(self) -> str:
        return f"in_hw={self.in_hw}, size={self.size}"


class BilinearUpsample(_Separable):
    """Bilinear resize (``align_corners=True``) of [B, C, H, W] maps to ``size``."""

    def __init__(self, in_hw: tuple[int, int], size: tuple[int, int]) -> None:
        super().__init__(bilinear_matrix(in_hw[0], size[0]), bilinear_matrix(in_hw[1], size[1]))
