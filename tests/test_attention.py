"""Fused attention (Triton and CUDA) against internlm_kernels.reference, forward and backward.

Tolerance (flash-attention's rule, tests/helpers.py): against an fp64 evaluation of the reference,
the kernel's max error is at most 2x (forward) / 3x (backward) the error of the eager
reference run in the same low dtype. Shapes are small so the CPU interpreter stays quick;
the same tests run at these sizes on a GPU, plus the GPU-only ones at the end. The CUDA
kernels have head_dim 64 and 128: their cases use the nearest of the two (``_dim``), and the
other head dims check the refusal and the "auto" fallback instead.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.ops.attention import CUDA_HEAD_DIMS, _rows_aligned
from internlm_kernels.bench.cases import as_pages, takes_key_block128
from internlm_kernels.triton import attention as triton_attention
from tests.helpers import KERNEL_BACKENDS, assert_within_eager_error

ATTENTION_BACKENDS = KERNEL_BACKENDS
LOW_DTYPES = [torch.float16, torch.bfloat16]


def _dim(backend: str, head_dim: int) -> int:
    """The head dim a case runs at on ``backend``: the CUDA kernels have 64 and 128 only."""
    if backend != "cuda":
        return head_dim
    return next(d for d in CUDA_HEAD_DIMS if d >= head_dim)


def _qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, device, packed=False):
    shape_q = (seqlen_q, heads_q, head_dim) if packed else (batch, seqlen_q, heads_q, head_dim)
    shape_k = (seqlen_k, heads_kv, head_dim) if packed else (batch, seqlen_k, heads_kv, head_dim)
    return (torch.randn(shape_q, device=device, dtype=dtype), torch.randn(shape_k, device=device, dtype=dtype),
            torch.randn(shape_k, device=device, dtype=dtype))


def _check(q, k, v, backend, grad=None, deterministic=False, **kwargs):
    """Forward (out and lse) by the 2x rule, backward by the 3x rule, all against fp64; the
    backward of ``grad`` (fresh random when None)."""
    dtype = q.dtype
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out, lse = ik.flash_attention(*inputs, return_lse=True, deterministic=deterministic, backend=backend, **kwargs)
    eager_inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    eager = reference.attention(*eager_inputs, **kwargs)
    exact_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    exact, exact_lse = reference.attention(*exact_inputs, return_lse=True, **kwargs)
    assert out.dtype == dtype and out.shape == q.shape
    assert_within_eager_error([out], [eager], [exact], dtype, 2.0, "out")
    assert lse.dtype == torch.float32 and lse.shape == exact_lse.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact_lse)), "rows that see no key: lse -inf"
    seen = torch.isfinite(exact_lse)
    torch.testing.assert_close(lse[seen].double(), exact_lse[seen], rtol=1e-4, atol=1e-4)

    grad = torch.randn_like(out) if grad is None else grad
    ours = torch.autograd.grad(out, inputs, grad)
    theirs = torch.autograd.grad(eager, eager_inputs, grad)
    exact_grads = torch.autograd.grad(exact, exact_inputs, grad.double())
    assert_within_eager_error(ours, theirs, exact_grads, dtype, 3.0, "dq, dk, dv")
    return out, ours


CASES = {
    # name: (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, kwargs)
    "mha": (2, 33, 33, 4, 4, 32, {}),
    "mha_causal": (2, 33, 33, 4, 4, 32, {"causal": True}),
    "gqa3_causal": (2, 21, 21, 6, 2, 32, {"causal": True}),
    "gqa8_causal": (1, 19, 19, 16, 2, 32, {"causal": True}),
    "mqa": (2, 17, 23, 4, 1, 64, {}),
    "sq_lt_sk_causal": (1, 17, 40, 4, 2, 32, {"causal": True}),
    "sq_gt_sk_causal": (1, 40, 17, 4, 2, 16, {"causal": True}),  # first 23 queries see no key
    "window_both": (2, 20, 20, 4, 2, 16, {"window_size": (3, 2)}),
    "window_left_causal": (1, 24, 24, 2, 1, 64, {"causal": True, "window_size": (5, -1)}),
    "window_right_only": (1, 18, 26, 2, 2, 32, {"window_size": (-1, 4)}),
    "window_sq_gt_sk": (1, 30, 20, 4, 2, 32, {"window_size": (3, 2)}),  # the first rows see few or no keys
    "scale": (1, 16, 16, 2, 2, 32, {"causal": True, "softmax_scale": 0.3}),
}


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_matches_reference(backend, dtype, case, device):
    batch, sq, sk, hq, hkv, d, kwargs = CASES[case]
    _check(*_qkv(batch, sq, sk, hq, hkv, _dim(backend, d), dtype, device), backend, **kwargs)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_every_row_maximum_in_the_first_key_tile(backend, device):
    """Key 0 gives every row its largest score, so after the first key tile no running maximum
    moves (the CUDA forward then skips its output rescale), while the other keys, each with
    a tenth or so of key 0's weight, still carry over 90% of it."""
    q, k, v = _qkv(1, 70, 200, 2, 1, _dim(backend, 64), torch.bfloat16, device)
    q, k = q.abs(), 0.1 * k
    k[:, 0] = 0.3
    _check(q, k, v, backend, causal=True)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
def test_attention_head_dims(backend, head_dim, device):
    q, k, v = _qkv(1, 20, 20, 2, 1, head_dim, torch.bfloat16, device)
    if backend == "cuda" and head_dim not in CUDA_HEAD_DIMS:
        with pytest.raises(RuntimeError, match=f"the cuda kernels have head_dim .*, got {head_dim}"):
            ik.flash_attention(q, k, v, causal=True, backend="cuda")
        return
    _check(q, k, v, backend, causal=True)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_nan_in_a_query_row_stays_in_that_row(backend, device):
    """A NaN query gives that row NaN (as eager attention does), not a quiet zero, and leaves
    the other rows alone."""
    q, k, v = _qkv(1, 12, 20, 2, 1, _dim(backend, 32), torch.float16, device)
    q[0, 5, 1, 3] = float("nan")
    out, lse = ik.flash_attention(q, k, v, return_lse=True, backend=backend)
    assert torch.isnan(out[0, 5, 1]).all() and torch.isnan(lse[0, 1, 5])
    nan_row = torch.zeros_like(out, dtype=torch.bool)
    nan_row[0, 5, 1] = True
    assert torch.isfinite(out[~nan_row]).all()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_negative_softmax_scale(backend, device):
    """A negative scale makes a row's largest scaled score its smallest raw one. The scaled
    scores spread over more than 2^7 (base 2), so a kernel that took the raw scores' max as
    the scaled ones' would overflow 2^x to inf. Whole 64-key tiles and no mask: the path
    where the CUDA forward and decode kernel fold the scale into the exponent."""
    q, k, v = _qkv(1, 20, 128, 2, 1, _dim(backend, 64), torch.bfloat16, device)
    _check(4 * q, k, v, backend, softmax_scale=-1.0)

    # Decoding over a KV cache (the split-KV kernel shares the forward's softmax).
    k_cache, v_cache = _cache(2, 200, 1, _dim(backend, 64), torch.bfloat16, device)
    lengths = torch.tensor([130, 200], device=device, dtype=torch.int32)
    q = 4 * torch.randn(2, 1, 4, _dim(backend, 64), device=device, dtype=torch.bfloat16)
    out = ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, softmax_scale=-1.0,
                                          backend=backend)
    expected = reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, softmax_scale=-1.0)
    exact = reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), cache_seqlens=lengths,
                                             softmax_scale=-1.0)
    assert_within_eager_error([out], [expected], [exact], torch.bfloat16, 2.0, "decode, negative scale")


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_strided_inputs(backend, device):
    # q, k, v as slices of one fused qkv projection (B, S, Hq + 2 Hkv, D): no copies needed.
    qkv = torch.randn(2, 19, 6 + 2 * 2, _dim(backend, 32), device=device, dtype=torch.float16)
    q, k, v = qkv[:, :, :6], qkv[:, :, 6:8], qkv[:, :, 8:]
    assert not q.is_contiguous()
    _check(q, k, v, backend, causal=True)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_backward_of_a_strided_gradient(backend, device):
    """The backward reads dout by its own strides: a head-major gradient, as a (B, H, S, D)
    layer hands back through a transpose."""
    q, k, v = _qkv(2, 37, 37, 4, 2, _dim(backend, 64), torch.bfloat16, device)
    grad = torch.randn(2, 4, 37, q.shape[-1], device=device, dtype=torch.bfloat16).transpose(1, 2)
    _check(q, k, v, backend, grad=grad, causal=True)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (True, (4, -1)), (False, (3, 2))],
                         ids=["full", "causal", "causal_window", "window_both"])
