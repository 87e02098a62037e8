"""internlm_kernels.flash_attn_compat: flash-attention's API on the package's kernels.

The functions are argument mappings over ``ik.flash_attention`` / ``ik.flash_attention_with_kvcache``,
so each is held to two things: its result against the reference (the attention rules of
tests/helpers.py), and bit-equality with the package op it maps to, called as flash-attention's
documentation says the arguments mean (positions, defaults, packed layouts, lse layout).
Unsupported arguments must raise, naming themselves.
"""

from __future__ import annotations

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels import flash_attn_compat as fa
from internlm_kernels import reference
from tests.helpers import KERNEL_BACKENDS, assert_close_dtype, assert_within_eager_error

BACKENDS = KERNEL_BACKENDS + ["torch"]
HEAD_DIM = {"cuda": 64}  # the CUDA kernels' smallest head dim; the others take an odd-sized one


def _head_dim(backend):
    return HEAD_DIM.get(backend, 24)


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_func_positional_arguments_match_reference(backend, device):
    """flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size) by position,
    GQA 6/2, Sq < Sk (bottom-right causal), forward and backward against fp64."""
    dtype, d = torch.bfloat16, _head_dim(backend)
    q = torch.randn(2, 13, 6, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 29, 2, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    out = fa.flash_attn_func(q, k, v, 0.0, 0.2, True, (7, -1), backend=backend)
    kwargs = dict(causal=True, softmax_scale=0.2, window_size=(7, -1))
    eager_inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    exact_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    eager = reference.attention(*eager_inputs, **kwargs)
    exact = reference.attention(*exact_inputs, **kwargs)
    assert_within_eager_error([out], [eager], [exact], dtype, 2.0, "out")
    grad = torch.randn_like(out)
    assert_within_eager_error(_grads(out, (q, k, v), grad), _grads(eager, eager_inputs, grad),
                              _grads(exact, exact_inputs, grad.double()), dtype, 3.0, "dq, dk, dv")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_variants_equal_the_unpacked_call(backend, device):
    """qkv (B, S, 3, H, D) and kv (B, S, 2, H, D): the same bits as ik.flash_attention on the
    unbound views, and the gradient of the packed tensor is the three gradients stacked."""
    dtype, d = torch.float16, _head_dim(backend)
    qkv = torch.randn(2, 17, 3, 4, d, device=device, dtype=dtype, requires_grad=True)
    q_only = torch.randn(2, 11, 4, d, device=device, dtype=dtype, requires_grad=True)
    kv = torch.randn(2, 17, 2, 2, d, device=device, dtype=dtype, requires_grad=True)

    out = fa.flash_attn_qkvpacked_func(qkv, causal=True, backend=backend)
    q, k, v = (t.detach().requires_grad_(True) for t in qkv.unbind(2))
    expected = ik.flash_attention(q, k, v, causal=True, backend=backend)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    (dqkv,) = _grads(out, (qkv,), grad)
    assert torch.equal(dqkv, torch.stack(_grads(expected, (q, k, v), grad), dim=2))

    out = fa.flash_attn_kvpacked_func(q_only, kv, causal=True, backend=backend)
    k, v = (t.detach().requires_grad_(True) for t in kv.unbind(2))
    expected = ik.flash_attention(q_only.detach(), k, v, causal=True, backend=backend)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    (dkv,) = _grads(out, (kv,), grad)
    assert torch.equal(dkv, torch.stack(_grads(expected, (k, v), grad), dim=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_variants_and_their_lse(backend, device):
    """flash_attn_varlen_func by position (cu_seqlens, max_seqlen, dropout_p, softmax_scale,
    causal), the packed varlen variants, and return_attn_probs: (out, lse (H, T), an empty
    S_dmask)."""
    dtype, d = torch.bfloat16, _head_dim(backend)
    cu = torch.tensor([0, 5, 5, 19, 26], device=device, dtype=torch.int32)  # an empty sequence too
    total, heads = 26, 4
    qkv = torch.randn(total, 3, heads, d, device=device, dtype=dtype)
    q, k, v = qkv.unbind(1)
    out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cu, cu, 14, 14, 0.0, None, True, return_attn_probs=True,
                                                backend=backend)
    expected, expected_lse = ik.flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                                                return_lse=True, backend=backend)
    assert probs.numel() == 0 and lse.shape == (heads, total)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    exact = reference.attention(q.double(), k.double(), v.double(), causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    eager = reference.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert_within_eager_error([out], [eager], [exact], dtype, 2.0, "varlen out")

    assert torch.equal(fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 14, causal=True, backend=backend), expected)
    kv = qkv[:, 1:]
    assert torch.equal(fa.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 14, 14, causal=True, backend=backend),
                       expected)


