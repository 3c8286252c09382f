"""The scripts in launch/: their --dry-run checks, and the multi-node path proven on one host.

Two "nodes" here are a Slurm job on this host (stand-ins for srun and scontrol): each runs
``launch/torchrun.sh`` with its node index, with a c10d rendezvous on 127.0.0.1; their
checkpoint must equal the spawned ``--stages 2`` run's bit for bit, as any pipelined run equals
the single-process one (tests/test_transparency.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelocal.checkpoint import read_manifest
from pipelocal.cli import EXIT_INTERRUPTED
from pipelocal.config import to_toml
from pipelocal.launch import train
from tests.conftest import REPO, assert_identical, checkpoint_tensors, tiny_config

TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SLURM_SBATCH = REPO / "launch" / "slurm.sbatch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**variables: str) -> dict[str, str]:
    """The scripts' variables, this interpreter and this checkout; no stray launch settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "NODE_RANK", "STAGES", "STAGES_PER_NODE", "MASTER_ADDR",
                        "MASTER_PORT", "LOCAL_ADDR", "RDZV_ID", "REPLICAS")
           and not k.startswith("SLURM_")}
    return {**env, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            **variables}


def _script(script: Path, *args: str, timeout: float = 120, **variables: str):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(**variables), cwd=REPO)


def _tiny_toml(tmp_path: Path, *overrides: str) -> Path:
    """tiny_config as a file the scripts can pass on (--config)."""
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(tiny_config(tmp_path / "runs", *overrides)))
    return path


# --------------------------------------------------------------------------- --dry-run


@pytest.mark.parametrize(
    ("script", "variables"),
    [(TORCHRUN_SH, {"STAGES": "4"}),
     (TORCHRUN_SH, {"NNODES": "2", "STAGES_PER_NODE": "2"}),
     (SLURM_SBATCH, {"NNODES": "2", "STAGES_PER_NODE": "2"}),
     (SLURM_SBATCH, {"SLURM_NNODES": "4", "SLURM_GPUS_ON_NODE": "1"})],
)
def test_dry_run_checks_the_whole_job_without_training(
    tmp_path: Path, script: Path, variables: dict[str, str]
) -> None:
    config = _tiny_toml(tmp_path, "pipeline.partition=[1,1,1,1]")
    proc = _script(script, "--dry-run", "--config", str(config), **variables)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run OK: cnn on digits, 4 stage(s), partition [1, 1, 1, 1]" in proc.stdout
    assert "stage 3: out  in [32] -> out [10]" in proc.stdout
    assert not (tmp_path / "runs").exists()  # no run directory: nothing was trained


@pytest.mark.parametrize(
    ("script", "variables"),
    [(TORCHRUN_SH, {"STAGES": "4", "REPLICAS": "2"}),
     (SLURM_SBATCH, {"NNODES": "2", "STAGES_PER_NODE": "4", "REPLICAS": "2"})],
)
def test_dry_run_knows_the_replicas(tmp_path: Path, script: Path,
                                    variables: dict[str, str]) -> None:
    """REPLICAS pipelines share the job's processes: 8 of them make 2 x 4 stages."""
    config = _tiny_toml(tmp_path, "pipeline.partition=[1,1,1,1]")
    proc = _script(script, "--dry-run", "--config", str(config), **variables)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 stage(s), partition [1, 1, 1, 1], 2 replicas" in proc.stdout


@pytest.mark.parametrize("script", [TORCHRUN_SH, SLURM_SBATCH])
def test_processes_not_a_multiple_of_the_replicas_are_refused(tmp_path: Path,
                                                              script: Path) -> None:
    proc = _script(script, "--dry-run", NNODES="3", STAGES_PER_NODE="1", REPLICAS="2")
    assert proc.returncode == 2
    assert "3 processes cannot form REPLICAS=2 pipelines" in proc.stderr


