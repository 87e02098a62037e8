"""The CUDA C++ kernels' own source, run on the CPU.

csrc/include/internlm_kernels/emulation.h emulates the CUDA execution model on the host
(one OS thread per CUDA thread, block and warp barriers, shuffles, ldmatrix, mma.sync and
cp.async per the PTX ISA). This module compiles every kernel of internlm_kernels._C, the
torch glue and the bindings with the host compiler and -DIK_CUDA_EMULATION into an
extension that takes CPU tensors and serves backend="cuda" (the ``cuda_backend`` fixture),
then runs the op test bodies of tests/test_attention.py, test_rms_norm.py and test_rotary.py
through the public ops, at sizes the emulation runs quickly. The emulation also race-checks
shared memory (cp.async copies land at their wait; ldmatrix, cp.async and the kernels'
load_shared / store_shared accesses that no barrier or __syncwarp orders fail the launch),
and launches follow the driver's rules: shared memory past the 48 KB of a block not opted in
(static arrays included) or past an H100's opt-in limit, blocks of more than 1024 threads,
and misaligned 16-byte global accesses (load_global / store_global) fail the launch, naming
it. tests/emulation_probe.cpp checks those checks on small cases. Each kernel's largest block
is recorded and, last, checked against the __launch_bounds__ the GPU build compiled in. What
it cannot see: timing, registers (spills: tests/test_cuda_machine_code.py reads them from the
built extension), and memory-model subtleties below barrier granularity; those need the GPU
run.

Runs on any machine with a C++20 compiler and the CUDA headers (CUDA_HOME or /usr/local/cuda);
the first run builds into build/emulation (2-3 minutes on 2 cores).
"""

from __future__ import annotations

import glob
import re
import os

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels import reference
from tests import test_attention as attention_tests
from tests import test_random_configurations as random_tests
from tests import test_rms_norm as rms_tests
from tests import test_rotary as rotary_tests
from tests.helpers import DTYPES, assert_within_eager_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
HAVE_HEADERS = os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_bf16.h"))
pytestmark = pytest.mark.skipif(not HAVE_HEADERS, reason=f"no CUDA headers under {CUDA_HOME} (set CUDA_HOME)")


EMULATION_FLAGS = [
    # C++20 for std::barrier and std::atomic_ref (emulation.h): torch's extension builder
    # defaults to C++17 in older releases (torch 2.11 does), and a later -std flag wins.
    "-std=c++20", "-O1", "-DIK_CUDA_EMULATION", "-Wno-unknown-pragmas",
    # ninja runs the command through a shell: keep the string macros' quotes
    f"""'-DIK_TORCH_VERSION="{torch.__version__}"'""", """'-DIK_CUDA_ARCHS="emulation"'"""]
INCLUDES = [os.path.join(REPO, "csrc", "include"), os.path.join(CUDA_HOME, "include")]


@pytest.fixture(scope="module")
def kernels():
    """The emulated extension: the functions and signatures of internlm_kernels._C."""
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
    return cpp_extension.load(name="internlm_kernels_emulated", sources=sources, build_directory=build,
                              extra_include_paths=INCLUDES, extra_cflags=EMULATION_FLAGS, verbose=False)


@pytest.fixture(scope="module")
def probe():
    """tests/emulation_probe.cpp: small cp.async pipelines, correct and broken."""
    from torch.utils import cpp_extension

    build = os.path.join(REPO, "build", "emulation_probe")
    os.makedirs(build, exist_ok=True)
    return cpp_extension.load(name="internlm_kernels_emulation_probe", build_directory=build,
                              sources=[os.path.join(REPO, "tests", "emulation_probe.cpp")],
                              extra_include_paths=INCLUDES, extra_cflags=EMULATION_FLAGS, verbose=False)


@pytest.mark.parametrize("pattern", ["correct", "refill_with_barrier", "pipelined_reads_retired",
                                     "staged_with_syncwarp"])
def test_race_check_passes_synchronised_pipelines(probe, pattern):
    assert probe.run_probe(pattern) == ""  # "" also means every lane read the values copied


@pytest.mark.parametrize("pattern, message", [
    ("no_wait", r"not yet waited for|before the cp.async.wait_group that retires its own copy"),
    # (which message depends on whether the reader's OS thread ran before or after the copier's)
    ("no_barrier", r"reads bytes \[\d+, \d+\) in barrier interval 0, which no barrier separates from thread \d+'s "
                   r"cp.async \(issued in barrier interval 0, waited in interval 0\)"
                   r"|cp.async into bytes \[\d+, \d+\) may land before thread \d+ read them in the same barrier "
                   r"interval 0"),
    ("refill_without_barrier", r"may land before (other threads|thread \d+) read them in the same barrier interval 1"
                               r"|no barrier separates"),
    ("pipelined_reads_in_flight", r"not yet waited for|before the cp.async.wait_group that retires its own copy"),
    ("staged_without_syncwarp", r"reads bytes \[\d+, \d+\) in barrier interval 0, which no barrier separates from "
                                r"thread \d+'s store in barrier interval 0"
                                r"|store to bytes \[\d+, \d+\) in barrier interval 0 is not ordered after thread \d+"),
    ("other_warp_after_syncwarp", r"no barrier separates from thread \d+'s store"
                                  r"|store to bytes \[\d+, \d+\) in barrier interval 0 is not ordered after thread \d+"),
])
def test_race_check_finds_missing_synchronisation(probe, pattern, message):
    fault = probe.run_probe(pattern)
    assert fault.startswith("shared-memory race in block (0, 0, 0): "), fault
    assert re.search(message, fault), fault


