"""One call of each CUDA C++ kernel at the benchmark's shapes, for Nsight Compute; and of the
Triton kernels where Triton measured faster, so the two profiles can be compared.

    ncu --profile-from-start off --clock-control none ... python scripts/profile_kernels.py

(`bash scripts/gpu_check.sh OUT profile` runs it so.) Each op runs once outside the profiled
range (allocations, first-call setup), then once between cudaProfilerStart and Stop, so ncu
sees only the measured launches: the hardware counters that say why a kernel is where it is
against the copy bandwidth or the tensor-core rate (DRAM throughput, achieved occupancy,
warp stalls). Needs a GPU and the built extension.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict

import torch

def _backward_variant_cases() -> Dict[str, Dict[str, str]]:
    """The CUDA attention backward's selectable layouts, as the benchmark times them:
    ``attention_bwd_<layout>``: {switch: value}."""
    from internlm_kernels.bench.cases import CUDA_BACKWARD_VARIANTS

    return {"attention_bwd_" + name.removeprefix("cuda_"): settings
            for name, settings in CUDA_BACKWARD_VARIANTS.items()}


CASES = ("rms_norm_fwd", "rms_norm_fwd_n8192", "rms_norm_fwd_n8192_triton", "rms_norm_bwd", "rms_norm_bwd_triton",
         "rms_norm_bwd_triton_no_tma", "fused_add_rms_norm_fwd",
         "rotary_fwd", "rotary_fwd_triton", "attention_fwd", "attention_fwd_warp_rows16", "attention_bwd",
         *_backward_variant_cases(), "attention_bwd_triton", "attention_decode")


def build_cases(device: torch.device, backend: str = "cuda", small: bool = False) -> Dict[str, Callable[[], object]]:
    """The calls to profile, at the benchmark's shapes (``small``: tiny ones, to check the
    calls themselves on a CPU with the torch backend). The ``_triton`` cases run the Triton
    kernels of ops where they measured faster than the CUDA ones on the H200 (2026-11-28):
    RMSNorm forward at N = 8192 (0.97 of copy bandwidth from a CUDA graph, against 0.85),
    rotary forward (0.86 against 0.67) and the attention backward (1.40x); and the Triton
    RMSNorm backward, whose TMA kernel (sm_90+) is new since then, beside its pointer kernel."""
    import internlm_kernels as ik
    from internlm_kernels.bench.cases import with_env

    dtype = torch.bfloat16
    rows, hidden = (64, 256) if small else (16384, 4096)
    batch, seqlen = (1, 16) if small else (4, 4096)
    attention_batch, attention_len = (1, 128) if small else (2, 8192)
    cache_len = 256 if small else 32768

    compared = "torch" if backend == "torch" else "triton"
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    x_wide = torch.randn(rows, 2 * hidden, device=device, dtype=dtype)
    weight_wide = torch.randn(2 * hidden, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device=device, dtype=dtype)
    # The weight takes gradients, as in training and in the benchmark: without them the
    # backward skips its dweight partials (other kernels, other shared memory).
    weight_grad = weight.clone().requires_grad_(True)
    x_grad = x.clone().requires_grad_(True)
    normed = ik.rms_norm(x_grad, weight_grad, backend=backend)
    normed_compared = ik.rms_norm(x_grad, weight_grad, backend=compared)
    grad_normed = torch.randn_like(normed)

    q_rot = torch.randn(batch, seqlen, 32, 128, device=device, dtype=dtype)
    k_rot = torch.randn(batch, seqlen, 8, 128, device=device, dtype=dtype)
    cos, sin = ik.rotary_cos_sin(seqlen, 128, base=1e6, device=device)

    q, k, v = (torch.randn(attention_batch, attention_len, heads, 128, device=device, dtype=dtype)
               for heads in (32, 8, 8))
    q_grad, k_grad, v_grad = (t.clone().requires_grad_(True) for t in (q, k, v))
    attended = ik.flash_attention(q_grad, k_grad, v_grad, causal=True, backend=backend)
    attended_compared = ik.flash_attention(q_grad, k_grad, v_grad, causal=True, backend=compared)
    grad_attended = torch.randn_like(attended)

    def attention_grads(output):
        return lambda: torch.autograd.grad(output, (q_grad, k_grad, v_grad), grad_attended, retain_graph=True)

    q_step = torch.randn(1, 1, 32, 128, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(1, cache_len, 8, 128, device=device, dtype=dtype) for _ in range(2))
    lengths = torch.full((1,), cache_len, device=device, dtype=torch.int32)

    return {
        "rms_norm_fwd": lambda: ik.rms_norm(x, weight, backend=backend),
        "rms_norm_fwd_n8192": lambda: ik.rms_norm(x_wide, weight_wide, backend=backend),
        "rms_norm_fwd_n8192_triton": lambda: ik.rms_norm(x_wide, weight_wide, backend=compared),
        "rms_norm_bwd": lambda: torch.autograd.grad(normed, (x_grad, weight_grad), grad_normed, retain_graph=True),
        "rms_norm_bwd_triton": lambda: torch.autograd.grad(normed_compared, (x_grad, weight_grad), grad_normed,
                                                           retain_graph=True),
        "rms_norm_bwd_triton_no_tma": with_env({"INTERNLM_KERNELS_TRITON_NORM_BWD_TMA": "0"},
                                               lambda: torch.autograd.grad(normed_compared, (x_grad, weight_grad),
                                                                           grad_normed, retain_graph=True)),
        "fused_add_rms_norm_fwd": lambda: ik.fused_add_rms_norm(x, residual, weight, backend=backend),
        "rotary_fwd": lambda: ik.apply_rotary(q_rot, k_rot, cos, sin, backend=backend),
        "rotary_fwd_triton": lambda: ik.apply_rotary(q_rot, k_rot, cos, sin, backend=compared),
        "attention_fwd": lambda: ik.flash_attention(q, k, v, causal=True, backend=backend),
        "attention_fwd_warp_rows16": with_env({"INTERNLM_KERNELS_CUDA_FWD_WARP_ROWS": "16"},
                                              lambda: ik.flash_attention(q, k, v, causal=True, backend=backend)),
        "attention_bwd": attention_grads(attended),
        **{name: with_env(settings, attention_grads(attended)) for name, settings in _backward_variant_cases().items()},
        "attention_bwd_triton": attention_grads(attended_compared),
        "attention_decode": lambda: ik.flash_attention_with_kvcache(q_step, k_cache, v_cache, cache_seqlens=lengths,
                                                                    backend=backend),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    args = parser.parse_args(argv)
    wanted = args.cases.split(",")
    unknown = set(wanted) - set(CASES)
    if unknown:
        print(f"unknown cases {sorted(unknown)}; expected some of {CASES}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("profile_kernels: needs a CUDA GPU (it profiles the CUDA C++ kernels under Nsight Compute)",
              file=sys.stderr)
        return 2
    from internlm_kernels import backends

    if backends.extension is None:
        print(f"profile_kernels: the extension is not built: {backends.available_backends()['cuda'].reason}",
              file=sys.stderr)
        return 2
    cases = build_cases(torch.device("cuda"))
    for name in wanted:
        cases[name]()  # outside the profiled range: first-call work
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        torch.cuda.nvtx.range_push(name)
        cases[name]()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"profiled {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
