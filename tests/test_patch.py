"""ik.patch / ik.unpatch on models people already have."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels.models import InternLMForCausalLM, ModelArgs
from tests.helpers import max_abs_error
from tests.remote_internlm2 import InternLM2ForCausalLM

# (the op modules share their names with the functions ops/__init__ exports)
rms_norm_ops = importlib.import_module("internlm_kernels.ops.rms_norm")
rotary_ops = importlib.import_module("internlm_kernels.ops.rotary")

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def _llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _spy():
    """Count calls into our Triton-backed ops (the custom ops the public functions call)."""
    return (mock.patch.object(rms_norm_ops, "_rms_norm_fwd", wraps=rms_norm_ops._rms_norm_fwd),
            mock.patch.object(rotary_ops, "_rotary", wraps=rotary_ops._rotary))


def test_patched_llama_equals_unpatched_in_fp32_and_runs_our_kernels(device):
    model = _llama().to(device)
    ids = torch.randint(0, 128, (2, 15), device=device)
    with torch.no_grad():
        before = model(ids).logits
    report = ik.patch(model, backend="triton", attention=False)
    assert report["rms_norm"] == 5 and report["rotary"] == 2
    norm_spy, rotary_spy = _spy()
    with norm_spy as norm_calls, rotary_spy as rotary_calls, torch.no_grad():
        patched = model(ids).logits
    assert norm_calls.call_count == 5 and rotary_calls.call_count == 2
    assert max_abs_error(patched, before) <= 1e-5 * float(before.abs().max())
    ik.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before), "unpatch restores the exact original behaviour"


def test_patched_llama_bf16_all_kernels_three_run_rule(device):
    exact_model = _llama().to(device)
    ids = torch.randint(0, 128, (2, 20), device=device)
    with torch.no_grad():
        exact = exact_model(ids).logits
        eager = _llama().bfloat16().to(device)
        eager_error = max_abs_error(eager(ids).logits.float(), exact)
        ours = _llama().bfloat16().to(device)
        report = ik.patch(ours, backend="triton")
        assert report["attention"] == 2 and ours.config._attn_implementation == "internlm_kernels"
        ours_error = max_abs_error(ours(ids).logits.float(), exact)
    assert ours_error <= 2 * eager_error, f"{ours_error:.3e} vs eager bf16 {eager_error:.3e}"


def test_patched_llama_generates_like_unpatched(device):
    model = _llama().to(device)
    ids = torch.randint(0, 128, (1, 6), device=device)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
        ik.patch(model)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
        ik.unpatch(model)
        assert model.config._attn_implementation != "internlm_kernels"


def test_padding_mask_falls_back_to_sdpa():
    model = _llama()
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        ik.patch(model)
        after = model(ids, attention_mask=mask).logits
    assert max_abs_error(after[:, 3:], before[:, 3:]) <= 1e-5 * float(before.abs().max())


def test_internlm2_remote_code_norm_and_rotary(device):
    torch.manual_seed(0)
    model = InternLM2ForCausalLM().eval().to(device)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "InternLM2RMSNorm":
                module.weight.add_(0.1 * torch.randn_like(module.weight))
    ids = torch.randint(0, 64, (2, 11), device=device)
    with torch.no_grad():
        before = model(ids)
    with pytest.warns(UserWarning, match="computes attention inside its own remote-code classes"):
        report = ik.patch(model, backend="triton")
    assert report["rms_norm"] == 5 and report["rotary"] == 2 and report["attention"] == 0
    norm_spy, rotary_spy = _spy()
    with norm_spy as norm_calls, rotary_spy as rotary_calls, torch.no_grad():
        patched = model(ids)
    assert norm_calls.call_count == 5 and rotary_calls.call_count == 2
    assert max_abs_error(patched, before) <= 1e-5 * float(before.abs().max())
    ik.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids), before)


def test_own_model_patch_switches_backends_and_back():
    model = InternLMForCausalLM(ModelArgs.from_name("tiny-internlm2"), backend="torch")
    report = ik.patch(model, backend="triton", attention=False)
    assert report["rms_norm"] == 5 and report["rotary"] == 2 and report["attention"] == 0
    assert model.model.norm.backend == "triton" and model.model.layers[0].self_attn.attention_backend == "torch"
    ik.unpatch(model)
    assert model.model.norm.backend == "torch" and model.model.layers[0].self_attn.rotary_backend == "torch"


def test_unsupported_model_raises_and_lists_what_is_supported():
    with pytest.raises(ValueError, match="cannot patch a Linear; supported models: .*LlamaForCausalLM"):
        ik.patch(torch.nn.Linear(2, 2))