def test_attention_packed_varlen(backend, causal, window, device):
    # sequences of (q, k) lengths (3, 5), (0, 2) empty queries, (1, 1), (16, 22); then 2 padding rows
    cu_q = torch.tensor([0, 3, 3, 4, 20], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 8, 30], device=device, dtype=torch.int32)
    q, k, v = _qkv(None, 22, 31, 6, 2, _dim(backend, 32), torch.bfloat16, device, packed=True)
    out, (dq, dk, dv) = _check(q, k, v, backend, causal=causal, window_size=window, cu_seqlens_q=cu_q,
                               cu_seqlens_k=cu_k)
    assert torch.equal(out[20:], torch.zeros_like(out[20:])), "padding query rows are zero"
    assert torch.equal(dq[20:], torch.zeros_like(dq[20:])) and torch.equal(dk[30:], torch.zeros_like(dk[30:]))


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS + ["torch"])
def test_attention_packed_batch_of_empty_query_sequences(backend, device):
    """Every query sequence empty (a batch of padding rows): zero output, and a backward that
    runs and gives zero gradients. The reference's output once hung off no input, so the
    backward raised."""
    q, k, v = _qkv(None, 3, 13, 4, 2, _dim(backend, 32), torch.bfloat16, device, packed=True)
    cu_q = torch.tensor([0, 0, 0], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, 13, 13], device=device, dtype=torch.int32)
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = ik.flash_attention(*inputs, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    for name, grad in zip("qkv", torch.autograd.grad(out, inputs, torch.randn_like(out))):
        assert torch.equal(grad, torch.zeros_like(grad)), f"d{name}"


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS + ["torch"])
@pytest.mark.parametrize("wrong", ["past_the_end", "below_zero"])
def test_attention_packed_offsets_out_of_range_are_clamped(backend, wrong, device):
    """cu_seqlens values go unchecked on the host (reading them would sync the stream): the
    kernels clamp each sequence into [0, T] instead, so an offset past the tensors' end or
    below zero never moves a load or a store outside them. Here the clamped sequences are
    valid ones, which the reference computes."""
    wrong_q, wrong_k = {"past_the_end": ([0, 3, 16], [0, 4, 4000]), "below_zero": ([-5, 3, 8], [-1, 4, 10])}[wrong]
    clamped_q, clamped_k = [0, 3, 8], [0, 4, 10]
    q, k, v = _qkv(None, 8, 10, 4, 2, _dim(backend, 32), torch.bfloat16, device, packed=True)
    offsets = [torch.tensor(values, device=device, dtype=torch.int32)
               for values in (wrong_q, wrong_k, clamped_q, clamped_k)]
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = ik.flash_attention(*inputs, causal=True, cu_seqlens_q=offsets[0], cu_seqlens_k=offsets[1], backend=backend)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, inputs, grad)
    valid = dict(causal=True, cu_seqlens_q=offsets[2], cu_seqlens_k=offsets[3])
    eager_inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    eager = reference.attention(*eager_inputs, **valid)
    exact_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    exact = reference.attention(*exact_inputs, **valid)
    assert_within_eager_error([out], [eager], [exact], torch.bfloat16, 2.0, f"out, offsets {wrong}")
    assert_within_eager_error(ours, torch.autograd.grad(eager, eager_inputs, grad),
                              torch.autograd.grad(exact, exact_inputs, grad.double()), torch.bfloat16, 3.0,
                              f"dq, dk, dv, offsets {wrong}")


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS + ["torch"])
def test_attention_nan_in_a_query_row_is_that_rows_nan(backend, device):
    """A NaN in the inputs shows as NaN where it reaches, on every backend (the reference
    once zeroed it with the rows that see no key); those rows still output zeros."""
    q, k, v = _qkv(1, 6, 4, 2, 1, _dim(backend, 16), torch.float16, device)
    q[0, 4, 1, 0] = float("nan")
    out, lse = ik.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert torch.isnan(out[0, 4, 1]).all() and torch.isnan(lse[0, 1, 4]), "the NaN query row"
    nan_row = torch.zeros(out.shape[:-1], dtype=torch.bool, device=device)
    nan_row[0, 4, 1] = True
    eager = reference.attention(q, k, v, causal=True)
    exact = reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert torch.isnan(eager[nan_row]).all() and torch.isnan(exact[nan_row]).all(), "the reference's NaN row"
    assert_within_eager_error([out[~nan_row]], [eager[~nan_row]], [exact[~nan_row]], torch.float16, 2.0,
                              "every other row")
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2])), "rows that see no key (causal, Sq > Sk)"


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_varlen_equals_per_sequence_dense(backend, device, monkeypatch):
    # Bitwise equality needs the same tiles for both calls; the autotuner keys them apart.
    monkeypatch.setenv("INTERNLM_KERNELS_AUTOTUNE", "0")
    lengths = [5, 1, 12]
    cu = torch.tensor([0, 5, 6, 18], device=device, dtype=torch.int32)
    q, k, v = _qkv(None, 18, 18, 4, 2, _dim(backend, 32), torch.float16, device, packed=True)
    packed = ik.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
    start = 0
    for length in lengths:
        piece = slice(start, start + length)
        dense = ik.flash_attention(q[None, piece], k[None, piece], v[None, piece], causal=True, backend=backend)
        torch.testing.assert_close(packed[piece], dense[0], rtol=0, atol=0)
        start += length


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_module(backend, device):
    module = ik.nn.Attention(causal=True, window_size=(4, 0), backend=backend)
    q, k, v = _qkv(1, 12, 12, 4, 2, _dim(backend, 32), torch.float16, device)
    expected = reference.attention(q, k, v, causal=True, window_size=(4, 0))
    torch.testing.assert_close(module(q, k, v), expected, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------


def _cache(batch, capacity, heads_kv, head_dim, dtype, device):
    return (torch.randn(batch, capacity, heads_kv, head_dim, device=device, dtype=dtype),
            torch.randn(batch, capacity, heads_kv, head_dim, device=device, dtype=dtype))


KVCACHE_MASKS = {
    "causal": {"causal": True},
    "full": {"causal": False},
    "causal_window": {"causal": True, "window_size": (4, -1)},
    "window_both": {"causal": False, "window_size": (4, 1)},
}


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("mask", sorted(KVCACHE_MASKS))
@pytest.mark.parametrize("layout", ["separate", "fused"])
@pytest.mark.parametrize("batch", [1, 3], ids=["one_long_sequence", "three"])
def test_kvcache_masks_layouts_and_splits(backend, mask, layout, batch, device):
    """Append 3 entries and attend, against the reference: every mask, q / k / v as slices of
    one fused qkv tensor and the caches as halves of one KV buffer ("fused") or separate
    tensors, and one long sequence whose keys the decode kernel splits over several programs."""
    dtype, d, heads_q, heads_kv, new_tokens = torch.bfloat16, _dim(backend, 32), 4, 2, 3
    capacity = 300 if batch == 1 else 48
    lengths = torch.tensor([290] if batch == 1 else [0, 9, 44], device=device, dtype=torch.int32)
    if layout == "fused":
        qkv = torch.randn(batch, new_tokens, heads_q + 2 * heads_kv, d, device=device, dtype=dtype)
        q, k_new, v_new = qkv[:, :, :heads_q], qkv[:, :, heads_q:heads_q + heads_kv], qkv[:, :, heads_q + heads_kv:]
        kv = torch.randn(batch, capacity, 2, heads_kv, d, device=device, dtype=dtype)
        k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    else:
        q = torch.randn(batch, new_tokens, heads_q, d, device=device, dtype=dtype)
        k_new, v_new = (torch.randn(batch, new_tokens, heads_kv, d, device=device, dtype=dtype) for _ in range(2))
        k_cache, v_cache = _cache(batch, capacity, heads_kv, d, dtype, device)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    kwargs = KVCACHE_MASKS[mask]
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lengths,
                                              backend=backend, **kwargs)
        expected = reference.attention_with_kvcache(q, ref_k, ref_v, k=k_new, v=v_new, cache_seqlens=lengths,
                                                    **kwargs)
        exact = reference.attention_with_kvcache(q.double(), ref_k.double(), ref_v.double(), k=k_new.double(),
                                                 v=v_new.double(), cache_seqlens=lengths, **kwargs)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v), "the appended entries, bit for bit"
    assert_within_eager_error([out], [expected], [exact], dtype, 2.0, f"kvcache {mask} {layout}")


def _unpaged(pool, table):
    return pool[table.long()].flatten(1, 2)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS + ["torch"])
@pytest.mark.parametrize("page_size", [5, 16, 64])
@pytest.mark.parametrize("case", ["append_rotary", "window", "decode_only"])
def test_kvcache_paged_equals_contiguous(backend, page_size, case, device):
    """Paged caches (a shuffled pool of pages and a block table) give the contiguous caches'
    output, and the appended entries land in the right rows of the right pages; spare pages
    stay as they were. Page sizes below, at and past a key tile; appends across pages."""
    dtype, d, batch, capacity = torch.bfloat16, _dim(backend, 32), 3, 320
    k_cache, v_cache = _cache(batch, capacity, 2, d, dtype, device)
    k_pages, v_pages, table = as_pages(k_cache, v_cache, page_size, spare_pages=3)
    spare = [i for i in range(k_pages.shape[0]) if i not in set(table.flatten().tolist())]
    spare_before = k_pages[spare].clone(), v_pages[spare].clone()
    lengths = torch.tensor([0, 63, 311], device=device, dtype=torch.int32)  # 311 + 3 new: near the end
    new_tokens = 0 if case == "decode_only" else 3
    q = torch.randn(batch, max(new_tokens, 1), 4, d, device=device, dtype=dtype)
    new = {} if case == "decode_only" else {
        "k": torch.randn(batch, new_tokens, 2, d, device=device, dtype=dtype),
        "v": torch.randn(batch, new_tokens, 2, d, device=device, dtype=dtype)}
    kwargs = dict(cache_seqlens=lengths, **new)
    if case == "append_rotary":
        kwargs["rotary_cos"], kwargs["rotary_sin"] = ik.rotary_cos_sin(capacity, d, device=device)
    elif case == "window":
        kwargs["window_size"] = (40, -1)
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_pages, v_pages, block_table=table, backend=backend, **kwargs)
        expected = reference.attention_with_kvcache(q, k_cache, v_cache, **kwargs)
        doubled = {name: t.double() if name in ("k", "v") else t for name, t in kwargs.items()}
        exact = reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), **doubled)
    assert_within_eager_error([out], [expected], [exact], dtype, 2.0, f"paged {case}, pages of {page_size}")
    tolerance = 1e-2 if case == "append_rotary" else 0  # rotated in the input dtype inside the kernels
    torch.testing.assert_close(_unpaged(k_pages, table), k_cache, rtol=0, atol=tolerance)
    assert torch.equal(_unpaged(v_pages, table), v_cache)
    assert torch.equal(k_pages[spare], spare_before[0]) and torch.equal(v_pages[spare], spare_before[1]), \
        "pages of no sequence are not written"


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS + ["torch"])
@pytest.mark.parametrize("page_size", [1, 7])
@pytest.mark.parametrize("window", [(-1, -1), (30, -1)], ids=["causal", "causal_window"])
def test_kvcache_paged_one_sequence_over_many_splits(backend, page_size, window, device):
    """One sequence on one KV head: the decode splits its keys over several programs (each
    split's bounds cut across pages), also with pages of one position."""
    dtype, d = torch.bfloat16, _dim(backend, 40)
    k_cache, v_cache = _cache(1, 280, 1, d, dtype, device)
    k_pages, v_pages, table = as_pages(k_cache, v_cache, page_size, spare_pages=2)
    q = torch.randn(1, 2, 3, d, device=device, dtype=dtype)
    new_k, new_v = (torch.randn(1, 2, 1, d, device=device, dtype=dtype) for _ in range(2))
    kwargs = dict(k=new_k, v=new_v, cache_seqlens=torch.tensor([251], device=device, dtype=torch.int32),
                  window_size=window)
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_pages, v_pages, block_table=table, backend=backend, **kwargs)
        expected = reference.attention_with_kvcache(q, k_cache, v_cache, **kwargs)
        exact = reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(),
                                                 **{**kwargs, "k": new_k.double(), "v": new_v.double()})
    assert_within_eager_error([out], [expected], [exact], dtype, 2.0, f"pages of {page_size}")
    assert torch.equal(_unpaged(k_pages, table)[:, :280], k_cache)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS + ["torch"])
def test_kvcache_paged_lengths_out_of_range_are_nan(backend, device):
    """A length below zero or past the pages' capacity: NaN out, and only the new entries that
    land inside the sequence's pages are written (as with contiguous caches)."""
    d = _dim(backend, 32)
    k_cache, v_cache = _cache(3, 12, 1, d, torch.float16, device)
    k_pages, v_pages, table = as_pages(k_cache, v_cache, 4, spare_pages=1)
    lengths = torch.tensor([-2, 11, 5], device=device, dtype=torch.int32)
    new = torch.randn(3, 3, 1, d, device=device, dtype=torch.float16)
    q = torch.randn(3, 1, 2, d, device=device, dtype=torch.float16)
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_pages, v_pages, k=new, v=new, cache_seqlens=lengths,
                                              block_table=table, backend=backend)
        expected = reference.attention_with_kvcache(q, k_cache, v_cache, k=new, v=new, cache_seqlens=lengths)
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2]).all()
    torch.testing.assert_close(out[2], expected[2], rtol=2e-3, atol=2e-3)
    assert torch.equal(_unpaged(k_pages, table), k_cache) and torch.equal(_unpaged(v_pages, table), v_cache)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS + ["torch"])
