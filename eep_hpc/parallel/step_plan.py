"""One agreement per step: every rank of an epoch says what it is about to run, in one small collective, and all
take the same plan from the answer (vLLM's `coordinate_batch_across_dp`, SGLang's `prepare_mlp_sync_batch`).

What a rank says (`StepDemand`): how many tokens and sequences it scheduled, whether its batch can be a decode graph,
and which PrepareEpoch/CommitEpoch it holds. The plan (`StepPlan`), the same on every rank:
- a scaling action every member holds (prepare or commit) runs instead of a step;
- nobody busy: the wave ends;
- busy, yet no rank scheduled a token (ranks waiting for their expert reads of a scale event, or a request refused
  without running): no forward runs anywhere (`max_tokens` 0; the rank process skips the step and polls);
- every rank decode-only (or idle) and a graph fits the largest batch: every rank replays the decode graph of one
  padded size, an idle rank with zero valid rows;
- else, when a mixed graph holds the largest batch's tokens: every rank replays the mixed graph of one padded
  token count (prefill chunks and decodes together; engine/cuda_graphs.py);
- else an eager step whose MoE runs in `chunks` pieces of at most `chunk_tokens` tokens per rank, the same count
  on every rank (a rank with fewer tokens sends empty pieces), so no collective inside the layer loop needs to
  ask anyone how much is coming.

Graphs are captured in step with the others, since a capture's warm-up forward runs the epoch's exchanges. Each
rank also says which of the epoch's graphs it lacks (one that joined, or one whose commit dropped its graphs,
while the others kept theirs); when the plan's graph is among them, the step is a capture round
(`StepPlan.capture`): whoever lacks it captures it, whoever has it replays it once with no rows first (the
warm-up's partner), then all replay the step.
"""

from __future__ import annotations

from dataclasses import dataclass

from eep_hpc.parallel.groups import EpochGroup


@dataclass(frozen=True)
class StepDemand:
    tokens: int = 0
    seqs: int = 0
    graphable: bool = True  # a decode batch (one new token per sequence, no prompt logprobs), or nothing
    busy: bool = False  # has requests (they may have scheduled nothing this step)
    # per graph of the epoch (GraphSizes.decode, then .mixed): 1 where this rank has not captured it
    missing: tuple[int, ...] = ()


@dataclass(frozen=True)
class GraphSizes:
    """The CUDA graphs every member of an epoch has (the same on all: config and backend are shared)."""

    decode: tuple[int, ...] = ()  # decode graphs, by sequences (one new token each)
    mixed: tuple[int, ...] = ()  # mixed graphs, by tokens (prefill chunks and decodes)


@dataclass(frozen=True)
class StepPlan:
    busy: bool = False
    graph_size: int = 0  # > 0: every rank replays the graph of this size (sequences; tokens if `mixed`)
    mixed: bool = False  # the graph is a mixed one
    capture: bool = False  # some rank lacks this graph: a capture round (module docstring)
    chunks: int = 1  # eager: MoE pieces per layer, the same on every rank
    chunk_tokens: int = 0  # eager: tokens per rank per piece (the dispatch capacity); graph: graph_size
    max_tokens: int = 0  # the largest batch of any rank this step
    prepare_epoch: int = 0  # every member holds the PrepareEpoch of this epoch: prepare now
    commit_epoch: int = 0  # ... the CommitEpoch: commit now

    @property
    def is_graph(self) -> bool:
        return self.graph_size > 0


# The plan of a rank alone that runs eagerly without asking (tests, one-rank helpers).
EAGER = StepPlan(busy=True)


def pick_graph_size(sizes: list[int], seqs: int) -> int:
    """The smallest captured size that holds `seqs` sequences (at least 1: idle ranks replay the smallest)."""
    return next((s for s in sizes if s >= max(seqs, 1)), 0)


def decide(values: list[int], graph_sizes: GraphSizes, chunk_tokens: int) -> StepPlan:
    """The plan from the element-wise maximum of every rank's `encode` (a pure function: every rank gets the
    same answer)."""
    busy, tokens, seqs, not_graphable, prep, neg_prep, com, neg_com = values[:8]
    missing = values[8:]
    prepare = prep if prep and -neg_prep == prep else 0  # max == min: every member holds it
    commit = com if com and -neg_com == com else 0
    if prepare or commit:
        return StepPlan(busy=bool(busy), prepare_epoch=prepare, commit_epoch=commit, max_tokens=tokens)
    if not busy:
        return StepPlan(busy=False)
    graph = pick_graph_size(graph_sizes.decode, seqs) if graph_sizes.decode and not not_graphable else 0
    if graph:
        capture = bool(missing) and bool(missing[graph_sizes.decode.index(graph)])
        return StepPlan(busy=True, graph_size=graph, chunk_tokens=graph, max_tokens=tokens, capture=capture)
    mixed = pick_graph_size(graph_sizes.mixed, tokens) if graph_sizes.mixed else 0  # holds seqs <= tokens too
    if mixed:
        capture = bool(missing) and bool(missing[len(graph_sizes.decode) + graph_sizes.mixed.index(mixed)])
        return StepPlan(busy=True, graph_size=mixed, mixed=True, chunk_tokens=mixed, max_tokens=tokens,
                        capture=capture)
    cap = max(1, min(chunk_tokens, tokens)) if chunk_tokens else max(1, tokens)
    return StepPlan(busy=True, chunks=max(1, -(-tokens // cap)), chunk_tokens=cap, max_tokens=tokens)


def encode(demand: StepDemand, prepare_epoch: int, commit_epoch: int) -> list[int]:
    return [int(demand.busy or prepare_epoch or commit_epoch), demand.tokens, demand.seqs,
            int(not demand.graphable), prepare_epoch, -prepare_epoch, commit_epoch, -commit_epoch,
            *demand.missing]


def agree(group: EpochGroup, demand: StepDemand, graph_sizes: GraphSizes, chunk_tokens: int,
          prepare_epoch: int = 0, commit_epoch: int = 0) -> StepPlan:
    """The step's one host collective (none in a one-rank epoch). graph_sizes: the graphs every member has (empty
    when the epoch runs none); chunk_tokens: the most tokens per rank one MoE dispatch carries (0 = no limit)."""
    values = group.all_reduce_max(encode(demand, prepare_epoch, commit_epoch))
    return decide(values, graph_sizes, chunk_tokens)
