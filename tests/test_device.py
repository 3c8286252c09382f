"""Placement, thread counts, determinism flags, timers and memory readings: the pure parts of
running a stage on a device, tested on CPU over tables of cases."""

from __future__ import annotations

import os

import pytest
import torch

from pipelocal.config import ConfigError
from pipelocal.determinism import (
    CUBLAS_WORKSPACE,
    check_bf16,
    configure_determinism,
    cublas_workspace_ok,
    deterministic_now,
)
from pipelocal.device import auto_stages, cpu_threads, place_stage, ray_gpu_index, stage_cpus
from pipelocal.meters import (
    StepTimer,
    memory_stats,
    nvml_process_mib,
    nvml_uuid,
    reset_memory_stats,
)


@pytest.mark.parametrize(
    ("requested", "partition", "gpus", "blocks", "is_global", "stages", "why"),
    [
        (0, 0, 0, 4, False, 2, "2 stages on CPU (no GPU visible)"),
        (0, 0, 1, 4, False, 1, "1 stage(s), one per GPU (1 visible)"),
        (0, 0, 4, 4, False, 4, "4 stage(s), one per GPU (4 visible)"),
        (0, 0, 8, 4, False, 4, "4 stage(s), one per GPU (8 visible)"),  # never more than blocks
        (0, 0, 0, 1, False, 1, "1 stages on CPU (no GPU visible)"),
        (0, 3, 8, 8, False, 3, "3 stages, one per entry of pipeline.partition"),
        (0, 0, 4, 8, True, 1, "1 stage: a backprop rule cannot be pipelined"),
        (3, 0, 8, 8, False, 3, "3 stage(s) as configured"),
    ],
)
def test_auto_stages_table(requested: int, partition: int, gpus: int, blocks: int,
                           is_global: bool, stages: int, why: str) -> None:
    assert auto_stages(requested=requested, partition=partition, gpus=gpus, num_blocks=blocks,
                       is_global=is_global) == (stages, why)


@pytest.mark.parametrize(
    ("stages", "gpus", "nodes", "local_rank", "device", "expected"),
    [
        (2, 0, 1, 0, "auto", "cpu"),
        (2, 0, 1, 1, "auto", "cpu"),
        (4, 8, 1, 3, "cpu", "cpu"),  # run.device = cpu wins over visible GPUs
        (1, 1, 1, 0, "auto", "cuda:0"),
        (4, 4, 1, 3, "auto", "cuda:3"),
        (4, 4, 1, 2, "cuda", "cuda:2"),
        (8, 4, 2, 3, "auto", "cuda:3"),  # two nodes of 4: local rank picks the device
        (2, 8, 1, 1, "auto", "cuda:1"),
    ],
)
def test_place_stage_table(stages: int, gpus: int, nodes: int, local_rank: int, device: str,
                           expected: str) -> None:
    got = place_stage(stages=stages, gpus_per_node=gpus, nodes=nodes, local_rank=local_rank,
                      device=device)
    assert got == torch.device(expected)