def test_kvcache_paged_table_entries_outside_the_pool_are_clamped(backend, device):
    """Block-table entries below 0 or past the pool are clamped into it, as the reference
    clamps them: reads of such a page take the first or last page, and new entries appended
    through one land where the reference writes them (never outside the pool). Entries past a
    sequence's length (here 2^31 - 1) take no part."""
    d, page_size = _dim(backend, 32), 8
    k_cache, v_cache = _cache(2, 48, 2, d, torch.bfloat16, device)
    k_pages, v_pages, table = as_pages(k_cache, v_cache, page_size, spare_pages=2)
    num_pages = k_pages.shape[0]
    lengths = torch.tensor([30, 20], device=device, dtype=torch.int32)
    # sequence 0 reads page entries 0-3 and appends at positions 30, 31: through entry 3
    table[0, 1], table[0, 3], table[1, 0] = -1, num_pages + 7, -(2**31)
    table[1, 3:] = 2**31 - 1  # past sequence 1's 22 positions (pages 0-2)
    k_new, v_new = (torch.randn(2, 2, 2, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(2, 2, 4, d, device=device, dtype=torch.bfloat16)
    expected_pools = k_pages.clone(), v_pages.clone()
    exact_pools = k_pages.double(), v_pages.double()
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_pages, v_pages, k=k_new, v=v_new, cache_seqlens=lengths,
                                              block_table=table, backend=backend)
        expected = reference.attention_with_kvcache(q, *expected_pools, k=k_new, v=v_new, cache_seqlens=lengths,
                                                    block_table=table)
        exact = reference.attention_with_kvcache(q.double(), *exact_pools, k=k_new.double(), v=v_new.double(),
                                                 cache_seqlens=lengths, block_table=table)
    assert_within_eager_error([out], [expected], [exact], torch.bfloat16, 2.0, "clamped block table")
    assert torch.equal(k_pages, expected_pools[0]) and torch.equal(v_pages, expected_pools[1]), \
        "the appended entries land where the reference writes them"
    assert torch.equal(k_pages[num_pages - 1, 6:], k_new[0]), "entry 3 of sequence 0 is clamped to the last page"


def test_kvcache_triton_decode_row_limit_is_named(device):
    """The Triton decode grid holds its 64-row tiles on y (at most 65535): past that "triton"
    refuses the call by name, before the append writes anything."""
    rows = 65535 * 64 + 1
    q = torch.zeros(1, rows, 1, 8, device=device, dtype=torch.bfloat16)
    cache = torch.zeros(1, 4, 1, 8, device=device, dtype=torch.bfloat16)
    new = torch.ones(1, 1, 1, 8, device=device, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=f"the triton decode takes at most {65535 * 64} query rows"):
        ik.flash_attention_with_kvcache(q, cache, cache.clone(), k=new, v=new, cache_seqlens=0, backend="triton")
    assert not cache.any(), "refused before the append"


@pytest.mark.parametrize("case, error, words", [
    ("table_dtype", TypeError, "block_table has dtype torch.int64"),
    ("table_rows", ValueError, "block_table must be \\(B, max_blocks\\) = \\(2, >= 1\\), got \\(3, 4\\)"),
    ("table_1d", ValueError, "block_table must be \\(B, max_blocks\\)"),
    ("cache_3d", ValueError, "k_cache must be \\(num_pages, page_size, H, D\\) with a block_table"),
    ("past_capacity", ValueError, "cache_seqlens 15 \\+ 2 new tokens exceeds the cache capacity 16"),
])
def test_kvcache_paged_bad_input(case, error, words, device):
    k_pages, v_pages = _cache(8, 4, 2, 16, torch.float16, device)  # 8 pages of 4 positions
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], device=device, dtype=torch.int32)  # capacity 16
    q = torch.randn(2, 2, 4, 16, device=device, dtype=torch.float16)
    new = torch.randn(2, 2, 2, 16, device=device, dtype=torch.float16)
    kwargs = dict(k=new, v=new.clone(), cache_seqlens=3)
    if case == "table_dtype":
        table = table.long()
    elif case == "table_rows":
        table = torch.zeros(3, 4, device=device, dtype=torch.int32)
    elif case == "table_1d":
        table = table.flatten()
    elif case == "cache_3d":
        k_pages, v_pages = k_pages[0], v_pages[0]
    else:
        kwargs["cache_seqlens"] = 15
    with pytest.raises(error, match=words):
        ik.flash_attention_with_kvcache(q, k_pages, v_pages, block_table=table, **kwargs)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_kvcache_append_and_attend(backend, new_tokens, rotary, device):
    dtype, d = torch.bfloat16, _dim(backend, 32)
    k_cache, v_cache = _cache(3, 48, 2, d, dtype, device)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    lengths = torch.tensor([0, 9, 44], device=device, dtype=torch.int32)  # 44 + 3 fills nearly all 48
    q = torch.randn(3, new_tokens, 6, d, device=device, dtype=dtype)
    k_new = torch.randn(3, new_tokens, 2, d, device=device, dtype=dtype)
    v_new = torch.randn(3, new_tokens, 2, d, device=device, dtype=dtype)
    tables = ik.rotary_cos_sin(48, d, device=device) if rotary else (None, None)
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lengths,
                                              rotary_cos=tables[0], rotary_sin=tables[1], backend=backend)
        expected = reference.attention_with_kvcache(q, ref_k, ref_v, k=k_new, v=v_new, cache_seqlens=lengths,
                                                    rotary_cos=tables[0], rotary_sin=tables[1])
        exact = reference.attention_with_kvcache(
            q.double(), ref_k.double().clone(), ref_v.double().clone(), k=k_new.double(), v=v_new.double(),
            cache_seqlens=lengths, rotary_cos=tables[0], rotary_sin=tables[1])
    # The cache writes are exact copies (rotated in the input dtype when rotary is fused).
    torch.testing.assert_close(k_cache, ref_k, rtol=0, atol=1e-2 if rotary else 0)
    assert torch.equal(v_cache, ref_v), "v entries are copied bit for bit, nothing else changes"
    assert_within_eager_error([out], [expected], [exact], dtype, 2.0, "kvcache out")


FP8_CACHES = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]


def _skip_unless_triton_reads(cache_dtype, device) -> None:
    if (cache_dtype == torch.float8_e4m3fn and torch.device(device).type == "cuda"
            and torch.cuda.get_device_capability(device) < (8, 9)):
        pytest.skip("Triton's float8_e4m3fn needs sm_89 or newer")


