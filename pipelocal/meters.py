"""What a stage measures of itself: compute time per step (CUDA events on GPU), epoch
statistics, and memory (peak allocated, reserved, NVML's per-process figure, or peak RSS).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pipelocal.determinism import deterministic_now

__all__ = [
    "StepTimer",
    "epoch_stats",
    "memory_stats",
    "nvml_process_mib",
    "nvml_uuid",
    "other_threads_cpu_s",
    "reset_memory_stats",
]


def nvml_uuid(torch_uuid: str) -> str:
    """NVML's UUID string for ``torch.cuda.get_device_properties(i).uuid``: NVML prefixes it
    with ``GPU-`` (MIG instances: ``MIG-``), torch prints it bare."""
    text = str(torch_uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


class StepTimer:
    """Compute time of a stage: CUDA events on GPU (kernels run asynchronously, so host clocks
    around a step measure only the launches), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            self._events.append((torch.cuda.Event(enable_timing=True),
                                 torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()  # on the current stream, after the work queued so far
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self._host_s += time.perf_counter() - self._t0

    def pop_seconds(self) -> float:
        """Total compute seconds since the last call; on CUDA a sync point (epoch end only)."""
        total = self._host_s
        if self._events:
            self._events[-1][1].synchronize()  # CPU-GPU sync point: the epoch's last step
            total += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0  # ms -> s
        self._host_s, self._events = 0.0, []
        return total


def epoch_stats(
    timer: StepTimer, t_start: float | None, samples: int, device: torch.device
) -> dict[str, float | int | bool | None]:
    """A stage's (or the single process's) epoch figures: compute time, wall time since the
    epoch's first batch, samples, throughput, determinism and peak memory. Pops the timer."""
    busy = timer.pop_seconds()  # on CUDA: a sync point, once per epoch
    wall = time.perf_counter() - (t_start or time.perf_counter())
    return {
        "busy(s)": round(busy, 4),
        "wall(s)": round(wall, 4),
        "samples": samples,
        "samples/s": round(samples / max(busy, 1e-9), 1),
        "deterministic": deterministic_now(),
        **memory_stats(device),
    }


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_FAULTS_AT_RESET = [_minor_faults()]


def reset_memory_stats(device: torch.device) -> None:
    """Start a new peak: CUDA allocator peaks, or on Linux the process's peak RSS (VmHWM);
    and a new count of the process's minor page faults."""
    _FAULTS_AT_RESET[0] = _minor_faults()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the peak resident set size (proc(5), clear_refs, Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the process lifetime


def nvml_process_mib(nvml: Any, uuid: str, pid: int) -> float | None:
    """Memory NVML reports for process ``pid`` on the GPU with ``uuid`` (MiB, the CUDA context
    included), current at the call; None if NVML does not list the process."""
    handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
    for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == pid and proc.usedGpuMemory is not None:
            return proc.usedGpuMemory / 2**20
    return None


def _nvml_now_mib(device: torch.device) -> float | None:
    """This process's memory on ``device`` now, by NVML; None where NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            # By UUID: a CUDA ordinal is an NVML index only without a CUDA_VISIBLE_DEVICES mask
            # (Ray, Slurm and containers set one), and NVML counts every GPU of the machine.
            uuid = nvml_uuid(str(torch.cuda.get_device_properties(index).uuid))
            return nvml_process_mib(pynvml, uuid, os.getpid())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML missing or not permitted in a container: report nothing, not 0
        return None


def other_threads_cpu_s() -> float | None:
    """CPU seconds (user + system) so far of this process's threads other than the one
    calling: on a stage, the transport's threads (gloo's) and the loader's prefetch thread,
    which run on the stage's cores; None without Linux's /proc."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    me, total_ns = threading.get_native_id(), 0
    for tid in tids:
        if int(tid) == me:
            continue
        try:  # nanoseconds on a CPU (stat's utime and stime count 10 ms ticks)
            total_ns += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # ended meanwhile, or no schedstat
            continue
    return total_ns / 1e9


def memory_stats(device: torch.device) -> dict[str, float | None]:
    """Peak memory since :func:`reset_memory_stats`, in MiB, under keys that carry their source;
    and the minor page faults since then (host memory faulted in: a step that reuses its
    memory faults none, see :mod:`pipelocal.hostmem`)."""
    faults = {"minor_faults": _minor_faults() - _FAULTS_AT_RESET[0]}
    if device.type == "cuda":
        return {**faults,
            "max_allocated(MiB)": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "max_reserved(MiB)": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
            # current at the epoch's end (NVML keeps no peak), CUDA context included
            "nvml_process(MiB)": _nvml_now_mib(device),
        }
    return {**faults, "peak_rss(MiB)": round(_peak_rss_kib() / 1024, 1)}


def _peak_rss_kib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])  # kB
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