@pytest.mark.parametrize("case, fault", [
    ("static_beside_48k_opted_in", ""),
    ("static_beside_47k_not_opted_in", ""),
    # The RMSNorm backward's launch at N = 4096 on the H200 (2026-11-28): 48 KB of dynamic
    # shared memory beside 512 B of static arrays, not opted in ("invalid argument" there).
    ("static_beside_48k_not_opted_in", r"^invalid value: too much shared memory: 512 B of static __shared__ arrays "
                                       r"beside 49152 B of dynamic shared memory pass the 49152 B a block gets "
                                       r"without opting in \(cudaFuncAttributeMaxDynamicSharedMemorySize\)$"),
    ("dynamic_past_the_opt_in_limit", r"^invalid value: an opt-in to 233472 B of dynamic shared memory, past the "
                                      r"232448 B a block may have"),
    ("blocks_of_1056_threads", r"^invalid configuration: blocks of \(1056, 1, 1\) = 1056 threads \(at most "
                               r"\(1024, 1024, 64\) and 1024 in all\)$"),
    ("blocks_of_64_deep", r"^invalid configuration: blocks of \(1, 1, 128\) = 128 threads"),
    ("blocks_whose_size_wraps_32_bits", r"^invalid configuration: blocks of \(65536, 65536, 1\) = 4294967296 "
                                        r"threads"),
    ("aligned_global_load", ""),
    ("misaligned_global_load", r"^launch failure: misaligned address: a 16-byte global load at an address 8 B past "
                               r"a multiple of 16, by thread 0 of block \(0, 0, 0\)"),
])
def test_emulated_launches_follow_the_drivers_rules(probe, case, fault):
    """What the GPU refuses or faults on, the emulation refuses too, naming it: shared memory
    past what a block may have (static arrays count against the 48 KB of a block not opted
    in), blocks past 1024 threads or a dimension's limit, misaligned 16-byte global accesses.
    A refused launch runs no block (the probe kernel's one global store would show: the
    message ends in "yet a block ran" then, which the anchored patterns reject)."""
    result = probe.run_launch_probe(case)
    assert re.search(fault, result) if fault else result == "", result


@pytest.mark.parametrize("divisor", [*range(1, 66), 96, 127, 128, 129, 255, 1000, 65537, 2**30 - 1, 2**30, 2**31 - 1])
def test_fast_divide_matches_integer_division(probe, divisor):
    """The kernels divide packed rows by the query group with a multiply-high and a shift
    (FastDivisor, common.h). Every numerator of their range's two ends, where the rounding
    of the multiplier would show first."""
    for first, last in [(0, 1 << 17), ((1 << 31) - 1 - (1 << 17), (1 << 31) - 1)]:
        assert probe.fast_divide_mismatch(divisor, first, last) == -1


@pytest.fixture
def cuda_backend(kernels, monkeypatch):
    """backend="cuda" served by the emulated extension on CPU tensors, through the real ops."""
    from internlm_kernels import backends

    device_reason = backends._device_reason
    monkeypatch.setattr(backends, "extension", kernels)
    monkeypatch.setattr(backends, "_device_reason",
                        lambda backend, device: None if backend == "cuda" else device_reason(backend, device))


CPU = torch.device("cpu")

CASES = {
    # name: (batch, seqlen_q, seqlen_k, heads_q, heads_kv, kwargs); small: every CUDA thread is an OS thread
    "mha": (1, 19, 19, 2, 2, {}),
    "gqa3_causal": (1, 21, 21, 3, 1, {"causal": True}),
    "sq_lt_sk_causal": (1, 9, 70, 2, 1, {"causal": True}),  # keys span two 64-key tiles
    "sq_gt_sk_causal": (1, 40, 17, 2, 2, {"causal": True}),  # the first 23 queries see no key
    "window_both": (2, 20, 20, 2, 1, {"window_size": (3, 2)}),
    "window_left_causal": (1, 72, 72, 1, 1, {"causal": True, "window_size": (5, -1)}),
    "scale": (1, 16, 16, 2, 2, {"causal": True, "softmax_scale": 0.3}),
    "mqa": (1, 17, 23, 4, 1, {}),  # no mask, Sq != Sk, 4 query heads on one KV head
    "window_right_only": (1, 18, 26, 2, 2, {"window_size": (-1, 4)}),  # not causal, Sq < Sk
    # 4 key tiles and 3 row tiles: the two-stage rings refill a stage, which the race check watches
    "long_keys_causal": (1, 70, 200, 2, 1, {"causal": True}),
}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_attention_matches_reference(cuda_backend, case, dtype, head_dim):
    batch, sq, sk, hq, hkv, kwargs = CASES[case]
    attention_tests._check(*attention_tests._qkv(batch, sq, sk, hq, hkv, head_dim, dtype, CPU), "cuda", **kwargs)


def test_emulated_every_row_maximum_in_the_first_key_tile(cuda_backend):
    attention_tests.test_every_row_maximum_in_the_first_key_tile("cuda", CPU)


def test_emulated_nan_in_a_query_row_stays_in_that_row(cuda_backend):
    attention_tests.test_nan_in_a_query_row_stays_in_that_row("cuda", CPU)


def test_emulated_negative_softmax_scale(cuda_backend):
    attention_tests.test_negative_softmax_scale("cuda", CPU)


def test_emulated_attention_strided_inputs(cuda_backend):
    attention_tests.test_attention_strided_inputs("cuda", CPU)
    attention_tests.test_attention_backward_of_a_strided_gradient("cuda", CPU)


@pytest.mark.parametrize("causal", [False, True])
def test_emulated_attention_packed_varlen(cuda_backend, causal, monkeypatch):
    attention_tests.test_attention_packed_varlen("cuda", causal, (-1, -1), CPU)
    attention_tests.test_attention_packed_varlen("cuda", causal, (4, -1) if causal else (3, 2), CPU)
    attention_tests.test_attention_varlen_equals_per_sequence_dense("cuda", CPU, monkeypatch)


def test_emulated_attention_packed_batch_of_empty_query_sequences(cuda_backend):
    attention_tests.test_attention_packed_batch_of_empty_query_sequences("cuda", CPU)


@pytest.mark.parametrize("wrong", ["past_the_end", "below_zero"])
def test_emulated_attention_packed_offsets_out_of_range_are_clamped(cuda_backend, wrong):
    attention_tests.test_attention_packed_offsets_out_of_range_are_clamped("cuda", wrong, CPU)


def test_emulated_attention_nan_in_a_query_row_is_that_rows_nan(cuda_backend):
    attention_tests.test_attention_nan_in_a_query_row_is_that_rows_nan("cuda", CPU)


@pytest.mark.parametrize("case", ["causal", "window", "varlen"])
def test_emulated_cuda_triton_reference_three_way(cuda_backend, case):
    """Both backends' own kernel code on the CPU: the CUDA kernels under this emulation, the
    Triton kernels under the Triton interpreter, cross-checked against each other and fp64."""
    attention_tests.cuda_triton_reference_three_way(case, CPU, 77, 4, (9, 3), [0, 1, 30, 31, 77])


