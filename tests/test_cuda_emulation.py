"""The CUDA C++ kernels' own source, run on the CPU.

csrc/include/internlm_kernels/emulation.h emulates the CUDA execution model on the host
(one OS thread per CUDA thread, block and warp barriers, shuffles, ldmatrix, mma.sync and
cp.async per the PTX ISA). This module compiles every kernel of internlm_kernels._C, the
torch glue and the bindings with the host compiler and -DIK_CUDA_EMULATION into an
extension that takes CPU tensors, then holds it to the GPU tests' rules: attention by the
2x / 3x eager-error rule against fp64 (forward, backward, varlen, decode, cache writes);
RMSNorm and rotary through the public ops with backend="cuda", running the test bodies of
tests/test_rms_norm.py and tests/test_rotary.py. What it cannot see: timing, and races
between cp.async and barriers (copies land at once); those need the GPU run.

Runs on any machine with a C++20 compiler and the CUDA headers (CUDA_HOME or /usr/local/cuda);
the first run builds into build/emulation (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels import reference
from tests import test_rms_norm as rms_tests
from tests import test_rotary as rotary_tests
from tests.helpers import DTYPES, assert_within_eager_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
HAVE_HEADERS = os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_bf16.h"))
pytestmark = pytest.mark.skipif(not HAVE_HEADERS, reason=f"no CUDA headers under {CUDA_HOME} (set CUDA_HOME)")


@pytest.fixture(scope="module")
def kernels():
    """The emulated extension: same functions and signatures as internlm_kernels._C's attention."""
    from torch.utils import cpp_extension

    build = os.path.join(REPO, "build", "emulation")
    wrappers = os.path.join(build, "sources")
    os.makedirs(wrappers, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(REPO, "csrc", "torch", "*.cpp")))
    # The generated instantiation files, compiled as C++ (one wrapper each, so they build in parallel).
    for path in sorted(glob.glob(os.path.join(REPO, "csrc", "instantiations", "*.cu"))):
        wrapper = os.path.join(wrappers, os.path.basename(path)[:-3] + ".cpp")
        text = f'#include "{path}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        sources.append(wrapper)
    return cpp_extension.load(
        name="internlm_kernels_emulated", sources=sources, build_directory=build,
        extra_include_paths=[os.path.join(REPO, "csrc", "include"), os.path.join(CUDA_HOME, "include")],
        extra_cflags=["-O1", "-DIK_CUDA_EMULATION", "-Wno-unknown-pragmas",
                      # ninja runs the command through a shell: keep the string macros' quotes
                      f"""'-DIK_TORCH_VERSION="{torch.__version__}"'""", """'-DIK_CUDA_ARCHS="emulation"'"""],
        verbose=False)


@pytest.fixture
def cuda_backend(kernels, monkeypatch):
    """backend="cuda" served by the emulated extension on CPU tensors, through the real ops."""
    from internlm_kernels import backends

    device_reason = backends._device_reason
    monkeypatch.setattr(backends, "extension", kernels)
    monkeypatch.setattr(backends, "_device_reason",
                        lambda backend, device: None if backend == "cuda" else device_reason(backend, device))


def _mask(causal, window_size):
    return bool(causal), tuple(window_size)


def _forward(kernels, q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None, cu_seqlens_q=None,
             cu_seqlens_k=None):
    """out, lse as the ops layer allocates them (packed: zeros / -inf for padding rows)."""
    packed = cu_seqlens_q is not None
    q4, k4, v4 = (t[None] if packed else t for t in (q, k, v))
    out = torch.zeros_like(q4) if packed else torch.empty_like(q4)
    lse = torch.full((1, q.shape[1], q.shape[0]), float("-inf")) if packed else \
        torch.empty(q.shape[0], q.shape[2], q.shape[1])
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    kernels.attention_fwd(q4, k4, v4, out, lse, cu_seqlens_q, cu_seqlens_k, scale, *_mask(causal, window_size))
    return (out[0], lse[0]) if packed else (out, lse)


def _backward(kernels, dout, q, k, v, out, lse, causal=False, window_size=(-1, -1), softmax_scale=None,
              cu_seqlens_q=None, cu_seqlens_k=None):
    packed = cu_seqlens_q is not None
    as4 = (lambda t: t[None]) if packed else (lambda t: t)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    kernels.attention_bwd(as4(dout), as4(q), as4(k), as4(v), as4(out), lse[None] if packed else lse,
                          *(as4(g) for g in grads), cu_seqlens_q, cu_seqlens_k, scale, *_mask(causal, window_size))
    return grads


