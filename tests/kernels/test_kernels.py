"""Triton kernels against their torch references, and the CPU dispatch that keeps the references in use.

Kernel tests run on a CUDA GPU, or without one on the CPU in Triton's interpreter (small shapes; see kernel_checks.py).
Each check draws fresh random inputs, fills the output with NaN first, and compares with the reference computed in
float64 on the same (already rounded) inputs by ||out - ref|| / ||ref||:
  fp32: <= 1e-5 (the kernels use IEEE fp32 dots, no TF32);
  bf16: <= 1e-2 (bf16 operands and outputs; the MoE intermediate is rounded to bf16 too, as in the reference).
"""

from __future__ import annotations

import random

import pytest
import torch

from kernel_checks import DEVICE, DTYPES, HAS_TRITON, TOL, big, needs_kernels, rel_err

from eep_hpc.kernels import ops
from eep_hpc.kernels.attention import AttentionMetadata, paged_attention_reference, write_kv
from eep_hpc.kernels.moe import swiglu_experts_reference
from eep_hpc.kernels.norm import rms_norm_reference


# ---- CPU: dispatch and metadata (always run) ----


def test_cpu_tensors_use_the_reference():
    # also with Triton installed and TRITON_INTERPRET=1 (the kernel tests' CPU setting): the model never runs
    # interpreted kernels on the CPU
    assert not ops.use_triton(torch.zeros(1))
    x = torch.randn(5, 16)
    w = torch.rand(16)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    y, s = ops.add_rms_norm(x, x, w, 1e-6)
    assert torch.equal(s, 2 * x) and torch.equal(y, rms_norm_reference(2 * x, w, 1e-6))
    slot = torch.tensor([2, 0, 2, 1, 0])
    w13, w2 = torch.randn(3, 8, 16), torch.randn(3, 16, 4)
    assert torch.equal(ops.swiglu_experts(x, slot, w13, w2), swiglu_experts_reference(x, slot, w13, w2))


def test_metadata_keeps_device_copies_and_builds_reference_lazily():
    meta = AttentionMetadata.build([5, 6, 7, 33], [3, 1], [3, 18], [[1], [0, 2]], 16, torch.device("cpu"))
    assert meta.query_start_loc_device.tolist() == [0, 3, 4] and meta.seq_lens_device.tolist() == [3, 18]
    assert meta.block_tables.tolist() == [[1, 0], [0, 2]] and meta.slot_mapping.tolist() == [5, 6, 7, 33]
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs) == (3, 18, 2)
    assert "reference" not in meta.__dict__
    assert meta.mask.shape == (2, 1, 3, 18) and meta.kv_index[1, 17].item() == 2 * 16 + 1
    assert meta.token_batch.tolist() == [0, 0, 0, 1] and meta.token_row.tolist() == [0, 1, 2, 0]


def test_empty_step_metadata_and_reference():
    meta = AttentionMetadata.build([], [], [], [], 16, torch.device("cpu"))
    q = torch.randn(0, 4, 16)
    cache = torch.randn(2, 16, 2, 16)
    assert ops.paged_attention(q, cache, cache, meta, 0.25).shape == (0, 4, 16)


def test_reference_can_be_forced(monkeypatch):
    ops.triton_available.cache_clear()
    monkeypatch.setenv("EEP_HPC_KERNELS", "reference")
    try:
        assert not ops.triton_available()
    finally:
        ops.triton_available.cache_clear()


# ---- Triton kernels vs reference ----


def _moe_inputs(M, S, D, I, dtype, empty_slots=()):
    x = torch.randn(M, D, device=DEVICE).to(dtype)
    allowed = torch.tensor([s for s in range(S) if s not in empty_slots], device=DEVICE)
    slot = allowed[torch.randint(0, len(allowed), (M,), device=DEVICE)]
    w13 = (torch.randn(S, 2 * I, D, device=DEVICE) * D**-0.5).to(dtype)
    w2 = (torch.randn(S, D, I, device=DEVICE) * I**-0.5).to(dtype)
    return x, slot, w13, w2