def _fp8_scales(kind: str, heads_kv: int, device):
    """(k_scale, v_scale) as a caller passes them: none (1), floats, one-value tensors, or a
    tensor per KV head."""
    if kind == "none":
        return None, None
    if kind == "float":
        return 0.03, 0.02
    if kind == "one_value":
        return torch.tensor(0.03, device=device), torch.tensor([0.02], device=device)
    return (torch.linspace(0.01, 0.05, heads_kv, device=device),
            torch.linspace(0.03, 0.015, heads_kv, device=device))


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS + ["torch"])
@pytest.mark.parametrize("cache_dtype", FP8_CACHES)
@pytest.mark.parametrize("scales", ["none", "float", "one_value", "per_head"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_kvcache_fp8(backend, cache_dtype, scales, layout, dtype, device, head_dim=32):
    """fp8 caches: the appended entries are the reference's quantization bit for bit (k
    rotated first), and the output is within the eager error of attention over the
    dequantized cache; GQA, ragged lengths, a key tile split over programs."""
    if backend == "triton":
        _skip_unless_triton_reads(cache_dtype, device)
    d, heads_kv, capacity = _dim(backend, head_dim), 2, 200
    k_scale, v_scale = _fp8_scales(scales, heads_kv, device)
    k_cache, v_cache = (reference.quantize_fp8(c, s, cache_dtype)
                        for c, s in zip(_cache(3, capacity, heads_kv, d, dtype, device), (k_scale, v_scale)))
    lengths = torch.tensor([0, 9, 190], device=device, dtype=torch.int32)
    q = torch.randn(3, 2, 6, d, device=device, dtype=dtype)
    new = {name: torch.randn(3, 2, heads_kv, d, device=device, dtype=dtype) for name in ("k", "v")}
    cos, sin = ik.rotary_cos_sin(capacity, d, device=device)
    kwargs = dict(cache_seqlens=lengths, rotary_cos=cos, rotary_sin=sin, k_scale=k_scale, v_scale=v_scale)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    caches, paged = (k_cache, v_cache), {}
    if layout == "paged":
        k_pages, v_pages, table = as_pages(k_cache, v_cache, 16, spare_pages=2)
        caches, paged = (k_pages, v_pages), {"block_table": table}
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, *caches, **new, **paged, backend=backend, **kwargs)
        expected = reference.attention_with_kvcache(q, ref_k, ref_v, **new, **kwargs)
        exact = reference.attention_with_kvcache(q.double(), ref_k.clone(), ref_v.clone(), k=new["k"].double(),
                                                 v=new["v"].double(), **kwargs)
    written = caches if layout == "contiguous" else tuple(_unpaged(c, table)[:, :capacity] for c in caches)
    assert written[0].dtype == cache_dtype and written[1].dtype == cache_dtype
    assert torch.equal(written[1].view(torch.uint8), ref_v.view(torch.uint8)), "v_cache: the stored bits"
    # k is rotated first, in fp32 rounded to bf16, where a GPU's fused multiply-adds may land
    # one bf16 step from the reference's: at most one fp8 step then
    info = torch.finfo(cache_dtype)
    torch.testing.assert_close(written[0].float(), ref_k.float(), rtol=info.eps, atol=info.tiny * info.eps,
                               msg=lambda m: f"k_cache: {m}")
    assert out.dtype == dtype
    assert_within_eager_error([out], [expected], [exact], dtype, 2.0, f"fp8 {scales} {layout}")


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("cache_dtype", FP8_CACHES)
def test_kvcache_fp8_rounding_over_the_whole_range(backend, cache_dtype, device):
    """The append's rounding against torch's conversion, over magnitudes from below the
    smallest subnormal to past the largest finite value (saturated), ties included, signed
    zeros and infinities: every stored byte equal. (NaN is left to the GPU test: Triton's
    interpreter converts a NaN to a finite fp8 value.)"""
    if backend == "triton":
        _skip_unless_triton_reads(cache_dtype, device)
    largest, tiny = torch.finfo(cache_dtype).max, torch.finfo(cache_dtype).tiny
    magnitudes = torch.logspace(math.log10(tiny) - 3, math.log10(largest) + 1, 2000, dtype=torch.float64)
    grid = torch.arange(256, dtype=torch.uint8).view(cache_dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    ties = (grid[1:] + grid[:-1]) / 2  # halfway between neighbours: to the even one
    values = torch.cat([magnitudes.float(), -magnitudes.float(), grid, ties, torch.tensor([0.0, -0.0, float("inf"),
                                                                                           -float("inf")])])
    d = 64
    values = torch.cat([values, values.new_ones(-values.numel() % d)])
    k_new = values.view(1, -1, 1, d).to(device=device, dtype=torch.float32)
    tokens = k_new.shape[1]
    q = torch.randn(1, 1, 1, d, device=device, dtype=torch.bfloat16)
    for scale in (1.0, 0.37):
        # k in bfloat16 (the appended dtype), v the same values: both caches round them
        k_bf16 = k_new.to(torch.bfloat16)
        k_cache, v_cache = (torch.zeros(1, tokens, 1, d, device=device, dtype=cache_dtype) for _ in range(2))
        with torch.no_grad():
            ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=k_bf16, v=k_bf16, cache_seqlens=0, k_scale=scale,
                                            v_scale=scale, backend=backend)
        expected = reference.quantize_fp8(k_bf16, scale, cache_dtype)
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            differ = int((cache.view(torch.uint8) != expected.view(torch.uint8)).sum())
            assert differ == 0, f"{name} scale {scale}: {differ} bytes differ"


def test_kvcache_fp8_bad_input(device):
    k_cache, v_cache = (c.to(torch.float8_e4m3fn) for c in _cache(2, 8, 2, 16, torch.float16, device))
    q = torch.randn(2, 1, 4, 16, device=device, dtype=torch.float16)
    call = functools.partial(ik.flash_attention_with_kvcache, q, cache_seqlens=1)
    with pytest.raises(ValueError, match="k_scale applies to fp8 caches .* the caches are torch.float16"):
        call(*_cache(2, 8, 2, 16, torch.float16, device), k_scale=0.5)
    with pytest.raises(TypeError, match="v_cache has dtype torch.float8_e5m2 but k_cache has torch.float8_e4m3fn"):
        call(k_cache, v_cache.to(torch.float8_e5m2))
    with pytest.raises(ValueError, match="v_scale must be a finite float > 0, got -1.0"):
        call(k_cache, v_cache, v_scale=-1.0)
    with pytest.raises(ValueError, match="k_scale must be a finite float > 0, got nan"):
        call(k_cache, v_cache, k_scale=float("nan"))
    with pytest.raises(TypeError, match="k_scale has dtype torch.float16; expected one of float32"):
        call(k_cache, v_cache, k_scale=torch.ones(2, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="k_scale must hold 1 value or one per KV head \\(2\\).*got shape \\(3,\\)"):
        call(k_cache, v_cache, k_scale=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="v_scale must be a float > 0 or a float32 tensor of 1 or Hkv values, got str"):
        call(k_cache, v_cache, v_scale="1")
    with pytest.raises(RuntimeError, match="KV-cache attention is for inference"):  # a scale that takes gradients
        call(k_cache, v_cache, k_scale=torch.ones(1, device=device, requires_grad=True))
    with pytest.raises(TypeError, match="q has dtype torch.float8_e4m3fn"):
        ik.flash_attention_with_kvcache(q.to(torch.float8_e4m3fn), k_cache, v_cache, cache_seqlens=1)
    # the kernels take 16-bit queries: float32 ones over an fp8 cache go to the reference under auto
    out = ik.flash_attention_with_kvcache(q.float(), k_cache, v_cache, cache_seqlens=1)
    expected = reference.attention_with_kvcache(q.float(), k_cache, v_cache, cache_seqlens=1)
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", FP8_CACHES)
def test_kvcache_fp8_auto_takes_triton_and_the_backends_agree(cache_dtype):
    """"auto" reads fp8 caches with Triton until the CUDA path has passed on a GPU; both
    backends are within the eager error of the exact result on the same fp8 cache (the
    three-way check); a NaN entry is stored as NaN by both appends (the interpreter cannot
    show it: its conversion turns NaN into a finite value, so the CPU tests leave it out)."""
    _skip_unless_triton_reads(cache_dtype, "cuda")
    k_cache, v_cache = (c.to(cache_dtype) for c in _cache(2, 300, 2, 128, torch.bfloat16, "cuda"))
    q = torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([40, 290], device="cuda", dtype=torch.int32)
    scales = dict(k_scale=torch.tensor([0.5, 2.0], device="cuda"), v_scale=0.25)
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, **scales)
        triton_out, cuda_out = (ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                                backend=backend, **scales)
                                for backend in ("triton", "cuda"))
        expected = reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, **scales)
        exact = reference.attention_with_kvcache(q.double(), k_cache, v_cache, cache_seqlens=lengths, **scales)
        assert torch.equal(out, triton_out)
        assert_within_eager_error([triton_out, cuda_out], [expected, expected], [exact, exact], torch.bfloat16, 2.0,
                                  "triton, cuda")
        nan_entry = torch.full((2, 1, 2, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
        for backend in ("triton", "cuda"):
            caches = [c.clone() for c in (k_cache, v_cache)]
            ik.flash_attention_with_kvcache(q, *caches, k=nan_entry, v=nan_entry, cache_seqlens=lengths,
                                            backend=backend, **scales)
            for cache in caches:
                assert cache[0, 40].float().isnan().all() and cache[1, 290].float().isnan().all(), backend


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_kvcache_rotary_fused_equals_rotary_then_attention(backend, interleaved, partial, device):
    """The kernels rotate q and the new k themselves; the same as apply_rotary, then attention.
    Partial: rotary_dim 3 D / 8, so the rotated features end inside a 16-byte chunk."""
    dtype, d = torch.float16, _dim(backend, 32)
    k_cache, v_cache = _cache(2, 32, 2, d, dtype, device)
    lengths = torch.tensor([4, 20], device=device, dtype=torch.int32)
    q = torch.randn(2, 1, 4, d, device=device, dtype=dtype)
    k_new = torch.randn(2, 1, 2, d, device=device, dtype=dtype)
    v_new = torch.randn(2, 1, 2, d, device=device, dtype=dtype)
    cos, sin = ik.rotary_cos_sin(32, 3 * d // 8 if partial else d, device=device)
    fused_k_cache = k_cache.clone()
    with torch.no_grad():
        fused = ik.flash_attention_with_kvcache(q, fused_k_cache, v_cache.clone(), k=k_new, v=v_new,
                                                cache_seqlens=lengths, rotary_cos=cos, rotary_sin=sin,
                                                rotary_interleaved=interleaved, backend=backend)
        q_rot, k_rot = ik.apply_rotary(q, k_new, cos, sin, seqlen_offsets=lengths, interleaved=interleaved,
                                       backend=backend)
        for b, length in enumerate(lengths.tolist()):
            # the rotated k lands in the cache as apply_rotary rounds it (fp32 math, one rounding)
            torch.testing.assert_close(fused_k_cache[b, length], k_rot[b, 0], rtol=1e-3, atol=1e-3)
            keys = torch.cat((k_cache[b:b + 1, :length], k_rot[b:b + 1]), dim=1)
            values = torch.cat((v_cache[b:b + 1, :length], v_new[b:b + 1]), dim=1)
            step = ik.flash_attention(q_rot[b:b + 1], keys, values, causal=True, backend=backend)
            torch.testing.assert_close(fused[b:b + 1], step, rtol=2e-3, atol=2e-3)
        # and the reference, which rotates the same way outside any kernel
        tables = dict(cache_seqlens=lengths, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)
        expected = reference.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k=k_new, v=v_new, **tables)
        exact = reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), k=k_new.double(),
                                                 v=v_new.double(), **tables)
    assert_within_eager_error([fused], [expected], [exact], dtype, 2.0, "fused rotary against the reference")


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_kvcache_rotary_past_the_table_is_nan(backend, device):
    """Positions past the cos/sin table give NaN (as apply_rotary), never an out-of-bounds read."""
    dtype, d = torch.bfloat16, _dim(backend, 32)
    k_cache, v_cache = _cache(2, 32, 1, d, dtype, device)
    lengths = torch.tensor([3, 20], device=device, dtype=torch.int32)  # the table ends at position 16
    cos, sin = ik.rotary_cos_sin(16, d, device=device)
    new = torch.randn(2, 1, 1, d, device=device, dtype=dtype)
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(torch.randn(2, 1, 2, d, device=device, dtype=dtype), k_cache, v_cache,
                                              k=new, v=new, cache_seqlens=lengths, rotary_cos=cos, rotary_sin=sin,
                                              backend=backend)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    assert torch.isfinite(k_cache[0, 3]).all() and torch.isnan(k_cache[1, 20]).all()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_kvcache_decode_without_new_entries_and_with_window(backend, device):
    dtype = torch.float16
    k_cache, v_cache = _cache(2, 40, 1, 64, dtype, device)
    lengths = torch.tensor([1, 37], device=device, dtype=torch.int32)
    q = torch.randn(2, 1, 4, 64, device=device, dtype=dtype)
    for window in [(-1, -1), (8, 0)]:
        out = ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, window_size=window,
                                              backend=backend)
        expected = reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, window_size=window)
        exact = reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(),
                                                 cache_seqlens=lengths, window_size=window)
        assert_within_eager_error([out], [expected], [exact], dtype, 2.0, f"decode window {window}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_kvcache_decode_past_the_grid_limit(backend, device):
    """2048 sequences x 32 KV heads (an MHA model's decode batch): 65536 (batch row, KV head)
    pairs, one past the grid's y / z limit (tests/test_grid_limits.py records the grids)."""
    dtype = torch.bfloat16
    k_cache, v_cache = _cache(2048, 32, 32, 64, dtype, device)
    lengths = torch.randint(1, 32, (2048,), device=device, dtype=torch.int32)
    q = torch.randn(2048, 1, 32, 64, device=device, dtype=dtype)
    out = ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, backend=backend)
    expected = reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    exact = reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), cache_seqlens=lengths)
    assert_within_eager_error([out], [expected], [exact], dtype, 2.0, "65536 (batch, head) pairs")


@pytest.mark.gpu
def test_attention_batch_past_the_grid_limit(device):
    """65540 sequences: the CUDA kernels keep the batch on the grid's y axis and refuse it by
    name; "auto" gives it to Triton, whose launchers run it in slices."""
    q, k, v = _qkv(65540, 3, 3, 2, 1, 64, torch.bfloat16, device)
    with pytest.raises(RuntimeError, match="at most 65535 batch rows"):
        ik.flash_attention(q, k, v, causal=True, backend="cuda")
    _check(q, k, v, "auto", causal=True)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS + ["torch"])
def test_kvcache_overflow_is_nan_not_a_wild_write(backend, device):
    d = _dim(backend, 32)
    k_cache, v_cache = _cache(2, 16, 1, d, torch.float16, device)
    before_k = k_cache.clone()
    lengths = torch.tensor([3, 15], device=device, dtype=torch.int32)  # 15 + 2 > 16 for the second
    new = torch.randn(2, 2, 1, d, device=device, dtype=torch.float16)
    out = ik.flash_attention_with_kvcache(torch.randn(2, 2, 2, d, device=device, dtype=torch.float16), k_cache,
                                          v_cache, k=new, v=new, cache_seqlens=lengths, backend=backend)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    assert torch.equal(k_cache[1, :15], before_k[1, :15]) and torch.equal(k_cache[1, 15], new[1, 0])