@pytest.mark.parametrize(
    ("stages", "gpus", "nodes", "local_rank", "device", "message"),
    [
        (2, 1, 1, 0, "auto", "pipeline.stages = 2 but only 1 GPU(s) are visible"),
        (5, 4, 1, 0, "cuda", "use at most 4 stages, or run.device = 'cpu'"),
        (9, 4, 2, 0, "auto", "only 8 GPU(s) are visible (2 node(s) x 4)"),
        (8, 2, 4, 2, "auto", "local rank 2 has no GPU of its own: this node has 2 GPU(s)"),
        (1, 0, 1, 0, "cuda", "run.device = 'cuda' but no CUDA device is visible"),
    ],
)
def test_place_stage_refuses_shared_or_missing_gpus(
    stages: int, gpus: int, nodes: int, local_rank: int, device: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        place_stage(stages=stages, gpus_per_node=gpus, nodes=nodes, local_rank=local_rank,
                    device=device)
    assert message in str(info.value)


@pytest.mark.parametrize(("configured", "stages", "cores", "threads"),
                         [(0, 2, 2, 1), (0, 2, 8, 4), (0, 3, 2, 1), (3, 2, 2, 3), (0, 1, 6, 6)])
def test_cpu_threads(configured: int, stages: int, cores: int, threads: int) -> None:
    assert cpu_threads(configured, stages, cores) == threads


def test_cpu_threads_follow_the_affinity_mask() -> None:
    """Under a cgroup / taskset the mask, not os.cpu_count, says how many cores there are."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert cpu_threads(0, 1) == 1
        assert cpu_threads(0, 2) == 1
    finally:
        os.sched_setaffinity(0, before)
    assert cpu_threads(0, 1) == len(before)


@pytest.mark.parametrize(("local_rank", "local_world", "threads", "available", "cores"), [
    (0, 2, 1, [0, 1], {0}),
    (1, 2, 1, [1, 0], {1}),  # in core order, whatever the mask's order
    (1, 2, 2, [0, 1, 2, 3, 4, 5, 6, 7], {2, 3}),
    (2, 3, 1, [4, 9, 6], {9}),  # a cgroup's cores: the k-th of them, not core k
    (0, 4, 1, [0, 1], None),  # more stages than cores: the kernel shares them out
    (1, 2, 2, [0, 1, 2], None),  # 4 threads on 3 cores
    (0, 1, 2, [0, 1], None),  # its share is every core: nothing to bind
    (0, 1, 1, [0, 1], {0}),
])
def test_stage_cpus(local_rank: int, local_world: int, threads: int, available: list[int],
                    cores: set[int] | None) -> None:
    assert stage_cpus(local_rank, local_world, threads, available) == (
        None if cores is None else frozenset(cores))


def test_stage_cpus_refuses_a_rank_outside_its_world() -> None:
    with pytest.raises(ValueError, match="local rank 2 of 2"):
        stage_cpus(2, 2, 1, [0, 1])


def test_determinism_flags_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_determinism(torch.device("cuda", 0), True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.allow_tf32  # fp32 means IEEE float32 when deterministic
        assert not torch.backends.cuda.matmul.allow_tf32
        configure_determinism(torch.device("cuda", 0), False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.allow_tf32  # PyTorch's default
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other documented value
        configure_determinism(torch.device("cuda", 0), True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and deterministic_now()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "16:8")  # not a documented form: replaced
        configure_determinism(torch.device("cuda", 0), True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    finally:
        configure_determinism(torch.device("cpu"), False)
        torch.backends.cudnn.benchmark = False


@pytest.mark.parametrize(("value", "ok"), [(":4096:8", True), (":16:8", True),
                                           (":4096:2:16:8", True), ("", False), (None, False),
                                           ("4096:8", False), (":4096", False)])
def test_cublas_workspace_forms(value: str | None, ok: bool) -> None:
    assert cublas_workspace_ok(value) is ok


def test_bf16_is_checked_before_a_run() -> None:
    check_bf16(torch.device("cuda", 0), "bf16", supported=True)
    check_bf16(torch.device("cuda", 0), "fp32", supported=False)
    check_bf16(torch.device("cpu"), "bf16", supported=False)
    with pytest.raises(ConfigError, match=r"no bfloat16 support .* run.precision = 'fp32'"):
        check_bf16(torch.device("cuda", 0), "bf16", supported=False)


def test_nvml_is_asked_by_uuid_not_by_cuda_ordinal() -> None:
    """Under CUDA_VISIBLE_DEVICES=2,3 cuda:0 is NVML's GPU 2: only the UUID names it."""

    class Proc:
        def __init__(self, pid: int, used: int | None) -> None:
            self.pid, self.usedGpuMemory = pid, used

    class FakeNvml:
        def __init__(self) -> None:
            self.gpus = {"GPU-aaa": [Proc(7, 3 * 2**20)],
                         "GPU-bbb": [Proc(7, 5 * 2**20), Proc(8, None)]}

        def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
            return uuid

        def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Proc]:
            return self.gpus[handle]

    nvml = FakeNvml()
    assert nvml_uuid("bbb") == "GPU-bbb" and nvml_uuid("MIG-ccc") == "MIG-ccc"
    assert nvml_process_mib(nvml, nvml_uuid("bbb"), pid=7) == 5.0
    assert nvml_process_mib(nvml, "GPU-aaa", pid=7) == 3.0
    assert nvml_process_mib(nvml, "GPU-bbb", pid=8) is None
    assert nvml_process_mib(nvml, "GPU-aaa", pid=9) is None


