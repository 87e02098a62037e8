"""Fused attention: public functions, torch.library ops, autograd.

Registered ops (namespace ``internlm_kernels``):

  flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left,
                 window_right, deterministic, backend) -> (out, lse)             differentiable
  flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                 window_left, window_right, deterministic, backend) -> (dq, dk, dv)
  flash_attn_kvcache(q, k_cache!, v_cache!, k, v, cache_seqlens, rotary_cos, rotary_sin,
                     rotary_interleaved, softmax_scale, causal, window_left, window_right,
                     block_table, k_scale, v_scale, backend) -> out              inference

The API mirrors flash-attention's ``flash_attn_func`` / ``flash_attn_varlen_func`` /
``flash_attn_with_kvcache`` so model code can switch. The "torch" backend is the eager
reference (any dtype and head dim; its varlen and KV-cache paths sync with the host). Called
eagerly it runs directly; while torch.compile traces, its packed and KV-cache calls go
through the ops above with backend "torch" (the lengths it reads on the host cannot be
traced), whose implementations run the same reference.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from internlm_kernels import reference
from internlm_kernels._checks import (
    FLOAT_DTYPES, check_cu_seqlens, check_dim, check_dtype, check_flag, check_in_place, check_last_dim_contiguous,
    check_same_device, check_same_dtype, check_softmax_scale, check_tensor, check_window,
)
from internlm_kernels.backends import choose_backend, device_capability, leaves_choice_to_auto
from internlm_kernels.ops._dispatch import kernel_op
from internlm_kernels.ops._kernels import (
    CUDA_MAX_BATCH_ROWS, CUDA_MAX_GRID_X, CUDA_MAX_GRID_YZ, CUDA_MAX_QUERY_ROWS, kernels,
)
from internlm_kernels.ops.rotary import check_rotary_tables

Tensor = torch.Tensor
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# checks and backend limits
# --------------------------------------------------------------------------------------


def _check_heads(op: str, q: Tensor, k: Tensor, v: Tensor, names=("k", "v")) -> None:
    k_name, v_name = names
    if k.shape[-2] != v.shape[-2] or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{op}: {k_name} {tuple(k.shape)} and {v_name} {tuple(v.shape)} must have the same shape")
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: head_dim must match: q has {q.shape[-1]}, {k_name} {k.shape[-1]}, "
                         f"{v_name} {v.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: head_dim must be >= 1, got q of shape {tuple(q.shape)}")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"{op}: q heads ({q.shape[-2]}) must be a multiple of {k_name}/{v_name} heads "
                         f"({k.shape[-2]})")


def _cache_scale(op: str, name: str, scale: Union[None, float, Tensor], k_cache: Tensor,
                 q: Tensor) -> Optional[Tensor]:
    """An fp8 cache's k_scale / v_scale as a contiguous float32 tensor of 1 or Hkv values on
    q's device (a float becomes one, written by a fill: no copy from the host); None for
    caches that are not fp8, which take no scale."""
    if k_cache.dtype not in reference.FP8_CACHE_DTYPES:
        if scale is not None:
            raise ValueError(f"{op}: {name} applies to fp8 caches (float8_e4m3fn, float8_e5m2); "
                             f"the caches are {k_cache.dtype}")
        return None
    if scale is None or (isinstance(scale, numbers.Real) and not isinstance(scale, bool)):
        value = 1.0 if scale is None else float(scale)
        if not 0 < value < math.inf:  # (not math.isfinite: a float that changes is symbolic under torch.compile)
            raise ValueError(f"{op}: {name} must be a finite float > 0, got {scale!r}")
        return torch.full((1,), value, dtype=torch.float32, device=q.device)
    if not isinstance(scale, Tensor):
        raise TypeError(f"{op}: {name} must be a float > 0 or a float32 tensor of 1 or Hkv values, "
                        f"got {type(scale).__name__}")
    check_dtype(op, name, scale, (torch.float32,))
    check_same_device(op, "q", q, **{name: scale})
    heads_kv = k_cache.shape[2]
    if scale.numel() not in (1, heads_kv) or scale.dim() > 1:
        raise ValueError(f"{op}: {name} must hold 1 value or one per KV head ({heads_kv}), as a tensor of "
                         f"shape (), (1,) or ({heads_kv},); got shape {tuple(scale.shape)}")
    return scale.reshape(-1).contiguous()


CUDA_HEAD_DIMS = (64, 128)
# The Triton decode grid's y axis (65535 programs) holds its row tiles of 64 query rows.
TRITON_DECODE_MAX_ROWS = 65535 * 64


def _rows_aligned(t: Optional[Tensor]) -> bool:
    """Whether the CUDA kernels can move t's (.., D) rows as 16-byte chunks: aligned start,
    strides of size > 1 dims a multiple of 16 bytes (8 elements of 16 bits, 16 fp8 entries)."""
    if t is None:
        return True
    per_chunk = 16 // t.element_size()
    strides_ok = all(size <= 1 or stride % per_chunk == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]))
    if torch.compiler.is_compiling():
        # Dynamo (torch 2.11 to 2.14) cannot trace storage_offset() of a tensor made inside the
        # graph: a graph break. The start is left to the glue, which checks the real pointer
        # and names the argument when it is misaligned.
        return strides_ok
    # PyTorch's allocators align storages to at least 16 bytes: the offset decides.
    return strides_ok and (t.storage_offset() * t.element_size()) % 16 == 0


def _kernel_limits(op: str, q: Tensor, *operands: Optional[Tensor]):
    """Why a kernel backend cannot serve these arguments (None when it can)."""
    head_dim = q.shape[-1]

    def unsupported(backend: str) -> Optional[str]:
        if backend == "torch":
            return None
        if q.dtype not in KERNEL_DTYPES:
            return f"the {backend} kernels take float16 or bfloat16, got {q.dtype} (auto serves it with torch)"
        if backend == "cuda":
            from internlm_kernels import backends
            if not hasattr(backends.extension, "attention_fwd"):
                return ("this build of internlm_kernels._C predates its attention kernels; rebuild it "
                        "(python setup.py build_ext --inplace)")
            if head_dim not in CUDA_HEAD_DIMS:
                return f"the cuda kernels have head_dim {CUDA_HEAD_DIMS}, got {head_dim} (triton serves it)"
            if q.dim() == 4 and q.shape[0] > CUDA_MAX_BATCH_ROWS:
                return (f"the cuda kernels take at most {CUDA_MAX_BATCH_ROWS} batch rows, got {q.shape[0]} "
                        f"(triton serves more)")
            if not all(_rows_aligned(t) for t in (q, *operands)):
                return ("the cuda kernels need 16-byte aligned inputs with strides that are multiples of 16 bytes "
                        "(8 elements of 16 bits, 16 fp8 entries; triton serves any strides)")
        if backend == "triton":
            if head_dim > MAX_HEAD_DIM or head_dim % 8:
                return f"the triton kernels take head_dim a multiple of 8 up to {MAX_HEAD_DIM}, got {head_dim}"
        return None
    return unsupported


def _check_attention_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t)
        check_dtype(op, name, t)
        check_last_dim_contiguous(op, name, t)
    check_same_dtype(op, "k", k, "q", q)
    check_same_dtype(op, "v", v, "q", q)
    check_same_device(op, "q", q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError(f"{op}: packed (varlen) attention needs both cu_seqlens_q and cu_seqlens_k")
    layout = "(T, H, D) with cu_seqlens" if packed else "(B, S, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dim(op, name, t, (3,) if packed else (4,), layout)
    _check_heads(op, q, k, v)
    if packed:
        check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, "q", q)
        check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, "q", q, num_sequences=cu_seqlens_q.shape[0] - 1)
    elif q.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: q has batch {q.shape[0]} but k has {k.shape[0]}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{op}: {name} must be a host int or None (lengths are read on the device), "
                            f"got {type(value).__name__}")
    check_softmax_scale(op, softmax_scale)


def _lse_shape(q: Tensor, packed: bool):
    return (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])


def _as_4d(t: Tensor) -> Tensor:
    return t[None] if t.dim() == 3 else t


def _lse_as_3d(lse: Tensor) -> Tensor:
    return lse[None] if lse.dim() == 2 else lse


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------


def _lse_dtype(q: Tensor) -> torch.dtype:
    """The log-sum-exp's dtype: fp32 (the kernels' 16-bit inputs, and fp32); fp64 for the
    reference's fp64 inputs."""
    return torch.promote_types(q.dtype, torch.float32)


