"""The eager references against outside oracles: HF transformers and torch SDPA.

Everything else in the suite is judged against ``internlm_kernels.reference``, so the
reference itself is judged against code this project did not write.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from internlm_kernels import reference

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb,
)


# --------------------------------------------------------------------------------------
# RMSNorm and rotary vs HF
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rms_norm_is_bit_identical_to_hf(dtype):
    hf = LlamaRMSNorm(123, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.5 * torch.randn(123))
    x = torch.randn(4, 9, 123, dtype=dtype)
    assert torch.equal(reference.rms_norm(x, hf.weight, 1e-5), hf(x))


def test_fused_add_rms_norm_is_add_then_hf_norm():
    hf = LlamaRMSNorm(64, eps=1e-6).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    residual = torch.randn(3, 64, dtype=torch.bfloat16)
    out, residual_out = reference.fused_add_rms_norm(x, residual, hf.weight, 1e-6)
    assert torch.equal(residual_out, x + residual)
    assert torch.equal(out, hf(x + residual))


def _hf_config(scaling, max_pos=32, head_dim=16, theta=500.0):
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_pos,
                       rope_theta=theta, rope_scaling=scaling)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "dynamic", "factor": 2.0}], ids=["default", "linear", "dynamic"])
@pytest.mark.parametrize("seq_len", [20, 45], ids=["short", "past_max_pos"])
def test_rotary_tables_match_hf(scaling, seq_len):
    hf = LlamaRotaryEmbedding(_hf_config(scaling))
    x = torch.randn(1, seq_len, 64)
    hf_cos, hf_sin = hf(x, torch.arange(seq_len)[None])
    ours_scaling = None if scaling is None else {**scaling, "max_position_embeddings": 32}
    cos, sin = reference.rotary_cos_sin(seq_len, 16, base=500.0, scaling=ours_scaling)
    # HF repeats the half table: emb = cat(freqs, freqs)
    torch.testing.assert_close(torch.cat((cos, cos), -1), hf_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat((sin, sin), -1), hf_sin[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_apply_rotary_matches_hf_apply_rotary_pos_emb(dtype):
    batch, heads, seqlen, head_dim = 2, 3, 11, 16
    hf = LlamaRotaryEmbedding(_hf_config(None, head_dim=head_dim))
    q = torch.randn(batch, heads, seqlen, head_dim, dtype=dtype)  # HF layout (B, H, S, D)
    k = torch.randn(batch, 1, seqlen, head_dim, dtype=dtype)
    position_ids = torch.stack([torch.arange(seqlen), torch.arange(seqlen) + 7])
    cos_hf, sin_hf = hf(q, position_ids)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = reference.rotary_cos_sin(40, head_dim, base=500.0)
    q_out, k_out = reference.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, position_ids=position_ids)
    # HF rounds cos/sin and each product to the input dtype; ours rounds once.
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q_out.transpose(1, 2), q_hf, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(k_out.transpose(1, 2), k_hf, rtol=tolerance, atol=tolerance)


def test_interleaved_layout_is_gptj_pairs():
    # Interleaved == half layout after permuting features (pairs 2i, 2i+1 -> i, i + d/2).
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    cos, sin = reference.rotary_cos_sin(5, 8)
    permutation = torch.cat((torch.arange(0, 8, 2), torch.arange(1, 8, 2)))
    interleaved, _ = reference.apply_rotary(q, None, cos, sin, interleaved=True)
    half, _ = reference.apply_rotary(q[..., permutation], None, cos, sin)
    torch.testing.assert_close(interleaved[..., permutation], half)


def test_conjugate_rotation_inverts():
    q = torch.randn(2, 6, 3, 16, dtype=torch.float64)
    cos, sin = reference.rotary_cos_sin(6, 12)
    rotated, _ = reference.apply_rotary(q, None, cos, sin)
    back, _ = reference.apply_rotary(rotated, None, cos, sin, conjugate=True)
    torch.testing.assert_close(back, q)


# --------------------------------------------------------------------------------------
# attention vs torch SDPA
# --------------------------------------------------------------------------------------


def _sdpa(q, k, v, **kwargs):
    """SDPA on (B, S, H, D) tensors."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
    return out.transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)], ids=["mha", "gqa3", "mqa"])