def test_dense_lse_layout_and_strided_last_dim(device):
    """return_attn_probs on the dense call gives lse (B, H, Sq); a q whose last dim is strided
    is copied first, as flash-attention's maybe_contiguous does, where ik.flash_attention
    refuses it."""
    q = torch.randn(2, 9, 3, 16, device=device)
    k, v = torch.randn(2, 12, 3, 16, device=device), torch.randn(2, 12, 3, 16, device=device)
    strided_q = torch.randn(2, 9, 3, 32, device=device)[..., ::2]
    strided_q.copy_(q)
    out, lse, probs = fa.flash_attn_func(strided_q, k, v, return_attn_probs=True, backend="torch")
    expected, expected_lse = ik.flash_attention(q, k, v, return_lse=True, backend="torch")
    assert probs.numel() == 0 and lse.shape == (2, 3, 9)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        ik.flash_attention(strided_q, k, v, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_defaults_are_flash_attentions(backend, device):
    """causal=False and rotary_interleaved=True by default, cache_seqlens after the rotary
    tables by position; the caches are appended in place, as by the package op."""
    dtype, d, capacity = torch.bfloat16, _head_dim(backend), 40
    lengths = torch.tensor([3, 30], device=device, dtype=torch.int32)
    q = torch.randn(2, 1, 4, d, device=device, dtype=dtype)
    k_new, v_new = (torch.randn(2, 1, 2, d, device=device, dtype=dtype) for _ in range(2))
    caches = [torch.randn(2, capacity, 2, d, device=device, dtype=dtype) for _ in range(2)]
    theirs = [c.clone() for c in caches]
    cos, sin = ik.rotary_cos_sin(capacity, d, base=1e4, device=device)
    with torch.no_grad():
        out = fa.flash_attn_with_kvcache(q, caches[0], caches[1], k_new, v_new, cos, sin, lengths, backend=backend)
        expected = ik.flash_attention_with_kvcache(q, theirs[0], theirs[1], k=k_new, v=v_new, cache_seqlens=lengths,
                                                   rotary_cos=cos, rotary_sin=sin, rotary_interleaved=True,
                                                   causal=False, backend=backend)
    assert torch.equal(out, expected)
    assert torch.equal(caches[0], theirs[0]) and torch.equal(caches[1], theirs[1])

    # Several query tokens, no rotary: non-causal by default (each sees the whole cache prefix).
    q3 = torch.randn(2, 3, 4, d, device=device, dtype=dtype)
    with torch.no_grad():
        out = fa.flash_attn_with_kvcache(q3, caches[0], caches[1], cache_seqlens=lengths, backend=backend)
        expected = reference.attention_with_kvcache(q3, caches[0], caches[1], cache_seqlens=lengths, causal=False)
        exact = reference.attention_with_kvcache(q3.double(), caches[0].double(), caches[1].double(),
                                                 cache_seqlens=lengths, causal=False)
    assert_within_eager_error([out], [expected], [exact], dtype, 2.0, "kvcache, non-causal")


@pytest.mark.parametrize("call, argument", [
    (lambda q, k, v: fa.flash_attn_func(q, k, v, 0.1), "dropout_p"),
    (lambda q, k, v: fa.flash_attn_func(q, k, v, softcap=30.0), "softcap"),
    (lambda q, k, v: fa.flash_attn_func(q, k, v, alibi_slopes=torch.ones(2)), "alibi_slopes"),
    (lambda q, k, v: fa.flash_attn_qkvpacked_func(torch.stack((q, k, v), 2), 0.5), "dropout_p"),
    (lambda q, k, v: fa.flash_attn_varlen_func(q[0], k[0], v[0], *_cu(q), 4, 4,
                                               block_table=torch.zeros(1, 1, dtype=torch.int32)), "block_table"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(q, k, v, cache_batch_idx=torch.zeros(1, dtype=torch.int32)),
     "cache_batch_idx"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(q, k, v, cache_leftpad=torch.zeros(1, dtype=torch.int32)),
     "cache_leftpad"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(q, k, v, return_softmax_lse=True), "return_softmax_lse"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(q, k, v, softcap=5.0), "softcap"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(torch.cat((q, q), 1), k, v, k[:, :1], v[:, :1],
                                                *ik.rotary_cos_sin(8, 8), cache_seqlens=1), "rotary"),
], ids=["dropout", "softcap", "alibi", "qkvpacked_dropout", "varlen_block_table", "cache_batch_idx",
        "cache_leftpad", "return_softmax_lse", "kvcache_softcap", "rotary_non_causal_several_queries"])
def test_unsupported_arguments_raise_by_name(call, argument):
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    with pytest.raises(NotImplementedError, match=argument):
        call(q, k, v)


def _cu(q):
    cu = torch.tensor([0, q.shape[1]], dtype=torch.int32)
    return cu, cu


def test_kvcache_argument_errors():
    q, k_cache, v_cache = (torch.randn(1, 4, 2, 8) for _ in range(3))
    cos, sin = ik.rotary_cos_sin(8, 8)
    with pytest.raises(ValueError, match="new entries k / v need cache_seqlens"):
        fa.flash_attn_with_kvcache(q[:, :1], k_cache, v_cache, k_cache[:, :1], v_cache[:, :1])
    with pytest.raises(ValueError, match="rotary_cos / rotary_sin apply only with new entries"):
        fa.flash_attn_with_kvcache(q[:, :1], k_cache, v_cache, rotary_cos=cos, rotary_sin=sin, cache_seqlens=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_splits must be an int >= 0"):
            fa.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=bad)
    with pytest.raises(ValueError, match=r"qkv must be \(B, S, 3, H, D\)"):
        fa.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 8))
    with pytest.raises(ValueError, match=r"kv must be \(T, 2, H, D\)"):
        fa.flash_attn_varlen_kvpacked_func(q[0], torch.randn(4, 3, 2, 8), *_cu(q), 4, 4)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        fa.flash_attn_qkvpacked_func([q, q, q])


