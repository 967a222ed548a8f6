"""One rank's engine core, in process: scheduler + KV blocks + model runner + sampler, for the current epoch.

It knows nothing of sockets: `add`, `abort`, `demand`, `step` and `stats` are plain calls (tests drive it directly);
the rank process (rank/process.py) feeds it from ZMQ. In a multi-rank epoch a step is `demand()` (schedule, and say
what the batch needs), one agreement with the other ranks (parallel/step_plan.py), then `step(plan)`, which runs
every layer even with an empty batch, because the MoE collectives of an epoch need every member. Alone, `step()`
plans for itself.
"""

from __future__ import annotations

import gc
import logging

import torch

from eep_hpc.config import Config
from eep_hpc.engine.block_manager import BlockManager
from eep_hpc.engine.model_runner import ModelRunner
from eep_hpc.engine.sampler import logprobs_of_tokens, sample, sampled_logprobs
from eep_hpc.engine.scheduler import Scheduler, SchedulerOutput
from eep_hpc.engine.sequence import Sequence, SequenceStatus
from eep_hpc.model.arch import MoEArch
from eep_hpc.model.decoder import MoEForCausalLM
from eep_hpc.model.moe import ExpertParallel
from eep_hpc.parallel import step_plan
from eep_hpc.parallel.expert_transfer import SlotTensors
from eep_hpc.parallel.step_plan import GraphSizes, StepDemand, StepPlan
from eep_hpc.protocol import AddRequest, Logprobs, RankStats, RequestOutput, SamplingParams

log = logging.getLogger("eep_hpc.rank")


def resolve_dtype(cfg: Config, arch: MoEArch, device: torch.device) -> torch.dtype:
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in bf16 are slow and less exact
    return arch.torch_dtype if arch.torch_dtype != torch.float32 else torch.bfloat16


def max_model_len(cfg: Config, arch: MoEArch) -> int:
    return min(cfg.model.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)