def test_attention_matches_sdpa(causal, heads):
    hq, hkv = heads
    q = torch.randn(2, 9, hq, 16, dtype=torch.float64)
    k = torch.randn(2, 9, hkv, 16, dtype=torch.float64)
    v = torch.randn(2, 9, hkv, 16, dtype=torch.float64)
    expected = _sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal), expected)


@pytest.mark.parametrize("seqlens", [(5, 12), (12, 5)], ids=["sq<sk", "sq>sk"])
def test_causal_is_bottom_right_aligned(seqlens):
    sq, sk = seqlens
    q = torch.randn(1, sq, 2, 8, dtype=torch.float64)
    k = torch.randn(1, sk, 2, 8, dtype=torch.float64)
    v = torch.randn(1, sk, 2, 8, dtype=torch.float64)
    out = reference.attention(q, k, v, causal=True)
    if sq <= sk:
        expected = _sdpa(q, k, v, attn_mask=causal_lower_right(sq, sk))
        torch.testing.assert_close(out, expected)
    else:
        # The first sq - sk queries see no key: zeros by this package's convention.
        expected = _sdpa(q[:, sq - sk:], k, v, attn_mask=causal_lower_right(sk, sk))
        torch.testing.assert_close(out[:, sq - sk:], expected)
        assert torch.equal(out[:, :sq - sk], torch.zeros_like(out[:, :sq - sk]))
        _, lse = reference.attention(q, k, v, causal=True, return_lse=True)
        assert torch.isneginf(lse[:, :, :sq - sk]).all() and torch.isfinite(lse[:, :, sq - sk:]).all()


def test_window_properties():
    q = torch.randn(1, 7, 2, 8, dtype=torch.float64)
    k = torch.randn(1, 7, 2, 8, dtype=torch.float64)
    v = torch.randn(1, 7, 2, 8, dtype=torch.float64)
    full = reference.attention(q, k, v)
    torch.testing.assert_close(reference.attention(q, k, v, window_size=(-1, -1)), full)
    torch.testing.assert_close(reference.attention(q, k, v, window_size=(100, 100)), full)
    torch.testing.assert_close(reference.attention(q, k, v, window_size=(100, 0)),
                               reference.attention(q, k, v, causal=True))
    # A zero-width window sees only its own key: the output is that key's value.
    torch.testing.assert_close(reference.attention(q, k, v, window_size=(0, 0)), v)
    mask = reference.attention_mask(7, 7, False, (2, 1))
    assert mask.sum(1).tolist() == [2, 3, 4, 4, 4, 4, 3]


@pytest.mark.parametrize("seqlens", [(5, 12), (12, 5), (7, 7)], ids=["sq<sk", "sq>sk", "sq=sk"])
@pytest.mark.parametrize("causal, window", [(False, (2, 1)), (False, (0, 3)), (False, (-1, 2)), (False, (3, -1)),
                                            (True, (2, -1)), (True, (4, 5))])