@pytest.mark.parametrize("script", [TORCHRUN_SH, SLURM_SBATCH])
def test_dry_run_rejects_a_partition_that_misses_blocks(tmp_path: Path, script: Path) -> None:
    config = _tiny_toml(tmp_path, "pipeline.partition=[1,1]")  # 2 of the 4 blocks
    proc = _script(script, "--dry-run", "--config", str(config),
                   NNODES="2", STAGES_PER_NODE="1")
    assert proc.returncode == 2
    assert "pipeline.partition = [1, 1] assigns 2 blocks but the model has 4" in proc.stderr


def test_dry_run_rejects_more_stages_than_blocks(tmp_path: Path) -> None:
    proc = _script(TORCHRUN_SH, "--dry-run", "--config", str(_tiny_toml(tmp_path)),
                   NNODES="3", STAGES_PER_NODE="2")
    assert proc.returncode == 2
    assert "pipeline.stages = 6 but model cnn has only 4 blocks" in proc.stderr


def test_slurm_without_gpus_asks_for_stages_per_node(tmp_path: Path) -> None:
    # No SLURM_GPUS_ON_NODE and no nvidia-smi on PATH: the script cannot guess a stage count.
    proc = _script(SLURM_SBATCH, "--dry-run", PATH="/usr/bin:/bin")
    assert proc.returncode == 2
    assert "set STAGES_PER_NODE" in proc.stderr


# --------------------------------------------------------------------------- torchrun, for real


_FAKE_SRUN = """#!/usr/bin/env bash
# srun on one host: one task per "node" (SLURM_NODEID 0 .. SLURM_NNODES-1), the highest status
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
code=0
for p in "${pids[@]}"; do c=0; wait "$p" || c=$?; ((c > code)) && code=$c; done
exit $code
"""


@pytest.mark.slow
def test_slurm_job_of_two_nodes_equals_spawned_pipeline(tmp_path: Path) -> None:
    """launch/slurm.sbatch as a Slurm job of two "nodes" on this host (srun and scontrol
    stand-ins): each node runs launch/torchrun.sh, the c10d rendezvous joins them, and the
    result is bitwise the spawned pipeline's, with point-to-point ops in NCCL's order."""
    spawned = train(tiny_config(tmp_path / "spawn", "pipeline.stages=2",
                                "pipeline.partition=[2,2]"))
    config = _tiny_toml(tmp_path, "pipeline.partition=[2,2]")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(_FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    job = f"test{os.getpid()}"
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2", SLURM_JOB_ID=job,
               SLURM_JOB_NODELIST="node[0-1]", SLURM_SUBMIT_DIR=str(REPO),
               STAGES_PER_NODE="1", MASTER_PORT=str(_free_port()), LOCAL_ADDR="127.0.0.1",
               PIPELOCAL_NCCL_ORDER="1")
    proc = subprocess.Popen(["bash", str(SLURM_SBATCH), "--config", str(config)], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:  # a hung node must not outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, out[-3000:]
    assert "pipelined over 2 stages" in out
    assert_identical(checkpoint_tensors(tmp_path / "runs" / f"slurm-{job}"),
                     checkpoint_tensors(spawned["run_dir"]))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_torchrun_script_exits_130_after_a_stop_signal_and_says_so_once(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM to the script (as Kubernetes or Slurm's batch step sends it), or Ctrl-C to its
    process group (a terminal): rank 0 checkpoints, and the job exits 130, not torchrun's 1;
    the stop notice is printed once, by rank 0."""
    config = _tiny_toml(tmp_path, "pipeline.partition=[2,2]", "run.name=stop", "run.epochs=500")
    proc = subprocess.Popen(["bash", str(TORCHRUN_SH), "--config", str(config)],
                            env=_env(STAGES="2"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run = tmp_path / "runs" / "stop"
    try:
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "latest").exists() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate(timeout=30)[0][-3000:]
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does
        else:
            proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:]
    name = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert out.count(f"{name}: writing a checkpoint, then stopping") == 1, out[-3000:]
    step = read_manifest(run)["step"]
    assert f"stopped (interrupted) at step {step};" in out, out[-3000:]
