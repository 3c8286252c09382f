"""Failure behaviour: validated before any worker starts; any worker failure ends the run fast,
with one error naming the stage, the batch and the original traceback, and no process left."""

from __future__ import annotations

import errno
import multiprocessing.context
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelocal.checkpoint import read_manifest, resolve_checkpoint
from pipelocal.cli import main
from pipelocal.config import ConfigError
from pipelocal.launch import PipelineError, train
from pipelocal.pipeline.faults import FAULT_ENV
from tests.conftest import interrupt_after_checkpoint, tiny_config


def _workers() -> set[int]:
    """PIDs of the pipeline workers this process started: its children, and the children of its
    forkserver (the workers fork from it), but not the forkserver itself nor multiprocessing's
    resource tracker (both shared by every run of this process)."""
    children: dict[int, list[tuple[int, bytes]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append((int(entry.name), cmd))
    out = set()
    for pid, cmd in children.get(os.getpid(), []):
        if b"multiprocessing.forkserver" in cmd:
            out.update(child for child, _ in children.get(pid, []))
        elif b"resource_tracker" not in cmd:
            out.add(pid)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("2:5:raise", ["stage 2", "failed during training at epoch 2/3, batch 1 (step 5)",
                       "injected fault in stage 2 at step 5", "original traceback",
                       "Traceback"]),
        ("1:5:kill", ["stage 1", "SIGKILL", "during training at epoch 2/3, batch 1 (step 5)",
                      "The last complete checkpoint is ", "step_00000005 (resume with"]),
        ("1:2:kill", ["stage 1", "SIGKILL", "during training at epoch 1/3, batch 3 (step 2)",
                      "No complete checkpoint was written, so the run has to start again"]),
    ],
)
def test_worker_failure_stops_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, expected: list[str]
) -> None:
    before = _workers()
    monkeypatch.setenv(FAULT_ENV, fault)
    cfg = tiny_config(tmp_path, "pipeline.stages=3", "run.epochs=3")
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as info:
        train(cfg)
    elapsed = time.monotonic() - t0
    message = str(info.value)
    for text in expected:
        assert text in message, message
    assert "still usable" not in message, message  # said only of a checkpoint that exists
    assert elapsed < 45, f"failure took {elapsed:.1f} s to surface"  # includes 3 worker start-ups
    assert _workers() - before == set(), "a worker process was left behind"


@pytest.mark.slow
def test_failure_after_checkpoint_leaves_it_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch 1 ends with a checkpoint at step 5; a crash at step 7 must not damage it."""
    monkeypatch.setenv(FAULT_ENV, "1:7:kill")
    cfg = tiny_config(tmp_path, "pipeline.stages=2", "run.name=crash")
    with pytest.raises(PipelineError):
        train(cfg)
    ckpt = resolve_checkpoint(tmp_path / "crash")
    assert ckpt.name == "step_00000005"
    monkeypatch.delenv(FAULT_ENV)
    resumed = train(tiny_config(tmp_path, "pipeline.stages=2"), resume=tmp_path / "crash")
    assert resumed["step"] == 10


@pytest.fixture
def no_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object) -> None:
        raise AssertionError("a worker process was started before validation failed")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", refuse)


@pytest.mark.usefixtures("no_spawn")
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["pipeline.stages=2", "pipeline.partition=[1,1]"],
         "pipeline.partition = [1, 1] assigns 2 blocks but the model has 4 (conv1, conv2, fc1, "
         "out); give 2 counts >= 1 that sum to 4"),
        (["pipeline.stages=5"], "pipeline.stages = 5 but model cnn has only 4 blocks"),
        (["pipeline.stages=2", "rule.name=glob"],
         "rule.name = 'glob' backpropagates through the whole model, so it cannot run as a "
         "pipeline"),
        (["pipeline.stages=2", "pipeline.partition=[2,2]", "model.input_shape=[1,16,16]"],
         "stage 0 expects input [2, 1, 16, 16] but the data loader sends [2, 1, 8, 8]"),
    ],
)
def test_bad_pipeline_configs_fail_before_any_worker(
    tmp_path: Path, overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        train(tiny_config(tmp_path, *overrides))
    assert expected in str(info.value)
    assert not any(tmp_path.iterdir()), "no run directory is created for an invalid run"


def test_stage_shape_mismatch_between_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose blocks do not chain is caught by the dry run, naming both stages."""
    import dataclasses

    import pipelocal.launch.preflight as run_mod
    import pipelocal.runspec as runspec_mod

    real = runspec_mod.build_model

    def broken(cfg, in_shape, num_classes):  # block 2 declares a wrong input shape
        specs = real(cfg, in_shape, num_classes)
        specs[2] = dataclasses.replace(specs[2], in_shape=(17,))
        return specs

    monkeypatch.setattr(runspec_mod, "build_model", broken)
    spec = run_mod.resolve(tiny_config(tmp_path, "pipeline.stages=2"))
    with pytest.raises(ConfigError) as info:
        run_mod.dry_run(spec, [2, 2])
    assert "stage 1 expects input [2, 17] but stage 0 sends [2, 16, 2, 2]" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1])  # 2 stages: the SIGTERM test in test_supervision.py
