#!/bin/bash
# The one-GPU lab for multi-rank work: EP=1 and EP=2 on the same GPU (two rank processes share it), nixl_ep, the
# same load on each; then EP=2 while the group scales 2 -> 1 -> 2. Results: bench JSON (with per-rank step
# counters and scale events) under DEST.
#   bash sbatch/ep-lab.sh                         (one GPU; MPS=1 runs the two ranks under an MPS daemon, each
#                                                  limited to MPS_PERCENT (50) % of the SMs when two share it)
# Env: CONFIG (configs/qwen3-30b-a3b-dummy-ep2.toml), RANKS_LIST ("1 2"), PROMPTS (256), IN_LEN/OUT_LEN (128/128),
# CONCURRENCY (64), KV_BLOCKS (4096 per rank: fixed, since two ranks on one GPU cannot size by free memory),
# GRAPH_MAX (64: largest decode graph), MAX_RANKS (2: the nixl_ep layout's seats), STAGES ("steady scaling"), PLAN (1,2; `rebalance` steps too), DEST
# (results/<gpu>-lab), SERVE_ARGS (more `eep-hpc serve` arguments), TAG (a name part of the result files),
# LAYERS (the model's shapes cut to this many layers: on one GPU a grow's weights cross the loopback socket at
# ~0.1 GB/s while the ranks serve, so 48 layers take many minutes; 4 keeps a grow under a minute).
#SBATCH --job-name=eep-ep-lab
#SBATCH --nodes=1
#SBATCH --gpus=1
#SBATCH --time=30
#SBATCH --output=%x-%j.out
set -euo pipefail
PY=${EEP_PYTHON:-python3}
CONFIG=${CONFIG:-configs/qwen3-30b-a3b-dummy-ep2.toml}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9.\n-' '-')
DEST=${DEST:-results/$GPU-lab}
PROMPTS=${PROMPTS:-256}
STAGES=${STAGES:-steady scaling}
mkdir -p "$DEST"
if [[ ${MPS:-0} == 1 ]]; then
  export CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d) CUDA_MPS_LOG_DIRECTORY=$(mktemp -d)
  nvidia-cuda-mps-control -d
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
source sbatch/head-lib.sh  # run from the repository root
if [[ -n ${LAYERS:-} ]]; then
  MODEL_DIR=$(mktemp -d)
  $PY -c "import json, sys; c = json.load(open('configs/models/qwen3-30b-a3b/config.json'));
c['num_hidden_layers'] = int(sys.argv[1]); json.dump(c, open(sys.argv[2] + '/config.json', 'w'))" "$LAYERS" "$MODEL_DIR"
  SERVE_ARGS="--set model.path=$MODEL_DIR ${SERVE_ARGS:-}"
fi
bench() { $PY -m eep_hpc.cli bench --run-dir "$RUN_DIR" --random-input-len "${IN_LEN:-128}" \
  --random-output-len "${OUT_LEN:-128}" --max-concurrency "${CONCURRENCY:-64}" "$@" || true; }
for RANKS in ${RANKS_LIST:-1 2}; do
  RUN_DIR=$(mktemp -d)
  # under MPS the ranks' nixl_ep combines time out: the cooperative low-latency kernels need SMs a percentage does
  # not reserve (results/README.md, "MPS in the lab, found"); kept for a machine with MPS static partitioning
  if [[ ${MPS:-0} == 1 && $RANKS == 2 ]]; then export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${MPS_PERCENT:-50}
  else unset CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; fi
  T0=$(date +%s)
  start_head "$RUN_DIR" --config "$CONFIG" --ranks "$RANKS" --set parallel.backend=nixl_ep \
    --set engine.num_kv_blocks="${KV_BLOCKS:-4096}" --set engine.cuda_graph_max_batch="${GRAPH_MAX:-64}" \
    --set adapt.max_ranks="${MAX_RANKS:-2}" ${SERVE_ARGS:-}
  echo "ep$RANKS: serving after $(( $(date +%s) - T0 )) s (run dir $RUN_DIR)"
  [[ " $STAGES " == *" steady "* ]] && bench --num-prompts "$PROMPTS" --result-file "$DEST/ep$RANKS-nixl_ep${TAG:-}-steady.json"
  if [[ $RANKS == 2 && " $STAGES " == *" scaling "* ]]; then
    # what `eep-hpc status` says of each event while it runs (its expert reads, as the ranks report them)
    ( while kill -0 $HEAD 2>/dev/null; do
        echo "--- $(date +%T)"; $PY -m eep_hpc.cli status --run-dir "$RUN_DIR" 2>&1 | grep -v "^layer"; sleep 3
      done ) > "$DEST/ep$RANKS${TAG:-}-scaling-status.txt" 2>&1 &
    bench --num-prompts $((PROMPTS * 2)) --scale-plan "${PLAN:-1,2}" --scale-interval 8 \
      --result-file "$DEST/ep$RANKS-nixl_ep${TAG:-}-scaling.json"
  fi
  $PY -m eep_hpc.cli status --run-dir "$RUN_DIR" 2>&1 | grep -v "^layer" || true
  kill -INT $HEAD; wait $HEAD || true
  grep -E "ERROR|Traceback" "$RUN_DIR/head.log" | head -20 || true
  { cat "$RUN_DIR/head.log"; find "$RUN_DIR" -name "*.err" -exec tail -n 30 {} +; } > "$DEST/ep$RANKS${TAG:-}-logs.txt" 2>&1 || true
done
echo "results in $DEST"
