#!/bin/bash
# The eep-hpc head job: API server + coordinator (+ ranks on this node's GPUs).
#   sbatch sbatch/head.sh [CONFIG] [RUN_DIR]      or   EEP_CONFIG=... EEP_RUN_DIR=... sbatch sbatch/head.sh
#SBATCH --job-name=eep-head
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=${1:-${EEP_CONFIG:-configs/tiny-cpu.toml}}
RUN_DIR=${2:-${EEP_RUN_DIR:-runs/${SLURM_JOB_ID:-local}}}
EEP=${EEP_HPC:-$(command -v eep-hpc || echo .venv/bin/eep-hpc)}
mkdir -p "$RUN_DIR"
# SIGTERM from Slurm (scancel, time limit) reaches the head, which stops its ranks before exiting
# ranks in node jobs reach the coordinator at this node's name
# shellcheck disable=SC2086  # EEP_HPC may be a command with arguments ("python -m eep_hpc.cli")
exec $EEP serve --config "$CONFIG" --run-dir "$RUN_DIR" --host "${EEP_HOST:-0.0.0.0}" ${EEP_PORT:+--port "$EEP_PORT"} \
  ${SLURM_JOB_ID:+--control-host "$(hostname)"}
