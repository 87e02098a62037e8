"""Modules over the functional ops, for model code: ``ik.nn.RMSNorm``, ``ik.nn.RotaryEmbedding``,
``ik.nn.Attention``."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from internlm_kernels._checks import check_flag, check_int, check_real, check_softmax_scale, check_window
from internlm_kernels.ops import apply_rotary, flash_attention, fused_add_rms_norm, rms_norm, rotary_cos_sin

Tensor = torch.Tensor


class RMSNorm(nn.Module):
    """HF-compatible RMSNorm (parameter ``weight``, attribute ``variance_epsilon``).

    ``forward(x)`` returns the normalised x; ``forward(x, residual)`` is the fused pre-norm
    step and returns ``(rms_norm(x + residual), x + residual)``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: str = "auto", *,
                 residual_in_fp32: bool = False, device=None, dtype=None):
        super().__init__()
        if check_int("RMSNorm", "hidden_size", hidden_size) <= 0:
            raise ValueError(f"RMSNorm: hidden_size must be positive, got {hidden_size}")
        if not check_real("RMSNorm", "eps", eps) >= 0:
            raise ValueError(f"RMSNorm: eps must be >= 0, got {eps}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"RMSNorm: dtype must be a floating torch.dtype or None, got {dtype!r}")
        check_flag("RMSNorm", "residual_in_fp32", residual_in_fp32)
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.backend = backend
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if residual is None:
            return rms_norm(x, self.weight, self.variance_epsilon, backend=self.backend)
        return fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon,
                                  residual_in_fp32=self.residual_in_fp32, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}, backend={self.backend!r}"


class RotaryEmbedding(nn.Module):
    """Rotary embedding with cached cos/sin tables (non-persistent buffers, so they follow
    ``.to(device)`` and stay out of checkpoints).

    The tables cover ``max_position_embeddings`` positions and grow on demand. With dynamic
    NTK scaling, a sequence longer than ``max_position_embeddings`` uses tables computed for
    its own length (HF's rule), cached for the last length seen.

    ``forward(q, k, ...)`` takes ``apply_rotary``'s arguments. ``seq_len`` is the number of
    positions the call needs; it defaults to ``S + seqlen_offsets`` for dense inputs with an
    int offset, and to the cached length otherwise (pass it when position_ids, per-sequence
    offsets or packed inputs may reach past ``max_position_embeddings``).
    """

    def __init__(self, rotary_dim: int, base: float = 10000.0, scaling: Optional[dict] = None,
                 max_position_embeddings: int = 2048, *, interleaved: bool = False, backend: str = "auto",
                 device=None):
        super().__init__()
        if scaling is not None and not isinstance(scaling, dict):
            raise TypeError(f"RotaryEmbedding: scaling must be None or a dict such as "
                            f"{{'type': 'dynamic', 'factor': 2.0}}, got {type(scaling).__name__}")
        if check_int("RotaryEmbedding", "max_position_embeddings", max_position_embeddings) < 0:
            raise ValueError(f"RotaryEmbedding: max_position_embeddings must be >= 0, got {max_position_embeddings}")
        check_flag("RotaryEmbedding", "interleaved", interleaved)
        self.rotary_dim = rotary_dim
        self.base = base
        self.scaling = dict(scaling) if scaling is not None else None
        self.max_position_embeddings = max_position_embeddings
        self.interleaved = interleaved
        self.backend = backend
        self._dynamic = self.scaling is not None and self.scaling.get("type", self.scaling.get("rope_type")) == "dynamic"
        if self._dynamic:
            self.scaling.setdefault("max_position_embeddings", max_position_embeddings)
        cos, sin = self._compute(max_position_embeddings, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._long_tables: Optional[Tuple[int, Tensor, Tensor]] = None

    def _compute(self, seq_len: int, device) -> Tuple[Tensor, Tensor]:
        return rotary_cos_sin(seq_len, self.rotary_dim, base=self.base, scaling=self.scaling, device=device)

    def reset_tables(self) -> None:
        """Recompute the tables on the current device (after ``to_empty`` or a device move)."""
        self.cos, self.sin = self._compute(self.max_position_embeddings, self.cos.device)
        self._long_tables = None

    def _apply(self, fn, recurse=True):
        # The tables stay fp32 whatever dtype the model is cast to: angles rounded to bf16
        # would cost accuracy for nothing (the kernels read fp32 tables at no extra cost).
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = self.cos.float(), self.sin.float()
        self._long_tables = None
        return self

    def tables(self, seq_len: int) -> Tuple[Tensor, Tensor]:
        """cos, sin covering positions [0, seq_len)."""
        if seq_len <= self.cos.shape[0]:
            return self.cos, self.sin
        if self._dynamic:  # the base depends on seq_len: a table per length, the last one cached
            if self._long_tables is None or self._long_tables[0] != seq_len or \
                    self._long_tables[1].device != self.cos.device:
                self._long_tables = (seq_len,) + self._compute(seq_len, self.cos.device)
            return self._long_tables[1], self._long_tables[2]
        self.cos, self.sin = self._compute(max(seq_len, 2 * self.cos.shape[0]), self.cos.device)
        return self.cos, self.sin

    def forward(self, q: Tensor, k: Optional[Tensor], *, position_ids: Optional[Tensor] = None,
                seqlen_offsets: Union[int, Tensor] = 0, cu_seqlens: Optional[Tensor] = None,
                seq_len: Optional[int] = None, inplace: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if seq_len is None:
            # (anything else, a q of another rank included, is apply_rotary's to refuse by name)
            dense = position_ids is None and cu_seqlens is None and isinstance(seqlen_offsets, int) and \
                isinstance(q, Tensor) and q.dim() == 4
            seq_len = q.shape[1] + seqlen_offsets if dense else self.cos.shape[0]
        cos, sin = self.tables(seq_len)
        return apply_rotary(q, k, cos, sin, position_ids=position_ids, seqlen_offsets=seqlen_offsets,
                            cu_seqlens=cu_seqlens, interleaved=self.interleaved, inplace=inplace,
                            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"rotary_dim={self.rotary_dim}, base={self.base}, scaling={self.scaling}, "
                f"max_position_embeddings={self.max_position_embeddings}, backend={self.backend!r}")


class Attention(nn.Module):
    """Fused softmax attention over (B, S, H, D) or packed (T, H, D) q, k, v (no projections):
    ``forward(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None)`` -> out, as ``flash_attention``."""

    def __init__(self, causal: bool = True, softmax_scale: Optional[float] = None,
                 window_size: Tuple[int, int] = (-1, -1), backend: str = "auto"):
        super().__init__()
        check_flag("Attention", "causal", causal)
        check_softmax_scale("Attention", softmax_scale)
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.window_size = check_window("Attention", window_size)
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens_q: Optional[Tensor] = None,
                cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
                max_seqlen_k: Optional[int] = None) -> Tensor:
        return flash_attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale,
                               window_size=self.window_size, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                               max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, backend=self.backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, window_size={self.window_size}, backend={self.backend!r}"
