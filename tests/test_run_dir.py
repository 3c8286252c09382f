"""Tests for pipelocal.launch.run_dir: one run owns a run directory, unnamed runs get their
own, an unwritable output folder is a one-line error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelocal.cli import main
from pipelocal.config import ConfigError
from pipelocal.launch.run_dir import lock_run_dir, make_run_dir, release_run_dir
from tests.conftest import tiny_config, tiny_overrides


def _sets(tmp_path: Path, *more: str) -> list[str]:
    return [f"--set={s}" for s in (*tiny_overrides(tmp_path), *more)]


def test_a_run_directory_is_owned_by_one_run(tmp_path: Path) -> None:
    run_dir = make_run_dir(tiny_config(tmp_path, "run.name=mine"))
    lock_run_dir(run_dir)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            lock_run_dir(run_dir)  # another open file description: refused like another process
    finally:
        release_run_dir(run_dir)
    lock_run_dir(run_dir)  # released: free again
    release_run_dir(run_dir)


def test_unnamed_runs_in_the_same_second_get_their_own_directories(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    dirs = [make_run_dir(cfg) for _ in range(3)]  # well within one second
    assert len(set(dirs)) == 3
    assert dirs[1].name == f"{dirs[0].name}-1" or dirs[1].name[:15] != dirs[0].name[:15]


def test_unwritable_output_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() == 0:  # root ignores permission bits; sysfs refuses even root
        out = Path("/sys/pipelocal-test")
        try:
            out.mkdir()
        except OSError:
            pass
        else:
            out.rmdir()
            pytest.skip("no unwritable folder available to root here")
    else:
        out = tmp_path / "ro"
        out.mkdir(mode=0o555)
    code = main(["train", "--stages", "1", *_sets(tmp_path, f"run.out_dir={out}")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"cannot create a run directory in run.out_dir = {str(out)!r}" in err
    assert "set run.out_dir to a writable folder" in err
