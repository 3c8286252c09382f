"""Before a run trains: Ctrl-C during set-up, damaged checkpoints, a finished run's name,
what a resume inherits (run-directory ownership is in ``tests/test_run_dir.py``). One process
each, with real signals and files."""

from __future__ import annotations

import json
import multiprocessing.context
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import tomllib

import pipelocal.launch as launch_mod
import pipelocal.launch.preflight as checks_mod
from pipelocal.checkpoint import block_file, read_manifest, resolve_checkpoint
from pipelocal.cli import EXIT_INTERRUPTED, EXIT_NONFINITE, main
from pipelocal.config import ConfigError
from pipelocal.launch import train
from pipelocal.launch.preflight import resume_config
from tests.conftest import tiny_config, tiny_overrides


@pytest.fixture
def no_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object) -> None:
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", refuse)


def _sets(tmp_path: Path, *more: str) -> list[str]:
    return [f"--set={s}" for s in (*tiny_overrides(tmp_path), *more)]


@pytest.mark.usefixtures("no_spawn")
@pytest.mark.parametrize(("presses", "expected"), [
    (1, "stopped during set-up, before training started"),
    (2, "aborted by a second interrupt"),
])
def test_ctrl_c_during_set_up_stops_before_any_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    presses: int, expected: str,
) -> None:
    """Real SIGINTs to this process while the run validates its pipeline (before spawning)."""
    real = checks_mod.validate

    def validate_with_ctrl_c(*args: Any, **kw: Any) -> list[int]:
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(checks_mod, "validate", validate_with_ctrl_c)
    assert main(["train", "--stages", "2", *_sets(tmp_path, "run.name=early")]) \
        == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "early" / "checkpoints").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch single-process run: complete checkpoints at steps 5 and 10."""
    tmp = tmp_path_factory.mktemp("finished")
    result = train(tiny_config(tmp, "pipeline.stages=1", "run.name=done"))
    return Path(result["run_dir"])


def _flip_64_bytes(path: Path) -> None:
    """Damage a file in place: 64 bytes in its middle inverted, its size unchanged."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["manifest", "block", "flipped"])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_damaged_latest_checkpoint_names_the_file_and_offers_the_older_one(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str,
    command: str,
) -> None:
    """Truncated, overwritten, or damaged in place with its size unchanged (only the manifest's
    sha256 tells): one line naming the file and the newest checkpoint that verifies."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    latest = run / "checkpoints" / "step_00000010"
    bad = latest / "manifest.json" if damage == "manifest" else block_file(latest, 1)
    if damage == "flipped":
        size = bad.stat().st_size
        _flip_64_bytes(bad)
        assert bad.stat().st_size == size
    else:
        bad.write_bytes(b"\x00garbage{")
    args = ["train", "--resume", str(run)] if command == "train" else ["eval", str(run)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"checkpoint file {bad} is damaged" in err, err
    if damage == "flipped":
        assert "differs from the" in err and "recorded in manifest.json" in err, err
    assert f"resume from it with --resume {run / 'checkpoints' / 'step_00000005'}" in err, err


@pytest.mark.parametrize("break_it", ["manifest deleted", "latest dangles"])
def test_a_lost_newest_checkpoint_offers_the_older_complete_one(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], break_it: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    if break_it == "manifest deleted":
        (run / "checkpoints" / "step_00000010" / "manifest.json").unlink()
    else:
        shutil.rmtree(run / "checkpoints" / "step_00000010")  # latest still names it
    for args in (["train", "--resume", str(run)], ["eval", str(run)]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "latest names step_000000" in err, err
        assert f"resume from it with --resume {run / 'checkpoints' / 'step_00000005'}" in err, err


@pytest.mark.usefixtures("no_spawn")
def test_a_checkpoint_of_another_model_is_a_one_line_error_naming_the_file(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The manifest's config edited (model.fc_width 32 -> 48) to resume with a changed model:
    the block files do not fit it. Refused before any worker, without a load_state_dict
    traceback; the spawn and the single-process path alike."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for step in ("step_00000005", "step_00000010"):
        manifest = run / "checkpoints" / step / "manifest.json"
        data = json.loads(manifest.read_text())
        data["config"]["model"]["fc_width"] = 48
        manifest.write_text(json.dumps(data))
    bad = run / "checkpoints" / "step_00000005"  # epoch 1 of 2: there is training left
    for stages in ("1", "2"):
        assert main(["train", "--resume", str(bad), "--stages", stages]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"checkpoint file {bad / 'block_000.pt'} does not fit block 0 (conv1)" not in err
        assert re.search(rf"checkpoint file {bad}/block_00\d\.pt does not fit block \d", err), err
        assert f"described by {bad / 'manifest.json'}" in err and "size mismatch" in err, err


@pytest.mark.usefixtures("no_spawn")
def test_a_finished_name_is_refused_for_a_new_run_unless_overwritten(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reusing a finished run's name: refused (on any stage count, before any worker), naming
    the directory and the two ways on; --overwrite replaces it, leaving only the new run."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out / "done")
    run = out / "done"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for stages in ("1", "2"):
        assert main(["train", "--stages", stages,
                     *_sets(tmp_path, f"run.out_dir={out}", "run.name=done", "run.epochs=1")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"run directory {run} already holds another run" in err, err
        assert f"continue it with --resume {run}, choose a fresh run.name" in err, err
        assert "--overwrite" in err, err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    assert main(["train", "--stages", "1", "--overwrite",
                 *_sets(tmp_path, f"run.out_dir={out}", "run.name=done", "run.epochs=1")]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000005"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # the new run's only
    assert read_manifest(run)["step"] == 5
    assert 'resume = "never"' in (run / "config.toml").read_text()  # a copy does not overwrite


@pytest.mark.usefixtures("no_spawn")
@pytest.mark.parametrize("stages", ["1", "2"])
def test_a_finished_run_resumed_says_so_at_once(finished_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                stages: str) -> None:
    shutil.copytree(finished_run, tmp_path / "again")
    t0 = time.monotonic()
    assert main(["train", "--resume", str(tmp_path / "again"), "--stages", stages]) == 0
    assert time.monotonic() - t0 < 10  # no worker, no profiling: the manifest says it
    assert "the run is already complete at epoch 2 (step 10)" in capsys.readouterr().out


@pytest.mark.usefixtures("no_spawn")
@pytest.mark.parametrize(("spec", "expected"), [
    ("1:5", "is invalid; accepted: <stage>:<step>:<kind>"),
    ("2:5:kill", "targets stage 2 but this run has 2 stage(s); use a stage from 0 to 1"),
])
def test_a_bad_fault_spec_is_refused_before_any_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    spec: str, expected: str,
) -> None:
    monkeypatch.setenv("PIPELOCAL_INJECT_FAULT", spec)
    assert main(["train", "--stages", "2", *_sets(tmp_path, "run.name=fault")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "fault").exists()


def test_resume_config_frees_an_automatic_partition_and_a_reached_max_steps() -> None:
    config = json.loads(json.dumps({"pipeline": {"stages": 2, "partition": [2, 2]},
                                    "run": {"max_steps": 7}}))
    auto = resume_config({"config": config, "partition_auto": True, "step": 7}, [])
    assert auto.pipeline.partition == () and auto.run.max_steps == 0
    explicit = resume_config({"config": config, "partition_auto": False, "step": 3},
                             ["pipeline.stages=2"])
    assert explicit.pipeline.partition == (2, 2) and explicit.run.max_steps == 7


def test_nonfinite_loss_stops_or_is_tolerated_and_metrics_stay_strict_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = _sets(tmp_path, "optim.lr=1e30", "run.epochs=1")
    assert main(["train", "--stages", "1", *sets, "--set=run.name=stop"]) == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "the loss of block conv1 (block 0) became non-finite at epoch 1/1, batch 2 (step 1);" \
        in err, err
    assert "no checkpoint was written before it" in err, err
    assert not (tmp_path / "stop" / "checkpoints").exists()

    assert main(["train", "--stages", "1", *sets, "--set=run.name=go",
                 "--set=run.allow_nonfinite=true"]) == 0
    line = (tmp_path / "go" / "metrics.jsonl").read_text().splitlines()[0]

    def no_constants(name: str) -> None:
        raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")

    record = json.loads(line, parse_constant=no_constants)
    assert record["train/loss"] is None and isinstance(record["time"], float)
    assert read_manifest(tmp_path / "go")["step"] == 5


@pytest.mark.usefixtures("no_spawn")
def test_tensorboard_without_the_package_fails_before_any_worker(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(ConfigError, match=r"run\.tensorboard = true needs the tensorboard"):
        train(tiny_config(tmp_path, "pipeline.stages=2", "run.tensorboard=true"))
    assert not any(tmp_path.iterdir())


def test_one_stage_resumes_in_this_process_even_from_a_ray_run(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--stages 1 wins over the checkpoint's pipeline.launcher = "ray": no Ray is started."""
    def no_ray(*args: Any, **kw: Any) -> None:
        raise AssertionError("Ray was started for a one-stage resume")

    monkeypatch.setattr(launch_mod, "_ray_train", no_ray)
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ckpt = run / "checkpoints" / "step_00000005"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["config"]["pipeline"].update(launcher="ray", stages=2)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--resume", str(ckpt), "--stages", "1"]) == 0
    out = capsys.readouterr().out
    assert "pipelocal: single process on cpu" in out, out
    assert read_manifest(run)["step"] == 10


def test_a_checkpoint_written_before_newer_config_keys_resumes_as_it_trained(
    tmp_path: Path,
) -> None:
    """A manifest whose config predates rule.top_layers, model.init, data.pad_mode, ...: the
    resume is not refused, and continues with the values the checkpoint trained with."""
    first = train(tiny_config(tmp_path, "pipeline.stages=1", "run.name=old", "run.max_steps=3"))
    ckpt = resolve_checkpoint(first["run_dir"])
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for section, key in (("rule", "top_layers"), ("rule", "infopro_target"), ("model", "init"),
                         ("data", "pad_mode"), ("schedule", "warmup_epochs"),
                         ("schedule", "warmup_start_lr"), ("pipeline", "micro_batches"),
                         ("rule", "micro_batch_similarity")):
        del manifest["config"][section][key]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--resume", str(first["run_dir"])]) == 0
    saved = tomllib.loads((Path(first["run_dir"]) / "config.toml").read_text())
    assert (saved["rule"]["top_layers"], saved["model"]["init"]) == ("local", "pytorch")
    assert saved["pipeline"]["micro_batches"] == 1  # predsim: the whole batch, as it trained
    assert read_manifest(resolve_checkpoint(first["run_dir"]))["step"] == 10