MOE_SHAPES = [
    pytest.param(0, 4, 64, 32, (), id="empty"),
    pytest.param(1, 4, 64, 32, (), id="one-row"),
    pytest.param(37, 8, 64, 32, (1, 5), id="tiny-empty-slots"),
    pytest.param(50, 3, 96, 48, (), id="ragged-dims"),
    pytest.param(20, 16, 40, 24, (), id="more-slots-than-rows"),
    pytest.param(8, 128, 2048, 768, (), id="qwen3-decode-1", marks=big),
    pytest.param(512, 128, 2048, 768, (), id="qwen3-decode-64", marks=big),
    pytest.param(4096, 128, 2048, 768, tuple(range(0, 128, 3)), id="qwen3-prefill-512", marks=big),
]


def test_experts_read_a_shared_row_per_token():
    """One rank hands each token over once for its k pairs: the same result as k copies of the row."""
    torch.manual_seed(3)
    x, slot, w13, w2 = (t.cpu() for t in _moe_inputs(12, 5, 16, 8, torch.float32))
    tokens = x[:4]  # 4 tokens, k = 3: pair m reads token m // 3
    shared = ops.swiglu_experts(tokens, slot, w13, w2)
    assert torch.equal(shared, swiglu_experts_reference(tokens.repeat_interleave(3, 0), slot, w13, w2))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_experts_triton_shared_rows(dtype):
    from eep_hpc.kernels.triton_moe import swiglu_experts_triton

    torch.manual_seed(11)
    for T, k, S, D, I in ((1, 8, 16, 64, 32), (9, 2, 8, 96, 48)):
        x, slot, w13, w2 = _moe_inputs(T * k, S, D, I, dtype)
        tokens = x[:T]
        out = torch.full((T * k, D), float("nan"), dtype=dtype, device=DEVICE)
        swiglu_experts_triton(tokens, slot, w13, w2, out=out)
        ref = swiglu_experts_reference(tokens.double().repeat_interleave(k, 0), slot, w13.double(), w2.double())
        assert rel_err(out, ref) <= TOL[dtype]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,S,D,I,empty", MOE_SHAPES)
def test_swiglu_experts_triton(M, S, D, I, empty, dtype):
    from eep_hpc.kernels.triton_moe import MoEConfig, swiglu_experts_triton

    torch.manual_seed(M * 7 + S)
    for cfg in (None, MoEConfig(16, 32, 32, 2, 4, 2)):
        x, slot, w13, w2 = _moe_inputs(M, S, D, I, dtype, empty)
        out = torch.full_like(x, float("nan"))
        swiglu_experts_triton(x, slot, w13, w2, config=cfg, out=out)
        ref = swiglu_experts_reference(x.double(), slot, w13.double(), w2.double())
        assert rel_err(out, ref) <= TOL[dtype], (cfg, rel_err(out, ref))


