"""Triton RMSNorm and fused add+RMSNorm, forward and backward.

One forward and one backward kernel serve both ops: ``HAS_RESIDUAL`` (and its backward
counterparts) are constexpr flags, so the plain op compiles without the residual code.

Layout: inputs are (outer, inner, N) views (see ``_checks.as_rows``) whose rows are
addressed by two strides, so strided activations are read in place; the last dim is
contiguous. Outputs are contiguous (M, N). Offsets are int64 throughout, so tensors of
more than 2^31 elements are safe.

Numerics (HF InternLM order): statistics in fp32, ``x_hat = x * rstd`` rounded to the
activation dtype, then multiplied by the weight in fp32 and rounded to the output dtype.
The backward treats that rounding as identity, as autograd does on the eager code.

Width: rows up to ``MAX_SINGLE_PASS_N`` stay in registers (one read of x). Wider rows
are processed in ``LOOP_BLOCK_N`` tiles over two passes (x read twice, the second read
mostly from L2), which keeps register use bounded for any N.

Backward on sm_90+: single-pass rows are read through TMA tensor descriptors, which the
loop pipeliner prefetches into shared memory one or two steps ahead
(``_rms_norm_bwd_tma_kernel``); other GPUs and layouts use the pointer kernel.

dweight is deterministic: every program accumulates its own rows' contribution in fp32
into its own row of a (programs, N) buffer, summed afterwards in a fixed order.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from internlm_kernels.triton._host import (
    capability_major, cdiv, max_shared_per_block, next_power_of_2, num_sms, on_the_tensors_device,
)

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer kernel serves every call
    TensorDescriptor = None

# A 16384-wide fp32 row is 64 KiB of registers per row: with 16 warps that is 32 values per
# thread, the most that stays spill-free. Wider rows use the two-pass tiled path.
MAX_SINGLE_PASS_N = 16384
LOOP_BLOCK_N = 4096
# Narrow rows are batched so each program still moves a few KiB (QK-norm: N = 128).
TARGET_ELEMENTS_PER_PROGRAM = 4096
MAX_ROWS_PER_PROGRAM = 64

# The backward's TMA path (sm_90+): steps of up to this many bytes per input, prefetched two
# ahead while their shared-memory buffers stay within the budget (and the device's limit),
# else one ahead.
TMA_BWD_MAX_ROW_BYTES = 32 * 1024
TMA_BWD_PREFETCH_BYTES = 128 * 1024
# "0": always the pointer kernel; "1": the TMA kernel wherever the inputs allow it, the CPU
# interpreter included (how the tests run it); unset: the TMA kernel on sm_90 and newer.
TMA_BWD_ENV = "INTERNLM_KERNELS_TRITON_NORM_BWD_TMA"


def rms_norm_block_config(n_cols: int, backward: bool = False):
    """(BLOCK_M, BLOCK_N, SINGLE_PASS, num_warps) for a row width: the one block-size heuristic."""
    if n_cols <= MAX_SINGLE_PASS_N:
        block_n = next_power_of_2(max(n_cols, 1))
        block_m = max(1, min(MAX_ROWS_PER_PROGRAM, TARGET_ELEMENTS_PER_PROGRAM // block_n))
        single_pass = True
    else:
        block_n, block_m, single_pass = LOOP_BLOCK_N, 1, False
    elements = block_m * block_n
    # At most 16 elements of a row per thread in the forward (two 16-byte vectors of bf16), 8 in
    # the backward, whose row loop also keeps the weight and the dweight sum in registers:
    # 57-70 registers at 8 (scripts/compile_triton_kernels.py, sm_90).
    per_thread = 8 if backward else 16
    num_warps = min(32, max(4, elements // (per_thread * 32)))
    return block_m, block_n, single_pass, num_warps


@triton.jit
def _load_normalized_input(x_ptrs, r_ptrs, mask, HAS_RESIDUAL: tl.constexpr, SUM_DTYPE: tl.constexpr):
    """The tensor being normalised, in fp32: x, or x + residual rounded to residual_out's dtype."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(SUM_DTYPE).to(tl.float32)
    return x


