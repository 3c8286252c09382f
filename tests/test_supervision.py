"""Supervision with real processes and real signals: a killed launcher or torchrun agent leaves
no process behind, SIGTERM is a graceful stop that resumes bit for bit on any stage count, a
busy run directory is refused, a frozen stage is named, a NaN stops the run.

Each multi-process run here checks several things, to keep the suite fast on a small machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelocal.checkpoint import read_manifest, resolve_checkpoint
from pipelocal.cli import EXIT_INTERRUPTED, EXIT_NONFINITE, main
from pipelocal.launch import PipelineError, train
from pipelocal.launch.run_dir import lock_run_dir, release_run_dir
from pipelocal.pipeline.faults import FAULT_ENV
from tests.conftest import REPO, assert_identical, checkpoint_tensors, tiny_config, tiny_overrides

_WAIT_S = 600.0
"""Longest wait for a started run to write its first checkpoint (a loaded 2-core machine)."""


def _start(args: list[str], tmp_path: Path, name: str, *more: str) -> subprocess.Popen[str]:
    """``args`` (a launcher command) with the tiny run's settings, running 500 epochs."""
    sets = [*tiny_overrides(tmp_path), "run.epochs=500", f"run.name={name}", *more]
    cmd = args + [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO)


def _wait_for_checkpoint(proc: subprocess.Popen[str], run_dir: Path) -> None:
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + _WAIT_S
    while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not latest.exists():
        proc.kill()
        pytest.fail(f"no checkpoint was written; output:\n{proc.communicate(timeout=30)[0]}")


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by PID 1 has stopped computing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _assert_all_gone(pids: set[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {p for p in pids if _alive(p)}
    assert not left, f"processes left behind: {left}"


_PIPELOCAL = [sys.executable, "-m", "pipelocal", "train"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # seconds on a quiet machine; start-up alone took 4 min at load 24
def test_sigterm_checkpoints_stops_everything_and_resumes_on_3_and_1_stages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM to a 2-stage run: checkpoint at the current step, exit 130, no process left.

    Its checkpoint then resumes on 3 stages and on 1 without any extra flag (the automatic
    partition does not bind the resume), and both equal an uninterrupted run bit for bit.
    """
    proc = _start([*_PIPELOCAL, "--stages", "2"], tmp_path, "term")
    _wait_for_checkpoint(proc, tmp_path / "term")
    workers = _descendants(proc.pid)
    assert len(workers) >= 2, workers  # two stages (and multiprocessing's resource tracker)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "terminated (SIGTERM): writing a checkpoint" in out, out
    manifest = read_manifest(tmp_path / "term")
    assert f"stopped (interrupted) at step {manifest['step']};" in out, out
    _assert_all_gone(workers)
    assert manifest["partition_auto"] is True and manifest["stages"] == 2

    end = manifest["step"] + 6  # a few steps past the stop, across an epoch end
    for stages in (3, 1):
        copy = tmp_path / f"resumed{stages}"
        shutil.copytree(tmp_path / "term", copy)
        code = main(["train", "--resume", str(copy), "--stages", str(stages),
                     "--set", f"run.max_steps={end}"])
        assert code == 0, capsys.readouterr()
        assert read_manifest(copy)["step"] == end
    reference = train(tiny_config(tmp_path, "pipeline.stages=1", "run.epochs=500",
                                  f"run.max_steps={end}", "run.name=reference"))
    want = checkpoint_tensors(reference["run_dir"])
    for stages in (3, 1):
        assert_identical(checkpoint_tensors(tmp_path / f"resumed{stages}"), want,
                         f"resumed on {stages} stage(s)")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # seconds on a quiet machine; start-up alone took 4 min at load 24
def test_launcher_sigkill_leaves_no_worker_and_a_busy_run_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = _start([*_PIPELOCAL, "--stages", "2"], tmp_path, "busy")
    _wait_for_checkpoint(proc, tmp_path / "busy")

    # A second run with the same run.name is refused while the first one owns the directory.
    second = [f"--set={s}" for s in (*tiny_overrides(tmp_path), "run.name=busy")]
    assert main(["train", "--stages", "1", *second]) == 2
    err = capsys.readouterr().err
    assert f"run directory {tmp_path / 'busy'} is in use by another run (pid {proc.pid})" in err
    assert "choose another run.name" in err

    workers = _descendants(proc.pid)
    assert len(workers) >= 2, workers
    proc.kill()  # SIGKILL: no handler runs in the launcher
    proc.communicate(timeout=30)
    _assert_all_gone(workers)
    lock_run_dir(tmp_path / "busy")  # the dead run's lock died with it: nothing stale
    release_run_dir(tmp_path / "busy")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # seconds on a quiet machine; start-up alone took 4 min at load 24
def test_torchrun_agent_sigkill_leaves_no_worker(tmp_path: Path) -> None:
    agent = [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc-per-node", "2", "-m", "pipelocal", "train"]
    proc = _start(agent, tmp_path, "agent")
    _wait_for_checkpoint(proc, tmp_path / "agent")
    workers = _descendants(proc.pid)
    assert len(workers) >= 2, workers
    proc.kill()
    proc.communicate(timeout=30)
    _assert_all_gone(workers)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # seconds on a quiet machine; start-up alone took 4 min at load 24
def test_double_ctrl_c_is_an_abort_not_a_crash(tmp_path: Path) -> None:
    proc = _start([*_PIPELOCAL, "--stages", "2"], tmp_path, "twice")
    _wait_for_checkpoint(proc, tmp_path / "twice")
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals before the first is handled would count as one
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "without a result" not in out and "Traceback" not in out, out
    # Either the second Ctrl-C came first (abort) or the checkpoint did (a clean stop).
    assert "aborted by a second interrupt" in out or "stopped (interrupted)" in out, out
    _assert_all_gone(workers)
    resolve_checkpoint(tmp_path / "twice")  # the last complete checkpoint is still usable


_LINGER = """\
import atexit, os, time
if os.environ.pop("PIPELOCAL_TEST_LINGER", None):  # the launcher only, not its workers
    atexit.register(lambda: (print("lingering at exit", flush=True), time.sleep(60)))
"""


@pytest.mark.timeout(600)
def test_ctrl_c_after_the_outcome_keeps_its_exit_status(tmp_path: Path) -> None:
    """Two Ctrl-C pressed while a finished run shuts down (held there by an atexit hook) end it
    at once with the run's own status: no "writing a checkpoint", no KeyboardInterrupt ending
    the process by the signal."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_LINGER)
    sets = [*tiny_overrides(tmp_path), "run.epochs=1", "run.name=late"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{REPO}", "PYTHONUNBUFFERED": "1",
           "PIPELOCAL_TEST_LINGER": "1"}
    proc = subprocess.Popen([*_PIPELOCAL, *[x for s in sets for x in ("--set", s)]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("lingering at exit"):
            break
    assert lines and lines[-1].startswith("lingering at exit"), "".join(lines)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "writing a checkpoint" not in out, out
    assert "final test accuracy" in out, out


@pytest.mark.slow
@pytest.mark.timeout(1800)  # seconds on a quiet machine; start-up alone took 4 min at load 24
def test_frozen_last_stage_is_named_with_its_phase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last stage stops (SIGSTOP) at step 22, in the last of 5 epochs (after 4 evaluations
    and 4 checkpoints): it writes no report and is still alive when the others time out, so it
    is the one named, at the batch where it froze, not the stage that timed out first.
    (8 s: the workers fork in milliseconds, and the tiny model's waits are far shorter.)"""
    monkeypatch.setenv(FAULT_ENV, "1:22:hang")
    cfg = tiny_config(tmp_path, "pipeline.stages=2", "pipeline.partition=[2,2]",
                      "pipeline.timeout_s=8", "run.epochs=5")
    with pytest.raises(PipelineError) as info:
        train(cfg)
    message = str(info.value)
    # As the progress line counts: 5 batches per epoch, step 22 = epoch 5, batch 3.
    assert "stage 1 (rank 1, pid " in message, message
    assert "stopped answering, during training at epoch 5/5, batch 3 (step 22)" in message, \
        message
    assert "alive but silent" in message
    assert "The last complete checkpoint is " in message and "step_00000020" in message, message
    assert not message.startswith("stage 0"), message


@pytest.mark.slow
@pytest.mark.timeout(1800)  # seconds on a quiet machine; start-up alone took 4 min at load 24
def test_nan_in_a_pipeline_stops_naming_block_step_and_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stage 1's input becomes NaN at step 7 (epoch 2), after the checkpoint at step 5."""
    monkeypatch.setenv(FAULT_ENV, "1:7:nan")
    sets = [f"--set={s}" for s in (*tiny_overrides(tmp_path), "run.name=nan", "run.epochs=3",
                                   "pipeline.partition=[2,2]")]
    assert main(["train", "--stages", "2", *sets]) == EXIT_NONFINITE
    err = capsys.readouterr().err.strip()
    good = tmp_path / "nan" / "checkpoints" / "step_00000005"
    assert err.startswith("pipelocal: training diverged: the loss of block fc1 (block 2) became "
                          "non-finite at epoch 2/3, batch 3 (step 7);"), err
    assert f"the last good checkpoint is {good}" in err and "run.allow_nonfinite" in err, err
    assert len(err.splitlines()) == 1, err
    assert resolve_checkpoint(tmp_path / "nan") == good  # nothing non-finite was checkpointed


def test_errors_that_follow_another_stage_are_secondary() -> None:
    from pipelocal.launch.report import failure_report

    for text in ("Read error [127.0.0.1]:41667: Connection reset by peer",
                 "Connection closed by peer", "Timed out waiting 5000ms for recv"):
        assert failure_report(0, [], RuntimeError(text))["secondary"], text
    assert not failure_report(0, [], RuntimeError("injected fault in stage 2 at step 5"))[
        "secondary"]
