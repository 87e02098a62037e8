"""RMSNorm and fused add+RMSNorm: public functions, torch.library ops, autograd.

Registered ops (namespace ``internlm_kernels``), each with a fake implementation so
``torch.compile(fullgraph=True)`` traces them, and autograd through the backward ops:

  rms_norm_fwd(x, weight, eps, backend, backward_backend="") -> (out, rstd)
  rms_norm_bwd(dy, x, weight, rstd, compute_dweight, backend) -> (dx, dweight)
  fused_add_rms_norm_fwd(x, residual, weight, eps, residual_in_fp32, backend, backward_backend="")
                         -> (out, residual_out, rstd)
  fused_add_rms_norm_bwd(dy, dresidual_out, residual_out, weight, rstd, x_dtype, residual_dtype,
                         compute_dresidual, compute_dweight, backend) -> (dx, dresidual, dweight)
  fused_add_rms_norm_(x!, residual!, weight, eps, backend) -> ()        in place, inference

``backend`` inside an op is "triton" or "cuda"; the "torch" backend calls the eager
reference directly (so autograd and the compiler see plain PyTorch). A forward op's
``backward_backend`` is the backend its backward runs, chosen with the call ("auto" may
pick another one than the forward's: ``backends.AUTO_PREFERENCE_BY_OP``; "", the default,
means the forward's); the two share the saved rstd (fp32 per row) and residual_out.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from internlm_kernels import reference
from internlm_kernels._checks import (
    as_rows, as_rows_view, check_dim, check_dtype, check_flag, check_in_place, check_last_dim_contiguous,
    check_real, check_same_device, check_shape, check_tensor,
)
from internlm_kernels.backends import choose_backend, choose_backward_backend
from internlm_kernels.ops._dispatch import kernel_op
from internlm_kernels.ops._kernels import kernels

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# Argument checks (shared by every backend, run before any launch)
# --------------------------------------------------------------------------------------


def _check_norm_args(op: str, x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor] = None,
                     fused: bool = False) -> None:
    """The norm ops' arguments; ``fused``: the add+norm ops, whose ``residual`` is required."""
    check_tensor(op, "x", x)
    check_tensor(op, "weight", weight)
    if fused:
        check_tensor(op, "residual", residual)
    check_dtype(op, "x", x)
    check_dtype(op, "weight", weight)
    check_dim(op, "x", x, range(1, 64), "(..., N)")
    check_shape(op, "weight", weight, x.shape[-1:], "(N,) with N = x.shape[-1]")
    check_same_device(op, "x", x, weight=weight, residual=residual)
    check_last_dim_contiguous(op, "x", x)
    check_last_dim_contiguous(op, "weight", weight)
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_dtype(op, "residual", residual)
        check_shape(op, "residual", residual, x.shape, "x.shape")
        check_last_dim_contiguous(op, "residual", residual)
    if not check_real(op, "eps", eps) >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def _cuda_limits(x: Tensor, weight: Tensor, residual: Optional[Tensor] = None):
    """The CUDA kernels read each tensor other than x in x's dtype or fp32 (see rms_norm.cuh)."""
    def unsupported(backend: str) -> Optional[str]:
        if backend != "cuda":
            return None
        for name, t in (("weight", weight), ("residual", residual)):
            if t is not None and t.dtype not in (x.dtype, torch.float32):
                return f"the cuda kernels take {name} in x's dtype ({x.dtype}) or float32, got {t.dtype}"
        return None
    return unsupported


def _output_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    # HF: weight * x_hat.to(x.dtype) -> type promotion of the two.
    return torch.promote_types(x.dtype, weight.dtype)


def _rows(x: Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


# --------------------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------------------


@kernel_op("rms_norm_fwd")
def _rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, backend: str,
                  backward_backend: str = "") -> Tuple[Tensor, Tensor]:
    out = torch.empty(x.shape, dtype=_output_dtype(x, weight), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if out.numel() > 0:
        kernels(backend, "rms_norm").rms_norm_fwd(as_rows(x), None, weight, as_rows(out), None,
                                                   rstd.view(-1), eps)
    return out, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps, backend, backward_backend=""):
    return (torch.empty(x.shape, dtype=_output_dtype(x, weight), device=x.device),
            torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device))


@kernel_op("rms_norm_bwd")
def _rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, compute_dweight: bool,
                  backend: str) -> Tuple[Tensor, Tensor]:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dweight = torch.zeros(weight.shape if compute_dweight else (0,), dtype=weight.dtype, device=weight.device)
    if dx.numel() > 0:
        n = x.shape[-1]
        dw = kernels(backend, "rms_norm").rms_norm_bwd(as_rows(dy), as_rows(x), None, weight, rstd.view(-1),
                                                       dx.view(-1, n), None, compute_dweight)
        if compute_dweight:
            dweight.copy_(dw)
    return dx, dweight


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, compute_dweight, backend):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(weight.shape if compute_dweight else (0,), dtype=weight.dtype, device=weight.device))


