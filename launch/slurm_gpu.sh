#!/usr/bin/env bash
#SBATCH --job-name=medee_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
# Former name of launch/slurm_gpu.sbatch, kept so existing job scripts keep working; same arguments:
#   sbatch --nodes=N launch/slurm_gpu.sh CONFIG WORKDIR [--config.x=y ...]    (from the repository root)
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: find the repository from the submit directory.
exec bash "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/launch/slurm_gpu.sbatch" "$@"
