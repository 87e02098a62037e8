"""RMSNorm and fused add+RMSNorm: every kernel backend against internlm_kernels.reference."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels import backends, reference
from tests.helpers import DTYPES, KERNEL_BACKENDS, assert_close_dtype, assert_within_eager_error

rms_ops = importlib.import_module("internlm_kernels.ops.rms_norm")  # the module, not the function
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (rows, hidden): awkward widths, 1 to past the single-pass limit (16384 -> looped path)
SHAPES = [(1, 1), (19, 123), (3, 1000), (2, 5120), (5, 8200), (2, 20000)]


def _inputs(shape, dtype, device, weight_dtype=None):
    """x with every row at its own scale (10^-1.5 to 10^1.5): with rows of one scale a
    kernel that took another row's statistics would pass, the tolerance being relative to
    the largest value."""
    scales = 10 ** (3 * torch.rand(shape[:-1] + (1,), device=device) - 1.5)
    x = (torch.randn(shape, device=device) * scales).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(weight_dtype or dtype)
    return x, weight


def _grads(fn, inputs, grad_outputs):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return outputs, torch.autograd.grad(outputs, inputs, grad_outputs)


def _check_rms_norm(x, weight, backend, eps=1e-6, dy=None):
    """Forward against the same-dtype reference; backward (of ``dy``, fresh when None) by the
    3x-eager rule."""
    dtype = x.dtype
    out = ik.rms_norm(x, weight, eps, backend=backend)
    assert_close_dtype(out, reference.rms_norm(x, weight, eps), dtype, "rms_norm out")
    dy = torch.randn_like(out) if dy is None else dy
    (_,), ours = _grads(lambda a, b: ik.rms_norm(a, b, eps, backend=backend), (x, weight), (dy,))
    (_,), eager = _grads(lambda a, b: reference.rms_norm(a, b, eps), (x, weight), (dy,))
    (_,), exact = _grads(lambda a, b: reference.rms_norm(a, b, eps), (x.double(), weight.double()),
                         (dy.double(),))
    assert ours[0].dtype == x.dtype and ours[1].dtype == weight.dtype
    assert_within_eager_error(ours, eager, exact, dtype, 3.0, "rms_norm grads")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_reference(backend, dtype, shape, device):
    _check_rms_norm(*_inputs(shape, dtype, device), backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_mixed_weight_dtype_promotes_like_hf(backend, dtype, device):
    # HF: weight (fp32) * x_hat.to(bf16) -> fp32 output
    x, weight = _inputs((7, 96), dtype, device, weight_dtype=torch.float32)
    out = ik.rms_norm(x, weight, backend=backend)
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    _check_rms_norm(x, weight, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["bf16_rows_fp32_weight_16384", "fp32_8192", "weight_off_alignment_4096"])
def test_rms_norm_wide_rows_and_weight_layouts(backend, case, device):
    """The CUDA forward's extremes: an fp32 weight under bf16 rows of 16384 stages 64 KiB of
    weight in shared memory (past the 48 KiB a block gets without opting in); fp32 rows of
    8192 take the kernel sized for 4 chunks per thread; a weight one element off 16-byte
    alignment is loaded directly instead of staged."""
    if case == "bf16_rows_fp32_weight_16384":
        x, weight = _inputs((3, 16384), torch.bfloat16, device, weight_dtype=torch.float32)
    elif case == "fp32_8192":
        x, weight = _inputs((5, 8192), torch.float32, device)
    else:
        x, _ = _inputs((6, 4096), torch.bfloat16, device)
        weight = (1 + 0.5 * torch.randn(4097, device=device)).to(torch.bfloat16)[1:]
        assert weight.data_ptr() % 16 != 0
    _check_rms_norm(x, weight, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row_slice", "transposed_3d", "permuted_4d", "batched_rows"])
def test_rms_norm_non_contiguous_rows(backend, dtype, layout, device):
    if layout == "row_slice":  # rows of a wider buffer: row stride 300, hidden 257
        x = torch.randn(11, 300, device=device, dtype=dtype)[:, 5:262]
    elif layout == "transposed_3d":  # (S, B, N) seen as (B, S, N)
        x = torch.randn(6, 3, 160, device=device, dtype=dtype).transpose(0, 1)
    elif layout == "permuted_4d":  # leading dims that do not merge: copied internally, still correct
        x = torch.randn(3, 4, 5, 64, device=device, dtype=dtype).permute(2, 0, 1, 3)
    else:  # every other row of a (B, S, N) activation
        x = torch.randn(2, 10, 128, device=device, dtype=dtype)[:, ::2]
    assert not x.is_contiguous()
    weight = (1 + 0.5 * torch.randn(x.shape[-1], device=device)).to(dtype)
    # the gradient with row strides of its own: rows of a wider buffer
    dy = torch.randn(*x.shape[:-1], x.shape[-1] + 24, device=device, dtype=x.dtype)[..., 8:-16]
    _check_rms_norm(x, weight, backend, dy=dy)


def _check_fused(x, residual, weight, backend, residual_in_fp32, eps=1e-6):
    dtype = x.dtype
    out, residual_out = ik.fused_add_rms_norm(x, residual, weight, eps, residual_in_fp32=residual_in_fp32,
                                              backend=backend)
    ref_out, ref_residual_out = reference.fused_add_rms_norm(x, residual, weight, eps, residual_in_fp32)
    assert_close_dtype(out, ref_out, dtype, "fused out")
    assert_close_dtype(residual_out, ref_residual_out, residual_out.dtype, "fused residual_out")
    grads = (torch.randn_like(out), torch.randn_like(residual_out))

    def ours_fn(a, r, w):
        return ik.fused_add_rms_norm(a, r, w, eps, residual_in_fp32=residual_in_fp32, backend=backend)

    def ref_fn(a, r, w):
        return reference.fused_add_rms_norm(a, r, w, eps, residual_in_fp32)

    _, ours = _grads(ours_fn, (x, residual, weight), grads)
    _, eager = _grads(ref_fn, (x, residual, weight), grads)
    _, exact = _grads(ref_fn, (x.double(), residual.double(), weight.double()), tuple(g.double() for g in grads))
    assert [g.dtype for g in ours] == [x.dtype, residual.dtype, weight.dtype]
    assert_within_eager_error(ours, eager, exact, dtype, 3.0, "fused grads")


@pytest.fixture
def launches(monkeypatch, device):
    """(backend, launcher) of each launch the norm ops make. Without a GPU, "cuda" is made
    choosable for CPU tensors and its launches run Triton's launchers (under the interpreter),
    so the record follows the ops layer's choices; on a GPU each backend runs its own kernels."""
    on_gpu = device.type == "cuda"
    if on_gpu and backends.extension is None:
        pytest.skip(f"the cuda backend is unavailable: {backends.available_backends()['cuda'].reason}")
    if not on_gpu:
        device_reason = backends._device_reason
        monkeypatch.setattr(backends, "_device_reason",
                            lambda backend, dev: None if backend == "cuda" else device_reason(backend, dev))
    log = []
    real_kernels = rms_ops.kernels

    class Recorder:
        def __init__(self, backend, op):
            self.backend, self.module = backend, real_kernels(backend if on_gpu else "triton", op)

        def __getattr__(self, launcher):
            log.append((self.backend, launcher))
            return getattr(self.module, launcher)

    monkeypatch.setattr(rms_ops, "kernels", Recorder)
    return log


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("forward, backward", [("triton", "cuda"), ("cuda", "triton")])
def test_auto_runs_the_backward_on_its_own_backend(fused, forward, backward, device, launches, monkeypatch):
    # "auto" can take different backends for the two directions (backends.AUTO_PREFERENCE_BY_OP):
    # the backward runs the one chosen for it, on the forward's saved rstd, within the usual rules.
    order = {"triton": backends.AUTO_PREFERENCE, "cuda": backends.CUDA_FIRST}
    op = "fused_add_rms_norm" if fused else "rms_norm"
    monkeypatch.setitem(backends.AUTO_PREFERENCE_BY_OP, op, order[forward])
    monkeypatch.setitem(backends.AUTO_PREFERENCE_BY_OP, op + backends.BACKWARD_SUFFIX, order[backward])
    x, weight = _inputs((7, 4096), torch.bfloat16, device)
    if fused:
        _check_fused(x, torch.randn_like(x), weight, "auto", residual_in_fp32=False)
    else:
        _check_rms_norm(x, weight, "auto")
    assert set(launches) == {(forward, "rms_norm_fwd"), (backward, "rms_norm_bwd")}


