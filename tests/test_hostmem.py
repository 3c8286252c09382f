"""Host memory that the next step reuses: the glibc settings every pipelocal process gets."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

import pytest

from pipelocal.hostmem import HOST_MALLOC_ENV, keep_host_memory
from tests.conftest import REPO

# Training steps of an MLP with Adam (one thread): minor page faults per step once 5 steps have
# set the heap up.
_STEPS = """
import resource, torch
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                            torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
opt = torch.optim.Adam(model.parameters())
x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
f0 = faults()
for _ in range(20):
    step()
print((faults() - f0) / 20)
"""


def _faults_per_step(env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", _STEPS], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return float(out.split()[-1])


def test_keep_host_memory_sets_the_environment_and_keeps_a_users_value(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    keep_host_memory()
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == HOST_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
@pytest.mark.timeout(300)
def test_a_process_started_with_the_settings_faults_no_page_in_again():
    """With the settings a training step reuses the memory the step before freed (a few dozen
    faults at most, as the heap lands between other mappings); with glibc's defaults it hands
    megabytes back and faults them in again at every step (thousands)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    kept, plain = _faults_per_step({**base, **HOST_MALLOC_ENV}), _faults_per_step(base)
    assert kept <= 200 and plain >= 1000, (kept, plain)


def test_torchrun_script_exports_the_same_settings():
    script = (REPO / "launch" / "torchrun.sh").read_text()
    for key, value in HOST_MALLOC_ENV.items():
        assert re.search(rf"export {key}=\${{{key}:-{value}}}", script), key


def test_host_memory_benchmark_takes_ratios_within_each_repeat():
    from benchmarks.headline.host_memory import SETTINGS, summary

    def rep(default: float, kept: float) -> dict[str, dict[str, float]]:
        return {SETTINGS[0]: {"throughput(samples/s)": default, "minor_faults/step": 2000.0},
                SETTINGS[1]: {"throughput(samples/s)": kept, "minor_faults/step": 0.0}}

    out = summary([rep(100.0, 150.0), rep(50.0, 100.0), rep(80.0, 96.0)])
    assert out["speedup"]["values"] == pytest.approx([1.5, 2.0, 1.2])
    assert out["speedup"]["median"] == pytest.approx(1.5)
    assert out[SETTINGS[0]]["minor_faults/step"]["median"] == 2000.0
    assert out[SETTINGS[1]]["throughput(samples/s)"]["median"] == 100.0
