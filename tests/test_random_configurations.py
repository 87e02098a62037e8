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

import contextlib
import os
import random

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.bench.cases import as_pages
from tests.helpers import KERNEL_BACKENDS, assert_close_dtype, assert_within_eager_error
from tests.test_attention import _check as check_attention
from tests.test_attention import _dim, _unpaged
from tests.test_rotary import _check as check_rotary

SEEDS = range(int(os.environ.get("INTERNLM_KERNELS_RANDOM_CASES", "20")))


def _strided(shape, dtype, device, rng: random.Random, heads_dim: int):
    """A random tensor of ``shape`` in one of the layouts callers hand over: contiguous, heads
    before positions (a transpose of HF's (B, H, S, D)), or a slice of a wider buffer (along
    ``heads_dim``, as q, k and v are slices of a fused qkv projection; a leading dimension for
    RMSNorm's rows), or of the last dimension). Returns the tensor and the layout's name."""
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


@contextlib.contextmanager
def _named(config: dict):
    """A failure names the seed and the configuration it drew."""
    try:
        yield
    except AssertionError as error:
        raise AssertionError(f"{config}: {error}") from error


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
    softmax_scale = rng.choice([None, None, round(rng.uniform(0.02, 0.5), 3)])
    long = rng.random() < 0.15  # several row and key tiles per sequence on either backend
    config = dict(seed=seed, heads=(heads_q, heads_kv), head_dim=head_dim, dtype=dtype, causal=causal,
                  window=window, packed=packed, softmax_scale=softmax_scale, long=long)
    kwargs = dict(causal=causal, window_size=window, softmax_scale=softmax_scale)
    if packed:
        sequences, longest = rng.randint(1, 4), 150 if long else 40
        lengths_q = [rng.randint(0, longest) for _ in range(sequences)]
        lengths_k = [rng.randint(0, longest) for _ in range(sequences)]
        cu_q = torch.tensor([0] + lengths_q, device=device).cumsum(0).int()
        cu_k = torch.tensor([0] + lengths_k, device=device).cumsum(0).int()
        total_q, total_k = int(cu_q[-1]) + rng.randint(0, 3), int(cu_k[-1]) + rng.randint(0, 3)  # padding rows
        shapes = (max(total_q, 1), heads_q, head_dim), (max(total_k, 1), heads_kv, head_dim)
        kwargs.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        config.update(lengths_q=lengths_q, lengths_k=lengths_k, totals=(total_q, total_k))
        heads_axis = 1
    else:
        longest = 260 if long else 70
        batch, seqlen_q, seqlen_k = rng.randint(1, 3), rng.randint(1, longest), rng.randint(1, longest)
        shapes = (batch, seqlen_q, heads_q, head_dim), (batch, seqlen_k, heads_kv, head_dim)
        config.update(batch=batch, seqlens=(seqlen_q, seqlen_k))
        heads_axis = 2
    q, q_layout = _strided(shapes[0], dtype, device, rng, heads_axis)
    k, k_layout = _strided(shapes[1], dtype, device, rng, heads_axis)
    v, v_layout = _strided(shapes[1], dtype, device, rng, heads_axis)
    deterministic = rng.random() < 0.3
    config.update(layouts=(q_layout, k_layout, v_layout), deterministic=deterministic)
    with _named(config):
        check_attention(q, k, v, backend, deterministic=deterministic, **kwargs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_kvcache(backend, seed, device):
    rng = random.Random(2000 + seed)
    heads_kv = rng.choice([1, 2])
    heads_q = heads_kv * rng.choice([1, 3, 4])
    head_dim = _dim(backend, rng.choice([32, 64]))
    dtype = rng.choice([torch.float16, torch.bfloat16])
    batch, capacity = rng.randint(1, 4), rng.randint(8, 200)
    paged, page_size = rng.random() < 0.5, rng.choice([1, 5, 16, 64])
    if paged:  # the pages hold the whole cache: S_max (what cache_seqlens=None fills) is the same
        capacity = -(-capacity // page_size) * page_size
    new_tokens, queries = rng.randint(0, 3), rng.randint(1, 4)
    # cache_seqlens as a (B,) tensor, one int for every row, or None (the cache is full)
    lengths_as = rng.choice(["tensor", "tensor", "int", "none"])
    if lengths_as == "tensor":
        lengths = [rng.randint(0, capacity - new_tokens) for _ in range(batch)]
        cache_seqlens = torch.tensor(lengths, device=device, dtype=torch.int32)
    elif lengths_as == "int":
        lengths = [rng.randint(0, capacity - new_tokens)] * batch
        cache_seqlens = lengths[0]
    else:
        lengths, cache_seqlens = [capacity - new_tokens] * batch, None
    causal, window = rng.random() < 0.7, _window(rng)
    softmax_scale = rng.choice([None, None, round(rng.uniform(0.02, 0.5), 3)])
    one_kv_buffer = not paged and rng.random() < 0.5  # k_cache, v_cache: halves of one (B, S, 2, H, D)
    rotary = new_tokens > 0 and rng.random() < 0.5
    config = dict(seed=seed, heads=(heads_q, heads_kv), head_dim=head_dim, dtype=dtype, batch=batch,
                  capacity=capacity, new_tokens=new_tokens, queries=queries, lengths=lengths, lengths_as=lengths_as,
                  causal=causal, window=window, softmax_scale=softmax_scale, paged=paged,
                  one_kv_buffer=one_kv_buffer, rotary=rotary)
    q, _ = _strided((batch, queries, heads_q, head_dim), dtype, device, rng, 2)
    if one_kv_buffer:
        kv = torch.randn(batch, capacity, 2, heads_kv, head_dim, device=device, dtype=dtype)
        k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    else:
        k_cache = torch.randn(batch, capacity, heads_kv, head_dim, device=device, dtype=dtype)
        v_cache = torch.randn(batch, capacity, heads_kv, head_dim, device=device, dtype=dtype)
    kwargs = dict(cache_seqlens=cache_seqlens, causal=causal, window_size=window, softmax_scale=softmax_scale)
    if new_tokens:
        kwargs["k"] = torch.randn(batch, new_tokens, heads_kv, head_dim, device=device, dtype=dtype)
        kwargs["v"] = torch.randn(batch, new_tokens, heads_kv, head_dim, device=device, dtype=dtype)
    if rotary:
        rotary_dim = rng.choice([head_dim, head_dim // 2])
        # q rotates at positions cache_seqlens + i, i < queries, which may pass the cache's end
        table = capacity + queries
        kwargs["rotary_cos"], kwargs["rotary_sin"] = ik.rotary_cos_sin(table, rotary_dim, device=device)
        kwargs["rotary_interleaved"] = rng.random() < 0.5
        config.update(rotary_dim=rotary_dim, interleaved=kwargs["rotary_interleaved"])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    if paged:
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
        k_cache, v_cache = _unpaged(k_pages, table), _unpaged(v_pages, table)
    with _named(config):
        assert_within_eager_error([out], [expected], [exact], dtype, 2.0, "out")
        # k is rotated in the input dtype inside the kernels, in fp32 by the reference
        torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=1e-2 if rotary else 0)
        assert torch.equal(v_cache, expected_v), "appended v, bit for bit"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_rms_norm(backend, seed, device):
    rng = random.Random(3000 + seed)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    mode = rng.choice(["plain", "fused", "fused_in_place"])
    # the in-place op writes the output into x: the weight must not widen it
    weight_dtype = dtype if mode == "fused_in_place" else rng.choice([dtype, torch.float32])
    residual_dtype = rng.choice([dtype, torch.float32])
    residual_in_fp32 = mode == "fused" and rng.random() < 0.5
    columns = rng.choice([8, 24, 96, 1000, 4096, 5000])
    leading = [rng.randint(1, 5) for _ in range(rng.randint(1, 3))]
    eps = rng.choice([1e-6, 1e-5])
    shape = (*leading, columns)
    x, x_layout = _strided(shape, dtype, device, rng, 0)
    residual, residual_layout = _strided(shape, residual_dtype, device, rng, 0)
    weight = (1 + 0.1 * torch.randn(columns, device=device)).to(weight_dtype)
    config = dict(seed=seed, mode=mode, dtype=dtype, weight_dtype=weight_dtype, shape=shape, eps=eps,
                  layouts=(x_layout, residual_layout))
    if mode != "plain":
        config.update(residual_dtype=residual_dtype, residual_in_fp32=residual_in_fp32)
    with _named(config):
        if mode == "fused_in_place":
            with torch.no_grad():
                expected_out, expected_residual = reference.fused_add_rms_norm(x, residual, weight, eps)
                ik.fused_add_rms_norm_(x, residual, weight, eps, backend=backend)
            assert_close_dtype(x, expected_out, dtype, "x <- out")
            assert_close_dtype(residual, expected_residual, residual_dtype, "residual <- sum")
            return
        tensors = (x, weight) if mode == "plain" else (x, residual, weight)
        inputs = [t.detach().requires_grad_(True) for t in tensors]
        eager_inputs = [t.detach().requires_grad_(True) for t in tensors]
        exact_inputs = [t.detach().double().requires_grad_(True) for t in tensors]
        if mode == "plain":
            outs = [ik.rms_norm(*inputs, eps, backend=backend)]
            eager = [reference.rms_norm(*eager_inputs, eps)]
            exact = [reference.rms_norm(*exact_inputs, eps)]
        else:
            fused = dict(residual_in_fp32=residual_in_fp32)
            outs = list(ik.fused_add_rms_norm(*inputs, eps, backend=backend, **fused))
            eager = list(reference.fused_add_rms_norm(*eager_inputs, eps, **fused))
            exact = list(reference.fused_add_rms_norm(*exact_inputs, eps, **fused))
            assert_close_dtype(outs[1], eager[1], eager[1].dtype, "residual_out")
        assert [o.dtype for o in outs] == [e.dtype for e in eager] and outs[0].shape == eager[0].shape
        assert_within_eager_error(outs[:1], eager[:1], exact[:1], dtype, 2.0, "out")
        grads = [torch.randn_like(o) for o in outs]
        ours = torch.autograd.grad(outs, inputs, grads)
        theirs = torch.autograd.grad(eager, eager_inputs, grads)
        exact_grads = torch.autograd.grad(exact, exact_inputs, [g.double() for g in grads])
        assert_within_eager_error(ours, theirs, exact_grads, dtype, 3.0, "dx, (dresidual,) dweight")


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
    in_place = rng.random() < 0.3  # inference: q and k rotated where they are
    config.update(layout=q_layout, in_place=in_place)
    with _named(config):
        if in_place:
            expected_q, expected_k = reference.apply_rotary(q, k, cos, sin, **kwargs)
            q_out, k_out = ik.apply_rotary(q, k, cos, sin, inplace=True, backend=backend, **kwargs)
            assert q_out is q and k_out is k
            assert_close_dtype(q, expected_q, dtype, "q in place")
            if k is not None:
                assert_close_dtype(k, expected_k, dtype, "k in place")
        else:
            check_rotary(q, k, cos, sin, backend, **kwargs)