def test_explicit_backend_runs_both_directions(device, launches):
    x, weight = _inputs((3, 256), torch.float32, device)
    _check_rms_norm(x, weight, "triton")
    _check_fused(x, torch.randn_like(x), weight, "triton", residual_in_fp32=True)
    assert set(launches) == {("triton", "rms_norm_fwd"), ("triton", "rms_norm_bwd")}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (19, 123), (3, 1000), (2, 5120), (5, 8200), (2, 20000)], ids=str)
@pytest.mark.parametrize("residual_in_fp32", [False, True], ids=["res_dtype", "res_fp32"])
def test_fused_add_rms_norm_matches_reference(backend, dtype, shape, residual_in_fp32, device):
    x, weight = _inputs(shape, dtype, device)
    residual = torch.randn(shape, device=device, dtype=dtype)
    _check_fused(x, residual, weight, backend, residual_in_fp32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual_in_fp32", [False, True], ids=["res_dtype", "res_fp32"])
def test_fused_add_rms_norm_fp32_weight_promotes_like_hf(backend, dtype, residual_in_fp32, device):
    x, weight = _inputs((7, 96), dtype, device, weight_dtype=torch.float32)
    residual = torch.randn(7, 96, device=device, dtype=dtype)
    _check_fused(x, residual, weight, backend, residual_in_fp32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_add_rms_norm_fp32_residual_stream_and_strides(backend, device):
    # bf16 activations added into an fp32 residual stream; both inputs strided.
    x = torch.randn(4, 9, 200, device=device, dtype=torch.bfloat16)[:, ::3, :96]
    residual = torch.randn(4, 3, 128, device=device, dtype=torch.float32)[..., 16:112]
    weight = (1 + 0.5 * torch.randn(96, device=device)).to(torch.bfloat16)
    _check_fused(x, residual, weight, backend, residual_in_fp32=False)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 64), (2, 20000)], ids=str)
