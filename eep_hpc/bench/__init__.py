"""`eep-hpc bench`: a load generator against a running eep-hpc API (like `vllm bench serve`), with scale plans.

dataset.py     random token-id prompts of exact input/output lengths (seeded)
client.py      one streamed /v1/completions request, timed (TTFT, inter-token gaps, end-to-end)
driver.py      arrivals (Poisson or all at once), concurrency limit, progress line; keeps going while a plan runs
scale_plan.py  grow/shrink the serving group through the admin API while the load runs
metrics.py     vLLM-compatible summary (throughputs, mean/median/p99/std of TTFT, TPOT, ITL, E2EL)
report.py      the result JSON (with device, workload, command, scale events) and the printed table
cli.py         `add_bench_parser(subparsers)`: options, target discovery, and the run itself

Beside it, each run as `python -m eep_hpc.bench.NAME`: kernels (Triton kernels against the torch references),
step_profile (one step against the roofline), roofline (the bytes a decode step must read), hf_peer (transformers).
Results kept in the repository go to results/ (results/README.md).
"""
