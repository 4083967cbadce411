#!/usr/bin/env bash
# medee_jax on a Cloud TPU VM slice: create it, set up every worker, train, watch, stop cleanly, delete it.
#
#   launch/tpu_pod.sh [--dry-run] [--name NAME] [--zone ZONE] [--project PROJECT] COMMAND [OPTIONS]
#
# Commands:
#   create --type TYPE [--version RUNTIME] [--spot]   create the slice (TYPE e.g. v5p-8, v5p-32, v6e-8)
#   setup [--jax-spec SPEC] [--no-gcsfuse]            copy this checkout's HEAD (git archive) to every worker,
#                                                    pip install it with SPEC (default 'jax[tpu]') and gcsfuse
#   train --config CFG --workdir DIR [--foreground] [-- --config.x=y ...]
#                                                    start `python -m medee_jax.train` on every worker, in the
#                                                    background (logs: ~/medee_jax_logs/train.log on each worker)
#   run -- COMMAND...                                 run a shell command on every worker (in ~/medee_jax)
#   ssh [--worker N]                                  interactive shell on worker N (default 0)
#   logs [--worker N|all] [--lines N] [--follow]      the training log (default worker 0, the one that prints)
#   wait [--poll SECONDS]                             block until the trainer has exited on every worker; exit with
#                                                    its status (0: done or preempted, as the trainer reports)
#   stop [--timeout SECONDS]                          SIGTERM the trainer on every worker (it saves a checkpoint and
#                                                    exits), wait for it (default 600 s)
#   delete                                            delete the slice
#
# --dry-run prints every command (gcloud, git) exactly as it would run, one per line, and runs none.
# Defaults come from TPU_NAME, TPU_ZONE, TPU_PROJECT (else gcloud's configured project).
#
# Storage: every worker must see the same workdir (checkpoints, the resume point, metrics). A gs://BUCKET/PATH in
# --workdir or in a --config override is mounted with gcsfuse at /mnt/gcs/BUCKET on every worker and the mounted
# path is passed to the trainer (the trainer opens its workdir with local file APIs; Orbax writes through the
# mount). Multi-host slices start jax.distributed from the TPU metadata (--config.train.distributed=true).
set -euo pipefail

# Paths on the workers, written with ~ on purpose: the worker's shell expands them, not this one.
# shellcheck disable=SC2088
readonly REMOTE_DIR='~/medee_jax' LOG_DIR='~/medee_jax_logs'
readonly GCS_MOUNT_ROOT=/mnt/gcs
PYTHON_BIN=${MEDEE_PYTHON:-python3}

dry_run=0
name=${TPU_NAME:-}
zone=${TPU_ZONE:-}
project=${TPU_PROJECT:-}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

# Prints one word quoted for a POSIX shell: as is when it is plain, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./~-]+$ && $1 != '~'* ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints the words as one shell command line.
quote_line() {
  local word sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    quote "$word"
    sep=" "
  done
}

# Runs a command, or prints it (one line that a shell would run as the same words) under --dry-run.
run() {
  if ((dry_run)); then
    quote_line "$@"
    printf '\n'
  else
    "$@"
  fi
}

gcloud_tpu() {
  local args=(gcloud compute tpus tpu-vm "$@" --zone="$zone")
  if [[ -n $project ]]; then
    args+=(--project="$project")
  fi
  run "${args[@]}"
}

# Runs a shell command line on workers ("all" or an index).
on_workers() {
  local worker=$1 command_line=$2
  gcloud_tpu ssh "$name" --worker="$worker" --command="$command_line"
}

# Prints the default runtime version for an accelerator type.
runtime_for() {
  case $1 in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator type '$1'; pass --version" ;;
  esac
}

