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
patch_module = importlib.import_module("internlm_kernels.patch")

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


def _attention_spy():
    """Count the patched attention's calls into ik.flash_attention."""
    return mock.patch.object(patch_module.ik, "flash_attention", wraps=ik.flash_attention)


def _padding_mask(ids, padding):
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :4], mask[2, :1] = 0, 0
    elif padding == "right":
        mask[0, 7:], mask[1, 10:] = 0, 0
    else:  # tokens left out in the middle of a row: causality among the rest still holds
        mask[1, 3:5] = 0
    return mask


@pytest.mark.parametrize("padding", ["left", "right", "holes"])
def test_padded_batch_goes_through_the_varlen_path(padding, device):
    """A padded batch (HF's 4D mask: causal & key padding) is packed into one varlen call per
    layer: logits at the real tokens as unpatched, and the gradient of a loss over them (fp32,
    with the reference's varlen path, so the packing is held to rounding)."""
    model = _llama().to(device)
    ids = torch.randint(0, 128, (3, 11), device=device)
    mask = _padding_mask(ids, padding)
    real = mask.bool()
    before = model(ids, attention_mask=mask).logits
    expected = before[real].detach()
    (expected_grad,) = torch.autograd.grad(before[real].square().mean(), model.model.embed_tokens.weight)
    ik.patch(model, backend="torch")
    with _attention_spy() as calls:
        after = model(ids, attention_mask=mask).logits
    assert calls.call_count == 2, "both layers through the kernel"
    assert max_abs_error(after[real], expected) <= 1e-5 * float(expected.abs().max())
    (grad,) = torch.autograd.grad(after[real].square().mean(), model.model.embed_tokens.weight)
    assert max_abs_error(grad, expected_grad) <= 1e-4 * float(expected_grad.abs().max())


def test_padded_batch_bf16_triton_three_run_rule(device):
    """The same packing with the Triton varlen kernel, bf16: at the real tokens, no worse than
    2x the error of the unpatched model in bf16 against it in fp32."""
    ids = torch.randint(0, 128, (3, 11), device=device)
    mask = _padding_mask(ids, "left")
    real = mask.bool()
    with torch.no_grad():
        exact = _llama().to(device)(ids, attention_mask=mask).logits[real]
        eager_error = max_abs_error(_llama().bfloat16().to(device)(ids, attention_mask=mask).logits[real].float(),
                                    exact)
        ours = _llama().bfloat16().to(device)
        ik.patch(ours, backend="triton")
        with _attention_spy() as calls:
            ours_error = max_abs_error(ours(ids, attention_mask=mask).logits[real].float(), exact)
    assert calls.call_count == 2
    assert ours_error <= 2 * eager_error, f"{ours_error:.3e} vs eager bf16 {eager_error:.3e}"