def _new_outputs(q: Tensor, packed: bool) -> Tuple[Tensor, Tensor]:
    # Packed inputs may carry padding rows past cu_seqlens_q[-1]: defined as zero / -inf.
    if packed:
        return torch.zeros_like(q, memory_format=torch.contiguous_format), \
            torch.full(_lse_shape(q, packed), float("-inf"), device=q.device, dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty(_lse_shape(q, packed), device=q.device, dtype=torch.float32)


@kernel_op("flash_attn_fwd")
def _flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                    softmax_scale: float, causal: bool, window_left: int, window_right: int,
                    deterministic: bool, backend: str) -> Tuple[Tensor, Tensor]:
    # ``deterministic`` only matters to the backward; it rides here so autograd saves it.
    if backend == "torch":
        out, lse = reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                       window_size=(window_left, window_right), cu_seqlens_q=cu_seqlens_q,
                                       cu_seqlens_k=cu_seqlens_k, return_lse=True)
        return out.contiguous(), lse.contiguous()
    packed = cu_seqlens_q is not None
    out, lse = _new_outputs(q, packed)
    if q.numel() > 0 and k.numel() == 0:  # no keys at all: zeros and -inf, nothing to launch
        return out.zero_(), lse.fill_(float("-inf"))
    if q.numel() > 0:
        kernels(backend, "attention").attention_fwd(
            _as_4d(q), _as_4d(k), _as_4d(v), _as_4d(out), _lse_as_3d(lse), cu_seqlens_q, cu_seqlens_k,
            softmax_scale, causal, (window_left, window_right))
    return out, lse


