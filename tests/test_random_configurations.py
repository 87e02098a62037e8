"""Seeded random configurations of every op against internlm_kernels.reference.

The op tests pick their shapes and options one axis at a time; here each case draws all of
them at once (batch, lengths, heads and group, head dim, dtype, masks and windows, packed
sequences, paged caches, rotary, strided layouts), so combinations nobody wrote down get run.
The draws are fixed by the seed: a failure names its seed and configuration, and reruns the
same. Under the Triton interpreter on CPU, and on a GPU for both kernel backends; the CUDA
emulation runs the same seeds (tests/test_cuda_emulation.py). INTERNLM_KERNELS_RANDOM_CASES
sets how many seeds run (20 by default).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.bench.cases import as_pages
from tests.helpers import KERNEL_BACKENDS, assert_close_dtype, assert_within_eager_error
from tests.test_attention import _check as check_attention
from tests.test_attention import _dim
from tests.test_rotary import _check as check_rotary

SEEDS = range(int(os.environ.get("INTERNLM_KERNELS_RANDOM_CASES", "20")))


def _strided(shape, dtype, device, rng: random.Random, heads_dim: int):
    """A random tensor of ``shape`` in one of the layouts callers hand over: contiguous, heads
    before positions (a transpose of HF's (B, H, S, D)), or a slice of a wider buffer (of the
    heads, as in a fused qkv projection, or of the last dimension)."""
    layout = rng.choice(["contiguous", "heads_first", "wider_heads", "wider_rows"])
    if layout == "heads_first" and heads_dim == len(shape) - 2 and len(shape) == 4:
        b, s, h, d = shape
        return torch.randn(b, h, s, d, device=device, dtype=dtype).transpose(1, 2), layout
    if layout == "wider_heads":
        wide = list(shape)
        wide[heads_dim] += 3
        return torch.randn(wide, device=device, dtype=dtype).narrow(heads_dim, 1, shape[heads_dim]), layout
    if layout == "wider_rows":
        wide = list(shape)
        wide[-1] += 8  # rows stay 16-byte aligned for the CUDA kernels
        return torch.randn(wide, device=device, dtype=dtype)[..., :shape[-1]], layout
    return torch.randn(shape, device=device, dtype=dtype), "contiguous"


def _window(rng: random.Random):
    return rng.choice([(-1, -1), (-1, -1), (rng.randint(0, 40), -1), (rng.randint(0, 20), rng.randint(0, 20)),
                       (-1, rng.randint(0, 20))])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_attention(backend, seed, device):
    rng = random.Random(1000 + seed)
    heads_kv = rng.choice([1, 2, 3])
    heads_q = heads_kv * rng.choice([1, 2, 4])
    head_dim = _dim(backend, rng.choice([32, 64, 128]))
    dtype = rng.choice([torch.float16, torch.bfloat16])
    causal, window = rng.random() < 0.5, _window(rng)
    packed = rng.random() < 0.4
    config = dict(seed=seed, heads=(heads_q, heads_kv), head_dim=head_dim, dtype=dtype, causal=causal,
                  window=window, packed=packed)
    kwargs = dict(causal=causal, window_size=window)
    if packed:
        sequences = rng.randint(1, 4)
        lengths_q = [rng.randint(0, 40) for _ in range(sequences)]
        lengths_k = [rng.randint(0, 40) for _ in range(sequences)]
        cu_q = torch.tensor([0] + lengths_q, device=device).cumsum(0).int()
        cu_k = torch.tensor([0] + lengths_k, device=device).cumsum(0).int()
        total_q, total_k = int(cu_q[-1]) + rng.randint(0, 3), int(cu_k[-1]) + rng.randint(0, 3)  # padding rows
        shapes = (max(total_q, 1), heads_q, head_dim), (max(total_k, 1), heads_kv, head_dim)
        kwargs.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        config.update(lengths_q=lengths_q, lengths_k=lengths_k, totals=(total_q, total_k))
        heads_axis = 1
    else:
        batch, seqlen_q, seqlen_k = rng.randint(1, 3), rng.randint(1, 70), rng.randint(1, 70)
        shapes = (batch, seqlen_q, heads_q, head_dim), (batch, seqlen_k, heads_kv, head_dim)
        config.update(batch=batch, seqlens=(seqlen_q, seqlen_k))
        heads_axis = 2
    q, q_layout = _strided(shapes[0], dtype, device, rng, heads_axis)
    k, k_layout = _strided(shapes[1], dtype, device, rng, heads_axis)
    v, v_layout = _strided(shapes[1], dtype, device, rng, heads_axis)
    config.update(layouts=(q_layout, k_layout, v_layout))
    try:
        check_attention(q, k, v, backend, **kwargs)
    except AssertionError as error:
        raise AssertionError(f"{config}: {error}") from error


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_kvcache(backend, seed, device):
    rng = random.Random(2000 + seed)
    heads_kv = rng.choice([1, 2])
    heads_q = heads_kv * rng.choice([1, 3, 4])
    head_dim = _dim(backend, rng.choice([32, 64]))
    dtype = rng.choice([torch.float16, torch.bfloat16])
    batch, capacity = rng.randint(1, 4), rng.randint(8, 200)
    new_tokens = rng.randint(0, 3)
    queries = max(new_tokens, 1)
    lengths = [rng.randint(0, capacity - new_tokens) for _ in range(batch)]
    causal, window = rng.random() < 0.7, _window(rng)
    paged = rng.random() < 0.5
    rotary = new_tokens > 0 and rng.random() < 0.5
    config = dict(seed=seed, heads=(heads_q, heads_kv), head_dim=head_dim, dtype=dtype, batch=batch,
                  capacity=capacity, new_tokens=new_tokens, lengths=lengths, causal=causal, window=window,
                  paged=paged, rotary=rotary)
    q, _ = _strided((batch, queries, heads_q, head_dim), dtype, device, rng, 2)
    k_cache = torch.randn(batch, capacity, heads_kv, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn(batch, capacity, heads_kv, head_dim, device=device, dtype=dtype)
    kwargs = dict(cache_seqlens=torch.tensor(lengths, device=device, dtype=torch.int32), causal=causal,
                  window_size=window)
    if new_tokens:
        kwargs["k"] = torch.randn(batch, new_tokens, heads_kv, head_dim, device=device, dtype=dtype)
        kwargs["v"] = torch.randn(batch, new_tokens, heads_kv, head_dim, device=device, dtype=dtype)
    if rotary:
        rotary_dim = rng.choice([head_dim, head_dim // 2])
        kwargs["rotary_cos"], kwargs["rotary_sin"] = ik.rotary_cos_sin(capacity, rotary_dim, device=device)
        kwargs["rotary_interleaved"] = rng.random() < 0.5
        config.update(rotary_dim=rotary_dim, interleaved=kwargs["rotary_interleaved"])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    if paged:
        page_size = rng.choice([1, 5, 16, 64])
        k_pages, v_pages, table = as_pages(k_cache, v_cache, page_size, spare_pages=2)
        caches, cache_kwargs = (k_pages, v_pages), dict(block_table=table)
        config.update(page_size=page_size)
    else:
        caches, cache_kwargs = (k_cache, v_cache), {}
    with torch.no_grad():
        out = ik.flash_attention_with_kvcache(q, *caches, backend=backend, **kwargs, **cache_kwargs)
        expected = reference.attention_with_kvcache(q, expected_k, expected_v, **kwargs)
        doubled = {name: t.double() if name in ("k", "v") else t for name, t in kwargs.items()}
        exact = reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), **doubled)
    if paged:
        k_cache = k_pages[table.long()].flatten(1, 2)[:, :capacity]
        v_cache = v_pages[table.long()].flatten(1, 2)[:, :capacity]
    try:
        assert_within_eager_error([out], [expected], [exact], dtype, 2.0, "out")
        # k is rotated in the input dtype inside the kernels, in fp32 by the reference
        torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=1e-2 if rotary else 0)
        assert torch.equal(v_cache, expected_v), "appended v, bit for bit"
    except AssertionError as error:
        raise AssertionError(f"{config}: {error}") from error


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_rms_norm(backend, seed, device):
    rng = random.Random(3000 + seed)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    weight_dtype = rng.choice([dtype, torch.float32])
    columns = rng.choice([8, 24, 96, 1000, 4096, 5000])
    leading = [rng.randint(1, 5) for _ in range(rng.randint(1, 3))]
    fused = rng.random() < 0.5
    residual_in_fp32 = fused and rng.random() < 0.5
    config = dict(seed=seed, dtype=dtype, weight_dtype=weight_dtype, shape=(*leading, columns), fused=fused,
                  residual_in_fp32=residual_in_fp32)
    x, x_layout = _strided((*leading, columns), dtype, device, rng, 0)
    weight = (1 + 0.1 * torch.randn(columns, device=device)).to(weight_dtype)
    eps = rng.choice([1e-6, 1e-5])
    config.update(layout=x_layout, eps=eps)
    inputs = [x.detach().requires_grad_(True), weight.detach().requires_grad_(True)]
    eager_inputs = [t.detach().requires_grad_(True) for t in (x, weight)]
    exact_inputs = [t.detach().double().requires_grad_(True) for t in (x, weight)]
    try:
        if fused:
            residual, _ = _strided((*leading, columns), dtype, device, rng, 0)
            out, res_out = ik.fused_add_rms_norm(inputs[0], residual, inputs[1], eps,
                                                 residual_in_fp32=residual_in_fp32, backend=backend)
            eager, eager_res = reference.fused_add_rms_norm(eager_inputs[0], residual, eager_inputs[1], eps,
                                                            residual_in_fp32=residual_in_fp32)
            exact, _ = reference.fused_add_rms_norm(exact_inputs[0], residual.double(), exact_inputs[1], eps,
                                                    residual_in_fp32=residual_in_fp32)
            assert_close_dtype(res_out, eager_res, res_out.dtype, "residual_out")
        else:
            out = ik.rms_norm(inputs[0], inputs[1], eps, backend=backend)
            eager = reference.rms_norm(eager_inputs[0], eager_inputs[1], eps)
            exact = reference.rms_norm(exact_inputs[0], exact_inputs[1], eps)
        assert out.dtype == eager.dtype and out.shape == eager.shape
        assert_within_eager_error([out], [eager], [exact], dtype, 2.0, "out")
        grad = torch.randn_like(out)
        ours = torch.autograd.grad(out, inputs, grad)
        theirs = torch.autograd.grad(eager, eager_inputs, grad)
        exact_grads = torch.autograd.grad(exact, exact_inputs, grad.double())
        assert_within_eager_error(ours, theirs, exact_grads, dtype, 3.0, "dx, dweight")
    except AssertionError as error:
        raise AssertionError(f"{config}: {error}") from error


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_rotary(backend, seed, device):
    rng = random.Random(4000 + seed)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    head_dim = rng.choice([16, 32, 64, 80, 128])
    rotary_dim = rng.choice([head_dim, head_dim // 2, 2 * rng.randint(1, head_dim // 2)])
    heads_q, heads_k = rng.randint(1, 6), rng.choice([0, 1, 2])
    interleaved = rng.random() < 0.5
    positions = rng.choice(["offset", "offsets_tensor", "position_ids", "packed"])
    config = dict(seed=seed, dtype=dtype, head_dim=head_dim, rotary_dim=rotary_dim, heads=(heads_q, heads_k),
                  interleaved=interleaved, positions=positions)
    table = 64
    cos, sin = ik.rotary_cos_sin(table, rotary_dim, base=rng.choice([1e4, 1e6]), device=device)
    kwargs = dict(interleaved=interleaved)
    if positions == "packed":
        lengths = [rng.randint(0, 20) for _ in range(rng.randint(1, 4))]
        cu = torch.tensor([0] + lengths, device=device).cumsum(0).int()
        tokens = int(cu[-1]) + rng.randint(0, 2)
        shape_q, shape_k = (max(tokens, 1), heads_q, head_dim), (max(tokens, 1), heads_k, head_dim)
        kwargs["cu_seqlens"] = cu
        config.update(lengths=lengths)
    else:
        batch, seqlen = rng.randint(1, 3), rng.randint(1, 30)
        shape_q, shape_k = (batch, seqlen, heads_q, head_dim), (batch, seqlen, heads_k, head_dim)
        if positions == "offset":
            kwargs["seqlen_offsets"] = rng.randint(0, table - seqlen)
        elif positions == "offsets_tensor":
            kwargs["seqlen_offsets"] = torch.randint(0, table - seqlen + 1, (batch,), device=device, dtype=torch.int32)
        else:
            kwargs["position_ids"] = torch.randint(0, table, (batch, seqlen), device=device)
        config.update(batch=batch, seqlen=seqlen)
    heads_axis = len(shape_q) - 2
    q, q_layout = _strided(shape_q, dtype, device, rng, heads_axis)
    k = _strided(shape_k, dtype, device, rng, heads_axis)[0] if heads_k else None
    config.update(layout=q_layout)
    try:
        check_rotary(q, k, cos, sin, backend, **kwargs)
    except AssertionError as error:
        raise AssertionError(f"{config}: {error}") from error
