"""Tests for pipelocal.cli, run in process: listings, config printing, errors, train and eval."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelocal.cli import main
from pipelocal.config import load_config
from pipelocal.data import DATASETS
from pipelocal.models import MODELS
from pipelocal.rules import RULES


@pytest.fixture(autouse=True)
def _restore_sigint() -> Iterator[None]:
    """``train`` installs its own Ctrl-C handler; give pytest its own back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize(
    ("command", "names"),
    [("models", MODELS.names), ("rules", RULES.names), ("datasets", DATASETS.names)],
)
def test_lists_the_registries(command: str, names, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command]) == 0
    assert capsys.readouterr().out.split() == names()


def test_config_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "optim.lr=0.1"]) == 0
    out = capsys.readouterr().out
    assert "[optim]" in out and "lr = 0.1\n" in out
    assert "[model]" in out and 'name = "mlp"' in out


def test_config_json_with_file_and_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = 0.2\nweight_decay = 0.01\n")
    assert main(["config", "--config", str(path), "--set", "optim.lr=0.3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["optim"]["lr"] == 0.3 and data["optim"]["weight_decay"] == 0.01


def test_bad_value_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "optim.lr=-1", "--stages", "1"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "optim.lr" in err and "-1" in err and "> 0" in err


def test_unknown_key_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "optim.learning_rate=0.1"]) == 2
    assert "optim.learning_rate" in capsys.readouterr().err


def test_missing_dataset_exits_2_naming_the_file_and_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(
        [
            "train",
            "--stages",
            "1",
            "--set",
            "data.name=cifar10",
            "--set",
            f"data.data_dir={empty}",
            "--set",
            f"run.out_dir={tmp_path / 'runs'}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "data_batch_1" in err and str(empty / "cifar-10-batches-py") in err
    assert "data.download" in err
    assert not (tmp_path / "runs").exists()  # failed before a run directory was made


def test_invalid_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = ")
    assert main(["config", "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    # train reads the file once more to see whether it sets pipeline.stages.
    assert main(["train", "--config", str(bad), "--stages", "1"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid TOML" in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.toml"
    assert main(["train", "--config", str(missing), "--stages", "1"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_input_shape_mismatch_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--stages", "1", "--set", "model.input_shape=[1, 28, 28]",
                 "--set", f"run.out_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "[2, 1, 28, 28]" in err and "[2, 1, 8, 8]" in err and "model.input_shape" in err


def test_model_too_big_for_the_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """vgg8b cannot pool the 8x8 digits five times: a config mistake, not a crash."""
    code = main(
        ["train", "--stages", "1", "--set", "model.name=vgg8b", "--set", f"run.out_dir={tmp_path}"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "too small" in err and "8x8" in err


def test_eval_of_a_missing_checkpoint_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--stages",
            "1",
            "--set",
            "run.epochs=1",
            "--set",
            f"run.out_dir={tmp_path}",
            "--set",
            "run.progress=false",
            "--set",
            "data.train_limit=200",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    run_dir = Path(re.search(r"run directory: (.+)$", out, re.MULTILINE).group(1))
    assert run_dir.parent == tmp_path
    final = re.search(r"final test accuracy: ([\d.]+)%", out).group(1)

    cfg = load_config(run_dir / "config.toml")
    assert cfg.run.epochs == 1 and cfg.data.train_limit == 200 and cfg.pipeline.stages == 1
    [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and record["step"] == 2  # 200 samples in batches of 128
    assert 0.0 <= record["test/acc"] <= 1.0
    assert set(record["test/acc_local"]) == {"fc1", "fc2", "fc3"}
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert (run_dir / "checkpoints" / "latest").read_text() == ckpt.name
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "block_000.pt",
        "block_001.pt",
        "block_002.pt",
        "block_003.pt",
        "manifest.json",
    ]

    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    # The same weights on the same test set: the same accuracy as at the end of training.
    assert re.search(r"^test accuracy: ([\d.]+)%$", out, re.MULTILINE).group(1) == final
    assert f"{100 * record['test/acc']:.2f}" == final


def test_train_help_gives_the_single_process_thread_default_and_why(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "run.threads = 1 torch threads of the single-process engine" in out, out
    assert "spin-wait" in out and "--launcher ray is given too" in out and "--overwrite" in out


def test_resume_and_overwrite_together_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--resume", str(tmp_path), "--overwrite"]) == 2
    assert "--overwrite replaces one; pass one of them" in capsys.readouterr().err


def test_backend_is_a_deprecated_alias_of_launcher() -> None:
    from pipelocal.cli import _parser, _train_flags

    new = _parser().parse_args(["train", "--launcher", "ray", "--stages", "2"])
    old = _parser().parse_args(["train", "--backend", "ray", "--stages", "2"])
    assert _train_flags(old) == _train_flags(new) == ["pipeline.stages=2",
                                                      "pipeline.launcher=ray"]


def test_micro_batches_flag_sets_the_key_and_a_bad_value_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pipelocal.cli import _parser, _train_flags

    args = _parser().parse_args(["train", "--micro-batches", "4", "--stages", "2"])
    assert _train_flags(args) == ["pipeline.stages=2", "pipeline.micro_batches=4"]
    assert _train_flags(_parser().parse_args(["train"])) == []
    assert main(["train", "--micro-batches", "0", "--stages", "1"]) == 2
    assert "pipeline.micro_batches = 0 is invalid" in capsys.readouterr().err


def test_replicas_flag_and_one_stage_without_it() -> None:
    """--replicas R sets pipeline.replicas; --stages 1 alone runs one process, so it also
    means one replica, whatever the config or a resumed checkpoint says."""
    from pipelocal.cli import _parser, _train_flags

    two = _parser().parse_args(["train", "--stages", "2", "--replicas", "2"])
    assert _train_flags(two) == ["pipeline.stages=2", "pipeline.replicas=2"]
    one = _parser().parse_args(["train", "--stages", "1"])
    assert _train_flags(one) == ["pipeline.stages=1", "pipeline.replicas=1",
                                 "pipeline.launcher=spawn"]
