"""The ops' eager fast path (internlm_kernels/ops/_dispatch.py): plain eager calls skip
torch.library's dispatch, everything that must see the custom op still gets it."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import internlm_kernels as ik
from internlm_kernels import reference
from tests.helpers import KERNEL_BACKENDS

rms_ops = importlib.import_module("internlm_kernels.ops.rms_norm")  # the module, not the function


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the rms_norm_fwd custom op itself (not its fast path)."""
    calls = []
    op = rms_ops._rms_norm_fwd.op

    def counting(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(rms_ops._rms_norm_fwd, "op", counting)
    return calls


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eager_calls_skip_the_dispatcher_with_and_without_grad(backend, device, op_calls):
    x = torch.randn(4, 64, device=device)
    weight = torch.randn(64, device=device, requires_grad=True)
    out = ik.rms_norm(x, weight, backend=backend)
    out.sum().backward()
    with torch.no_grad():
        ik.rms_norm(x, weight, backend=backend)
    assert op_calls == [] and weight.grad is not None


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_dispatch_mode_sees_the_custom_op(backend, device):
    x = torch.randn(4, 64, device=device)
    weight = torch.randn(64, device=device)
    with _OpLog() as log:
        ik.rms_norm(x, weight, backend=backend)
    assert "internlm_kernels.rms_norm_fwd.default" in log.names


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fast_and_dispatched_paths_agree_forward_and_backward(backend, device):
    x = torch.randn(5, 64, device=device)
    weight = torch.randn(64, device=device)
    grad = torch.randn(5, 64, device=device)

    def run(dispatched: bool):
        xs, ws = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if dispatched:
            with _OpLog():
                out = ik.rms_norm(xs, ws, backend=backend)
        else:
            out = ik.rms_norm(xs, ws, backend=backend)
        out.backward(grad)
        return out.detach(), xs.grad, ws.grad

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_in_place_fast_path_bumps_version_counters(backend, device):
    x = torch.randn(4, 64, device=device)
    residual = torch.randn(4, 64, device=device)
    weight = torch.randn(64, device=device)
    before = (x._version, residual._version)
    ik.fused_add_rms_norm_(x, residual, weight, backend=backend)
    assert x._version > before[0] and residual._version > before[1]


def test_launchers_host_arithmetic_matches_triton():
    # The launchers' plain cdiv / next_power_of_2 (internlm_kernels/triton/_host.py) stand in
    # for Triton's constexpr functions, whose host calls cost about 1.5 us each.
    import triton

    from internlm_kernels.triton._host import cdiv, next_power_of_2

    for n in list(range(1, 300)) + [2**20 - 1, 2**20, 2**20 + 1, 3 * 2**31]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 7, 16, 64, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_triton_launchers_run_on_their_tensors_device(monkeypatch):
    """Triton launches on the current device: each launcher makes its first tensor's device
    current when it is another GPU (a machine with one GPU cannot show the failure itself)."""
    import contextlib

    from internlm_kernels.triton import _host, attention, rms_norm, rotary

    made_current = []

    @contextlib.contextmanager
    def device(which):
        made_current.append(torch.device(which))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)

    class OnDevice:
        def __init__(self, name):
            self.device = torch.device(name)

    calls = []
    launcher = _host.on_the_tensors_device(lambda first, *args, **kwargs: calls.append(len(made_current)) or "done")
    assert launcher(OnDevice("cuda:1"), 2, flag=True) == "done"
    assert made_current == [torch.device("cuda:1")] and calls == [1]  # ran inside the switch
    for same in ("cuda:0", "cuda", "cpu"):
        launcher(OnDevice(same))
    assert made_current == [torch.device("cuda:1")], "no switch to the current device, or for CPU tensors"
    # every Triton launcher the ops call is wrapped
    for module, name in ((attention, "attention_fwd"), (attention, "attention_bwd"), (attention, "kvcache_append"),
                         (attention, "attention_decode"), (rms_norm, "rms_norm_fwd"), (rms_norm, "rms_norm_bwd"),
                         (rotary, "rotary")):
        assert getattr(getattr(module, name), "__wrapped__", None) is not None, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_on_the_second_gpu(device):
    x = torch.randn(64, 256, device="cuda:1", dtype=torch.bfloat16)
    weight = torch.randn(256, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        out = ik.rms_norm(x, weight, backend="triton")
    torch.testing.assert_close(out, reference.rms_norm(x, weight), rtol=1e-2, atol=1e-2)


def test_in_place_checks_pass_fake_and_meta_tensors():
    """The in-place ops' shared-memory checks compare addresses: fake and meta tensors have
    none (every data pointer is 0), so they are left to the real call, not refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def in_place_calls(device):
        x, residual, weight = torch.randn(4, 64, device=device), torch.randn(4, 64, device=device), \
            torch.randn(64, device=device)
        ik.fused_add_rms_norm_(x, residual, weight, backend="torch")
        q, k = torch.randn(1, 4, 2, 16, device=device), torch.randn(1, 4, 2, 16, device=device)
        cos, sin = torch.randn(8, 8, device=device), torch.randn(8, 8, device=device)
        ik.apply_rotary(q, k, cos, sin, inplace=True, backend="torch")

    with FakeTensorMode():
        in_place_calls("cpu")
    in_place_calls("meta")
