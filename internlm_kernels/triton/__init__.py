"""Triton kernels and their plain launchers (no autograd, no checks: see ``internlm_kernels.ops``).

Modules are imported lazily by the ops layer, so the package works where Triton is absent.
"""

import os as _os

if _os.environ.get("TRITON_INTERPRET", "0") == "1":
    from internlm_kernels.triton._interpreter import patch_bf16

    patch_bf16()