def test_window_is_bottom_right_aligned(seqlens, causal, window):
    """flash-attn's rule, element by element: query i sees keys [i + Sk - Sq - left,
    i + Sk - Sq + right], a bound of -1 being unbounded and causal setting right to 0. The
    kernels are tested against the reference, so the reference is tested against the rule."""
    sq, sk = seqlens
    left, right = window
    right = 0 if causal else right
    rule = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        for j in range(sk):
            diagonal = i + sk - sq
            rule[i, j] = (left < 0 or j >= diagonal - left) and (right < 0 or j <= diagonal + right)
    mask = reference.attention_mask(sq, sk, causal, window)
    assert torch.equal(mask, rule), f"mask {mask.int().tolist()} != rule {rule.int().tolist()}"

    q = torch.randn(1, sq, 2, 8, dtype=torch.float64)
    k = torch.randn(1, sk, 2, 8, dtype=torch.float64)
    v = torch.randn(1, sk, 2, 8, dtype=torch.float64)
    out, lse = reference.attention(q, k, v, causal=causal, window_size=window, return_lse=True)
    seeing = rule.any(1)
    expected = _sdpa(q[:, seeing], k, v, attn_mask=rule[seeing])
    torch.testing.assert_close(out[:, seeing], expected)
    assert torch.equal(out[:, ~seeing], torch.zeros_like(out[:, ~seeing])), "rows that see no key are zero"
    assert torch.isneginf(lse[:, :, ~seeing]).all() and torch.isfinite(lse[:, :, seeing]).all()


def test_lse_normalises_the_softmax():
    q = torch.randn(2, 5, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 6, 2, 8, dtype=torch.float64)
    v = torch.eye(6, dtype=torch.float64)[None, :, None, :].expand(2, 6, 2, 6).contiguous()
    out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    # With identity values, out rows are the softmax probabilities: they sum to one ...
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 5, 4, dtype=torch.float64))
    # ... and exp(score - lse) reproduces them.
    k_rep = k.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_rep) * 8 ** -0.5
    probs = torch.exp(scores - lse[..., None]).masked_fill(~reference.attention_mask(5, 6, True, (-1, -1)), 0)
    torch.testing.assert_close(probs.transpose(1, 2), out)


def test_varlen_attention_is_per_sequence_attention():
    lengths_q, lengths_k = [3, 0, 1, 5], [4, 2, 1, 5]
    cu_q = torch.tensor([0, 3, 3, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 7, 12], dtype=torch.int32)
    q = torch.randn(10, 6, 8, dtype=torch.float64)  # one padding row past cu_q[-1]
    k = torch.randn(12, 2, 8, dtype=torch.float64)
    v = torch.randn(12, 2, 8, dtype=torch.float64)
    out, lse = reference.attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    assert out.shape == q.shape and lse.shape == (6, 10)
    for b in range(4):
        q0, k0 = int(cu_q[b]), int(cu_k[b])
        if lengths_q[b] == 0:
            continue
        expected = _sdpa(q[None, q0:q0 + lengths_q[b]], k[None, k0:k0 + lengths_k[b]], v[None, k0:k0 + lengths_k[b]],
                         attn_mask=causal_lower_right(lengths_q[b], lengths_k[b]), enable_gqa=True)
        torch.testing.assert_close(out[q0:q0 + lengths_q[b]], expected[0])
    assert torch.equal(out[9], torch.zeros_like(out[9])) and torch.isneginf(lse[:, 9]).all()


def test_kvcache_attention_appends_and_attends():
    batch, max_len, hkv, d = 3, 16, 2, 8
    k_cache = torch.randn(batch, max_len, hkv, d, dtype=torch.float64)
    v_cache = torch.randn(batch, max_len, hkv, d, dtype=torch.float64)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    cache_seqlens = torch.tensor([0, 5, 13], dtype=torch.int32)
    q = torch.randn(batch, 2, 4, d, dtype=torch.float64)
    k_new = torch.randn(batch, 2, hkv, d, dtype=torch.float64)
    v_new = torch.randn(batch, 2, hkv, d, dtype=torch.float64)
    cos, sin = reference.rotary_cos_sin(max_len, d)
    out = reference.attention_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=cache_seqlens,
                                           rotary_cos=cos, rotary_sin=sin)
    for b, length in enumerate(cache_seqlens.tolist()):
        q_rot, _ = reference.apply_rotary(q[b:b + 1], None, cos, sin, seqlen_offsets=length)
        k_rot, _ = reference.apply_rotary(k_new[b:b + 1], None, cos, sin, seqlen_offsets=length)
        torch.testing.assert_close(k_cache[b, length:length + 2], k_rot[0])
        torch.testing.assert_close(v_cache[b, length:length + 2], v_new[b])
        # Everything outside the written slots is untouched.
        assert torch.equal(k_cache[b, :length], before_k[b, :length])
        assert torch.equal(k_cache[b, length + 2:], before_k[b, length + 2:])
        assert torch.equal(v_cache[b, length + 2:], before_v[b, length + 2:])
        expected = reference.attention(q_rot, k_cache[b:b + 1, :length + 2], v_cache[b:b + 1, :length + 2],
                                       causal=True)
        torch.testing.assert_close(out[b:b + 1], expected)