@pytest.mark.parametrize("residual_in_fp32", [False, True], ids=["res_dtype", "res_fp32"])
def test_gradient_through_the_normed_output_only(backend, dtype, shape, residual_in_fp32, device):
    """The last block's residual_out may be unused: only d(out) flows back (the kernels'
    branch without dresidual_out), to x, residual and weight, by the eager rule."""
    x, weight = _inputs(shape, dtype, device)
    residual = torch.randn(shape, device=device, dtype=dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)

    def normed(fn, **kwargs):
        return lambda a, r, w: fn(a, r, w, 1e-6, residual_in_fp32=residual_in_fp32, **kwargs)[0]
    _, ours = _grads(normed(ik.fused_add_rms_norm, backend=backend), (x, residual, weight), (dy,))
    _, eager = _grads(normed(reference.fused_add_rms_norm), (x, residual, weight), (dy,))
    _, exact = _grads(normed(reference.fused_add_rms_norm), (x.double(), residual.double(), weight.double()),
                      (dy.double(),))
    assert_within_eager_error(ours, eager, exact, dtype, 3.0, "grads through out only")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 40), (5, 8200), (2, 20000)], ids=str)
def test_frozen_weight_gets_no_gradient(backend, dtype, shape, device):
    """The backward without dweight is its own branch of the kernels: dx by the eager rule
    (register, staged and looped rows), and no weight.grad."""
    x, weight = _inputs(shape, dtype, device)
    dy = torch.randn(shape, device=device, dtype=dtype)
    _, ours = _grads(lambda a: ik.rms_norm(a, weight, backend=backend), (x,), (dy,))
    _, eager = _grads(lambda a: reference.rms_norm(a, weight), (x,), (dy,))
    _, exact = _grads(lambda a: reference.rms_norm(a, weight.double()), (x.double(),), (dy.double(),))
    assert_within_eager_error(ours, eager, exact, dtype, 3.0, "dx with a frozen weight")
    x.requires_grad_(True)
    ik.rms_norm(x, weight, backend=backend).sum().backward()
    assert weight.grad is None and x.grad is not None


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_zero_size_inputs_return_empty(backend, device):
    x = torch.randn(0, 64, device=device, requires_grad=True)
    weight = torch.randn(64, device=device, requires_grad=True)
    out = ik.rms_norm(x, weight, backend=backend)
    assert out.shape == (0, 64)
    out.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(weight.grad, torch.zeros_like(weight))
    out, residual_out = ik.fused_add_rms_norm(x, x, weight, backend=backend)
    assert out.shape == residual_out.shape == (0, 64)


def test_torch_backend_is_the_reference(device):
    x, weight = _inputs((4, 33), torch.bfloat16, device)
    assert torch.equal(ik.rms_norm(x, weight, backend="torch"), reference.rms_norm(x, weight))


class _MustNotLaunch:
    """Stands in for a kernel that a test requires not to run."""

    def __getitem__(self, grid):
        raise AssertionError("the pointer backward kernel ran where the TMA kernel was required")