def test_emulated_backward_is_deterministic(cuda_backend):
    q, k, v = (t.requires_grad_(True) for t in attention_tests._qkv(1, 40, 40, 4, 2, 64, torch.bfloat16, CPU))
    grad = torch.randn_like(q)
    runs = [torch.autograd.grad(ik.flash_attention(q, k, v, causal=True, deterministic=True, backend="cuda"),
                                (q, k, v), grad)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_emulated_global_deterministic_switch_selects_the_dq_kernel(cuda_backend, monkeypatch):
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ", "1")  # requested, and overridden below
    q, k, v = (t.requires_grad_(True) for t in attention_tests._qkv(1, 150, 150, 2, 1, 64, torch.bfloat16, CPU))
    grad = torch.randn_like(q)

    def dq(**kwargs):
        return torch.autograd.grad(ik.flash_attention(q, k, v, causal=True, backend="cuda", **kwargs), q, grad)[0]

    by_kernel, by_atomics = dq(deterministic=True), dq()
    assert not torch.equal(by_kernel, by_atomics), "the two dQ paths sum in different orders"
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(dq(), by_kernel)
    finally:
        torch.use_deterministic_algorithms(previous)


# The grid above runs the default backward (a dK/dV kernel, then the dQ kernel with 16 rows per
# warp); these run its other dQ paths over the cases that stress their tiling and masks: the
# atomic dQ inside the dK/dV kernel, and the dQ kernel's 32-row warp layout.
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", ["gqa3_causal", "sq_gt_sk_causal", "window_both", "long_keys_causal"])
def test_emulated_atomic_dq_backward_matches_reference(cuda_backend, case, head_dim, monkeypatch):
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ", "1")
    batch, sq, sk, hq, hkv, kwargs = CASES[case]
    q, k, v = attention_tests._qkv(batch, sq, sk, hq, hkv, head_dim, torch.bfloat16, CPU)
    attention_tests._check(q, k, v, "cuda", **kwargs)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", ["gqa3_causal", "sq_gt_sk_causal", "window_both", "long_keys_causal"])
def test_emulated_dq_warp_layouts_agree(cuda_backend, case, head_dim, monkeypatch):
    batch, sq, sk, hq, hkv, kwargs = CASES[case]
    attention_tests.dq_warp_layouts_agree(CPU, monkeypatch, batch, sq, sk, hq, hkv, head_dim, **kwargs)


@pytest.mark.parametrize("dq_path", [("INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ", "1"),
                                     ("INTERNLM_KERNELS_CUDA_BWD_DQ_WARP_ROWS", "32")], ids=["atomic", "rows32"])
def test_emulated_backward_dq_paths_packed_varlen(cuda_backend, dq_path, monkeypatch):
    # test_attention_packed_varlen's sequences (empty ones, padding rows) through the other dQ paths.
    monkeypatch.setenv(*dq_path)
    cu_q = torch.tensor([0, 3, 3, 4, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 8, 30], dtype=torch.int32)
    q, k, v = attention_tests._qkv(None, 22, 31, 6, 2, 64, torch.bfloat16, CPU, packed=True)
    _, (dq, _, _) = attention_tests._check(q, k, v, "cuda", causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert torch.equal(dq[20:], torch.zeros_like(dq[20:])), "padding query rows get zero gradients"


def test_emulated_bench_backward_variants_reach_the_backward(cuda_backend, kernels, monkeypatch):
    """Each benchmark provider of a CUDA backward layout has its switches, and no other, set
    when the backward launches (the glue reads them there); set around the forward alone, the
    row would time the default backward under another name."""
    from internlm_kernels import backends
    from internlm_kernels.bench import cases

    seen = {}
    switches = {switch for settings in cases.CUDA_BACKWARD_VARIANTS.values() for switch in settings}

    class Probe:  # the emulated extension, recording the switches at each backward launch
        def __getattr__(self, name):
            return getattr(kernels, name)

        def attention_bwd(self, *args):
            seen.update({switch: os.environ.get(switch) for switch in switches})
            return kernels.attention_bwd(*args)

    monkeypatch.setattr(backends, "extension", Probe())
    for switch in switches:
        monkeypatch.delenv(switch, raising=False)
    case = cases.attention_case(CPU, torch.bfloat16, 1, 40, 2, 1, 128, True, ["cuda"], backward=True)
    assert set(case.providers) == {"cuda", *cases.CUDA_BACKWARD_VARIANTS}
    for name, settings in cases.CUDA_BACKWARD_VARIANTS.items():
        seen.clear()
        case.providers[name]()
        expected = {switch: settings.get(switch) for switch in switches}
        assert seen == expected, f"{name}: the switches at the backward's launch were {seen}, expected {expected}"
    assert all(os.environ.get(switch) is None for switch in switches), "the switches are restored after each call"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_emulated_atomic_dq_changes_only_dq(cuda_backend, head_dim, monkeypatch):
    # 3 key tiles, 2 heads of a group: several programs add into the same dQ rows.
    attention_tests.atomic_dq_changes_only_dq(CPU, monkeypatch, 1, 150, 2, 1, head_dim, causal=True)


@pytest.mark.parametrize("case,dtype", [("gqa3_causal", torch.bfloat16), ("sq_lt_sk_causal", torch.bfloat16),
                                        ("window_both", torch.bfloat16), ("long_keys_causal", torch.bfloat16),
                                        ("long_keys_causal", torch.float16)], ids=str)
@pytest.mark.parametrize("atomic_dq", [False, True], ids=["dq_kernel", "atomic_dq"])
def test_emulated_backward_key_blocks_agree(cuda_backend, case, dtype, atomic_dq, monkeypatch):
    # long_keys_causal: 2 tiles of 128 keys x 3 tiles of 64 rows, so the Q / dO ring refills
    batch, sq, sk, hq, hkv, kwargs = CASES[case]
    attention_tests.backward_key_blocks_agree(CPU, monkeypatch, batch, sq, sk, hq, hkv, dtype=dtype,
                                              atomic_dq=atomic_dq, **kwargs)


@pytest.mark.parametrize("atomic_dq", ["0", "1"], ids=["dq_kernel", "atomic_dq"])
def test_emulated_shared_scores_backward_packed_varlen(cuda_backend, atomic_dq, monkeypatch):
    # The 128-key dK/dV layout over packed sequences: lengths (q, k) (3, 5), (0, 2), (1, 1),
    # (16, 22), then 2 padding query rows and 1 padding key, which get zero gradients.
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ", atomic_dq)
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_KEY_BLOCK", "128")
    cu_q = torch.tensor([0, 3, 3, 4, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 8, 30], dtype=torch.int32)
    q, k, v = attention_tests._qkv(None, 22, 31, 6, 2, 128, torch.bfloat16, CPU, packed=True)
    _, (dq, dk, dv) = attention_tests._check(q, k, v, "cuda", causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert torch.equal(dq[20:], torch.zeros_like(dq[20:]))
    assert torch.equal(dk[30:], torch.zeros_like(dk[30:])) and torch.equal(dv[30:], torch.zeros_like(dv[30:]))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", ["gqa3_causal", "sq_gt_sk_causal", "window_both", "long_keys_causal"])
def test_emulated_forward_warp_layouts_agree(cuda_backend, case, head_dim, monkeypatch):
    batch, sq, sk, hq, hkv, kwargs = CASES[case]
    attention_tests.forward_warp_layouts_agree(CPU, monkeypatch, batch, sq, sk, hq, hkv, head_dim, **kwargs)


@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_emulated_kvcache_append_and_attend(cuda_backend, new_tokens, rotary):
    attention_tests.test_kvcache_append_and_attend("cuda", new_tokens, rotary, CPU)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_emulated_kvcache_rotary_inside_the_kernels(cuda_backend, interleaved, partial):
    attention_tests.test_kvcache_rotary_fused_equals_rotary_then_attention("cuda", interleaved, partial, CPU)


def test_emulated_kvcache_rotary_past_the_table_is_nan(cuda_backend):
    attention_tests.test_kvcache_rotary_past_the_table_is_nan("cuda", CPU)


@pytest.mark.parametrize("mask", sorted(attention_tests.KVCACHE_MASKS))
def test_emulated_kvcache_masks_layouts_and_splits(cuda_backend, mask):
    attention_tests.test_kvcache_masks_layouts_and_splits("cuda", mask, "fused", 1, CPU)


@pytest.mark.parametrize("page_size", [5, 16, 64])
def test_emulated_kvcache_paged(cuda_backend, page_size):
    for case in ("append_rotary", "window", "decode_only"):
        attention_tests.test_kvcache_paged_equals_contiguous("cuda", page_size, case, CPU)
    if page_size == 5:
        attention_tests.test_kvcache_paged_lengths_out_of_range_are_nan("cuda", CPU)
        attention_tests.test_kvcache_paged_table_entries_outside_the_pool_are_clamped("cuda", CPU)
        for pages, window in ((1, (-1, -1)), (7, (30, -1))):
            attention_tests.test_kvcache_paged_one_sequence_over_many_splits("cuda", pages, window, CPU)


@pytest.mark.parametrize("cache_dtype", attention_tests.FP8_CACHES)
@pytest.mark.parametrize("scales, layout, dtype, head_dim", [
    ("none", "contiguous", torch.bfloat16, 64), ("per_head", "paged", torch.float16, 64),
    ("one_value", "contiguous", torch.float16, 128), ("float", "paged", torch.bfloat16, 128)])
def test_emulated_kvcache_fp8(cuda_backend, cache_dtype, scales, layout, dtype, head_dim):
    attention_tests.test_kvcache_fp8("cuda", cache_dtype, scales, layout, dtype, CPU, head_dim=head_dim)


def test_emulated_fp8_glue_checks_run_before_any_launch(kernels):
    """The extension's own refusals for fp8 caches (the ops layer refuses most of these first)."""
    q = torch.randn(1, 1, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 2, 64, dtype=torch.bfloat16)
    cache = torch.randn(1, 32, 2, 64).to(torch.float8_e4m3fn)
    lengths = torch.zeros(1, dtype=torch.int32)
    one = torch.ones(1)

    def decode(k_cache, v_cache, k_scale=one, v_scale=one):
        kernels.attention_decode(q, k_cache, v_cache, torch.empty_like(q), lengths, 0, 1.0, True, (-1, -1), None,
                                 None, False, k_scale=k_scale, v_scale=v_scale)

    with pytest.raises(RuntimeError, match=r"fp8 caches need k_scale \(float32, 1 or 2 values\)"):
        kernels.kvcache_append(k, k, cache, cache.clone(), lengths, None, None, False)
    with pytest.raises(RuntimeError, match="k_scale / v_scale apply to fp8 caches, got BFloat16 caches"):
        kernels.kvcache_append(k, k, k.expand(1, 32, 2, 64).contiguous(), k.expand(1, 32, 2, 64).contiguous(),
                               lengths, None, None, False, k_scale=one, v_scale=one)
    with pytest.raises(RuntimeError, match=r"v_scale must be contiguous with 1 or 2 \(KV heads\) values, got \[3\]"):
        decode(cache, cache.clone(), v_scale=torch.ones(3))
    with pytest.raises(RuntimeError, match="k_scale must be float32, got Double"):
        decode(cache, cache.clone(), k_scale=torch.ones(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="v_cache has dtype Float8_e5m2, k_cache has Float8_e4m3fn"):
        decode(cache, cache.to(torch.float8_e5m2))
    strided = torch.randn(1, 32, 2, 72).to(torch.float8_e4m3fn)[..., :64]  # rows 72 entries apart
    with pytest.raises(RuntimeError, match="fp8 k_cache must start 16-byte aligned with strides that are multiples of "
                                           "16 entries"):
        decode(strided, cache)
    with pytest.raises(RuntimeError, match=r"attention_decode \(cuda\): q must be 4-D, got shape \[1, 4, 64\]"):
        kernels.attention_decode(q[0], cache, cache, torch.empty_like(q[0]), lengths, 0, 1.0, True, (-1, -1), None,
                                 None, False, k_scale=one, v_scale=one)


@pytest.mark.parametrize("cache_dtype", attention_tests.FP8_CACHES)
def test_emulated_kvcache_fp8_rounding_over_the_whole_range(cuda_backend, cache_dtype):
    attention_tests.test_kvcache_fp8_rounding_over_the_whole_range("cuda", cache_dtype, CPU)


def test_emulated_rotary_refuses_more_items_than_its_grid_holds_before_any_launch(cuda_backend):
    """Past the rotary grid's z extent the op says so (and "auto" takes Triton) before the glue."""
    q = torch.empty(1, 1, 65534, 8192)  # 2 GiB of address space, never touched: refused before any launch
    tables = torch.ones(4, 4096)
    with pytest.raises(RuntimeError, match="the cuda kernel takes at most 65535 blocks of heads x rotary pairs per "
                                           "token, got 131068"):
        ik.apply_rotary(q, None, tables, tables, inplace=True, backend="cuda")


def test_emulated_kvcache_refuses_a_decode_too_large_before_the_append(cuda_backend):
    """2^30 query rows (positions x group) pass the append's checks but not the decode's: the
    op refuses the call before the append writes the caches."""
    q = torch.randn(1, 1, 8, 64, dtype=torch.bfloat16).expand(1, 2**27, 8, 64)  # a stride-0 view: no memory
    k_cache, v_cache = (torch.randn(1, 64, 1, 64, dtype=torch.bfloat16) for _ in range(2))
    k_new, v_new = (torch.randn(1, 2, 1, 64, dtype=torch.bfloat16) for _ in range(2))
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(RuntimeError, match="the cuda decode takes at most"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=5, backend="cuda")
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "the refused call wrote the caches"
    # 65536 KV heads: the append takes them (heads x head_dim below 2^30), the decode's do not.
    heads = 65536
    q = torch.randn(1, 1, 1, 64, dtype=torch.bfloat16).expand(1, 1, heads, 64)
    k_cache, v_cache = (torch.randn(1, 4, heads, 64, dtype=torch.bfloat16) for _ in range(2))
    k_new = torch.randn(1, 1, 1, 64, dtype=torch.bfloat16).expand(1, 1, heads, 64)
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(RuntimeError, match=f"the cuda decode takes at most 65535 KV heads, got {heads}"):
        ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=k_new, v=k_new, cache_seqlens=1, backend="cuda")
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "the refused call wrote the caches"


def test_emulated_kvcache_decode_window_and_overflow(cuda_backend):
    attention_tests.test_kvcache_decode_without_new_entries_and_with_window("cuda", CPU)
    attention_tests.test_kvcache_overflow_is_nan_not_a_wild_write("cuda", CPU)
    attention_tests.test_kvcache_negative_length_is_nan_not_a_wild_write("cuda", CPU)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_emulated_decode_over_several_splits(cuda_backend, head_dim):
    """A 300-slot cache: the emulated GPU runs 4 SMs x 3 decode programs, so the decode splits
    it and the combine kernel merges the parts; 2 positions x group 4."""
    dtype = torch.bfloat16
    k_cache, v_cache = (torch.randn(3, 300, 2, head_dim, dtype=dtype) for _ in range(2))
    lengths = torch.tensor([0, 37, 298], dtype=torch.int32)
    q = torch.randn(3, 2, 8, head_dim, dtype=dtype)
    k_new, v_new = (torch.randn(3, 2, 2, head_dim, dtype=dtype) for _ in range(2))
    expected = reference.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k=k_new, v=v_new,
                                                cache_seqlens=lengths)
    exact = reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), k=k_new.double(),
                                             v=v_new.double(), cache_seqlens=lengths)
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lengths,
                                              backend="cuda")
    assert_within_eager_error([out], [expected], [exact], dtype, 2.0, "decode over splits")