# --------------------------------------------------------------------------------------
# registration, compile, backend choice
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["k_cache_is_v_cache", "cache_expanded", "new_k_inside_the_cache"])
def test_kvcache_refuses_caches_that_share_memory(case, device):
    """The append writes both caches while it reads the new k and v."""
    k_cache, v_cache = _cache(2, 8, 1, 32, torch.float16, device)
    new = torch.randn(2, 1, 1, 32, device=device, dtype=torch.float16)
    new_k = new
    if case == "k_cache_is_v_cache":
        v_cache = k_cache
    elif case == "cache_expanded":
        k_cache = k_cache[:1].expand(2, 8, 1, 32)
    else:
        new_k = k_cache[:, :1]
    q = torch.randn(2, 1, 2, 32, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="share"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=new_k, v=new, cache_seqlens=3)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS + ["torch"])
def test_kvcache_negative_length_is_nan_not_a_wild_write(backend, device):
    """cache_seqlens is read on the device, unchecked: a negative length is reported as NaN,
    like an overflow, and only the new entries that land inside the cache are written."""
    d = _dim(backend, 32)
    k_cache, v_cache = _cache(2, 16, 1, d, torch.float16, device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    lengths = torch.tensor([3, -2], device=device, dtype=torch.int32)
    new_k, new_v = (torch.randn(2, 3, 1, d, device=device, dtype=torch.float16) for _ in range(2))
    out = ik.flash_attention_with_kvcache(torch.randn(2, 1, 2, d, device=device, dtype=torch.float16), k_cache,
                                          v_cache, k=new_k, v=new_v, cache_seqlens=lengths, backend=backend)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    # the second sequence's entries go to slots -2, -1 (skipped) and 0
    assert torch.equal(k_cache[1, 0], new_k[1, 2]) and torch.equal(v_cache[1, 0], new_v[1, 2])
    assert torch.equal(k_cache[1, 1:], before_k[1, 1:]) and torch.equal(v_cache[1, 1:], before_v[1, 1:])
    assert torch.equal(k_cache[0, 3:6], new_k[0]) and torch.equal(k_cache[0, 6:], before_k[0, 6:])


def test_fp32_goes_to_the_reference_under_auto_and_raises_for_triton(device):
    q, k, v = _qkv(1, 8, 8, 2, 1, 16, torch.float32, device)
    torch.testing.assert_close(ik.flash_attention(q, k, v, causal=True), reference.attention(q, k, v, causal=True))
    with pytest.raises(RuntimeError, match="the triton kernels take float16 or bfloat16"):
        ik.flash_attention(q, k, v, backend="triton")
    with pytest.raises(RuntimeError, match="backend=.cuda. cannot serve this call"):
        ik.flash_attention(q.half(), k.half(), v.half(), backend="cuda")


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_opcheck(backend, device):
    d = _dim(backend, 16)
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 9, 11, 4, 2, d, torch.float16, device))
    ops = torch.ops.internlm_kernels
    # deterministic False here and True below: both CUDA backward paths go through the checks.
    torch.library.opcheck(ops.flash_attn_fwd.default, (q, k, v, None, None, 0.25, True, -1, -1, False, backend))
    cu = torch.tensor([0, 4, 9], device=device, dtype=torch.int32)
    qp, kp, vp = (t.requires_grad_(True) for t in _qkv(None, 9, 9, 4, 2, d, torch.float16, device, packed=True))
    torch.library.opcheck(ops.flash_attn_fwd.default, (qp, kp, vp, cu, cu, 0.25, False, 2, 1, True, backend))
    k_cache, v_cache = _cache(2, 12, 2, d, torch.float16, device)
    lengths = torch.tensor([2, 7], device=device, dtype=torch.int32)
    new = torch.randn(2, 1, 2, d, device=device, dtype=torch.float16)
    cos, sin = ik.rotary_cos_sin(12, d, device=device)
    torch.library.opcheck(ops.flash_attn_kvcache.default,
                          (torch.randn(2, 1, 4, d, device=device, dtype=torch.float16), k_cache, v_cache, new, new,
                           lengths, cos, sin, False, 0.25, True, -1, -1, None, None, None, backend))
    # paged: pages of 4 positions, each sequence's in its block-table row (Triton's)
    pages = _cache(6, 4, 2, d, torch.float16, device)
    table = torch.tensor([[5, 0, 3], [1, 4, 2]], device=device, dtype=torch.int32)
    torch.library.opcheck(ops.flash_attn_kvcache.default,
                          (torch.randn(2, 1, 4, d, device=device, dtype=torch.float16), *pages, new, new,
                           lengths, cos, sin, False, 0.25, True, -1, -1, table, None, None, "triton"))
    # fp8 caches, a k scale per KV head and one v scale. Without test_schema, whose comparison
    # of the mutated caches multiplies them, which torch lacks for fp8 on the CPU (the schema's
    # mutations are the ones checked above).
    fp8_caches = (c.to(torch.float8_e5m2) for c in _cache(2, 12, 2, d, torch.float16, device))
    scales = (torch.tensor([0.5, 2.0], device=device), torch.tensor([0.25], device=device))
    torch.library.opcheck(ops.flash_attn_kvcache.default,
                          (torch.randn(2, 1, 4, d, device=device, dtype=torch.float16), *fp8_caches, new, new,
                           lengths, cos, sin, False, 0.25, True, -1, -1, None, *scales, backend),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_cuda_alignment_check_traces_without_graph_breaks():
    # The cuda backend's check of 16-byte rows runs while torch.compile traces, also on tensors
    # computed inside the graph (q * 0.5), whose storage_offset() Dynamo cannot trace.
    # Traced here on the CPU, so any machine runs it.
    torch._dynamo.reset()

    def pick(q):
        return q + 1 if _rows_aligned(q * 0.5) else q - 1

    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    # 16-bit values, as the kernels take: 16-byte rows are strides of a multiple of 8 elements
    rows = torch.randn(4, 3, 16, dtype=torch.float16)
    torch.testing.assert_close(compiled(rows), rows + 1)
    odd = torch.randn(4, 3, 12, dtype=torch.float16)  # q * 0.5 has strides 36 and 12
    torch.testing.assert_close(compiled(odd), odd - 1)
    # Eagerly the start counts too: one element past an aligned storage is not 16-byte aligned.
    shifted = torch.randn(65, dtype=torch.float16)[1:].view(4, 16)
    assert _rows_aligned(rows) and not _rows_aligned(shifted)
    # fp8 cache rows: 16 one-byte entries a chunk, so row strides of a multiple of 16
    fp8_rows = torch.zeros(4, 32, dtype=torch.float8_e4m3fn)
    assert _rows_aligned(fp8_rows[:, :16])
    assert not _rows_aligned(torch.zeros(4, 24, dtype=torch.float8_e4m3fn)[:, :16])


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_compiles_without_graph_breaks_varlen_lengths_on_device(backend, device):
    torch._dynamo.reset()

    def layer(q, k, v, cu):  # no max_seqlen: lengths stay on the device; the dq bits compared below
        return ik.flash_attention(q * 0.5, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, deterministic=True,
                                  backend=backend)

    compiled = torch.compile(layer, fullgraph=True)
    q, k, v = _qkv(None, 14, 14, 4, 2, _dim(backend, 16), torch.float16, device, packed=True)
    q.requires_grad_(True)
    for cu in ([0, 5, 14], [0, 1, 2, 14]):
        cu = torch.tensor(cu, device=device, dtype=torch.int32)
        out = compiled(q, k, v, cu)
        expected = layer(q, k, v, cu)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        (dq,) = torch.autograd.grad(out.float().sum(), q)
        (dq_eager,) = torch.autograd.grad(expected.float().sum(), q)
        torch.testing.assert_close(dq, dq_eager, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [*ATTENTION_BACKENDS, "torch"])
def test_compiles_once_for_dynamic_shapes(backend, device):
    # One graph for every packed length and batch size: the ops' Python (checks, backend
    # choice) adds guards on sizes, never a specialisation that would recompile.
    torch._dynamo.reset()
    dtype = torch.float32 if backend == "torch" else torch.float16

    def layers(q, k, v, cu, q_dense, k_dense, v_dense):
        packed = ik.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
        return packed, ik.flash_attention(q_dense, k_dense, v_dense, causal=True, backend=backend)

    compiled = torch.compile(layers, fullgraph=True, dynamic=True)
    d = _dim(backend, 16)
    # The kernels are opaque to the compiler: the same launches, the same bits. The reference's
    # dense path is compiled (fused by inductor), so it may round differently.
    exact = {} if backend == "torch" else {"rtol": 0, "atol": 0}
    with torch._dynamo.config.patch(error_on_recompile=True):
        # Sizes unlike each other and the fixed ones (heads, head dim, the 3 cu_seqlens entries):
        # Dynamo specialises sizes of 1 and ties equal sizes together (duck sizing).
        for tokens, batch in ((9, 5), (14, 6)):
            packed = [t.requires_grad_(True) for t in _qkv(None, tokens, tokens, 4, 2, d, dtype, device, packed=True)]
            dense = [t.requires_grad_(True) for t in _qkv(batch, tokens, tokens, 4, 2, d, dtype, device)]
            cu = torch.tensor([0, 4, tokens], device=device, dtype=torch.int32)
            outs, expected = compiled(*packed, cu, *dense), layers(*packed, cu, *dense)
            torch.testing.assert_close(outs, expected, **exact)
            grads = [torch.randn_like(o) for o in outs]
            torch.testing.assert_close(torch.autograd.grad(outs, packed + dense, grads),
                                       torch.autograd.grad(expected, packed + dense, grads), **exact)


def test_reference_backend_compiles_without_graph_breaks_packed_and_kvcache(device):
    # The reference reads packed lengths and cache lengths on the host, which Dynamo cannot
    # trace; while compiling, those calls run it inside the ops (float32: "auto" takes the
    # reference too). Same values and gradients as the reference called eagerly.
    torch._dynamo.reset()

    def layer(q, k, v, cu):
        return ik.flash_attention(q * 0.5, k, v, causal=True, window_size=(5, -1), cu_seqlens_q=cu,
                                  cu_seqlens_k=cu, backend="auto")

    q, k, v = (t.requires_grad_(True) for t in _qkv(None, 14, 14, 4, 2, 16, torch.float32, device, packed=True))
    compiled = torch.compile(layer, fullgraph=True)
    for cu in ([0, 5, 5, 14], [0, 1, 13]):  # an empty sequence; a padding row
        cu = torch.tensor(cu, device=device, dtype=torch.int32)
        out, expected = compiled(q, k, v, cu), reference.attention(q * 0.5, k, v, causal=True, window_size=(5, -1),
                                                                   cu_seqlens_q=cu, cu_seqlens_k=cu)
        torch.testing.assert_close(out, expected)
        grad = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), grad),
                                   torch.autograd.grad(expected, (q, k, v), grad))

    def decode(q, k_cache, v_cache, k, v, lengths, cos, sin):
        return ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lengths,
                                               rotary_cos=cos, rotary_sin=sin, backend="torch")

    q, new_k, new_v = (torch.randn(2, 2, heads, 16, device=device) for heads in (4, 2, 2))
    caches = _cache(2, 10, 2, 16, torch.float32, device)
    lengths = torch.tensor([3, 8], device=device, dtype=torch.int32)
    cos, sin = ik.rotary_cos_sin(12, 16, device=device)
    expected_caches = [c.clone() for c in caches]
    expected = reference.attention_with_kvcache(q, *expected_caches, k=new_k, v=new_v, cache_seqlens=lengths,
                                                rotary_cos=cos, rotary_sin=sin)
    with torch.no_grad():
        out = torch.compile(decode, fullgraph=True)(q, *caches, new_k, new_v, lengths, cos, sin)
    torch.testing.assert_close(out, expected)
    for cache, expected_cache in zip(caches, expected_caches):
        assert torch.equal(cache, expected_cache), "the compiled call appends to the caches as the reference does"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp8_kvcache_compiles_once_for_changing_float_scales(backend, device):
    """fullgraph, fp8 caches, float scales that change from call to call (symbolic floats
    under torch.compile): one compile, the eager call's bytes and output."""
    torch._dynamo.reset()

    def decode(q, k_cache, v_cache, k, v, lengths, scale):
        return ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lengths, k_scale=scale,
                                               v_scale=2 * scale, backend=backend)

    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(decode, fullgraph=True, backend=counter)
    q, new_k, new_v = (torch.randn(2, 1, heads, 16, device=device, dtype=torch.bfloat16) for heads in (4, 2, 2))
    lengths = torch.tensor([3, 8], device=device, dtype=torch.int32)
    for scale in (0.5, 0.25, 0.125):
        caches = [c.to(torch.float8_e5m2) for c in _cache(2, 10, 2, 16, torch.bfloat16, device)]
        eager_caches = [c.clone() for c in caches]
        with torch.no_grad():
            out = compiled(q, *caches, new_k, new_v, lengths, scale)
            expected = decode(q, *eager_caches, new_k, new_v, lengths, scale)
        assert torch.equal(out, expected)
        for cache, eager_cache in zip(caches, eager_caches):
            assert torch.equal(cache.view(torch.uint8), eager_cache.view(torch.uint8))
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for three scales"


