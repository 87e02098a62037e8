"""Rotary position embeddings: tables, public apply function, torch.library ops, autograd.

Registered ops (namespace ``internlm_kernels``):

  rotary(q, k, cos, sin, position_ids, seqlen_offsets, seqlen_offset, cu_seqlens,
         interleaved, conjugate, backend) -> (q_out, k_out)           differentiable
  rotary_(q!, k!, ...same...) -> ()                                  in place, inference

``k`` is always a tensor inside the ops (zero heads when the caller passes None), since
op outputs cannot be optional. The backward of ``rotary`` is ``rotary`` with the
conjugate flag flipped. The cos/sin tables are constants (no gradient).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from internlm_kernels import reference
from internlm_kernels._checks import (
    check_cu_seqlens, check_dim, check_dtype, check_flag, check_in_place, check_last_dim_contiguous, check_real,
    check_same_device, check_same_dtype, check_tensor,
)
from internlm_kernels.backends import choose_backend
from internlm_kernels.ops._dispatch import kernel_op
from internlm_kernels.ops._kernels import CUDA_MAX_BATCH_ROWS, CUDA_MAX_GRID_YZ, cuda_rotary_item_blocks, kernels

Tensor = torch.Tensor
INDEX_DTYPES = (torch.int32, torch.int64)


def rotary_cos_sin(seq_len: int, rotary_dim: int, *, base: float = 10000.0, scaling: Optional[dict] = None,
                   device=None, dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """cos and sin tables (seq_len, rotary_dim // 2) for ``apply_rotary``.

    ``inv_freq = base ** -(arange(0, rotary_dim, 2) / rotary_dim)``, angles in fp32, as HF.
    scaling: None; {"type": "linear", "factor": f} (positions divided by f); or
    {"type": "dynamic", "factor": f, "max_position_embeddings": m} (HF's dynamic NTK: the
    base grows when seq_len > m, plain RoPE otherwise).
    """
    op = "rotary_cos_sin"
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"{op}: rotary_dim must be a positive even int, got {rotary_dim!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"{op}: seq_len must be an int >= 0, got {seq_len!r}")
    _check_positive(op, "base", base)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{op}: dtype must be a floating torch.dtype (float32 for the kernels), got {dtype!r}")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise TypeError(f"{op}: scaling must be None or a dict such as {{'type': 'linear', 'factor': 2.0}}, "
                            f"got {type(scaling).__name__}")
        kind = scaling.get("type", scaling.get("rope_type"))
        required = {"linear": ("factor",), "dynamic": ("factor", "max_position_embeddings")}
        if kind not in required and kind not in (None, "default"):
            raise ValueError(f"{op}: scaling type must be 'linear' or 'dynamic', got {kind!r}")
        missing = [key for key in required.get(kind, ()) if key not in scaling]
        if missing:
            raise ValueError(f"{op}: {kind} scaling needs {missing} in scaling, got {scaling}")
        if kind in required:
            _check_positive(op, "scaling['factor']", scaling["factor"])
        if kind == "dynamic":
            longest = scaling["max_position_embeddings"]
            if isinstance(longest, bool) or not isinstance(longest, int) or longest <= 0:
                raise ValueError(f"{op}: scaling['max_position_embeddings'] must be a positive int, got {longest!r}")
            if rotary_dim <= 2:  # the NTK base grows by a power d / (d - 2)
                raise ValueError(f"{op}: dynamic scaling needs rotary_dim > 2, got {rotary_dim}")
    return reference.rotary_cos_sin(seq_len, rotary_dim, base=base, scaling=scaling, device=device, dtype=dtype)


def _check_positive(op: str, name: str, value: object) -> None:
    """A positive, finite real number given on the host (a base or a scaling factor)."""
    if not 0 < check_real(op, name, value) < float("inf"):
        raise ValueError(f"{op}: {name} must be positive and finite, got {value!r}")


# --------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------


def _as_4d(t: Tensor) -> Tensor:
    """Packed (T, H, D) -> (1, T, H, D); (B, S, H, D) unchanged. Views only."""
    return t[None] if t.dim() == 3 else t


def _launch(q, k, q_out, k_out, cos, sin, position_ids, seqlen_offsets, seqlen_offset, cu_seqlens,
            interleaved, conjugate, inplace, backend):
    if q.numel() == 0 and k.numel() == 0:
        return
    q4 = _as_4d(q)
    pos = None
    if position_ids is not None:  # (S,) or (T,) broadcast over batch with stride 0; (B, S) as is
        pos = position_ids.expand(q4.shape[0], q4.shape[1])
    kernels(backend, "rotary").rotary(
        q4, _as_4d(k), _as_4d(q_out), _as_4d(k_out), cos, sin, pos, seqlen_offsets, seqlen_offset, cu_seqlens,
        interleaved, conjugate, inplace)


def _output_like(t: Tensor) -> Tensor:
    # Same strides as the input when it is dense (e.g. HF's transposed layout), else contiguous.
    return torch.empty_like(t)


@kernel_op("rotary")
def _rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
            seqlen_offsets: Optional[Tensor], seqlen_offset: int, cu_seqlens: Optional[Tensor],
            interleaved: bool, conjugate: bool, backend: str) -> Tuple[Tensor, Tensor]:
    q_out, k_out = _output_like(q), _output_like(k)
    _launch(q, k, q_out, k_out, cos, sin, position_ids, seqlen_offsets, seqlen_offset, cu_seqlens,
            interleaved, conjugate, False, backend)
    return q_out, k_out


@_rotary.register_fake
def _(q, k, cos, sin, position_ids, seqlen_offsets, seqlen_offset, cu_seqlens, interleaved, conjugate, backend):
    return _output_like(q), _output_like(k)


def _rotary_setup_context(ctx, inputs, output):
    (_q, _k, cos, sin, position_ids, seqlen_offsets, seqlen_offset, cu_seqlens,
     interleaved, conjugate, backend) = inputs
    ctx.save_for_backward(cos, sin, position_ids, seqlen_offsets, cu_seqlens)
    ctx.settings = (seqlen_offset, interleaved, conjugate, backend)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _rotary_backward(ctx, dq_out, dk_out):
    cos, sin, position_ids, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    seqlen_offset, interleaved, conjugate, backend = ctx.settings
    dq, dk = _rotary(_last_dim_contiguous(dq_out), _last_dim_contiguous(dk_out), cos, sin, position_ids,
                     seqlen_offsets, seqlen_offset, cu_seqlens, interleaved, not conjugate, backend)
    return dq, dk, None, None, None, None, None, None, None, None, None


_rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


@kernel_op("rotary_", mutates_args=("q", "k"))
def _rotary_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
             seqlen_offsets: Optional[Tensor], seqlen_offset: int, cu_seqlens: Optional[Tensor],
             interleaved: bool, conjugate: bool, backend: str) -> None:
    _launch(q, k, q, k, cos, sin, position_ids, seqlen_offsets, seqlen_offset, cu_seqlens,
            interleaved, conjugate, True, backend)


@_rotary_.register_fake
def _(q, k, cos, sin, position_ids, seqlen_offsets, seqlen_offset, cu_seqlens, interleaved, conjugate, backend):
    return None


# --------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------


def check_rotary_tables(op: str, cos: Tensor, sin: Tensor, head_dim: int, names=("cos", "sin")) -> None:
    """cos and sin: (table_len, rotary_dim / 2) constant float tables with rotary_dim <= head_dim."""
    for name, table in zip(names, (cos, sin)):
        check_tensor(op, name, table)
        check_dtype(op, name, table)
        check_dim(op, name, table, (2,), "(seq_len, rotary_dim / 2)")
        check_last_dim_contiguous(op, name, table)
    if sin.shape != cos.shape:
        raise ValueError(f"{op}: {names[1]} {tuple(sin.shape)} must have {names[0]}'s shape {tuple(cos.shape)}")
    if cos.shape[0] == 0:
        raise ValueError(f"{op}: {names[0]} and {names[1]} must hold at least one position, got shape "
                         f"{tuple(cos.shape)}")
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim > head_dim:
        raise ValueError(f"{op}: rotary_dim = 2 * {names[0]}.shape[1] = {rotary_dim} exceeds head_dim {head_dim}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError(f"{op}: {names[0]}/{names[1]} are constant tables; gradients with respect to them are "
                         f"not supported (pass tables that do not require grad)")


def _check_rotary_args(q, k, cos, sin, position_ids, seqlen_offsets, cu_seqlens, interleaved, inplace) -> None:
    op = "apply_rotary"
    check_flag(op, "interleaved", interleaved)
    check_flag(op, "inplace", inplace)
    check_tensor(op, "q", q)
    check_dtype(op, "q", q)
    packed = cu_seqlens is not None
    layout = "(T, H, D) with cu_seqlens" if packed else "(B, S, H, D)"
    check_dim(op, "q", q, (3,) if packed else (4,), layout)
    check_last_dim_contiguous(op, "q", q)
    if k is not None:
        check_tensor(op, "k", k)
        check_same_dtype(op, "k", k, "q", q)
        check_dim(op, "k", k, (q.dim(),), layout)
        check_last_dim_contiguous(op, "k", k)
        if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
            raise ValueError(f"{op}: k {tuple(k.shape)} must match q {tuple(q.shape)} in every dim but heads")
    check_rotary_tables(op, cos, sin, q.shape[-1])
    check_same_device(op, "q", q, k=k, cos=cos, sin=sin, position_ids=position_ids, cu_seqlens=cu_seqlens,
                      seqlen_offsets=seqlen_offsets if isinstance(seqlen_offsets, Tensor) else None)
    tokens = q.shape[0] if packed else q.shape[1]
    batch = None if packed else q.shape[0]
    if packed:
        check_cu_seqlens(op, "cu_seqlens", cu_seqlens, "q", q)
        batch = cu_seqlens.shape[0] - 1
    if position_ids is not None:
        check_tensor(op, "position_ids", position_ids)
        check_dtype(op, "position_ids", position_ids, INDEX_DTYPES)
        allowed = [(tokens,)] if packed else [(tokens,), (batch, tokens)]
        if tuple(position_ids.shape) not in allowed:
            raise ValueError(f"{op}: position_ids must have shape {' or '.join(map(str, allowed))}, "
                             f"got {tuple(position_ids.shape)}")
        if not (isinstance(seqlen_offsets, int) and seqlen_offsets == 0):
            raise ValueError(f"{op}: give either position_ids or seqlen_offsets, not both")
    if isinstance(seqlen_offsets, Tensor):
        check_dtype(op, "seqlen_offsets", seqlen_offsets, INDEX_DTYPES)
        if tuple(seqlen_offsets.shape) != (batch,):
            raise ValueError(f"{op}: seqlen_offsets must be an int or have shape (B,) = ({batch},), "
                             f"got {tuple(seqlen_offsets.shape)}")
    elif isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, int):
        raise TypeError(f"{op}: seqlen_offsets must be an int or an int tensor (B,), "
                        f"got {type(seqlen_offsets).__name__}")
    elif seqlen_offsets < 0:
        raise ValueError(f"{op}: seqlen_offsets must be >= 0, got {seqlen_offsets}")
    elif position_ids is None and not packed and tokens + seqlen_offsets > cos.shape[0]:
        raise ValueError(f"{op}: positions reach {tokens + seqlen_offsets - 1} (seqlen {tokens} + seqlen_offsets "
                         f"{seqlen_offsets}) but the cos/sin table has {cos.shape[0]} rows")
    if inplace and torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
        raise RuntimeError(f"{op}: inplace=True is for inference; q/k require grad, so use inplace=False "
                           f"(or run under torch.no_grad())")
    if inplace:
        check_in_place(op, {"q": q} if k is None else {"q": q, "k": k}, {"cos": cos, "sin": sin})


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
    inplace: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Rotate q and k by their positions (one launch for both).

    q: (B, S, Hq, D), k: (B, S, Hk, D) or None, any strides with a contiguous last dim (HF's
    (B, H, S, D) passes as ``t.transpose(1, 2)``); or packed (T, H, D) with ``cu_seqlens``
    (B+1,) int32. cos, sin: (table_len, rotary_dim / 2) from ``rotary_cos_sin``; the first
    ``rotary_dim`` features rotate, the rest pass through. Layout "rotate half" (NeoX,
    InternLM) unless ``interleaved`` (GPT-J pairs).

    A token's position is ``position_ids`` ((B, S), or (S,) / (T,) shared) when given, else
    its index in its sequence plus ``seqlen_offsets`` (int or (B,) tensor). Positions outside
    the table give NaN; packed tokens past ``cu_seqlens[-1]`` pass through. ``cu_seqlens``
    starts at 0 and never decreases; it is read on the device, not checked (that would sync):
    other values give unspecified rows, never an access outside the tensors.

    Returns (q_out, k_out) (k_out None when k is None): new tensors, or q and k themselves
    with ``inplace=True`` (inference only). Differentiable in q and k.
    """
    _check_rotary_args(q, k, cos, sin, position_ids, seqlen_offsets, cu_seqlens, interleaved, inplace)

    def cuda_limits(candidate: str) -> Optional[str]:
        if candidate != "cuda":
            return None
        if cos.dtype != torch.float32:
            return f"the cuda kernel takes float32 cos/sin tables, got {cos.dtype}"
        if cu_seqlens is None and q.shape[0] > CUDA_MAX_BATCH_ROWS:
            return (f"the cuda kernel takes at most {CUDA_MAX_BATCH_ROWS} sequences per batch, got {q.shape[0]} "
                    f"(triton serves more)")
        heads_k = k.shape[-2] if k is not None else 0
        blocks = cuda_rotary_item_blocks(q.shape[-2], heads_k, cos.shape[1], q.element_size())
        if blocks > CUDA_MAX_GRID_YZ:
            return (f"the cuda kernel takes at most {CUDA_MAX_GRID_YZ} blocks of heads x rotary pairs per token, "
                    f"got {blocks} (triton serves more)")
        return None

    chosen = choose_backend(backend, q.device, "apply_rotary", cuda_limits)
    if chosen == "torch":
        q_out, k_out = reference.apply_rotary(q, k, cos, sin, position_ids=position_ids,
                                              seqlen_offsets=seqlen_offsets, cu_seqlens=cu_seqlens,
                                              interleaved=interleaved)
        if not inplace:
            return q_out, k_out
        q.copy_(q_out)
        if k is not None:
            k.copy_(k_out)
        return q, k
    k_arg = k if k is not None else q.new_empty(q.shape[:-2] + (0, q.shape[-1]))
    # The kernels index these small vectors directly: make them contiguous (no-ops normally).
    offsets_tensor = seqlen_offsets.contiguous() if isinstance(seqlen_offsets, Tensor) else None
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    offset_int = 0 if offsets_tensor is not None else int(seqlen_offsets)
    args = (cos, sin, position_ids, offsets_tensor, offset_int, cu_seqlens, bool(interleaved), False, chosen)
    if inplace:
        _rotary_(q, k_arg, *args)
        return q, k
    q_out, k_out = _rotary(q, k_arg, *args)
    return q_out, (k_out if k is not None else None)
