"""``ik.patch(model)`` / ``ik.unpatch(model)``: the package's kernels in a model you already have.

Supported (checked by class name, so remote-code models need no import from us):

* HF ``LlamaForCausalLM`` (InternLM v1 and v3 checkpoints converted to LLaMA load as this),
  transformers >= 4.48: RMSNorm modules, the rotary application inside each attention
  module, and attention itself (registered as the attention implementation
  ``"internlm_kernels"``): dense calls, and padded batches of several query tokens through
  the varlen kernel; dropout, other masks and padded one-token decode steps go to HF's SDPA
  path (``_hf_attention``).
* InternLM2 remote code (``InternLM2ForCausalLM``; ``InternLM2RMSNorm``; its attention
  classes), InternLM v1 / InternLM3 remote code (``InternLMForCausalLM``,
  ``InternLM3ForCausalLM``): RMSNorm and rotary. Their attention is computed inline in the
  remote attention classes, so ``attention=True`` leaves it as is and says so.
* This package's ``InternLMForCausalLM``: switches the backend of the chosen parts.

Everything is per instance: the model's modules get instance-level ``forward`` overrides
(the original class methods are untouched), so ``unpatch`` restores the exact original
behaviour and other models in the process are unaffected. The rotary override reuses the
model's own attention ``forward`` with only its ``apply_rotary_pos_emb`` global rebound,
so it follows whatever transformers version is installed.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.backends import choose_backend, leaves_choice_to_auto
from internlm_kernels.flash_attn_compat import index_first_axis, pad_input, token_layout
from internlm_kernels.ops.attention import _kernel_limits

Tensor = torch.Tensor
ATTN_IMPLEMENTATION = "internlm_kernels"
_STATE = "_internlm_kernels_patch"

SUPPORTED_MODELS = {
    "LlamaForCausalLM": "hf",
    "InternLMForCausalLM": "remote",  # InternLM v1 remote code (our own model has the same name: told apart below)
    "InternLM2ForCausalLM": "remote",
    "InternLM3ForCausalLM": "remote",
}
RMS_NORM_CLASSES = ("LlamaRMSNorm", "InternLMRMSNorm", "InternLM2RMSNorm", "InternLM3RMSNorm")
ATTENTION_CLASSES = ("LlamaAttention", "LlamaSdpaAttention", "LlamaFlashAttention2", "InternLMAttention",
                     "InternLMFlashAttention2", "InternLM2Attention", "InternLM2FlashAttention2",
                     "InternLM2SdpaAttention", "InternLM3Attention", "InternLM3SdpaAttention",
                     "InternLM3FlashAttention2")


# --------------------------------------------------------------------------------------
# replacements
# --------------------------------------------------------------------------------------


def _rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return ik.rms_norm(hidden_states, self.weight, eps, backend=getattr(self, _STATE)["backend"])


def hf_apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                            unsqueeze_dim: int = 1, *, backend: str = "auto"):
    """HF's ``apply_rotary_pos_emb`` on our kernel, for every signature seen in the wild:
    cos/sin (B, S, D) per token (transformers >= 4.4x, InternLM3), or a (S_max, D) table
    indexed by ``position_ids`` (older InternLM / InternLM2 remote code). q, k are
    (B, H, S, D) (``unsqueeze_dim=1``) or (B, S, H, D) (``unsqueeze_dim=2``)."""
    q_bshd = q.transpose(1, 2) if unsqueeze_dim == 1 else q
    k_bshd = k.transpose(1, 2) if unsqueeze_dim == 1 else k
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2  # HF tables repeat the angles: cat(freqs, freqs)
    if cos.dim() == 2 or (position_ids is not None and cos.shape[-2] != q_bshd.shape[1]):
        table_cos, table_sin = cos.reshape(-1, rotary_dim)[:, :half], sin.reshape(-1, rotary_dim)[:, :half]
        positions = position_ids
    else:  # one row per (batch, token): positions index those rows
        rows, seqlen = cos.reshape(-1, q_bshd.shape[1], rotary_dim).shape[:2]
        table_cos, table_sin = cos.reshape(-1, rotary_dim)[:, :half], sin.reshape(-1, rotary_dim)[:, :half]
        positions = torch.arange(rows * seqlen, device=q.device).view(rows, seqlen)
        if rows == 1:
            positions = positions[0]
    q_out, k_out = ik.apply_rotary(q_bshd, k_bshd, table_cos, table_sin, position_ids=positions, backend=backend)
    if unsqueeze_dim == 1:
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


def _hf_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                  dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                  **kwargs):
    """Attention function for HF's AttentionInterface: (B, H, S, D) in, (B, S, H, D) out.

    No mask: the dense kernel. A padding mask (HF's 4D mask that is causal & key padding, the
    kind a padded batch gets) with several query tokens: the valid tokens packed, the varlen
    kernel, the outputs scattered back (zeros at padded query positions, whose outputs a
    model ignores), as HF's flash-attention path does. Everything else goes to HF's SDPA
    path: dropout, soft-capping or a position bias, attention weights requested, any other
    mask, a padded decode step (one query token: packing would copy the whole cache on every
    step, more than SDPA reads), masks while torch.compile traces (finding the tokens reads
    the mask on the host), and, with "auto", calls no kernel takes (``_kernel_takes``)."""
    state = getattr(module, _STATE, None)
    if (state is not None and dropout == 0.0 and not kwargs.get("output_attentions") and not kwargs.get("softcap")
            and kwargs.get("position_bias") is None and _kernel_takes(query, key, value, state["backend"])):
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        if attention_mask is None:
            valid = (None, None)  # every token real
            if causal and 1 < seqlen_q < seqlen_k:
                # No mask with more keys than queries: HF's SDPA path reads it top-left (SDPA's
                # is_causal; a prefill into an empty static cache, whose later slots are
                # empty), so only the first Sq keys count.
                k, v = k[:, :seqlen_q], v[:, :seqlen_q]
        else:
            valid = None if torch.compiler.is_compiling() else _padding_from_mask(
                attention_mask, q.shape[0], seqlen_q, seqlen_k, causal)
        if valid is not None and valid[0] is None:  # no padding: the dense kernel, nothing packed
            return ik.flash_attention(q, k, v, causal=causal, softmax_scale=scaling, backend=state["backend"]), None
        if valid is not None:
            return _attention_over_valid_tokens(q, k, v, *valid, causal, scaling, state["backend"]), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _kernel_takes(query: Tensor, key: Tensor, value: Tensor, backend: str) -> bool:
    """With "auto", a call no kernel takes (float32, an odd head dim, a CPU tensor without the
    Triton interpreter) stays on HF's SDPA path rather than going to the eager reference,
    which "auto" would choose and which is slower than SDPA; a named backend is obeyed."""
    if not leaves_choice_to_auto(backend):
        return True
    return choose_backend("auto", query.device, "flash_attention",
                          _kernel_limits("flash_attention", query, key, value)) != "torch"


def _padding_from_mask(mask: Tensor, batch: int, seqlen_q: int, seqlen_k: int, causal: bool):
    """(key_valid (B, Sk), query_valid (B, Sq)) when ``mask`` ((B or 1, 1, Sq or 1, Sk), bool, or
    additive with 0 where allowed and at most half the dtype's minimum where not) is exactly
    causal (bottom-right) & key padding; None for any other mask, so that HF's SDPA path takes
    it (a static cache's future slots, a window, a soft bias, a non-causal call with Sq != Sk,
    whose queries are not the last keys); (None, None) when it is that with no padding at all
    (a chunk of queries after a cache), which the dense kernel takes as it is.

    The last query row names the valid keys: causal, it sees every key there is. A query is
    padding where its own key (the queries being the last Sq keys) is: its row may also be
    all True or all False (HF versions guard SDPA against rows that see no key so), and its
    output is left zero. The check reads its result on the host: one sync, as HF's own
    flash-attention path has."""
    if (seqlen_q == 1 or (not causal and seqlen_q != seqlen_k) or mask.dim() != 4 or mask.shape[0] not in (1, batch)
            or mask.shape[1] != 1 or mask.shape[2] not in (1, seqlen_q) or mask.shape[3] != seqlen_k):
        return None
    mask = mask[:, 0].expand(batch, seqlen_q, seqlen_k)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    key_valid = allowed[:, -1, :]
    query_valid = key_valid[:, seqlen_k - seqlen_q:]
    band = reference.attention_mask(seqlen_q, seqlen_k, causal, (-1, -1), mask.device)
    as_padding = (allowed == (key_valid[:, None, :] & band)).all(dim=-1)
    padded_row_ok = as_padding | allowed.all(dim=-1) | ~allowed.any(dim=-1)
    rows_ok = torch.where(query_valid, as_padding, padded_row_ok)
    if mask.dtype != torch.bool:  # additive: anything between 0 and "masked" is a bias, not padding
        rows_ok &= (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all(dim=-1)
    # A sequence with keys but no query: its queries are not the last keys (a static cache's
    # future slots); that the rows passed above says nothing then.
    rows_ok &= (query_valid.any(dim=-1) | ~key_valid.any(dim=-1))[:, None]
    matches, no_padding = torch.stack((rows_ok.all(), key_valid.all())).tolist()  # the one sync
    if not matches:
        return None
    return (None, None) if no_padding else (key_valid, query_valid)


def _attention_over_valid_tokens(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, query_valid: Tensor,
                                 causal: bool, scaling: Optional[float], backend: str) -> Tensor:
    """q (B, Sq, H, D), k / v (B, Sk, Hkv, D): each sequence's valid tokens packed, one varlen
    call (bottom-right causal per sequence is exact for queries that are the sequence's last
    tokens), the outputs scattered back into (B, Sq, H, D)."""
    batch, seqlen_q = q.shape[:2]
    query_index, cu_q = token_layout(query_valid)
    key_index, cu_k = token_layout(key_valid)
    packed_q = index_first_axis(q.reshape(-1, *q.shape[2:]), query_index)
    packed_k, packed_v = (index_first_axis(t.reshape(-1, *t.shape[2:]), key_index) for t in (k, v))
    out = ik.flash_attention(packed_q, packed_k, packed_v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal,
                             softmax_scale=scaling, backend=backend)
    return pad_input(out, query_index, batch, seqlen_q)


def _with_globals(fn, overrides: Dict[str, object]):
    """A copy of ``fn`` whose global lookups see ``overrides``, decorators included: each
    wrapper level (``__wrapped__`` held in a closure cell) is rebuilt around the copy."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is not None and fn.__closure__:
        new_inner = _with_globals(inner, overrides)
        cells = tuple(types.CellType(new_inner) if cell.cell_contents is inner else cell for cell in fn.__closure__)
        if any(cell.cell_contents is new_inner for cell in cells):
            copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
            functools.update_wrapper(copy, new_inner)
            copy.__kwdefaults__ = fn.__kwdefaults__
            return copy
    namespace = dict(fn.__globals__)
    namespace.update(overrides)
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    return copy


# --------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_attention)
    # Masks as for SDPA: None for plain causal (our kernel), a tensor when there is padding.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return True


def _override(module: nn.Module, forward, backend: str, part: str) -> None:
    setattr(module, _STATE, {"backend": backend, "part": part})
    module.forward = types.MethodType(forward, module)


def _is_own_model(model: nn.Module) -> bool:
    from internlm_kernels.models.internlm import InternLMForCausalLM

    return isinstance(model, InternLMForCausalLM)


def patch(model: nn.Module, *, rms_norm: bool = True, rotary: bool = True, attention: bool = True,
          backend: str = "auto") -> Dict[str, object]:
    """Swap the package's kernels into ``model`` (in place). Returns what was patched:
    {"rms_norm": count, "rotary": count, "attention": count, "skipped": [reasons]}."""
    if getattr(model, _STATE, None) is not None:
        unpatch(model)
    report: Dict[str, object] = {"rms_norm": 0, "rotary": 0, "attention": 0, "skipped": []}
    if _is_own_model(model):
        return _patch_own_model(model, rms_norm, rotary, attention, backend, report)
    kind = SUPPORTED_MODELS.get(type(model).__name__)
    if kind is None:
        raise ValueError(f"patch: cannot patch a {type(model).__name__}; supported models: "
                         f"{', '.join(sorted(SUPPORTED_MODELS))} (HF LLaMA, InternLM v1/2/3 remote code) and "
                         f"internlm_kernels.models.InternLMForCausalLM")
    saved = {"attn_implementation": None}
    for module in model.modules():
        name = type(module).__name__
        if rms_norm and name in RMS_NORM_CLASSES:
            _override(module, _rms_norm_forward, backend, "rms_norm")
            report["rms_norm"] += 1
        elif rotary and name in ATTENTION_CLASSES:
            rotary_fn = functools.partial(hf_apply_rotary_pos_emb, backend=backend)
            forward = _with_globals(type(module).forward, {"apply_rotary_pos_emb": rotary_fn})
            _override(module, forward, backend, "rotary")
            report["rotary"] += 1
        elif name in ATTENTION_CLASSES:
            setattr(module, _STATE, {"backend": backend, "part": "attention"})
    if attention:
        config = getattr(model, "config", None)
        if kind == "hf" and config is not None and _register_attention():
            saved["attn_implementation"] = config._attn_implementation
            for module in model.modules():
                if type(module).__name__ in ATTENTION_CLASSES and getattr(module, _STATE, None) is None:
                    setattr(module, _STATE, {"backend": backend, "part": "attention"})
            config._attn_implementation = ATTN_IMPLEMENTATION
            report["attention"] = sum(type(m).__name__ in ATTENTION_CLASSES for m in model.modules())
        else:
            reason = ("attention: this model computes attention inside its own remote-code classes; left as is "
                      "(internlm_kernels.models.InternLMForCausalLM.from_pretrained loads the same checkpoint "
                      "with every kernel)" if kind == "remote"
                      else "attention: needs transformers >= 4.48 (AttentionInterface)")
            report["skipped"].append(reason)
            warnings.warn(f"patch: {reason}", stacklevel=2)
    setattr(model, _STATE, saved)
    return report


def _patch_own_model(model, rms_norm, rotary, attention, backend, report):
    saved: List[tuple] = []

    def switch(module, attribute):
        saved.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, backend)

    for module in model.modules():
        if rms_norm and isinstance(module, ik.nn.RMSNorm):
            switch(module, "backend")
            report["rms_norm"] += 1
        elif rotary and isinstance(module, ik.nn.RotaryEmbedding):
            switch(module, "backend")
        elif hasattr(module, "rotary_backend") and hasattr(module, "attention_backend"):
            if rotary:
                switch(module, "rotary_backend")
                report["rotary"] += 1
            if attention:
                switch(module, "attention_backend")
                report["attention"] += 1
    setattr(model, _STATE, {"own": saved})
    return report


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the model behaves exactly as before it was patched."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    if "own" in state:
        for module, attribute, value in state["own"]:
            setattr(module, attribute, value)
    else:
        for module in model.modules():
            module_state = getattr(module, _STATE, None)
            if module is model or module_state is None:
                continue
            if "forward" in module.__dict__:
                del module.forward
            delattr(module, _STATE)
        if state.get("attn_implementation") is not None:
            model.config._attn_implementation = state["attn_implementation"]
    delattr(model, _STATE)
    return model
