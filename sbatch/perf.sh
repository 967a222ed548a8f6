#!/bin/bash
# The one-GPU performance run (issue #6): the seed's workload, batch-1 decode, a subset the transformers peer runs
# too, the peer itself, and the memory roofline. One head serves all eep-hpc stages; the peer runs after it stops.
#   sbatch --gpus=1 sbatch/perf.sh        (or `bash sbatch/perf.sh` on a GPU machine)
# Env: CONFIG (default configs/qwen3-30b-a3b-dummy.toml), SERVE_ARGS (more `eep-hpc serve` options, e.g.
# "--set engine.max_num_seqs=512"), TAG (result file prefix, default the config's name), DEST (default
# results/<gpu name>), STAGES (default "seed batch1 subset profile peer roofline"; also "burst", "prefill"), PEER_BATCHES (default "1 64"),
# BURST_CLIENTS (the bench's --http-client for the bursts; default lean).
#SBATCH --job-name=eep-perf
#SBATCH --nodes=1
#SBATCH --time=60
#SBATCH --output=%x-%j.out
set -euo pipefail
PY=${EEP_PYTHON:-python3}
CONFIG=${CONFIG:-configs/qwen3-30b-a3b-dummy.toml}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9.\n-' '-')
DEST=${DEST:-results/$GPU}
STAGES=${STAGES:-"seed batch1 subset profile peer roofline"}
MODEL_DIR=$($PY -c "from eep_hpc.config import load_config; print(load_config('$CONFIG').model.path)")
TAG=${TAG:-$(basename "$CONFIG" .toml)}
mkdir -p "$DEST"
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has seed || has batch1 || has subset || has burst || has prefill; then
  RUN_DIR=$(mktemp -d)
  source sbatch/head-lib.sh  # run from the repository root (as sbatch does from the submit dir)
  trap 'kill -INT $HEAD 2>/dev/null; wait $HEAD 2>/dev/null || true; cp "$RUN_DIR/head.log" "$DEST/$TAG-head.log" 2>/dev/null || true' EXIT
  start_head "$RUN_DIR" --config "$CONFIG" ${SERVE_ARGS:-}
  bench() { $PY -m eep_hpc.cli bench --run-dir "$RUN_DIR" "$@"; }
  # bursts first, on the fresh head: 64 prompts of 128 / 128 sent at once, five times back to back, each with
  # prompts of its own (--seed: no prefix-cache hits from the one before)
  # (BURST_CLIENTS="lean httpx": five with each of the bench's HTTP clients, taking turns, each burst with prompts
  # of its own)
  if has burst; then seed=0; for k in 1 2 3 4 5; do for client in ${BURST_CLIENTS:-lean}; do
    seed=$((seed + 1)); name=$TAG-burst-$k; [[ -n ${BURST_CLIENTS:-} ]] && name=$TAG-burst-$client-$k
    bench --num-prompts 64 --random-input-len 128 --random-output-len 128 --max-concurrency 64 --seed $seed \
      --http-client $client --result-file "$DEST/$name.json"
  done; done; fi
  # the seed: 512 prompts, random 128 in / 512 out, all sent at once
  has seed && bench --num-prompts 512 --random-input-len 128 --random-output-len 512 --result-file "$DEST/$TAG-seed-512x128x512.json"
  # batch-1 decode: one request at a time
  has batch1 && bench --num-prompts 8 --random-input-len 128 --random-output-len 256 --max-concurrency 1 --result-file "$DEST/$TAG-batch1.json"
  # prefill-heavy: 256 prompts, 1,024 in / 128 out, all at once
  has prefill && bench --num-prompts 256 --random-input-len 1024 --random-output-len 128 --seed 7 --result-file "$DEST/$TAG-prefill-256x1024x128.json"
  # the subset the peer runs: static batches of 1 and 64, 128 in / 128 out
  has subset && bench --num-prompts 64 --random-input-len 128 --random-output-len 128 --max-concurrency 64 --result-file "$DEST/$TAG-subset-64x128x128.json"
  kill -INT $HEAD; wait $HEAD || true
  cp "$RUN_DIR/head.log" "$DEST/$TAG-head.log"
  trap - EXIT
fi
has profile && $PY -m eep_hpc.bench.step_profile --config "$CONFIG" --batch 1 8 64 128 256 --context 320 --out "$DEST/$TAG-step-profile.json"
has peer && $PY -m eep_hpc.bench.hf_peer "$MODEL_DIR" --batch ${PEER_BATCHES:-1 64} --input-len 128 --output-len 128 --out "$DEST/hf-peer.json"
has roofline && $PY -m eep_hpc.bench.roofline "$MODEL_DIR" --measure --batch 1 64 110 256 512 --context 320 > "$DEST/roofline.json"
echo "results in $DEST"
