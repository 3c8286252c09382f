"""Fault injection for the tests: a stage that raises, dies, hangs or turns NaN at a chosen step.

The spec comes from :data:`FAULT_ENV`; preflight checks it before any worker starts
(:func:`check_fault_spec`) and each stage reads its own fault from it (:func:`parse_fault`).
"""

from __future__ import annotations

from pipelocal.config import ConfigError

__all__ = ["FAULT_ENV", "check_fault_spec", "parse_fault"]

FAULT_ENV = "PIPELOCAL_INJECT_FAULT"
"""Fault injection for tests: ``"<stage>:<step>:<kind>"``, kind raise, kill, hang or nan (the
stage's input batch becomes NaN, as from a diverged block before it); in a torchrun job only on
its first attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0)."""
_FAULT_KINDS = ("raise", "kill", "hang", "nan")


def check_fault_spec(spec: str, stages: int) -> None:
    """Before any worker starts: a malformed spec, or one for a stage the run does not have, is
    a config error (a single-process run has no stages to inject into)."""
    if not spec:
        return
    try:
        parse_fault(spec, 0)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    target = int(spec.split(":")[0])
    if stages < 2 or target >= stages:
        raise ConfigError(
            f"{FAULT_ENV} = {spec!r} targets stage {target} but this run has {stages} "
            f"stage(s){' (the single-process engine injects nothing)' if stages < 2 else ''}; "
            f"use a stage from 0 to {max(stages - 1, 0)} of a pipelined run, or unset it")


def parse_fault(spec: str, stage: int) -> tuple[int, str] | None:
    """``"<stage>:<step>:<kind>"`` -> (step, kind) for this stage; a malformed spec is an error."""
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() \
            or parts[2] not in _FAULT_KINDS:
        raise ValueError(f"{FAULT_ENV} = {spec!r} is invalid; accepted: <stage>:<step>:<kind> "
                         f"with kind one of {', '.join(_FAULT_KINDS)}, e.g. 1:5:kill")
    return (int(parts[1]), parts[2]) if int(parts[0]) == stage else None