def _check(kernels, q, k, v, **kwargs):
    """Forward by the 2x rule (and lse), backward by the 3x rule, against fp64."""
    dtype = q.dtype
    out, lse = _forward(kernels, q, k, v, **kwargs)
    eager_inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    eager = reference.attention(*eager_inputs, **kwargs)
    exact_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    exact, exact_lse = reference.attention(*exact_inputs, return_lse=True, **kwargs)
    assert_within_eager_error([out], [eager], [exact], dtype, 2.0, "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact_lse)), "rows that see no key: lse -inf"
    seen = torch.isfinite(exact_lse)
    torch.testing.assert_close(lse[seen].double(), exact_lse[seen], rtol=1e-4, atol=1e-4)

    dout = torch.randn_like(out)
    ours = _backward(kernels, dout, q, k, v, out, lse, **kwargs)
    theirs = torch.autograd.grad(eager, eager_inputs, dout)
    exact_grads = torch.autograd.grad(exact, exact_inputs, dout.double())
    assert_within_eager_error(ours, theirs, exact_grads, dtype, 3.0, "dq, dk, dv")
    return out, ours


CASES = {
    # name: (batch, seqlen_q, seqlen_k, heads_q, heads_kv, kwargs); small: every CUDA thread is an OS thread
    "mha": (1, 19, 19, 2, 2, {}),
    "gqa3_causal": (1, 21, 21, 3, 1, {"causal": True}),
    "sq_lt_sk_causal": (1, 9, 70, 2, 1, {"causal": True}),  # keys span two 64-key tiles
    "sq_gt_sk_causal": (1, 40, 17, 2, 2, {"causal": True}),  # the first 23 queries see no key
    "window_both": (2, 20, 20, 2, 1, {"window_size": (3, 2)}),
    "window_left_causal": (1, 72, 72, 1, 1, {"causal": True, "window_size": (5, -1)}),
    "scale": (1, 16, 16, 2, 2, {"causal": True, "softmax_scale": 0.3}),
}


def _qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype):
    return (torch.randn(batch, seqlen_q, heads_q, head_dim, dtype=dtype),
            torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype),
            torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_attention_matches_reference(kernels, case, dtype, head_dim):
    batch, sq, sk, hq, hkv, kwargs = CASES[case]
    _check(kernels, *_qkv(batch, sq, sk, hq, hkv, head_dim, dtype), **kwargs)


def test_emulated_attention_strided_inputs(kernels):
    qkv = torch.randn(1, 19, 3 + 2, 64, dtype=torch.bfloat16)  # slices of one fused projection
    q, k, v = qkv[:, :, :3], qkv[:, :, 3:4], qkv[:, :, 4:]
    _check(kernels, q, k, v, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_emulated_attention_packed_varlen(kernels, causal):
    # (q, k) lengths (3, 5), (0, 2) empty queries, (1, 1), (16, 22); then 2 padding rows
    cu_q = torch.tensor([0, 3, 3, 4, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 8, 30], dtype=torch.int32)
    q = torch.randn(22, 4, 64, dtype=torch.bfloat16)
    k, v = torch.randn(31, 2, 64, dtype=torch.bfloat16), torch.randn(31, 2, 64, dtype=torch.bfloat16)
    out, (dq, dk, dv) = _check(kernels, q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert torch.equal(out[20:], torch.zeros_like(out[20:])), "padding query rows are zero"
    assert torch.equal(dq[20:], torch.zeros_like(dq[20:])) and torch.equal(dk[30:], torch.zeros_like(dk[30:]))


def test_emulated_backward_is_deterministic(kernels):
    q, k, v = _qkv(1, 40, 40, 4, 2, 64, torch.bfloat16)
    out, lse = _forward(kernels, q, k, v, causal=True)
    dout = torch.randn_like(out)
    first = _backward(kernels, dout, q, k, v, out, lse, causal=True)
    second = _backward(kernels, dout, q, k, v, out, lse, causal=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [(-1, -1), (8, 0)], ids=["full", "window"])
def test_emulated_kvcache_append_and_decode(kernels, head_dim, window):
    """Append 2 new entries, then split-KV decoding (the emulated GPU has 4 SMs, so the 300-slot
    cache is split) of 2 positions x group 4 against the reference."""
    dtype = torch.bfloat16
    batch, capacity, heads_kv, group, new = 3, 300, 2, 4, 2
    k_cache, v_cache = (torch.randn(batch, capacity, heads_kv, head_dim, dtype=dtype) for _ in range(2))
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    lengths = torch.tensor([0, 37, 298], dtype=torch.int32)
    q = torch.randn(batch, new, heads_kv * group, head_dim, dtype=dtype)
    k_new, v_new = (torch.randn(batch, new, heads_kv, head_dim, dtype=dtype) for _ in range(2))
    kernels.kvcache_append(k_new, k_cache, lengths)
    kernels.kvcache_append(v_new, v_cache, lengths)
    out = torch.empty_like(q)
    kernels.attention_decode(q, k_cache, v_cache, out, lengths, new, head_dim ** -0.5, True, window)
    expected = reference.attention_with_kvcache(q, ref_k, ref_v, k=k_new, v=v_new, cache_seqlens=lengths,
                                                window_size=window)
    exact = reference.attention_with_kvcache(q.double(), ref_k.double(), ref_v.double(), k=k_new.double(),
                                             v=v_new.double(), cache_seqlens=lengths, window_size=window)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v), "cache writes are exact copies"
    assert_within_eager_error([out], [expected], [exact], dtype, 2.0, f"decode {window}")


def test_emulated_decode_overflow_is_nan_not_a_wild_write(kernels):
    k_cache, v_cache = (torch.randn(2, 16, 1, 64, dtype=torch.float16) for _ in range(2))
    before = k_cache.clone()
    lengths = torch.tensor([3, 15], dtype=torch.int32)  # 15 + 2 > 16 for the second
    new = torch.randn(2, 2, 1, 64, dtype=torch.float16)
    kernels.kvcache_append(new, k_cache, lengths)
    kernels.kvcache_append(new, v_cache, lengths)
    q = torch.randn(2, 2, 2, 64, dtype=torch.float16)
    out = torch.empty_like(q)
    kernels.attention_decode(q, k_cache, v_cache, out, lengths, 2, 0.125, True, (-1, -1))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    assert torch.equal(k_cache[1, :15], before[1, :15]) and torch.equal(k_cache[1, 15], new[1, 0])


def test_emulated_glue_checks_run_before_any_launch(kernels):
    q = torch.randn(1, 8, 4, 64, dtype=torch.float16)
    k = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    lse = torch.empty(1, 4, 8)
    with pytest.raises(RuntimeError, match="the cuda kernels have head_dim 64 and 128, got 32"):
        kernels.attention_fwd(q[..., :32], k[..., :32], k[..., :32], torch.empty(1, 8, 4, 32, dtype=torch.float16),
                              lse, None, None, 1.0, True, (-1, -1))
    unaligned = torch.randn(1, 8, 2, 65, dtype=torch.float16)[..., 1:]
    with pytest.raises(RuntimeError, match="k must start 16-byte aligned"):
        kernels.attention_fwd(q, unaligned, k, torch.empty_like(q), lse, None, None, 1.0, True, (-1, -1))


# --------------------------------------------------------------------------------------
# RMSNorm and rotary: the op test bodies, with backend="cuda" on the emulated kernels
# --------------------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", rms_tests.SHAPES, ids=str)
def test_emulated_rms_norm_matches_reference(cuda_backend, dtype, shape):
    rms_tests.test_rms_norm_matches_reference("cuda", dtype, shape, CPU)


@pytest.mark.parametrize("layout", ["row_slice", "transposed_3d", "permuted_4d", "batched_rows"])
def test_emulated_rms_norm_non_contiguous_rows(cuda_backend, layout):
    rms_tests.test_rms_norm_non_contiguous_rows("cuda", layout, CPU)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (19, 123), (2, 5120), (2, 20000)], ids=str)
