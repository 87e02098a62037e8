"""Make Triton's CPU interpreter treat bf16 the way the GPU does.

The interpreter (TRITON_INTERPRET=1, how the test suite runs the real kernel code on a
CPU) stores bf16 as raw uint16 and gets two things wrong with it:

* fp32 -> bf16 conversion truncates the mantissa, whereas GPUs round to nearest even
  (``cvt.rn.bf16.f32``) as PyTorch does: twice the error, and biased;
* ``tl.dot`` multiplies the raw uint16 bit patterns instead of the bf16 values (the GPU's
  MMA reads bf16 and accumulates in fp32).

Left alone, interpreted bf16 results would be judged against kernels no GPU runs. These
patches fix exactly those two operations and leave everything else to Triton; nothing
is touched when the interpreter is off.
"""

from __future__ import annotations

import numpy as np


def _fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if np.any(nan):  # keep NaN a NaN (rounding could carry a small payload into inf)
        rounded[nan] = (rounded[nan] & 0x8000) | 0x7FC0
    return rounded


def _bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(bits).astype(np.uint32) << 16).view(np.float32)


def patch_bf16() -> bool:
    """Install the fixes; returns False when this Triton has a different interpreter layout."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or getattr(builder, "_ik_bf16_rne", False):
        return False

    def wrap(original):
        def convert(self, src, dst_type, *args):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                return handle(_fp32_to_bf16_bits(src.data), dst_type.scalar)
            return original(self, src, dst_type, *args)
        return convert

    for name in ("cast_impl", "create_fp_to_fp", "create_fp_trunc"):
        if hasattr(builder, name):
            setattr(builder, name, wrap(getattr(builder, name)))

    original_dot = getattr(builder, "create_dot", None)
    if original_dot is not None:
        def dot(self, a, b, d, *args):
            if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
                a = handle(_bf16_bits_to_fp32(a.data), tl.float32) if a.dtype.scalar == tl.bfloat16 else a
                b = handle(_bf16_bits_to_fp32(b.data), tl.float32) if b.dtype.scalar == tl.bfloat16 else b
            return original_dot(self, a, b, d, *args)
        builder.create_dot = dot
    builder._ik_bf16_rne = True
    return True
