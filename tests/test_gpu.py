"""The same system on a CUDA GPU (skipped without one): model vs transformers, and serving through HTTP."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import start_head
from streaming_load import reference_texts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_tiny_model_on_gpu_matches_cpu_text(api, tmp_path):
    cpu = asyncio.run(reference_texts(api.url, api.model, 24))
    head = start_head(tmp_path, ranks=1, parallel={"device": "cuda"}, model={"dtype": "float32"})
    try:
        assert head.state()["ranks"][0]["device"].startswith("cuda")
        gpu = asyncio.run(reference_texts(head.url, head.model, 24))
    finally:
        head.stop()
    # fp32 on both: TF32 is off by default for matmuls, so greedy text agrees token for token
    assert gpu == cpu


def test_bf16_on_gpu_serves(tmp_path):
    head = start_head(tmp_path, ranks=1, parallel={"device": "cuda"}, model={"dtype": "bfloat16"})
    try:
        texts = asyncio.run(reference_texts(head.url, head.model, 16))
        assert all(len(t) > 0 for t in texts)
    finally:
        head.stop()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_grow_and_shrink_across_two_gpus_keep_text(api, tmp_path):
    """NCCL groups per epoch, expert transfer between GPUs, dense weights read from a peer's VRAM over NIXL."""
    cpu = asyncio.run(reference_texts(api.url, api.model, 24))
    head = start_head(tmp_path, ranks=1, parallel={"device": "cuda"}, model={"dtype": "float32"})
    try:
        one = asyncio.run(reference_texts(head.url, head.model, 24))
        grown = head.call(head.head.coordinator.grow(1))
        two = asyncio.run(reference_texts(head.url, head.model, 24))
        devices = {r["device"] for r in head.state()["ranks"]}
        shrunk = head.call(head.head.coordinator.shrink([head.state()["members"][0]]))
        after = asyncio.run(reference_texts(head.url, head.model, 24))
    finally:
        head.stop()
    print("grow:", grown, "\nshrink:", shrunk)
    assert grown["phase"] == shrunk["phase"] == "DONE"
    assert grown["dense_source"].startswith("nixl:"), grown
    assert devices == {"cuda:0"}  # each rank sees only its own GPU
    assert one == cpu and two == cpu and after == cpu


def test_decode_cuda_graphs_keep_text_and_run(api, tmp_path):
    """Decode steps replay CUDA graphs (padded batch sizes, static buffers) and give the eager text, in fp32."""
    cpu = asyncio.run(reference_texts(api.url, api.model, 24))
    texts, graph_steps = {}, {}
    for graphs in (False, True):
        head = start_head(tmp_path / str(graphs), ranks=1, parallel={"device": "cuda"}, model={"dtype": "float32"},
                          engine={"cuda_graphs": graphs, "cuda_graph_max_batch": 24})
        try:
            texts[graphs] = asyncio.run(reference_texts(head.url, head.model, 24))
            rank = head.state()["ranks"][0]
            graph_steps[graphs] = rank["graph_steps"]
        finally:
            head.stop()
    assert graph_steps[False] == 0 and graph_steps[True] > 0, graph_steps
    assert texts[True] == texts[False] == cpu
