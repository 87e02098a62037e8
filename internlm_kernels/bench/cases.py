"""Benchmark cases: for each op and shape, one callable per provider plus the fp32 oracle.

A case's providers all compute the same thing on the same inputs; ``run()`` returns the
result (forward outputs, or the gradients for a backward case) so the harness can
report each provider's max error against the reference evaluated in fp32.

Providers: our "cuda" and "triton" backends, "eager" (the reference in the input
dtype), "torch_compile" (the reference compiled by inductor), "torch_rms_norm"
(``torch.nn.functional.rms_norm``) and "liger" when liger-kernel is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.backends import choose_backend

Tensor = torch.Tensor


@dataclasses.dataclass
class Case:
    op: str
    dtype: torch.dtype
    shape: Dict[str, int]
    bytes_moved: Optional[int]
    flops: Optional[float]
    providers: Dict[str, Callable[[], object]]
    expected: Tuple[Tensor, ...]  # fp32 oracle for max_err


def kernel_backends(device: torch.device, op: str) -> List[str]:
    """Our kernel backends that can run ``op`` on ``device`` here."""
    usable = []
    for backend in ("cuda", "triton"):
        try:
            choose_backend(backend, device, op)
            usable.append(backend)
        except RuntimeError:
            pass
    return usable


def _as_tuple(result) -> Tuple[Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def max_error(result, expected: Sequence[Tensor]) -> float:
    return max(float((r.float() - e).abs().max()) if r.numel() else 0.0
               for r, e in zip(_as_tuple(result), expected))


def _backward_runner(forward: Callable[[], object], inputs: Sequence[Tensor], grads: Sequence[Tensor]):
    """Run the forward once, then time only the backward (autograd.grad with retain_graph)."""
    outputs = _as_tuple(forward())
    return lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _liger_rms_norm():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # casting_mode="llama" is HF's cast order, the same semantics as ours.
    return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama")


def rms_norm_cases(device, dtype, rows: int, hidden: int, providers: Sequence[str], *, fused: bool,
                   backward: bool, eps: float = 1e-6) -> Case:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
    residual = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
    weight = (1 + 0.1 * torch.randn(hidden, device=device, generator=gen)).to(dtype)
    op = "fused_add_rms_norm" if fused else "rms_norm"
    element = x.element_size()

    if fused:
        def make(backend):
            return lambda: ik.fused_add_rms_norm(x, residual, weight, eps, backend=backend)
        impls = {"eager": lambda: reference.fused_add_rms_norm(x, residual, weight, eps)}
        if "torch_compile" in providers:
            impls["torch_compile"] = lambda f=_compiled(reference.fused_add_rms_norm): f(x, residual, weight, eps)
        oracle = lambda xx, rr, ww: reference.fused_add_rms_norm(xx, rr, ww, eps)  # noqa: E731
        inputs = (x, residual, weight)
    else:
        def make(backend):
            return lambda: ik.rms_norm(x, weight, eps, backend=backend)
        impls = {"eager": lambda: reference.rms_norm(x, weight, eps)}
        if "torch_compile" in providers:
            impls["torch_compile"] = lambda f=_compiled(reference.rms_norm): f(x, weight, eps)
        impls["torch_rms_norm"] = lambda: torch.nn.functional.rms_norm(x, (hidden,), weight, eps)
        liger = _liger_rms_norm()
        if liger is not None:
            impls["liger"] = lambda: liger(x, weight, eps)
        oracle = lambda xx, ww: reference.rms_norm(xx, ww, eps)  # noqa: E731
        inputs = (x, weight)
    for backend in kernel_backends(device, op):
        impls[backend] = make(backend)
    impls = {name: fn for name, fn in impls.items() if name in providers}

    shape = {"M": rows, "N": hidden}
    if not backward:
        # fwd reads x (and residual), writes out (and residual_out)
        bytes_moved = (4 if fused else 2) * rows * hidden * element
        expected = tuple(t.detach() for t in _as_tuple(oracle(*(t.float() for t in inputs))))
        return Case(f"{op}_fwd", dtype, shape, bytes_moved, None, impls, expected)

    for t in inputs:
        t.requires_grad_(True)
    grads = tuple(torch.randn_like(o) for o in _as_tuple(oracle(*inputs)))
    fp32_inputs = [t.detach().float().requires_grad_(True) for t in inputs]
    expected = torch.autograd.grad(_as_tuple(oracle(*fp32_inputs)), fp32_inputs, [g.float() for g in grads])
    runners = {name: _backward_runner(fn, inputs, grads) for name, fn in impls.items()}
    # bwd reads dy, x (fused: dy, d residual_out, residual_out), writes dx (fused: dx, d residual)
    bytes_moved = (5 if fused else 3) * rows * hidden * element
    return Case(f"{op}_bwd", dtype, shape, bytes_moved, None, runners, tuple(e.detach() for e in expected))


def rotary_case(device, dtype, batch: int, seqlen: int, heads_q: int, heads_k: int, head_dim: int,
                providers: Sequence[str], *, backward: bool, base: float = 1e6) -> Case:
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, seqlen, heads_q, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(batch, seqlen, heads_k, head_dim, device=device, dtype=dtype, generator=gen)
    cos, sin = ik.rotary_cos_sin(seqlen, head_dim, base=base, device=device)

    impls = {"eager": lambda: reference.apply_rotary(q, k, cos, sin)}
    if "torch_compile" in providers:
        impls["torch_compile"] = lambda f=_compiled(reference.apply_rotary): f(q, k, cos, sin)
    for backend in kernel_backends(device, "apply_rotary"):
        impls[backend] = lambda b=backend: ik.apply_rotary(q, k, cos, sin, backend=b)
    impls = {name: fn for name, fn in impls.items() if name in providers}

    shape = {"B": batch, "S": seqlen, "Hq": heads_q, "Hk": heads_k, "D": head_dim}
    bytes_moved = 2 * (q.numel() + k.numel()) * q.element_size()  # read and write q and k
    if not backward:
        expected = reference.apply_rotary(q.float(), k.float(), cos, sin)
        return Case("rotary_fwd", dtype, shape, bytes_moved, None, impls, expected)
    q.requires_grad_(True)
    k.requires_grad_(True)
    grads = (torch.randn_like(q), torch.randn_like(k))
    q32, k32 = (t.detach().float().requires_grad_(True) for t in (q, k))
    expected = torch.autograd.grad(reference.apply_rotary(q32, k32, cos, sin), (q32, k32),
                                   [g.float() for g in grads])
    runners = {name: _backward_runner(fn, (q, k), grads) for name, fn in impls.items()}
    return Case("rotary_bwd", dtype, shape, bytes_moved, None, runners, tuple(e.detach() for e in expected))


OPS = ("rms_norm_fwd", "rms_norm_bwd", "fused_add_rms_norm_fwd", "fused_add_rms_norm_bwd", "rotary_fwd",
       "rotary_bwd")


def build_cases(ops: Sequence[str], device: torch.device, dtype: torch.dtype, providers: Sequence[str],
                *, small: bool) -> List[Case]:
    """The default shapes: InternLM2-7B on a GPU (M = 16384 tokens, hidden 4096 and 8192;
    32 q / 8 kv heads of 128), tiny ones on a CPU."""
    norm_shapes = [(64, 512)] if small else [(16384, 4096), (16384, 8192)]
    rotary_shapes = [(1, 16, 4, 2, 64)] if small else [(4, 4096, 32, 8, 128)]
    cases: List[Case] = []
    for op in ops:
        kind, _, direction = op.rpartition("_")
        backward = direction == "bwd"
        if kind in ("rms_norm", "fused_add_rms_norm"):
            for rows, hidden in norm_shapes:
                cases.append(rms_norm_cases(device, dtype, rows, hidden, providers,
                                            fused=kind == "fused_add_rms_norm", backward=backward))
        elif kind == "rotary":
            for shape in rotary_shapes:
                cases.append(rotary_case(device, dtype, *shape, providers, backward=backward))
        else:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    return cases
