"""The Ray launcher (pipelocal/launch/ray.py) on a real local Ray instance: failures end the run
fast naming the stage, leave no actor, placement group or process; checkpoints move between
Ray and spawned stages; a ``ray job submit`` of a short run completes.

Bitwise exactness under Ray is a case of tests/test_transparency.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipelocal.config import ConfigError
from pipelocal.launch import PipelineError, train
from pipelocal.pipeline.faults import FAULT_ENV
from tests.conftest import (
    RAY_CPUS,
    REPO,
    assert_identical,
    checkpoint_tensors,
    interrupt_after_checkpoint,
    needs_ray,
    tiny_config,
)

pytestmark = needs_ray
on_cluster = pytest.mark.usefixtures("ray_cluster")


def _stage_actors() -> list[dict[str, str]]:
    import ray

    from pipelocal.launch.ray import ACTOR_PREFIX

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(ACTOR_PREFIX)]


def _live_groups() -> list[str]:
    import ray

    return [g for g, info in ray.util.placement_group_table().items()
            if info["state"] != "REMOVED"]


class _Watcher(threading.Thread):
    """Records the pid of every stage actor of the run; after epoch 1 optionally ray.kill()s one.

    ``epoch1_at``: when the first epoch record appeared (the faults are injected after it).
    """

    def __init__(self, run_dir: Path, stages: int, kill: int | None = None) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.stages, self.kill = run_dir, stages, kill
        self.pids: list[int] = []
        self.epoch1_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        import ray

        try:
            deadline = time.monotonic() + 240
            while len(_stage_actors()) < self.stages and time.monotonic() < deadline:
                time.sleep(0.2)
            handles = {int(a["name"].split("stage")[1].split("-")[0]):
                       ray.get_actor(a["name"], namespace=a["namespace"])
                       for a in _stage_actors()}
            self.pids = [ray.get(handles[r].info.remote(), timeout=60)["pid"]
                         for r in sorted(handles)]
            metrics = self.run_dir / "metrics.jsonl"
            while not metrics.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.epoch1_at = time.monotonic()
            if self.kill is not None:
                ray.kill(handles[self.kill], no_restart=True)
        except BaseException as exc:  # reported by the test
            self.error = exc


def _assert_nothing_left(pids: list[int]) -> None:
    assert _stage_actors() == [], "a stage actor was left alive"
    assert _live_groups() == [], "a placement group was left"
    deadline = time.monotonic() + 15
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _exists(p)]
        time.sleep(0.1)
    assert alive == [], f"stage actor processes still running: {alive}"


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


@pytest.mark.slow
@on_cluster
@pytest.mark.parametrize(
    ("fault", "kill", "expected"),
    [
        ("2:7:raise", None, ["stage 2", "during training at epoch 2/30, batch 3 (step 7)",
                             "injected fault in stage 2 at step 7", "original traceback",
                             "Traceback"]),
        ("1:7:kill", None, ["stage 1", "died", "Ray actor was lost", " was training at epoch 2/30",
                            "The last complete checkpoint is ", "step_00000005 (resume with"]),
        ("", 1, ["stage 1", "died", "Ray actor was lost"]),
    ],
    ids=["raise", "sigkill", "ray.kill"],
)
def test_stage_failure_ends_the_run_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, kill: int | None,
    expected: list[str],
) -> None:
    if fault:  # forwarded to the actors by the driver (PIPELOCAL_* variables)
        monkeypatch.setenv(FAULT_ENV, fault)
    cfg = tiny_config(tmp_path, "pipeline.stages=3", "pipeline.launcher=ray", "run.epochs=30",
                      "run.name=f")
    watcher = _Watcher(tmp_path / "f", 3, kill)
    watcher.start()
    with pytest.raises(PipelineError) as info:
        train(cfg)
    ended = time.monotonic()
    watcher.join(timeout=30)
    assert watcher.error is None, watcher.error
    message = str(info.value)
    for text in expected:
        assert text in message, message
    # The fault comes at step 7, two batches into epoch 2: the run ends seconds after it.
    assert watcher.epoch1_at is not None and ended - watcher.epoch1_at < 20, message
    assert len(watcher.pids) == 3
    _assert_nothing_left(watcher.pids)


@pytest.mark.slow
@on_cluster
def test_resume_across_backends(tmp_path: Path) -> None:
    """Written by 3 spawned stages, resumed under Ray (2 actors), which writes the checkpoint
    the single-process engine finishes from: bitwise the straight run."""
    straight = checkpoint_tensors(train(tiny_config(tmp_path / "ref", "pipeline.stages=1"))[
        "run_dir"])
    first = train(tiny_config(tmp_path / "a", "pipeline.stages=3", "run.max_steps=4"))
    assert first["step"] == 4
    on_ray = train(tiny_config(tmp_path / "a", "pipeline.stages=2", "pipeline.launcher=ray",
                               "run.max_steps=7"), resume=first["checkpoint"])
    assert on_ray["step"] == 7
    resumed = train(tiny_config(tmp_path / "a", "pipeline.stages=1"), resume=on_ray["checkpoint"])
    assert resumed["step"] == 10
    assert_identical(checkpoint_tensors(resumed["run_dir"]), straight)
    _assert_nothing_left([])


@on_cluster
def test_more_stages_than_cluster_cpus_fails_before_any_actor(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "pipeline.stages=3", "pipeline.launcher=ray",
                      "ray.cpus_per_stage=2")
    with pytest.raises(ConfigError, match=rf"need 6 CPUs .* the Ray cluster has {RAY_CPUS}"):
        train(cfg)
    assert not any(tmp_path.iterdir()), "no run directory is created for an invalid run"
    assert _stage_actors() == [] and _live_groups() == []


@pytest.mark.slow
@on_cluster
def test_driver_interrupt_checkpoints_and_leaves_no_actor(tmp_path: Path) -> None:
    """SIGINT to the ``ray submit`` entry point (launch/ray_train.py = ``pipelocal train
    --launcher ray``) joined to the running cluster: rank 0 checkpoints, the driver exits 130,
    no actor is left."""
    import ray

    from pipelocal.checkpoint import read_manifest

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "launch" / "ray_train.py"), "--stages", "2",
           "--set", f"run.out_dir={tmp_path}", "--set", "run.name=int",
           "--set", "run.epochs=500"]
    code, out = interrupt_after_checkpoint(cmd, tmp_path / "int", env=env, cwd=tmp_path)
    assert code == 130, out
    assert "stopped (interrupted)" in out, out
    assert f"at step {read_manifest(tmp_path / 'int')['step']};" in out, out
    _assert_nothing_left([])


@pytest.mark.slow
@on_cluster
def test_killed_driver_leaves_no_actor(tmp_path: Path) -> None:
    """SIGKILL of the driver: Ray ends the actors of its job (they are owned by the driver)."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipelocal", "train", "--launcher", "ray", "--stages", "2",
           "--set", f"run.out_dir={tmp_path}", "--set", "run.name=k", "--set", "run.epochs=500"]
    code, out = interrupt_after_checkpoint(cmd, tmp_path / "k", sig=signal.SIGKILL, env=env)
    assert code == -signal.SIGKILL, out
    deadline = time.monotonic() + 60
    while (_stage_actors() or _live_groups()) and time.monotonic() < deadline:
        time.sleep(0.5)
    _assert_nothing_left([])


