#!/bin/bash
# Expert parallelism on the GPUs of one node, per all-to-all backend (torch = NCCL, nixl_ep): steady-state load,
# then the same load while a scale plan shrinks and grows the group. One head per backend; results are bench JSON
# (with scale_events) under DEST.
#   EP=2 (issue #7):  bash sbatch/ep-compare.sh                       (2 GPUs)
#   EP=8 (issue #9):  RANKS=8 PLAN=4,8 PROMPTS=512 OUT_LEN=512 CONCURRENCY=512 bash sbatch/ep-compare.sh   (8 GPUs)
#   (or sbatch --gpus=N sbatch/ep-compare.sh with the same variables)
# Env: CONFIG (default configs/qwen3-30b-a3b-dummy-ep2.toml), RANKS (default 2), BACKENDS (default "torch nixl_ep"),
# PLAN (default 1,2,1,2), PROMPTS (default 192; the scaling run sends twice as many), IN_LEN/OUT_LEN (128/128),
# CONCURRENCY (64), TOKENS (max_num_batched_tokens, default 8192: bigger steps run their MoE in agreed chunks of
# parallel.moe_chunk_tokens), STAGES
# (default "steady scaling"), DEST (default results/<gpu name>-x<RANKS>).
#SBATCH --job-name=eep-ep
#SBATCH --nodes=1
#SBATCH --time=60
#SBATCH --output=%x-%j.out
set -euo pipefail
PY=${EEP_PYTHON:-python3}
CONFIG=${CONFIG:-configs/qwen3-30b-a3b-dummy-ep2.toml}
RANKS=${RANKS:-2}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9.\n-' '-')
DEST=${DEST:-results/$GPU-x$RANKS}
PROMPTS=${PROMPTS:-192}
STAGES=${STAGES:-steady scaling}
TAG=ep$RANKS
mkdir -p "$DEST"
source sbatch/head-lib.sh  # run from the repository root (as sbatch does from the submit dir)
for BACKEND in ${BACKENDS:-torch nixl_ep}; do
  RUN_DIR=$(mktemp -d)
  start_head "$RUN_DIR" --config "$CONFIG" --ranks "$RANKS" --set parallel.backend="$BACKEND" \
    --set engine.max_num_batched_tokens="${TOKENS:-8192}"
  bench() { $PY -m eep_hpc.cli bench --run-dir "$RUN_DIR" --random-input-len "${IN_LEN:-128}" \
    --random-output-len "${OUT_LEN:-128}" --max-concurrency "${CONCURRENCY:-64}" "$@" || true; }
  [[ " $STAGES " == *" steady "* ]] && bench --num-prompts "$PROMPTS" --result-file "$DEST/$TAG-$BACKEND-steady.json"
  [[ " $STAGES " == *" scaling "* ]] && bench --num-prompts $((PROMPTS * 2)) --scale-plan "${PLAN:-1,2,1,2}" \
    --scale-interval 6 --result-file "$DEST/$TAG-$BACKEND-scaling.json"
  kill -INT $HEAD; wait $HEAD || true
  grep -E "ERROR|Traceback" "$RUN_DIR/head.log" | head -20 || true
done
echo "results in $DEST"