def test_opcheck_reference_backend(device):
    # The ops with backend="torch" (what compiled packed and KV-cache calls of the reference
    # run): schema, fake tensors and autograd registration, as test_opcheck for the kernels.
    ops = torch.ops.internlm_kernels
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 9, 11, 4, 2, 16, torch.float32, device))
    torch.library.opcheck(ops.flash_attn_fwd.default, (q, k, v, None, None, 0.25, True, -1, -1, False, "torch"))
    cu = torch.tensor([0, 4, 9], device=device, dtype=torch.int32)
    qp, kp, vp = (t.requires_grad_(True) for t in _qkv(None, 9, 9, 4, 2, 16, torch.float64, device, packed=True))
    torch.library.opcheck(ops.flash_attn_fwd.default, (qp, kp, vp, cu, cu, 0.25, False, 2, 1, True, "torch"))
    k_cache, v_cache = _cache(2, 12, 2, 16, torch.float32, device)
    new = torch.randn(2, 1, 2, 16, device=device)
    torch.library.opcheck(ops.flash_attn_kvcache.default,
                          (torch.randn(2, 1, 4, 16, device=device), k_cache, v_cache, new, new,
                           torch.tensor([2, 7], device=device, dtype=torch.int32), None, None, False, 0.25, True,
                           -1, -1, None, None, None, "torch"))


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


BAD_CASES = {
    "heads_not_multiple": (ValueError, "q heads (6) must be a multiple of k/v heads (4)"),
    "head_dim_mismatch": (ValueError, "head_dim must match: q has 32, k 16"),
    "head_dim_too_large": (RuntimeError, "head_dim a multiple of 8 up to 256, got 264"),
    "cu_seqlens_dtype": (TypeError, "cu_seqlens_q must be int32"),
    "cu_seqlens_shape": (ValueError, "cu_seqlens_k must have shape (B+1,) = (3,)"),
    "only_one_cu_seqlens": (ValueError, "needs both cu_seqlens_q and cu_seqlens_k"),
    "window": (ValueError, "window_size must be (left, right)"),
    "max_seqlen_tensor": (TypeError, "max_seqlen_q must be a host int"),
    "batch_mismatch": (ValueError, "q has batch 2 but k has 1"),
    "dtype_mix": (TypeError, "k has dtype torch.bfloat16 but q has torch.float16"),
    "cu_seqlens_list": (TypeError, "cu_seqlens_q must be a torch.Tensor or None, got list"),
    "head_dim_zero": (ValueError, "head_dim must be >= 1, got q of shape (2, 8, 4, 0)"),
    "causal_string": (TypeError, "causal must be a bool, got str 'no'"),
    "window_bools": (ValueError, "window_size must be (left, right) ints >= -1"),
    "scale_tensor": (TypeError, "softmax_scale must be a float or None, got Tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_attention_bad_input(case, device):
    q, k, v = _qkv(2, 8, 8, 4, 2, 32, torch.float16, device)
    kwargs = {"backend": "triton"}
    if case == "heads_not_multiple":
        q = torch.randn(2, 8, 6, 32, device=device, dtype=torch.float16)
        k = v = torch.randn(2, 8, 4, 32, device=device, dtype=torch.float16)
    elif case == "head_dim_mismatch":
        k = v = torch.randn(2, 8, 2, 16, device=device, dtype=torch.float16)
    elif case == "head_dim_too_large":
        q, k, v = _qkv(1, 4, 4, 2, 2, 264, torch.float16, device)
    elif case in ("cu_seqlens_dtype", "cu_seqlens_shape", "only_one_cu_seqlens"):
        q, k, v = (t[0] for t in (q, k, v))
        cu = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
        if case == "cu_seqlens_dtype":
            kwargs.update(cu_seqlens_q=cu.long(), cu_seqlens_k=cu)
        elif case == "cu_seqlens_shape":
            kwargs.update(cu_seqlens_q=cu, cu_seqlens_k=cu[:2])
        else:
            kwargs.update(cu_seqlens_q=cu)
    elif case == "window":
        kwargs["window_size"] = (-2, 0)
    elif case == "max_seqlen_tensor":
        kwargs["max_seqlen_q"] = torch.tensor(8)
    elif case == "batch_mismatch":
        k, v = k[:1], v[:1]
    elif case == "dtype_mix":
        k = k.bfloat16()
    elif case == "cu_seqlens_list":
        q, k, v = (t[0] for t in (q, k, v))
        kwargs.update(cu_seqlens_q=[0, 3, 8], cu_seqlens_k=[0, 3, 8])
    elif case == "head_dim_zero":
        q, k, v = (t[..., :0] for t in (q, k, v))
    elif case == "causal_string":
        kwargs["causal"] = "no"
    elif case == "window_bools":
        kwargs["window_size"] = (True, False)
    elif case == "scale_tensor":
        kwargs["softmax_scale"] = torch.tensor(0.25)
    error, message = BAD_CASES[case]
    with pytest.raises(error) as info:
        ik.flash_attention(q, k, v, **kwargs)
    assert message in str(info.value), f"{message!r} not in {info.value!r}"


@pytest.mark.parametrize("case, error, words", [
    ("cache_batch", ValueError, "k_cache has batch 1 but q has 2"),
    ("v_cache_shape", ValueError, "k_cache \\(2, 8, 2, 16\\) and v_cache \\(2, 4, 2, 16\\) must have the same shape"),
    ("new_heads", ValueError, "k \\(2, 3, 1, 16\\) must be \\(B, Snew, Hkv, D\\)"),
    ("new_batch", ValueError, "k \\(1, 3, 2, 16\\) must be \\(B, Snew, Hkv, D\\)"),
    ("new_v_length", ValueError, "v \\(2, 2, 2, 16\\) must be"),
    ("lengths_shape", ValueError, "cache_seqlens must be an int or have shape \\(B,\\) = \\(2,\\), got \\(3,\\)"),
    ("cache_dtype", TypeError, "k_cache has dtype torch.bfloat16 but q has torch.float16"),
    ("new_dtype", TypeError, "k has dtype torch.bfloat16 but q has torch.float16"),
    ("negative_length", ValueError, "cache_seqlens must be >= 0, got -1"),
    ("empty_rotary_tables", ValueError, "rotary_cos and rotary_sin must hold at least one position"),
])
def test_kvcache_bad_shapes_and_dtypes(case, error, words, device):
    k_cache, v_cache = _cache(2, 8, 2, 16, torch.float16, device)
    q = torch.randn(2, 1, 4, 16, device=device, dtype=torch.float16)
    new = torch.randn(2, 3, 2, 16, device=device, dtype=torch.float16)
    kwargs = dict(k=None, v=None, cache_seqlens=1)
    if case == "cache_batch":
        k_cache, v_cache = k_cache[:1], v_cache[:1]
    elif case == "v_cache_shape":
        v_cache = v_cache[:, :4]
    elif case == "new_heads":
        kwargs.update(k=new[:, :, :1], v=new[:, :, :1])
    elif case == "new_batch":
        kwargs.update(k=new[:1], v=new[:1])
    elif case == "new_v_length":
        kwargs.update(k=new, v=new[:, :2])
    elif case == "lengths_shape":
        kwargs.update(cache_seqlens=torch.tensor([1, 2, 3], device=device, dtype=torch.int32))
    elif case == "cache_dtype":
        k_cache, v_cache = k_cache.bfloat16(), v_cache.bfloat16()
    elif case == "new_dtype":
        kwargs.update(k=new.bfloat16(), v=new.bfloat16())
    elif case == "empty_rotary_tables":
        cos, sin = ik.rotary_cos_sin(8, 16, device=device)
        kwargs.update(rotary_cos=cos[:0], rotary_sin=sin[:0])
    else:
        kwargs.update(cache_seqlens=-1)
    with pytest.raises(error, match=words):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, **kwargs)


def test_kvcache_bad_input(device):
    k_cache, v_cache = _cache(2, 8, 2, 16, torch.float16, device)
    q = torch.randn(2, 1, 4, 16, device=device, dtype=torch.float16)
    new = torch.randn(2, 3, 2, 16, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="cache_seqlens 6 \\+ 3 new tokens exceeds the cache capacity 8"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=new, v=new, cache_seqlens=6)
    with pytest.raises(ValueError, match="too short for 9 new tokens"):
        big = torch.randn(2, 9, 2, 16, device=device, dtype=torch.float16)
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=big, v=big, cache_seqlens=0)
    with pytest.raises(TypeError, match="cache_seqlens has dtype torch.int64"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([1, 2], device=device))
    with pytest.raises(ValueError, match="pass k and v together"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=new)
    cos, sin = ik.rotary_cos_sin(8, 16, device=device)
    with pytest.raises(ValueError, match="pass rotary_cos and rotary_sin together"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, rotary_cos=cos)
    with pytest.raises(ValueError, match="rotary_dim = 2 \\* rotary_cos.shape\\[1\\] = 32 exceeds head_dim 16"):
        wide = torch.ones(8, 16, device=device)
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, rotary_cos=wide, rotary_sin=wide)
    with pytest.raises(ValueError, match="rotary_sin \\(8, 4\\) must have rotary_cos's shape \\(8, 8\\)"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, rotary_cos=cos, rotary_sin=sin[:, :4])
    with pytest.raises(TypeError, match="k must be a torch.Tensor or None, got list"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=[1.0], v=new, cache_seqlens=1)
    with pytest.raises(TypeError, match="softmax_scale must be a float or None, got str"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, softmax_scale="0.25")
    with pytest.raises(TypeError, match="cache_seqlens must be an int, an int32 tensor \\(B,\\) or None, got bool"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=True)
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        ik.flash_attention_with_kvcache(q[..., :0], k_cache[..., :0], v_cache[..., :0], cache_seqlens=1)
    with pytest.raises(RuntimeError, match="KV-cache attention is for inference"):  # a cache that takes gradients
        ik.flash_attention_with_kvcache(q, k_cache.clone().requires_grad_(True), v_cache, k=new, v=new,
                                        cache_seqlens=1)
    with pytest.raises(RuntimeError, match="KV-cache attention is for inference"):
        ik.flash_attention_with_kvcache(q.requires_grad_(True), k_cache, v_cache, cache_seqlens=1)


