"""The reference InternLM model: HF parity, checkpoint formats, generation, packed training.

HF ``transformers.LlamaForCausalLM`` is the outside oracle: tiny random configs are saved
with ``save_pretrained`` and loaded with ``from_pretrained``; fp32 logits must match HF's
within 1e-5 relative. "auto" runs RMSNorm and rotary through the Triton kernels (the
interpreter on CPU) and fp32 attention through the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels.models import InternLMForCausalLM, ModelArgs
from tests.helpers import max_abs_error

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HF_CONFIGS = {
    # InternLM v1-shaped: q/k/v/o biases, multi-head
    "v1_bias": dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True),
    # InternLM2/LLaMA-shaped GQA
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96),
    # InternLM3-shaped: explicit head_dim != hidden / heads
    "v3_head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "linear_scaling": dict(num_attention_heads=4, num_key_value_heads=2,
                           rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic_ntk": dict(num_attention_heads=4, num_key_value_heads=2,
                        rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "gqa_dynamic": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                        rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def _hf_model(name: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    max_position_embeddings=32, rope_theta=500.0, rms_norm_eps=1e-5)
    settings.update(HF_CONFIGS[name])
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():  # norms away from one, biases away from zero
        for param_name, param in model.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def _relative_error(actual, expected) -> float:
    return max_abs_error(actual, expected) / float(expected.abs().max())


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    paths = {}
    for name in HF_CONFIGS:
        path = str(root / name)
        _hf_model(name).save_pretrained(path)
        paths[name] = path
    return paths


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_match_hf_llama(saved_models, name, backend):
    hf = LlamaForCausalLM.from_pretrained(saved_models[name]).eval()
    ours = InternLMForCausalLM.from_pretrained(saved_models[name], backend=backend)
    seqlen = 45 if "dynamic" in name else 20  # 45 > max_position_embeddings: NTK base growth
    ids = torch.randint(0, 128, (2, seqlen))
    with torch.no_grad():
        error = _relative_error(ours(ids), hf(ids).logits)
    assert error <= 1e-5, f"{name}/{backend}: relative error {error:.2e}"


def _write_internlm2_checkpoint(hf: LlamaForCausalLM, path: str) -> None:
    """The same weights in InternLM2's published format: names mapped, wqkv packed per KV
    head as [q_(h*g) .. q_(h*g+g-1), k_h, v_h] blocks of D rows."""
    config = hf.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d, group = config.hidden_size // heads, heads // kv_heads
    state = {"model.tok_embeddings.weight": hf.model.embed_tokens.weight, "model.norm.weight": hf.model.norm.weight,
             "output.weight": hf.lm_head.weight}
    for i, layer in enumerate(hf.model.layers):
        prefix = f"model.layers.{i}."
        q = layer.self_attn.q_proj.weight.view(kv_heads, group, d, -1)
        k = layer.self_attn.k_proj.weight.view(kv_heads, 1, d, -1)
        v = layer.self_attn.v_proj.weight.view(kv_heads, 1, d, -1)
        state[prefix + "attention.wqkv.weight"] = torch.cat((q, k, v), dim=1).reshape(-1, config.hidden_size)
        state[prefix + "attention.wo.weight"] = layer.self_attn.o_proj.weight
        state[prefix + "feed_forward.w1.weight"] = layer.mlp.gate_proj.weight
        state[prefix + "feed_forward.w3.weight"] = layer.mlp.up_proj.weight
        state[prefix + "feed_forward.w2.weight"] = layer.mlp.down_proj.weight
        state[prefix + "attention_norm.weight"] = layer.input_layernorm.weight
        state[prefix + "ffn_norm.weight"] = layer.post_attention_layernorm.weight
        state[prefix + "attention.rotary_emb.inv_freq"] = torch.ones(d // 2)  # old checkpoints carry it
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    internlm2_config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": 500.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False,
        "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(internlm2_config, f)


def test_internlm2_checkpoint_gives_the_same_logits(tmp_path):
    hf = _hf_model("gqa_dynamic")
    _write_internlm2_checkpoint(hf, str(tmp_path / "internlm2"))
    ours = InternLMForCausalLM.from_pretrained(str(tmp_path / "internlm2"))
    assert ours.args.family == "internlm2"
    for seqlen in (20, 40):  # within and past max_position_embeddings (dynamic NTK)
        ids = torch.randint(0, 128, (2, seqlen))
        with torch.no_grad():
            assert _relative_error(ours(ids), hf(ids).logits) <= 1e-5


def test_sharded_and_bin_checkpoints_load(tmp_path):
    hf = _hf_model("gqa")
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        expected = hf(ids).logits
        assert _relative_error(InternLMForCausalLM.from_pretrained(str(tmp_path / "sharded"))(ids), expected) <= 1e-5
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # a pytorch_model.bin checkpoint
    os.makedirs(tmp_path / "torchbin")
    torch.save(state, tmp_path / "torchbin" / "pytorch_model.bin")
    with open(tmp_path / "torchbin" / "config.json", "w") as f:
        json.dump(json.load(open(tmp_path / "sharded" / "config.json")), f)
    with torch.no_grad():
        assert _relative_error(InternLMForCausalLM.from_pretrained(str(tmp_path / "torchbin"))(ids), expected) <= 1e-5


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape", "architecture", "config"])
def test_loading_errors_name_the_problem(tmp_path, problem):
    hf = _hf_model("gqa")
    path = str(tmp_path / "model")
    hf.save_pretrained(path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    config = json.load(open(os.path.join(path, "config.json")))
    expected = None
    if problem == "missing":
        del state["model.layers.1.mlp.up_proj.weight"]
        expected = "missing tensors ['model.layers.1.mlp.up_proj.weight']"
    elif problem == "unexpected":
        state["model.layers.0.extra.weight"] = torch.ones(3)
        expected = "unexpected tensors ['model.layers.0.extra.weight']"
    elif problem == "shape":
        state["model.layers.0.mlp.down_proj.weight"] = torch.ones(96, 95)
        expected = "shape mismatch for model.layers.0.mlp.down_proj.weight"
    elif problem == "architecture":
        config["architectures"] = ["GPT2LMHeadModel"]
        expected = "unknown architecture ['GPT2LMHeadModel']"
    else:
        os.remove(os.path.join(path, "config.json"))
        expected = "no config.json"
    if problem in ("missing", "unexpected", "shape"):
        save_file(state, os.path.join(path, "model.safetensors"))
    if problem == "architecture":
        json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises((RuntimeError, ValueError, FileNotFoundError)) as info:
        InternLMForCausalLM.from_pretrained(path)
    assert expected in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------
# generation, packed inputs, training
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-internlm2", "tiny-internlm3", "tiny-internlm"])
def test_generate_with_cache_equals_full_recomputation(preset):
    torch.manual_seed(0)
    model = InternLMForCausalLM(ModelArgs.from_name(preset)).eval()
    prompt = torch.randint(0, 256, (2, 7))
    out = model.generate(prompt, max_new_tokens=9, eos_token_id=[])
    ids = prompt
    with torch.no_grad():
        for _ in range(9):  # greedy by recomputing the whole sequence every step
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, ids)


def test_generate_stops_at_eos_and_samples_with_top_p():
    torch.manual_seed(0)
    model = InternLMForCausalLM(ModelArgs.from_name("tiny-internlm2")).eval()
    prompt = torch.randint(0, 256, (1, 4))
    greedy = model.generate(prompt, max_new_tokens=6, eos_token_id=[])
    stop = int(greedy[0, 6])  # make the third generated token an EOS
    stopped = model.generate(prompt, max_new_tokens=6, eos_token_id=stop)
    assert stopped.shape[1] == 7 and int(stopped[0, -1]) == stop
    gen = torch.Generator().manual_seed(3)
    sampled = model.generate(prompt, max_new_tokens=5, temperature=0.8, top_p=0.9, generator=gen, eos_token_id=[])
    assert sampled.shape == (1, 9) and torch.equal(sampled[:, :4], prompt)
    # top_p -> 0 keeps only the most likely token: sampling becomes greedy
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=1.0, top_p=1e-9, eos_token_id=[]),
                       greedy)


@pytest.mark.parametrize("eos", [False, True], ids=["no_eos", "eos"])
def test_generate_ragged_prompts_equal_each_prompt_alone(eos):
    """Prompts of 5, 2 and 7 tokens right-padded to 7 (random tokens in the padding, never
    read): each row is its prompt, then what generating from that prompt alone gives, then
    padding; with an EOS, a row that stops is padded with it."""
    torch.manual_seed(0)
    model = InternLMForCausalLM(ModelArgs.from_name("tiny-internlm2")).eval()
    lengths = [5, 2, 7]
    prompts = [torch.randint(0, 256, (1, n)) for n in lengths]
    padded = torch.randint(0, 256, (3, 7))
    for row, p in enumerate(prompts):
        padded[row, :p.shape[1]] = p[0]
    alone = [model.generate(p, max_new_tokens=6, eos_token_id=[])[0, p.shape[1]:] for p in prompts]
    stop = int(alone[0][2]) if eos else None  # the first row's third token, as an EOS
    eos_ids = [stop] if eos else []
    out = model.generate(padded, max_new_tokens=6, prompt_lengths=torch.tensor(lengths), eos_token_id=eos_ids)
    for row, (n, tokens) in enumerate(zip(lengths, alone)):
        if eos and (tokens == stop).any():  # cut after its first EOS, padded with the EOS
            first = int((tokens == stop).nonzero()[0])
            tokens = torch.cat((tokens[:first + 1], torch.full((len(tokens) - first - 1,), stop)))
        kept = out[row, n:n + len(tokens)]
        assert torch.equal(out[row, :n], padded[row, :n]), f"row {row}: its prompt"
        assert torch.equal(kept, tokens[:len(kept)]), f"row {row}: {kept.tolist()} vs alone {tokens.tolist()}"
        assert (out[row, n + len(kept):] == (stop if eos else 0)).all(), f"row {row}: padding after its tokens"
    # fewer new tokens than the shortest prompt's padding: what follows them is padding, not
    # the junk the input held there
    short = model.generate(padded, max_new_tokens=2, prompt_lengths=lengths, eos_token_id=[])
    assert torch.equal(short[1, 2:4], alone[1][:2]) and (short[1, 4:] == 0).all()
    with pytest.raises(ValueError, match=r"prompt_lengths must hold 3 lengths in \[1, 7\]"):
        model.generate(padded, max_new_tokens=2, prompt_lengths=[5, 0, 7])
    with pytest.raises(ValueError, match="prompt_lengths must hold 3 lengths"):
        model.generate(padded, max_new_tokens=2, prompt_lengths=[5.0, 2.0, 7.0])


def test_packed_forward_equals_per_sequence_forward():
    torch.manual_seed(0)
    model = InternLMForCausalLM(ModelArgs.from_name("tiny-internlm2")).eval()
    lengths = [5, 1, 9]
    tokens = torch.randint(0, 256, (sum(lengths),))
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    with torch.no_grad():
        packed = model(tokens, cu_seqlens=cu)
        start = 0
        for length in lengths:
            single = model(tokens[None, start:start + length])[0]
            assert _relative_error(packed[start:start + length], single) <= 1e-5
            start += length


def _train(model, batches, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def test_training_steps_with_kernels_match_eager(device):
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny-internlm2")
    kernels = InternLMForCausalLM(args, backend="auto").to(device)
    eager = InternLMForCausalLM(args, backend="torch").to(device)
    eager.load_state_dict(kernels.state_dict())
    batches = [torch.randint(0, 256, (2, 17), device=device) for _ in range(2)]
    ours, theirs = _train(kernels, batches, 4), _train(eager, batches, 4)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: loss {a} vs eager {b}"


@pytest.mark.gpu
def test_training_20_steps_bf16_on_gpu():
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny-internlm2")
    kernels = InternLMForCausalLM(args, backend="auto").cuda().bfloat16()
    eager = InternLMForCausalLM(args, backend="torch").cuda().bfloat16()
    eager.load_state_dict(kernels.state_dict())
    batches = [torch.randint(0, 256, (4, 33), device="cuda") for _ in range(4)]
    ours, theirs = _train(kernels, batches, 20), _train(eager, batches, 20)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 2e-2 * abs(b), f"step {step}: loss {a} vs eager {b}"


def _three_runs(device):
    """The three models of the whole-model rule, on the same random weights: the reference in
    fp32, the reference in bf16, ours (backend "auto") in bf16."""
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny-internlm2")
    reference32 = InternLMForCausalLM(args, backend="torch").eval().to(device)
    reference16 = InternLMForCausalLM(args, backend="torch").eval().bfloat16().to(device)
    ours = InternLMForCausalLM(args, backend="auto").eval().bfloat16().to(device)
    reference16.load_state_dict(reference32.state_dict())
    ours.load_state_dict(reference32.state_dict())
    return reference32, reference16, ours


def test_bf16_model_three_run_rule(device):
    """Ours in bf16 (every kernel: Triton attention too) vs the reference in fp32, no worse
    than twice the reference run in bf16 on the same weights."""
    reference32, reference16, ours = _three_runs(device)
    ids = torch.randint(0, 256, (2, 24), device=device)
    with torch.no_grad():
        exact = reference32(ids)
        ours_error = max_abs_error(ours(ids).float(), exact)
        eager_error = max_abs_error(reference16(ids).float(), exact)
    assert ours_error <= 2 * eager_error, f"{ours_error:.3e} vs eager bf16 {eager_error:.3e}"


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_fp8_cache_three_run_rule(cache_dtype, device):
    """A prefill and two decode steps over an fp8 KV cache: ours in bf16 (the KV-cache kernels)
    vs the reference in fp32 over its own fp8 cache, no worse than twice the reference in bf16
    over its fp8 cache; and generate keeps that cache."""
    reference32, reference16, ours = _three_runs(device)
    ids = torch.randint(0, 256, (2, 12), device=device)
    steps = torch.randint(0, 256, (2, 2), device=device)

    def logits(model):
        cache = model.new_cache(2, 16, cache_dtype)
        with torch.no_grad():
            out = [model(ids, cache=cache)[:, -1]] + [model(steps[:, i:i + 1], cache=cache)[:, -1] for i in range(2)]
        assert cache.k[0].dtype == cache_dtype and cache.v[-1].dtype == cache_dtype and cache.length == 14
        return torch.stack(out).float()

    exact = logits(reference32)
    ours_error, eager_error = max_abs_error(logits(ours), exact), max_abs_error(logits(reference16), exact)
    assert ours_error <= 2 * eager_error, f"{ours_error:.3e} vs eager bf16 {eager_error:.3e}"
    made = []  # the caches generate makes
    new_cache = ours.new_cache
    ours.new_cache = lambda *args: made.append(new_cache(*args)) or made[-1]
    generated = ours.generate(ids, max_new_tokens=3, eos_token_id=[], cache_dtype=cache_dtype)
    assert generated.shape == (2, 15) and torch.equal(generated[:, :12], ids)
    assert [cache.k[0].dtype for cache in made] == [cache_dtype]


def test_presets_cover_the_family_table():
    for name, (layers, hidden, heads, kv_heads, ffn, vocab) in {
        "internlm-7b": (32, 4096, 32, 32, 11008, 103168), "internlm-20b": (60, 5120, 40, 40, 13824, 103168),
        "internlm2-1_8b": (24, 2048, 16, 8, 8192, 92544), "internlm2-7b": (32, 4096, 32, 8, 14336, 92544),
        "internlm2-20b": (48, 6144, 48, 8, 16384, 92544), "internlm3-8b": (48, 4096, 32, 2, 10240, 128512),
    }.items():
        args = ModelArgs.from_name(name)
        assert (args.num_layers, args.hidden_size, args.num_heads, args.num_kv_heads, args.intermediate_size,
                args.vocab_size) == (layers, hidden, heads, kv_heads, ffn, vocab), name
        assert args.head_dim == 128
    with pytest.raises(ValueError, match="unknown preset 'gpt2'"):
        ModelArgs.from_name("gpt2")


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_generate_command_streams_tokens_from_ids(kv_cache_dtype):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "internlm_kernels", "generate", "--model", "tiny-internlm2",
                             "--prompt", "1 2 3 4", "--max-new-tokens", "5", "--backend", "torch",
                             "--kv-cache-dtype", kv_cache_dtype],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "token ids" in result.stdout and "tokens/s" in result.stdout
