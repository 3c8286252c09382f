"""The pieces the local learning rules are made of: similarity matrices, pooling to a target
dimension, and a linear layer whose backward pass uses a fixed random feedback matrix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LinearFA", "label_onehot", "pooled_size", "similarity_matrix"]


def similarity_matrix(x: Tensor) -> Tensor:
    """Cosine similarity between the samples of a batch: [B, ...] -> [B, B], unit diagonal.

    Conv features [B, C, H, W] with C > 3 and H*W > 1 are first reduced to their per-channel
    standard deviation over space (Nøkland & Eidnes 2019, sec. 2.2); each sample's feature
    vector is then mean-centred and L2-normalised.
    """
    if x.dim() == 4 and x.size(1) > 3 and x.size(2) * x.size(3) > 1:
        x = x.flatten(2).std(dim=2)  # [B, C]
    else:
        x = x.flatten(1)  # [B, D]
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (xn @ xn.t()).clamp(-1, 1)


def label_onehot(y: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(y, num_classes).to(torch.float32)


def pooled_size(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    """Spatial size after halving H, then W, alternately until C*H*W <= dim (or 1x1).

    The paper's recipe for the input of a local classifier; for [C] features nothing changes.
    """
    if len(shape) != 3:
        return tuple(shape)
    c, h, w = shape
    while c * h * w > dim and (h > 1 or w > 1):
        if h > 1:
            h = math.ceil(h / 2)
        if c * h * w > dim and w > 1:
            w = math.ceil(w / 2)
    return (c, h, w)


class _LinearFAFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, feedback: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, feedback)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, _weight, feedback = ctx.saved_tensors
        # In float32 whatever autocast made of the forward (bf16 output and input); each
        # gradient is returned in its input's dtype.
        g = grad_out.float()
        # Feedback alignment: the error reaches x through the fixed B, not through W^T.
        grad_x = (g @ feedback).to(x.dtype)  # [B, out] @ [out, in] -> [B, in]
        grad_w = g.t() @ x.float()
        return grad_x, grad_w, g.sum(0), None


class LinearFA(nn.Module):
    """``nn.Linear`` whose input gradient is ``grad_out @ B`` for a fixed random ``B``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        ref = nn.Linear(in_features, out_features)
        self.weight = ref.weight
        self.bias = ref.bias
        feedback = torch.empty(out_features, in_features)
        bound = 1.0 / math.sqrt(in_features)
        self.register_buffer("feedback", feedback.uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return _LinearFAFn.apply(x, self.weight, self.bias, self.feedback)