# --------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["flag", "default"])
def test_backward_is_bitwise_deterministic(backend, deterministic, device, monkeypatch):
    # Both backends' default backwards are deterministic too (the CUDA one unless the atomic
    # dQ is requested, which the flag overrides).
    monkeypatch.delenv("INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ", raising=False)
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 700, 700, 32, 8, 128, torch.bfloat16, device))
    grad = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out = ik.flash_attention(q, k, v, causal=True, deterministic=deterministic, backend=backend)
        runs.append(torch.autograd.grad(out, (q, k, v), grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def atomic_dq_changes_only_dq(device, monkeypatch, batch, seqlen, heads_q, heads_kv, head_dim, **kwargs):
    """The CUDA backward's two dQ paths (the dQ kernel, the default; fp32 atomics in the dK/dV
    kernel with INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ=1) give the same dK and dV bits, and dQ
    within a few bf16 roundings of each other (the dQ kernel rounds P to bf16 before dS, as
    eager autograd does; the atomic path does not); both are within the 3x rule of eager
    against fp64. deterministic=True takes the dQ kernel even with the atomics requested."""
    q, k, v = _qkv(batch, seqlen, seqlen, heads_q, heads_kv, head_dim, torch.bfloat16, device)
    grad = torch.randn_like(q)
    _, (dq_kernel, dk_kernel, dv_kernel) = _check(q, k, v, "cuda", grad, **kwargs)
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ", "1")
    _, (dq_atomic, dk_atomic, dv_atomic) = _check(q, k, v, "cuda", grad, **kwargs)
    _, deterministic = _check(q, k, v, "cuda", grad, deterministic=True, **kwargs)
    assert torch.equal(dk_atomic, dk_kernel) and torch.equal(dv_atomic, dv_kernel)
    assert all(torch.equal(a, b) for a, b in zip(deterministic, (dq_kernel, dk_kernel, dv_kernel)))
    scale = dq_kernel.double().abs().max().item()
    error = (dq_atomic.double() - dq_kernel.double()).abs().max().item()
    assert 0 < error <= 2 ** -6 * scale, f"the dQ paths differ by {error:.3g} (largest magnitude {scale:.3g})"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_atomic_dq_changes_only_dq(head_dim, device, monkeypatch):
    atomic_dq_changes_only_dq(device, monkeypatch, 2, 1000, 16, 4, head_dim, causal=True)


def dq_warp_layouts_agree(device, monkeypatch, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, **kwargs):
    """The CUDA dQ kernel's two warp layouts (INTERNLM_KERNELS_CUDA_BWD_DQ_WARP_ROWS 16 or 32)
    take every query row through the same products, 16 keys at a time in key order, so dq is
    bitwise equal (the larger programs only add more exact zeros from masked keys); dk and dv
    come from the same dK/dV kernel. The 32-row layout meets the reference rule."""
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, torch.bfloat16, device)
    grad = torch.randn_like(q)
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_DQ_WARP_ROWS", "16")
    _, rows16 = _check(q, k, v, "cuda", grad, **kwargs)
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_DQ_WARP_ROWS", "32")
    _, rows32 = _check(q, k, v, "cuda", grad, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(rows16, rows32))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kwargs", [{"causal": True}, {}, {"window_size": (300, 0)}], ids=["causal", "full", "window"])
def test_dq_warp_layouts_agree(head_dim, kwargs, device, monkeypatch):
    dq_warp_layouts_agree(device, monkeypatch, 2, 1000, 1000, 16, 4, head_dim, **kwargs)


def backward_key_blocks_agree(device, monkeypatch, batch, seqlen_q, seqlen_k, heads_q, heads_kv,
                              dtype=torch.bfloat16, atomic_dq=False, **kwargs):
    """The CUDA backward's two dK/dV layouts at head_dim 128 (INTERNLM_KERNELS_CUDA_BWD_KEY_BLOCK:
    64 keys with each warp's scores in registers, or 128 keys with P and dS shared), with the
    dQ kernel or with atomic dQ, both meet the reference rule. They round P at different
    points (the shared layout rounds it to bf16 before dS = P (dP - delta), as eager autograd
    does), so they agree within a few roundings (2^-6 of each gradient's largest magnitude),
    not bitwise; with the dQ kernel, dq comes from that kernel either way, bitwise equal."""
    if not takes_key_block128(device):
        pytest.skip("this GPU gives a block too little shared memory for the 128-key layout (sm_86 / sm_89): "
                    "the launcher runs the 64-key one for both")
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, 128, dtype, device)
    grad = torch.randn_like(q)
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ", str(int(atomic_dq)))
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_KEY_BLOCK", "64")
    _, registers = _check(q, k, v, "cuda", grad, **kwargs)
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_KEY_BLOCK", "128")
    _, shared = _check(q, k, v, "cuda", grad, **kwargs)
    for name, ours, theirs in zip(("dq", "dk", "dv"), shared, registers):
        scale = theirs.double().abs().max().item()
        error = (ours.double() - theirs.double()).abs().max().item()
        assert error <= 2 ** -6 * scale, f"{name}: the layouts differ by {error:.3g} (largest magnitude {scale:.3g})"
    assert atomic_dq or torch.equal(shared[0], registers[0])
    assert not torch.equal(shared[1], registers[1]), "dS rounds P differently in the two layouts: some dk bits differ"


@pytest.mark.gpu
@pytest.mark.parametrize("atomic_dq", [False, True], ids=["dq_kernel", "atomic_dq"])
def test_backward_key_blocks_agree(device, monkeypatch, atomic_dq):
    backward_key_blocks_agree(device, monkeypatch, 2, 1000, 1000, 16, 4, causal=True, atomic_dq=atomic_dq)


