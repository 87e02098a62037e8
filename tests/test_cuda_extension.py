"""The CUDA extension on any machine: build metadata, generated sources, glue validation.

The kernels themselves run in the op tests (parametrized with the ``cuda`` backend, marked
``gpu``); here is what can be checked without a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from internlm_kernels import backends

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_extension = pytest.mark.skipif(backends.extension is None,
                                     reason=f"extension not built here: {backends.available_backends()['cuda'].reason}")


def test_generated_instantiations_are_up_to_date():
    result = subprocess.run([sys.executable, os.path.join(REPO, "csrc", "generate_instantiations.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_extension
def test_build_info_names_the_torch_it_was_built_against():
    info = backends.extension.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cuda_version"] and info["cuda_archs"]


@needs_extension
def test_glue_rejects_cpu_tensors_before_any_launch():
    ext = backends.extension
    x = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match=r"rms_norm_fwd \(cuda\): x must be a CUDA tensor"):
        ext.rms_norm_fwd(x, None, torch.ones(8), torch.empty_like(x), None, torch.empty(4), 1e-6)
    with pytest.raises(RuntimeError, match=r"rms_norm_bwd \(cuda\): dx must be a CUDA tensor"):
        ext.rms_norm_bwd(x, x, None, torch.ones(8), torch.ones(4), torch.empty(4, 8), None, True)
    q = torch.randn(1, 4, 2, 8)
    cos = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match=r"rotary \(cuda\): q must be a CUDA tensor"):
        ext.rotary(q, q, q, q, cos, cos, None, None, 0, None, False, False, False)
    q = torch.randn(1, 4, 2, 64, dtype=torch.float16)
    lse = torch.empty(1, 2, 4)
    with pytest.raises(RuntimeError, match=r"attention_fwd \(cuda\): q must be a CUDA tensor"):
        ext.attention_fwd(q, q, q, torch.empty_like(q), lse, None, None, 0.125, True, (-1, -1))
    with pytest.raises(RuntimeError, match=r"attention_bwd \(cuda\): q must be a CUDA tensor"):
        ext.attention_bwd(q, q, q, q, q, lse, q, q, q, None, None, 0.125, False, (-1, -1), False)
    with pytest.raises(RuntimeError, match=r"attention_decode \(cuda\): q must be a CUDA tensor"):
        ext.attention_decode(q, q, q, torch.empty_like(q), torch.zeros(1, dtype=torch.int32), 0, 0.125, True,
                             (-1, -1), None, None, False)
    with pytest.raises(RuntimeError, match=r"kvcache_append \(cuda\): k must be a CUDA tensor"):
        ext.kvcache_append(q, q, q, q, torch.zeros(1, dtype=torch.int32), None, None, False)


@needs_extension
def test_extension_does_not_export_a_private_libstdcxx():
    """A toolchain that links libstdc++ statically must not leak that copy's symbols: torch's
    libstdc++.so would then own the copy's data (locale facet ids) while the extension ran the
    copy's code, and formatting a number into an error message crashed (seen on a GPU machine
    whose compiler links it statically). setup.py links with --exclude-libs,ALL."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) here to read the extension's dynamic symbol table")
    table = subprocess.run([nm, "-D", "--defined-only", "-C", backends.extension.__file__],
                           capture_output=True, text=True, check=True).stdout
    leaked = [line for line in table.splitlines() if "std::locale::" in line or "std::ios_base::" in line]
    assert not leaked, f"the extension exports {len(leaked)} libstdc++ runtime symbols, e.g. {leaked[:3]}"


@pytest.mark.gpu
@needs_extension
def test_glue_rejects_bad_tensors_on_the_gpu():
    ext = backends.extension
    x = torch.randn(1, 4, 8, device="cuda")
    rstd = torch.empty(4, device="cuda")
    with pytest.raises(RuntimeError, match="weight must be contiguous of shape \\(8,\\)"):
        ext.rms_norm_fwd(x, None, torch.ones(7, device="cuda"), torch.empty_like(x), None, rstd, 1e-6)
    with pytest.raises(RuntimeError, match="does not support x of dtype Double"):
        ext.rms_norm_fwd(x.double(), None, torch.ones(8, device="cuda"), torch.empty_like(x), None, rstd, 1e-6)
    with pytest.raises(RuntimeError, match="residual and residual_out are given together"):
        ext.rms_norm_fwd(x, x, torch.ones(8, device="cuda"), torch.empty_like(x), None, rstd, 1e-6)
    q = torch.randn(1, 4, 2, 8, device="cuda")
    cos = torch.ones(4, 4, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="does not support cos of dtype Half"):
        ext.rotary(q, q, q, q, cos, cos, None, None, 0, None, False, False, False)


@pytest.mark.gpu
@needs_extension
def test_attention_glue_rejects_bad_tensors_on_the_gpu():
    ext = backends.extension
    q = torch.randn(1, 8, 4, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float16)
    lse = torch.empty(1, 4, 8, device="cuda")
    out = torch.empty_like(q)
    no_window = (-1, -1)
    with pytest.raises(RuntimeError, match="the cuda kernels have head_dim 64 and 128, got 32"):
        ext.attention_fwd(q[..., :32], k[..., :32], k[..., :32], out[..., :32], lse, None, None, 1.0, True, no_window)
    with pytest.raises(RuntimeError, match="does not support q of dtype Float"):
        ext.attention_fwd(q.float(), k.float(), k.float(), out.float(), lse, None, None, 1.0, True, no_window)
    unaligned = torch.randn(1, 8, 2, 65, device="cuda", dtype=torch.float16)[..., 1:]
    with pytest.raises(RuntimeError, match="k must start 16-byte aligned"):
        ext.attention_fwd(q, unaligned, k, out, lse, None, None, 1.0, True, no_window)
    three_heads = k[:, :, :1].expand(1, 8, 3, 64)
    with pytest.raises(RuntimeError, match="must be a multiple of k/v heads"):
        ext.attention_fwd(q, three_heads, three_heads, out, lse, None, None, 1.0, True, no_window)
    with pytest.raises(RuntimeError, match=r"lse must be \(B, Hq, Sq\)"):
        ext.attention_fwd(q, k, k, out, lse[:, :2], None, None, 1.0, True, no_window)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be contiguous"):
        cu = torch.tensor([0, 3, 8], device="cuda", dtype=torch.int32)
        ext.attention_fwd(q, k, k, out, lse, cu[::2], cu, 1.0, True, no_window)


@pytest.mark.gpu
@needs_extension
def test_cuda_refuses_weight_dtypes_it_does_not_read():
    import internlm_kernels as ik

    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    weight = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="the cuda kernels take weight in x's dtype"):
        ik.rms_norm(x, weight, backend="cuda")
    # auto serves it with another backend instead
    assert ik.rms_norm(x, weight).dtype == torch.float32
