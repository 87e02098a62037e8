"""The nn modules' own checks (their numerics are tested with the ops they wrap)."""

import pytest
import torch

import internlm_kernels as ik


def test_modules_refuse_bad_settings_by_name():
    """The nn modules check their settings when built, with the ops' messages, instead of
    failing later inside torch (or reading "no" as True)."""
    for build, error, words in [
        (lambda: ik.nn.RMSNorm(-1), ValueError, "RMSNorm: hidden_size must be positive, got -1"),
        (lambda: ik.nn.RMSNorm(16, dtype=torch.int32), TypeError, "RMSNorm: dtype must be a floating torch.dtype"),
        (lambda: ik.nn.RMSNorm(16, eps="1e-6"), TypeError, "RMSNorm: eps must be a float, got str"),
        (lambda: ik.nn.RotaryEmbedding(16, scaling=2.0), TypeError, "RotaryEmbedding: scaling must be None or a dict"),
        (lambda: ik.nn.RotaryEmbedding(16, scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=0),
         ValueError, r"scaling\['max_position_embeddings'\] must be a positive int, got 0"),
        (lambda: ik.nn.Attention(window_size=2), ValueError, "Attention: window_size must be \\(left, right\\)"),
        (lambda: ik.nn.Attention(causal="no"), TypeError, "Attention: causal must be a bool, got str"),
    ]:
        with pytest.raises(error, match=words):
            build()
    rope = ik.nn.RotaryEmbedding(16)
    with pytest.raises(ValueError, match="apply_rotary: q must be \\(B, S, H, D\\), got a 1-D tensor"):
        rope(torch.randn(16), None)  # was an IndexError from q.shape[1]