def _require_tma_kernel(monkeypatch, device):
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs compute capability 9.0 or newer")
    from internlm_kernels.triton import rms_norm as triton_rms_norm
    monkeypatch.setenv(triton_rms_norm.TMA_BWD_ENV, "1")
    monkeypatch.setattr(triton_rms_norm, "_rms_norm_bwd_kernel", _MustNotLaunch())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["rows_5120", "rows_6000", "rows_1000", "rows_128", "every_other_row_4096",
                                    "batch_slices_4096"])
@pytest.mark.parametrize("op", ["plain", "fused", "fused_fp32_residual"])
def test_triton_backward_tma_kernel(dtype, layout, op, device, monkeypatch):
    # The Triton backward's row loads through TMA descriptors, pipelined (the default on
    # sm_90+), here forced and required: the pointer kernel fails if it runs. Widths past a
    # power of two leave columns the descriptor zero-fills; narrow rows take several rows a
    # step (1000: 4, 128: 32), past the last row and into the next program's. Evenly strided
    # rows (every other row of a batch) are read as one slice; the first 5 positions of each
    # batch entry keep both strides, one row a step.
    _require_tma_kernel(monkeypatch, device)
    if layout == "every_other_row_4096":
        x = torch.randn(2, 10, 4096, device=device, dtype=dtype)[:, ::2]
    elif layout == "batch_slices_4096":
        x = torch.randn(2, 12, 4096, device=device, dtype=dtype)[:, :5]
    else:
        x = torch.randn(37 if layout == "rows_128" else 3, int(layout.split("_")[1]), device=device, dtype=dtype)
    weight = (1 + 0.5 * torch.randn(x.shape[-1], device=device)).to(dtype)
    if op == "plain":
        _check_rms_norm(x, weight, "triton")
    else:
        _check_fused(x, torch.randn_like(x), weight, "triton", residual_in_fp32=op == "fused_fp32_residual")


@pytest.mark.parametrize("layout, expected", [
    ("contiguous_bf16_8192", 3),     # two steps ahead: 2 x (dy, x) x 16 KiB of buffers
    ("fused_bf16_16384", 2),         # 2 x 3 x 32 KiB would pass the prefetch budget: one step ahead
    ("narrow_bf16_1000", 3),         # 4 rows a step (8 KiB), of one (1, M, N) view
    ("fp32_16384", None),            # 64 KiB rows: the pointer kernel
    ("row_stride_not_16_bytes", None),  # rows 300 elements apart (600 bytes)
    ("transposed", None),            # (S, B, N) read as (B, S, N): rows out of order
    ("unaligned_base", None),
    ("batch_slices_4096", 3),        # rows not evenly strided: both strides, one row a step
    ("batch_slices_1000", None),     # ... which several rows a step cannot take
    ("tiny_bf16_4", None),           # 8-byte rows 16 bytes apart: a TMA box row is at least 16 bytes
])
def test_triton_backward_tma_eligibility(layout, expected, monkeypatch):
    # Which inputs the TMA kernel takes, with its budget (no kernel runs: CPU tensors).
    from internlm_kernels.triton import rms_norm as triton_rms_norm
    monkeypatch.setenv(triton_rms_norm.TMA_BWD_ENV, "1")
    width = {"contiguous_bf16_8192": 8192, "row_stride_not_16_bytes": 257, "transposed": 4096,
             "narrow_bf16_1000": 1000, "batch_slices_4096": 4096, "batch_slices_1000": 1000,
             "tiny_bf16_4": 4}.get(layout, 16384)
    dtype = torch.float32 if layout == "fp32_16384" else torch.bfloat16
    if layout == "row_stride_not_16_bytes":
        rows = torch.randn(11, 300, dtype=dtype)[:, 5:262].reshape(1, 11, 257)
    elif layout == "transposed":
        rows = torch.randn(6, 3, width, dtype=dtype).transpose(0, 1)
    elif layout == "unaligned_base":
        rows = torch.randn(4 * width + 1, dtype=dtype)[1:].view(1, 4, width)
    elif layout.startswith("batch_slices"):
        rows = torch.randn(2, 12, width, dtype=dtype)[:, :5]
    elif layout == "tiny_bf16_4":
        rows = torch.randn(1, 4, 2 * width, dtype=dtype)[..., :width]
    else:
        rows = torch.randn(1, 4, width, dtype=dtype)
    inputs = (rows, rows, rows) if layout.startswith("fused") else (rows, rows)
    block_m, block_n, _, _ = triton_rms_norm.rms_norm_block_config(width, backward=True)
    plan = triton_rms_norm._tma_bwd_plan(inputs, block_m, block_n, 4)
    assert (plan and plan[0]) == expected
    if plan is not None and layout.startswith("batch_slices"):
        assert plan[1][0][0] is rows and plan[2] == 5  # both strides kept
    elif plan is not None:
        assert plan[1][0][0].shape == (1, rows.shape[0] * rows.shape[1], width)
    monkeypatch.setenv(triton_rms_norm.TMA_BWD_ENV, "0")
    assert triton_rms_norm._tma_bwd_plan(inputs, block_m, block_n, 4) is None


