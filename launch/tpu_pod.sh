#!/usr/bin/env bash
# Runs one medee_jax training job on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#
# Every worker runs the same command; jax.distributed initialises itself on TPU (train.distributed=auto), each
# host reads its own shard of the data, and WORKDIR must be storage all workers share (e.g. a bucket path or a
# shared filesystem) so checkpoints and the resume point are common. The repository is expected at ~/medee_jax on
# every worker (copy it with `gcloud compute tpus tpu-vm scp --worker=all`).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/medee_jax && pip install -q -e . && python -m medee_jax.train --config $config --workdir $workdir$overrides"