def test_emulated_glue_checks_run_before_any_launch(kernels, monkeypatch):
    q = torch.randn(1, 8, 4, 64, dtype=torch.float16)
    k = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    lse = torch.empty(1, 4, 8)
    with pytest.raises(RuntimeError, match="the cuda kernels have head_dim 64 and 128, got 32"):
        kernels.attention_fwd(q[..., :32], k[..., :32], k[..., :32], torch.empty(1, 8, 4, 32, dtype=torch.float16),
                              lse, None, None, 1.0, True, (-1, -1))
    unaligned = torch.randn(1, 8, 2, 65, dtype=torch.float16)[..., 1:]
    with pytest.raises(RuntimeError, match="k must start 16-byte aligned"):
        kernels.attention_fwd(q, unaligned, k, torch.empty_like(q), lse, None, None, 1.0, True, (-1, -1))
    with monkeypatch.context() as patch:
        patch.setenv("INTERNLM_KERNELS_CUDA_FWD_WARP_ROWS", "24")
        with pytest.raises(RuntimeError, match="INTERNLM_KERNELS_CUDA_FWD_WARP_ROWS must be 32 or 16, got '24'"):
            kernels.attention_fwd(q, k, k, torch.empty_like(q), lse, None, None, 1.0, True, (-1, -1))
        patch.setenv("INTERNLM_KERNELS_CUDA_BWD_KEY_BLOCK", "256")
        bwd_args = (q, q, k, k, q, lse, torch.empty_like(q), torch.empty_like(k), torch.empty_like(k), None, None, 1.0,
                    True, (-1, -1), False)
        with pytest.raises(RuntimeError, match="INTERNLM_KERNELS_CUDA_BWD_KEY_BLOCK must be 64 or 128, got '256'"):
            kernels.attention_bwd(*bwd_args)
        patch.delenv("INTERNLM_KERNELS_CUDA_BWD_KEY_BLOCK")
        patch.setenv("INTERNLM_KERNELS_CUDA_BWD_DQ_WARP_ROWS", "64")
        with pytest.raises(RuntimeError, match="INTERNLM_KERNELS_CUDA_BWD_DQ_WARP_ROWS must be 16 or 32, got '64'"):
            kernels.attention_bwd(*bwd_args)
        patch.delenv("INTERNLM_KERNELS_CUDA_BWD_DQ_WARP_ROWS")
        patch.setenv("INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ", "yes")
        with pytest.raises(RuntimeError, match="INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ must be 0 or 1, got 'yes'"):
            kernels.attention_bwd(*bwd_args)
    lengths = torch.zeros(1, dtype=torch.int32)
    cos = torch.ones(16, 32)
    with pytest.raises(RuntimeError, match="does not support rotary_cos of dtype Half"):
        kernels.kvcache_append(k, k, k, k, lengths, cos.half(), cos.half(), False)
    with pytest.raises(RuntimeError, match="rotary_dim 160 exceeds head_dim 64"):
        kernels.attention_decode(q, k, k, torch.empty_like(q), lengths, 0, 1.0, True, (-1, -1), torch.ones(4, 80),
                                 torch.ones(4, 80), False)
    with pytest.raises(RuntimeError, match="pass rotary_cos and rotary_sin together"):
        kernels.attention_decode(q, k, k, torch.empty_like(q), lengths, 0, 1.0, True, (-1, -1), cos, None, False)
    with pytest.raises(RuntimeError, match=r"rotary_cos must hold at least one position, got shape \[0, 32\]"):
        kernels.attention_decode(q, k, k, torch.empty_like(q), lengths, 0, 1.0, True, (-1, -1), cos[:0], cos[:0],
                                 False)
    # The rotary grid's z axis holds a token's work items (2 heads x a 16-byte chunk of the
    # rotary half), 256 a block: 65534 fp32 heads rotating 4096 pairs take 131068 blocks.
    wide = torch.randn(1, 1, 1, 8192).expand(1, 1, 65534, 8192)  # stride-0 heads: no memory
    none = wide[:, :, :0]
    tables = torch.ones(4, 4096)
    with pytest.raises(RuntimeError, match=r"too many heads x rotary pairs per token for the grid: 131068 blocks"):
        kernels.rotary(wide, none, wide, none, tables, tables, None, None, 0, None, False, False, True)
    with pytest.raises(RuntimeError, match=r"cache_seqlens must be contiguous \(B,\) = \(1,\)"):
        kernels.kvcache_append(k, k, k, k, torch.zeros(2, dtype=torch.int32), None, None, False)