@pytest.mark.parametrize("fused, expected", [(False, 2), (True, None)], ids=["plain", "fused"])
def test_triton_backward_tma_fits_the_devices_shared_memory(fused, expected, monkeypatch):
    # On a part whose blocks get 99 KiB (sm_120), bf16 rows of 16384 (32 KiB per input and
    # step) prefetch one step ahead for the plain op (64 KiB), and the fused op's three inputs
    # (96 KiB with its reductions past the limit) take the pointer kernel.
    from internlm_kernels.triton import rms_norm as triton_rms_norm
    monkeypatch.setenv(triton_rms_norm.TMA_BWD_ENV, "1")
    monkeypatch.setattr(triton_rms_norm, "_prefetch_budget", lambda device: 101376 - 4096)
    rows = torch.randn(1, 4, 16384, dtype=torch.bfloat16)
    plan = triton_rms_norm._tma_bwd_plan((rows,) * (3 if fused else 2), 1, 16384, 4)
    assert (plan and plan[0]) == expected


def test_triton_backward_tma_keeps_row_indices_in_int32(monkeypatch):
    """The TMA kernel's row indices are int32 and reach M + programs (+ BLOCK_M): near 2^31
    rows the pointer kernel (int64 rows) serves. The limit is lowered to 2^12 here, where
    rows fit in memory."""
    from internlm_kernels.triton import rms_norm as triton_rms_norm
    monkeypatch.setenv(triton_rms_norm.TMA_BWD_ENV, "1")
    monkeypatch.setattr(triton_rms_norm, "TMA_BWD_ROW_LIMIT", 2**12)
    block_m, block_n, _, _ = triton_rms_norm.rms_norm_block_config(64, backward=True)
    rows = torch.randn(1, 2**12 - 600, 64, dtype=torch.bfloat16)
    assert triton_rms_norm._tma_bwd_plan((rows, rows), block_m, block_n, 4) is not None
    assert triton_rms_norm._tma_bwd_plan((rows, rows), block_m, block_n, 600 - block_m) is None


