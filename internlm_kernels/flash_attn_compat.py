"""flash-attention's Python API on this package's kernels: a drop-in for model code.

    from internlm_kernels.flash_attn_compat import flash_attn_func, flash_attn_varlen_func
    out = flash_attn_func(q, k, v, 0.0, causal=True)      # where `from flash_attn import ...` was

Same names, argument order, defaults and return values as flash-attention 2's
``flash_attn_interface``, ``bert_padding``'s three helpers and ``layers.rotary``'s
``apply_rotary_emb`` / ``apply_rotary_emb_qkv_`` / ``apply_rotary_emb_kv_`` (in place and
differentiable, as there), so calls written for it run unchanged: positional
``dropout_p``; ``return_attn_probs`` returning ``(out, softmax_lse, S_dmask)``, S_dmask
empty as flash-attention's is without dropout; the packed ``qkv`` / ``kv`` variants, whose
q, k and v are views of the packed tensor (no copy; the gradient comes back packed);
``flash_attn_with_kvcache``'s own defaults (``causal=False``, ``rotary_interleaved=True``),
its refusal of new entries without ``cache_seqlens``, and no gradient. Every function also
takes a keyword-only ``backend`` ("auto" by default, as every op of the package). Values
differ in two out-of-range cases: the lse of a query row that sees no key is -inf here (the
log of an empty sum) where flash-attention 2 writes +inf, and a rotary position past the
cos / sin table is NaN here where flash-attention leaves the token unrotated. A leaf tensor
that requires grad cannot be rotated in place here (autograd refuses it), where
flash-attention lets it through.

Features the kernels do not have raise ``NotImplementedError`` naming the argument, never
a silently different result: dropout (``dropout_p`` > 0), ``softcap``, ``alibi_slopes``,
separate rotary tables for k (``cos_k`` / ``sin_k``),
``block_table`` in the varlen call, ``cache_batch_idx``, ``cache_leftpad``,
``return_softmax_lse`` of the KV-cache call, and the one rotary placement that differs:
flash-attention rotates every query of a non-causal, unwindowed KV-cache call at
``cache_seqlens`` (all at one position), where this package rotates query i at
``cache_seqlens + i``; the two agree whenever q has one token (decoding) or the call is
causal or windowed. ``num_splits`` is a tuning hint there; here the split count is chosen
from the cache size, so it is accepted and not used.

As flash-attention does, inputs whose last dimension is not contiguous are copied first
(the package's own ops refuse them instead).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from internlm_kernels.ops.attention import flash_attention, flash_attention_with_kvcache
from internlm_kernels.ops.rotary import apply_rotary

Tensor = torch.Tensor

__all__ = [
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
    "index_first_axis", "pad_input", "unpad_input",
    "apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_kv_", "apply_rotary_emb_qkv_",
]


def _refuse_unsupported(op: str, dropout_p=0.0, softcap=0.0, alibi_slopes=None, **must_be_none) -> None:
    if dropout_p != 0:
        raise NotImplementedError(f"{op}: dropout_p={dropout_p!r}: the kernels have no attention dropout "
                                  f"(pass 0.0, as flash-attention callers do in evaluation)")
    if softcap != 0:
        raise NotImplementedError(f"{op}: softcap={softcap!r}: logit soft-capping is not implemented (expected 0.0)")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{op}: alibi_slopes: ALiBi biases are not implemented (expected None)")
    for name, value in must_be_none.items():
        if value is not None:
            raise NotImplementedError(f"{op}: {name} is not supported (expected None)")


def _last_dim_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """flash-attention's ``maybe_contiguous``: a copy only when the last dim is strided."""
    if isinstance(t, Tensor) and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _unpack(op: str, name: str, packed: Tensor, parts: int, dim: int):
    """q, k, v (or k, v) as views of a packed tensor: (..., parts, H, D) along ``dim``."""
    if not isinstance(packed, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(packed).__name__}")
    layout = "(B, S, {p}, H, D)" if dim == 2 else "(T, {p}, H, D)"
    if packed.dim() != dim + 3 or packed.shape[dim] != parts:
        raise ValueError(f"{op}: {name} must be {layout.format(p=parts)}, got shape {tuple(packed.shape)}")
    return _last_dim_contiguous(packed).unbind(dim)


