#!/usr/bin/env bash
# One torchrun rank per pipeline stage. Extra arguments go to `pipelocal train`.
#
#   single node, S stages (one per GPU, or S CPU processes):
#     STAGES=4 launch/torchrun.sh --config configs/vgg8b_cifar10.toml
#   several nodes (run on every node; stages are numbered node by node):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 STAGES_PER_NODE=4 launch/torchrun.sh --config ...
#
# Checkpoints are written by every stage into the run directory: on several nodes, point
# run.out_dir at a shared file system.
set -euo pipefail
if [[ -n "${NNODES:-}" && "${NNODES}" != 1 ]]; then
  exec torchrun --nnodes "${NNODES}" --node-rank "${NODE_RANK:?set NODE_RANK}" \
    --nproc-per-node "${STAGES_PER_NODE:?set STAGES_PER_NODE}" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29400}" \
    --rdzv-id "${RDZV_ID:-pipelocal}" -m pipelocal train "$@"
fi
exec torchrun --standalone --nproc-per-node "${STAGES:-2}" -m pipelocal train "$@"
