"""The kernel modules behind the "triton" and "cuda" backends.

Both expose the same launcher functions with the same signatures (outputs are allocated
by the ops layer and passed in): ``internlm_kernels.triton.<op>`` for Triton, the compiled
extension ``internlm_kernels._C`` itself for CUDA. Imports are lazy, so the package
imports on machines without Triton or the extension.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from internlm_kernels import backends

# The CUDA kernels put the batch on their grid's y axis, which stops at 65535 programs; the
# Triton launchers slice larger batches, so "auto" gives those calls to Triton.
CUDA_MAX_BATCH_ROWS = 65535


def kernels(backend: str, op: str) -> ModuleType:
    """Launcher module for ``op`` ("rms_norm", "rotary", ...) on a kernel ``backend``."""
    if backend == "triton":
        return importlib.import_module(f"internlm_kernels.triton.{op}")
    if backend == "cuda":
        if backends.extension is None:
            raise RuntimeError(f"the cuda backend is unavailable: {backends.available_backends()['cuda'].reason}")
        return backends.extension
    raise ValueError(f"backend {backend!r} has no kernels; expected 'triton' or 'cuda'")