def _attention(op: str, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
               deterministic, return_attn_probs, backend, **varlen):
    """The dense and varlen functions' common tail, their shared arguments in flash-attention's
    order."""
    _refuse_unsupported(op, dropout_p, softcap, alibi_slopes)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    result = flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                             return_lse=bool(return_attn_probs), deterministic=deterministic, backend=backend,
                             **varlen)
    if return_attn_probs:  # flash-attention's S_dmask is empty without dropout (refused above)
        out, lse = result
        return out, lse, out.new_empty((0,))
    return result


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, backend: str = "auto"):
    """q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D); with ``return_attn_probs``,
    (out, softmax_lse (B, Hq, Sq) fp32, an empty S_dmask). Semantics of ``ik.flash_attention``."""
    return _attention("flash_attn_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                      alibi_slopes, deterministic, return_attn_probs, backend)


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False, *, backend: str = "auto"):
    """qkv (B, S, 3, H, D) -> out (B, S, H, D)."""
    op = "flash_attn_qkvpacked_func"
    q, k, v = _unpack(op, "qkv", qkv, 3, 2)
    return _attention(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs, backend)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                             causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False, *, backend: str = "auto"):
    """q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D) -> out (B, Sq, Hq, D)."""
    op = "flash_attn_kvpacked_func"
    k, v = _unpack(op, "kv", kv, 2, 2)
    return _attention(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs, backend)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: Optional[Tensor] = None, *,
                           backend: str = "auto"):
    """Packed q (Tq, Hq, D), k / v (Tk, Hkv, D) with cu_seqlens (B + 1,) int32 -> out (Tq, Hq, D);
    with ``return_attn_probs``, (out, softmax_lse (Hq, Tq) fp32, an empty S_dmask)."""
    op = "flash_attn_varlen_func"
    _refuse_unsupported(op, block_table=block_table)
    return _attention(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs, backend,
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k)


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None, causal: bool = False,
                                     window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                                     alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                                     return_attn_probs: bool = False, *, backend: str = "auto"):
    """qkv (T, 3, H, D) with cu_seqlens (B + 1,) int32 -> out (T, H, D)."""
    op = "flash_attn_varlen_qkvpacked_func"
    q, k, v = _unpack(op, "qkv", qkv, 3, 1)
    return _attention(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs, backend,
                      cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                      max_seqlen_k=max_seqlen)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                                    softmax_scale: Optional[float] = None, causal: bool = False,
                                    window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                                    return_attn_probs: bool = False, *, backend: str = "auto"):
    """q (Tq, Hq, D), kv (Tk, 2, Hkv, D) with cu_seqlens (B + 1,) int32 -> out (Tq, Hq, D)."""
    op = "flash_attn_varlen_kvpacked_func"
    k, v = _unpack(op, "kv", kv, 2, 1)
    return _attention(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs, backend,
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k)


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens: Union[None, int, Tensor] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False, *, backend: str = "auto"):
    """KV-cache attention with flash-attention's signature and defaults; semantics of
    ``ik.flash_attention_with_kvcache`` (k_cache / v_cache updated in place when k / v are
    given; paged caches through ``block_table``)."""
    op = "flash_attn_with_kvcache"
    _refuse_unsupported(op, 0.0, softcap, alibi_slopes, cache_batch_idx=cache_batch_idx,
                        cache_leftpad=cache_leftpad)
    if return_softmax_lse:
        raise NotImplementedError(f"{op}: return_softmax_lse=True is not supported (the KV-cache kernels return "
                                  f"the output only)")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"{op}: num_splits must be an int >= 0, got {num_splits!r}")
    if k is not None and cache_seqlens is None:  # flash-attention's own check (the op would append at the end)
        raise ValueError(f"{op}: new entries k / v need cache_seqlens (where to write them)")
    if rotary_cos is not None or rotary_sin is not None:
        if k is None:  # flash-attention rotates only on the way into the cache
            raise ValueError(f"{op}: rotary_cos / rotary_sin apply only with new entries: pass k and v as well")
        if not causal and not _is_local(window_size, k_cache, block_table) and isinstance(q, Tensor) and \
                q.dim() == 4 and q.shape[1] > 1:
            raise NotImplementedError(
                f"{op}: rotary with {q.shape[1]} query tokens in a non-causal, unwindowed call: flash-attention "
                f"rotates them all at position cache_seqlens, this package at cache_seqlens + i; pass causal=True "
                f"(or one query token)")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    with torch.no_grad():  # no backward, as in flash-attention (the package op refuses inputs that want one)
        return flash_attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                            causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                                            rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                            rotary_interleaved=rotary_interleaved, block_table=block_table,
                                            backend=backend)


