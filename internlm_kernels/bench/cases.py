"""Benchmark cases: for each op and shape, one callable per provider plus an error check.

A case's providers all compute the same thing on the same inputs; calling one returns the
result (forward outputs, or the gradients for a backward case) and ``case.error(result)``
gives its max error against the reference evaluated in fp32 (or None where that oracle
would not fit in memory). Cases are built lazily, one at a time, so big inputs never
coexist.

Providers: our "cuda" and "triton" backends, "eager" (the reference in the input dtype),
"torch_compile" (the reference compiled by inductor), "torch_rms_norm"
(``torch.nn.functional.rms_norm``), PyTorch SDPA with one backend each ("sdpa_flash",
"sdpa_cudnn", "sdpa_efficient", "sdpa_math") and "liger" when liger-kernel is installed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.backends import choose_backend
from internlm_kernels.ops.attention import CUDA_HEAD_DIMS

Tensor = torch.Tensor


@dataclasses.dataclass
class Case:
    op: str
    dtype: torch.dtype
    shape: Dict[str, int]
    bytes_moved: Optional[int]
    flops: Optional[float]
    providers: Dict[str, Callable[[], object]]
    error: Callable[[object], Optional[float]]  # max error of a provider's result
    tokens: Optional[int] = None  # end-to-end cases: tokens processed per call (tokens/s)
    # Backward cases: per kernel provider, its backward op called directly on saved forward
    # results, without autograd. A CUDA graph can replay that (not autograd's backward, whose
    # capture failed on the GPU), so the benchmark gets these rows' GPU time alone too.
    backward_kernels: Dict[str, Callable[[], object]] = dataclasses.field(default_factory=dict)
    # Providers that move other bytes, or answer to another reference, than the case's others
    # (the decode over an fp8 copy of the cache: half the bytes, checked on that cache).
    bytes_by_provider: Dict[str, int] = dataclasses.field(default_factory=dict)
    error_by_provider: Dict[str, Callable[[object], Optional[float]]] = dataclasses.field(default_factory=dict)


# Benchmark providers of the CUDA attention backward's selectable layouts: {switch: value}.
_ATOMIC_DQ = {"INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ": "1"}  # dQ by fp32 atomics in the dK/dV kernel
_KEY_BLOCK128 = {"INTERNLM_KERNELS_CUDA_BWD_KEY_BLOCK": "128"}  # d = 128: 128-key dK/dV, scores shared
CUDA_BACKWARD_VARIANTS = {
    "cuda_dq_warp_rows32": {"INTERNLM_KERNELS_CUDA_BWD_DQ_WARP_ROWS": "32"},  # dQ kernel, 32 rows per warp
    "cuda_atomic_dq": _ATOMIC_DQ,
    "cuda_key_block128": _KEY_BLOCK128,
    # FlashAttention-2's backward as a whole: 128-key programs that add dQ by atomics (5
    # products per tile pair, where the dQ kernel's two-kernel backward does 7)
    "cuda_key_block128_atomic_dq": {**_KEY_BLOCK128, **_ATOMIC_DQ},
}


# Shared memory a block of the 128-key dK/dV layout takes (attention.cuh, BwdKeySharedTraits):
# where a device gives less (sm_86, sm_89, sm_120), the launcher runs the 64-key layout.
KEY_BLOCK128_SHARED_BYTES = 165888


def takes_key_block128(device: torch.device) -> bool:
    """Whether the CUDA backward's 128-key dK/dV layout launches on ``device`` (else 64 keys)."""
    if device.type != "cuda":
        return True  # the CUDA emulation gives a block an sm_90's 227 KB
    from internlm_kernels.triton._host import max_shared_per_block

    return max_shared_per_block(device.index if device.index is not None else torch.cuda.current_device()) >= \
        KEY_BLOCK128_SHARED_BYTES


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
    """Largest absolute error over the outputs; NaN if any output has a NaN where the
    reference has none (Python's max() would drop it), and an error for a missing output."""
    results = _as_tuple(result)
    if len(results) != len(expected):
        raise ValueError(f"{len(results)} outputs against {len(expected)} expected")
    errors = [(r.float() - e.float()).abs().nan_to_num(nan=float("inf"), posinf=float("inf")).max()
              if r.numel() else torch.zeros(()) for r, e in zip(results, expected)]
    worst = max(float(err) for err in errors)
    return float("nan") if worst == float("inf") else worst


