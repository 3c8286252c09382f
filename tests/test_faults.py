"""Tests for pipelocal.pipeline.faults: the fault-injection spec."""

from __future__ import annotations

import pytest

from pipelocal.pipeline.faults import parse_fault


@pytest.mark.parametrize("spec", ["1:5", "1:5:boom", "a:5:kill", "1:-5:raise", "1:5:kill:9"])
def test_malformed_fault_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="kind one of raise, kill, hang, nan"):
        parse_fault(spec, 0)


def test_fault_spec_applies_to_its_stage_only() -> None:
    assert parse_fault("1:5:hang", 1) == (5, "hang")
    assert parse_fault("1:5:hang", 0) is None
    assert parse_fault("", 0) is None
