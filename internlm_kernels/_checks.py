"""Argument checks shared by the public ops.

Every check raises before any kernel launch with a message that names the op, the
argument, what it got and what is expected. They read only shapes, dtypes, devices
and strides, so they also run on fake tensors while ``torch.compile`` traces.
"""

from __future__ import annotations

import numbers
from typing import Dict, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # not FakeTensor, FunctionalTensor, DTensor, ...


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


def check_flag(op: str, name: str, value: object) -> bool:
    """A bool argument: a bool (a string such as "no" would otherwise read as True), or a
    symbolic one while torch.compile traces."""
    if not isinstance(value, (bool, torch.SymBool)):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_int(op: str, name: str, value: object) -> int:
    """An int argument: an integer (numpy's too), not a bool (True would otherwise read as 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_real(op: str, name: str, value: object) -> float:
    """A float argument given on the host: a real number (numpy's too), not a bool or a tensor."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    return float(value)


def check_softmax_scale(op: str, softmax_scale) -> None:
    """None (head_dim ** -0.5) or a host float; any value, NaN and negative ones included, is
    computed with (negative and NaN scales take the kernels' masked path)."""
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"{op}: softmax_scale must be a float or None, got {type(softmax_scale).__name__}")


def check_window(op: str, window_size) -> Tuple[int, int]:
    """Attention's ``window_size``: (left, right) ints >= -1 (-1: unbounded)."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2 and
            all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"{op}: window_size must be (left, right) ints >= -1 (-1: unbounded), got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def check_same_device(op: str, reference_name: str, reference: Tensor, **others: Optional[Tensor]) -> None:
    """``others`` (tensors or None) on ``reference``'s device; anything else is a type error."""
    for name, t in others.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
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


def _extent(t: Tensor):
    """(first byte, end byte or None): the end only for contiguous tensors, whose elements
    fill their byte range; for other strided views only the start is known cheaply."""
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size() if t.is_contiguous() else None


def _meet(a, b) -> bool:
    """Whether two non-empty tensors' extents share an element, decided as torch's own
    overlap check decides it: views that start at the same address, or contiguous ones whose
    byte ranges intersect, meet; other strided views of one buffer (q and k of a fused QKV
    tensor) are taken not to, their elements interleave. (Separate allocations never share
    addresses, so the storages need no comparison.)"""
    (start, end), (other, other_end) = a, b
    return start == other or (end is not None and other_end is not None and start < other_end and other < end)


def check_in_place(op: str, written: Dict[str, Tensor], read: Dict[str, Optional[Tensor]]) -> None:
    """Tensors an op writes in place: none may have two elements on one memory location (an
    expanded tensor), and none may share memory with another written one or with ``read``
    (inputs the kernels read while they write), or the kernels' accesses race. Real tensors
    only: skipped while torch.compile traces (Dynamo cannot run these queries) and for fake
    and meta tensors (no memory to compare), as torch checks its own in-place ops when they
    run. About 3 us a call (CPU of the CI machine)."""
    if torch.compiler.is_compiling():
        return
    tensors = [(name, t, name in written) for name, t in (*written.items(), *read.items())
               if t is not None and t.numel()]
    if any(type(t) not in _PLAIN_TENSOR_TYPES or t.is_meta for _, t, _ in tensors):
        return
    for name, t in written.items():
        if torch._debug_has_internal_overlap(t) == 1:  # 1: overlaps for sure (2: too hard to tell)
            raise ValueError(f"{op}: {name} is written in place but some of its elements share memory (strides "
                             f"{tuple(t.stride())} for shape {tuple(t.shape)}, an expanded tensor?); pass one "
                             f"with memory of its own, e.g. {name}.contiguous()")
    extents = [_extent(t) for _, t, _ in tensors]
    for i, (name, _, is_written) in enumerate(tensors):
        for j in range(i + 1, len(tensors)):
            other_name, _, other_written = tensors[j]
            if (is_written or other_written) and _meet(extents[i], extents[j]):
                target, source = (name, other_name) if is_written else (other_name, name)
                raise ValueError(f"{op}: {target} is written in place and shares memory with {source}; pass "
                                 f"tensors that do not overlap")


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