def _backward_backend(backend: str, backward_backend: list) -> str:
    """The backend a forward op's backward runs: its ``backward_backend`` argument, or the
    forward's when that is "" or left out (the inputs autograd hands setup_context are the
    arguments as given, without defaults)."""
    return (backward_backend[0] if backward_backend else "") or backend


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _eps, backend, *backward_backend = inputs
    _out, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)
    ctx.backend = _backward_backend(backend, backward_backend)


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    compute_dweight = ctx.needs_input_grad[1]
    dx, dweight = _rms_norm_bwd(dy, x, weight, rstd, compute_dweight, ctx.backend)
    return dx, (dweight if compute_dweight else None), None, None, None


_rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str = "auto") -> Tensor:
    """RMSNorm in the HF InternLM order: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``
    with statistics in fp32.

    x: (..., N), fp32 / fp16 / bf16, any row strides with a contiguous last dim.
    weight: (N,). Returns a tensor shaped like x, of dtype ``promote(x.dtype, weight.dtype)``
    (as HF), contiguous. Differentiable in x and weight.
    """
    _check_norm_args("rms_norm", x, weight, eps)
    limits = _cuda_limits(x, weight)
    chosen = choose_backend(backend, x.device, "rms_norm", limits)
    if chosen == "torch":
        return reference.rms_norm(x, weight, eps)
    backward = choose_backward_backend(backend, x.device, "rms_norm", chosen, (x, weight), limits)
    out, _rstd = _rms_norm_fwd(x, weight, float(eps), chosen, backward)
    return out


# --------------------------------------------------------------------------------------
# fused_add_rms_norm
# --------------------------------------------------------------------------------------


def _residual_out_dtype(residual: Tensor, residual_in_fp32: bool) -> torch.dtype:
    return torch.float32 if residual_in_fp32 else residual.dtype


@kernel_op("fused_add_rms_norm_fwd")
def _fused_add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, eps: float, residual_in_fp32: bool,
                            backend: str, backward_backend: str = "") -> Tuple[Tensor, Tensor, Tensor]:
    out = torch.empty(x.shape, dtype=_output_dtype(x, weight), device=x.device)
    residual_out = torch.empty(x.shape, dtype=_residual_out_dtype(residual, residual_in_fp32), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if out.numel() > 0:
        kernels(backend, "rms_norm").rms_norm_fwd(as_rows(x), as_rows(residual), weight, as_rows(out),
                                                   as_rows(residual_out), rstd.view(-1), eps)
    return out, residual_out, rstd


@_fused_add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, residual_in_fp32, backend, backward_backend=""):
    return (torch.empty(x.shape, dtype=_output_dtype(x, weight), device=x.device),
            torch.empty(x.shape, dtype=_residual_out_dtype(residual, residual_in_fp32), device=x.device),
            torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device))


