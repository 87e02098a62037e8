"""Reference model implementations built on the package's kernels."""

from internlm_kernels.models.internlm import PRESETS, InternLMForCausalLM, KVCache, ModelArgs

__all__ = ["InternLMForCausalLM", "ModelArgs", "PRESETS", "KVCache"]
