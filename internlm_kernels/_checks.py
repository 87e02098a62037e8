"""Argument checks shared by the public ops.

Every check raises before any kernel launch with a message that names the op, the
argument, what it got and what is expected. They read only shapes, dtypes, devices
and strides, so they also run on fake tensors while ``torch.compile`` traces.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_dtype(op: str, name: str, t: Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of {_dtype_names(allowed)}")


def check_same_dtype(op: str, name: str, t: Tensor, other_name: str, other: Tensor) -> None:
    if t.dtype != other.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {other_name} has {other.dtype}; they must match")


def check_same_device(op: str, reference_name: str, reference: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {reference_name} is on {reference.device}; "
                             f"all tensors must be on one device")


def check_last_dim_contiguous(op: str, name: str, t: Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension (stride 1), got strides "
                         f"{tuple(t.stride())} for shape {tuple(t.shape)}; other dimensions may have any stride")


def check_dim(op: str, name: str, t: Tensor, dims: Sequence[int], layout: str) -> None:
    if t.dim() not in dims:
        raise ValueError(f"{op}: {name} must be {layout}, got a {t.dim()}-D tensor of shape {tuple(t.shape)}")


def check_shape(op: str, name: str, t: Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {layout} = {tuple(expected)}, got {tuple(t.shape)}")


def check_cu_seqlens(op: str, name: str, cu_seqlens: Tensor, reference_name: str, reference: Tensor,
                     num_sequences: Optional[int] = None) -> None:
    check_tensor(op, name, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{op}: {name} must be 1-D of shape (B+1,), got shape {tuple(cu_seqlens.shape)}")
    if num_sequences is not None and cu_seqlens.shape[0] != num_sequences + 1:
        raise ValueError(f"{op}: {name} must have shape (B+1,) = ({num_sequences + 1},), "
                         f"got {tuple(cu_seqlens.shape)}")
    check_same_device(op, reference_name, reference, **{name: cu_seqlens})


def check_writable(op: str, name: str, t: Tensor) -> None:
    """A tensor written in place: no two of its elements may share memory (as in an expanded
    tensor), or the kernels' writes to them race. Skipped while torch.compile traces (Dynamo
    cannot run the query), as torch's own in-place ops are checked when they run."""
    if torch.compiler.is_compiling():
        return
    if torch._debug_has_internal_overlap(t) == 1:  # 1: overlaps for sure (2: too hard to tell)
        raise ValueError(f"{op}: {name} is written in place but some of its elements share memory (strides "
                         f"{tuple(t.stride())} for shape {tuple(t.shape)}, an expanded tensor?); pass one with "
                         f"memory of its own, e.g. {name}.contiguous()")


def check_disjoint(op: str, name: str, t: Tensor, other_name: str, other: Tensor) -> None:
    """Two tensors of one call, ``t`` written in place, must not share memory: the kernels
    read ``other`` while they write ``t``. Decided as torch's own overlap check decides it:
    views of one storage that start at the same element, or contiguous ones whose ranges
    intersect, overlap; strided views of one storage (q and k of a fused QKV tensor) are
    left alone, their elements interleave without meeting. Skipped while tracing."""
    if torch.compiler.is_compiling() or t.numel() == 0 or other.numel() == 0:
        return
    if t.untyped_storage().data_ptr() != other.untyped_storage().data_ptr():
        return
    start, other_start = t.data_ptr(), other.data_ptr()
    overlap = start == other_start or (
        t.is_contiguous() and other.is_contiguous() and start < other_start + other.numel() * other.element_size()
        and other_start < start + t.numel() * t.element_size())
    if overlap:
        raise ValueError(f"{op}: {name} is written in place and shares memory with {other_name}; pass tensors "
                         f"that do not overlap")


def as_rows(t: Tensor) -> Tensor:
    """View ``t`` (..., N) as (outer, inner, N) without copying when its leading dims allow.

    Kernels address a row by two strides, so every slice or transpose of a 3-D activation
    is read in place. Only tensors whose dims before the last two cannot be merged into
    one stride (rare: e.g. a permuted 4-D tensor) are copied, by ``reshape``, as are
    tensors whose last dim is not contiguous.
    """
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        # Public inputs are checked to have a contiguous last dim; this catches gradients,
        # which autograd may hand over expanded (stride 0), e.g. from ``out.sum()``.
        t = t.contiguous()
    if t.dim() == 1:
        return t.view(1, 1, t.shape[0])
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def as_rows_view(t: Tensor) -> Optional[Tensor]:
    """``as_rows(t)`` when it is a view of ``t`` (no copy), else None: for in-place ops,
    which must write into t itself."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    leading = [(size, stride) for size, stride in zip(t.shape[:-2], t.stride()[:-2]) if size != 1]
    for (_, outer_stride), (inner_size, inner_stride) in zip(leading, leading[1:]):
        if outer_stride != inner_size * inner_stride:
            return None
    return as_rows(t)
