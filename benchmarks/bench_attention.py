"""Fused attention: forward and backward TFLOP/s, decoding GB/s, against PyTorch SDPA.

    python benchmarks/bench_attention.py [--quick] [--providers triton,sdpa_flash,...] [--json PATH]

Prefill: InternLM2-7B heads (32 q / 8 kv), head dim 64 and 128, sequence length 1K-16K at
B * S = 16K tokens, causal and not. FLOPs = 4 * B * H * S^2 * D, halved for causal, x2.5 for
the backward (``reference.attention_flops``), reported against the bf16 GEMM rate measured in
the same run. SDPA runs once per backend (flash, cuDNN, memory-efficient, math) with
``enable_gqa`` (no K/V repeat). Decode: one query token per sequence over a full cache,
B in {1, 8, 64} x cache length in {4K, 32K}; GB/s counts the K and V bytes read, against the
in-run copy bandwidth.
"""

import sys

from internlm_kernels.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "attention_fwd,attention_bwd,attention_decode", *sys.argv[1:]]))