# --------------------------------------------------------------------------------------
# RMSNorm and rotary: the op test bodies, with backend="cuda" on the emulated kernels
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", rms_tests.SHAPES, ids=str)
def test_emulated_rms_norm_matches_reference(cuda_backend, dtype, shape):
    rms_tests.test_rms_norm_matches_reference("cuda", dtype, shape, CPU)


@pytest.mark.parametrize("layout", ["row_slice", "transposed_3d", "permuted_4d", "batched_rows"])
def test_emulated_rms_norm_non_contiguous_rows(cuda_backend, layout):
    for dtype in DTYPES:
        rms_tests.test_rms_norm_non_contiguous_rows("cuda", dtype, layout, CPU)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (19, 123), (2, 5120), (2, 20000)], ids=str)
@pytest.mark.parametrize("residual_in_fp32", [False, True], ids=["res_dtype", "res_fp32"])
def test_emulated_fused_add_rms_norm_matches_reference(cuda_backend, dtype, shape, residual_in_fp32):
    rms_tests.test_fused_add_rms_norm_matches_reference("cuda", dtype, shape, residual_in_fp32, CPU)


# The forward copies its weight chunks to shared memory (cp.async) when the weight is 16-byte
# aligned and the row whole chunks (1000 and 5120 columns); 123 columns load it directly.
# INTERNLM_KERNELS_CUDA_NORM_FWD_STAGE_WEIGHT=0 turns the copy off. An fp32 weight under a
# 16-bit x takes 32-byte slots (two copies each).
@pytest.mark.parametrize("stage", ["1", "0"], ids=["staged", "unstaged"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float32)], ids=["bf16", "bf16_fp32_weight", "fp32"])
@pytest.mark.parametrize("shape", [(19, 123), (3, 1000), (2, 5120), (9, 64)], ids=str)
def test_emulated_rms_norm_forward_weight_staging(cuda_backend, stage, dtypes, shape, monkeypatch):
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_NORM_FWD_STAGE_WEIGHT", stage)
    x, weight = rms_tests._inputs(shape, dtypes[0], CPU, weight_dtype=dtypes[1])
    rms_tests._check_rms_norm(x, weight, "cuda")
    rms_tests._check_fused(x, torch.randn_like(x), weight.to(x.dtype), "cuda", residual_in_fp32=False)


