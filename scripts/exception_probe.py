"""Which C++ exceptions survive on this GPU machine: one subprocess per case, so a crash is a result.

    python scripts/exception_probe.py

On the first H200 run (2026-11-27) the glue's argument checks crashed the process
(SIGSEGV) when called with CUDA tensors, while the same checks with CPU tensors raised
RuntimeError as they should. These cases separate the candidate causes: any C++ exception
after CUDA is initialised (a torch-native error crashes too), only the extension's throws
after CUDA initialisation (CPU tensors after init crash), or only its CUDA-tensor path.
Where gdb or cuda-gdb is installed (the lent GPU machines have cuda-gdb, which also debugs
host code, and no gdb), the first crashing case is rerun under it for the native backtrace.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

CASES = {
    "torch-native error before CUDA init":
        "torch.zeros(2).view(3)",
    "torch-native error after CUDA init":
        "torch.cuda.init(); torch.zeros(2, device='cuda').view(3)",
    "extension error, CPU tensors, before CUDA init":
        "x = torch.randn(1, 4, 8); ext.rms_norm_fwd(x, None, torch.ones(8), x, None, torch.empty(4), 1e-6)",
    "extension error, CPU tensors, after CUDA init":
        "torch.cuda.init(); x = torch.randn(1, 4, 8); "
        "ext.rms_norm_fwd(x, None, torch.ones(8), x, None, torch.empty(4), 1e-6)",
    "extension error, CUDA tensors":
        "x = torch.randn(1, 4, 8, device='cuda'); "
        "ext.rms_norm_fwd(x, None, torch.ones(7, device='cuda'), x, None, torch.empty(4, device='cuda'), 1e-6)",
}

PRELUDE = "import torch\nfrom internlm_kernels import backends\next = backends.extension\nassert ext is not None\n"


def script(statement: str) -> str:
    return PRELUDE + textwrap.dedent(f"""
        try:
            {statement}
        except RuntimeError as error:
            print("raised RuntimeError:", str(error).splitlines()[0][:160])
        else:
            print("no exception")
        """)


def describe(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def main() -> int:
    crashed = []
    for name, statement in CASES.items():
        result = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script(statement)], capture_output=True,
                                text=True, timeout=120)
        last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"{name:48s} {describe(result.returncode):22s} {last if result.returncode == 0 else ''}", flush=True)
        if result.returncode != 0:
            crashed.append(statement)
    cuda_gdb = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuda-gdb")
    gdb = shutil.which("gdb") or shutil.which("cuda-gdb") or (cuda_gdb if os.path.exists(cuda_gdb) else None)
    if crashed and gdb:
        print(f"\nnative backtrace of the first crash ({os.path.basename(gdb)}): {crashed[0]}", flush=True)
        result = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, "-c",
                                 script(crashed[0])], capture_output=True, text=True, timeout=300)
        frames = [line for line in result.stdout.splitlines() if line.startswith("#") or "signal" in line]
        print("\n".join(frames[:45]))
    elif crashed:
        print("\nneither gdb nor cuda-gdb is installed here: no native backtrace")
    return 0


if __name__ == "__main__":
    sys.exit(main())