def test_ctrl_c_checkpoints_and_stops(tmp_path: Path, stages: int) -> None:
    """SIGINT to `pipelocal train`: checkpoint at the current step, exit 130, resumable."""
    import sys

    from pipelocal.checkpoint import read_manifest

    cmd = [sys.executable, "-m", "pipelocal", "train", "--stages", str(stages),
           "--set", f"run.out_dir={tmp_path}", "--set", "run.name=int",
           "--set", "run.progress=false", "--set", "run.epochs=500"]
    code, out = interrupt_after_checkpoint(cmd, tmp_path / "int")
    assert code == 130, out  # "interrupted", not success
    assert "stopped (interrupted)" in out, out
    manifest = read_manifest(tmp_path / "int")
    assert f"at step {manifest['step']};" in out
    assert 0 < manifest["step"] < 500 * 12


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_one_gpu_plans_one_stage_and_says_so(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelocal.launch.preflight import Placement, resolve

    _fake_gpus(monkeypatch, 1)
    spec = resolve(tiny_config(tmp_path), placement=Placement(gpus_per_node=1))
    assert spec.cfg.pipeline.stages == 1
    assert spec.note == "1 stage(s), one per GPU (1 visible)"


def test_no_gpu_plans_the_two_stage_cpu_pipeline(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelocal.launch.preflight import resolve

    _fake_gpus(monkeypatch, 0)  # as with CUDA_VISIBLE_DEVICES=""
    spec = resolve(tiny_config(tmp_path))
    assert (spec.cfg.pipeline.stages, spec.note) == (2, "2 stages on CPU (no GPU visible)")


@pytest.mark.usefixtures("no_spawn")
def test_more_stages_than_gpus_fails_before_any_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"pipeline\.stages = 2 but only 1 GPU"):
        train(tiny_config(tmp_path, "pipeline.stages=2"))
    assert not any(tmp_path.iterdir())


def test_spawn_and_torchrun_place_every_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both launchers go through place_stage: the spawn path for every rank before it starts
    them (then again in each worker), torchrun's rank 0 in its validation and every torchrun
    rank in its worker body (here a 1-rank job, in this process)."""
    import signal

    import pipelocal.device
    import pipelocal.launch.preflight as prepare_mod
    import pipelocal.pipeline.worker as worker_mod
    from pipelocal.launch.preflight import Placement, resolve
    from pipelocal.launch.torchrun import torchrun_worker

    calls: list[tuple[int, int]] = []

    def spy(**kw: object) -> torch.device:
        calls.append((kw["stages"], kw["local_rank"]))  # type: ignore[arg-type]
        return pipelocal.device.place_stage(**kw)  # type: ignore[arg-type]

    monkeypatch.setattr(prepare_mod, "place_stage", spy)
    monkeypatch.setattr(worker_mod, "place_stage", spy)
    _fake_gpus(monkeypatch, 2)
    resolve(tiny_config(tmp_path, "pipeline.stages=2", "run.device=cpu"),
            placement=Placement(gpus_per_node=2))
    assert calls == [(2, 0), (2, 1)]

    calls.clear()
    _fake_gpus(monkeypatch, 0)
    port = torch.distributed.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False).port
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port + 1)}.items():
        monkeypatch.setenv(key, value)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = torchrun_worker(tiny_config(tmp_path, "run.epochs=1", "run.max_steps=2"), None)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert result is not None and result["step"] == 2
    assert calls == [(1, 0), (1, 0)]  # rank 0's validation, then its worker body


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [True, False])
def test_determinism_flags_are_set_in_every_worker(tmp_path: Path, deterministic: bool) -> None:
    import json

    result = train(tiny_config(tmp_path, "pipeline.stages=2", "run.epochs=1",
                               f"run.deterministic={str(deterministic).lower()}"))
    record = json.loads((Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert record["stage0/deterministic"] is deterministic
    assert record["stage1/deterministic"] is deterministic


def test_ray_launcher_without_ray_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.delitem(sys.modules, "pipelocal.launch.ray", raising=False)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ray\]"'):
        train(tiny_config(tmp_path, "pipeline.launcher=ray"))
    assert not any(tmp_path.iterdir())


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 3 MB tmpfs (root can mount one): room for two checkpoints of a 1.2 MB model, not three.
    Where it cannot be mounted, None: the test injects ENOSPC at the write instead."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):  # no mount command
        mounted = False
    yield disk if mounted else None
    if mounted:
        subprocess.run(["umount", str(disk)], check=True)


def _third_write_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback: the fsync of the third checkpoint's first block file says ENOSPC."""
    import pipelocal.checkpoint as ck

    real, calls = ck.os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2 * 6 + 1:  # per checkpoint: 4 block files, manifest.json, latest
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(ck.os, "fsync", fsync)


def test_full_disk_is_one_line_keeps_the_last_checkpoint_and_resumes(
    tmp_path: Path, small_disk: Path | None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sets = ["model.name=mlp", "model.hidden=128", "data.train_limit=300", "data.batch_size=64",
            "run.epochs=5", "run.progress=false", "run.name=full", "pipeline.timeout_s=60",
            "pipeline.threads_per_stage=1", "run.threads=1"]
    if small_disk is not None:  # the real thing: two spawned stages on a full tmpfs
        out, stages = small_disk, ["--stages", "2", "--set", "pipeline.partition=[2,2]"]
    else:
        out, stages = tmp_path / "out", ["--stages", "1"]
        _third_write_fails(monkeypatch)
    args = ["train", *stages, *(f"--set={s}" for s in [*sets, f"run.out_dir={out}"])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    run = out / "full"
    ckpts = run / "checkpoints"
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"pipelocal: no space left on device in {ckpts / 'step_00000015'}: "
                          "block_00"), err
    assert re.search(r"needs [\d,]+ bytes, [\d,]+ are free \(checkpoint step_00000015, after "
                     r"epoch 3/5, batch 5 \(step 14\)\); the incomplete checkpoint was removed",
                     err), err
    assert f"the last complete checkpoint is {ckpts / 'step_00000010'} (resume with" in err, err
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000005",
                                                        "step_00000010"]
    monkeypatch.undo()
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)  # on a disk with room, the last complete checkpoint goes on
    assert main(["train", "--resume", str(moved), "--stages", "1",
                 "--set=pipeline.partition=[]"]) == 0
    assert read_manifest(moved)["step"] == 25


def test_the_forkserver_preload_never_touches_cuda() -> None:
    """Workers fork from a server that imported the spawn module; a child of a process that
    initialised CUDA (even by asking for the device count: cuInit) cannot use CUDA, so that
    import must make no CUDA call. Checked in a fresh interpreter whose CUDA entry points
    record every call."""
    import sys

    from pipelocal.launch.spawn import START_METHOD, preload_modules

    assert START_METHOD == "forkserver"
    probe = (
        "import torch, torch.cuda\n"
        "calls = []\n"
        "def spy(name):\n"
        "    def f(*a, **k):\n"
        "        calls.append(name)\n"
        "        raise RuntimeError(name)\n"
        "    return f\n"
        "for name in ('device_count', 'is_available', 'init', '_lazy_init', 'current_device',\n"
        "             'get_device_properties', 'set_device', 'is_bf16_supported'):\n"
        "    setattr(torch.cuda, name, spy(name))\n"
        "torch._C._cuda_getDeviceCount = spy('_cuda_getDeviceCount')\n"
        f"for module in {preload_modules()!r}:\n"
        "    __import__(module)\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('calls', calls)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "calls []" in out.stdout, out.stdout