@pytest.mark.parametrize("case", ["bf16_rows_fp32_weight_16384", "fp32_8192", "weight_off_alignment_4096"])
def test_emulated_rms_norm_wide_rows_and_weight_layouts(cuda_backend, case):
    rms_tests.test_rms_norm_wide_rows_and_weight_layouts("cuda", case, CPU)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided_rows", "wide_looped", "unmergeable"])
def test_emulated_fused_add_rms_norm_inplace(cuda_backend, dtype, layout):
    # In place, out is x and residual_out is residual; "strided_rows" (160 columns) stages the
    # weight, "wide_looped" takes the two-pass kernel.
    rms_tests.test_fused_add_rms_norm_inplace("cuda", dtype, layout, CPU)


def test_emulated_rms_norm_forward_weight_staging_switch_is_checked(kernels, monkeypatch):
    x = torch.randn(1, 2, 64)
    monkeypatch.setenv("INTERNLM_KERNELS_CUDA_NORM_FWD_STAGE_WEIGHT", "yes")
    with pytest.raises(RuntimeError, match="INTERNLM_KERNELS_CUDA_NORM_FWD_STAGE_WEIGHT must be 1 or 0, got 'yes'"):
        kernels.rms_norm_fwd(x, None, torch.ones(64), torch.empty_like(x), None, torch.empty(2), 1e-6)


# 67 rows on the emulation's 4-SM grid: each persistent block of the backward walks several
# rows, so the aligned kernel's staging of the next row is used (hidden 4096: rows of whole
# 16-byte chunks; 4100: the general kernel).
@pytest.mark.parametrize("hidden", [4096, 4100])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_emulated_rms_norm_backward_several_rows_per_block(cuda_backend, fused, hidden):
    x, weight = rms_tests._inputs((67, hidden), torch.bfloat16, CPU)
    if fused:
        rms_tests._check_fused(x, torch.randn_like(x), weight, "cuda", residual_in_fp32=False)
    else:
        rms_tests._check_rms_norm(x, weight, "cuda")