def num_kv_blocks_for(cfg: Config, model: MoEForCausalLM, device: torch.device, dtype: torch.dtype) -> int:
    e = cfg.engine
    if e.num_kv_blocks:
        return e.num_kv_blocks
    per_block = model.kv_cache_bytes_per_block(e.block_size, dtype)
    if device.type == "cuda":
        # memory torch's allocator keeps cached but unused (the fp32 temporaries of quantising weights at load:
        # tens of GB) is free for the cache: give it back first, or the driver counts it as taken
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = free - total * (1 - e.gpu_memory_utilization)
    else:
        budget = e.kv_cache_gib * 2**30
    blocks = int(budget // per_block)
    log.info("KV cache: %d blocks of %d tokens (%.1f GiB)", blocks, e.block_size, blocks * per_block / 2**30)
    if blocks < 2:
        raise RuntimeError(f"no room for a KV cache: {budget / 2**20:.0f} MiB left, {per_block} bytes per block")
    return blocks


class RankEngine:
    def __init__(self, cfg: Config, model: MoEForCausalLM, ep: ExpertParallel, num_kv_blocks: int,
                 eos_token_ids: list[int], device: torch.device, dtype: torch.dtype):
        self.cfg, self.model, self.ep, self.device = cfg, model, ep, device
        self.max_model_len = max_model_len(cfg, model.arch)
        self.block_manager = BlockManager(num_kv_blocks, cfg.engine.block_size, cfg.engine.enable_prefix_caching)
        self.scheduler = Scheduler(cfg.engine, self.block_manager, self.max_model_len, eos_token_ids)
        e = cfg.engine
        graph_batch = (e.cuda_graph_max_batch or e.max_num_seqs) if e.cuda_graphs else 0
        graph_tokens = min(e.cuda_graph_max_tokens, e.max_num_batched_tokens) if e.cuda_graphs else 0
        self.runner = ModelRunner(model, num_kv_blocks, e.block_size, device, dtype, graph_batch, self.max_model_len,
                                  graph_tokens)
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg.engine.seed)
        self.steps = 0
        self._scheduled: SchedulerOutput | None = None  # scheduled by demand(), run by the next step()
        if ep is not None:
            self.enter_epoch(ep)

    def enter_epoch(self, ep: ExpertParallel) -> None:
        """Serve with `ep` from now on; on CUDA, with every member of the epoch: compile the prefill kernels and
        capture the graphs (collectives run in both, in the same order on every rank)."""
        self.ep = ep
        if self.runner.graphs is not None:  # captured with the old slots and map
            self.runner.graphs.reset()
        if self.device.type == "cuda":
            self.runner.warmup(self.cfg.engine.max_num_batched_tokens, ep, self.chunk_tokens)
            if self.runner.graphs is not None:
                self.runner.graphs.capture_all(ep, self.chunk_tokens)
            self.warm_requests()

    def warm_requests(self) -> None:
        """Serve a few made-up requests before real ones: the whole step path (scheduler, eager prefill of odd
        sizes, a mixed prefill + decode step, graph replays, LM head, greedy and random sampling with penalties) runs
        once, so the Triton kernels' variants that only these reach are compiled now. Without it the first burst
        after start waited about a second for the JIT (H100: mean TTFT 1.19 s, then 0.14-0.18 s). The same requests
        on every rank of the epoch, each planning alone: identical batches give identical plans, so the MoE
        collectives line up. Nothing of them stays: KV blocks, expert load, step count, random state are reset."""
        if self.scheduler.has_work():
            return
        limit = self.cfg.engine.max_num_batched_tokens
        vocab = self.model.arch.vocab_size
        greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, top_k=40, presence_penalty=0.5,
                                 repetition_penalty=1.1, ignore_eos=True)
        waves = [[(17, greedy)], [(min(129, self.max_model_len - 4), sampled)] * 9,
                 [(max(1, min(self.max_model_len - 4, limit // 8 - 3)), greedy)] * 7]
        load = self.ep.load.clone()
        n = 0
        for wave in waves:
            for length, sampling in wave:
                n += 1
                prompt = [(n * 7919 + i * 104729) % vocab for i in range(length)]
                self.add(AddRequest(request_id=f"warm-{n}", prompt_token_ids=prompt, sampling=sampling))
            self.step()  # the new prompts, alongside the previous wave's decodes: a mixed step
        while self.has_work():
            self.step()
        self.ep.load.copy_(load)
        self.steps = 0
        self.generator.manual_seed(self.cfg.engine.seed)
        self.block_manager.num_queried_tokens = self.block_manager.num_hit_tokens = 0
        if self.runner.graphs is not None:
            self.runner.graphs.replays = 0

    @property
    def chunk_tokens(self) -> int:
        """Tokens per rank one MoE dispatch carries in this epoch (0: no limit, one rank)."""
        if self.ep is None or self.ep.map.num_ranks == 1:
            return 0
        return getattr(self.ep.all_to_all, "max_tokens", 0) or self.cfg.parallel.moe_chunk_tokens

    def add(self, msg: AddRequest) -> None:
        self.scheduler.add(Sequence.from_add_request(msg))

    def abort(self, request_ids: list[str]) -> None:
        self.scheduler.abort(request_ids)

    def abort_all(self) -> int:
        """Drop every request (their KV blocks too) -> how many."""
        ids = [seq.request_id for seq in [*self.scheduler.waiting, *self.scheduler.running]]
        self.abort(ids)
        self._scheduled = None
        return len(ids)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._scheduled is not None

    def demand(self) -> StepDemand:
        """Schedule the next step (kept for `step`, also across a prepare or commit the agreement chose instead)
        and say what it needs."""
        if self._scheduled is None and self.scheduler.has_work():
            self._scheduled = self.scheduler.schedule()
        out = self._scheduled
        missing = self.runner.missing_graphs(self.ep, self.chunk_tokens) if self.ep is not None else ()
        if out is None:
            return StepDemand(graphable=True, missing=missing)
        batch = [(s.seq, s.num_new_tokens) for s in out.scheduled]
        return StepDemand(tokens=out.num_batched_tokens, seqs=len(batch),
                          graphable=self.runner.graphable(batch, self.ep), busy=True, missing=missing)

    def graph_sizes(self) -> GraphSizes:
        """The graphs this epoch replays: mixed ones only up to what one dispatch carries."""
        return self.runner.graph_sizes(self.ep, self.chunk_tokens) if self.ep is not None else GraphSizes()

    def plan_alone(self) -> StepPlan:
        """The plan of a one-rank epoch: the agreement's decision over this rank's demand alone."""
        values = step_plan.encode(self.demand(), 0, 0)
        return step_plan.decide(values, self.graph_sizes(), self.chunk_tokens)

    def skip_step(self) -> list[RequestOutput]:
        """No rank scheduled any token (the agreement's plan has none): run no forward, and let the next demand()
        schedule afresh, since requests may have come meanwhile -> the outputs of requests the scheduler finished
        without running them (a prompt that can never fit)."""
        out, self._scheduled = self._scheduled, None
        if out is None or out.is_empty:
            return []
        if out.scheduled:
            raise RuntimeError(f"skip_step with scheduled sequences: {out}")
        return self.scheduler.postprocess(out, [])

    def step(self, plan: StepPlan | None = None) -> list[RequestOutput]:
        """One forward over what demand() scheduled (possibly nothing), as `plan` says -> outputs of sequences that
        advanced."""
        if plan is None:
            plan = self.plan_alone()
        out, self._scheduled = self._scheduled or SchedulerOutput(), None
        # a request aborted since demand() scheduled it is left out (its blocks are gone)
        live = [i for i, s in enumerate(out.scheduled) if s.seq.status is SequenceStatus.RUNNING]
        batch = [(out.scheduled[i].seq, out.scheduled[i].num_new_tokens) for i in live]
        step = self.runner.run(batch, self.block_manager, self.ep, plan)
        self.steps += 1
        sampled: list[int | None] = [None] * len(batch)
        logprobs: list[Logprobs | None] = [None] * len(batch)
        if step.sample_index:
            seqs = [batch[i][0] for i in step.sample_index]
            tokens = sample(step.sample, seqs, self.generator, self.eos_token_ids)
            for i, tok in zip(step.sample_index, tokens):
                sampled[i] = tok
            asked = [j for j, seq in enumerate(seqs) if seq.sampling.logprobs is not None]
            if asked:  # requests without logprobs cost nothing here
                rows = torch.tensor(asked, dtype=torch.long, device=step.sample.device)
                found = sampled_logprobs(step.sample[rows], [tokens[j] for j in asked],
                                         [seqs[j].sampling.logprobs for j in asked])
                for j, lp in zip(asked, found):
                    logprobs[step.sample_index[j]] = lp
        for i, start, rows in step.prompt:
            seq = batch[i][0]
            targets = seq.prompt_token_ids[start + 1 : start + 1 + rows.shape[0]]
            seq.add_prompt_logprobs(start, logprobs_of_tokens(rows, targets, seq.sampling.prompt_logprobs))
        if out.is_empty:
            return []
        all_sampled: list[int | None] = [None] * len(out.scheduled)
        all_logprobs: list[Logprobs | None] = [None] * len(out.scheduled)
        for j, i in enumerate(live):
            all_sampled[i], all_logprobs[i] = sampled[j], logprobs[j]
        return self.scheduler.postprocess(out, all_sampled, all_logprobs)

    def swap_experts(self, staged, ep: ExpertParallel, keep_graphs: bool = False) -> None:
        """Commit: the staged experts (with the scales of fp8 experts) go live, and the new epoch's expert
        map/communicator replace the old ones. Staged in place (`staged.rows`), the changed slots are copied into
        the live tensors; else the staged tensors replace them. keep_graphs (in place and `ep.can_replace(self.ep)`;
        each rank decides for itself): `ep` takes over the old epoch's device tensors and the captured CUDA graphs
        go on serving; else they are dropped, and this rank captures each size at the step that first agrees on it
        (a capture round: ranks that kept theirs replay it once with no rows, parallel/step_plan.py)."""
        blocks = self.model.moe_blocks()
        if blocks and (blocks[0].w13_scale is None) != (getattr(staged, "w13_scale", None) is None):
            raise ValueError("staged experts and the model's slots differ in having fp8 scales")
        rows = getattr(staged, "rows", None)
        for i, block in enumerate(blocks):
            if rows is not None:
                if rows[i]:
                    idx = torch.tensor(rows[i], device=block.w13.device)
                    for live, new in zip(SlotTensors.of_blocks([block]).kinds(), staged.kinds()):
                        live[0].index_copy_(0, idx, new[i])
                continue
            block.w13.data = staged.w13[i]
            block.w2.data = staged.w2[i]
            if block.w13_scale is not None:
                block.w13_scale, block.w2_scale = staged.w13_scale[i], staged.w2_scale[i]
        if keep_graphs:
            if rows is None or not ep.can_replace(self.ep):
                raise ValueError("graphs are kept only across an in-place commit to an epoch of the same shapes")
            ep.adopt_tensors(self.ep)
            if self.runner.graphs is not None:
                self.runner.graphs.keep_for(ep)
        elif self.runner.graphs is not None:
            self.runner.graphs.reset()
        self.ep = ep

    def stats(self, with_load: bool = False) -> RankStats:
        bm = self.block_manager
        return RankStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_used_blocks + bm.num_free_blocks,
            steps=self.steps,
            graph_steps=self.runner.graphs.replays if self.runner.graphs is not None else 0,
            prefix_cache_queries=bm.num_queried_tokens,
            prefix_cache_hits=bm.num_hit_tokens,
            expert_load=self.ep.take_load().tolist() if with_load and self.ep is not None else [],
        )


def build_engine(launch, epoch_msg, group) -> RankEngine:
    """Build the model with this rank's expert slots of `epoch_msg`, its KV cache, scheduler and sampler."""
    from pathlib import Path

    from eep_hpc.model.arch import load_arch
    from eep_hpc.model.loader import build_model
    from eep_hpc.parallel.backends import make_all_to_all
    from eep_hpc.parallel.expert_map import ExpertMap

    cfg = launch.config
    device = torch.device(launch.device)
    arch = load_arch(launch.model_dir)
    dtype = resolve_dtype(cfg, arch, device)
    my_rank = epoch_msg.rank_ids.index(launch.rank_id)
    expert_map = ExpertMap(epoch_msg.physical_to_logical, epoch_msg.slot_offsets, my_rank, arch.num_experts, device)
    local = [expert_map.local_logical(layer) for layer in range(len(arch.moe_layers))]
    model = build_model(arch, cfg.model, Path(launch.model_dir), local, max_model_len(cfg, arch), device, dtype)
    ep = ExpertParallel(expert_map, make_all_to_all(cfg, arch, epoch_msg, group, expert_map), arch.num_experts)
    blocks = num_kv_blocks_for(cfg, model, device, dtype)
    # every rank of an epoch sizes its cache like the smallest, so routing by KV use compares like with like
    blocks = -group.all_reduce_max([-blocks])[0]
    return RankEngine(cfg, model, ep, blocks, launch.eos_token_ids, device, dtype)


def build_skeleton(launch, num_local_slots: int, num_kv_blocks: int, fill_dense) -> RankEngine:
    """A joining rank: expert slots allocated but empty (they arrive from peers); `fill_dense(model)` brings the
    other weights (from a peer, or the checkpoint)."""
    from pathlib import Path

    from eep_hpc.model.arch import load_arch
    from eep_hpc.model.loader import build_model

    cfg = launch.config
    device = torch.device(launch.device)
    arch = load_arch(launch.model_dir)
    dtype = resolve_dtype(cfg, arch, device)
    empty = [[]] * len(arch.moe_layers)
    model = build_model(arch, cfg.model, Path(launch.model_dir), empty, max_model_len(cfg, arch), device, dtype,
                        num_local_slots=num_local_slots, load_dense_weights=False)
    fill_dense(model)
    blocks = num_kv_blocks or num_kv_blocks_for(cfg, model, device, dtype)
    return RankEngine(cfg, model, None, blocks, launch.eos_token_ids, device, dtype)
