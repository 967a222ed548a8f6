#!/bin/bash
# Serving benchmark on one node: start a head on this node's GPUs, run `eep-hpc bench` against it, stop it.
#   sbatch --gpus=1 sbatch/bench.sh [CONFIG] [NUM_PROMPTS] [IN] [OUT] [RANKS] [EXTRA BENCH ARGS...]
#   (or plain `bash sbatch/bench.sh ...` on a machine with GPUs). Results: one JSON per run in DEST (default
#   results/<gpu name>), named <date>-<config>-<prompts>x<in>x<out>.json; a --result-file among the extra args wins.
#   SERVE_ARGS adds `eep-hpc serve` options, e.g. SERVE_ARGS="--set parallel.backend=nixl_ep".
#SBATCH --job-name=eep-bench
#SBATCH --nodes=1
#SBATCH --time=60
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=${1:-configs/qwen3-30b-a3b-dummy.toml}
NUM_PROMPTS=${2:-512}
IN=${3:-128}
OUT=${4:-512}
RANKS=${5:-1}
shift $(( $# < 5 ? $# : 5 ))
PY=${EEP_PYTHON:-python3}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9.\n-' '-')
DEST=${DEST:-results/$GPU}
mkdir -p "$DEST"
RUN_DIR=$(mktemp -d)
source sbatch/head-lib.sh  # run from the repository root (as sbatch does from the submit dir)
trap 'kill -INT $HEAD 2>/dev/null; wait $HEAD 2>/dev/null || true' EXIT
start_head "$RUN_DIR" --config "$CONFIG" ${SERVE_ARGS:-} --ranks "$RANKS"
$PY -m eep_hpc.cli bench --run-dir "$RUN_DIR" --num-prompts "$NUM_PROMPTS" --random-input-len "$IN" \
  --random-output-len "$OUT" \
  --result-file "$DEST/$(date +%Y%m%d-%H%M%S)-$(basename "$CONFIG" .toml)-${NUM_PROMPTS}x${IN}x${OUT}.json" "$@"