@needs_kernels
@pytest.mark.parametrize("M,S,block_m", [(0, 4, 16), (1, 4, 16), (37, 8, 16), (300, 128, 16), (4096, 128, 128)])
def test_align_rows_by_slot(M, S, block_m):
    from eep_hpc.kernels.triton_moe import align_rows_by_slot, align_rows_by_slot_torch

    slot = torch.randint(0, S, (M,), device=DEVICE)
    slot[slot == 1] = 2  # an empty slot
    rows, block_slot, total = align_rows_by_slot(slot, S, block_m)
    rows_t, block_slot_t, total_t = align_rows_by_slot_torch(slot, S, block_m)
    assert torch.equal(block_slot, block_slot_t) and torch.equal(total, total_t)
    # the order within a slot's blocks is free (atomic cursors); the set of rows per block is not
    assert torch.equal(rows.view(-1, block_m).sort(1).values, rows_t.view(-1, block_m).sort(1).values)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_token_runs_its_pairs_unsorted(dtype, monkeypatch):
    """A batch-1 step's k pairs go through the experts as row blocks of their own (no sort): the same outputs as
    the sorted path, padding pairs (slot -1, or a slot this rank does not hold) skipped and left unwritten."""
    from eep_hpc.kernels import triton_moe

    torch.manual_seed(5)
    k, S, D, I = 8, 16, 64, 32
    x, _, w13, w2 = _moe_inputs(1, S, D, I, dtype)
    slot = torch.randperm(S, device=DEVICE)[:k]
    slot[2], slot[6] = -1, S  # padding, and a slot past this rank's
    keep = (slot >= 0) & (slot < S)
    ref = swiglu_experts_reference(x.double().expand(int(keep.sum()), D), slot[keep], w13.double(), w2.double())

    def run():
        out = torch.full((k, D), float("nan"), dtype=dtype, device=DEVICE)
        triton_moe.swiglu_experts_triton(x, slot, w13, w2, out=out)
        assert rel_err(out[keep], ref) <= TOL[dtype] and out[~keep].isnan().all()
        return out

    sort = triton_moe.align_rows_by_slot
    with monkeypatch.context() as m:
        m.setattr(triton_moe, "align_rows_by_slot", lambda *a: pytest.fail("one token's pairs were sorted"))
        unsorted = run()
    monkeypatch.setenv("EEP_HPC_MOE_PAIR_BLOCKS", "0")  # the sorted path, for comparison
    sorted_calls = []
    monkeypatch.setattr(triton_moe, "align_rows_by_slot", lambda *a: sorted_calls.append(1) or sort(*a))
    assert torch.equal(unsorted[keep], run()[keep]) and sorted_calls == [1]


@needs_kernels
def test_swiglu_experts_triton_skips_padding_rows():
    from eep_hpc.kernels.triton_moe import swiglu_experts_triton

    x, slot, w13, w2 = _moe_inputs(40, 6, 64, 32, torch.float32)
    pad = torch.rand(40, device=DEVICE) < 0.3
    slot = torch.where(pad, torch.where(torch.rand(40, device=DEVICE) < 0.5, -1, 6), slot)
    out = torch.full_like(x, float("nan"))
    swiglu_experts_triton(x, slot, w13, w2, out=out)
    keep = ~pad
    ref = swiglu_experts_reference(x[keep].double(), slot[keep], w13.double(), w2.double())
    assert rel_err(out[keep], ref) <= TOL[torch.float32] and out[pad].isnan().all()