@pytest.mark.parametrize(("ids", "visible", "noset", "index"), [
    ([], None, False, None),  # no GPU
    ([3], "3", False, 0),  # Ray masked CUDA_VISIBLE_DEVICES to the actor's GPU
    ([3], None, True, 3),  # every GPU visible: the id is the ordinal
    ([5], "4,5,6,7", True, 1),  # the node's own mask: the id's position in it
    (["GPU-x"], "GPU-w,GPU-x", True, 1),  # UUIDs in the mask
])
def test_ray_actor_gpu(ids: list, visible: str | None, noset: bool, index: int | None) -> None:
    assert ray_gpu_index(ids, visible, noset) == index


def test_ray_actor_gpu_outside_the_mask_is_an_error() -> None:
    with pytest.raises(ConfigError, match="GPU 2, which CUDA_VISIBLE_DEVICES = '0,1'"):
        ray_gpu_index([2], "0,1", True)


def test_step_timer_sums_host_time_on_cpu() -> None:
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        timer.start()
        torch.ones(256, 256) @ torch.ones(256, 256)
        timer.stop()
    total = timer.pop_seconds()
    assert 0 < total < 5
    assert timer.pop_seconds() == 0.0  # popped: the next epoch starts from zero


def test_peak_rss_resets_per_epoch() -> None:
    """The peak covers one epoch, not the process lifetime (profiling, earlier epochs)."""
    reset_memory_stats(torch.device("cpu"))
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak_with = memory_stats(torch.device("cpu"))["peak_rss(MiB)"]
    del big
    reset_memory_stats(torch.device("cpu"))
    peak_after = memory_stats(torch.device("cpu"))["peak_rss(MiB)"]
    assert peak_with is not None and peak_after is not None
    assert peak_with - peak_after > 40, (peak_with, peak_after)


_BIND_SCRIPT = """
import json, os, sys, threading
from pipelocal.config import load_config
from pipelocal.pipeline.worker import configure_rank
cfg = load_config(None, ["run.device='cpu'", f"pipeline.bind_cpus={sys.argv[3]}"])
started = threading.Event()
threading.Thread(target=started.wait, daemon=True).start()  # a thread from before the binding
configure_rank(cfg, world=2, local_rank=int(sys.argv[1]), local_world=2, nodes=1,
               bind_cpus=sys.argv[2] == "1")
print(json.dumps([sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("local_rank", "launcher_binds", "configured", "bound"), [
    (0, True, "true", True), (1, True, "true", True),
    (1, False, "true", False),  # Ray: its actors are placed by Ray
    (1, True, "false", False),
])
def test_a_cpu_stage_process_binds_every_thread_to_its_own_core(
        local_rank: int, launcher_binds: bool, configured: str, bound: bool) -> None:
    """configure_rank in a fresh process, rank `local_rank` of 2 stages of one thread each."""
    import json
    import subprocess
    import sys

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 cores")
    out = subprocess.run(
        [sys.executable, "-c", _BIND_SCRIPT, str(local_rank), "1" if launcher_binds else "0",
         configured],
        capture_output=True, text=True, timeout=100, check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    masks = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(masks) >= 2  # the main thread and the one started before
    expected = [cores[local_rank]] if bound else cores
    assert all(mask == expected for mask in masks), masks


def test_other_threads_cpu_counts_the_other_threads_not_this_one() -> None:
    """A stage's transport and prefetch threads run on its cores: their CPU time is counted,
    to the nanosecond (/proc/self/task/*/schedstat), without the calling thread's own."""
    import threading
    import time

    from pipelocal.meters import other_threads_cpu_s

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    before = other_threads_cpu_s()
    assert before is not None
    spin(0.2)  # this thread: not counted
    mine = other_threads_cpu_s()
    assert mine is not None and mine - before < 0.1
    worker = threading.Thread(target=spin, args=(0.2,))
    worker.start()
    time.sleep(0.05)
    during = other_threads_cpu_s()  # the thread is alive: read while it runs
    worker.join(timeout=30)
    assert during is not None and during - mine > 0.01
