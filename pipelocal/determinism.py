"""How a device is set up to compute reproducibly: the determinism flags, cuBLAS's workspace,
bfloat16 support.

Each CUDA setting is commented with the documented PyTorch semantics it relies on.
"""

from __future__ import annotations

import os
import re

import torch

from pipelocal.config import ConfigError

__all__ = [
    "CUBLAS_WORKSPACE",
    "check_bf16",
    "configure_determinism",
    "cublas_workspace_ok",
    "deterministic_now",
]

CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS (CUDA >= 10.2, PyTorch reproducibility
notes); it must be in the environment before the first cuBLAS call of the process. A value the
user set is kept if it is one of the documented forms (``:4096:8``, ``:16:8``, or several
``:SIZE:COUNT`` pairs)."""
_CUBLAS_FORM = re.compile(r"^(:\d+:\d+)+$")


def cublas_workspace_ok(value: str | None) -> bool:
    """Whether ``CUBLAS_WORKSPACE_CONFIG = value`` makes cuBLAS deterministic (a documented
    ``:SIZE:COUNT[:SIZE:COUNT...]`` form)."""
    return value is not None and _CUBLAS_FORM.match(value) is not None


def configure_determinism(device: torch.device, deterministic: bool) -> None:
    """Set the flags that make CUDA kernels reproducible; call before the first CUDA call.

    On: ``CUBLAS_WORKSPACE_CONFIG`` (read by cuBLAS at handle creation), deterministic
    algorithms only (ops without one raise instead of silently differing), cuDNN deterministic
    and not benchmarking (benchmarking may choose different algorithms run to run). Off: cuDNN
    benchmarks for speed, and the bitwise guarantee holds on CPU only. CPU kernels are
    deterministic for a fixed thread count either way.
    """
    if deterministic and not cublas_workspace_ok(os.environ.get("CUBLAS_WORKSPACE_CONFIG")):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic and device.type == "cuda"
    # TF32: PyTorch lets cuDNN convolutions use it by default (cuBLAS matmuls not). Under
    # run.deterministic "fp32" means IEEE float32 on every op; otherwise PyTorch's defaults.
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = False


def deterministic_now() -> bool:
    """Whether this process runs with every flag :func:`configure_determinism` sets when on."""
    return (
        torch.are_deterministic_algorithms_enabled()
        and torch.backends.cudnn.deterministic
        and not torch.backends.cudnn.benchmark
        and cublas_workspace_ok(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    )


def check_bf16(device: torch.device, precision: str, supported: bool | None = None) -> None:
    """A ConfigError before any worker starts if ``run.precision = "bf16"`` on a GPU without
    bfloat16 (``supported``: ``torch.cuda.is_bf16_supported()`` unless given)."""
    if precision != "bf16" or device.type != "cuda":
        return
    if supported is None:
        supported = torch.cuda.is_bf16_supported()
    if not supported:
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this GPU"
        raise ConfigError(f"run.precision = 'bf16' but {name} has no bfloat16 support (compute "
                          "capability 8.0 or newer is needed); use run.precision = 'fp32'")
