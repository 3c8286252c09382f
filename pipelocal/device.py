"""Where a stage runs and how its device is set up: placement, threads, determinism, timers, memory.

Every decision here that can be a pure function is one (:func:`auto_stages`, :func:`place_stage`,
:func:`cpu_threads`), so it is tested on CPU over a table of cases; the CUDA calls are few, each
commented with the documented PyTorch semantics it relies on.
"""

from __future__ import annotations

import os
import re
import resource
import time
from typing import Any

import torch

from pipelocal.config import Config, ConfigError

__all__ = [
    "CUBLAS_WORKSPACE",
    "StepTimer",
    "auto_stages",
    "check_bf16",
    "configure_determinism",
    "cpu_threads",
    "cublas_workspace_ok",
    "deterministic_now",
    "epoch_stats",
    "memory_stats",
    "nvml_process_mib",
    "nvml_uuid",
    "place_stage",
    "ray_gpu_index",
    "reset_memory_stats",
    "visible_gpus",
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


def visible_gpus(cfg: Config) -> int:
    """CUDA devices this process may use: 0 when ``run.device = "cpu"`` or none is visible."""
    return 0 if cfg.run.device == "cpu" else torch.cuda.device_count()


def auto_stages(
    *, requested: int, partition: int, gpus: int, num_blocks: int, is_global: bool
) -> tuple[int, str]:
    """The stage count (``pipeline.stages = 0`` = automatic) and why, for the run's first line.

    One stage per GPU, so that no two ranks of one NCCL communicator share a device (NCCL
    refuses that: "Duplicate GPU detected"); one GPU therefore means the single-process engine.
    On CPU, 2 stages. Never more stages than blocks; backprop rules always run in one process.
    """
    if requested:
        return requested, f"{requested} stage(s) as configured"
    if partition:
        return partition, f"{partition} stages, one per entry of pipeline.partition"
    if is_global:
        return 1, "1 stage: a backprop rule cannot be pipelined"
    if gpus:
        stages = min(gpus, num_blocks)
        return stages, f"{stages} stage(s), one per GPU ({gpus} visible)"
    stages = min(2, num_blocks)
    return stages, f"{stages} stages on CPU (no GPU visible)"


def place_stage(
    *, stages: int, gpus_per_node: int, nodes: int, local_rank: int, device: str
) -> torch.device:
    """The device of the stage with ``local_rank`` on its node, or a ConfigError saying what to do.

    ``device`` is ``run.device`` (auto, cpu, cuda). On GPUs each stage owns one device,
    ``cuda:<local_rank>``; an S that does not fit the GPUs fails here, before any process starts.
    """
    if device == "cpu" or (device == "auto" and gpus_per_node == 0):
        return torch.device("cpu")
    if gpus_per_node == 0:
        raise ConfigError("run.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if stages > gpus_per_node * nodes:
        raise ConfigError(
            f"pipeline.stages = {stages} but only {gpus_per_node * nodes} GPU(s) are visible "
            f"({nodes} node(s) x {gpus_per_node}); one stage needs one GPU (NCCL cannot put two "
            f"ranks on one device): use at most {gpus_per_node * nodes} stages, or "
            "run.device = 'cpu'"
        )
    if local_rank >= gpus_per_node:
        raise ConfigError(
            f"local rank {local_rank} has no GPU of its own: this node has {gpus_per_node} "
            f"GPU(s); start at most {gpus_per_node} processes per node (torchrun "
            f"--nproc-per-node {gpus_per_node})"
        )
    return torch.device("cuda", local_rank)


def cpu_threads(configured: int, stages_on_node: int, cores: int | None = None) -> int:
    """torch threads per stage: ``configured`` if > 0, else this process's cores // stages.

    Cores come from the CPU affinity mask (``os.sched_getaffinity``), which Slurm cgroups,
    ``taskset`` and container CPU sets restrict; ``os.cpu_count`` would oversubscribe them.
    """
    if configured:
        return configured
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    return max(1, cores // max(stages_on_node, 1))


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


def nvml_uuid(torch_uuid: str) -> str:
    """NVML's UUID string for ``torch.cuda.get_device_properties(i).uuid``: NVML prefixes it
    with ``GPU-`` (MIG instances: ``MIG-``), torch prints it bare."""
    text = str(torch_uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def ray_gpu_index(gpu_ids: list[Any], visible: str | None, noset: bool) -> int | None:
    """The CUDA ordinal of a Ray actor's GPU, or None without one.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's GPUs, so its GPU is ``cuda:0``. With
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` it does not, and the actor sees every GPU
    of its node: its GPU is the position of its Ray GPU id among the visible devices (Ray's
    ids are entries of the node's ``CUDA_VISIBLE_DEVICES`` when that is set, else ordinals).
    """
    if not gpu_ids:
        return None
    if not noset:
        return 0
    gpu = str(gpu_ids[0])
    if visible:
        entries = [e.strip() for e in visible.split(",")]
        if gpu not in entries:
            raise ConfigError(f"Ray gave this actor GPU {gpu}, which CUDA_VISIBLE_DEVICES = "
                              f"{visible!r} does not list")
        return entries.index(gpu)
    return int(gpu)


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


def reset_memory_stats(device: torch.device) -> None:
    """Start a new peak: CUDA allocator peaks, or on Linux the process's peak RSS (VmHWM)."""
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


def memory_stats(device: torch.device) -> dict[str, float | None]:
    """Peak memory since :func:`reset_memory_stats`, in MiB, under keys that carry their source."""
    if device.type == "cuda":
        return {
            "max_allocated(MiB)": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "max_reserved(MiB)": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
            # current at the epoch's end (NVML keeps no peak), CUDA context included
            "nvml_process(MiB)": _nvml_now_mib(device),
        }
    return {"peak_rss(MiB)": round(_peak_rss_kib() / 1024, 1)}


def _peak_rss_kib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])  # kB
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
