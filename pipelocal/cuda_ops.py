"""What CUDA does differently from the CPU, as lists of aten ops and a recorder to audit code by.

A CPU test run cannot see three things a GPU run depends on, so they are written down here, with
where each was read, and tests hold every rule and model against them:

* :data:`DETERMINISM_RAISES`: the ops ``torch.use_deterministic_algorithms(True)`` refuses on
  CUDA (it raises at the first such call, usually in the backward). Keys are the API names of
  that function's docstring (torch 2.14.1), values the aten ops that raise; a test parses the
  installed torch's docstring, so a torch whose list changed fails until this table follows.
* :data:`AUTOCAST_CUDA_BANNED` and :data:`AUTOCAST_CUDA_FP32`: CUDA autocast's banned ops (they
  raise inside an autocast region; CPU autocast silently runs them in float32) and the ops it
  runs in float32 (torch.amp documentation, "CUDA Ops that can autocast to float32", torch
  2.14.1; each is checked to have an AutocastCUDA kernel in the installed torch). CUDA autocast
  itself runs on a CPU over fake CUDA tensors: :func:`fake_cuda_autocast`.
* :data:`HOST_SYNC_OPS`: ops after which the host waits for the device (a value read back,
  or an output whose size depends on the data), and :func:`blocking_copy`: a host-to-device or
  device-to-host copy that is not ``non_blocking``.

:class:`OpRecorder` (a ``TorchDispatchMode``) records every aten op a piece of code runs,
forward and backward, with the findings of the three checks.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "AUTOCAST_CUDA_BANNED",
    "AUTOCAST_CUDA_FP32",
    "DETERMINISM_RAISES",
    "HOST_SYNC_OPS",
    "READ_FROM",
    "OpRecorder",
    "blocking_copy",
    "determinism_violation",
    "documented_raising_apis",
    "fake_cuda_autocast",
]

READ_FROM = "torch 2.14.1"
"""The PyTorch version the lists below were read from."""

_Cond = Callable[[dict[str, Any]], bool]
_ALWAYS: _Cond = lambda a: True  # noqa: E731


def _mode_is_max(a: dict[str, Any]) -> bool:
    return a.get("mode") == 2  # EmbeddingBag: 0 sum, 1 mean, 2 max


DETERMINISM_RAISES: dict[str, tuple[tuple[str, ...], _Cond]] = {
    # API name in the docstring -> (aten ops, "packet" or "packet.overload"; when they raise)
    "torch.nn.AvgPool3d": (("avg_pool3d_backward",), _ALWAYS),
    "torch.nn.AdaptiveAvgPool2d": (("_adaptive_avg_pool2d_backward",), _ALWAYS),
    "torch.nn.AdaptiveAvgPool3d": (("_adaptive_avg_pool3d_backward",), _ALWAYS),
    "torch.nn.AdaptiveMaxPool2d": (("adaptive_max_pool2d_backward",), _ALWAYS),
    "torch.nn.FractionalMaxPool2d": (("fractional_max_pool2d_backward",), _ALWAYS),
    "torch.nn.FractionalMaxPool3d": (("fractional_max_pool3d_backward",), _ALWAYS),
    "torch.nn.MaxUnpool1d": (("max_unpool2d",), _ALWAYS),  # 1-D runs the 2-D kernel
    "torch.nn.MaxUnpool2d": (("max_unpool2d",), _ALWAYS),
    "torch.nn.MaxUnpool3d": (("max_unpool3d",), _ALWAYS),
    "torch.nn.functional.interpolate": ((
        "upsample_linear1d_backward", "upsample_bilinear2d_backward",
        "_upsample_bilinear2d_aa_backward", "upsample_bicubic2d_backward",
        "_upsample_bicubic2d_aa_backward", "upsample_trilinear3d_backward"), _ALWAYS),
    "torch.nn.ReflectionPad1d": (("reflection_pad1d_backward",), _ALWAYS),
    "torch.nn.ReflectionPad2d": (("reflection_pad2d_backward",), _ALWAYS),
    "torch.nn.ReflectionPad3d": (("reflection_pad3d_backward",), _ALWAYS),
    # The spatial (2-D target) form: its CUDA kernel alerts (NLLLoss2d.cu, atomicAdd); the
    # [B, classes] form that cross_entropy on class scores uses has a deterministic kernel.
    "torch.nn.NLLLoss": (("nll_loss2d_forward", "nll_loss2d_backward"), _ALWAYS),
    "torch.nn.CTCLoss": (("_ctc_loss_backward",), _ALWAYS),
    "torch.nn.EmbeddingBag": (("_embedding_bag_backward", "_embedding_bag_dense_backward"),
                              _mode_is_max),
    "torch.Tensor.put_": (("put_", "put"), _ALWAYS),
    "torch.histc": (("histc",), _ALWAYS),
    "torch.bincount": (("bincount",), lambda a: a.get("weights") is not None),
    "torch.median": (("median.dim", "nanmedian.dim"), _ALWAYS),
    "torch.nn.functional.grid_sample": (
        ("grid_sampler_2d_backward", "grid_sampler_3d_backward"), _ALWAYS),
    "torch.Tensor.scatter_reduce": (("scatter_reduce.two", "scatter_reduce_.two"),
                                    lambda a: a.get("reduce") == "prod"),
    "torch.Tensor.resize_": ((), _ALWAYS),  # quantized tensors only; pipelocal never quantizes
}

AUTOCAST_CUDA_BANNED = ("binary_cross_entropy",)
"""``F.binary_cross_entropy`` / ``nn.BCELoss`` raise inside a CUDA autocast region."""

AUTOCAST_CUDA_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm",
    "group_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "cumprod", "cumsum", "prod", "sum", "softmax", "log_softmax",
)
"""Ops CUDA autocast runs in float32 whatever their inputs (CPU autocast's list differs)."""

HOST_SYNC_OPS = ("_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero",
                 "masked_select", "unique", "_unique2", "unique_consecutive", "tolist")
"""Ops that make the host wait for the device: a value read back (``.item()``, ``int()``,
``bool()``, ``torch.equal``) or an output whose size depends on the data."""


def documented_raising_apis(doc: str | None = None) -> list[str]:
    """The API names ``torch.use_deterministic_algorithms``'s docstring lists as raising."""
    doc = doc if doc is not None else (torch.use_deterministic_algorithms.__doc__ or "")
    found = re.search(r"normally-nondeterministic operations will\s+throw", doc)
    if found is None:
        raise ValueError("no list of raising operations in the docstring")
    section = doc[found.end():doc.index("In addition", found.end())]
    return sorted(set(re.findall(r"^\s*\* :\w+:`([\w.]+)`", section, re.M)))


def _named_args(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    named = dict(zip((a.name for a in func._schema.arguments), args))
    named.update(kwargs)
    return named


def _op_names(func: Any) -> tuple[str, str]:
    packet = func._overloadpacket.__name__
    return packet, f"{packet}.{func._overloadname}"


def determinism_violation(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The documented API whose deterministic mode would raise on CUDA for this call, or None."""
    names = _op_names(func)
    for api, (ops, when) in DETERMINISM_RAISES.items():
        if any(n in ops for n in names) and when(_named_args(func, args, kwargs)):
            return api
    return None


def blocking_copy(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """``"host-to-device"`` / ``"device-to-host"`` for a copy between the CPU and a device that
    the host waits for (not ``non_blocking``), else None."""
    packet, _ = _op_names(func)
    a = _named_args(func, args, kwargs)
    non_blocking = bool(a.get("non_blocking"))
    if packet == "copy_":
        src, dst = a.get("src"), a.get("self")
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
            return _direction(src.device, dst.device, non_blocking)
    elif packet == "_to_copy":
        src, device = a.get("self"), a.get("device")
        if isinstance(src, torch.Tensor) and device is not None:
            return _direction(src.device, torch.device(device), non_blocking)
    return None


def _direction(src: torch.device, dst: torch.device, non_blocking: bool) -> str | None:
    if non_blocking or (src.type == "cpu") == (dst.type == "cpu"):
        return None
    return "host-to-device" if src.type == "cpu" else "device-to-host"


@dataclass
class OpRecorder(TorchDispatchMode):
    """Records every aten op run under it (``with OpRecorder() as rec: ...``) and what the
    checks above find: ``nondeterministic`` (API names), ``syncs`` and ``copies``."""

    ops: list[str] = field(default_factory=list)
    nondeterministic: list[str] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        packet, full = _op_names(func)
        self.ops.append(full)
        if (api := determinism_violation(func, args, kwargs)) is not None:
            self.nondeterministic.append(f"{api} ({full})")
        if packet in HOST_SYNC_OPS:
            self.syncs.append(full)
        if (copy := blocking_copy(func, args, kwargs)) is not None:
            self.copies.append(f"{copy} ({full})")
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda_autocast(dtype: torch.dtype | None = torch.bfloat16) -> Iterator[Any]:
    """A fake-tensor mode whose tensors may live on ``cuda`` without a GPU, with CUDA autocast
    on (``dtype``; None: off). Under it a forward pass dispatches CUDA autocast's own kernels:
    banned ops raise and every op gets the dtype it would get on a GPU. Backward passes need a
    real device. Yields the mode; ``mode.from_tensor(t).to("cuda")`` makes a fake CUDA copy."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    was_on, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        # torch.autocast("cuda") turns itself off without a GPU; the flags themselves do not.
        torch.set_autocast_enabled("cuda", dtype is not None)
        if dtype is not None:
            torch.set_autocast_dtype("cuda", dtype)
        try:
            yield mode
        finally:
            torch.set_autocast_enabled("cuda", was_on)
            torch.set_autocast_dtype("cuda", was_dtype)
            torch.clear_autocast_cache()
