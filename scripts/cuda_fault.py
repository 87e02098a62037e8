"""Whether the CUDA kernels faulted in a GPU test run, from scripts/pytest_resilient.py's
status files: a test that crashed the interpreter, or a failure with a CUDA error that
leaves the process's CUDA context unusable (an illegal or misaligned address, a launch
failure, a device-side assert).

    python scripts/cuda_fault.py STATUS_JSON [STATUS_JSON ...]

Prints the first such test and its error, or nothing; missing files are skipped. Exit
status 0 either way. scripts/gpu_check.sh benchmarks without the cuda provider only after a
fault: a kernel that faults would poison the benchmark's process too, and every later case
with it. An ordinary failure (a value out of tolerance, a graph break under torch.compile)
leaves the kernels worth timing.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

# CUDA errors that are sticky: every later CUDA call in the process fails with them.
STICKY_CUDA_ERRORS = ("illegal memory access", "misaligned address", "unspecified launch failure",
                      "device-side assert", "illegal instruction", "hardware stack error",
                      "an illegal address")


def fault(status: dict) -> Optional[str]:
    """The first crash or sticky CUDA error recorded in one status file, as one line."""
    if status.get("crashed"):
        return f"{status['crashed'][0]} crashed the interpreter"
    for failure in status.get("failed", []):
        message = failure.get("message", "")
        if any(error in message for error in STICKY_CUDA_ERRORS):
            return f"{failure['id']}: {message.splitlines()[0][:200]}"
    return None


def main(paths: List[str]) -> int:
    for path in paths:
        if not os.path.exists(path):
            continue
        reason = fault(json.load(open(path)))
        if reason:
            print(reason)
            break
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
