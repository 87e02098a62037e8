"""internlm_kernels: fused RMSNorm, rotary and attention kernels for InternLM-family models.

    import internlm_kernels as ik
    y = ik.rms_norm(x, weight, eps=1e-6)                       # HF InternLM numerics
    out, residual = ik.fused_add_rms_norm(x, residual, weight)
    cos, sin = ik.rotary_cos_sin(seq_len, 128, base=1e6)
    q, k = ik.apply_rotary(q, k, cos, sin)
    out = ik.flash_attention(q, k, v, causal=True)              # GQA, varlen, windows, lse
    ik.available_backends()                                    # what runs here, and why not

Every op takes ``backend="auto" | "cuda" | "triton" | "torch"``; see ``internlm_kernels.backends``.
"""

__version__ = "0.1.0"

from internlm_kernels import reference  # noqa: F401  (the eager oracle, public on purpose)
from internlm_kernels.backends import available_backends
from internlm_kernels.ops import (
    apply_rotary, flash_attention, flash_attention_with_kvcache, fused_add_rms_norm, fused_add_rms_norm_, rms_norm,
    rotary_cos_sin,
)
from internlm_kernels import nn  # noqa: E402  (needs the ops above)
from internlm_kernels.patch import patch, unpatch  # noqa: E402

__all__ = [
    "rms_norm", "fused_add_rms_norm", "fused_add_rms_norm_", "rotary_cos_sin", "apply_rotary",
    "flash_attention", "flash_attention_with_kvcache", "available_backends", "nn", "reference", "patch", "unpatch",
]
