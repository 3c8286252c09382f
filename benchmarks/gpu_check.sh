#!/usr/bin/env bash
# The one-GPU check: the project installed without dependencies, its GPU tests, then the
# measurements of `python -m benchmarks gpu_check` (benchmarks/gpu_check.py); results under $OUT (default benchmarks/results).
#
#   bash benchmarks/gpu_check.sh             # one CUDA GPU and a python3 with PyTorch; ~5 min
#   bash benchmarks/gpu_check.sh --dry-run   # on the CPU: every command at toy sizes, no CUDA
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
dry=""
if [ "${1:-}" = "--dry-run" ]; then
  dry="--dry-run"
  OUT=${OUT:-$(mktemp -d)}  # a dry run never writes over the committed results
fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
status=0
if [ -z "$dry" ]; then
  # No network on a GPU node: no build isolation; the checkout on the path if pip cannot.
  "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . \
    || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv \
    > "$OUT/gpu_nvidia_smi.txt" 2>&1 || true
  timeout 240 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
    2>&1 | tee "$OUT/gpu_pytest.txt" || status=1
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # The GPU tests are collected (they import and select), not run.
  "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --collect-only tests/test_gpu.py \
    > "$OUT/gpu_pytest.txt" 2>&1 || status=1
fi
timeout 300 "$PYTHON" -m benchmarks gpu_check --out "$OUT" $dry || status=1
echo "gpu_check.sh: results in $OUT; $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
