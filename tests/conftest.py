"""Test configuration: the same suite runs on a CPU (Triton under its interpreter) and a GPU.

Without a GPU, TRITON_INTERPRET=1 is set here, before internlm_kernels (and triton) are
imported, so the Triton kernels' real code runs on CPU tensors. Tests marked ``gpu`` are
skipped with the reason; the "cuda" backend is parametrized with that mark.
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import internlm_kernels  # noqa: E402,F401  (after TRITON_INTERPRET is set)

GPU_SKIP_REASON = "needs a CUDA GPU; this machine has none (runs in scripts/gpu_check.sh)"


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fixed per test for reproducible failures; inputs are still random, never zeros.
    torch.manual_seed(1234)