# Sets `mapped` to the value with gs://BUCKET/PATH -> /mnt/gcs/BUCKET/PATH and adds the bucket names to `buckets`
# (globals: a command substitution would lose them).
buckets=()
mapped=""
to_mounted() {
  local value=$1 rest bucket
  rest=$value
  while [[ $rest == *gs://* ]]; do
    rest=${rest#*gs://}
    bucket=${rest%%/*}
    [[ -n $bucket ]] || die "empty bucket name in '$value'"
    if [[ " ${buckets[*]} " != *" $bucket "* ]]; then
      buckets+=("$bucket")
    fi
  done
  mapped=${value//gs:\/\//$GCS_MOUNT_ROOT/}
}

mount_commands() {
  local bucket mountpoint out=""
  for bucket in "${buckets[@]}"; do
    mountpoint=$GCS_MOUNT_ROOT/$bucket
    out+="sudo mkdir -p $mountpoint && sudo chown \"\$USER\" $mountpoint && "
    out+="{ mountpoint -q $mountpoint || gcsfuse --implicit-dirs $bucket $mountpoint; } && "
  done
  printf '%s' "$out"
}

cmd_create() {
  local type="" version="" spot=0
  while (($#)); do
    case $1 in
      --type) type=${2:?--type needs a value}; shift 2 ;;
      --version) version=${2:?--version needs a value}; shift 2 ;;
      --spot) spot=1; shift ;;
      *) die "create: unknown option '$1'" ;;
    esac
  done
  [[ -n $type ]] || die "create: --type is required (e.g. v5p-8)"
  [[ -n $version ]] || version=$(runtime_for "$type")
  local args=(create "$name" --accelerator-type="$type" --version="$version")
  if ((spot)); then
    args+=(--spot)
  fi
  gcloud_tpu "${args[@]}"
}

cmd_setup() {
  local jax_spec='jax[tpu]' gcsfuse=1
  while (($#)); do
    case $1 in
      --jax-spec) jax_spec=${2:?--jax-spec needs a value}; shift 2 ;;
      --no-gcsfuse) gcsfuse=0; shift ;;
      *) die "setup: unknown option '$1'" ;;
    esac
  done
  local repo archive
  repo=$(cd "$(dirname "$0")/.." && pwd)
  archive=${TMPDIR:-/tmp}/medee_jax-$name.tar.gz
  run git -C "$repo" archive --format=tar.gz --output="$archive" HEAD
  gcloud_tpu scp "$archive" "$name:medee_jax.tar.gz" --worker=all
  local remote="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR $LOG_DIR && tar -xzf ~/medee_jax.tar.gz -C $REMOTE_DIR"
  remote+=" && $PYTHON_BIN -m pip install -q --upgrade pip"
  remote+=" && $PYTHON_BIN -m pip install -q -e $REMOTE_DIR $(quote "$jax_spec")"
  if ((gcsfuse)); then
    remote+=" && { command -v gcsfuse >/dev/null || { curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
    remote+=" | sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg"
    remote+=" && echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt"
    remote+=" gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
    remote+=" && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }; }"
  fi
  remote+=" && $PYTHON_BIN -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
  on_workers all "$remote"
}

cmd_train() {
  local config="" workdir="" foreground=0
  while (($#)); do
    case $1 in
      --config) config=${2:?--config needs a value}; shift 2 ;;
      --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
      --foreground) foreground=1; shift ;;
      --) shift; break ;;
      *) die "train: unknown option '$1' (config overrides go after --)" ;;
    esac
  done
  [[ -n $config ]] || die "train: --config is required (e.g. configs/dpo.py:qwen2_5_vl_7b)"
  [[ -n $workdir ]] || die "train: --workdir is required (storage every worker sees, e.g. gs://BUCKET/runs/stage1)"
  local argv=("$PYTHON_BIN" -m medee_jax.train --config "$config")
  to_mounted "$workdir"
  argv+=(--workdir "$mapped" --config.train.distributed=true)
  local override
  for override in "$@"; do
    to_mounted "$override"
    argv+=("$mapped")
  done
  local python_line mounts
  python_line=$(quote_line "${argv[@]}")
  mounts=$(mount_commands)
  local remote="if pid=\$(cat $LOG_DIR/train.pid 2>/dev/null) && kill -0 \"\$pid\" 2>/dev/null; then"
  remote+=" echo \"worker \$(hostname): a trainer is already running (pid \$pid); stop it first\" >&2; exit 1; fi; "
  if ((foreground)); then
    remote+="cd $REMOTE_DIR && mkdir -p $LOG_DIR && ${mounts}$python_line 2>&1 | tee $LOG_DIR/train.log"
  else
    # A detached shell starts the trainer, records its pid (`stop` signals the trainer itself) and, when it exits,
    # its exit status (`wait`).
    local inner="rm -f $LOG_DIR/train.status; $python_line & echo \$! > $LOG_DIR/train.pid; wait \$!;"
    inner+=" echo \$? > $LOG_DIR/train.status"
    # Only the trainer's shell goes to the background (with its own output), so the ssh session ends at once.
    remote+="{ cd $REMOTE_DIR && mkdir -p $LOG_DIR && ${mounts}true; } || exit 1; nohup bash -c $(quote "$inner")"
    remote+=" > $LOG_DIR/train.log 2>&1 < /dev/null & echo \"worker \$(hostname): started, log $LOG_DIR/train.log\""
  fi
  on_workers all "$remote"
}

cmd_run() {
  [[ ${1:-} == -- ]] && shift
  (($#)) || die "run: give a command after --"
  on_workers all "cd $REMOTE_DIR && $*"
}

cmd_ssh() {
  local worker=0
  while (($#)); do
    case $1 in
      --worker) worker=${2:?--worker needs a value}; shift 2 ;;
      *) die "ssh: unknown option '$1'" ;;
    esac
  done
  gcloud_tpu ssh "$name" --worker="$worker"
}

cmd_logs() {
  local worker=0 lines=50 follow=0
  while (($#)); do
    case $1 in
      --worker) worker=${2:?--worker needs a value}; shift 2 ;;
      --lines) lines=${2:?--lines needs a value}; shift 2 ;;
      --follow) follow=1; shift ;;
      *) die "logs: unknown option '$1'" ;;
    esac
  done
  local tail_args="-n $lines"
  if ((follow)); then
    tail_args+=" -F"
  fi
  on_workers "$worker" "tail $tail_args $LOG_DIR/train.log"
}

cmd_stop() {
  local timeout=600
  while (($#)); do
    case $1 in
      --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
      *) die "stop: unknown option '$1'" ;;
    esac
  done
  local remote="pid=\$(cat $LOG_DIR/train.pid 2>/dev/null) && kill -0 \"\$pid\" 2>/dev/null"
  remote+=" || { echo \"worker \$(hostname): no trainer running\"; exit 0; };"
  remote+=" kill -TERM \"\$pid\"; for _ in \$(seq $timeout); do kill -0 \"\$pid\" 2>/dev/null || exit 0; sleep 1; done;"
  remote+=" echo \"worker \$(hostname): trainer \$pid still running after ${timeout}s\" >&2; exit 1"
  on_workers all "$remote"
}

cmd_wait() {
  local poll=30
  while (($#)); do
    case $1 in
      --poll) poll=${2:?--poll needs a value}; shift 2 ;;
      *) die "wait: unknown option '$1'" ;;
    esac
  done
  local remote="pid=\$(cat $LOG_DIR/train.pid 2>/dev/null) || { echo \"worker \$(hostname): never started\" >&2; exit 2; };"
  remote+=" while kill -0 \"\$pid\" 2>/dev/null; do sleep $poll; done; sleep 1;"
  remote+=" status=\$(cat $LOG_DIR/train.status 2>/dev/null || echo 1);"
  remote+=" echo \"worker \$(hostname): trainer exited with status \$status\"; exit \"\$status\""
  on_workers all "$remote"
}

cmd_delete() {
  (($# == 0)) || die "delete: takes no options"
  gcloud_tpu delete "$name" --quiet
}

main() {
  while (($#)); do
    case $1 in
      --dry-run) dry_run=1; shift ;;
      --name) name=${2:?--name needs a value}; shift 2 ;;
      --zone) zone=${2:?--zone needs a value}; shift 2 ;;
      --project) project=${2:?--project needs a value}; shift 2 ;;
      -h | --help) usage; exit 0 ;;
      -*) die "unknown option '$1' (see --help)" ;;
      *) break ;;
    esac
  done
  (($#)) || { usage >&2; exit 2; }
  local command=$1
  shift
  [[ -n $name ]] || die "--name (or TPU_NAME) is required"
  [[ -n $zone ]] || die "--zone (or TPU_ZONE) is required"
  case $command in
    create | setup | train | run | ssh | logs | wait | stop | delete) "cmd_$command" "$@" ;;
    *) die "unknown command '$command' (create, setup, train, run, ssh, logs, wait, stop, delete)" ;;
  esac
}

main "$@"