def _against(expected: Sequence[Tensor]) -> Callable[[object], float]:
    return functools.partial(max_error, expected=tuple(expected))


def _backward_runner(forward: Callable[[], object], inputs: Sequence[Tensor], grads: Sequence[Tensor]):
    """The backward alone (autograd.grad with retain_graph) of one forward, run at the first
    call: inside the benchmark's per-provider guard, so a provider whose forward refuses the
    shape fails alone instead of taking the whole case with it."""
    outputs: List[Tensor] = []

    def run():
        if not outputs:
            outputs.extend(_as_tuple(forward()))
        return torch.autograd.grad(outputs, inputs, grads, retain_graph=True)
    return run


def with_env(settings: Dict[str, str], fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the environment variables ``settings`` (name: value) set during each call
    (kernel choices the glue reads per call), and restored after it."""
    def call():
        previous = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            return fn()
        finally:
            for name, value in previous.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
    return call


def _dynamo_setting(name: str, older_name: str) -> Optional[str]:
    """The name a dynamo setting has in this torch (the older one is an alias in newer torch)."""
    config = torch._dynamo.config
    return name if hasattr(config, name) else older_name if hasattr(config, older_name) else None


def _compiled(fn: Callable, backend: str = "inductor") -> Callable:
    """torch.compile of a reference function, one specialisation per shape. Every case compiles
    the same few functions, and dynamo keeps the compiled entries on the function's code, so
    the cases share its recompile limit (8): past it, dynamo would run the function eagerly
    under the torch_compile name. So the limit is raised for the benchmark, and hitting it
    anyway is an error (the row fails) rather than an eager row."""
    config = torch._dynamo.config
    for name, least in ((_dynamo_setting("recompile_limit", "cache_size_limit"), 256),
                        (_dynamo_setting("accumulated_recompile_limit", "accumulated_cache_size_limit"), 4096)):
        if name is not None:
            setattr(config, name, max(getattr(config, name), least))
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False, backend=backend)


def _liger_rms_norm():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # casting_mode="llama" is HF's cast order, the same semantics as ours. in_place=False: its
    # default writes dx into dy, the output gradient every provider's backward runner shares.
    return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)


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

    if not backward and "cuda" in impls:
        # The CUDA forward loading its weight after the reduction instead of staging it in
        # shared memory while the row loads (the switch is read at each launch).
        impls["cuda_unstaged_weight"] = with_env({"INTERNLM_KERNELS_CUDA_NORM_FWD_STAGE_WEIGHT": "0"}, impls["cuda"])
    shape = {"M": rows, "N": hidden}
    if not backward:
        # fwd reads x (and residual), writes out (and residual_out)
        bytes_moved = (4 if fused else 2) * rows * hidden * element
        expected = tuple(t.detach() for t in _as_tuple(oracle(*(t.float() for t in inputs))))
        return Case(f"{op}_fwd", dtype, shape, bytes_moved, None, impls, _against(expected))

    for t in inputs:
        t.requires_grad_(True)
    grads = tuple(torch.randn_like(o) for o in _as_tuple(oracle(*inputs)))
    fp32_inputs = [t.detach().float().requires_grad_(True) for t in inputs]
    expected = torch.autograd.grad(_as_tuple(oracle(*fp32_inputs)), fp32_inputs, [g.float() for g in grads])
    runners = {name: _backward_runner(fn, inputs, grads) for name, fn in impls.items()}
    kernels_only = {backend: _norm_backward_kernels(x, residual, weight, grads, eps, fused, backend)
                    for backend in ("cuda", "triton") if backend in impls}
    if "triton" in impls and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        # The Triton backward's pointer kernel, which its TMA kernel replaces on sm_90+ (the
        # switch is read when the backward launches, so it wraps the backward runner).
        runners["triton_no_tma"] = with_env({"INTERNLM_KERNELS_TRITON_NORM_BWD_TMA": "0"},
                                            _backward_runner(impls["triton"], inputs, grads))
        kernels_only["triton_no_tma"] = with_env({"INTERNLM_KERNELS_TRITON_NORM_BWD_TMA": "0"}, kernels_only["triton"])
    # bwd reads dy, x (fused: dy, d residual_out, residual_out), writes dx (fused: dx, d residual)
    bytes_moved = (5 if fused else 3) * rows * hidden * element
    return Case(f"{op}_bwd", dtype, shape, bytes_moved, None, runners, _against(e.detach() for e in expected),
                backward_kernels=kernels_only)


def _norm_backward_kernels(x, residual, weight, grads, eps: float, fused: bool, backend: str):
    """The RMSNorm (or fused) backward op of ``backend`` on one forward's saved results, as
    autograd calls it with dweight wanted. The forward runs at the first call (inside the
    benchmark's per-provider guard, as in _backward_runner)."""
    norm_ops = importlib.import_module("internlm_kernels.ops.rms_norm")  # (ops.rms_norm is the function)

    x, residual, weight = (t.detach() for t in (x, residual, weight))
    saved: List[Tensor] = []

    def run():
        if fused:
            if not saved:
                saved.extend(norm_ops._fused_add_rms_norm_fwd(x, residual, weight, eps, False, backend, backend)[1:])
            residual_out, rstd = saved
            return norm_ops._fused_add_rms_norm_bwd(grads[0], grads[1], residual_out, weight, rstd, x.dtype,
                                                    residual.dtype, True, True, backend)
        if not saved:
            saved.append(norm_ops._rms_norm_fwd(x, weight, eps, backend, backend)[1])
        return norm_ops._rms_norm_bwd(grads[0], x, weight, saved[0], True, backend)
    return run


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
        return Case("rotary_fwd", dtype, shape, bytes_moved, None, impls, _against(expected))
    q.requires_grad_(True)
    k.requires_grad_(True)
    grads = (torch.randn_like(q), torch.randn_like(k))
    q32, k32 = (t.detach().float().requires_grad_(True) for t in (q, k))
    expected = torch.autograd.grad(reference.apply_rotary(q32, k32, cos, sin), (q32, k32),
                                   [g.float() for g in grads])
    runners = {name: _backward_runner(fn, (q, k), grads) for name, fn in impls.items()}
    rotary_ops = importlib.import_module("internlm_kernels.ops.rotary")

    # The backward is the rotary op with the rotation conjugated.
    kernels_only = {backend: (lambda b=backend: rotary_ops._rotary(grads[0], grads[1], cos, sin, None, None, 0, None,
                                                                   False, True, b))
                    for backend in ("cuda", "triton") if backend in impls}
    return Case("rotary_bwd", dtype, shape, bytes_moved, None, runners, _against(e.detach() for e in expected),
                backward_kernels=kernels_only)


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------

SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
EAGER_MAX_SCORES = 1 << 31  # eager materialises B * H * Sq * Sk scores: skip it beyond this


def _sdpa(name: str, q, k, v, causal: bool):
    """SDPA restricted to one backend on (B, S, H, D) tensors, GQA without repeating K/V."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])

    def run():  # transposes inside, so they join the autograd graph of a backward case
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2)
    return run


def _sdpa_serves(name: str, device, heads_q: int, heads_kv: int) -> bool:
    """Whether SDPA's backend ``name`` runs here: the fused ones only on a GPU, and the
    memory-efficient one not with grouped-query heads (enable_gqa is flash, cuDNN and math only)."""
    if device.type != "cuda":
        return name == "sdpa_math"
    return name != "sdpa_efficient" or heads_q == heads_kv


def attention_case(device, dtype, batch: int, seqlen: int, heads_q: int, heads_kv: int, head_dim: int,
                   causal: bool, providers: Sequence[str], *, backward: bool) -> Case:
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, seqlen, h, head_dim, device=device, dtype=dtype, generator=gen)
               for h in (heads_q, heads_kv, heads_kv))
    impls: Dict[str, Callable[[], object]] = {}
    for backend in kernel_backends(device, "flash_attention"):
        if backend in providers and (backend != "cuda" or head_dim in CUDA_HEAD_DIMS):
            impls[backend] = lambda b=backend: ik.flash_attention(q, k, v, causal=causal, backend=b)
    if not backward and "cuda" in impls:  # the CUDA forward's other warp layout (8 warps of 16 rows)
        impls["cuda_warp_rows16"] = with_env({"INTERNLM_KERNELS_CUDA_FWD_WARP_ROWS": "16"}, impls["cuda"])
    small_enough = batch * heads_q * seqlen * seqlen <= EAGER_MAX_SCORES
    if "eager" in providers and small_enough:
        impls["eager"] = lambda: reference.attention(q, k, v, causal=causal)
    if "torch_compile" in providers and small_enough:
        impls["torch_compile"] = lambda f=_compiled(reference.attention): f(q, k, v, causal=causal)
    for name in SDPA_BACKENDS:
        if name in providers and _sdpa_serves(name, device, heads_q, heads_kv) and \
                (name != "sdpa_math" or small_enough):
            impls[name] = _sdpa(name, q, k, v, causal)

    shape = {"B": batch, "S": seqlen, "Hq": heads_q, "Hkv": heads_kv, "D": head_dim, "causal": int(causal)}
    flops = reference.attention_flops(batch, heads_q, seqlen, seqlen, head_dim, causal, backward=backward)
    # The oracles read the first and last batch rows: the last one sits at a nonzero batch
    # offset, where a wrong stride would show.
    ends = _end_rows(batch, device)
    if not backward:
        # The last query rows only (bottom-right alignment keeps their positions), so
        # 16K-token cases need no S x S fp32 matrix.
        tail = min(seqlen, 128)
        expected = reference.attention(q[ends, -tail:].float(), k[ends].float(), v[ends].float(), causal=causal)
        return Case("attention_fwd", dtype, shape, None, flops, impls,
                    lambda out: max_error(out[ends, -tail:], (expected,)))
    for t in (q, k, v):
        t.requires_grad_(True)
    grad = torch.randn_like(q)
    runners = {name: _backward_runner(fn, (q, k, v), (grad,)) for name, fn in impls.items()}
    if "cuda" in impls:
        # The CUDA backward's other layouts. The glue reads their switches when the backward
        # launches, so each wraps a backward runner; around the forward alone (as until
        # 2026-11-28) the row timed the default backward under another name.
        for name, settings in CUDA_BACKWARD_VARIANTS.items():
            if settings.keys().isdisjoint(_KEY_BLOCK128) or (head_dim == 128 and takes_key_block128(device)):
                runners[name] = with_env(settings, _backward_runner(impls["cuda"], (q, k, v), (grad,)))
    return Case("attention_bwd", dtype, shape, None, flops, runners,
                _backward_oracle(q, k, v, grad, causal, ends))


def _end_rows(batch: int, device) -> Tensor:
    """Indices of the first and the last batch row (one row when there is one)."""
    return torch.tensor(sorted({0, batch - 1}), device=device)


def _backward_oracle(q: Tensor, k: Tensor, v: Tensor, grad: Tensor, causal: bool,
                     ends: Tensor) -> Callable[[object], float]:
    """Max error of (dq, dk, dv) on a slice that determines its own gradients: the batch rows
    ``ends`` and the last KV head with its group of query heads (heads do not mix, and every
    query of the group feeds that head's dk and dv)."""
    heads_q = q.shape[2]
    query_heads = slice(heads_q - heads_q // k.shape[2], heads_q)
    key_head = slice(k.shape[2] - 1, None)

    def sliced(grads):
        dq, dk, dv = _as_tuple(grads)
        return dq[ends][:, :, query_heads], dk[ends][:, :, key_head], dv[ends][:, :, key_head]

    expected = _attention_grads_by_row_chunks(*(t.detach()[ends][:, :, heads].float() for t, heads in
                                                ((q, query_heads), (k, key_head), (v, key_head))),
                                              grad[ends][:, :, query_heads].float(), causal)
    return lambda grads: max_error(sliced(grads), expected)


def _attention_grads_by_row_chunks(q: Tensor, k: Tensor, v: Tensor, grad: Tensor, causal: bool,
                                   rows: int = 2048) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of reference.attention (Sq == Sk), a chunk of query rows at a time, so the
    S x S scores of a 16K sequence are never whole. Query rows are independent: each chunk's
    rows give their own dq, and dk / dv are the sum of the chunks' parts. A causal chunk
    ending at row b takes keys [0, b), which puts its rows at their own positions under the
    bottom-right alignment (and the later keys are masked for them anyway)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for first in range(0, q.shape[1], rows):
        last = min(first + rows, q.shape[1])
        keys = last if causal else k.shape[1]
        chunk = [q[:, first:last], k[:, :keys], v[:, :keys]]
        chunk = [t.clone().requires_grad_(True) for t in chunk]
        parts = torch.autograd.grad(reference.attention(*chunk, causal=causal), chunk, grad[:, first:last])
        dq[:, first:last] = parts[0]
        dk[:, :keys] += parts[1]
        dv[:, :keys] += parts[2]
    return dq, dk, dv


PAGE_SIZE = 64  # positions per page of the paged decode rows


def as_pages(k_cache: Tensor, v_cache: Tensor, page_size: int, gen: Optional[torch.Generator] = None,
             spare_pages: int = 0):
    """The caches (B, S, H, D) as a shuffled pool of pages and a block table (the layout of
    vLLM and lmdeploy): (k_pages, v_pages, block_table); ``spare_pages`` more pages of random
    values belong to no sequence."""
    batch, capacity, heads, dim = k_cache.shape
    blocks = -(-capacity // page_size)
    pages = batch * blocks + spare_pages
    table = torch.randperm(pages, generator=gen, device=k_cache.device)[:batch * blocks].view(batch, blocks).int()
    pools = []
    for cache in (k_cache, v_cache):
        pool = torch.randn(pages, page_size, heads, dim, generator=gen, device=cache.device).to(cache.dtype)
        padded = torch.nn.functional.pad(cache, (0, 0, 0, 0, 0, blocks * page_size - capacity))
        pool[table.long()] = padded.view(batch, blocks, page_size, heads, dim)
        pools.append(pool)
    return pools[0], pools[1], table


def decode_case(device, dtype, batch: int, cache_len: int, heads_q: int, heads_kv: int, head_dim: int,
                providers: Sequence[str], length: Optional[int] = None) -> Case:
    """One new query token per sequence over a KV cache of ``cache_len`` slots holding
    ``length`` valid positions (default: full), as a serving engine sizes its cache for the
    longest request: memory-bound, GB/s of valid KV read. The SDPA and eager baselines get
    just the valid positions."""
    length = cache_len if length is None else length
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, 1, heads_q, head_dim, device=device, dtype=dtype, generator=gen)
    k_cache, v_cache = (torch.randn(batch, cache_len, heads_kv, head_dim, device=device, dtype=dtype,
                                    generator=gen) for _ in range(2))
    k_valid, v_valid = k_cache[:, :length], v_cache[:, :length]
    lengths = torch.full((batch,), length, device=device, dtype=torch.int32)
    impls: Dict[str, Callable[[], object]] = {}
    for backend in kernel_backends(device, "flash_attention_with_kvcache"):
        if backend in providers and (backend != "cuda" or head_dim in CUDA_HEAD_DIMS):
            impls[backend] = lambda b=backend: ik.flash_attention_with_kvcache(q, k_cache, v_cache,
                                                                               cache_seqlens=lengths, backend=b)
    paged_backends = [backend for backend in ("cuda", "triton") if backend in impls]
    if paged_backends:  # the same caches as shuffled pages of PAGE_SIZE positions (vLLM's layout)
        k_pages, v_pages, table = as_pages(k_cache, v_cache, PAGE_SIZE, gen)
        for backend in paged_backends:
            impls[f"{backend}_paged"] = lambda b=backend: ik.flash_attention_with_kvcache(
                q, k_pages, v_pages, cache_seqlens=lengths, block_table=table, backend=b)
    if "eager" in providers:
        impls["eager"] = lambda: reference.attention(q, k_valid, v_valid, causal=True)
    for name in SDPA_BACKENDS:
        if name in providers and _sdpa_serves(name, device, heads_q, heads_kv):
            impls[name] = _sdpa(name, q, k_valid, v_valid, causal=False)  # one query sees every key
    ends = _end_rows(batch, device)
    expected = reference.attention(q[ends].float(), k_valid[ends].float(), v_valid[ends].float(), causal=True)
    bytes_moved = 2 * k_valid.numel() * k_valid.element_size()
    extra = {}
    # The same caches in float8_e4m3fn, a scale per KV head (vLLM's fp8 with calibrated scales):
    # the CUDA decode, and Triton where it reads that type (sm_89 and newer; the interpreter).
    fp8_backends = [backend for backend in ("cuda", "triton") if backend in impls and (
        backend == "cuda" or device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9))]
    if fp8_backends:
        k_scale, v_scale = (cache.abs().amax(dim=(0, 1, 3)).float() / torch.finfo(torch.float8_e4m3fn).max
                            for cache in (k_cache, v_cache))
        k_fp8 = reference.quantize_fp8(k_cache, k_scale, torch.float8_e4m3fn)
        v_fp8 = reference.quantize_fp8(v_cache, v_scale, torch.float8_e4m3fn)
        expected_fp8 = reference.attention(
            q[ends].float(), reference.dequantize_fp8(k_fp8[ends, :length], k_scale, torch.float32),
            reference.dequantize_fp8(v_fp8[ends, :length], v_scale, torch.float32), causal=True)
        extra = dict(bytes_by_provider={}, error_by_provider={})
        for backend in fp8_backends:
            impls[f"{backend}_fp8"] = lambda b=backend: ik.flash_attention_with_kvcache(
                q, k_fp8, v_fp8, cache_seqlens=lengths, k_scale=k_scale, v_scale=v_scale, backend=b)
            extra["bytes_by_provider"][f"{backend}_fp8"] = 2 * k_valid.numel()  # one byte an entry
            extra["error_by_provider"][f"{backend}_fp8"] = lambda out: max_error(out[ends], (expected_fp8,))
    shape = {"B": batch, "L": cache_len, "Hq": heads_q, "Hkv": heads_kv, "D": head_dim}
    if length != cache_len:
        shape["valid"] = length
    return Case("attention_decode", dtype, shape, bytes_moved, None, impls,
                lambda out: max_error(out[ends], (expected,)), **extra)


# --------------------------------------------------------------------------------------
# end to end: the reference model
# --------------------------------------------------------------------------------------

# provider -> model backend. "auto": our kernels as "auto" picks them (Triton, except the
# KV-cache decode, which "auto" gives to CUDA: so not called "triton"); "cuda": every op in
# CUDA C++. The "triton" provider asks for the "auto" row.
MODEL_PROVIDERS = {"auto": "auto", "cuda": "cuda", "eager": "torch"}


def model_case(device, dtype, op: str, preset: str, layers: Optional[int], batch: int, seqlen: int,
               new_tokens: int, providers: Sequence[str]) -> Case:
    """model_prefill / model_decode / model_train_step of a preset with random weights
    (``layers`` overrides the depth so big presets fit). The row's ms is per call; the
    harness reports tokens/s from ``tokens``; peak memory is measured per provider."""
    from internlm_kernels.models import InternLMForCausalLM, ModelArgs

    args = ModelArgs.from_name(preset)
    if layers is not None:
        args = dataclasses.replace(args, num_layers=layers)
    torch.manual_seed(0)
    base = InternLMForCausalLM(args, backend="auto").to(device=device, dtype=dtype)
    ids = torch.randint(0, args.vocab_size, (batch, seqlen), device=device)
    impls: Dict[str, Callable[[], object]] = {}
    cuda_serves = "cuda" in kernel_backends(device, "flash_attention") and args.head_dim in CUDA_HEAD_DIMS
    for provider in dict.fromkeys("auto" if p == "triton" else p for p in providers):
        if provider == "cuda" and not cuda_serves:
            continue
        if provider == "torch_compile" and op == "model_decode":
            continue  # generate() runs the eager model: such a row would not be compiled
        if provider in MODEL_PROVIDERS or provider == "torch_compile":
            model = InternLMForCausalLM(args, backend=MODEL_PROVIDERS.get(provider, "torch")).to(device, dtype)
            model.load_state_dict(base.state_dict())
            forward = torch.compile(model) if provider == "torch_compile" else model
            if op == "model_prefill":
                impls[provider] = lambda m=forward: _no_grad(m, ids)
            elif op == "model_decode":
                impls[provider] = lambda m=model: m.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
            else:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
                impls[provider] = functools.partial(_train_step, forward, optimizer, ids)
    tokens = batch * (new_tokens if op == "model_decode" else seqlen)
    shape = {"preset": preset, "layers": args.num_layers, "B": batch, "S": seqlen}
    if op == "model_decode":
        shape["new"] = new_tokens
    return Case(op, dtype, shape, None, None, impls, lambda result: None, tokens=tokens)


def _no_grad(model, ids):
    with torch.no_grad():
        return model(ids)


def _train_step(model, optimizer, ids):
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


OPS = ("rms_norm_fwd", "rms_norm_bwd", "fused_add_rms_norm_fwd", "fused_add_rms_norm_bwd", "rotary_fwd",
       "rotary_bwd", "attention_fwd", "attention_bwd", "attention_decode", "model_prefill", "model_decode",
       "model_train_step")


def build_cases(ops: Sequence[str], device: torch.device, dtype: torch.dtype, providers: Sequence[str],
                *, small: bool, quick: bool = False) -> List[Callable[[], Case]]:
    """Factories of the default cases (built one at a time by the caller).

    GPU: InternLM2-7B shapes: norms at M = 16384 tokens, hidden 4096 and 8192; rotary and
    attention with 32 q / 8 kv heads of 128, 16K tokens per batch (B * S = 16384), causal and
    not, head dims 64 and 128 (quick: causal and not at S = 8K, d 128); decode at B in
    {1, 8, 64} x cache length in {4K, 32K}, and B = 1 with 2K valid positions of a 32K cache.
    CPU: tiny shapes."""
    if small:
        norm_shapes = [(64, 512)]
    elif quick:
        norm_shapes = [(16384, 4096), (16384, 8192)]
    else:  # hidden sizes of the InternLM family, for the GB/s-vs-size plots
        norm_shapes = [(16384, n) for n in (1024, 2048, 4096, 5120, 6144, 8192, 16384)]
    rotary_shapes = [(1, 16, 4, 2, 64)] if small else [(4, 4096, 32, 8, 128)]
    if small:
        attention_shapes = [(1, 32, 4, 2, 32, True)]
        decode_shapes = [(2, 64, 4, 2, 32), (1, 256, 4, 2, 32, 40)]
    else:
        seqlens = [8192] if quick else [1024, 4096, 8192, 16384]
        dims = [128] if quick else [64, 128]
        attention_shapes = [(16384 // s, s, 32, 8, d, causal) for d in dims for causal in (True, False)
                            for s in seqlens]
        decode_shapes = [(b, length, 32, 8, 128) for b in (1, 8, 64) for length in (4096, 32768)]
        if quick:
            decode_shapes = [(1, 32768, 32, 8, 128), (64, 4096, 32, 8, 128)]
        # A serving cache sized for the longest request: 2K valid positions of a 32K cache.
        decode_shapes.append((1, 32768, 32, 8, 128, 2048))
    if small:
        model_shapes = {"model_prefill": [("tiny-internlm2", None, 1, 16, 0)],
                        "model_decode": [("tiny-internlm2", None, 1, 8, 4)],
                        "model_train_step": [("tiny-internlm2", None, 2, 16, 0)]}
    else:  # InternLM2-1.8B- and 7B-shaped (7B with 4 layers for training: AdamW states must fit)
        model_shapes = {"model_prefill": [("internlm2-1_8b", None, 1, 4096, 0), ("internlm2-7b", None, 1, 4096, 0)],
                        "model_decode": [("internlm2-1_8b", None, 8, 128, 128), ("internlm2-7b", None, 8, 128, 128)],
                        "model_train_step": [("internlm2-1_8b", None, 4, 2048, 0), ("internlm2-7b", 4, 4, 2048, 0)]}
        if quick:
            model_shapes = {op: shapes[:1] for op, shapes in model_shapes.items()}
    factories: List[Callable[[], Case]] = []
    for op in ops:
        kind, _, direction = op.rpartition("_")
        backward = direction == "bwd"
        if kind in ("rms_norm", "fused_add_rms_norm"):
            for rows, hidden in norm_shapes:
                factories.append(functools.partial(rms_norm_cases, device, dtype, rows, hidden, providers,
                                                   fused=kind == "fused_add_rms_norm", backward=backward))
        elif kind == "rotary":
            for shape in rotary_shapes:
                factories.append(functools.partial(rotary_case, device, dtype, *shape, providers, backward=backward))
        elif op in ("attention_fwd", "attention_bwd"):
            for shape in attention_shapes:
                factories.append(functools.partial(attention_case, device, dtype, *shape, providers,
                                                   backward=backward))
        elif op == "attention_decode":
            for batch, cache_len, heads_q, heads_kv, head_dim, *length in decode_shapes:
                factories.append(functools.partial(decode_case, device, dtype, batch, cache_len, heads_q, heads_kv,
                                                   head_dim, providers, *length))
        elif op.startswith("model_"):
            # quick: no torch.compile of whole models (minutes of compilation per preset)
            model_providers = [p for p in providers if not (quick and p == "torch_compile")]
            for shape in model_shapes[op]:
                factories.append(functools.partial(model_case, device, dtype, op, *shape, model_providers))
        else:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    return factories