@_flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left, window_right, deterministic,
      backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty(_lse_shape(q, cu_seqlens_q is not None), device=q.device, dtype=_lse_dtype(q)))


@kernel_op("flash_attn_bwd")
def _flash_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], softmax_scale: float,
                    causal: bool, window_left: int, window_right: int, deterministic: bool,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    if backend == "torch":
        # The reference's own gradients, recomputed. torch.func, not autograd: a custom op's
        # implementation runs below the autograd dispatch keys, where no graph is recorded.
        def forward(q, k, v):
            return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                       window_size=(window_left, window_right), cu_seqlens_q=cu_seqlens_q,
                                       cu_seqlens_k=cu_seqlens_k)

        _, pullback = torch.func.vjp(forward, q, k, v)
        return tuple(g.contiguous() for g in pullback(dout))
    packed = cu_seqlens_q is not None
    allocate = torch.zeros_like if packed else torch.empty_like  # packed padding rows get zero gradients
    dq, dk, dv = (allocate(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if q.numel() > 0 and k.numel() > 0:
        kernels(backend, "attention").attention_bwd(
            _as_4d(dout), _as_4d(q), _as_4d(k), _as_4d(v), _as_4d(out), _lse_as_3d(lse),
            _as_4d(dq), _as_4d(dk), _as_4d(dv), cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
            (window_left, window_right), deterministic)
    elif not packed:
        for grad in (dq, dk, dv):
            grad.zero_()
    return dq, dk, dv


@_flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left, window_right,
      deterministic, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left, window_right, deterministic, \
        backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.settings = (softmax_scale, causal, window_left, window_right, deterministic, backend)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dout = _last_dim_contiguous(dout)
    if ctx.settings[-1] == "cuda" and not _rows_aligned(dout):  # e.g. a gradient sliced from a wider one
        dout = dout.contiguous()
    dq, dk, dv = _flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.settings)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_flash_attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@kernel_op("flash_attn_kvcache", mutates_args=("k_cache", "v_cache"))
def _flash_attn_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                        cache_seqlens: Tensor, rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor],
                        rotary_interleaved: bool, softmax_scale: float, causal: bool, window_left: int,
                        window_right: int, block_table: Optional[Tensor], k_scale: Optional[Tensor],
                        v_scale: Optional[Tensor], backend: str) -> Tensor:
    if backend == "torch":
        return reference.attention_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, causal=causal, softmax_scale=softmax_scale,
            window_size=(window_left, window_right), rotary_cos=rotary_cos, rotary_sin=rotary_sin,
            rotary_interleaved=rotary_interleaved, block_table=block_table, k_scale=k_scale,
            v_scale=v_scale).contiguous()
    # Two launches plus the split combine: the append writes k (rotated) and v, the decode
    # rotates q as it loads it. Paged caches pass their block table to both, fp8 caches their
    # scales.
    launch = kernels(backend, "attention")
    rotary = (rotary_cos, rotary_sin, rotary_interleaved)
    layout = {} if block_table is None else {"block_table": block_table}
    if k_scale is not None:
        layout.update(k_scale=k_scale, v_scale=v_scale)
    new_tokens = 0
    if k is not None:
        launch.kvcache_append(k, v, k_cache, v_cache, cache_seqlens, *rotary, **layout)
        new_tokens = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.numel() > 0:
        launch.attention_decode(q, k_cache, v_cache, out, cache_seqlens, new_tokens, softmax_scale, causal,
                                (window_left, window_right), *rotary, **layout)
    return out


