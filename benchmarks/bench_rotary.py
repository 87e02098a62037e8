"""Rotary embedding of q and k, forward and backward, every provider available here.

    python benchmarks/bench_rotary.py [--quick] [--providers triton,eager,...] [--json PATH]

Shape: InternLM2-7B attention, 32 q heads and 8 kv heads of 128, B = 4, S = 4096. GB/s
counts reading and writing q and k once, against the in-run copy bandwidth.
"""

import sys

from internlm_kernels.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "rotary_fwd,rotary_bwd", *sys.argv[1:]]))