@kernel_op("fused_add_rms_norm_bwd")
def _fused_add_rms_norm_bwd(dy: Tensor, dresidual_out: Optional[Tensor], residual_out: Tensor, weight: Tensor,
                            rstd: Tensor, x_dtype: torch.dtype, residual_dtype: torch.dtype,
                            compute_dresidual: bool, compute_dweight: bool,
                            backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    device = residual_out.device
    dx = torch.empty(residual_out.shape, dtype=x_dtype, device=device)
    dresidual = torch.empty(residual_out.shape if compute_dresidual else (0,), dtype=residual_dtype, device=device)
    dweight = torch.zeros(weight.shape if compute_dweight else (0,), dtype=weight.dtype, device=device)
    if dx.numel() > 0:
        n = dx.shape[-1]
        dw = kernels(backend, "rms_norm").rms_norm_bwd(
            as_rows(dy), as_rows(residual_out), as_rows(dresidual_out) if dresidual_out is not None else None,
            weight, rstd.view(-1), dx.view(-1, n), dresidual.view(-1, n) if compute_dresidual else None,
            compute_dweight)
        if compute_dweight:
            dweight.copy_(dw)
    return dx, dresidual, dweight


@_fused_add_rms_norm_bwd.register_fake
def _(dy, dresidual_out, residual_out, weight, rstd, x_dtype, residual_dtype, compute_dresidual, compute_dweight,
      backend):
    device = residual_out.device
    return (torch.empty(residual_out.shape, dtype=x_dtype, device=device),
            torch.empty(residual_out.shape if compute_dresidual else (0,), dtype=residual_dtype, device=device),
            torch.empty(weight.shape if compute_dweight else (0,), dtype=weight.dtype, device=device))


def _fused_add_setup_context(ctx, inputs, output):
    x, residual, weight, _eps, _residual_in_fp32, backend, *backward_backend = inputs
    _out, residual_out, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(residual_out, weight, rstd)
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    ctx.backend = _backward_backend(backend, backward_backend)


def _fused_add_backward(ctx, dy, dresidual_out, _drstd):
    residual_out, weight, rstd = ctx.saved_tensors
    compute_dresidual, compute_dweight = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, dresidual, dweight = _fused_add_rms_norm_bwd(
        dy, dresidual_out, residual_out, weight, rstd, ctx.x_dtype, ctx.residual_dtype,
        compute_dresidual, compute_dweight, ctx.backend)
    return (dx, dresidual if compute_dresidual else None, dweight if compute_dweight else None, None, None, None,
            None)


_fused_add_rms_norm_fwd.register_autograd(_fused_add_backward, setup_context=_fused_add_setup_context)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *,
                       residual_in_fp32: bool = False, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """The pre-norm block step: ``residual_out = x + residual``; ``out = rms_norm(residual_out)``.

    The sum is taken in fp32 and stored in residual's dtype (fp32 with ``residual_in_fp32``);
    the norm reads the sum as stored and casts its normalised value to ``x.dtype`` before
    the weight. x, residual: (..., N) of the same shape, any row strides, contiguous last
    dim; weight (N,). Returns (out, residual_out), both contiguous. Differentiable in x,
    residual and weight, through both outputs.
    """
    op = "fused_add_rms_norm"
    _check_norm_args(op, x, weight, eps, residual=residual, fused=True)
    check_flag(op, "residual_in_fp32", residual_in_fp32)
    limits = _cuda_limits(x, weight, residual)
    chosen = choose_backend(backend, x.device, op, limits)
    if chosen == "torch":
        return reference.fused_add_rms_norm(x, residual, weight, eps, residual_in_fp32)
    backward = choose_backward_backend(backend, x.device, op, chosen, (x, residual, weight), limits)
    out, residual_out, _rstd = _fused_add_rms_norm_fwd(x, residual, weight, float(eps), bool(residual_in_fp32),
                                                       chosen, backward)
    return out, residual_out


# --------------------------------------------------------------------------------------
# fused_add_rms_norm_ (in place)
# --------------------------------------------------------------------------------------


@kernel_op("fused_add_rms_norm_", mutates_args=("x", "residual"))
def _fused_add_rms_norm_inplace(x: Tensor, residual: Tensor, weight: Tensor, eps: float, backend: str) -> None:
    if x.numel() == 0:
        return
    x_rows, residual_rows = as_rows_view(x), as_rows_view(residual)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x_rows is None or residual_rows is None:
        # Rows that no (outer, inner) view can address: compute out of place, copy back.
        out, residual_out, _ = _fused_add_rms_norm_fwd(x, residual, weight, eps, False, backend, backend)
        x.copy_(out)
        residual.copy_(residual_out)
        return
    kernels(backend, "rms_norm").rms_norm_fwd(x_rows, residual_rows, weight, x_rows, residual_rows,
                                               rstd.view(-1), eps)


@_fused_add_rms_norm_inplace.register_fake
def _(x, residual, weight, eps, backend):
    return None


def fused_add_rms_norm_(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *,
                        backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """In-place ``fused_add_rms_norm`` for inference (what serving engines use to save memory):
    ``residual <- x + residual`` (in residual's dtype), then ``x <- rms_norm(residual)``.

    Same numerics as the out-of-place op with ``residual_in_fp32=False``. Needs
    ``promote(x.dtype, weight.dtype) == x.dtype`` (the output is stored in x). Returns
    (x, residual). Not differentiable: inputs that require grad raise.
    """
    op = "fused_add_rms_norm_"
    _check_norm_args(op, x, weight, eps, residual=residual, fused=True)
    if _output_dtype(x, weight) != x.dtype:
        raise TypeError(f"{op}: the output is written into x ({x.dtype}), but x and weight ({weight.dtype}) "
                        f"promote to {_output_dtype(x, weight)}; use weight of dtype {x.dtype} or the "
                        f"out-of-place fused_add_rms_norm")
    if torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad or weight.requires_grad):
        raise RuntimeError(f"{op}: the in-place op is for inference; inputs require grad, so use "
                           f"fused_add_rms_norm (or run under torch.no_grad())")
    check_in_place(op, {"x": x, "residual": residual}, {"weight": weight})
    chosen = choose_backend(backend, x.device, op, _cuda_limits(x, weight, residual))
    if chosen == "torch":
        out, residual_out = reference.fused_add_rms_norm(x, residual, weight, eps)
        residual.copy_(residual_out)
        x.copy_(out)
    else:
        _fused_add_rms_norm_inplace(x, residual, weight, float(eps), chosen)
    return x, residual