@_flash_attn_kvcache.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, rotary_interleaved, softmax_scale, causal,
      window_left, window_right, block_table, k_scale, v_scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: Sequence[int] = (-1, -1),
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
):
    """Softmax attention, fused: ``softmax(q k^T * scale + mask) v``.

    q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), any strides with a contiguous last dim; or
    packed q (Tq, Hq, D), k/v (Tk, Hkv, D) with cu_seqlens_q / cu_seqlens_k (B+1,) int32
    (zero-length sequences allowed; lengths are read on the device, so ``max_seqlen_*`` are
    optional host ints, accepted for flash-attention compatibility; the values are not
    checked on the host, which would sync: every backend clamps each sequence into [0, T], so a
    wrong offset gives wrong rows, never an access outside the tensors). GQA/MQA when Hq % Hkv
    == 0: query head i uses KV head i // (Hq / Hkv), with no copy of K/V. ``causal`` aligns
    to the bottom-right corner when Sq != Sk; ``window_size=(left, right)`` limits each query
    to keys in [i + Sk - Sq - left, i + Sk - Sq + right] (-1: unbounded). Default scale
    D ** -0.5. Rows that see no key output zeros (lse -inf).

    Returns out (like q), and with ``return_lse`` the fp32 log-sum-exp (B, Hq, Sq), or
    (Hq, Tq) packed. Differentiable in q, k, v. Both backends' backwards are deterministic
    (same bits every run): the CUDA one writes dK / dV from one kernel and dQ from another.
    Its fp32-atomic dQ inside the dK/dV kernel (fewer products, dq's last bits vary from run
    to run; slower on an H200) is there on request, ``INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ=1``,
    and ``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``) rules it
    out whatever the environment says, as flash-attention's flag does.
    Triton serves float16 / bfloat16 with head_dim a multiple of 8 up to 256; CUDA float16 /
    bfloat16 with head_dim 64 or 128 and 16-byte aligned rows; "auto" hands other calls
    (float32, odd head dims, CPU tensors) to the eager reference.
    """
    op = "flash_attention"
    for name, flag in (("causal", causal), ("return_lse", return_lse), ("deterministic", deterministic)):
        check_flag(op, name, flag)
    _check_attention_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    window = check_window(op, window_size)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    chosen = choose_backend(backend, q.device, op, _kernel_limits(op, q, k, v))
    # The reference's packed path reads the lengths on the host, which torch.compile cannot
    # trace: while compiling, packed calls go through the op (opaque to the compiler, its
    # implementation the same reference), and the rest is traced.
    if chosen == "torch" and not (cu_seqlens_q is not None and torch.compiler.is_compiling()):
        return reference.attention(q, k, v, causal=causal, softmax_scale=scale, window_size=window,
                                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=return_lse)
    if cu_seqlens_q is not None:
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    # The global switch is read here, at the call, as torch.compile sees it (it guards on it).
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    out, lse = _flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, bool(causal), window[0], window[1],
                               deterministic, chosen)
    return (out, lse) if return_lse else out


