"""The pieces the local learning rules are made of: similarity matrices, pooling to a target
dimension, and a linear layer whose backward pass uses a fixed random feedback matrix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Conv2dFA",
    "LinearFA",
    "label_onehot",
    "linear_fa",
    "pool_window",
    "pooled_size",
    "similarity_matrix",
]


def similarity_matrix(x: Tensor, *, use_std: bool = True) -> Tensor:
    """Cosine similarity between the samples of a batch: [B, ...] -> [B, B], unit diagonal.

    Conv features [B, C, H, W] with C > 3 and H > 1 are first reduced to their per-channel
    standard deviation over space (Nøkland & Eidnes 2019, sec. 2.2; the authors' code tests
    ``H > 1``, so an [*, *, 1, W] map is flattened); ``use_std=False`` is the authors'
    ``--no-similarity-std``: always flatten. Each sample's feature vector is then mean-centred
    and L2-normalised.
    """
    if use_std and x.dim() == 4 and x.size(1) > 3 and x.size(2) > 1:
        x = x.flatten(2).std(dim=2)  # [B, C]
    else:
        x = x.flatten(1)  # [B, D]
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (xn @ xn.t()).clamp(-1, 1)


def label_onehot(y: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(y, num_classes).to(torch.float32)


def pool_window(shape: tuple[int, ...], dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The authors' average-pooling window for a [C, H, W] map: ``((kh, kw), (ph, pw))``.

    As in the authors' ``LocalLossBlockConv``: double the window height, then (if still too
    big) the width, alternately, until C * ceil(H/kh) * ceil(W/kw) <= ``dim`` or the window
    covers the map; stride = window; pad ``(k * (ceil(n/k) - n // k)) // 2`` on each side so
    that a partial last window still yields an output (0 when k divides n, else k/2).
    """
    c, h, w = shape
    kh = kw = 1

    def size() -> int:
        return c * math.ceil(h / kh) * math.ceil(w / kw)

    while size() > dim and (kh < h or kw < w):
        if kh < h:
            kh *= 2
        if size() > dim and kw < w:
            kw *= 2
    pad = tuple((k * (math.ceil(n / k) - n // k)) // 2 for k, n in ((kh, h), (kw, w)))
    return (kh, kw), (pad[0], pad[1])


def pooled_size(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    """Size after the authors' pooling (:func:`pool_window`): ``(C, ceil(H/kh), ceil(W/kw))``.

    The input of a local classifier has at most ``dim`` features (or is 1x1); [C] features
    are never pooled.
    """
    if len(shape) != 3:
        return tuple(shape)
    c, h, w = shape
    (kh, kw), _ = pool_window(shape, dim)
    return (c, math.ceil(h / kh), math.ceil(w / kw))


class _LinearFAFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, feedback = ctx.saved_tensors
        # In float32 whatever autocast made of the forward (bf16 output and input); each
        # gradient is returned in its input's dtype.
        g = grad_out.float()
        # Feedback alignment: the error reaches x through the fixed B, not through W^T.
        grad_x = (g @ feedback).to(x.dtype)  # [B, out] @ [out, in] -> [B, in]
        grad_w = g.t() @ x.float() if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def linear_fa(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
    """``F.linear(x, weight, bias)`` whose input gradient is ``grad_out @ feedback``."""
    return _LinearFAFn.apply(x, weight, bias, feedback)


class _Conv2dFAFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor,
                conf: tuple) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, feedback)
        ctx.conf, ctx.w_shape, ctx.has_bias = conf, weight.shape, bias is not None
        return F.conv2d(x, weight, bias, *conf)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, feedback = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        g = grad_out.float()  # float32 whatever autocast made of the forward, as above
        grad_x = None
        if ctx.needs_input_grad[0]:  # errors go down through the fixed random filters
            grad_x = torch.nn.grad.conv2d_input(
                x.shape, feedback, g, stride, padding, dilation, groups
            ).to(x.dtype)
        grad_w = torch.nn.grad.conv2d_weight(
            x.float(), ctx.w_shape, g, stride, padding, dilation, groups
        )
        grad_b = g.sum((0, 2, 3)) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None


def _feedback_like(weight: Tensor, fan_in: int) -> Tensor:
    """A fixed random matrix of ``weight``'s shape, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as the
    authors' LinearFA, drawn from the current (block-seeded) RNG."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty_like(weight, requires_grad=False).uniform_(-bound, bound)


class LinearFA(nn.Module):
    """``nn.Linear`` whose input gradient is ``grad_out @ B`` for a fixed random ``B``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        ref = nn.Linear(in_features, out_features, bias=bias)
        self.weight = ref.weight
        self.bias = ref.bias
        self.register_buffer("feedback", _feedback_like(ref.weight.detach(), in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> LinearFA:
        """The same parameters as ``linear`` (shared), with a new fixed feedback matrix."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.weight, out.bias = linear.weight, linear.bias
        out.register_buffer("feedback", _feedback_like(linear.weight.detach(),
                                                       linear.in_features))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return linear_fa(x, self.weight, self.bias, self.feedback)


class Conv2dFA(nn.Module):
    """An ``nn.Conv2d`` (parameters shared) whose input gradient uses fixed random filters."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"feedback alignment needs zero, numeric conv padding; got {conv}")
        self.weight, self.bias = conv.weight, conv.bias
        self.conf = (conv.stride, conv.padding, conv.dilation, conv.groups)
        fan_in = conv.weight[0].numel()
        self.register_buffer("feedback", _feedback_like(conv.weight.detach(), fan_in))

    def forward(self, x: Tensor) -> Tensor:
        return _Conv2dFAFn.apply(x, self.weight, self.bias, self.feedback, self.conf)