def test_kvcache_window_as_wide_as_the_cache_is_no_window():
    """flash-attention counts a window bound of at least the cache's capacity as no bound, so
    rotary over several non-causal queries is refused there too; a narrower window is local,
    and runs (q rotated at cache_seqlens + i in both)."""
    q, new = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    k_cache, v_cache = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    cos, sin = ik.rotary_cos_sin(8, 8)
    with pytest.raises(NotImplementedError, match="rotary with 3 query tokens"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cos, sin, 2, window_size=(8, 8))
    out = fa.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), new, new, cos, sin, 2, window_size=(7, 7))
    expected = ik.flash_attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k=new, v=new, cache_seqlens=2,
                                               rotary_cos=cos, rotary_sin=sin, rotary_interleaved=True,
                                               window_size=(7, 7), causal=False)
    assert torch.equal(out, expected)


def test_kvcache_runs_without_gradient():
    """flash-attention's KV-cache call has no backward and runs on inputs that require grad."""
    q = torch.randn(1, 1, 2, 8, requires_grad=True)
    k_cache, v_cache = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=5)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference.attention_with_kvcache(q.detach(), k_cache, v_cache, cache_seqlens=5))


def test_bert_padding_round_trip_through_varlen_attention():
    """unpad_input -> flash_attn_varlen_func -> pad_input equals attention over each sequence
    alone (right padding), zeros at padded positions; the gradient reaches only real tokens."""
    batch, seqlen, heads, d = 3, 7, 2, 8
    lengths = [7, 3, 5]
    mask = torch.zeros(batch, seqlen, dtype=torch.int64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    x = torch.randn(batch, seqlen, 3, heads, d, requires_grad=True)
    packed, indices, cu, max_seqlen, seqused = fa.unpad_input(x, mask)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 7, 10, 15] and max_seqlen == 7
    assert seqused.tolist() == lengths and packed.shape == (15, 3, heads, d)
    assert indices.tolist() == [b * seqlen + s for b, n in enumerate(lengths) for s in range(n)]
    q, k, v = packed.unbind(1)
    out = fa.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True, backend="torch")
    padded = fa.pad_input(out, indices, batch, seqlen)
    assert padded.shape == (batch, seqlen, heads, d)
    for b, n in enumerate(lengths):
        alone = reference.attention(*(t[None] for t in x[b, :n].unbind(1)), causal=True)[0]
        torch.testing.assert_close(padded[b, :n], alone, rtol=1e-5, atol=1e-6)
        assert torch.equal(padded[b, n:], torch.zeros_like(padded[b, n:]))
    (dx,) = torch.autograd.grad(padded, x, torch.randn_like(padded))
    real = mask.bool()
    assert torch.equal(dx[~real], torch.zeros_like(dx[~real])) and (dx[real] != 0).any()
    assert torch.equal(fa.index_first_axis(x.reshape(batch * seqlen, -1), indices), packed.reshape(15, -1))


