"""Split-KV with live segments (`triton_attention.py`): the segment count comes from the shapes, the parts that own
keys from the sequence lengths. Checked against the float64 reference as in test_kernels.py, with the partial
buffers poisoned (NaN, and a live count no program wrote) so that reading a part no program wrote fails."""

from __future__ import annotations

import random

import pytest
import torch

from kernel_checks import DEVICE, DTYPES, TOL, needs_kernels, rel_err
from test_kernels import _attention_case

from eep_hpc.kernels.attention import AttentionMetadata, paged_attention_reference

# contexts around tile and part edges (TILE_N 16 below): none, one key, a tile, a tile + 1, many parts
DECODE_CTXS = [0, 1, 15, 16, 31, 40, 100, 257]


@pytest.fixture
def poisoned(monkeypatch):
    from eep_hpc.kernels import triton_attention

    real = triton_attention._segment_buffers

    def buffers(*args):
        acc, m, l, live = real(*args)
        acc.fill_(float("nan")), m.fill_(float("nan")), l.fill_(float("nan")), live.fill_(1 << 20)
        return acc, m, l, live

    monkeypatch.setattr(triton_attention, "_segment_buffers", buffers)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("min_tiles", [0, 1, 2, 4])
def test_decode_live_segments(poisoned, min_tiles, dtype):
    """A decode batch (T == B: program b is sequence b) over contexts from 0 to many parts, every segment count."""
    from eep_hpc.kernels.triton_attention import AttentionConfig, paged_attention_triton

    random.seed(min_tiles)
    torch.manual_seed(min_tiles)
    qlens, ctxs = [1] * len(DECODE_CTXS), DECODE_CTXS
    meta, q, _, _, k_cache, v_cache = _attention_case(qlens, ctxs, 4, 2, 16, 4, dtype)
    ref = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), meta, 0.25)
    for nseg in (2, 4, 32):
        cfg = AttentionConfig(16, 16, nseg, 4, 2, min_tiles)
        out = torch.full_like(q, float("nan"))
        paged_attention_triton(q, k_cache, v_cache, meta, 0.25, config=cfg, out=out)
        assert rel_err(out, ref) <= TOL[dtype], (cfg, rel_err(out, ref))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_batch_live_segments(poisoned, dtype):
    """Prefill chunks and decode tokens with split-KV (the search path, BLOCK_Q > 1): each query block counts its own
    live parts (a block early in a prompt sees fewer keys than the prompt's last block)."""
    from eep_hpc.kernels.triton_attention import AttentionConfig, paged_attention_triton

    random.seed(4)
    torch.manual_seed(4)
    qlens, ctxs = [7, 1, 20, 3, 1], [0, 9, 3, 30, 0]
    meta, q, _, _, k_cache, v_cache = _attention_case(qlens, ctxs, 4, 2, 16, 4, dtype)
    ref = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), meta, 0.25)
    for cfg in (AttentionConfig(32, 16, 4, 4, 2, 1), AttentionConfig(16, 16, 8, 4, 2, 2),
                AttentionConfig(32, 32, 4, 4, 2, 0)):
        out = torch.full_like(q, float("nan"))
        paged_attention_triton(q, k_cache, v_cache, meta, 0.25, config=cfg, out=out)
        assert rel_err(out, ref) <= TOL[dtype], (cfg, rel_err(out, ref))


@needs_kernels
def test_decode_padding_sequences_get_zeros_with_live_segments(poisoned):
    """A CUDA-graph batch padded with (query_len 1, seq_len 0) sequences: no live part, segment 0 writes zeros and
    the reduce leaves them."""
    from eep_hpc.kernels.triton_attention import AttentionConfig, paged_attention_triton

    page, Hq, Hkv, D = 4, 4, 2, 16
    # 40 keys in 16-key tiles (the GPU's smallest dot): 3 tiles, so several parts are live
    table = [11, 0, 2, 5, 7, 1, 9, 4, 8, 6]
    real = AttentionMetadata.build([6 * 4 + 3, 10], [1, 1], [40, 3], [table, [3]], page, DEVICE)
    padded = AttentionMetadata.build([6 * 4 + 3, 10, -1, -1], [1, 1, 1, 1], [40, 3, 0, 0], [table, [3], [], []],
                                     page, DEVICE)
    k_cache, v_cache = torch.randn(2, 12, page, Hkv, D, device=DEVICE)
    q = torch.randn(4, Hq, D, device=DEVICE)
    for cfg in (AttentionConfig(16, 16, 4, 4, 2, 1), AttentionConfig(16, 16, 32, 4, 2, 2)):
        want = paged_attention_reference(q[:2].double(), k_cache.double(), v_cache.double(), real, 0.25)
        out = torch.full_like(q, float("nan"))
        paged_attention_triton(q, k_cache, v_cache, padded, 0.25, config=cfg, out=out)
        assert rel_err(out[:2], want) <= 1e-5 and torch.equal(out[2:], torch.zeros_like(out[2:]))


def test_decode_config_depends_on_shapes_only(monkeypatch):
    """The segment count and part size come from (batch, heads, dtype): one captured graph serves every context.
    EEP_HPC_ATTN_LIVE_SEGMENTS=0 gives the split of before (every part runs, MIN_SEG_TILES 0)."""
    from eep_hpc.kernels import triton_attention
    from eep_hpc.kernels.triton_attention import pick_config

    monkeypatch.setattr(triton_attention, "_num_sms", lambda device: 132)
    cfg = pick_config(1, 1, 4, 8, 128, torch.bfloat16, torch.device("cuda"))
    assert (cfg.NUM_SEGMENTS, cfg.TILE_N, cfg.MIN_SEG_TILES) == (32, 128, 1)
    assert pick_config(1, 64, 4, 8, 128, torch.bfloat16, torch.device("cuda")).NUM_SEGMENTS == 1
    monkeypatch.setenv("EEP_HPC_ATTN_LIVE_SEGMENTS", "0")
    assert pick_config(1, 1, 4, 8, 128, torch.bfloat16, torch.device("cuda")).MIN_SEG_TILES == 0


@needs_kernels
def test_legacy_split_still_matches(monkeypatch):
    """EEP_HPC_ATTN_LIVE_SEGMENTS=0 (the before of a before/after) picks MIN_SEG_TILES 0 and the search path."""
    from eep_hpc.kernels.triton_attention import paged_attention_triton

    monkeypatch.setenv("EEP_HPC_ATTN_LIVE_SEGMENTS", "0")
    random.seed(2)
    torch.manual_seed(2)
    meta, q, _, _, k_cache, v_cache = _attention_case([1, 1, 1], [0, 5, 40], 4, 2, 16, 4, torch.float32)
    out = torch.full_like(q, float("nan"))
    paged_attention_triton(q, k_cache, v_cache, meta, 0.25, out=out)
    ref = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), meta, 0.25)
    assert rel_err(out, ref) <= 1e-5
