#!/usr/bin/env bash
# Build the CPU image the air-gapped way and run it. Not part of CI (a ~5 GB wheelhouse and a
# ~6 GB image); run it by hand on a machine with Docker and ~25 GB free disk:
#
#   docker/smoke.sh                  # as root: installs docker.io/debootstrap if missing
#
# Steps, each printed with a timestamp:
#   1. dockerd: started in the background if not running (log in $WORK/dockerd.log).
#   2. base image: a Debian bookworm root file system from debootstrap, imported with
#      `docker import` under the tag Dockerfile.cpu's BASE_IMAGE default names, so the
#      Dockerfile builds unchanged (Debian bookworm's python3 is CPython 3.11).
#   3. wheelhouse: `pip download -r docker/requirements.txt` from this machine's package index,
#      plus the pipelocal wheel built from this checkout.
#   4. image: `docker build --network host` of docker/Dockerfile.cpu.
#   5. checks, all on host networking (containers talk over 127.0.0.1 only):
#      a. `pipelocal train` on the embedded default in the image; its final accuracy must
#         equal the same command's outside the image;
#      b. a 2-stage torchrun inside one container;
#      c. two containers as two torchrun "nodes" (c10d rendezvous on 127.0.0.1, the nodes
#         on 127.0.0.1 and 127.0.0.2); their
#         checkpoint must equal (b)'s bit for bit;
#      d. `docker stop` of a training container: it must exit with pipelocal's status for a
#         stop on SIGINT (130) and leave a checkpoint at the step it stopped.
#
# Variables (all optional):
#   WORK        build context, wheelhouse, rootfs and run directories; keep it outside the
#               git tree (default /work/docker-build)
#   BASE_IMAGE  tag of the local base image (default: Dockerfile.cpu's BASE_IMAGE default)
#   IMAGE       tag of the built image (default pipelocal:cpu)
#   MIRROR      Debian mirror for debootstrap (default: the first enabled `deb` source for
#               bookworm in this machine's apt sources: /etc/apt/sources.list,
#               /etc/apt/sources.list.d/*.list and deb822 *.sources; required when none has one)
#   KEEP        1 = keep the image, the base image and the wheelhouse at the end (default 0)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/work/docker-build}
BASE_IMAGE=${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=//p' "$REPO/docker/Dockerfile.cpu")}
IMAGE=${IMAGE:-pipelocal:cpu}
SUITE=bookworm             # Debian 12, whose python3 is CPython 3.11 (the wheelhouse is cp311)
MIRROR=${MIRROR:-}
KEEP=${KEEP:-0}
RUNS=$WORK/runs            # mounted into every container: all checkpoints land on the host
TIMEOUT=600                # seconds any one container may run before the script gives up

step() { printf '\n== %s [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }
fail() { echo "smoke: FAILED: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

ensure_docker() {
  step "dockerd"
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -q && apt-get install -y -q docker.io debootstrap
  fi
  if ! docker info >/dev/null 2>&1; then
    nohup dockerd >"$WORK/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || fail "dockerd did not start within 60 s; see $WORK/dockerd.log"
  fi
  docker version --format 'docker server {{.Server.Version}}'
}

# apt_mirror SUITE: prints the URI of the first enabled `deb` source that serves SUITE in this
# machine's apt sources (one-line *.list and deb822 *.sources), or nothing.
apt_mirror() {
  local suite=$1 f uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    # deb [opt=value ...] URI SUITE COMPONENT...; the options may contain spaces.
    uri=$(awk -v s="$suite" '
      $1 == "deb" {
        i = 2
        if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == s) { print $i; exit }
      }' "$f")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    # Stanzas separated by blank lines; field names are case-insensitive; a line that starts
    # with white space continues the previous field.
    uri=$(awk -v s="$suite" '
      function flush() {
        if (!done && (" " f["types"] " ") ~ / deb / && tolower(f["enabled"]) != "no" \
            && (" " f["suites"] " ") ~ (" " s " ") && f["uris"] != "") {
          split(f["uris"], u, " "); print u[1]; done = 1
        }
        delete f
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]/ { v = $0; gsub(/[ \t]+/, " ", v); f[key] = f[key] v; next }
      {
        key = tolower(substr($0, 1, index($0, ":") - 1))
        f[key] = substr($0, index($0, ":") + 1)
        gsub(/[ \t]+/, " ", f[key]); sub(/^ /, "", f[key]); sub(/ $/, "", f[key])
      }
      END { flush() }' "$f")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
}

make_base() {
  step "base image $BASE_IMAGE (debootstrap bookworm + docker import)"
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "present, reused"; return
  fi
  local rootfs=$WORK/rootfs mirror=$MIRROR
  [[ -n $mirror ]] || mirror=$(apt_mirror "$SUITE")
  [[ -n $mirror ]] || fail "no Debian mirror for debootstrap: no enabled deb source for $SUITE in \
/etc/apt/sources.list, /etc/apt/sources.list.d/*.list or *.sources; set MIRROR=<Debian mirror URL>"
  echo "mirror: $mirror${MIRROR:+ (from MIRROR)}"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || fail "debootstrap failed; see $WORK/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE"
  rm -rf "$rootfs"
  docker run --rm "$BASE_IMAGE" python3 --version
}

make_wheelhouse() {
  step "wheelhouse $WORK/ctx/wheels"
  mkdir -p "$WORK/ctx/wheels" "$WORK/src"
  python3 -m pip download --quiet -d "$WORK/ctx/wheels" -r "$REPO/docker/requirements.txt"
  # The project wheel is built from a copy, so no build/ or *.egg-info lands in the checkout.
  rm -rf "$WORK/src" "$WORK"/ctx/wheels/pipelocal-*.whl && mkdir -p "$WORK/src"
  cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/pipelocal" "$WORK/src/"
  python3 -m pip wheel --quiet --no-deps -w "$WORK/ctx/wheels" "$WORK/src"
  cp "$REPO/docker/requirements.txt" "$WORK/ctx/"
  echo "wheels: $(find "$WORK/ctx/wheels" -name '*.whl' | wc -l)"
  du -sh "$WORK/ctx/wheels"
}

build_image() {
  step "docker build $IMAGE"
  docker build --network host -f "$REPO/docker/Dockerfile.cpu" -t "$IMAGE" "$WORK/ctx" \
    >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "docker build"; }
  tail -3 "$WORK/build.log"
  docker image ls "$IMAGE"
  docker run --rm "$IMAGE" --help | head -3
}

# run NAME ARGS...: a detached container on host networking with $RUNS mounted; echoes its id.
run() {
  local name=$1; shift
  docker rm -f "$name" >/dev/null 2>&1 || true
  docker run -d --name "$name" --network host --shm-size 1g \
    -v "$RUNS:/workspace/runs" -v /work/shared/data:/data:ro "$@"
}

# wait_ok NAME...: waits (bounded) for each container, prints its log tail, fails on non-zero.
wait_ok() {
  local name code
  for name in "$@"; do
    code=$(timeout "$TIMEOUT" docker wait "$name") || fail "$name still running after ${TIMEOUT}s"
    docker logs "$name" 2>&1 | tail -4 | sed "s/^/  [$name] /"
    [[ $code == 0 ]] || fail "$name exited with $code"
  done
}

# log_has NAME REGEX: whether container NAME's log has a line matching REGEX. The log is read
# whole first: in `docker logs | grep -q` under pipefail, grep quitting at the first match can
# kill `docker logs` with SIGPIPE, and the pipeline then fails although the line is there.
log_has() {
  local log
  log=$(docker logs "$1" 2>&1)
  grep -qE "$2" <<<"$log"
}

same_checkpoints() {
  PYTHONPATH=$REPO python3 - "$1" "$2" <<'EOF'
import sys
from tests.conftest import assert_identical, checkpoint_tensors
assert_identical(checkpoint_tensors(sys.argv[1]), checkpoint_tensors(sys.argv[2]))
print(f"bitwise equal: {sys.argv[1]} == {sys.argv[2]}")
EOF
}

check_default_run() {
  step "a. pipelocal train (embedded default) inside vs outside the image"
  run smoke-default "$IMAGE" train --set run.progress=false --set run.name=default >/dev/null
  wait_ok smoke-default
  local inside outside
  inside=$(docker logs smoke-default 2>&1 | grep 'final test accuracy')
  outside=$(cd "$WORK" && PYTHONPATH=$REPO python3 -m pipelocal train --set run.progress=false \
    --set run.out_dir="$WORK/outside" | grep 'final test accuracy')
  echo "inside:  $inside"
  echo "outside: $outside"
  [[ -n $inside && $inside == "$outside" ]] || fail "accuracy differs inside/outside the image"
}

# Shared by (b) and (c): same model, data and thread count, so their checkpoints must match.
# The thread count is set: by default each stage takes cores // stages on its node, which is
# 1 for (b)'s two stages in one container and all cores for (c)'s one stage per container, and
# CPU kernels reduce in a thread-count-dependent order.
TORCHRUN_TRAIN=(-m pipelocal train --stages 2 --set run.progress=false --set run.epochs=3
                --set pipeline.threads_per_stage=1)

check_torchrun_one_container() {
  step "b. 2-stage torchrun in one container"
  run smoke-torchrun --entrypoint torchrun "$IMAGE" --standalone --nproc-per-node 2 \
    "${TORCHRUN_TRAIN[@]}" --set run.name=torchrun >/dev/null
  wait_ok smoke-torchrun
  log_has smoke-torchrun 'pipelined over 2 stages' \
    || fail "torchrun run did not pipeline over 2 stages"
}

check_two_nodes() {
  step "c. two containers as two torchrun nodes (c10d on 127.0.0.1)"
  local port node
  port=$(free_port)
  # Each node gets its own loopback address: c10d tells nodes apart by (address, PID), and
  # torchrun is PID 1 in both containers, so with one address the two never both join.
  for node in 0 1; do
    run "smoke-node$node" --entrypoint torchrun "$IMAGE" --nnodes 2 --node-rank "$node" \
      --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$port" \
      --rdzv-id smoke --local-addr "127.0.0.$((node + 1))" \
      "${TORCHRUN_TRAIN[@]}" --set run.name=two-nodes >/dev/null
  done
  wait_ok smoke-node0 smoke-node1
  same_checkpoints "$RUNS/two-nodes" "$RUNS/torchrun"
}

check_docker_stop() {
  step "d. docker stop of a training container"
  run smoke-stop "$IMAGE" train --set run.progress=false --set run.name=stop \
    --set run.epochs=100000 --set run.checkpoint_every=100000 >/dev/null
  local t0 code
  for _ in $(seq 120); do
    log_has smoke-stop '^epoch 3/' && break; sleep 1
  done
  log_has smoke-stop '^epoch 3/' || fail "training did not reach epoch 3 in 120 s"
  t0=$(date +%s%N)
  docker stop -t 30 smoke-stop >/dev/null
  code=$(docker inspect -f '{{.State.ExitCode}}' smoke-stop)
  echo "docker stop returned after $(( ($(date +%s%N) - t0) / 1000000 )) ms; exit code $code"
  docker logs smoke-stop 2>&1 | tail -4 | sed 's/^/  [smoke-stop] /'
  local ckpts
  ckpts=$(find "$RUNS/stop/checkpoints" -maxdepth 1 -name 'step_*' -printf '%f ' 2>/dev/null)
  echo "checkpoints left: ${ckpts:-none}"
  # 130: pipelocal's status for "stopped by SIGINT after checkpointing"; 137 would be the
  # SIGKILL that follows an ignored stop signal.
  if [[ $code != 130 || -z $ckpts ]]; then
    fail "docker stop: expected exit 130 (stopped on SIGINT) and a checkpoint; got exit $code" \
      "and checkpoints: ${ckpts:-none}"
  fi
}

cleanup() {
  step "cleanup"
  docker rm -f smoke-default smoke-torchrun smoke-node0 smoke-node1 smoke-stop \
    >/dev/null 2>&1 || true
  rm -rf "$RUNS" "$WORK/outside" "$WORK/src"
  if [[ $KEEP != 1 ]]; then
    docker image rm -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
    docker image prune -f >/dev/null
    rm -rf "$WORK/ctx"
  fi
  df -h "$WORK" | tail -1
}

main() {
  local t0=$SECONDS
  mkdir -p "$WORK"
  df -h "$WORK" | tail -1
  ensure_docker
  make_base
  make_wheelhouse
  build_image
  trap cleanup EXIT
  rm -rf "$RUNS" && mkdir -p "$RUNS" && chown 10001:10001 "$RUNS"  # the image's user
  check_default_run
  check_torchrun_one_container
  check_two_nodes
  check_docker_stop
  step "smoke passed in $((SECONDS - t0)) s"
}

main "$@"
