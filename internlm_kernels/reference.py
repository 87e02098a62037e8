"""Eager PyTorch references: the oracle for every kernel in this package.

Every backend, test and benchmark compares against these functions, and the
"torch" backend *is* these functions. They favour clarity over speed, may
synchronise with the host (``.tolist()`` on ``cu_seqlens``) and import nothing
from the rest of the package.

Numerics follow the HF InternLM/LLaMA eager code where that code defines them:

* RMSNorm: statistics in fp32, the normalised value cast back to the input
  dtype, then multiplied by the weight (``weight * x_hat.to(x.dtype)``), so the
  output dtype is ``promote(x.dtype, weight.dtype)`` as in HF.
* Rotary tables: ``inv_freq = 1 / base ** (arange(0, d, 2) / d)`` in fp32,
  angles ``position * inv_freq`` in fp32, HF's linear and dynamic-NTK scaling.
* Rotary application: computed in fp32 and rounded once to the input dtype.
  (HF rounds cos/sin and each product to bf16; one rounding is strictly closer
  to the exact value and within the bf16 tolerance of HF's result.)
* Attention: scores ``q @ k^T`` and the final ``p @ v`` in the input dtype,
  softmax in fp32, as HF's eager attention. Call it with ``.float()`` inputs to
  get the fp32 oracle of the tolerance rule (tests/helpers.py).

Conventions shared with the kernels (and documented on the public API):

* Causal masks are aligned to the bottom-right corner when ``Sq != Sk``
  (query ``i`` sees keys ``j <= i + Sk - Sq``), as in flash-attention.
* ``window_size=(left, right)``: query ``i`` sees keys in
  ``[i + Sk - Sq - left, i + Sk - Sq + right]``; -1 leaves a side unbounded.
* A query row that sees no key outputs zeros and has ``lse = -inf``.
* Rotary: a token whose position lies outside the cos/sin table gets NaN in
  its rotated features (a visible error, never an out-of-bounds read); packed
  tokens past ``cu_seqlens[-1]`` (padding) pass through unchanged.
* fp8 KV caches (``float8_e4m3fn`` / ``float8_e5m2``, vLLM's and lmdeploy's format):
  a stored entry is ``x / scale`` in fp32, clamped to the format's largest finite
  value, rounded to nearest even; it reads back as ``entry * scale``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 for fp32 and narrower inputs (HF's ``.to(torch.float32)``); fp64 stays fp64, so
    the same functions give the exact oracle when fed fp64 tensors."""
    return torch.promote_types(t.dtype, torch.float32)


def _rms_norm_with_cast(x: Tensor, weight: Tensor, eps: float, normed_dtype: torch.dtype) -> Tensor:
    x_wide = x.to(_compute_dtype(x))
    variance = x_wide.pow(2).mean(-1, keepdim=True)
    x_hat = x_wide * torch.rsqrt(variance + eps)
    return weight * x_hat.to(normed_dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """HF InternLM RMSNorm. x (..., N), weight (N,) -> promote(x.dtype, weight.dtype)."""
    return _rms_norm_with_cast(x, weight, eps, x.dtype)


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, residual_in_fp32: bool = False
) -> Tuple[Tensor, Tensor]:
    """``residual_out = x + residual`` (summed in fp32, stored in residual's dtype, or fp32
    with ``residual_in_fp32``), ``out = RMSNorm(residual_out)`` of the value as stored, with
    the normalised value cast to ``x.dtype`` (the activation dtype) before the weight."""
    wide = torch.promote_types(_compute_dtype(x), _compute_dtype(residual))
    summed = x.to(wide) + residual.to(wide)
    residual_out = summed.to(wide if residual_in_fp32 else residual.dtype)
    return _rms_norm_with_cast(residual_out, weight, eps, x.dtype), residual_out


# --------------------------------------------------------------------------------------
# Rotary embeddings
# --------------------------------------------------------------------------------------


def rotary_inv_freq(rotary_dim: int, base: float, device=None) -> Tensor:
    """``1 / base ** (arange(0, d, 2) / d)`` in fp32, computed exactly as HF does."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (base ** exponents)


def dynamic_ntk_base(base: float, rotary_dim: int, seq_len: int, factor: float, max_position_embeddings: int) -> float:
    """HF's dynamic NTK base: grows once ``seq_len`` exceeds ``max_position_embeddings``."""
    if seq_len <= max_position_embeddings:
        return base
    growth = (factor * seq_len / max_position_embeddings) - (factor - 1)
    return base * growth ** (rotary_dim / (rotary_dim - 2))