@triton.jit
def _rms_norm_fwd_kernel(
    # inputs: (outer, inner, N) views, rows addressed by two strides
    X, stride_x_outer, stride_x_inner,
    RESIDUAL, stride_r_outer, stride_r_inner,
    W,
    # outputs: (outer, inner, N) views like the inputs (contiguous, or x and residual
    # themselves for the in-place op); RESIDUAL_OUT only for the fused op; RSTD (M,) fp32
    Y, stride_y_outer, stride_y_inner,
    RESIDUAL_OUT, stride_ro_outer, stride_ro_inner,
    RSTD,
    # sizes
    M, N, rows_inner, eps,
    # features and tiles
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    outer, inner = rows // rows_inner, rows % rows_inner
    x_rows = X + outer * stride_x_outer + inner * stride_x_inner
    r_rows = RESIDUAL + outer * stride_r_outer + inner * stride_r_inner
    y_rows = Y + outer * stride_y_outer + inner * stride_y_inner
    ro_rows = RESIDUAL_OUT + outer * stride_ro_outer + inner * stride_ro_inner
    normed_dtype = X.dtype.element_ty
    sum_dtype = RESIDUAL_OUT.dtype.element_ty

    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        x = _load_normalized_input(x_rows[:, None] + cols[None, :], r_rows[:, None] + cols[None, :], mask,
                                   HAS_RESIDUAL, sum_dtype)
        if HAS_RESIDUAL:
            tl.store(ro_rows[:, None] + cols[None, :], x.to(sum_dtype), mask=mask)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        x_hat = (x * rstd[:, None]).to(normed_dtype).to(tl.float32)
        tl.store(y_rows[:, None] + cols[None, :], (x_hat * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            x = _load_normalized_input(x_rows[:, None] + cols[None, :], r_rows[:, None] + cols[None, :], mask,
                                       HAS_RESIDUAL, sum_dtype)
            if HAS_RESIDUAL:
                tl.store(ro_rows[:, None] + cols[None, :], x.to(sum_dtype), mask=mask)
            sum_sq += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(sum_sq / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        if HAS_RESIDUAL:
            # Pass 2 reads the sum back from RESIDUAL_OUT (the inputs may have been overwritten
            # by the in-place op); the barrier makes every thread's pass-1 stores visible.
            tl.debug_barrier()
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            if HAS_RESIDUAL:
                x = tl.load(ro_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            x_hat = (x * rstd[:, None]).to(normed_dtype).to(tl.float32)
            tl.store(y_rows[:, None] + cols[None, :], (x_hat * w[None, :]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_rows(x, dy, dresidual_out, w, rstd, N, normed_dtype: tl.constexpr):
    """dx and the rows' dweight terms for a [rows, BLOCK_N] tile held whole: x is what was
    normalised and dy the output gradient, both fp32 and zero past N; dresidual_out the
    fused op's residual gradient (fp32 tile) or 0.0; w (BLOCK_N,) and rstd (rows,) fp32.
    x_hat was rounded to x's dtype in the forward before meeting the weight, so the dweight
    term is dy * round(x_hat)."""
    x_hat = x * rstd[:, None]
    g = dy * w[None, :]
    mean_gx = tl.sum(g * x_hat, axis=1) / N
    dx = (g - x_hat * mean_gx[:, None]) * rstd[:, None] + dresidual_out
    return dx, dy * x_hat.to(normed_dtype).to(tl.float32)


@triton.jit
def _rms_norm_bwd_kernel(
    # inputs: (outer, inner, N) views
    DY, stride_dy_outer, stride_dy_inner,
    X, stride_x_outer, stride_x_inner,          # what was normalised: x, or residual_out
    DRESIDUAL_OUT, stride_dro_outer, stride_dro_inner,
    W, RSTD,
    # outputs: DX (M, N) in x's dtype, DRESIDUAL (M, N), DW_PARTIAL (programs, N) fp32
    DX, DRESIDUAL, DW_PARTIAL,
    # sizes
    M, N, rows_inner, rows_per_program,
    # features and tiles
    HAS_DRESIDUAL_OUT: tl.constexpr, STORE_DRESIDUAL: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    # x_hat was rounded to x's dtype in the forward before meeting the weight, so
    # dweight = sum_rows dy * round(x_hat); DX has x's dtype.
    normed_dtype = DX.dtype.element_ty
    pid = tl.program_id(0)
    row_begin = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, M)

    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        for block_begin in range(row_begin, row_end, BLOCK_M):
            rows = block_begin + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            outer, inner = rows // rows_inner, rows % rows_inner
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(X + (outer * stride_x_outer + inner * stride_x_inner)[:, None] + cols[None, :],
                        mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + (outer * stride_dy_outer + inner * stride_dy_inner)[:, None] + cols[None, :],
                         mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            dro = 0.0
            if HAS_DRESIDUAL_OUT:
                dro = tl.load(DRESIDUAL_OUT + (outer * stride_dro_outer + inner * stride_dro_inner)[:, None]
                              + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dx, dw_terms = _rms_norm_bwd_rows(x, dy, dro, w, rstd, N, normed_dtype)
            out_offsets = rows[:, None] * N + cols[None, :]
            tl.store(DX + out_offsets, dx.to(DX.dtype.element_ty), mask=mask)
            if STORE_DRESIDUAL:
                tl.store(DRESIDUAL + out_offsets, dx.to(DRESIDUAL.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw += tl.sum(dw_terms, axis=0)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=col_ok)
    else:
        # Wide rows, one at a time: pass 1 reduces sum(g * x_hat) over tiles, pass 2 writes dx
        # and adds into this program's own dweight row (zero-initialised by the launcher).
        dw_row = DW_PARTIAL + pid.to(tl.int64) * N
        for row in range(row_begin, row_end):
            outer, inner = row // rows_inner, row % rows_inner
            x_row = X + outer * stride_x_outer + inner * stride_x_inner
            dy_row = DY + outer * stride_dy_outer + inner * stride_dy_inner
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                x = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=col_ok, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
                acc += dy * w * x * rstd
            mean_gx = tl.sum(acc, axis=0) / N
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                x_hat = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32) * rstd
                dy = tl.load(dy_row + cols, mask=col_ok, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
                dx = (dy * w - x_hat * mean_gx) * rstd
                if HAS_DRESIDUAL_OUT:
                    dx += tl.load(DRESIDUAL_OUT + outer * stride_dro_outer + inner * stride_dro_inner + cols,
                                  mask=col_ok, other=0.0).to(tl.float32)
                tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=col_ok)
                if STORE_DRESIDUAL:
                    tl.store(DRESIDUAL + row * N + cols, dx.to(DRESIDUAL.dtype.element_ty), mask=col_ok)
                if COMPUTE_DW:
                    partial = tl.load(dw_row + cols, mask=col_ok, other=0.0)
                    tl.store(dw_row + cols, partial + dy * x_hat.to(normed_dtype).to(tl.float32), mask=col_ok)
            # Make this row's dweight stores visible to every thread before the next row reads them.
            tl.debug_barrier()


@triton.jit
def _rms_norm_bwd_tma_kernel(
    # inputs: tensor descriptors of (outer, inner, N) views, blocks of BLOCK_M rows of one
    # outer slice, [1, BLOCK_M, BLOCK_N] (BLOCK_M > 1 only for views with outer = 1)
    DY, X, DRESIDUAL_OUT,
    W, RSTD,
    # outputs as in _rms_norm_bwd_kernel
    DX, DRESIDUAL, DW_PARTIAL,
    M, N, rows_inner, rows_per_program,
    HAS_DRESIDUAL_OUT: tl.constexpr, STORE_DRESIDUAL: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    # The single-pass backward with its row loads through tensor descriptors (TMA, sm_90+),
    # which Triton's loop pipeliner issues STAGES - 1 steps ahead into shared memory. The
    # pointer kernel's loads land in registers: a program holds its rows while it reduces
    # and stores them, and with w and the dweight sum also in registers, one or two programs
    # fit per SM, so an SM had one or two steps' rows in flight and waited for each.
    normed_dtype = DX.dtype.element_ty
    pid = tl.program_id(0)
    # Row indices are int32 here. rows_per_program = cdiv(M, programs), so row_begin stays
    # below M + programs, which the launcher keeps below 2^31 (with BLOCK_M); row_begin +
    # rows_per_program could pass 2^31 for the last program, M - row_begin cannot.
    row_begin = pid * rows_per_program
    row_end = row_begin + tl.minimum(rows_per_program, M - row_begin)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in tl.range(row_begin, row_end, BLOCK_M, num_stages=STAGES):
        outer, inner = block // rows_inner, block % rows_inner
        # Columns past N, and rows past M, come back as zeros from the descriptor; rows past
        # this program's range (the next program's) are masked below.
        x = X.load([outer, inner, 0]).reshape([BLOCK_M, BLOCK_N]).to(tl.float32)
        dy = DY.load([outer, inner, 0]).reshape([BLOCK_M, BLOCK_N]).to(tl.float32)
        rows = block + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        dro = 0.0
        if HAS_DRESIDUAL_OUT:
            dro = DRESIDUAL_OUT.load([outer, inner, 0]).reshape([BLOCK_M, BLOCK_N]).to(tl.float32)
        dx, dw_terms = _rms_norm_bwd_rows(x, dy, dro, w, rstd, N, normed_dtype)
        mask = row_ok[:, None] & col_ok[None, :]
        out_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(DX + out_offsets, dx.to(DX.dtype.element_ty), mask=mask)
        if STORE_DRESIDUAL:
            tl.store(DRESIDUAL + out_offsets, dx.to(DRESIDUAL.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(tl.where(row_ok[:, None], dw_terms, 0.0), axis=0)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=col_ok)


def _prefetch_budget(device: torch.device) -> int:
    """Shared memory the TMA backward's prefetch buffers may take: TMA_BWD_PREFETCH_BYTES,
    and no more than a block may have on the device, less room for the reductions (sm_90 and
    sm_100 parts give a block 227 KiB, sm_120 parts 99 KiB)."""
    if device.type != "cuda":
        return TMA_BWD_PREFETCH_BYTES
    return min(TMA_BWD_PREFETCH_BYTES, max_shared_per_block(device.index) - 4096)


def _num_bwd_programs(device: torch.device, row_blocks: int) -> int:
    """Enough programs to fill the GPU a few times over; each owns one fp32 dweight row."""
    if device.type == "cuda":
        return max(1, min(row_blocks, 4 * num_sms(device.index if device.index is not None else 0)))
    return max(1, min(row_blocks, 4))  # interpreter: fewer, larger programs are faster


TMA_BWD_ROW_LIMIT = 2**31  # the TMA backward's row indices are int32


def _tma_bwd_plan(inputs: Sequence[torch.Tensor], block_m: int, block_n: int, programs: int):
    """How the backward's TMA kernel would read these (outer, inner, N) inputs: (pipeline
    depth, (view, descriptor strides) per input, rows per outer slice), or None for the pointer
    kernel. On request (TMA_BWD_ENV) or on sm_90+, when a descriptor can address every input
    and a step's rows fit in shared memory. Evenly strided rows (any contiguous activation)
    are one (1, M, N) view, which also lets a step take BLOCK_M rows; other layouts keep their
    two strides and take one row per step."""
    choice = os.environ.get(TMA_BWD_ENV)
    if choice not in (None, "0", "1"):
        raise ValueError(f"{TMA_BWD_ENV} must be 0 or 1, got {choice!r}")
    if choice == "0" or TensorDescriptor is None:
        return None
    device = inputs[0].device
    if choice is None and not (device.type == "cuda" and capability_major(device.index) >= 9):
        return None
    step_bytes = [block_m * block_n * t.element_size() for t in inputs]  # one shared-memory buffer each
    if max(step_bytes) > TMA_BWD_MAX_ROW_BYTES:
        return None
    if inputs[0].shape[0] * inputs[0].shape[1] + block_m + programs >= TMA_BWD_ROW_LIMIT:
        return None  # the kernel's row indices (up to M + programs), and descriptor coordinates, are int32
    if min(block_n * t.element_size() for t in inputs) < 16:
        return None  # a TMA box's rows are whole 16-byte units
    budget = _prefetch_budget(device)  # two steps ahead within it, else one
    stages = 3 if 2 * sum(step_bytes) <= budget else 2 if sum(step_bytes) <= budget else 0
    if not stages:
        return None
    views = [_single_slice_view(t) for t in inputs]
    if any(v is None for v in views):
        if block_m > 1:
            return None
        views = list(inputs)
    strides = [_descriptor_strides(v) for v in views]
    if any(s is None for s in strides):
        return None
    return stages, list(zip(views, strides)), views[0].shape[1]


def _single_slice_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """An (outer, inner, N) view whose rows are evenly strided as the same rows in one outer
    slice, (1, outer * inner, N); None when they are not."""
    outer, inner, n = t.shape
    if inner == 1:
        row_stride = t.stride(0)
    elif outer == 1 or t.stride(0) == inner * t.stride(1):
        row_stride = t.stride(1)
    else:
        return None
    rows = outer * inner
    return t.as_strided((1, rows, n), (rows * row_stride, row_stride, 1))


def _descriptor_strides(t: torch.Tensor) -> Optional[List[int]]:
    """Strides of an (outer, inner, N) view for a TMA descriptor, or None when TMA cannot
    address it: the base and both row strides must be multiples of 16 bytes, and the rows
    laid out in order without overlap. A dim of size 1 is never stepped over, so its stride
    (in a view it may be anything) is replaced by the smallest valid one."""
    outer, inner, n = t.shape
    outer_stride, inner_stride, _ = t.stride()
    if inner == 1:
        inner_stride = -(-n // 16) * 16
    if outer == 1:
        outer_stride = inner * inner_stride
    aligned = t.data_ptr() % 16 == 0 and (outer_stride * t.element_size()) % 16 == 0 \
        and (inner_stride * t.element_size()) % 16 == 0
    in_order = inner_stride >= n and outer_stride >= inner * inner_stride
    return [outer_stride, inner_stride, 1] if aligned and in_order else None


def _row_descriptor(view_and_strides, block_m: int, block_n: int):
    """Descriptor of an (outer, inner, N) view with its descriptor strides (from
    _tma_bwd_plan), in blocks of block_m rows."""
    view, strides = view_and_strides
    return TensorDescriptor(view, list(view.shape), strides, [1, block_m, block_n])


@on_the_tensors_device
def rms_norm_fwd(x, residual, weight, out, residual_out, rstd, eps: float) -> None:
    """Launch the forward. x, residual, out, residual_out: (outer, inner, N) views (out and
    residual_out may be x and residual: in place); rstd (M,) fp32. residual and
    residual_out are None for the plain op."""
    outer, inner, n_cols = x.shape
    n_rows = outer * inner
    block_m, block_n, single_pass, num_warps = rms_norm_block_config(n_cols)
    has_residual = residual is not None
    r = residual if has_residual else x
    ro = residual_out if has_residual else out
    grid = (cdiv(n_rows, block_m),)
    _rms_norm_fwd_kernel[grid](
        x, x.stride(0), x.stride(1),
        r, r.stride(0), r.stride(1),
        weight,
        out, out.stride(0), out.stride(1),
        ro, ro.stride(0), ro.stride(1),
        rstd,
        n_rows, n_cols, inner, eps,
        HAS_RESIDUAL=has_residual,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single_pass,
        num_warps=num_warps,
    )


@on_the_tensors_device
def rms_norm_bwd(dy, x, dresidual_out, weight, rstd, dx, dresidual, compute_dweight: bool):
    """Launch the backward. dy, x, dresidual_out: (outer, inner, N) views (dresidual_out may be
    None); dx, dresidual: (M, N) contiguous outputs (dresidual None for the plain op).
    Returns dweight in fp32 (N,), or None when not requested."""
    outer, inner, n_cols = x.shape
    n_rows = outer * inner
    block_m, block_n, single_pass, num_warps = rms_norm_block_config(n_cols, backward=True)
    programs = _num_bwd_programs(x.device, cdiv(n_rows, block_m))
    rows_per_program = cdiv(n_rows, programs)
    allocate = torch.empty if single_pass else torch.zeros
    dw_partial = allocate((programs, n_cols) if compute_dweight else (1,), device=x.device, dtype=torch.float32)
    has_dro = dresidual_out is not None
    dro = dresidual_out if has_dro else dy
    plan = _tma_bwd_plan((dy, x, dresidual_out) if has_dro else (dy, x), block_m, block_n, programs) \
        if single_pass else None
    if plan is not None:
        stages, views, rows_inner = plan
        dy_desc, x_desc = (_row_descriptor(t, block_m, block_n) for t in views[:2])
        dro_desc = _row_descriptor(views[2], block_m, block_n) if has_dro else dy_desc
        _rms_norm_bwd_tma_kernel[(programs,)](
            dy_desc, x_desc, dro_desc, weight, rstd,
            dx, dresidual if dresidual is not None else dx, dw_partial,
            n_rows, n_cols, rows_inner, rows_per_program,
            HAS_DRESIDUAL_OUT=has_dro, STORE_DRESIDUAL=dresidual is not None, COMPUTE_DW=compute_dweight,
            BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
            num_warps=num_warps,
        )
        return dw_partial.sum(0) if compute_dweight else None
    _rms_norm_bwd_kernel[(programs,)](
        dy, dy.stride(0), dy.stride(1),
        x, x.stride(0), x.stride(1),
        dro, dro.stride(0), dro.stride(1),
        weight, rstd,
        dx, dresidual if dresidual is not None else dx, dw_partial,
        n_rows, n_cols, inner, rows_per_program,
        HAS_DRESIDUAL_OUT=has_dro, STORE_DRESIDUAL=dresidual is not None, COMPUTE_DW=compute_dweight,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single_pass,
        num_warps=num_warps,
    )
    return dw_partial.sum(0) if compute_dweight else None