def _is_local(window_size, k_cache, block_table) -> bool:
    """flash-attention's test for a windowed KV-cache call: a bound of at least the cache's
    capacity is no bound. (A malformed window_size counts as local here; the op's own check
    names it.)"""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2 and isinstance(k_cache, Tensor)
            and k_cache.dim() == 4):
        return True
    capacity = k_cache.shape[1] * (block_table.shape[-1] if isinstance(block_table, Tensor) else 1)
    return any(isinstance(w, int) and 0 <= w < capacity for w in window_size)


# --------------------------------------------------------------------------------------
# flash_attn.bert_padding: between padded (B, S, ...) batches and packed (T, ...) tokens
# --------------------------------------------------------------------------------------


def index_first_axis(input: Tensor, indices: Tensor) -> Tensor:
    """``input[indices]`` along the first axis (input (N, ...), indices (T,) int64)."""
    return input[indices]


def unpad_input(hidden_states: Tensor, attention_mask: Tensor, unused_mask: Optional[Tensor] = None):
    """hidden_states (B, S, ...), attention_mask (B, S) (nonzero: a real token) -> (tokens (T, ...),
    indices (T,) into the flattened B * S, cu_seqlens (B + 1,) int32, max_seqlen (a host int: one
    sync), seqused (B,) int32), flash-attention >= 2.7's five values. ``unused_mask`` (B, S)
    marks tokens to keep in the packed rows but leave out of seqused (flash-attention's
    meaning)."""
    kept = attention_mask.bool() if unused_mask is None else attention_mask.bool() | unused_mask.bool()
    seqused = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    indices, cu_seqlens = token_layout(kept)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if kept.shape[0] else 0
    tokens = index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices)
    return tokens, indices, cu_seqlens, max_seqlen, seqused


