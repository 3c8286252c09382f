"""Fault injection for the tests: a stage that raises, dies, hangs or turns NaN at a chosen step.

The spec comes from :data:`FAULT_ENV`; preflight checks it before any worker starts
(:func:`check_fault_spec`) and each stage reads its own fault from it (:func:`parse_fault`).
"""

from __future__ import annotations

from pipelocal.config import ConfigError

__all__ = ["FAULT_ENV", "check_fault_spec", "parse_fault"]

FAULT_ENV = "PIPELOCAL_INJECT_FAULT"
"""Fault injection for tests: ``"<stage>:<step>:<kind>"``, kind raise, kill, hang, nan (the
stage's input batch becomes NaN, as from a diverged block before it) or perturb (its first
parameter changes, so that its replica differs from the others); in a torchrun job only on
its first attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0). With replicas, ``<stage>`` is
the rank, replica * stages + stage."""
_FAULT_KINDS = ("raise", "kill", "hang", "nan", "perturb")


def check_fault_spec(spec: str, stages: int, replicas: int = 1) -> None:
    """Before any worker starts: a malformed spec, or one for a stage the run does not have, is
    a config error (a single-process run has no stages to inject into); with replicas it names
    a rank of the ``replicas * stages``."""
    if not spec:
        return
    try:
        parse_fault(spec, 0)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    target, ranks = int(spec.split(":")[0]), stages * replicas
    if ranks < 2 or target >= ranks:
        what = (f"{stages} stage(s)" if replicas == 1 else
                f"{ranks} ranks ({replicas} replicas x {stages} stage(s))")
        raise ConfigError(
            f"{FAULT_ENV} = {spec!r} targets {'stage' if replicas == 1 else 'rank'} {target} "
            f"but this run has {what}"
            f"{' (the single-process engine injects nothing)' if ranks < 2 else ''}; "
            f"use a {'stage' if replicas == 1 else 'rank'} from 0 to {max(ranks - 1, 0)} of a "
            "pipelined run, or unset it")


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
