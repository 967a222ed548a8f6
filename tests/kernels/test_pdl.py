"""Programmatic dependent launch (kernels/pdl.py): on a Hopper GPU every Triton kernel of a step starts while the
one before it finishes, and the tokens are the same bits as without it (each kernel still waits for the one
before to complete before reading anything). CPU: never on, and the switch is read at each launch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support import engine_for
from eep_hpc.kernels import pdl
from eep_hpc.model.tiny import ensure_tiny_checkpoint
from eep_hpc.protocol import AddRequest, SamplingParams


def test_pdl_is_off_on_the_cpu_and_when_switched_off(monkeypatch):
    monkeypatch.setenv("EEP_HPC_PDL", "1")
    assert not pdl.use_pdl(torch.zeros(1)) and pdl.pdl_args(torch.zeros(1)) == {"USE_PDL": False}
    if torch.cuda.is_available():
        monkeypatch.setenv("EEP_HPC_PDL", "0")
        assert not pdl.use_pdl(torch.zeros(1, device="cuda"))


def greedy_tokens(engine, prompts: list[list[int]], steps: int) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add(AddRequest(request_id=f"r{i}", prompt_token_ids=p,
                              sampling=SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)))
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper (or later) GPU")
@pytest.mark.parametrize("prompts", [[[3, 7, 11, 13]], [[3, 7, 11, 13], [5, 9], [2, 4, 6, 8, 10, 12]]],
                         ids=["batch-1", "batch-3"])
def test_pdl_steps_give_the_same_tokens(prompts, monkeypatch):
    if not pdl._triton_supports_pdl():
        pytest.skip("this Triton has no programmatic dependent launch")
    model = Path(ensure_tiny_checkpoint())
    got = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("EEP_HPC_PDL", switch)
        assert pdl.use_pdl(torch.zeros(1, device="cuda")) == (switch == "1")
        engine = engine_for(model, device="cuda", dtype="bfloat16")
        got[switch] = greedy_tokens(engine, prompts, 24)
        assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0
    assert got["1"] == got["0"] and all(len(t) == 24 for t in got["1"].values())
