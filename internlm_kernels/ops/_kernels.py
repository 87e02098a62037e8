"""The kernel modules behind the "triton" and "cuda" backends.

Both expose the same launcher functions with the same signatures (outputs are
allocated by the ops layer and passed in), so an op picks its kernels with one call.
Imports are lazy: the package imports on machines without Triton or the extension.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "triton": "internlm_kernels.triton.{op}",
    "cuda": "internlm_kernels.ops._cuda_{op}",
}


def kernels(backend: str, op: str) -> ModuleType:
    """Launcher module for ``op`` ("rms_norm", "rotary", ...) on a kernel ``backend``."""
    if backend not in _MODULES:
        raise ValueError(f"backend {backend!r} has no kernels; expected one of {tuple(_MODULES)}")
    return importlib.import_module(_MODULES[backend].format(op=op))
