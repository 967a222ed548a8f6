# Sourced by the benchmark scripts: start_head RUN_DIR [eep-hpc serve options...] starts a head in the background
# (log in RUN_DIR/head.log), sets HEAD to its pid and returns once it serves (RUN_DIR/head.json exists).
start_head() {
  local run_dir=$1
  shift
  ${EEP_PYTHON:-python3} -m eep_hpc.cli serve "$@" --port 0 --run-dir "$run_dir" > "$run_dir/head.log" 2>&1 &
  HEAD=$!
  for _ in $(seq 1200); do
    [ -f "$run_dir/head.json" ] && return 0
    kill -0 $HEAD 2>/dev/null || { tail -50 "$run_dir/head.log"; return 1; }
    sleep 0.5
  done
  echo "the head did not start in 600 s" >&2
  return 1
}