def test_triton_backward_tma_switch_rejects_other_values(monkeypatch):
    from internlm_kernels.triton import rms_norm as triton_rms_norm
    monkeypatch.setenv(triton_rms_norm.TMA_BWD_ENV, "yes")
    with pytest.raises(ValueError, match="INTERNLM_KERNELS_TRITON_NORM_BWD_TMA must be 0 or 1, got 'yes'"):
        triton_rms_norm._tma_bwd_plan((torch.randn(1, 2, 4096),), 1, 4096, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("hidden", [4096, 20000])
def test_dweight_is_bitwise_deterministic(backend, hidden, device):
    x, weight = _inputs((4099, hidden), torch.bfloat16, device)
    residual = torch.randn_like(x)
    dy = torch.randn_like(x)
    results = []
    for _ in range(2):
        w = weight.detach().requires_grad_(True)
        out, _ = ik.fused_add_rms_norm(x, residual, w, backend=backend)
        (dw,) = torch.autograd.grad(out, w, dy)
        results.append(dw)
    assert torch.equal(results[0], results[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_backward_with_many_rows_per_program(backend, fused, device):
    # More rows than the persistent backward has programs: each walks many of them (the CUDA
    # aligned kernel stages the next row while it works on the current one).
    x, weight = _inputs((4099, 4096), torch.bfloat16, device)
    if fused:
        _check_fused(x, torch.randn_like(x), weight, backend, residual_in_fp32=False)
    else:
        _check_rms_norm(x, weight, backend)


@pytest.mark.gpu
def test_backward_launches_first_at_48_kib_of_shared_memory(device):
    # At N = 4096 in 16-bit dtypes the CUDA backward's aligned kernel takes exactly 48 KiB of
    # dynamic shared memory beside its static scratch, which needs the large-shared-memory
    # opt-in. Once a wider row has set it the kernel launches anyway, so only a process whose
    # first backward is this one shows a missing opt-in.
    code = """
import torch
from tests.test_rms_norm import _check_fused, _check_rms_norm, _inputs
for dtype in (torch.bfloat16, torch.float16):
    x, weight = _inputs((64, 4096), dtype, "cuda")
    _check_rms_norm(x, weight, "cuda")
    _check_fused(x, torch.randn_like(x), weight, "cuda", residual_in_fp32=False)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_more_than_2_pow_31_elements(backend, device):
    hidden = 4096
    rows = (1 << 31) // hidden + 3  # the last rows start past element 2^31
    needed = rows * hidden * 2 * 3  # x, out, slack (bf16)
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.empty(rows, hidden, device=device, dtype=torch.bfloat16)
    x[-8:] = torch.randn(8, hidden, device=device, dtype=torch.bfloat16)
    x[:-8] = 1.0
    weight = (1 + 0.5 * torch.randn(hidden, device=device)).to(torch.bfloat16)
    out = ik.rms_norm(x, weight, backend=backend)
    assert_close_dtype(out[-8:], reference.rms_norm(x[-8:], weight), torch.bfloat16, "rows past 2^31")
    del out, x


@pytest.mark.gpu
def test_cuda_and_triton_agree(device):
    x, weight = _inputs((333, 4096), torch.bfloat16, device)
    residual = torch.randn_like(x)
    a = ik.fused_add_rms_norm(x, residual, weight, backend="cuda")
    b = ik.fused_add_rms_norm(x, residual, weight, backend="triton")
    r = reference.fused_add_rms_norm(x, residual, weight)
    for ours_cuda, ours_triton, ref in zip(a, b, r):
        assert_close_dtype(ours_cuda, ref, torch.bfloat16, "cuda vs reference")
        assert_close_dtype(ours_triton, ref, torch.bfloat16, "triton vs reference")
        assert_close_dtype(ours_cuda, ours_triton, torch.bfloat16, "cuda vs triton")


# --------------------------------------------------------------------------------------
# modules, registration, compile
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rmsnorm_module(backend, device):
    module = ik.nn.RMSNorm(96, eps=1e-5, backend=backend).to(device)
    with torch.no_grad():
        module.weight.copy_(1 + 0.5 * torch.randn(96))
    x = torch.randn(2, 7, 96, device=device)
    residual = torch.randn(2, 7, 96, device=device)
    assert_close_dtype(module(x), reference.rms_norm(x, module.weight, 1e-5), torch.float32, "module")
    out, residual_out = module(x, residual)
    ref_out, ref_residual = reference.fused_add_rms_norm(x, residual, module.weight, 1e-5)
    assert_close_dtype(out, ref_out, torch.float32, "module fused")
    assert_close_dtype(residual_out, ref_residual, torch.float32, "module residual")
    out.sum().backward()
    assert module.weight.grad is not None


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    x, weight = _inputs((5, 48), torch.float32, device)
    residual = torch.randn_like(x)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    ops = torch.ops.internlm_kernels
    # The backward on its own backend ("" or left out: the forward's), both kernel backends
    # where both run.
    backward_backends = ["", "triton", "cuda"] if backend == "cuda" else [""]
    torch.library.opcheck(ops.rms_norm_fwd.default, (x, weight, 1e-6, backend))
    for backward in backward_backends:
        torch.library.opcheck(ops.rms_norm_fwd.default, (x, weight, 1e-6, backend, backward))
        torch.library.opcheck(ops.fused_add_rms_norm_fwd.default, (x, residual, weight, 1e-6, False, backend, backward))
    rstd = torch.rand(5, device=device) + 0.5
    torch.library.opcheck(ops.rms_norm_bwd.default, (torch.randn_like(x), x.detach(), weight.detach(), rstd, True,
                                                     backend))


def _norm_block(backend):
    """A pre-norm block's norms, for the compile tests: fused add + RMSNorm, then RMSNorm."""
    def block(x, residual, weight):
        h, residual = ik.fused_add_rms_norm(x * 2, residual, weight, backend=backend)
        return ik.rms_norm(h, weight, backend=backend) + residual
    return block


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_compiles_without_graph_breaks(backend, device):
    torch._dynamo.reset()
    block = _norm_block(backend)
    compiled = torch.compile(block, fullgraph=True)
    x, weight = _inputs((6, 64), torch.float32, device)
    residual = torch.randn_like(x)
    x.requires_grad_(True)
    out = compiled(x, residual, weight)
    expected = block(x, residual, weight)
    assert_close_dtype(out, expected, torch.float32, "compiled")
    (dx,) = torch.autograd.grad(out.sum(), x)
    (dx_eager,) = torch.autograd.grad(expected.sum(), x)
    assert_close_dtype(dx, dx_eager, torch.float32, "compiled grad")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiles_once_for_dynamic_shapes(backend, device):
    # One graph for every number of rows (and row width): no size specialised by the ops.
    torch._dynamo.reset()
    block = _norm_block(backend)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows, hidden in ((5, 64), (9, 96)):
            x, weight = _inputs((rows, hidden), torch.float32, device)
            x.requires_grad_(True)
            residual = torch.randn_like(x)
            out, expected = compiled(x, residual, weight), block(x, residual, weight)
            assert_close_dtype(out, expected, torch.float32, "compiled")
            grad = torch.randn_like(out)
            assert_close_dtype(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                               torch.float32, "compiled grad")


# --------------------------------------------------------------------------------------
# bad input: clear errors before any launch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case, error, words", [
    ("weight_shape", ValueError, ["weight", "(N,)", "(63,)"]),
    ("int_dtype", TypeError, ["x", "int32"]),
    ("fp64_dtype", TypeError, ["x", "float64"]),
    ("last_dim_strided", ValueError, ["x", "contiguous last dimension"]),
    ("scalar", ValueError, ["x", "(..., N)"]),
    ("negative_eps", ValueError, ["eps"]),
    ("not_a_tensor", TypeError, ["weight", "list"]),
    ("string_eps", TypeError, ["eps must be a float, got str"]),
    ("tensor_eps", TypeError, ["eps must be a float, got Tensor"]),
])
def test_rms_norm_bad_input(backend, case, error, words, device):
    x = torch.randn(4, 64, device=device)
    weight = torch.randn(64, device=device)
    eps = 1e-6
    if case == "weight_shape":
        weight = weight[:63]
    elif case == "int_dtype":
        x = torch.randint(0, 5, (4, 64), device=device, dtype=torch.int32)
    elif case == "fp64_dtype":
        x = x.double()
    elif case == "last_dim_strided":
        x = torch.randn(4, 128, device=device)[:, ::2]
    elif case == "scalar":
        x = torch.tensor(1.0, device=device)
    elif case == "negative_eps":
        eps = -1.0
    elif case == "not_a_tensor":
        weight = [1.0] * 64
    elif case == "string_eps":
        eps = "1e-6"
    elif case == "tensor_eps":
        eps = torch.tensor([1e-6, 1e-6])
    with pytest.raises(error) as info:
        ik.rms_norm(x, weight, eps, backend=backend)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_add_bad_input(backend, device):
    x = torch.randn(4, 64, device=device)
    weight = torch.randn(64, device=device)
    with pytest.raises(ValueError, match="residual.*shape"):
        ik.fused_add_rms_norm(x, torch.randn(4, 65, device=device), weight, backend=backend)
    with pytest.raises(TypeError, match="residual.*int64"):
        ik.fused_add_rms_norm(x, torch.ones(4, 64, dtype=torch.int64, device=device), weight, backend=backend)
    for residual, words in ((None, "residual must be a torch.Tensor, got NoneType"),
                            ([1.0] * 64, "residual must be a torch.Tensor, got list")):
        with pytest.raises(TypeError, match=words):
            ik.fused_add_rms_norm(x, residual, weight, backend=backend)
        with pytest.raises(TypeError, match=words):
            ik.fused_add_rms_norm_(x.clone(), residual, weight, backend=backend)
    with pytest.raises(TypeError, match="residual_in_fp32 must be a bool, got str"):
        ik.fused_add_rms_norm(x, x.clone(), weight, residual_in_fp32="no", backend=backend)


@pytest.mark.gpu
def test_tensors_on_different_devices_raise():
    with pytest.raises(ValueError, match="weight is on cuda"):
        ik.rms_norm(torch.randn(4, 8), torch.randn(8, device="cuda"))


# --------------------------------------------------------------------------------------
# in-place fused add + RMSNorm (inference)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided_rows", "wide_looped", "unmergeable"])
def test_fused_add_rms_norm_inplace(backend, dtype, layout, device):
    if layout == "contiguous":
        x = torch.randn(19, 123, device=device, dtype=dtype)
        residual = torch.randn(19, 123, device=device, dtype=dtype)
    elif layout == "strided_rows":  # rows of wider buffers, as slices of a fused activation
        x = torch.randn(2, 5, 300, device=device, dtype=dtype)[..., 10:170]
        residual = torch.randn(2, 5, 200, device=device, dtype=dtype)[..., :160]
    elif layout == "wide_looped":  # past the single-pass width: the two-pass path in place
        x = torch.randn(2, 20000, device=device, dtype=dtype)
        residual = torch.randn(2, 20000, device=device, dtype=dtype)
    else:  # leading dims that no two-stride view covers
        x = torch.randn(3, 4, 5, 32, device=device, dtype=dtype).permute(2, 0, 1, 3)
        residual = torch.randn(5, 3, 4, 32, device=device, dtype=dtype)
    weight = (1 + 0.5 * torch.randn(x.shape[-1], device=device)).to(dtype)
    expected_out, expected_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    untouched = x._base.clone() if x._base is not None else None
    x_ret, residual_ret = ik.fused_add_rms_norm_(x, residual, weight, 1e-5, backend=backend)
    assert x_ret is x and residual_ret is residual
    assert_close_dtype(x, expected_out, dtype, "x <- out")
    assert_close_dtype(residual, expected_residual, dtype, "residual <- sum")
    if layout == "strided_rows":  # columns outside the slice are untouched
        assert torch.equal(x._base[..., :10], untouched[..., :10])
        assert torch.equal(x._base[..., 170:], untouched[..., 170:])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [123, 4096, 20000])
