#!/usr/bin/env bash
#SBATCH --job-name=medee_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
# One process per node, all of its GPUs as local devices; jax.distributed is started from the variables below.
#
#   sbatch --nodes=N launch/slurm_gpu.sh CONFIG WORKDIR [--config.x=y ...]
#
# WORKDIR must be on a filesystem every node sees (checkpoints, resume point, metrics).
set -euo pipefail
config=$1 workdir=$2
shift 2
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export JAX_COORDINATOR_ADDRESS="$head_node:${MEDEE_COORDINATOR_PORT:-12355}"
export JAX_NUM_PROCESSES=$SLURM_NNODES
srun bash -c 'JAX_PROCESS_ID=$SLURM_PROCID python -m medee_jax.train --config "$0" --workdir "$1" "${@:2}"' \
  "$config" "$workdir" "$@"
