"""Public functional API: one module per op, each registering its torch.library ops."""

from internlm_kernels.ops.attention import flash_attention, flash_attention_with_kvcache
from internlm_kernels.ops.rms_norm import fused_add_rms_norm, fused_add_rms_norm_, rms_norm
from internlm_kernels.ops.rotary import apply_rotary, rotary_cos_sin

__all__ = ["rms_norm", "fused_add_rms_norm", "fused_add_rms_norm_", "rotary_cos_sin", "apply_rotary",
           "flash_attention", "flash_attention_with_kvcache"]
