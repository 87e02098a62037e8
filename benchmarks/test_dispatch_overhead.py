"""Host-side cost of one call on a tiny tensor (pytest-benchmark), against a single native op.

    pytest benchmarks/ --benchmark-only

With tensors this small the kernel time is negligible, so the numbers are the Python
dispatch cost: argument checks, backend choice, the torch.library op and the launcher.
Triton under its CPU interpreter is not timed (it measures the interpreter, not dispatch).
"""

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels.backends import choose_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", "triton", "cuda"]


def _skip_unless_dispatch_measurable(backend: str, op: str = "rms_norm") -> None:
    try:
        choose_backend(backend, DEVICE, op)
    except RuntimeError as error:
        pytest.skip(str(error))
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("Triton on CPU runs in its interpreter: that measures the interpreter, not dispatch")


def _sync(result):
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return result


def test_native_single_op_baseline(benchmark):
    x = torch.randn(8, 64, device=DEVICE)
    benchmark(lambda: _sync(torch.mul(x, x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_call_overhead(benchmark, backend):
    _skip_unless_dispatch_measurable(backend)
    x = torch.randn(8, 64, device=DEVICE)
    weight = torch.ones(64, device=DEVICE)
    ik.rms_norm(x, weight, backend=backend)  # compile / load once outside the timing
    benchmark(lambda: _sync(ik.rms_norm(x, weight, backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_rotary_call_overhead(benchmark, backend):
    _skip_unless_dispatch_measurable(backend)
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    k = torch.randn(1, 4, 1, 16, device=DEVICE)
    cos, sin = ik.rotary_cos_sin(4, 16, device=DEVICE)
    ik.apply_rotary(q, k, cos, sin, backend=backend)
    benchmark(lambda: _sync(ik.apply_rotary(q, k, cos, sin, backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_call_overhead_compiled(benchmark, backend):
    """The same call inside torch.compile: the custom op is one graph node, so the Python
    checks and backend choice run at trace time, not per call."""
    _skip_unless_dispatch_measurable(backend)
    x = torch.randn(8, 64, device=DEVICE)
    weight = torch.ones(64, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: ik.rms_norm(t, weight, backend=backend), fullgraph=True)
    compiled(x)
    benchmark(lambda: _sync(compiled(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_decode_call_overhead(benchmark, backend):
    """One decode step over a tiny cache: the append, split-KV and combine launches plus the
    Python around them (a serving loop pays this per layer unless it replays CUDA graphs)."""
    _skip_unless_dispatch_measurable(backend, "flash_attention_with_kvcache")
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    q = torch.randn(2, 1, 4, 64, device=DEVICE, dtype=dtype)
    k_cache, v_cache = (torch.randn(2, 32, 2, 64, device=DEVICE, dtype=dtype) for _ in range(2))
    lengths = torch.full((2,), 16, device=DEVICE, dtype=torch.int32)
    ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, backend=backend)
    benchmark(lambda: _sync(ik.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                             backend=backend)))
