"""Rotary embeddings: every kernel backend against internlm_kernels.reference."""

from __future__ import annotations

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels import reference
from tests.helpers import DTYPES, KERNEL_BACKENDS, assert_close_dtype, assert_within_eager_error


def _qk(batch, seqlen, heads_q, heads_k, head_dim, dtype, device):
    q = torch.randn(batch, seqlen, heads_q, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen, heads_k, head_dim, device=device, dtype=dtype) if heads_k else None
    return q, k


def _check(q, k, cos, sin, backend, **kwargs):
    """Forward against the same-dtype reference, backward by the 3x-eager rule."""
    dtype = q.dtype
    q_out, k_out = ik.apply_rotary(q, k, cos, sin, backend=backend, **kwargs)
    q_ref, k_ref = reference.apply_rotary(q, k, cos, sin, **kwargs)
    assert_close_dtype(q_out, q_ref, dtype, "q")
    if k is None:
        assert k_out is None
    else:
        assert_close_dtype(k_out, k_ref, dtype, "k")

    inputs = [q] + ([k] if k is not None else [])
    grads = [torch.randn_like(t) for t in inputs]

    def run(fn, tensors, cos_, sin_):
        tensors = [t.detach().requires_grad_(True) for t in tensors]
        outs = fn(tensors[0], tensors[1] if len(tensors) > 1 else None, cos_, sin_, **kwargs)
        outs = [o for o in outs if o is not None]
        return torch.autograd.grad(outs, tensors, [g.to(o.dtype) for g, o in zip(grads, outs)])

    ours = run(lambda *a, **kw: ik.apply_rotary(*a, backend=backend, **kw), inputs, cos, sin)
    eager = run(reference.apply_rotary, inputs, cos, sin)
    exact = run(reference.apply_rotary, [t.double() for t in inputs], cos.double(), sin.double())
    assert_within_eager_error(ours, eager, exact, dtype, 3.0, "rotary grads")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [32, 16, 10], ids=["full", "partial", "partial_odd"])