def _attention_case(qlens, ctxs, Hq, Hkv, D, page, dtype, spare_blocks=4):
    seq_lens = [c + q for q, c in zip(qlens, ctxs)]
    need = sum((L + page - 1) // page for L in seq_lens)
    free = list(range(need + spare_blocks))
    random.shuffle(free)
    tables = [[free.pop() for _ in range((L + page - 1) // page)] for L in seq_lens]
    slots = [tables[b][p // page] * page + p % page for b, (q, c) in enumerate(zip(qlens, ctxs)) for p in range(c, c + q)]
    meta = AttentionMetadata.build(slots, qlens, seq_lens, tables, page, DEVICE)
    T, nb = sum(qlens), need + spare_blocks
    k_cache = torch.randn(nb, page, Hkv, D, device=DEVICE).to(dtype)
    v_cache = torch.randn(nb, page, Hkv, D, device=DEVICE).to(dtype)
    q, k, v = (torch.randn(T, h, D, device=DEVICE).to(dtype) for h in (Hq, Hkv, Hkv))
    return meta, q, k, v, k_cache, v_cache


ATTN_SHAPES = [
    pytest.param([1, 1, 1], [0, 5, 40], 4, 2, 16, 4, id="decode-tiny"),
    pytest.param([7, 1, 20, 3], [0, 9, 3, 30], 4, 2, 16, 4, id="mixed-tiny"),
    pytest.param([7, 1, 20, 3], [0, 9, 3, 30], 6, 2, 24, 8, id="mixed-gqa3-ragged-d"),
    pytest.param([5, 33], [17, 0], 8, 1, 32, 16, id="mqa-prefill"),
    pytest.param([1] * 3, [2000, 1, 517], 32, 4, 128, 16, id="qwen3-decode-3", marks=big),
    pytest.param([1] * 64, [random.Random(1).randrange(0, 3000) for _ in range(64)], 32, 4, 128, 16,
                 id="qwen3-decode-64", marks=big),
    pytest.param([512], [0], 32, 4, 128, 16, id="qwen3-prefill-512", marks=big),
    pytest.param([300, 1, 1, 77, 1], [0, 1000, 15, 200, 0], 32, 4, 128, 16, id="qwen3-mixed", marks=big),
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qlens,ctxs,Hq,Hkv,D,page", ATTN_SHAPES)
def test_paged_attention_triton(qlens, ctxs, Hq, Hkv, D, page, dtype):
    from eep_hpc.kernels.triton_attention import AttentionConfig, paged_attention_triton, write_kv_triton

    random.seed(len(qlens) * 31 + Hq)
    torch.manual_seed(sum(ctxs))
    for cfg in (None, AttentionConfig(16, 16, 1, 4, 2), AttentionConfig(32, 32, 4, 4, 2)):
        meta, q, k, v, k_cache, v_cache = _attention_case(qlens, ctxs, Hq, Hkv, D, page, dtype)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        write_kv(k, v, k_ref, v_ref, meta.slot_mapping)
        write_kv_triton(k, v, k_cache, v_cache, meta.slot_mapping)
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        out = torch.full_like(q, float("nan"))
        paged_attention_triton(q, k_cache, v_cache, meta, D**-0.5, config=cfg, out=out)
        ref = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), meta, D**-0.5)
        assert rel_err(out, ref) <= TOL[dtype], (cfg, rel_err(out, ref))


@needs_kernels
def test_paged_attention_triton_padding_sequences_get_zeros():
    """A CUDA-graph batch padded with (query_len 1, seq_len 0) sequences: they read nothing and output zeros."""
    from eep_hpc.kernels.triton_attention import AttentionConfig

    page = 4
    real = AttentionMetadata.build([9, 10], [1, 1], [10, 3], [[1, 0, 2], [3]], page, DEVICE)
    padded = AttentionMetadata.build([9, 10, -1, -1], [1, 1, 1, 1], [10, 3, 0, 0], [[1, 0, 2], [3], [], []], page, DEVICE)
    _assert_padding_changes_nothing(real, padded, 4, (None, AttentionConfig(16, 16, 4, 4, 2)))


def _assert_padding_changes_nothing(real, padded, blocks: int, configs, page=4, Hq=4, Hkv=2, D=16):
    """The padded batch's real rows equal the unpadded batch's; its padding rows are zeros."""
    from eep_hpc.kernels.triton_attention import paged_attention_triton

    k_cache, v_cache = torch.randn(2, blocks, page, Hkv, D, device=DEVICE)
    q = torch.randn(padded.num_tokens, Hq, D, device=DEVICE)
    n = real.num_tokens
    for cfg in configs:
        want = paged_attention_triton(q[:n], k_cache, v_cache, real, 0.25, config=cfg)
        out = torch.full_like(q, float("nan"))
        paged_attention_triton(q, k_cache, v_cache, padded, 0.25, config=cfg, out=out)
        assert rel_err(out[:n], want) <= 1e-5 and torch.equal(out[n:], torch.zeros_like(out[n:]))


@needs_kernels
def test_paged_attention_triton_mixed_graph_padding():
    """A mixed CUDA-graph batch (engine/cuda_graphs.py): T = 16 tokens in 16 sequences, 3 real ones (a prefill chunk
    and two decodes, 10 tokens), then padding sequences of one token each while tokens last, then empty ones; all
    with seq_len 0. The real rows equal the unpadded batch's in the prefill configuration; padding rows are zeros."""
    from eep_hpc.kernels.triton_attention import AttentionConfig

    page = 4
    qlens, seq_lens, tables = [8, 1, 1], [8, 10, 3], [[1, 0], [2, 4, 5], [3]]
    slots = [tables[0][p // page] * page + p % page for p in range(8)] + [5 * page + 1, 3 * page + 2]
    real = AttentionMetadata.build(slots, qlens, seq_lens, tables, page, DEVICE)
    pad_q = [1] * 6 + [0] * 7
    padded = AttentionMetadata.build(slots + [-1] * 6, qlens + pad_q, seq_lens + [0] * 13, tables + [[]] * 13,
                                     page, DEVICE)
    padded.max_query_len = 16  # as the graph's metadata says: the prefill configuration
    _assert_padding_changes_nothing(real, padded, 6, (None, AttentionConfig(16, 16, 1, 4, 2)))


@needs_kernels
def test_write_kv_triton_skips_negative_slots():
    from eep_hpc.kernels.triton_attention import write_kv_triton

    k_cache = torch.randn(3, 4, 2, 16, device=DEVICE)
    v_cache = torch.randn(3, 4, 2, 16, device=DEVICE)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k, v = torch.randn(2, 2, 16, device=DEVICE), torch.randn(2, 2, 16, device=DEVICE)
    write_kv_triton(k, v, k_cache, v_cache, torch.tensor([-1, 5], device=DEVICE))
    before_k.view(-1, 2, 16)[5], before_v.view(-1, 2, 16)[5] = k[1], v[1]
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 64), (1, 64), (7, 3, 24), (33, 2048), (512, 32, 128), (3, 5000)], ids=str)
def test_rms_norm_triton(shape, dtype):
    from eep_hpc.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton

    D = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype)
    r = torch.randn(shape, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(D, device=DEVICE)).to(dtype)
    out = torch.full_like(x, float("nan"))
    rms_norm_triton(x, w, 1e-6, out=out)
    assert rel_err(out, rms_norm_reference(x.double(), w.double(), 1e-6)) <= TOL[dtype]
    y, s = add_rms_norm_triton(x, r, w, 1e-6)
    assert torch.equal(s, x + r)
    assert rel_err(y, rms_norm_reference((x + r).double(), w.double(), 1e-6)) <= TOL[dtype]


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU with Triton")
def test_ops_pick_triton_on_cuda_and_agree_with_reference():
    assert ops.use_triton(torch.zeros(1, device="cuda")) and not ops.use_triton(torch.zeros(1))
    x = torch.randn(9, 64, device="cuda")
    w = torch.rand(64, device="cuda")
    assert rel_err(ops.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)) <= 1e-6
    xs, slot, w13, w2 = _moe_inputs(30, 5, 64, 32, torch.float32)
    assert rel_err(ops.swiglu_experts(xs, slot, w13, w2), swiglu_experts_reference(xs, slot, w13, w2)) <= 1e-5
    meta, q, k, v, k_cache, v_cache = _attention_case([3, 1], [5, 7], 4, 2, 16, 4, torch.float32)
    ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    got = ops.paged_attention(q, k_cache, v_cache, meta, 0.25)
    assert rel_err(got, paged_attention_reference(q, k_cache, v_cache, meta, 0.25)) <= 1e-4



def test_attention_metadata_parts_start_on_16_byte_boundaries():
    """Triton compiles a kernel once per alignment of its pointers: the metadata's parts (one flat tensor) must
    start 16-byte aligned whatever the token and sequence counts, or steps of new shapes compile mid-serving."""
    from eep_hpc.kernels.attention import AttentionMetadata

    for T, B in [(1, 1), (7, 3), (16, 2), (33, 5), (8, 8)]:
        qlens = [T // B] * (B - 1) + [T - (T // B) * (B - 1)]
        tables = [[i, i + 1][: 1 + i % 2] for i in range(B)]
        meta = AttentionMetadata.build(list(range(T)), qlens, [q + 3 for q in qlens], tables, 16, torch.device("cpu"))
        for part in (meta.slot_mapping, meta.query_start_loc_device, meta.seq_lens_device, meta.block_tables):
            assert part.data_ptr() % 16 == 0, (T, B)
        assert meta.slot_mapping.tolist() == list(range(T))
        assert meta.query_start_loc.tolist() == [sum(qlens[:i]) for i in range(B + 1)]
        assert meta.seq_lens_device.tolist() == [q + 3 for q in qlens]
        assert meta.block_tables[:, 0].tolist() == [t[0] for t in tables]
