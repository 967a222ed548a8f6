#!/bin/bash
# Serving benchmark on one node: start a head on this node's GPUs, run `eep-hpc bench` against it, stop it.
#   sbatch --gpus=1 sbatch/bench.sh [CONFIG] [NUM_PROMPTS] [IN] [OUT] [RANKS] [EXTRA BENCH ARGS...]
#   (or plain `bash sbatch/bench.sh ...` on a machine with GPUs). Results: bench/*.json, one per run.
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
RUN_DIR=$(mktemp -d)
$PY -m eep_hpc.cli serve --config "$CONFIG" ${SERVE_ARGS:-} --ranks "$RANKS" --port 0 --run-dir "$RUN_DIR" > "$RUN_DIR/head.log" 2>&1 &
HEAD=$!
trap 'kill -INT $HEAD 2>/dev/null; wait $HEAD 2>/dev/null || true' EXIT
for _ in $(seq 1200); do
  [ -f "$RUN_DIR/head.json" ] && break
  kill -0 $HEAD 2>/dev/null || { cat "$RUN_DIR/head.log"; exit 1; }
  sleep 0.5
done
$PY -m eep_hpc.cli bench --run-dir "$RUN_DIR" --num-prompts "$NUM_PROMPTS" --random-input-len "$IN" \
  --random-output-len "$OUT" "$@"