@pytest.mark.parametrize("dtype", reference.FP8_CACHE_DTYPES)
def test_fp8_cache_quantization(dtype):
    """quantize_fp8: x / scale per head, saturated at the largest finite value, within half an
    fp8 step (relative, for normal values) of what it stores; dequantize_fp8 inverts the
    scaling exactly in fp64."""
    info = torch.finfo(dtype)
    x = torch.randn(5, 3, 16, dtype=torch.float64) * torch.tensor([1.0, 30.0, 1e4], dtype=torch.float64)[:, None]
    scale = torch.tensor([0.5, 0.1, 2.0])  # per head: the third saturates for e4m3 (1e4 / 2 > 448)
    stored = reference.quantize_fp8(x, scale, dtype)
    assert stored.dtype == dtype
    scaled = x.float() / scale[:, None]
    values = stored.float()
    assert (values.abs() <= info.max).all()
    normal = (scaled.abs() >= info.tiny) & (scaled.abs() <= info.max)
    assert ((values - scaled).abs() <= info.eps / 2 * scaled.abs())[normal].all()
    assert torch.equal(values[scaled.abs() > info.max], info.max * scaled[scaled.abs() > info.max].sign())
    back = reference.dequantize_fp8(stored, scale, torch.float64)
    assert torch.equal(back, values.double() * scale.double()[:, None])
    one_scale = reference.quantize_fp8(x, 0.5, dtype)  # a float scales every head
    assert torch.equal(one_scale.view(torch.uint8), reference.quantize_fp8(x, torch.tensor([0.5]), dtype).view(
        torch.uint8))


def test_kvcache_attention_over_an_fp8_cache_is_attention_over_its_dequantized_entries():
    torch.manual_seed(0)
    k_cache, v_cache = (torch.randn(2, 10, 2, 8).to(torch.float8_e4m3fn) for _ in range(2))
    q = torch.randn(2, 1, 4, 8, dtype=torch.float64)
    new = torch.randn(2, 1, 2, 8, dtype=torch.float64)
    k_scale, v_scale = torch.tensor([0.5, 2.0]), 0.25
    lengths = torch.tensor([3, 9], dtype=torch.int32)
    before_k = k_cache.clone()
    out = reference.attention_with_kvcache(q, k_cache, v_cache, k=new, v=new, cache_seqlens=lengths,
                                           k_scale=k_scale, v_scale=v_scale)
    for b, length in enumerate(lengths.tolist()):
        assert torch.equal(k_cache[b, length].view(torch.uint8),
                           reference.quantize_fp8(new[b, 0], k_scale, torch.float8_e4m3fn).view(torch.uint8))
        assert torch.equal(k_cache[b, :length].view(torch.uint8), before_k[b, :length].view(torch.uint8))
        keys = k_cache[b, :length + 1].double() * k_scale.double()[:, None]
        values = v_cache[b, :length + 1].double() * v_scale
        torch.testing.assert_close(out[b:b + 1], reference.attention(q[b:b + 1], keys[None], values[None]))


def test_attention_flops_formula():
    assert reference.attention_flops(1, 1, 2, 3, 4, causal=False) == 4 * 2 * 3 * 4
    assert reference.attention_flops(2, 8, 1024, 1024, 128, causal=True, backward=True) == \
        2.5 * 4 * 2 * 8 * 1024 * 1024 * 128 / 2
