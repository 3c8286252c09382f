"""Memory figures of the headline benchmark: activations held for backward, model state, RSS, GPU.

* :class:`SavedTensorMeter` counts the bytes autograd holds for backward, through
  ``torch.autograd.graph.saved_tensors_hooks``: a tensor's storage counts from the moment the
  first op saves it until the last of its saved references is released (after backward, or
  when the graph is dropped). ``peak`` is the high-water mark, the figure local learning lowers.
  Storages are counted once however many ops save them, in full (a saved view keeps its whole
  storage alive), and parameters are left out (they are counted in :func:`state_bytes`).
* :func:`state_bytes`: parameter, gradient and optimiser-state bytes of some modules.
* :func:`peak_rss_mib`: this process's peak resident set size.
* :func:`gpu_memory`: ``torch.cuda.max_memory_allocated`` and NVML's used memory (per device and
  for this process), via ``nvidia-ml-py`` (import name ``pynvml``); ``None`` without a GPU.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn

__all__ = ["SavedTensorMeter", "gpu_memory", "peak_rss_mib", "state_bytes"]


class _Packed:
    """What autograd keeps instead of the tensor; releasing it releases the count."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, meter: SavedTensorMeter, key: int | None, tensor: torch.Tensor) -> None:
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """Live and peak bytes of the tensors autograd saves for backward inside ``with meter:``.

    ``exclude``: modules whose parameters (and buffers) are not activations. Bytes are those of
    the underlying storages, on any device.
    """

    def __init__(self, exclude: Iterable[nn.Module] = ()) -> None:
        self._skip = {
            t.untyped_storage().data_ptr()
            for m in exclude
            for t in [*m.parameters(), *m.buffers()]
        }
        self._refs: dict[int, int] = {}  # storage pointer -> saved references alive
        self._bytes: dict[int, int] = {}  # storage pointer -> its size in bytes
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _pack(self, t: torch.Tensor) -> _Packed:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._skip or storage.nbytes() == 0:
            return _Packed(self, None, t)
        if key not in self._refs:
            self._refs[key], self._bytes[key] = 0, storage.nbytes()
            self.live += self._bytes[key]
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        return _Packed(self, key, t)

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= self._bytes.pop(key)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hooks.__exit__(exc_type, exc, tb)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(
    modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer] = ()
) -> dict[str, int]:
    """Bytes of parameters, of their gradients (those allocated now) and of optimiser state."""
    params = [p for m in modules for p in m.parameters()]
    opt_state = sum(
        _nbytes(v)
        for opt in optimizers
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    return {
        "params(B)": sum(_nbytes(p) for p in params),
        "grads(B)": sum(_nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer(B)": opt_state,
    }


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_memory(device: torch.device) -> dict[str, Any] | None:
    """Peak allocated bytes (torch) and NVML's used bytes for the device and this process."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    out: dict[str, Any] = {"max_memory_allocated(B)": torch.cuda.max_memory_allocated(index)}
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        out["nvml"] = "nvidia-ml-py not installed (pip install nvidia-ml-py)"
        return out
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        out["nvml_device_used(B)"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        mine = [p.usedGpuMemory for p in procs if p.pid == os.getpid()]
        out["nvml_process_used(B)"] = int(mine[0]) if mine and mine[0] is not None else None
    finally:
        pynvml.nvmlShutdown()
    return out