def test_padded_generation_matches_unpatched(device):
    """Left-padded batched greedy generation: the prefill through the varlen kernel, the
    one-token decode steps through SDPA (packing would copy the cache every step)."""
    model = _llama().to(device)
    ids = torch.randint(1, 128, (2, 7), device=device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        ik.patch(model, backend="torch")
        with _attention_spy() as calls:
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected)
    assert calls.call_count == 2, "the prefill's two layers; the decode steps went to SDPA"


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "padded_rows_unmasked", "no_padding"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_padded_chunk_over_a_longer_cache(causal, mask_kind):
    """Queries that are the last Sq of Sk key positions (a prefill chunk after a cache), left
    padding, GQA: the attention function against HF's SDPA path on the same 4D mask, at the
    real queries. The mask as HF versions give it: bool, additive (0 where allowed, the
    dtype's minimum elsewhere), or with the padded queries' rows fully unmasked (SDPA's guard
    against rows that see no key); without padding, the dense kernel takes the call unpacked."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # (non-causal calls whose queries are not their keys, Sq != Sk, are left to SDPA: below)
    batch, heads, heads_kv, seqlen_q, seqlen_k, d = 3, 4, 2, 5 if causal else 12, 12, 16
    query = torch.randn(batch, heads, seqlen_q, d)
    key, value = torch.randn(batch, heads_kv, seqlen_k, d), torch.randn(batch, heads_kv, seqlen_k, d)
    key_valid = torch.ones(batch, seqlen_k, dtype=torch.bool)
    if mask_kind != "no_padding":
        key_valid[0, :3], key_valid[2, :9] = False, False  # causal: 2 of the last row's 5 queries are padding
    # causal: (B, 1, Sq, Sk); full: (B, 1, 1, Sk), broadcast over the queries
    mask = (key_valid[:, None, :] & torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril(seqlen_k - seqlen_q)
            if causal else key_valid[:, None, :])[:, None]
    if mask_kind == "padded_rows_unmasked":
        mask = mask.expand(-1, -1, seqlen_q, -1) | ~key_valid[:, None, seqlen_k - seqlen_q:, None]
    elif mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = causal, heads // heads_kv
    setattr(module, patch_module._STATE, {"backend": "torch"})
    with _attention_spy() as calls:
        out, _ = patch_module._hf_attention(module, query, key, value, mask, scaling=0.3, is_causal=causal)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3, is_causal=causal)
    assert calls.call_count == 1
    assert (calls.call_args.kwargs.get("cu_seqlens_q") is None) == (mask_kind == "no_padding")
    real = key_valid[:, seqlen_k - seqlen_q:]
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))


@pytest.mark.parametrize("padded", [False, True], ids=["full_rows", "left_padded"])
def test_static_cache_generation_matches_unpatched(padded, device):
    """A static cache: the prefill sees the whole cache (its later slots empty), with no mask
    (HF reads that top-left: only the first Sq keys count) or a mask whose queries are not the
    last keys (left to SDPA); greedy tokens and first-step scores as unpatched."""
    model = _llama().to(device)
    ids = torch.randint(1, 128, (2, 6), device=device)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
    # 12 new tokens: the cache's empty slots outnumber the prompt, so with a mask the columns
    # of the "last Sq keys" are all empty slots and every query would read as padding
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, cache_implementation="static",
                  pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        ik.patch(model, rms_norm=False, rotary=False, backend="torch")
        generated = model.generate(ids, **kwargs)
    assert torch.equal(generated.sequences, expected.sequences)
    assert max_abs_error(generated.scores[0], expected.scores[0]) <= 1e-5 * float(expected.scores[0].abs().max())


def _masks_sdpa_keeps():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    fewer_keys = causal.clone()
    fewer_keys[4, 0] = False  # one query row sees fewer keys than causal & padding allows
    soft_bias = torch.zeros(6, 6).masked_fill(~causal, torch.finfo(torch.float32).min)
    soft_bias[1:, 1] = -2.0  # a bias on key 1 in every row that sees it: shaped like padding, but not padding
    return {"fewer_keys": fewer_keys[None, None], "soft_bias": soft_bias[None, None]}


@pytest.mark.parametrize("kind", sorted(_masks_sdpa_keeps()))
def test_other_masks_go_to_sdpa(kind):
    """A mask that is not causal & key padding is left to HF's SDPA path: same logits, no
    kernel call."""
    model = _llama()
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 128, (1, 6))
    mask = _masks_sdpa_keeps()[kind]
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        ik.patch(model, rms_norm=False, rotary=False, backend="torch")
        with _attention_spy() as calls:
            after = model(ids, attention_mask=mask).logits
    assert calls.call_count == 0
    assert torch.equal(after, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_auto_leaves_calls_no_kernel_takes_to_sdpa(dtype):
    """With "auto", a float32 model's attention stays on HF's SDPA path (the kernels take
    fp16 / bf16; the eager reference "auto" would choose is slower than SDPA); bf16 runs the
    kernel (Triton, under the interpreter here)."""
    model = _llama().to(dtype)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        ik.patch(model, rms_norm=False, rotary=False)
        with _attention_spy() as calls:
            after = model(ids).logits
    if dtype == torch.float32:
        assert calls.call_count == 0 and torch.equal(after, before)
    else:
        assert calls.call_count == 2


def test_static_cache_chunk_with_one_real_query_goes_to_sdpa():
    """A padded chunk into a static cache whose one real query is its last token: every row
    passes the row check (the real one equals causal & padding, the others see nothing), but
    the "last Sq keys" are empty slots, so no query reads as real; the call must go to SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seqlen_q, seqlen_k = 3, 16
    query, key, value = torch.randn(1, 4, seqlen_q, 8), torch.randn(1, 2, seqlen_k, 8), torch.randn(1, 2, seqlen_k, 8)
    real_key = torch.zeros(seqlen_k, dtype=torch.bool)
    real_key[2] = True  # the chunk [pad, pad, token] at positions 0-2, later slots empty
    mask = (torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril() & real_key)[None, None]
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    setattr(module, patch_module._STATE, {"backend": "torch"})
    with _attention_spy() as calls:
        out, _ = patch_module._hf_attention(module, query, key, value, mask, is_causal=True)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, is_causal=True)
    assert calls.call_count == 0
    torch.testing.assert_close(out[:, 2], expected[:, 2])


def test_mask_checks_outside_a_model():
    """The mask reading on its own: a batch-1 mask applies to every row; a non-causal call
    whose queries are not its keys (Sq != Sk) is not taken."""
    key_valid = torch.tensor([[False, True, True, True]])
    band = torch.ones(4, 4, dtype=torch.bool).tril()
    valid = patch_module._padding_from_mask((key_valid[:, None, :] & band)[:, None], 3, 4, 4, True)
    assert valid is not None and valid[0].shape == (3, 4) and bool(valid[0].eq(key_valid).all())
    assert patch_module._padding_from_mask(key_valid[:, None, None, :], 1, 2, 4, False) is None


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
