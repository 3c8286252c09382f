"""Host memory that a training step reuses instead of faulting in again at every step.

glibc's malloc hands large blocks back to the kernel when they are freed: blocks above its
mmap threshold are unmapped, and free memory at the top of the heap beyond its trim threshold
is released. A CPU training step frees and re-allocates the same large tensors (activations,
gradients, the optimiser's temporaries) every step, so with the defaults the next step faults
those pages in again, one 4 KiB page at a time, zero-filled by the kernel (thousands of faults
per step for the benchmarks' models; how many varies from run to run, as glibc moves its
thresholds as it goes). The settings here keep every block up to glibc's largest mmap
threshold (32 MiB) on the heap and keep up to 1 GiB of free heap in the process, as the CUDA
caching allocator keeps device memory; ``python -m benchmarks host_memory`` measures the
faults and the throughput both ways. The process's peak memory is unchanged; it is only not
given back until exit.

glibc reads ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` once, when a process
starts, so :func:`keep_host_memory` sets them for the processes started from here (the
forkserver of spawned stages, profiling subprocesses, Ray actors) and sets the same values in
this process through ``mallopt``, which takes effect less fully in a process that has already
allocated. ``launch/torchrun.sh`` exports them for torchrun's ranks. A value already in the
environment is kept: set ``MALLOC_TRIM_THRESHOLD_`` yourself to change it.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["HOST_MALLOC_ENV", "keep_host_memory"]

HOST_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's largest: HEAP_MAX_SIZE / 2 on 64 bits
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
}
"""The glibc malloc settings of every pipelocal process (environment variable -> value)."""

_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}  # glibc's M_* numbers


def keep_host_memory() -> bool:
    """Apply :data:`HOST_MALLOC_ENV` to the environment (keeping values already set) and, where
    the C library is glibc, to this process; True if this process took every value."""
    for key, value in HOST_MALLOC_ENV.items():
        os.environ.setdefault(key, value)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    for key, param in _MALLOPT.items():
        try:
            value = int(os.environ[key])
        except ValueError:  # the user's own value, not a number: glibc ignores it too
            ok = False
            continue
        ok = bool(mallopt(param, value)) and ok
    return ok