def test_rotary_matches_reference(backend, dtype, interleaved, rotary_dim, device):
    # 5 q heads, 3 k heads, d 32: odd counts leave the CUDA kernel's last pair of heads with
    # one head, in q and in k. Partial: the rotated half is whole 16-byte chunks in every
    # dtype (the CUDA kernel's aligned instantiation); partial_odd: it is not.
    q, k = _qk(2, 7, 5, 3, 32, dtype, device)
    cos, sin = ik.rotary_cos_sin(12, rotary_dim, base=1e4, device=device)
    _check(q, k, cos, sin, backend, interleaved=interleaved, seqlen_offsets=3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("positions", ["per_batch", "shared", "offsets_tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["half_full_d32", "interleaved_partial_d80"])
def test_rotary_positions(backend, positions, dtype, layout, device):
    """Positions from position_ids or per-sequence offsets; also at head_dim 80 (not a power of
    two: the rotated and passed-through features end mid-vector) with interleaved partial
    rotary (rotary_dim 48)."""
    head_dim, rotary_dim, interleaved = (32, 32, False) if layout == "half_full_d32" else (80, 48, True)
    q, k = _qk(3, 5, 4, 1, head_dim, dtype, device)
    cos, sin = ik.rotary_cos_sin(40, rotary_dim, device=device)
    if positions == "per_batch":
        kwargs = {"position_ids": torch.randint(0, 40, (3, 5), device=device)}
    elif positions == "shared":
        kwargs = {"position_ids": torch.randperm(40, device=device)[:5].to(torch.int32)}
    else:
        kwargs = {"seqlen_offsets": torch.tensor([0, 17, 35], device=device, dtype=torch.int32)}
    _check(q, k, cos, sin, backend, interleaved=interleaved, **kwargs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rotary_packed_varlen(backend, device):
    # sequences of 3, 0 (empty), 1 and 5 tokens, then 2 padding tokens past cu_seqlens[-1]
    cu_seqlens = torch.tensor([0, 3, 3, 4, 9], device=device, dtype=torch.int32)
    q = torch.randn(11, 4, 16, device=device, dtype=torch.bfloat16)
    k = torch.randn(11, 2, 16, device=device, dtype=torch.bfloat16)
    cos, sin = ik.rotary_cos_sin(16, 16, device=device)
    _check(q, k, cos, sin, backend, cu_seqlens=cu_seqlens)
    offsets = torch.tensor([2, 0, 7, 1], device=device)
    _check(q, k, cos, sin, backend, cu_seqlens=cu_seqlens, seqlen_offsets=offsets)
    _check(q, k, cos, sin, backend, cu_seqlens=cu_seqlens, interleaved=True)
    for interleaved in (False, True):
        q_out, k_out = ik.apply_rotary(q, k, cos, sin, cu_seqlens=cu_seqlens, interleaved=interleaved,
                                       backend=backend)
        assert torch.equal(q_out[9:], q[9:]) and torch.equal(k_out[9:], k[9:]), "padding tokens must pass through"
    # Positions restart per sequence: token 3, alone in the third sequence, sits at
    # position 0, where the rotation is the identity.
    assert torch.equal(q_out[3], q[3]) and torch.equal(k_out[3], k[3])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rotary_packed_with_position_ids(backend, device):
    cu_seqlens = torch.tensor([0, 4, 6], device=device, dtype=torch.int32)
    q = torch.randn(6, 3, 8, device=device)
    cos, sin = ik.rotary_cos_sin(10, 8, device=device)
    position_ids = torch.tensor([0, 1, 2, 3, 5, 9], device=device)
    _check(q, None, cos, sin, backend, cu_seqlens=cu_seqlens, position_ids=position_ids)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rotary_strided_views(backend, device):
    # HF layout (B, H, S, D) passed as a transpose, and q/k as slices of a fused qkv buffer.
    q_hf = torch.randn(2, 4, 9, 32, device=device, dtype=torch.float16)
    qkv = torch.randn(2, 9, 4 + 2 * 2, 32, device=device, dtype=torch.float16)
    cos, sin = ik.rotary_cos_sin(9, 32, device=device)
    _check(q_hf.transpose(1, 2), qkv[:, :, 4:6], cos, sin, backend)
    q_out, _ = ik.apply_rotary(q_hf.transpose(1, 2), None, cos, sin, backend=backend)
    assert q_out.stride() == q_hf.transpose(1, 2).stride(), "dense outputs keep the input's layout"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("tables", ["bfloat16", "float16", "row_strided"])
def test_rotary_tables_in_other_dtypes_and_row_strides(backend, tables, device):
    """cos / sin as the caller may hold them: cast to the model's dtype (as HF's LLaMA does),
    or columns of a wider buffer, with sin's row stride different from cos's."""
    q, k = _qk(2, 7, 6, 2, 32, torch.bfloat16, device)
    cos, sin = ik.rotary_cos_sin(12, 16, device=device)
    if tables == "row_strided":
        cos = torch.cat([cos, torch.randn_like(cos)], dim=1)[:, :8]  # row stride 16
        sin = torch.stack([torch.randn_like(sin), sin, torch.randn_like(sin)], dim=1)[:, 1]  # row stride 24
        assert cos.stride(0) != sin.stride(0) and cos.stride(0) != cos.shape[1]
    else:
        cos, sin = cos.to(getattr(torch, tables)), sin.to(getattr(torch, tables))
    if backend == "cuda" and cos.dtype != torch.float32:
        with pytest.raises(RuntimeError, match=f"takes float32 cos/sin tables, got {cos.dtype}"):
            ik.apply_rotary(q, k, cos, sin, backend=backend, seqlen_offsets=2)
        return
    _check(q, k, cos, sin, backend, seqlen_offsets=2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_rotary_inplace(backend, device):
    qkv = torch.randn(2, 6, 8, 16, device=device, dtype=torch.bfloat16)
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]
    cos, sin = ik.rotary_cos_sin(8, 12, device=device)  # partial: the tail must stay as it was
    expected_q, expected_k = reference.apply_rotary(q.clone(), k.clone(), cos, sin, seqlen_offsets=2)
    untouched = qkv[:, :, 6:].clone()
    q_out, k_out = ik.apply_rotary(q, k, cos, sin, seqlen_offsets=2, inplace=True, backend=backend)
    assert q_out is q and k_out is k
    assert_close_dtype(q, expected_q, torch.bfloat16, "q in place")
    assert_close_dtype(k, expected_k, torch.bfloat16, "k in place")
    assert torch.equal(qkv[:, :, 6:], untouched), "v (outside q and k) must not change"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_positions_outside_table_give_nan(backend, device):
    q = torch.randn(1, 4, 2, 8, device=device)
    cos, sin = ik.rotary_cos_sin(6, 8, device=device)
    q_out, _ = ik.apply_rotary(q, None, cos, sin, position_ids=torch.tensor([0, 5, 6, -1], device=device),
                               backend=backend)
    assert torch.isfinite(q_out[0, :2]).all()
    assert torch.isnan(q_out[0, 2:]).all()


@pytest.mark.parametrize("case", ["q_expanded", "k_is_q", "q_and_k_overlap", "table_inside_q"])
def test_rotary_inplace_refuses_shared_memory(case, device):
    """In place, q and k are written: memory two of their elements share, or that they share
    with each other or with the tables, would make the writes race. (q and k as strided views
    of one fused QKV tensor do not meet: test_rotary_inplace.)"""
    buffer = torch.randn(2, 4, 6, 16, device=device)
    q, k = buffer[:, :, :2].clone(), buffer[:, :, 2:4].clone()
    cos, sin = ik.rotary_cos_sin(8, 16, device=device)
    if case == "q_expanded":
        q = buffer[:, :1, :2].expand(2, 4, 2, 16)
    elif case == "k_is_q":
        k = q
    elif case == "q_and_k_overlap":
        flat = torch.randn(3 * 4 * 2 * 16, device=device)
        q, k = flat[:2 * 4 * 2 * 16].view(2, 4, 2, 16), flat[4 * 2 * 16:].view(2, 4, 2, 16)
    else:
        table = torch.randn(2 * 4 * 2 * 16, device=device)
        q, cos = table.view(2, 4, 2, 16), table[:8 * 8].view(8, 8)
    with pytest.raises(ValueError, match="share"):
        ik.apply_rotary(q, k, cos, sin, inplace=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("inplace", [False, True])
def test_zero_width_tables_rotate_nothing(backend, inplace, device):
    """rotary_dim 0 (tables of shape (L, 0)): every feature passes through."""
    q = torch.randn(2, 5, 4, 16, device=device, dtype=torch.bfloat16)
    k = torch.randn(2, 5, 2, 16, device=device, dtype=torch.bfloat16)
    cos, sin = ik.rotary_cos_sin(8, 16, device=device)
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = ik.apply_rotary(q_in, k_in, cos[:, :0], sin[:, :0], inplace=inplace, backend=backend)
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_zero_size(backend, device):
    q = torch.randn(2, 0, 4, 16, device=device)
    cos, sin = ik.rotary_cos_sin(4, 16, device=device)
    q_out, k_out = ik.apply_rotary(q, q, cos, sin, backend=backend)
    assert q_out.shape == k_out.shape == q.shape


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_more_than_2_pow_31_elements(backend, device):
    heads, head_dim = 32, 128
    seqlen = (1 << 31) // (heads * head_dim) + 2  # the last tokens start past element 2^31
    free, _ = torch.cuda.mem_get_info()
    needed = 3 * seqlen * heads * head_dim * 2
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB free")
    q = torch.ones(1, seqlen, heads, head_dim, device=device, dtype=torch.bfloat16)
    q[:, -3:] = torch.randn(1, 3, heads, head_dim, device=device, dtype=torch.bfloat16)
    cos, sin = ik.rotary_cos_sin(seqlen, head_dim, base=1e6, device=device)
    q_out, _ = ik.apply_rotary(q, None, cos, sin, backend=backend)
    expected, _ = reference.apply_rotary(q[:, -3:], None, cos, sin, seqlen_offsets=seqlen - 3)
    assert_close_dtype(q_out[:, -3:], expected, torch.bfloat16, "tokens past 2^31")


@pytest.mark.gpu
def test_batch_past_the_grid_limit(device):
    """65540 sequences of one token (a decode step's shape): "cuda" refuses them by name,
    "auto" gives them to Triton, which launches them in slices of the grid's 65535 rows."""
    batch, head_dim = 65540, 64
    q = torch.randn(batch, 1, 4, head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, 1, 2, head_dim, device=device, dtype=torch.bfloat16)
    positions = torch.randint(0, 512, (batch, 1), device=device)
    cos, sin = ik.rotary_cos_sin(512, head_dim, base=1e6, device=device)
    with pytest.raises(RuntimeError, match="at most 65535 sequences"):
        ik.apply_rotary(q, k, cos, sin, position_ids=positions, backend="cuda")
    q_out, k_out = ik.apply_rotary(q, k, cos, sin, position_ids=positions)
    expected_q, expected_k = reference.apply_rotary(q, k, cos, sin, position_ids=positions)
    assert_close_dtype(q_out, expected_q, torch.bfloat16, "q past the grid limit")
    assert_close_dtype(k_out, expected_k, torch.bfloat16, "k past the grid limit")


@pytest.mark.gpu
def test_cuda_and_triton_agree(device):
    q, k = _qk(4, 300, 32, 8, 128, torch.bfloat16, device)
    cos, sin = ik.rotary_cos_sin(300, 128, base=1e6, device=device)
    a = ik.apply_rotary(q, k, cos, sin, backend="cuda")
    b = ik.apply_rotary(q, k, cos, sin, backend="triton")
    r = reference.apply_rotary(q, k, cos, sin)
    for x, y, z in zip(a, b, r):
        assert_close_dtype(x, z, torch.bfloat16, "cuda vs reference")
        assert_close_dtype(y, z, torch.bfloat16, "triton vs reference")
        assert_close_dtype(x, y, torch.bfloat16, "cuda vs triton")


# --------------------------------------------------------------------------------------
# tables, module, registration, compile
# --------------------------------------------------------------------------------------


def test_cos_sin_tables_follow_the_formula():
    cos, sin = ik.rotary_cos_sin(50, 16, base=500.0)
    assert cos.shape == sin.shape == (50, 8) and cos.dtype == torch.float32
    angle = 37 * 500.0 ** (-2 * 3 / 16)
    assert abs(float(cos[37, 3]) - torch.tensor(angle).cos().item()) < 1e-5
    # linear: positions divided by the factor
    lin_cos, _ = ik.rotary_cos_sin(50, 16, base=500.0, scaling={"type": "linear", "factor": 4.0})
    torch.testing.assert_close(lin_cos[40], cos[10], rtol=0, atol=1e-6)
    # dynamic: plain within max_position_embeddings, grown base beyond it
    dyn = {"type": "dynamic", "factor": 2.0, "max_position_embeddings": 50}
    torch.testing.assert_close(ik.rotary_cos_sin(50, 16, base=500.0, scaling=dyn)[0], cos)
    long_cos, _ = ik.rotary_cos_sin(80, 16, base=500.0, scaling=dyn)
    grown = 500.0 * ((2.0 * 80 / 50) - 1.0) ** (16 / 14)
    assert abs(float(long_cos[37, 3]) - torch.tensor(37 * grown ** (-6 / 16)).cos().item()) < 1e-5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rotary_module(backend, device):
    dyn = {"type": "dynamic", "factor": 2.0}
    module = ik.nn.RotaryEmbedding(16, base=1e4, scaling=dyn, max_position_embeddings=8, backend=backend).to(device)
    q, k = _qk(1, 12, 6, 2, 16, torch.float32, device)  # 12 > 8: NTK tables for length 12
    q_out, k_out = module(q, k)
    cos, sin = reference.rotary_cos_sin(12, 16, base=1e4, scaling={**dyn, "max_position_embeddings": 8},
                                        device=device)
    q_ref, k_ref = reference.apply_rotary(q, k, cos, sin)
    assert_close_dtype(q_out, q_ref, torch.float32, "module q")
    assert_close_dtype(k_out, k_ref, torch.float32, "module k")
    short_q, _ = module(q[:, :5], None)  # within max_position_embeddings: plain tables
    cos, sin = reference.rotary_cos_sin(5, 16, base=1e4, device=device)
    assert_close_dtype(short_q, reference.apply_rotary(q[:, :5], None, cos, sin)[0], torch.float32, "plain")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    q = torch.randn(2, 5, 4, 16, device=device, requires_grad=True)
    k = torch.randn(2, 5, 2, 16, device=device, requires_grad=True)
    cos, sin = ik.rotary_cos_sin(8, 12, device=device)
    ops = torch.ops.internlm_kernels
    torch.library.opcheck(ops.rotary.default, (q, k, cos, sin, None, None, 2, None, False, False, backend))
    offsets = torch.tensor([1, 3], device=device)
    torch.library.opcheck(ops.rotary.default, (q, k, cos, sin, None, offsets, 0, None, True, False, backend))
    torch.library.opcheck(ops.rotary_.default, (q.detach().clone(), k.detach().clone(), cos, sin, None, None, 0,
                                                None, False, False, backend))


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_compiles_without_graph_breaks(backend, device):
    torch._dynamo.reset()
    cos, sin = ik.rotary_cos_sin(16, 16, device=device)

    def attention_prologue(q, k, offsets):
        q, k = ik.apply_rotary(q * 1.5, k, cos, sin, seqlen_offsets=offsets, backend=backend)
        return (q.float() ** 2).sum() + k.sum()

    compiled = torch.compile(attention_prologue, fullgraph=True)
    q, k = _qk(2, 6, 4, 2, 16, torch.float32, device)
    q.requires_grad_(True)
    offsets = torch.tensor([0, 4], device=device)
    out = compiled(q, k, offsets)
    expected = attention_prologue(q, k, offsets)
    assert_close_dtype(out, expected, torch.float32, "compiled")
    (dq,) = torch.autograd.grad(out, q)
    (dq_eager,) = torch.autograd.grad(expected, q)
    assert_close_dtype(dq, dq_eager, torch.float32, "compiled grad")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiles_once_for_dynamic_shapes(backend, device):
    # One graph for every batch, length and packed token count: no size specialised by the ops.
    torch._dynamo.reset()
    cos, sin = ik.rotary_cos_sin(32, 16, device=device)

    def prologue(q, k, q_packed, k_packed, cu):
        dense = ik.apply_rotary(q * 1.5, k, cos, sin, backend=backend)
        packed = ik.apply_rotary(q_packed, k_packed, cos, sin, cu_seqlens=cu, backend=backend)
        return (*dense, *packed)

    compiled = torch.compile(prologue, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        # Sizes unlike each other and the fixed ones (heads, head dim, the 3 cu_seqlens entries):
        # Dynamo specialises sizes of 1 and ties equal sizes together (duck sizing).
        for batch, seqlen, tokens in ((5, 7, 11), (6, 9, 13)):
            q, k = _qk(batch, seqlen, 4, 2, 16, torch.float32, device)
            q_packed, k_packed = torch.randn(tokens, 4, 16, device=device), torch.randn(tokens, 2, 16, device=device)
            q.requires_grad_(True)
            cu = torch.tensor([0, 3, tokens], device=device, dtype=torch.int32)
            outs, expected = compiled(q, k, q_packed, k_packed, cu), prologue(q, k, q_packed, k_packed, cu)
            torch.testing.assert_close(outs, expected)
            grad = torch.randn_like(outs[0])
            torch.testing.assert_close(torch.autograd.grad(outs[0], q, grad), torch.autograd.grad(expected[0], q, grad))


# --------------------------------------------------------------------------------------
# bad input: clear errors before any launch
# --------------------------------------------------------------------------------------


BAD_ROTARY_CASES = {
    "packed_without_cu_seqlens": (ValueError, "q must be (B, S, H, D)"),
    "k_head_dim": (ValueError, "k (2, 5, 2, 8) must match q"),
    "k_dtype": (TypeError, "k has dtype torch.float16"),
    "cos_sin_shapes": (ValueError, "sin (8, 4) must have cos's shape (8, 6)"),
    "rotary_dim_too_big": (ValueError, "rotary_dim = 2 * cos.shape[1] = 20 exceeds head_dim 16"),
    "empty_tables": (ValueError, "cos and sin must hold at least one position, got shape (0, 6)"),
    "q_last_dim_strided": (ValueError, "q must have a contiguous last dimension"),
    "cu_seqlens_int64": (TypeError, "cu_seqlens must be int32"),
    "cu_seqlens_2d": (ValueError, "cu_seqlens must be 1-D"),
    "position_ids_shape": (ValueError, "position_ids must have shape"),
    "position_ids_float": (TypeError, "position_ids has dtype torch.float32"),
    "positions_and_offsets": (ValueError, "either position_ids or seqlen_offsets"),
    "offsets_past_table": (ValueError, "positions reach 10 (seqlen 5 + seqlen_offsets 6)"),
    "offsets_shape": (ValueError, "seqlen_offsets must be an int or have shape (B,) = (2,)"),
    "negative_offset": (ValueError, "seqlen_offsets must be >= 0"),
    "inplace_with_grad": (RuntimeError, "inplace=True is for inference"),
    "cos_requires_grad": (ValueError, "cos/sin are constant tables"),
    "int_q": (TypeError, "q has dtype torch.int64"),
    "position_ids_list": (TypeError, "position_ids must be a torch.Tensor or None, got list"),
    "cu_seqlens_list": (TypeError, "cu_seqlens must be a torch.Tensor or None, got list"),
    "interleaved_string": (TypeError, "interleaved must be a bool, got str 'no'"),
    "offsets_bool": (TypeError, "seqlen_offsets must be an int or an int tensor (B,), got bool"),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", sorted(BAD_ROTARY_CASES))
def test_rotary_bad_input(backend, case, device):
    q = torch.randn(2, 5, 4, 16, device=device)
    k = torch.randn(2, 5, 2, 16, device=device)
    cos, sin = ik.rotary_cos_sin(8, 12, device=device)
    kwargs = {}
    if case == "packed_without_cu_seqlens":
        q, k = q[0], k[0]
    elif case == "k_head_dim":
        k = torch.randn(2, 5, 2, 8, device=device)
    elif case == "k_dtype":
        k = k.half()
    elif case == "cos_sin_shapes":
        sin = sin[:, :4]
    elif case == "rotary_dim_too_big":
        cos, sin = ik.rotary_cos_sin(8, 20, device=device)
    elif case == "empty_tables":
        cos, sin = cos[:0], sin[:0]
    elif case == "q_last_dim_strided":
        q = torch.randn(2, 5, 4, 32, device=device)[..., ::2]
    elif case == "cu_seqlens_int64":
        q, k = q[0], k[0]
        kwargs["cu_seqlens"] = torch.tensor([0, 5], device=device)
    elif case == "cu_seqlens_2d":
        q, k = q[0], k[0]
        kwargs["cu_seqlens"] = torch.tensor([[0, 5]], device=device, dtype=torch.int32)
    elif case == "position_ids_shape":
        kwargs["position_ids"] = torch.zeros(3, 5, device=device, dtype=torch.int64)
    elif case == "position_ids_float":
        kwargs["position_ids"] = torch.zeros(5, device=device)
    elif case == "positions_and_offsets":
        kwargs.update(position_ids=torch.arange(5, device=device), seqlen_offsets=1)
    elif case == "offsets_past_table":
        kwargs["seqlen_offsets"] = 6
    elif case == "offsets_shape":
        kwargs["seqlen_offsets"] = torch.tensor([1, 2, 3], device=device)
    elif case == "negative_offset":
        kwargs["seqlen_offsets"] = -1
    elif case == "inplace_with_grad":
        q.requires_grad_(True)
        kwargs["inplace"] = True
    elif case == "cos_requires_grad":
        cos.requires_grad_(True)
    elif case == "int_q":
        q = torch.ones(2, 5, 4, 16, device=device, dtype=torch.int64)
    elif case == "position_ids_list":
        kwargs["position_ids"] = [0, 1, 2, 3, 4]
    elif case == "cu_seqlens_list":
        q, k = q[0], k[0]
        kwargs["cu_seqlens"] = [0, 5]
    elif case == "interleaved_string":
        kwargs["interleaved"] = "no"
    elif case == "offsets_bool":
        kwargs["seqlen_offsets"] = True
    error, message = BAD_ROTARY_CASES[case]
    with pytest.raises(error) as info:
        ik.apply_rotary(q, k, cos, sin, backend=backend, **kwargs)
    assert message in str(info.value), f"{message!r} not in {info.value!r}"


def test_rotary_cos_sin_bad_input():
    with pytest.raises(ValueError, match="rotary_dim must be a positive even int, got 7"):
        ik.rotary_cos_sin(8, 7)
    with pytest.raises(ValueError, match="scaling type must be 'linear' or 'dynamic', got 'yarn'"):
        ik.rotary_cos_sin(8, 8, scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"dynamic scaling needs \['max_position_embeddings'\]"):
        ik.rotary_cos_sin(8, 8, scaling={"type": "dynamic", "factor": 2.0})
    # values that gave a ZeroDivisionError, NaN tables or a complex base silently cut to real
    dynamic = {"type": "dynamic", "factor": 2.0, "max_position_embeddings": 4}
    for kwargs, error, words in [
        (dict(scaling={**dynamic, "max_position_embeddings": 0}), ValueError,
         r"scaling\['max_position_embeddings'\] must be a positive int, got 0"),
        (dict(scaling={**dynamic, "factor": -3}), ValueError, r"scaling\['factor'\] must be positive and finite"),
        (dict(scaling={"type": "linear", "factor": "2"}), TypeError, r"scaling\['factor'\] must be a float, got str"),
        (dict(scaling=2.0), TypeError, "scaling must be None or a dict"),
        (dict(base=0), ValueError, "base must be positive and finite, got 0"),
        (dict(base=float("nan")), ValueError, "base must be positive and finite, got nan"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating torch.dtype"),
    ]:
        with pytest.raises(error, match=words):
            ik.rotary_cos_sin(8, 16, **kwargs)
    with pytest.raises(ValueError, match="dynamic scaling needs rotary_dim > 2, got 2"):
        ik.rotary_cos_sin(8, 2, scaling=dynamic)