def rotary_cos_sin(
    seq_len: int,
    rotary_dim: int,
    *,
    base: float = 10000.0,
    scaling: Optional[dict] = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """cos and sin tables, each (seq_len, rotary_dim // 2).

    scaling: None, {"type": "linear", "factor": f} (positions / f), or
    {"type": "dynamic", "factor": f, "max_position_embeddings": m} (NTK base growth
    when seq_len > m). "rope_type" is accepted as a synonym of "type", as in HF configs.
    """
    scaling_type = None
    if scaling is not None:
        scaling_type = scaling.get("type", scaling.get("rope_type"))
    if scaling_type == "dynamic":
        base = dynamic_ntk_base(base, rotary_dim, seq_len, scaling["factor"], scaling["max_position_embeddings"])
    elif scaling_type not in (None, "default", "linear"):
        raise ValueError(f"rotary scaling type {scaling_type!r} is not supported (expected 'linear' or 'dynamic')")
    inv_freq = rotary_inv_freq(rotary_dim, base, device)
    if scaling_type == "linear":
        # positions / factor, applied to inv_freq as HF does (same angles, HF's rounding).
        inv_freq = inv_freq / scaling["factor"]
    positions = torch.arange(seq_len, dtype=torch.int64, device=device).float()
    angles = torch.outer(positions, inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_positions(
    batch: int,
    seqlen: int,
    device,
    position_ids: Optional[Tensor] = None,
    seqlen_offsets: Union[int, Tensor] = 0,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Position of every token and whether it belongs to a sequence.

    Returns (positions, in_sequence), both (batch, seqlen); packed inputs use
    batch = 1 and seqlen = T. Packed tokens past cu_seqlens[-1] are padding.
    """
    token = torch.arange(seqlen, device=device, dtype=torch.int64)
    in_sequence = torch.ones(batch, seqlen, dtype=torch.bool, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        if cu.numel() < 2:  # no sequences: every token is padding
            return torch.zeros(batch, seqlen, dtype=torch.int64, device=device), in_sequence & False
        sequence = torch.searchsorted(cu[1:], token, right=True).clamp(max=cu.numel() - 2)
        in_sequence = (token < cu[-1])[None, :]
    if position_ids is not None:
        positions = position_ids.to(device=device, dtype=torch.int64).expand(batch, seqlen)
    elif cu_seqlens is not None:
        offsets = torch.as_tensor(seqlen_offsets, device=device, dtype=torch.int64).expand(cu.numel() - 1)
        positions = (token - cu[sequence] + offsets[sequence])[None, :]
    else:
        offsets = torch.as_tensor(seqlen_offsets, device=device, dtype=torch.int64).reshape(-1, 1)
        positions = token[None, :] + offsets
    return positions.expand(batch, seqlen), in_sequence


def _rotate(x: Tensor, positions: Tensor, in_sequence: Tensor, cos: Tensor, sin: Tensor,
            interleaved: bool, conjugate: bool) -> Tensor:
    half = cos.shape[-1]
    rotary_dim = 2 * half
    in_table = (positions >= 0) & (positions < cos.shape[0])
    rows = positions.clamp(0, max(cos.shape[0] - 1, 0))
    wide = torch.promote_types(_compute_dtype(x), cos.dtype)
    nan = torch.tensor(float("nan"), device=x.device, dtype=wide)
    c = torch.where(in_table[..., None], cos.to(wide)[rows], nan)
    s = torch.where(in_table[..., None], sin.to(wide)[rows], nan)
    c, s = c[..., None, :], s[..., None, :]  # (B, S, 1, half)
    if conjugate:
        s = -s
    rotated = x[..., :rotary_dim].to(wide)
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    out = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    # Padding tokens (packed, past cu_seqlens[-1]) pass through bit for bit.
    out = torch.where(in_sequence[..., None, None], out.to(x.dtype), x[..., :rotary_dim])
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)


def apply_rotary(
    q: Tensor,
    k: Optional[Tensor],
    cos: Tensor,
    sin: Tensor,
    *,
    position_ids: Optional[Tensor] = None,
    seqlen_offsets: Union[int, Tensor] = 0,
    cu_seqlens: Optional[Tensor] = None,
    interleaved: bool = False,
    conjugate: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Rotate the first ``2 * cos.shape[-1]`` features of q (B, S, H, D) and k.

    Packed inputs are (T, H, D) with ``cu_seqlens`` (B+1,). ``conjugate`` rotates
    by the negative angle: the backward of the forward rotation.
    """
    packed = cu_seqlens is not None
    q4 = q[None] if packed else q
    batch, seqlen = q4.shape[0], q4.shape[1]
    positions, in_sequence = rotary_positions(
        batch, seqlen, q.device, position_ids, seqlen_offsets, cu_seqlens)

    def rotate(t: Tensor) -> Tensor:
        out = _rotate(t[None] if packed else t, positions, in_sequence, cos, sin, interleaved, conjugate)
        return out[0] if packed else out

    return rotate(q), (rotate(k) if k is not None else None)


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


def attention_mask(seqlen_q: int, seqlen_k: int, causal: bool, window_size: Sequence[int], device=None) -> Tensor:
    """(Sq, Sk) bool, True where query i may attend key j (bottom-right aligned)."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diagonal = i + (seqlen_k - seqlen_q)
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= j >= diagonal - left
    if right >= 0:
        allowed &= j <= diagonal + right
    return allowed


def _attention_dense(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float,
                     window_size: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, Dv), lse (B, Hq, Sq) fp32 (fp64
    for fp64 inputs)."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    allowed = attention_mask(q.shape[1], k.shape[1], causal, window_size, q.device)
    scores = scores.to(_compute_dtype(scores)).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows that see no key: softmax of all -inf is NaN; define them as zero output. Only
    # those: a NaN from the inputs (or the scale) stays NaN, as in the kernels.
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(dim=-1, keepdim=True), probs, 0.0).to(v.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse


def _check_attention_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"q heads ({q.shape[-2]}) must be a multiple of k/v heads ({k.shape[-2]})")
    if k.shape != v.shape[:-1] + k.shape[-1:] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: Sequence[int] = (-1, -1),
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    return_lse: bool = False,
):
    """Multi-head attention with GQA/MQA, causal (bottom-right), sliding window and varlen.

    q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D); or packed q (Tq, Hq, D), k/v (Tk, Hkv, D)
    with cu_seqlens_q / cu_seqlens_k (B+1,). Returns out shaped like q, and with
    return_lse the fp32 log-sum-exp of the scaled scores: (B, Hq, Sq), or (Hq, Tq) packed.
    Packed query rows past cu_seqlens_q[-1] are zero (lse -inf).
    """
    _check_attention_shapes(q, k, v)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens_q is None:
        out, lse = _attention_dense(q, k, v, causal, scale, window_size)
        return (out, lse) if return_lse else out
    if cu_seqlens_k is None:
        raise ValueError("packed attention needs both cu_seqlens_q and cu_seqlens_k")
    # Zeros that depend on q, k and v (with zero gradients): when every sequence is empty the
    # output is still part of the graph, as the kernels' is. Sums of empty slices are exact
    # zeros whatever the inputs hold, and cost nothing.
    no_rows = q[:0].sum() + k[:0].sum() + v[:0].sum()
    out = q.new_zeros(q.shape[:-1] + v.shape[-1:]) + no_rows
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device, dtype=_compute_dtype(q))
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        (q0, q1), (k0, k1) = _packed_span(starts_q, b, q.shape[0]), _packed_span(starts_k, b, k.shape[0])
        if q1 == q0:
            continue
        o, l = _attention_dense(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, scale, window_size)
        out[q0:q1] = o[0]
        lse[:, q0:q1] = l[0]
    return (out, lse) if return_lse else out


def _packed_span(starts: Sequence[int], b: int, total: int) -> Tuple[int, int]:
    """Rows [begin, end) of packed sequence b, clamped into [0, total] with end >= begin, as
    the kernels clamp them (the offsets are read on the device, unchecked): a wrong offset
    gives wrong rows, never rows counted from the end."""
    begin = min(max(starts[b], 0), total)
    return begin, min(max(starts[b + 1], begin), total)


FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _per_head_scale(scale: Union[None, float, Tensor], heads: int, dtype: torch.dtype, device) -> Tensor:
    """A KV-cache scale (None: 1; a float; a tensor of 1 or ``heads`` values) as a (heads, 1)
    tensor of ``dtype`` that broadcasts over a cache's (rows, heads, D)."""
    if scale is None:
        scale = 1.0
    scale = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(-1, 1)
    return scale.expand(heads, 1).to(dtype)


def quantize_fp8(x: Tensor, scale: Union[None, float, Tensor], dtype: torch.dtype) -> Tensor:
    """KV-cache entries (..., H, D) as ``dtype`` (an fp8 type): ``x / scale`` in fp32
    (scale per head, or one for all), clamped to the finite range (NaN stays NaN), rounded
    to nearest even."""
    wide = x.to(torch.float32) / _per_head_scale(scale, x.shape[-2], torch.float32, x.device)
    largest = torch.finfo(dtype).max
    return wide.clamp(-largest, largest).to(dtype)


def dequantize_fp8(entries: Tensor, scale: Union[None, float, Tensor], dtype: torch.dtype) -> Tensor:
    """fp8 KV-cache entries (..., H, D) as ``dtype``: ``entry * scale`` in fp32 (in fp64 for
    fp64, where the product is exact), then rounded to ``dtype``."""
    wide = torch.promote_types(dtype, torch.float32)
    return (entries.to(wide) * _per_head_scale(scale, entries.shape[-2], wide, entries.device)).to(dtype)


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    *,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    cache_seqlens: Union[None, int, Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window_size: Sequence[int] = (-1, -1),
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    rotary_interleaved: bool = False,
    block_table: Optional[Tensor] = None,
    k_scale: Union[None, float, Tensor] = None,
    v_scale: Union[None, float, Tensor] = None,
) -> Tensor:
    """Attention of new queries over a preallocated KV cache, appending new keys first.

    q (B, Sq, Hq, D); k_cache / v_cache (B, S_max, Hkv, D), updated in place;
    k / v (B, Snew, Hkv, D) new entries written at ``cache_seqlens[b]`` (None: the cache
    is full, S_max valid entries). With rotary_cos/sin, q and the new k are rotated at
    positions ``cache_seqlens[b] + i`` before use. Each batch row attends over its
    ``cache_seqlens[b] + Snew`` valid entries, causal aligned bottom-right. A row whose
    length is negative, or whose new entries would not fit, gets NaN outputs; of its new
    entries only those that land in [0, S_max) are written (as the kernels do).

    Paged caches (``block_table`` (B, max_blocks) int32): k_cache / v_cache are pages
    (num_pages, page_size, Hkv, D), and position p of sequence b lives in row p % page_size
    of page block_table[b, p // page_size] (clamped into [0, num_pages)); S_max is
    max_blocks * page_size.

    fp8 caches (``FP8_CACHE_DTYPES``): new entries are stored by ``quantize_fp8`` with
    ``k_scale`` / ``v_scale`` (None: 1; a float, or one value per KV head), and the cache is
    read through ``dequantize_fp8`` into q's dtype.
    """
    fp8 = k_cache.dtype in FP8_CACHE_DTYPES

    def stored(x: Tensor, cache: Tensor, scale) -> Tensor:
        return quantize_fp8(x, scale, cache.dtype) if fp8 else x

    def read(entries: Tensor, scale) -> Tensor:
        return dequantize_fp8(entries, scale, q.dtype) if fp8 else entries

    batch = q.shape[0]
    page_size = k_cache.shape[1]
    capacity = page_size if block_table is None else block_table.shape[1] * page_size
    if cache_seqlens is None:
        lengths = [capacity - (k.shape[1] if k is not None else 0)] * batch
    elif isinstance(cache_seqlens, int):
        lengths = [cache_seqlens] * batch
    else:
        lengths = cache_seqlens.tolist()
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = q.new_empty(q.shape[:-1] + v_cache.shape[-1:])

    def cache_rows(b: int, first: int, last: int):
        """(cache index, row index) of sequence b's positions [first, last)."""
        positions = torch.arange(first, last, device=k_cache.device)
        if block_table is None:
            return b, positions
        # page numbers clamped into the pool, as the kernels clamp them
        pages = block_table[b].long()[positions // page_size].clamp(0, k_cache.shape[0] - 1)
        return pages, positions % page_size

    for b, length in enumerate(lengths):
        q_b = q[b:b + 1]
        if rotary_cos is not None:
            q_b, _ = apply_rotary(q_b, None, rotary_cos, rotary_sin, seqlen_offsets=length,
                                  interleaved=rotary_interleaved)
        total = length
        if k is not None:
            k_b = k[b:b + 1]
            if rotary_cos is not None:
                k_b, _ = apply_rotary(k_b, None, rotary_cos, rotary_sin, seqlen_offsets=length,
                                      interleaved=rotary_interleaved)
            total = length + k.shape[1]
            first, last = max(length, 0), min(total, capacity)  # the slots inside the cache
            if first < last:
                rows = cache_rows(b, first, last)
                k_cache[rows] = stored(k_b[0, first - length:last - length], k_cache, k_scale)
                v_cache[rows] = stored(v[b, first - length:last - length], v_cache, v_scale)
        if length < 0 or total > capacity:
            out[b] = float("nan")
            continue
        rows = cache_rows(b, 0, total)
        o, _ = _attention_dense(q_b, read(k_cache[rows], k_scale)[None], read(v_cache[rows], v_scale)[None], causal,
                                scale, window_size)
        out[b] = o[0]
    return out


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool,
                    backward: bool = False) -> float:
    """FLOPs of attention: 4 * B * H * Sq * Sk * D (two matmuls), halved for causal,
    times 2.5 for the backward pass (five matmuls instead of two)."""
    flops = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        flops /= 2
    return flops * 2.5 if backward else flops


__all__ = [
    "rms_norm", "fused_add_rms_norm", "rotary_inv_freq", "dynamic_ntk_base", "rotary_cos_sin",
    "rotary_positions", "apply_rotary", "attention_mask", "attention", "attention_with_kvcache",
    "attention_flops",
]
