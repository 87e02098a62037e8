"""RMSNorm and fused add+RMSNorm, forward and backward, every provider available here.

    python benchmarks/bench_rms_norm.py [--quick] [--providers triton,eager,...] [--json PATH]

GB/s counts the bytes an ideal kernel moves (x and out; plus residual and residual_out for
the fused op; dy, x and dx for the backward) and is compared with the device-to-device
copy bandwidth measured in the same run. Shapes: M = 16384 rows, N = 4096 and 8192.
"""

import sys

from internlm_kernels.__main__ import main

OPS = "rms_norm_fwd,rms_norm_bwd,fused_add_rms_norm_fwd,fused_add_rms_norm_bwd"

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", OPS, *sys.argv[1:]]))
