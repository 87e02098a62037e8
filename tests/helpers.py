"""The tolerance rules of the test suite, in one place, and the kernel-backend parametrization."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

# Norm and RoPE forward: relative tolerance per dtype (relative to the reference's largest
# magnitude, and element-wise).
DTYPE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Kernel backends under test: triton everywhere (interpreter on CPU); cuda on a GPU.
KERNEL_BACKENDS = [
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Forward rule for norms and rotary: within the dtype table, same dtype and shape."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    tol = DTYPE_TOLERANCE[dtype]
    scale = float(expected.detach().float().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m}")


def max_abs_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return float((actual.detach().double() - exact.detach().double()).abs().max()) if actual.numel() else 0.0


def assert_within_eager_error(actual: Sequence[torch.Tensor], eager: Sequence[torch.Tensor],
                              exact: Sequence[torch.Tensor], dtype: torch.dtype, factor: float,
                              what: str = "") -> None:
    """flash-attention's rule: the kernel's max error against an exact (fp64) result is at most
    ``factor`` times the error of eager PyTorch run in the same dtype (2 forward, 3 backward).

    A floor of one ulp of the result's largest value (in ``dtype``) keeps the rule usable
    where eager happens to be exact on a tiny tensor. A result that is zero in exact
    arithmetic (dq and dk where every query sees a single key: its softmax is exactly 1)
    takes the ulp of the largest of the results checked with it: eager then computes
    P (dP - rowsum(dO o O)) as exactly 0, where a kernel that forms the row sum from the
    stored output in fp32 leaves fp32 rounding, far below one ulp of the other gradients.
    """
    scales = [float(x.detach().double().abs().max()) if x.numel() else 0.0 for x in exact]
    for index, (a, e, x) in enumerate(zip(actual, eager, exact)):
        label = f"{what}[{index}]"
        assert a.shape == x.shape, f"{label}: shape {tuple(a.shape)} != {tuple(x.shape)}"
        assert torch.isfinite(a).all(), f"{label}: non-finite values"
        scale = scales[index] or max(scales)
        ours, theirs = max_abs_error(a, x), max_abs_error(e, x)
        floor = torch.finfo(dtype).eps * scale
        assert ours <= factor * theirs + floor, (
            f"{label}: max error {ours:.3e} vs exact exceeds {factor}x the eager {dtype} error {theirs:.3e} "
            f"(+ floor {floor:.1e})")