def forward_warp_layouts_agree(device, monkeypatch, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim,
                               **kwargs):
    """The CUDA forward's two warp layouts (INTERNLM_KERNELS_CUDA_FWD_WARP_ROWS 16 or 32) take
    every query row through the same mma and softmax steps in the same order, so out and lse
    are bitwise equal; the 32-row layout also meets the reference rule forward and backward."""
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, torch.bfloat16, device)
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_FWD_WARP_ROWS", "16")
    rows16 = ik.flash_attention(q, k, v, return_lse=True, backend="cuda", **kwargs)
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_FWD_WARP_ROWS", "32")
    rows32 = ik.flash_attention(q, k, v, return_lse=True, backend="cuda", **kwargs)
    assert torch.equal(rows16[0], rows32[0]) and torch.equal(rows16[1], rows32[1])
    _check(q, k, v, "cuda", **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_forward_warp_layouts_agree(head_dim, device, monkeypatch):
    forward_warp_layouts_agree(device, monkeypatch, 2, 1000, 1000, 16, 4, head_dim, causal=True)


def test_triton_tiles_are_tuned_per_length_bucket():
    """The Triton attention autotuners key on the length bucket. Triton drops key names that
    are not kernel arguments without a word, so this reads the compiled module's autotuners
    (built in a process without the interpreter; no GPU needed to build them)."""
    code = """
from internlm_kernels.triton import attention as a
for tuner in (a._fwd, a._dkdv, a._dq):
    assert type(tuner).__name__ == "Autotuner", type(tuner)
    assert list(tuner.keys) == a.TUNING_KEY and "length_bucket" in a.TUNING_KEY, tuner.keys
    missing = [name for name in a.TUNING_KEY if name not in tuner.arg_names]
    assert not missing, missing
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr[-3000:]


@triton.jit
def _row_offsets_kernel(OUT, tile, q_len, stride_s, stride_h, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The Triton attention kernels' per-row offsets of one query tile, stored."""
    rows_pos, rows_sub, pos_first, _, _ = triton_attention._packed_rows(tile, q_len, GROUP, BLOCK_M)
    offsets = triton_attention._packed_row_offsets(rows_pos, rows_sub, pos_first, stride_s, stride_h, True)
    tl.store(OUT + tl.arange(0, BLOCK_M), offsets)


def test_triton_packed_row_offsets_are_int64():
    """The per-row offsets inside a tile, (position - first) * stride_s + (head within the
    group) * stride_h, pass 2^31 with int32 strides (a head-major q of 2.4M positions, a
    sequence-major one of B * H * D = 17M). The interpreter wraps int32 as the GPU does, so
    the kernels' own helper is checked here without tensors of that size."""
    group, block_m, tile = 4, 64, 3
    stride_s, stride_h = 2**28 + 8, 2**30 - 64  # each term alone passes 2^31 in some row
    out = torch.zeros(block_m, dtype=torch.int64, device="cpu")
    if torch.cuda.is_available():
        out = out.cuda()
    _row_offsets_kernel[(1,)](out, tile, 10**6, stride_s, stride_h, GROUP=group, BLOCK_M=block_m)
    rows = tile * block_m + torch.arange(block_m)
    expected = (rows // group - tile * block_m // group) * stride_s + (rows % group) * stride_h
    assert int(expected.max()) > 2**31
    assert torch.equal(out.cpu(), expected)
    # and the launchers ask for int64 offsets exactly when a tile's can pass 2^31
    class view:  # the strides of a (B, S, H, 128) view, without its memory
        def __init__(self, stride_s, stride_h):
            self.shape, self._strides = (1, 2, group, 128), (0, stride_s, stride_h, 1)

        def stride(self, dim):
            return self._strides[dim]
    assert triton_attention._wide_rows(group, view(stride_s, stride_h))
    assert triton_attention._wide_rows(group, view(4 * 128, 128), view(2**24, 128))  # any of the tensors
    assert not triton_attention._wide_rows(group, view(4 * 128, 128), view(2**20, 128))
    assert triton_attention._wide_rows(32, view(128, 2**27))  # head-major, a group of 32


def test_length_bucket():
    from internlm_kernels.triton.attention import MIN_LENGTH_BUCKET, length_bucket
    assert length_bucket(5000, 8000) == length_bucket(8192, 8192) == 8192  # one tuning for a range of lengths
    assert length_bucket(8193, 1) == length_bucket(1, 8193) == 16384  # the longer side decides
    assert length_bucket(1, 1) == MIN_LENGTH_BUCKET and MIN_LENGTH_BUCKET % 16 == 0
    assert all(length_bucket(n, n) >= n and length_bucket(n, n) & (length_bucket(n, n) - 1) == 0
               for n in (1, 127, 128, 129, 1000, 65537))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_head_major_query_past_2_pow_31_within_a_group(backend, device):
    """q head-major ((B, H, S, D) transposed: stride_h = S * D) with 32 query heads on one KV
    head: a tile's rows span the group's heads, (group - 1) * stride_h = 2.3e9 elements. A
    64-key window keeps the work small; the last positions of the last head are checked,
    forward and backward, against the reference on the keys they see."""
    heads, dim, window, tail = 32, 128, 64, 16
    seqlen = 589_824  # 31 * seqlen * dim > 2^31
    free, _ = torch.cuda.mem_get_info()
    needed = 4 * heads * seqlen * dim * 2 + (1 << 30)  # q, out, out's gradient, dq
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB free")
    q = torch.randn(1, heads, seqlen, dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, seqlen, 1, dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out = ik.flash_attention(q, k, v, causal=True, window_size=(window, 0), backend=backend)
    grad = torch.randn(1, tail, dim, device=device, dtype=torch.bfloat16)
    dq, dk, dv = torch.autograd.grad(out[:, -tail:, -1], (q, k, v), grad)
    # The last `tail` positions see the last tail + window keys: the same problem in small.
    keys = tail + window
    small = [t.detach()[:, -rows:, heads_slice].clone().requires_grad_(True)
             for t, rows, heads_slice in ((q, tail, slice(-1, None)), (k, keys, slice(None)), (v, keys, slice(None)))]
    expected = reference.attention(*small, causal=True, window_size=(window, 0))
    expected_grads = torch.autograd.grad(expected, small, grad[:, :, None])
    exact = [t.detach().double().requires_grad_(True) for t in small]
    exact_out = reference.attention(*exact, causal=True, window_size=(window, 0))
    exact_grads = torch.autograd.grad(exact_out, exact, grad[:, :, None].double())
    assert_within_eager_error([out[:, -tail:, -1:]], [expected], [exact_out], torch.bfloat16, 2.0, "out")
    assert_within_eager_error([dq[:, -tail:, -1:], dk[:, -keys:], dv[:, -keys:]], expected_grads, exact_grads,
                              torch.bfloat16, 3.0, "dq, dk, dv")
    for untouched in (dq[:, :-tail], dk[:, :-keys]):  # no other row has a gradient (aminmax: no full-size temporary)
        assert [float(x) for x in untouched.aminmax()] == [0.0, 0.0]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_realistic_shapes_against_sdpa(backend, head_dim, device):
    q, k, v = _qkv(2, 1024, 1024, 32, 8, head_dim, torch.bfloat16, device)
    _check(q, k, v, backend, causal=True)


def cuda_triton_reference_three_way(case, device, seqlen, heads_q, window, cu_lengths):
    """The two kernel backends agree with each other as closely as each agrees with fp64
    (forward), and within 5% of the gradients' scale (backward)."""
    kwargs, packed = {"causal": True}, False
    if case == "window":
        kwargs = {"window_size": window}
    if case == "varlen":
        packed = True
        cu = torch.tensor(cu_lengths, device=device, dtype=torch.int32)
        kwargs.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
    q, k, v = _qkv(2, seqlen, seqlen, heads_q, 2, 128, torch.bfloat16, device, packed=packed)
    grad = torch.randn_like(q)  # the same upstream gradient for both backends
    cuda_out, cuda_grads = _check(q, k, v, "cuda", grad, **kwargs)
    triton_out, triton_grads = _check(q, k, v, "triton", grad, **kwargs)
    exact = reference.attention(q.double(), k.double(), v.double(), **kwargs)
    bound = 2 * (triton_out.double() - exact).abs().max().item() + 1e-3
    assert (cuda_out.double() - triton_out.double()).abs().max().item() <= bound
    for ours, theirs in zip(cuda_grads, triton_grads):
        scale = theirs.double().abs().max().item()
        assert (ours.double() - theirs.double()).abs().max().item() <= 0.05 * scale


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["causal", "window", "varlen"])
def test_cuda_triton_reference_three_way(case, device):
    cuda_triton_reference_three_way(case, device, 777, 16, (100, 30), [0, 1, 300, 301, 777])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replay_with_new_varlen_lengths(backend, device):
    q, k, v = _qkv(None, 256, 256, 8, 2, 64, torch.bfloat16, device, packed=True)
    cu = torch.tensor([0, 100, 256], device=device, dtype=torch.int32)
    ik.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)  # tune outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ik.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
    for lengths in ([0, 100, 256], [0, 7, 200, 256][:3], [0, 256, 256]):
        cu.copy_(torch.tensor(lengths, device=device, dtype=torch.int32))
        graph.replay()
        expected = reference.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_decode_long_cache_many_splits(backend, device):
    """A batch of one over an 8K cache: the split-KV path with many splits, GQA 8."""
    k_cache, v_cache = _cache(1, 8192, 4, 128, torch.bfloat16, device)
    q = torch.randn(1, 1, 32, 128, device=device, dtype=torch.bfloat16)
    lengths = torch.tensor([8000], device=device, dtype=torch.int32)
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, backend=backend)
    expected = reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    exact = reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), cache_seqlens=lengths)
    assert_within_eager_error([out], [expected], [exact], torch.bfloat16, 2.0, "long decode")


@pytest.mark.gpu
@pytest.mark.parametrize("backend, cache_dtype", [("triton", torch.bfloat16), ("cuda", torch.bfloat16),
                                                  ("triton", torch.float8_e5m2), ("cuda", torch.float8_e4m3fn)],
                         ids=["triton", "cuda", "triton_fp8", "cuda_fp8"])
def test_kvcache_row_past_2_pow_31_elements(backend, cache_dtype, device):
    """One sequence whose cache row holds more than 2^31 elements (2^21 + 128 positions x 8
    KV heads x 128): new entries appended past element 2^31 and a windowed decode over the
    last keys, against the reference on the same slice of the cache."""
    capacity, heads_kv, dim, window, length = 2**21 + 128, 8, 128, 60, 2**21 + 100
    element = torch.empty((), dtype=cache_dtype).element_size()
    needed = (2 * element + 2) * capacity * heads_kv * dim + (1 << 30)  # the caches, and one in bf16 as it is drawn
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB free")
    k_cache, v_cache = (torch.randn(1, capacity, heads_kv, dim, device=device, dtype=torch.bfloat16).to(cache_dtype)
                        for _ in range(2))
    assert length * heads_kv * dim > 2**31
    q = torch.randn(1, 2, 4 * heads_kv, dim, device=device, dtype=torch.bfloat16)
    new = {name: torch.randn(1, 2, heads_kv, dim, device=device, dtype=torch.bfloat16) for name in ("k", "v")}
    lengths = torch.tensor([length], device=device, dtype=torch.int32)
    first = length + 2 - (window + 2)  # the first key the earliest new position sees
    small = [c[:, first:length + 2].clone() for c in (k_cache, v_cache)]  # with the two slots appended to
    kwargs = dict(window_size=(window, 0))
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_cache, v_cache, **new, cache_seqlens=lengths, backend=backend,
                                              **kwargs)
        small_lengths = torch.tensor([length - first], device=device, dtype=torch.int32)
        expected = reference.attention_with_kvcache(q, *small, **new, cache_seqlens=small_lengths, **kwargs)
        exact_caches = [c.clone() if cache_dtype != torch.bfloat16 else c.double() for c in small]
        exact = reference.attention_with_kvcache(q.double(), *exact_caches, k=new["k"].double(),
                                                 v=new["v"].double(), cache_seqlens=small_lengths, **kwargs)
    for cache, written in zip((k_cache, v_cache), small):
        assert torch.equal(cache[:, length:length + 2].view(torch.uint8),
                           written[:, length - first:].view(torch.uint8)), "the entries appended past 2^31"
    assert_within_eager_error([out], [expected], [exact], torch.bfloat16, 2.0, "decode past 2^31")


@pytest.mark.parametrize("window", [(-1, -1), (100, 0), (20, 0)])
def test_decode_splits_share_the_keys_a_short_sequence_has(window, device):
    """The split count comes from the cache's capacity (CUDA graphs replay with new lengths),
    but each split takes an equal run of the key blocks its sequence has: a short sequence
    in a long cache (a serving engine's cache sized for the longest request), or a sliding
    window, spreads over as many splits as it has key blocks rather than the first few. The Triton
    partials show which splits saw keys; the combined output must match the reference."""
    capacity, length, heads_kv, group, head_dim = 4096, 300, 1, 4, 64
    k_cache, v_cache = _cache(1, capacity, heads_kv, head_dim, torch.float16, device)
    q = torch.randn(1, 1, heads_kv * group, head_dim, device=device, dtype=torch.float16)
    lengths = torch.tensor([length], device=device, dtype=torch.int32)
    with torch.no_grad():
        part_o, part_lse, block_n = triton_attention._decode_partials(
            q, k_cache, v_cache, lengths, 0, head_dim**-0.5, True, window, None, None, False, None)
    splits = part_lse.shape[2]
    seen = length if window[0] < 0 else window[0] + 1
    # The keys a query sees start on a block boundary at or below its first key.
    first_block = (length - seen) // block_n
    seen_blocks = -(-length // block_n) - first_block
    assert splits > 1, "the case needs a split count above one"
    per_split = -(-seen_blocks // splits)
    busy = (part_lse[0, :, :, :group] > float("-inf")).all(dim=-1)  # (Hkv, splits): the split saw keys
    assert busy.tolist() == [[s < -(-seen_blocks // per_split) for s in range(splits)]] * heads_kv, (
        f"{splits} splits over {seen_blocks} key blocks of {block_n}: busy {busy.int().tolist()}")
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, window_size=window,
                                              backend="triton")
    expected = reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, window_size=window)
    exact = reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), cache_seqlens=lengths,
                                             window_size=window)
    assert_within_eager_error([out], [expected], [exact], torch.float16, 2.0, "short sequence in a long cache")