def test_unpad_input_unused_mask_keeps_tokens_out_of_seqused():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    unused = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]])
    packed, indices, cu, max_seqlen, seqused = fa.unpad_input(torch.arange(8.0).view(2, 4, 1), mask, unused)
    assert indices.tolist() == [0, 1, 2, 4, 5, 6] and packed.flatten().tolist() == [0, 1, 2, 4, 5, 6]
    assert cu.tolist() == [0, 3, 6] and max_seqlen == 3 and seqused.tolist() == [2, 1]


def test_compiles_without_graph_breaks():
    """The argument mapping traces: torch.compile(fullgraph=True) over the packed varlen call
    (the reference's packed path runs inside its custom op while compiling)."""
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    q, kv = torch.randn(10, 4, 16), torch.randn(10, 2, 2, 16)

    def call(q, kv, cu):
        return fa.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 7, 7, 0.0, None, True, backend="torch")

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, kv, cu), call(q, kv, cu))


# flash_attn.layers.rotary


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_apply_rotary_emb_matches_reference(backend, interleaved, device):
    """apply_rotary_emb(x, cos, sin, interleaved, inplace, seqlen_offsets) by position: partial
    rotary (rotary_dim 16 of 24), per-sequence offsets, forward and backward against the
    reference (norm / rotary dtype table)."""
    dtype = torch.bfloat16
    x = torch.randn(2, 7, 3, 24, device=device, dtype=dtype, requires_grad=True)
    cos, sin = ik.rotary_cos_sin(16, 16, base=500.0, device=device)
    offsets = torch.tensor([0, 9], device=device, dtype=torch.int32)
    out = fa.apply_rotary_emb(x, cos, sin, interleaved, False, offsets, backend=backend)
    expected, _ = reference.apply_rotary(x, None, cos, sin, seqlen_offsets=offsets, interleaved=interleaved)
    _assert_like_reference(out, expected, x, dtype)


def _assert_like_reference(out, expected, leaf, dtype):
    """Forward and backward (a fresh random gradient) within the rotary dtype table."""
    assert_close_dtype(out, expected, dtype, "out")
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, leaf, grad)
    (theirs,) = torch.autograd.grad(expected, leaf, grad)
    assert_close_dtype(ours, theirs, dtype, "gradient")


def test_apply_rotary_emb_packed_in_place():
    """Packed tokens with cu_seqlens (and the unused max_seqlen), in place under no_grad: x
    itself comes back rotated, as by ik.apply_rotary."""
    x = torch.randn(11, 2, 16)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    cos, sin = ik.rotary_cos_sin(8, 16)
    expected, _ = ik.apply_rotary(x, None, cos, sin, cu_seqlens=cu, backend="torch")
    with torch.no_grad():
        out = fa.apply_rotary_emb(x, cos, sin, False, True, 0, cu, 7, backend="torch")
    assert out is x and torch.equal(x, expected)
    assert fa.apply_rotary_emb_func is fa.apply_rotary_emb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["qkv", "grouped_qkv", "kv"])