def flash_attention_with_kvcache(
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
    backend: str = "auto",
) -> Tensor:
    """Decoding / chunked prefill over a preallocated KV cache (inference).

    q (B, Sq, Hq, D); k_cache, v_cache (B, S_max, Hkv, D), updated in place; k, v (B, Snew,
    Hkv, D) new entries written at positions ``cache_seqlens[b] + i`` (int or (B,) int32
    tensor; None: the cache already holds S_max - Snew entries). With rotary_cos/sin ((table,
    rotary_dim / 2), as ``rotary_cos_sin``), q and the new k are rotated at positions
    ``cache_seqlens[b] + i`` inside the kernels (the append rotates k on its way into the
    cache, the attention rotates q as it loads it: no extra launch or tensor). Each sequence
    then attends over its cache_seqlens[b] + Snew entries, causal aligned bottom-right. The
    KV dimension is split across programs (flash-decoding), sized from S_max, so a batch of
    one fills the GPU and CUDA graphs replay with new lengths. The lengths are read on the
    device: a sequence whose new entries would not fit, or whose length is negative, gets
    NaN outputs (of its new entries only those landing in [0, S_max) are written).

    Paged caches (vLLM / lmdeploy style): with ``block_table`` (B, max_blocks) int32, k_cache
    and v_cache are pools of pages (num_pages, page_size, Hkv, D), and position p of sequence
    b lives in row p % page_size of page block_table[b, p // page_size]; S_max is max_blocks *
    page_size. Any page size; entries of a row past its sequence's pages are never read, and
    page numbers are clamped into the pool on the device. Sequences may share pages they only
    read (a common prefix); new entries written into a page that another sequence of the call
    also writes land in an unspecified order.

    fp8 caches (vLLM's and lmdeploy's ``fp8`` / ``fp8_e5m2`` KV caches): k_cache and v_cache
    ``torch.float8_e4m3fn`` or ``torch.float8_e5m2`` (q / k / v fp16 or bf16 for the kernels;
    float32 runs the eager reference). An entry reads as
    ``entry * scale`` and a new one is stored as ``x / scale`` clamped to the format's finite
    range and rounded to nearest even (``reference.quantize_fp8``), with ``k_scale`` /
    ``v_scale``: a positive float, or a float32 tensor on q's device of one value or one per
    KV head (read on the device: calibrated scales change without a recompile or a CUDA-graph
    recapture); None is 1. A float (or None) is filled into a tensor on every call: a decode
    loop saves that launch by passing tensors. The kernels multiply the scales into the
    softmax scale and the output, so the products run on the stored values widened exactly to
    q's dtype. Half the cache memory and half the bytes a decode step reads. Kernels: triton
    (float8_e4m3fn from sm_89, float8_e5m2 from sm_80), and cuda (both, from sm_80), which
    "auto" passes over until it has run on a GPU (backend="cuda" asks for it); where neither
    serves, "auto" takes the eager reference (per-sequence host loops: slow on a GPU).
    """
    op = "flash_attention_with_kvcache"
    check_flag(op, "causal", causal)
    check_flag(op, "rotary_interleaved", rotary_interleaved)
    check_softmax_scale(op, softmax_scale)
    paged = block_table is not None
    cache_layout = "(num_pages, page_size, H, D) with a block_table" if paged else "(B, S, H, D)"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(op, name, t)
        check_dtype(op, name, t, FLOAT_DTYPES if name == "q" else FLOAT_DTYPES + reference.FP8_CACHE_DTYPES)
        check_dim(op, name, t, (4,), "(B, S, H, D)" if name == "q" else cache_layout)
        check_last_dim_contiguous(op, name, t)
    check_same_dtype(op, "v_cache", v_cache, "k_cache", k_cache)
    fp8 = k_cache.dtype in reference.FP8_CACHE_DTYPES
    if not fp8:
        check_same_dtype(op, "k_cache", k_cache, "q", q)
    if (k is None) != (v is None):
        raise ValueError(f"{op}: pass k and v together (new cache entries) or neither")
    if paged:
        check_tensor(op, "block_table", block_table)
    check_same_device(op, "q", q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                      cache_seqlens=cache_seqlens if isinstance(cache_seqlens, Tensor) else None,
                      rotary_cos=rotary_cos, rotary_sin=rotary_sin, block_table=block_table)
    _check_heads(op, q, k_cache, v_cache, ("k_cache", "v_cache"))
    k_scale = _cache_scale(op, "k_scale", k_scale, k_cache, q)
    v_scale = _cache_scale(op, "v_scale", v_scale, k_cache, q)
    batch, capacity = q.shape[0], k_cache.shape[1]
    if paged:
        check_dtype(op, "block_table", block_table, (torch.int32,))
        check_dim(op, "block_table", block_table, (2,), "(B, max_blocks)")
        if block_table.shape[0] != batch or block_table.shape[1] == 0:
            raise ValueError(f"{op}: block_table must be (B, max_blocks) = ({batch}, >= 1), "
                             f"got {tuple(block_table.shape)}")
        if k_cache.shape[0] == 0 or k_cache.shape[1] == 0:
            raise ValueError(f"{op}: k_cache must hold pages (num_pages >= 1, page_size >= 1), "
                             f"got {tuple(k_cache.shape)}")
        block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        capacity = block_table.shape[1] * k_cache.shape[1]
    elif k_cache.shape[0] != batch:
        raise ValueError(f"{op}: k_cache has batch {k_cache.shape[0]} but q has {batch}")
    new_tokens = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(op, name, t)
            check_same_dtype(op, name, t, "q", q)
            check_dim(op, name, t, (4,), "(B, Snew, Hkv, D)")
            check_last_dim_contiguous(op, name, t)
            if t.shape[0] != batch or t.shape[2:] != k_cache.shape[2:] or t.shape[1] != k.shape[1]:
                raise ValueError(f"{op}: {name} {tuple(t.shape)} must be (B, Snew, Hkv, D) = "
                                 f"({batch}, Snew, {k_cache.shape[2]}, {k_cache.shape[3]})")
        new_tokens = k.shape[1]
        if new_tokens > capacity:
            raise ValueError(f"{op}: the cache holds {capacity} positions, too short for {new_tokens} new tokens")
    if cache_seqlens is None:
        cache_seqlens = capacity - new_tokens
    if isinstance(cache_seqlens, bool):
        raise TypeError(f"{op}: cache_seqlens must be an int, an int32 tensor (B,) or None, got bool")
    if isinstance(cache_seqlens, int):
        if cache_seqlens < 0:
            raise ValueError(f"{op}: cache_seqlens must be >= 0, got {cache_seqlens}")
        if cache_seqlens + new_tokens > capacity:
            raise ValueError(f"{op}: cache_seqlens {cache_seqlens} + {new_tokens} new tokens exceeds the cache "
                             f"capacity {capacity}")
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        check_tensor(op, "cache_seqlens", cache_seqlens)
        check_dtype(op, "cache_seqlens", cache_seqlens, (torch.int32,))
        if tuple(cache_seqlens.shape) != (batch,):
            raise ValueError(f"{op}: cache_seqlens must be an int or have shape (B,) = ({batch},), "
                             f"got {tuple(cache_seqlens.shape)}")
        cache_seqlens = cache_seqlens.contiguous()
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{op}: pass rotary_cos and rotary_sin together")
    if rotary_cos is not None:
        check_rotary_tables(op, rotary_cos, rotary_sin, q.shape[-1], names=("rotary_cos", "rotary_sin"))
    window = check_window(op, window_size)
    if k is not None:  # the append writes the caches while it reads k and v
        check_in_place(op, {"k_cache": k_cache, "v_cache": v_cache}, {"k": k, "v": v})
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (q, k, v, k_cache, v_cache, k_scale, v_scale)):
        raise RuntimeError(f"{op}: KV-cache attention is for inference; inputs require grad "
                           f"(run under torch.no_grad() or use flash_attention)")
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    operand_limits = _kernel_limits(op, q, k_cache, v_cache, k, v)

    rows = q.shape[1] * (q.shape[2] // k_cache.shape[2])

    def kvcache_limits(candidate: str) -> Optional[str]:
        if candidate == "triton" and rows > TRITON_DECODE_MAX_ROWS:
            return (f"the triton decode takes at most {TRITON_DECODE_MAX_ROWS} query rows (positions x group), "
                    f"got {rows}")
        # The CUDA decode's own limits, checked here as well: its launcher would refuse the
        # call after the append had already written the caches.
        if candidate == "cuda" and (rows > CUDA_MAX_QUERY_ROWS
                                    or -(-rows // 4) * batch * k_cache.shape[2] > CUDA_MAX_GRID_X):
            return (f"the cuda decode takes at most {CUDA_MAX_QUERY_ROWS} query rows (positions x group) and "
                    f"{CUDA_MAX_GRID_X} blocks of 4 of them over the batch rows and KV heads, got {rows} rows x "
                    f"{batch} x {k_cache.shape[2]}")
        if candidate == "cuda" and k_cache.shape[2] > CUDA_MAX_GRID_YZ:
            return f"the cuda decode takes at most {CUDA_MAX_GRID_YZ} KV heads, got {k_cache.shape[2]}"
        if candidate == "cuda" and rotary_cos is not None and rotary_cos.dtype != torch.float32:
            return f"the cuda kernels take float32 rotary tables, got {rotary_cos.dtype}"
        if candidate == "cuda" and fp8 and leaves_choice_to_auto(backend):
            # as the paged caches below: "auto" takes the CUDA path once it has passed on a GPU
            return "the cuda kernels' fp8 caches have not yet run on a GPU (auto takes triton)"
        if (candidate == "triton" and k_cache.dtype == torch.float8_e4m3fn and q.device.type == "cuda"
                and device_capability(q.device) < (8, 9)):
            return "triton's float8_e4m3fn needs sm_89 or newer (float8_e5m2 caches run on older GPUs)"
        if candidate == "cuda" and paged and leaves_choice_to_auto(backend):
            # "auto" moves a CUDA path ahead once it has passed the tests on a GPU; the paged one
            # has run only under the emulation (backend="cuda" asks for it).
            return "the cuda kernels' paged caches have not yet run on a GPU (auto takes triton)"
        return operand_limits(candidate)

    chosen = choose_backend(backend, q.device, op, kvcache_limits)
    if chosen == "torch" and not torch.compiler.is_compiling():  # compiling: the op (lengths read on the host)
        return reference.attention_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, causal=causal, softmax_scale=scale,
            window_size=window, rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
            block_table=block_table, k_scale=k_scale, v_scale=v_scale)
    return _flash_attn_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                               bool(rotary_interleaved), scale, bool(causal), window[0], window[1], block_table,
                               k_scale, v_scale, chosen)
