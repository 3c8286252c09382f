#!/usr/bin/env bash
# Regenerate docker/requirements.txt: the exact runtime pins of the pipelocal images, resolved
# from pyproject.toml's [project] dependencies by uv for the images' Python (CPython 3.11 on
# x86_64 Linux, Debian bookworm's python3), whatever machine runs this:
#
#   pip install -e ".[dev]"          # brings uv
#   docker/pin-requirements.sh       # rewrites docker/requirements.txt; commit it
#
# Run it whenever a dependency in pyproject.toml changes; tests/test_docker_pins.py fails while
# the pins lack a distribution that the installed project needs. The resolver prefers, where
# they fit, the versions installed in the environment running this script (the one the tests
# run in, so the image runs what was tested and the test walks the same dependency tree), then
# the versions already pinned; UPGRADE=1 ignores both and takes the newest allowed releases
# (then `pip install -r docker/requirements.txt` here, so the tests walk the same tree again).
#
# The resolver honours the constraint files that pip is configured with (pip.conf or
# PIP_CONSTRAINT), so the pins stay within what `pip download` in docker/smoke.sh can fetch here.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$REPO/docker/requirements.txt
PYTHON_VERSION=3.11                  # Debian bookworm's python3; the wheelhouse holds cp311 wheels
PLATFORM=x86_64-manylinux_2_28       # the torch wheels' platform tag

command -v uv >/dev/null || {
  echo "pin-requirements: uv not found on PATH; install it with: pip install -e \".[dev]\"" >&2
  exit 1
}

# pip config prints e.g. global.constraint='/etc/pip/constraints.txt' (space-separated lists).
constraint_args=()
for file in $(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.constraint='\(.*\)'$/\1/p") \
  ${PIP_CONSTRAINT:-}; do
  constraint_args+=(--constraint "$file")
done

upgrade_args=()
[[ ${UPGRADE:-0} == 1 ]] && upgrade_args=(--upgrade)

body=$(mktemp)
trap 'rm -f "$body"' EXIT
if [[ ${UPGRADE:-0} != 1 ]]; then
  # uv prefers the versions pinned in its output file: seed it with the installed versions,
  # then the current pins, one line per (normalised) name.
  { python3 -m pip list --format=freeze --exclude-editable 2>/dev/null
    if [[ -f $OUT ]]; then grep -E '^[A-Za-z0-9]' "$OUT" || true; fi
  } | awk -F'==' 'NF == 2 { n = tolower($1); gsub(/[-_.]+/, "-", n); if (!seen[n]++) print n "==" $2 }' \
    >"$body"
fi
(cd "$REPO" && uv pip compile pyproject.toml --quiet --no-header --no-emit-index-url \
  --no-emit-find-links --python-version "$PYTHON_VERSION" --python-platform "$PLATFORM" \
  "${constraint_args[@]}" "${upgrade_args[@]}" --output-file "$body")

{
  cat <<EOF
# Exact runtime pins of the pipelocal images (CPython $PYTHON_VERSION, $PLATFORM): the dependency
# closure of pyproject.toml's [project] dependencies. Generated, do not edit by hand:
#
#   docker/pin-requirements.sh       # after any change to the dependencies in pyproject.toml
#
# Both the wheelhouse step (docker/smoke.sh, \`pip download -r\`) and the Dockerfiles
# (\`pip install --no-index --find-links /wheels -r\`) read this file; tests/test_docker_pins.py
# checks that it covers every distribution the installed project needs.
EOF
  cat "$body"
} >"$OUT"
echo "pin-requirements: wrote $(grep -c '==' "$OUT") pins to ${OUT#"$REPO"/}"