def test_in_place_packed_rotary_and_its_gradient(backend, layout, device):
    """apply_rotary_emb_qkv_ ((B, S, 3, H, D), or (B, S, Hq + 2 Hk, D) with num_heads_q) and
    apply_rotary_emb_kv_: q and k (or k) rotated in place, v untouched, the same tensor
    returned; the gradient through them is the reference's, rotated back."""
    dtype, d = torch.float32 if backend == "torch" else torch.bfloat16, 16
    shape = {"qkv": (2, 5, 3, 4, d), "grouped_qkv": (2, 5, 6 + 2 * 2, d), "kv": (2, 5, 2, 2, d)}[layout]
    base = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    cos, sin = ik.rotary_cos_sin(12, d, device=device)
    packed = base * 1  # a non-leaf, as a projection's output is
    if layout == "qkv":
        out = fa.apply_rotary_emb_qkv_(packed, cos, sin, seqlen_offsets=3, backend=backend)
        q, k, v = base.unbind(2)
    elif layout == "grouped_qkv":
        out = fa.apply_rotary_emb_qkv_(packed, cos, sin, seqlen_offsets=3, num_heads_q=6, backend=backend)
        q, k, v = base[:, :, :6], base[:, :, 6:8], base[:, :, 8:]
    else:
        out = fa.apply_rotary_emb_kv_(packed, cos, sin, seqlen_offsets=3, backend=backend)
        q, (k, v) = None, base.unbind(2)
    assert out is packed
    q_ref, k_ref = reference.apply_rotary(k if q is None else q, None if q is None else k, cos, sin, seqlen_offsets=3)
    if layout == "qkv":
        expected = torch.stack((q_ref, k_ref, v), dim=2)
    elif layout == "grouped_qkv":
        expected = torch.cat((q_ref, k_ref, v), dim=2)
    else:
        expected = torch.stack((q_ref, v), dim=2)
    _assert_like_reference(out, expected, base, dtype)


def test_rotary_in_place_under_autograd_and_its_saved_offsets():
    """apply_rotary_emb(inplace=True) on a non-leaf that requires grad rotates it in place and
    back-propagates as the out-of-place call does (packed, with cu_seqlens); a gradient
    strided in its last dim is taken; a seqlen_offsets tensor changed before the backward is
    an error there (saved as a tensor), not a wrong gradient."""
    base = torch.randn(11, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    cos, sin = ik.rotary_cos_sin(8, 16)
    x = base * 1
    out = fa.apply_rotary_emb(x, cos, sin, False, True, 0, cu, backend="torch")
    assert out is x
    expected = fa.apply_rotary_emb(base, cos, sin, cu_seqlens=cu, backend="torch")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn(11, 16, 2).transpose(1, 2)  # last dim strided
    (dbase,) = torch.autograd.grad(out, base, grad)
    (expected_dbase,) = torch.autograd.grad(expected, base, grad)
    torch.testing.assert_close(dbase, expected_dbase, rtol=1e-6, atol=1e-6)

    offsets = torch.tensor([0, 2], dtype=torch.int32)
    kv = torch.randn(2, 3, 2, 2, 16, requires_grad=True) * 1
    out = fa.apply_rotary_emb_kv_(kv, cos, sin, seqlen_offsets=offsets, backend="torch")
    offsets.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_rotary_compat_errors():
    cos, sin = ik.rotary_cos_sin(8, 16)
    qkv = torch.randn(1, 4, 3, 2, 16)
    with pytest.raises(NotImplementedError, match="cos_k / sin_k"):
        fa.apply_rotary_emb_qkv_(qkv, cos, sin, cos, sin)
    with pytest.raises(ValueError, match=r"num_heads_q = Hq; got shape \(1, 4, 8, 16\) with num_heads_q=None"):
        fa.apply_rotary_emb_qkv_(torch.randn(1, 4, 8, 16), cos, sin)
    with pytest.raises(ValueError, match=r"num_heads_q = Hq; got shape \(1, 4, 8, 16\) with num_heads_q=5"):
        fa.apply_rotary_emb_qkv_(torch.randn(1, 4, 8, 16), cos, sin, num_heads_q=5)
    with pytest.raises(ValueError, match=r"kv must be a tensor \(B, S, 2, H, D\), got \(1, 4, 3, 2, 16\)"):
        fa.apply_rotary_emb_kv_(qkv, cos, sin)
