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
# The CUDA decode's grid x axis (2^31 - 1 programs) holds the combine kernel's blocks of 4
# query rows of every (batch row, KV head), and its row indices are 32-bit (below 2^30).
CUDA_MAX_GRID_X = 2**31 - 1
CUDA_MAX_QUERY_ROWS = 2**30 - 2  # below INT32_MAX / 2
CUDA_MAX_GRID_YZ = 65535


def cuda_rotary_item_blocks(heads_q: int, heads_k: int, rotary_half: int, element_size: int) -> int:
    """The CUDA rotary grid's z extent (rotary_item_blocks, csrc/include/internlm_kernels/rotary.h):
    a token's work items, a 16-byte chunk of the rotary half of 2 heads each, 256 a block."""
    per_chunk = 16 // element_size
    items = ((heads_q + 1) // 2 + (heads_k + 1) // 2) * ((rotary_half + per_chunk - 1) // per_chunk)
    return (items + 255) // 256 if items > 0 else 1


def kernels(backend: str, op: str) -> ModuleType:
    """Launcher module for ``op`` ("rms_norm", "rotary", ...) on a kernel ``backend``."""
    if backend == "triton":
        return importlib.import_module(f"internlm_kernels.triton.{op}")
    if backend == "cuda":
        if backends.extension is None:
            raise RuntimeError(f"the cuda backend is unavailable: {backends.available_backends()['cuda'].reason}")
        return backends.extension
    raise ValueError(f"backend {backend!r} has no kernels; expected 'triton' or 'cuda'")
