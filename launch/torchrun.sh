#!/usr/bin/env bash
# `pipelocal train` under torchrun: one process (rank) per pipeline stage of each replica. Every
# argument goes to `pipelocal train` unchanged; the stage and replica counts come from the
# variables below, so do not pass --stages or --replicas.
#
#   one node, S stages (one per GPU, or S CPU processes):
#     STAGES=4 launch/torchrun.sh --config configs/vgg8b_cifar10.toml
#   one node, 2 replicas of a 2-stage pipeline (4 processes):
#     STAGES=2 REPLICAS=2 launch/torchrun.sh --config configs/vgg8b_cifar10.toml
#   several nodes (the same line on every node, NODE_RANK = 0 .. NNODES-1):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 STAGES_PER_NODE=4 launch/torchrun.sh --config ...
#   check without training (config, partition, stage shapes of the whole job; no rendezvous):
#     NNODES=2 STAGES_PER_NODE=4 launch/torchrun.sh --dry-run --config ...
#
# Variables:
#   STAGES           one node: stages of each replica (default 2); processes = STAGES * REPLICAS
#   REPLICAS         data-parallel copies of the pipeline (pipeline.replicas, default 1); the
#                    job's processes are divided among them, stages = processes / REPLICAS, and
#                    rank = replica * stages + stage: with STAGES_PER_NODE a multiple of the
#                    stage count, each pipeline stays inside one node
#   NNODES           number of nodes; unset or 1 = one node (torchrun --standalone)
#   NODE_RANK        several nodes: this node's index, 0 .. NNODES-1 (required). With the
#                    c10d rendezvous torchrun numbers the nodes itself and only warns that
#                    it ignores NODE_RANK: any node may run rank 0 (stage 0 and the
#                    coordinator that prints the progress)
#   STAGES_PER_NODE  several nodes: processes per node (required); the job has
#                    NNODES * STAGES_PER_NODE processes, REPLICAS pipelines of
#                    NNODES * STAGES_PER_NODE / REPLICAS stages, consecutive ranks on one node
#   MASTER_ADDR      several nodes: host name or IP of the c10d rendezvous store, reachable
#                    from every node; usually node 0 (required)
#   MASTER_PORT      several nodes: TCP port of the rendezvous store (default 29400)
#   RDZV_ID          several nodes: job id, the same on every node of one job (default pipelocal)
#   LOCAL_ADDR       several nodes: the address the other nodes reach this one at (default:
#                    torchrun looks up this host's name). For "nodes" on one host: 127.0.0.1;
#                    in containers 127.0.0.1, 127.0.0.2, ... (c10d tells nodes apart by
#                    address and PID, and torchrun has PID 1 in every container)
#   MAX_RESTARTS     restart the whole job this many times after a failure (default 0); pass
#                    --set run.name=NAME --set run.resume=auto so that a restart continues
#                    from the run directory's latest complete checkpoint
#   PYTHON           interpreter with pipelocal and torch installed (default python3); torchrun
#                    is started as `$PYTHON -m torch.distributed.run`
#
# Checkpoints are written by every stage into the run directory: on several nodes, point
# run.out_dir at a file system all nodes share.
#
# Exit status: that of `pipelocal train` on rank 0 (0 done, 2 config/checkpoint/full disk,
# 3 non-finite loss, 130 stopped by Ctrl-C or SIGTERM after its checkpoint), which rank 0
# writes to a status file; torchrun's own status where rank 0 wrote none (1 if a rank died or
# failed otherwise). torchrun alone exits 1 after any signal, whatever its ranks did. Ctrl-C
# and SIGTERM to this script are passed on once to torchrun (kept in its own process group, so
# a terminal's Ctrl-C does not reach it twice), which passes them to the ranks: they write a
# checkpoint at the current step within torchrun's 30 s shutdown time, and stop. A second one
# aborts. If this script is killed, torchrun gets SIGTERM (it dies with its parent).
set -euo pipefail
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
REPLICAS=${REPLICAS:-1}

if [[ $NNODES == 1 && ( -n ${STAGES:-} || -z ${STAGES_PER_NODE:-} ) ]]; then
  STAGES_PER_NODE=$((${STAGES:-2} * REPLICAS))  # one node: STAGES wins (slurm.sbatch sets the other)
fi
world=$((NNODES * ${STAGES_PER_NODE:?set STAGES_PER_NODE (processes per node)}))
if ((REPLICAS < 1 || world % REPLICAS)); then
  echo "torchrun.sh: $world processes cannot form REPLICAS=$REPLICAS pipelines of equal" \
    "length; make NNODES * STAGES_PER_NODE a multiple of REPLICAS" >&2
  exit 2
fi
replicas=(--replicas "$REPLICAS")
# glibc keeps freed host memory for the next step (pipelocal/hostmem.py); read at process start
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-33554432}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-1073741824}

for arg in "$@"; do
  if [[ $arg == --dry-run ]]; then
    # One process checks what every rank would: no rendezvous, no training.
    exec "$PYTHON" -m pipelocal train --stages "$((world / REPLICAS))" "${replicas[@]}" "$@"
  fi
done

# torchrun as a child that dies with this script (PR_SET_PDEATHSIG = SIGTERM, kept across exec)
_DIE_WITH_PARENT='import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])'

run_torchrun() {
  local status_file agent code=0
  status_file=$(mktemp "${TMPDIR:-/tmp}/pipelocal-status.XXXXXX")
  trap 'rm -f "$status_file"' EXIT
  set -m  # torchrun in its own process group: a signal reaches it once, from the traps below
  PIPELOCAL_STATUS_FILE=$status_file "$PYTHON" -c "$_DIE_WITH_PARENT" "$$" \
    "$PYTHON" -m torch.distributed.run "$@" &
  agent=$!
  set +m
  trap 'kill -INT "$agent" 2>/dev/null || true' INT
  trap 'kill -TERM "$agent" 2>/dev/null || true' TERM
  while true; do
    code=0
    wait "$agent" || code=$?
    kill -0 "$agent" 2>/dev/null || break  # else a trap interrupted the wait: wait again
  done
  if [[ -s $status_file ]]; then
    code=$(<"$status_file")
  fi
  exit "$code"
}

if [[ $NNODES == 1 ]]; then
  run_torchrun --standalone --nproc-per-node "$world" \
    --max-restarts "${MAX_RESTARTS:-0}" -m pipelocal train "${replicas[@]}" "$@"
fi
local_addr=()
if [[ -n ${LOCAL_ADDR:-} ]]; then
  local_addr=(--local-addr "$LOCAL_ADDR")
fi
run_torchrun --nnodes "$NNODES" \
  --node-rank "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}" \
  --nproc-per-node "$STAGES_PER_NODE" "${local_addr[@]}" --max-restarts "${MAX_RESTARTS:-0}" \
  --rdzv-backend c10d --rdzv-id "${RDZV_ID:-pipelocal}" \
  --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR (the rendezvous host)}:${MASTER_PORT:-29400}" \
  -m pipelocal train "${replicas[@]}" "$@"