@pytest.mark.parametrize("residual_in_fp32", [False, True], ids=["res_dtype", "res_fp32"])
def test_emulated_fused_add_rms_norm_matches_reference(cuda_backend, dtype, shape, residual_in_fp32):
    rms_tests.test_fused_add_rms_norm_matches_reference("cuda", dtype, shape, residual_in_fp32, CPU)


def test_emulated_fused_add_rms_norm_fp32_residual_stream_and_strides(cuda_backend):
    rms_tests.test_fused_add_rms_norm_fp32_residual_stream_and_strides("cuda", CPU)


def test_emulated_rms_norm_gradient_through_residual_output_only(cuda_backend):
    rms_tests.test_gradient_through_residual_output_only("cuda", CPU)


@pytest.mark.parametrize("hidden", [4096, 20000])  # register path, looped path
def test_emulated_dweight_is_bitwise_deterministic(cuda_backend, hidden):
    # tests/test_rms_norm.py's 4099 rows, cut to 67 (several blocks of partial rows) for the emulation.
    x = torch.randn(67, hidden, dtype=torch.bfloat16)
    residual, dy = torch.randn_like(x), torch.randn_like(x)
    weight = 1 + 0.5 * torch.randn(hidden, dtype=torch.bfloat16)
    results = []
    for _ in range(2):
        w = weight.detach().requires_grad_(True)
        out, _ = ik.fused_add_rms_norm(x, residual, w, backend="cuda")
        results.append(torch.autograd.grad(out, w, dy)[0])
    assert torch.equal(results[0], results[1])


def test_emulated_rms_norm_zero_size(cuda_backend):
    rms_tests.test_zero_size_inputs_return_empty("cuda", CPU)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [16, 10], ids=["full", "partial"])
def test_emulated_rotary_matches_reference(cuda_backend, dtype, interleaved, rotary_dim):
    rotary_tests.test_rotary_matches_reference("cuda", dtype, interleaved, rotary_dim, CPU)


@pytest.mark.parametrize("positions", ["per_batch", "shared", "offsets_tensor"])
def test_emulated_rotary_positions(cuda_backend, positions):
    rotary_tests.test_rotary_positions("cuda", positions, CPU)


def test_emulated_rotary_packed_varlen(cuda_backend):
    rotary_tests.test_rotary_packed_varlen("cuda", CPU)
    rotary_tests.test_rotary_packed_with_position_ids("cuda", CPU)


def test_emulated_rotary_strided_inplace_and_out_of_table(cuda_backend):
    rotary_tests.test_rotary_strided_views("cuda", CPU)
    rotary_tests.test_rotary_inplace("cuda", CPU)
    rotary_tests.test_positions_outside_table_give_nan("cuda", CPU)
    rotary_tests.test_zero_size("cuda", CPU)