def test_emulated_fused_add_rms_norm_fp32_residual_stream_and_strides(cuda_backend):
    rms_tests.test_fused_add_rms_norm_fp32_residual_stream_and_strides("cuda", CPU)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_fused_add_rms_norm_mixed_dtypes(cuda_backend, dtype):
    for residual_in_fp32 in (False, True):
        rms_tests.test_fused_add_rms_norm_fp32_weight_promotes_like_hf("cuda", dtype, residual_in_fp32, CPU)
    for width in (123, 4096):  # the register and the shared-memory-staged paths
        rms_tests.test_fused_add_rms_norm_inplace_fp32_residual_stream("cuda", dtype, width, CPU)


def test_emulated_rms_norm_backward_branches_without_some_gradients(cuda_backend):
    for dtype in (torch.float32, torch.bfloat16):
        for residual_in_fp32 in (False, True):
            rms_tests.test_gradient_through_the_normed_output_only("cuda", dtype, (5, 64), residual_in_fp32, CPU)
        for shape in ((3, 40), (5, 8200)):
            rms_tests.test_frozen_weight_gets_no_gradient("cuda", dtype, shape, CPU)


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
@pytest.mark.parametrize("rotary_dim", [32, 16, 10], ids=["full", "partial", "partial_odd"])
def test_emulated_rotary_matches_reference(cuda_backend, dtype, interleaved, rotary_dim):
    rotary_tests.test_rotary_matches_reference("cuda", dtype, interleaved, rotary_dim, CPU)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_emulated_rotary_more_chunks_than_threads(cuda_backend, interleaved):
    # fp32, head_dim 256: 32 chunks per head; 9 q + 8 k heads in groups of 2 (the last q group
    # has one head) make 9 x 32 = 288 items, past the 256 threads of a block, so the token
    # takes two blocks.
    q, k = rotary_tests._qk(1, 3, 9, 8, 256, torch.float32, CPU)
    cos, sin = ik.rotary_cos_sin(8, 256, base=1e4, device=CPU)
    rotary_tests._check(q, k, cos, sin, "cuda", interleaved=interleaved, seqlen_offsets=2)


@pytest.mark.parametrize("positions", ["per_batch", "shared", "offsets_tensor"])
@pytest.mark.parametrize("layout", ["half_full_d32", "interleaved_partial_d80"])
def test_emulated_rotary_positions(cuda_backend, positions, layout):
    for dtype in DTYPES:
        rotary_tests.test_rotary_positions("cuda", positions, dtype, layout, CPU)


def test_emulated_rotary_packed_varlen(cuda_backend):
    rotary_tests.test_rotary_packed_varlen("cuda", CPU)
    rotary_tests.test_rotary_packed_with_position_ids("cuda", CPU)


def test_emulated_rotary_strided_inplace_and_out_of_table(cuda_backend):
    rotary_tests.test_rotary_strided_views("cuda", CPU)
    for tables in ("row_strided", "bfloat16"):
        rotary_tests.test_rotary_tables_in_other_dtypes_and_row_strides("cuda", tables, CPU)
    rotary_tests.test_rotary_inplace("cuda", CPU)
    rotary_tests.test_positions_outside_table_give_nan("cuda", CPU)
    rotary_tests.test_zero_size("cuda", CPU)
    for inplace in (False, True):
        rotary_tests.test_zero_width_tables_rotate_nothing("cuda", inplace, CPU)


# The seeded random configurations of tests/test_random_configurations.py, same draws.
@pytest.mark.parametrize("seed", random_tests.SEEDS)
def test_emulated_random_configurations(cuda_backend, seed):
    random_tests.test_random_attention("cuda", seed, CPU)
    random_tests.test_random_kvcache("cuda", seed, CPU)
    random_tests.test_random_rms_norm("cuda", seed, CPU)
    random_tests.test_random_rotary("cuda", seed, CPU)


def test_emulated_modules_and_opchecks(cuda_backend):
    """The nn modules on the CUDA kernels, and torch.library's opcheck of their custom ops
    (fake implementations, autograd registration, schema) with the CUDA backend."""
    rms_tests.test_rmsnorm_module("cuda", CPU)
    rotary_tests.test_rotary_module("cuda", CPU)
    attention_tests.test_attention_module("cuda", CPU)
    rms_tests.test_opcheck("cuda", CPU)
    rms_tests.test_fused_add_rms_norm_inplace_opcheck("cuda", CPU)
    rotary_tests.test_opcheck("cuda", CPU)


@pytest.mark.parametrize("head_dim", [32, 80, 256])
def test_emulated_attention_head_dims_without_a_cuda_kernel(cuda_backend, head_dim):
    attention_tests.test_attention_head_dims("cuda", head_dim, CPU)


def test_emulated_cuda_refusals_say_why(cuda_backend):
    """Calls the CUDA kernels do not take, asked of backend="cuda", raise before any launch
    and name the reason ("auto" gives them to Triton)."""
    bf16 = torch.bfloat16
    x = torch.randn(4, 64, dtype=bf16)
    with pytest.raises(RuntimeError, match="take weight in x's dtype .* or float32, got torch.float16"):
        ik.rms_norm(x, torch.ones(64, dtype=torch.float16), backend="cuda")
    q, k = torch.randn(1, 4, 2, 64, dtype=bf16), torch.randn(1, 4, 1, 64, dtype=bf16)
    cos, sin = ik.rotary_cos_sin(8, 64)
    with pytest.raises(RuntimeError, match="float32 cos/sin tables, got torch.bfloat16"):
        ik.apply_rotary(q, k, cos.to(bf16), sin.to(bf16), backend="cuda")
    cache = torch.randn(1, 8, 1, 64, dtype=bf16)
    with pytest.raises(RuntimeError, match="float32 rotary tables, got torch.bfloat16"):
        ik.flash_attention_with_kvcache(q[:, :1], cache, cache.clone(), cache_seqlens=2, rotary_cos=cos.to(bf16),
                                        rotary_sin=sin.to(bf16), backend="cuda")
    unaligned = torch.randn(4 * 2 * 64 + 1, dtype=bf16)[1:].view(1, 4, 2, 64)
    with pytest.raises(RuntimeError, match="16-byte aligned inputs"):
        ik.flash_attention(unaligned, k, k, backend="cuda")
    with pytest.raises(RuntimeError, match="float16 or bfloat16, got torch.float32"):
        ik.flash_attention(q.float(), k.float(), k.float(), backend="cuda")
    # the glue's own checks of a block table (the ops layer checks first when called through it)
    from internlm_kernels import backends
    pages, lengths = torch.randn(4, 4, 1, 64, dtype=bf16), torch.tensor([2], dtype=torch.int32)
    one_query, out = q[:, :1], torch.empty_like(q[:, :1])
    decode = (one_query, pages, pages.clone(), out, lengths, 0, 0.125, True, (-1, -1), None, None, False)
    for table, words in ((torch.tensor([[2, 0]]), "block_table of dtype Long"),
                         (torch.tensor([[2, 0], [1, 3]], dtype=torch.int32), "block_table must be \\(B, max_blocks\\)"),
                         (torch.tensor([[2, 0, 1, 3]], dtype=torch.int32)[:, ::2], "contiguous last dim")):
        with pytest.raises(RuntimeError, match=words):
            backends.extension.attention_decode(*decode, block_table=table)
    column = torch.tensor([[3], [1]], dtype=torch.int32).T.contiguous().T[:1]  # (1, 1): any last stride
    backends.extension.attention_decode(*decode, block_table=column)
    torch.testing.assert_close(out, reference.attention_with_kvcache(one_query, pages, pages, cache_seqlens=lengths,
                                                                     block_table=column), rtol=2e-2, atol=2e-2)


