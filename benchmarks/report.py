"""Regenerate benchmarks/README.md from the committed results, and plot them.

    python benchmarks/report.py [RESULTS_JSON ...]
"""

import sys

from internlm_kernels.bench.report import main

if __name__ == "__main__":
    sys.exit(main())