@pytest.mark.slow
def test_a_killed_driver_leaves_nothing_of_its_local_instance(tmp_path: Path) -> None:
    """SIGKILL of a driver that started its own local Ray instance: its raylet, GCS and workers
    go with it, and so do the agents (ray::DashboardAgent, ray::RuntimeEnvAgent) that otherwise
    stayed 60-120 s, polling for a dead raylet and then waiting on the dead GCS."""
    from tests.test_supervision import _assert_all_gone, _descendants

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "pipelocal", "train", "--launcher", "ray", "--stages", "2",
           "--set", f"run.out_dir={tmp_path}", "--set", "run.name=own", "--set",
           "run.epochs=500", "--set", "run.progress=false", "--set", "data.train_limit=300"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    latest = tmp_path / "own" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    ray_processes = _descendants(proc.pid)
    agents = [p for p in ray_processes
              if b"Agent" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]]
    proc.kill()
    out = proc.communicate(timeout=30)[0]
    assert latest.exists(), out[-3000:]
    assert len(agents) >= 2, (agents, out[-3000:])  # DashboardAgent, RuntimeEnvAgent
    _assert_all_gone(ray_processes, within_s=20)


# --------------------------------------------------------------------------- ray job submit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path: Path) -> Any:
    """A separate `ray start --head --block` cluster; stopped by signalling that command, which
    takes its own processes down (`ray stop` would stop every Ray instance on the machine,
    including the session's)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent = _free_port(), _free_port(), _free_port()
    cmd = [shutil.which("ray") or "ray", "start", "--head", "--block", f"--port={gcs}",
           "--num-cpus=3", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
           "--disable-usage-stats"]
    head = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        yield head, f"http://127.0.0.1:{dashboard}", env
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=10)


@pytest.mark.slow
def test_ray_job_submit_runs_and_writes_its_run_directory(tmp_path: Path, ray_head: Any) -> None:
    head, address, env = ray_head
    out_dir = tmp_path / "runs"
    submit = [shutil.which("ray") or "ray", "job", "submit", "--address", address,
              "--runtime-env", "launch/ray_runtime_env.yaml", "--",
              "pipelocal", "train", "--launcher", "ray", "--stages", "2",
              "--set", "run.epochs=1", "--set", "data.train_limit=300",
              "--set", f"run.out_dir={out_dir}", "--set", "run.name=job"]
    deadline = time.monotonic() + 120
    while True:  # the job server and its agent answer some seconds after the head is up
        proc = subprocess.run(submit, capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=400)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or "submitted successfully" in out \
                or time.monotonic() > deadline or head.poll() is not None:
            break  # only a submission the server did not take is tried again
        time.sleep(2)
    print(out)  # pytest -rP shows it: the job's log, as the README quotes it
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    assert "pipelined over 2 stages" in out, out[-4000:]
    run = out_dir / "job"
    assert (run / "metrics.jsonl").exists() and (run / "checkpoints" / "latest").exists()


def test_cluster_yaml_is_valid_for_ray_up() -> None:
    """launch/ray_cluster.yaml passes the checks `ray up` makes (defaults filled, schema)."""
    import copy

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "launch" / "ray_cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert config["provider"]["type"] == "local"
    assert len(raw["provider"]["worker_ips"]) == config["max_workers"]