def test_emulated_auto_keeps_paged_caches_on_triton_until_a_gpu_has_run_them(cuda_backend, monkeypatch):
    """"auto" gives KV-cache calls to the CUDA kernels, but paged ones to Triton: the CUDA
    paged path has run only here. backend="cuda" (or INTERNLM_KERNELS_BACKEND=cuda) runs it."""
    from internlm_kernels.ops import attention as attention_ops
    chosen = []
    launchers = attention_ops.kernels

    def recording(backend, op):
        chosen.append(backend)
        return launchers(backend, op)

    monkeypatch.setattr(attention_ops, "kernels", recording)
    q = torch.randn(1, 1, 2, 64, dtype=torch.bfloat16)
    cache = torch.randn(1, 8, 1, 64, dtype=torch.bfloat16)
    pages, table = torch.randn(3, 4, 1, 64, dtype=torch.bfloat16), torch.tensor([[2, 0]], dtype=torch.int32)
    ik.flash_attention_with_kvcache(q, cache, cache.clone(), cache_seqlens=5)
    ik.flash_attention_with_kvcache(q, pages, pages.clone(), cache_seqlens=5, block_table=table)
    ik.flash_attention_with_kvcache(q, pages, pages.clone(), cache_seqlens=5, block_table=table, backend="cuda")
    monkeypatch.setenv("INTERNLM_KERNELS_BACKEND", "cuda")
    ik.flash_attention_with_kvcache(q, pages, pages.clone(), cache_seqlens=5, block_table=table)
    assert chosen == ["cuda", "triton", "cuda", "cuda"]



# Last in this module on purpose: in a full run it checks every launch the module's tests made.
def test_emulated_launches_stay_within_each_kernels_compiled_thread_bound(cuda_backend, kernels, monkeypatch):
    """__launch_bounds__ is compiled away under the emulation, so a launch with more threads
    than a kernel's bound (refused on the GPU: "too many resources requested for launch")
    would pass here. The emulation records each kernel's largest block; every launch this
    process made (all of this module's, when it runs whole; at least the calls below, each
    op's widest blocks) must fit the bound the GPU build compiled in (EIATTR_MAX_THREADS,
    read from internlm_kernels._C). Kernels without a bound (rotary: __maxnreg__) are not
    checked."""
    import importlib.util

    from tests.test_cuda_machine_code import compiled_thread_bounds

    spec = importlib.util.find_spec("internlm_kernels._C")
    if spec is None or spec.origin is None:
        pytest.skip("internlm_kernels._C is not built here (its compiled bounds are the reference)")
    for shape, dtype in (((3, 8192), torch.bfloat16), ((2, 20000), torch.bfloat16), ((2, 16384), torch.float32)):
        x, weight = rms_tests._inputs(shape, dtype, CPU)
        rms_tests._check_rms_norm(x, weight, "cuda")
        rms_tests._check_fused(x, torch.randn_like(x), weight, "cuda", residual_in_fp32=False)
    for key_block in ("64", "128"):
        monkeypatch.setenv("INTERNLM_KERNELS_CUDA_BWD_KEY_BLOCK", key_block)
        q, k, v = (torch.randn(1, 40, heads, 128, dtype=torch.bfloat16, requires_grad=True) for heads in (2, 1, 1))
        ik.flash_attention(q, k, v, causal=True, backend="cuda").sum().backward()
    with torch.no_grad():
        ik.flash_attention_with_kvcache(torch.randn(1, 1, 2, 64, dtype=torch.bfloat16),
                                        torch.randn(1, 70, 1, 64, dtype=torch.bfloat16),
                                        torch.randn(1, 70, 1, 64, dtype=torch.bfloat16), cache_seqlens=66,
                                        backend="cuda")

    bounds: dict[str, int] = {}
    for (_, symbol), threads in compiled_thread_bounds(spec.origin).items():
        bounds[symbol] = min(bounds.get(symbol, threads), threads)
    # This library's kernels (the emulation's launch records are shared with the probe's).
    ours = os.path.realpath(kernels.__file__)
    launched = {symbol: threads for library, symbol, threads in kernels.emulated_launches()
                if os.path.realpath(library) == ours}
    unnamed_or_unbounded = sorted(s for s in launched if s not in bounds and "rotary_kernel" not in s)
    assert not unnamed_or_unbounded, f"launched kernels without a compiled bound (or name): {unnamed_or_unbounded}"
    too_large = [f"{symbol}: blocks of {threads} threads, compiled for at most {bounds[symbol]}"
                 for symbol, threads in sorted(launched.items()) if symbol in bounds and threads > bounds[symbol]]
    assert not too_large, "\n".join(too_large)
    assert any("rms_norm" in s for s in launched) and any("attention_bwd_dkdv" in s for s in launched)
