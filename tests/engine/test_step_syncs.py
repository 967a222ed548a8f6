"""A decode step reads the GPU back once, for its tokens: no host sync between the graph replay, the LM head and
the sampler (each one would leave the GPU idle while the host launches what follows). GPU only: on the CPU there
is nothing to wait for."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from support import engine_for
from eep_hpc.model.tiny import ensure_tiny_checkpoint
from eep_hpc.protocol import AddRequest, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def syncs_of(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("temperatures", [[0.0], [0.0, 0.8, 0.0]], ids=["greedy-batch-1", "greedy-and-sampled"])
def test_a_decode_step_syncs_once(temperatures):
    engine = engine_for(Path(ensure_tiny_checkpoint()), device="cuda")
    assert engine.runner.graphs is not None
    for i, t in enumerate(temperatures):
        engine.add(AddRequest(request_id=f"r{i}", prompt_token_ids=[3 + i, 7, 11, 13],
                              sampling=SamplingParams(max_tokens=12, temperature=t, ignore_eos=True)))
    engine.step()  # the prompts
    replays = engine.runner.graphs.replays
    counts = [syncs_of(engine.step) for _ in range(6)]
    assert engine.runner.graphs.replays == replays + 6, "the decode steps did not replay a graph"
    assert counts == [1] * 6, counts