def token_layout(kept: Tensor):
    """kept (B, S) bool -> (indices (T,) of the kept tokens in the flattened B * S, cu_seqlens
    (B + 1,) int32): where packing puts each row's kept tokens."""
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(kept.sum(dim=-1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """tokens (T, ...) back to (batch, seqlen, ...), zeros where no token was."""
    output = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    output = output.index_put((indices,), hidden_states)  # out of place, so autograd sees it
    return output.view(batch, seqlen, *hidden_states.shape[1:])


# --------------------------------------------------------------------------------------
# flash_attn.layers.rotary: rotary embedding with cos / sin tables (seqlen_ro, rotary_dim / 2)
# --------------------------------------------------------------------------------------


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False,
                     seqlen_offsets: Union[int, Tensor] = 0, cu_seqlens: Optional[Tensor] = None,
                     max_seqlen: Optional[int] = None, *, backend: str = "auto") -> Tensor:
    """x (B, S, H, D), or packed (T, H, D) with cu_seqlens: the first rotary_dim features of
    token i of each sequence rotated at position i + seqlen_offsets; differentiable, in place
    too (x then must not be a leaf that requires grad). ``max_seqlen`` is not needed."""
    if inplace and torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad:
        return _RotatePartsInPlace.apply(x, cos, sin, _whole, interleaved, seqlen_offsets, cu_seqlens, backend)
    out, _ = apply_rotary(x, None, cos, sin, seqlen_offsets=seqlen_offsets, cu_seqlens=cu_seqlens,
                          interleaved=interleaved, inplace=inplace, backend=backend)
    return out


apply_rotary_emb_func = apply_rotary_emb  # flash-attention's older name


class _RotatePartsInPlace(torch.autograd.Function):
    """flash-attention's in-place rotary of a tensor or of the q / k parts of a packed qkv or
    kv tensor, with a backward: it rotates the same parts of the gradient back (sin negated,
    the inverse rotation). ``parts(t)`` returns the (q, k) views of t to rotate (k may be
    None). A leaf that requires grad cannot be changed in place (autograd refuses it)."""

    @staticmethod
    def forward(ctx, packed, cos, sin, parts, interleaved, seqlen_offsets, cu_seqlens, backend):
        with torch.no_grad():
            q, k = parts(packed)
            apply_rotary(q, k, cos, sin, seqlen_offsets=seqlen_offsets, cu_seqlens=cu_seqlens,
                         interleaved=interleaved, inplace=True, backend=backend)
        ctx.mark_dirty(packed)
        # Tensors saved as tensors, so that changing one before the backward is an error there.
        offsets_tensor = seqlen_offsets if isinstance(seqlen_offsets, Tensor) else None
        ctx.save_for_backward(cos, sin, offsets_tensor, cu_seqlens)
        ctx.offset_int = None if offsets_tensor is not None else seqlen_offsets
        ctx.parts, ctx.interleaved, ctx.backend = parts, interleaved, backend
        return packed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cos, sin, offsets_tensor, cu_seqlens = ctx.saved_tensors
        offsets = offsets_tensor if offsets_tensor is not None else ctx.offset_int
        # rotated in place below: a dense copy (the incoming gradient may be shared, expanded or
        # strided in its last dimension)
        grad = grad.clone(memory_format=torch.contiguous_format)
        dq, dk = ctx.parts(grad)
        apply_rotary(dq, dk, cos, -sin, seqlen_offsets=offsets, cu_seqlens=cu_seqlens, interleaved=ctx.interleaved,
                     inplace=True, backend=ctx.backend)
        return grad, None, None, None, None, None, None, None


def apply_rotary_emb_qkv_(qkv: Tensor, cos: Tensor, sin: Tensor, cos_k: Optional[Tensor] = None,
                          sin_k: Optional[Tensor] = None, interleaved: bool = False,
                          seqlen_offsets: Union[int, Tensor] = 0, num_heads_q: Optional[int] = None, *,
                          backend: str = "auto") -> Tensor:
    """Rotates q and k of qkv in place and returns qkv: (B, S, 3, H, D), or (B, S, Hq + 2 Hk, D)
    with ``num_heads_q`` (GQA). One launch for q and k; differentiable."""
    op = "apply_rotary_emb_qkv_"
    if cos_k is not None or sin_k is not None:
        raise NotImplementedError(f"{op}: cos_k / sin_k (separate tables for k) are not supported (expected None)")
    if not isinstance(qkv, Tensor):
        raise TypeError(f"{op}: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() == 5 and qkv.shape[2] == 3:
        parts = _qkv_parts
    elif qkv.dim() == 4 and isinstance(num_heads_q, int) and not isinstance(num_heads_q, bool) and \
            0 < num_heads_q < qkv.shape[2] and (qkv.shape[2] - num_heads_q) % 2 == 0:
        parts = functools.partial(_grouped_qkv_parts, num_heads_q=num_heads_q)
    else:
        raise ValueError(f"{op}: qkv must be (B, S, 3, H, D), or (B, S, Hq + 2 * Hk, D) with num_heads_q = Hq; "
                         f"got shape {tuple(qkv.shape)} with num_heads_q={num_heads_q!r}")
    return _RotatePartsInPlace.apply(qkv, cos, sin, parts, interleaved, seqlen_offsets, None, backend)


def apply_rotary_emb_kv_(kv: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                         seqlen_offsets: Union[int, Tensor] = 0, *, backend: str = "auto") -> Tensor:
    """Rotates k of kv (B, S, 2, H, D) in place and returns kv; differentiable."""
    if not isinstance(kv, Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        shape = tuple(kv.shape) if isinstance(kv, Tensor) else type(kv).__name__
        raise ValueError(f"apply_rotary_emb_kv_: kv must be a tensor (B, S, 2, H, D), got {shape}")
    return _RotatePartsInPlace.apply(kv, cos, sin, _kv_parts, interleaved, seqlen_offsets, None, backend)


def _whole(x: Tensor):
    return x, None


def _qkv_parts(qkv: Tensor):
    return qkv[:, :, 0], qkv[:, :, 1]


def _grouped_qkv_parts(qkv: Tensor, num_heads_q: int):
    heads_k = (qkv.shape[2] - num_heads_q) // 2
    return qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q:num_heads_q + heads_k]


def _kv_parts(kv: Tensor):
    return kv[:, :, 0], None
