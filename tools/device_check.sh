#!/usr/bin/env bash
# The device check for a lent accelerator (an NVIDIA H200): one run, at most 10 minutes, JSON lines on stdout
# (and in $OUT/device_check.jsonl when OUT is set). What it measures: tools/device_check.py's docstring.
#
#   bash tools/device_check.sh [--dry-run] [DEVICE_CHECK_PY_ARGS...]   # on the device machine, repository root
#   bash tools/device_check.sh --fetch-wheels [PACKAGE==VERSION ...]   # here, beforehand: wheels it lacks
#
# The device image has python3 (3.12) with jax + the CUDA 13 plugin, flax, optax and numpy, and no network. The
# check imports only those and medee_jax (from this checkout, by PYTHONPATH). If the image lacks a module, the
# preflight names it: fetch its wheels here with --fetch-wheels (CPython 3.12, manylinux x86_64, into .whl/) and
# carry .whl/; they are installed into /tmp/site with --no-index before the run.
# Environment: MEDEE_PYTHON (python3), DEVICE_CHECK_SECONDS (540: the Python part is stopped after this long),
# XLA_PYTHON_CLIENT_MEM_FRACTION (0.95).
set -euo pipefail

cd "$(dirname "$0")/.."
python_bin=${MEDEE_PYTHON:-python3}
wheels=.whl
limit=${DEVICE_CHECK_SECONDS:-540}
dry_run=0

# Prints one word quoted for a POSIX shell: as is when it is plain, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or prints it as one shell line under --dry-run.
run() {
  if ((dry_run)); then
    local word sep=""
    for word in "$@"; do
      printf '%s' "$sep"
      quote "$word"
      sep=" "
    done
    printf '\n'
  else
    "$@"
  fi
}

if [[ ${1:-} == --fetch-wheels ]]; then
  shift
  packages=("$@")
  if ((${#packages[@]} == 0)); then
    packages=(ml-collections)
  fi
  exec "$python_bin" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$wheels" "${packages[@]}"
fi
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONUNBUFFERED=1
if compgen -G "$wheels/*.whl" >/dev/null; then
  run "$python_bin" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if command -v nvidia-smi >/dev/null; then
  run nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
fi
# Preflight: an ImportError here names the module the image lacks (see --fetch-wheels).
run "$python_bin" -c "import jax, flax, optax, numpy, medee_jax.models.attention, medee_jax.training.steps"

log=/dev/null
if [[ -n ${OUT:-} ]]; then
  log=$OUT/device_check.jsonl
fi
status=0
if ((dry_run)); then
  run timeout --signal=TERM "$limit" "$python_bin" tools/device_check.py "$@"
else
  timeout --signal=TERM "$limit" "$python_bin" tools/device_check.py "$@" | tee "$log" || status=$?
fi
if ((status == 124)); then
  echo '{"section": "device_check", "error": "stopped after '"$limit"' s (DEVICE_CHECK_SECONDS)"}'
fi
exit "$status"