def test_fused_add_rms_norm_inplace_fp32_residual_stream(backend, dtype, width, device):
    """16-bit activations added in place into an fp32 residual stream (the sum stays fp32)."""
    x, weight = _inputs((5, width), dtype, device)
    residual = torch.randn(5, width, device=device, dtype=torch.float32)
    expected_out, expected_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    ik.fused_add_rms_norm_(x, residual, weight, 1e-5, backend=backend)
    assert_close_dtype(x, expected_out, dtype, "x <- out")
    assert_close_dtype(residual, expected_residual, torch.float32, "fp32 residual <- sum")


def test_fused_add_rms_norm_inplace_bad_input(device):
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="the output is written into x"):
        ik.fused_add_rms_norm_(x, x.clone(), torch.ones(64, device=device))  # fp32 weight -> fp32 out
    with pytest.raises(RuntimeError, match="the in-place op is for inference"):
        ik.fused_add_rms_norm_(x, x.clone(), torch.ones(64, device=device, dtype=torch.bfloat16,
                                                       requires_grad=True))


@pytest.mark.parametrize("case", ["x_expanded", "residual_expanded", "x_is_residual", "rows_overlap",
                                  "weight_inside_x"])
def test_fused_add_rms_norm_inplace_refuses_shared_memory(case, device):
    """The in-place op writes x and residual: memory two of their elements share, or that
    one shares with the other (or with the weight), would make the writes race."""
    n = 64
    buffer = torch.randn(6, n, device=device, dtype=torch.bfloat16)
    x, residual, weight = buffer[:2].clone(), buffer[2:4].clone(), torch.ones(n, device=device, dtype=torch.bfloat16)
    if case == "x_expanded":
        x = buffer[0].expand(2, n)
    elif case == "residual_expanded":
        residual = buffer[0].expand(2, n)
    elif case == "x_is_residual":
        residual = x
    elif case == "rows_overlap":
        x, residual = buffer[:2], buffer[1:3]
    else:
        x, weight = buffer[:2], buffer[1]
    with pytest.raises(ValueError, match="share"):
        ik.fused_add_rms_norm_(x, residual, weight)
    # rows of one buffer that do not meet are fine
    x, residual = buffer[:2], buffer[2:4]
    expected_out, expected_sum = reference.fused_add_rms_norm(x.clone(), residual.clone(),
                                                              torch.ones(n, device=device, dtype=torch.bfloat16))
    ik.fused_add_rms_norm_(x, residual, torch.ones(n, device=device, dtype=torch.bfloat16))
    assert_close_dtype(x, expected_out, torch.bfloat16, "x of one buffer")
    assert_close_dtype(residual, expected_sum, torch.bfloat16, "residual of one buffer")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_add_rms_norm_inplace_opcheck(backend, device):
    x = torch.randn(5, 48, device=device)
    torch.library.opcheck(torch.ops.internlm_kernels.fused_add_rms_norm_.default,
                          (x, torch.randn_like(x), torch.randn(48, device=device), 1e-6, backend))
