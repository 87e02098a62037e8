"""Backend choice, availability reporting, the environment override and extension loading."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import internlm_kernels as ik
from internlm_kernels import backends

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_available_backends_reports_every_backend_with_a_reason():
    status = ik.available_backends()
    assert set(status) == {"cuda", "triton", "torch"}
    assert status["torch"].available
    for name, entry in status.items():
        assert isinstance(entry.available, bool) and entry.reason, name
    if not torch.cuda.is_available():
        reason = status["cuda"].reason
        assert not status["cuda"].available
        assert any(words in reason for words in ("no CUDA GPU", "not built", "CPU-only", "failed to load"))


def test_auto_on_cpu_uses_triton_under_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert backends.TRITON_INTERPRETER, "conftest turns the interpreter on without a GPU"
    assert backends.choose_backend("auto", torch.device("cpu"), "rms_norm") == "triton"


def test_environment_override_replaces_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.choose_backend("auto", torch.device("cpu"), "rms_norm") == "torch"
    # An explicit choice in code still wins over the environment.
    if not torch.cuda.is_available():
        assert backends.choose_backend("triton", torch.device("cpu"), "rms_norm") == "triton"
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="INTERNLM_KERNELS_BACKEND='fastest' is not a backend"):
        backends.choose_backend("auto", torch.device("cpu"), "rms_norm")


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match=r"rms_norm: backend must be one of .* got 'cudnn'"):
        ik.rms_norm(torch.randn(2, 4), torch.ones(4), backend="cudnn")


def test_cuda_backend_on_cpu_tensors_raises_clearly():
    with pytest.raises(RuntimeError, match=r"rms_norm: backend='cuda' cannot serve this call: .*"):
        ik.rms_norm(torch.randn(2, 4), torch.ones(4), backend="cuda")
    with pytest.raises(RuntimeError, match=r"apply_rotary: backend='cuda' cannot serve this call"):
        ik.apply_rotary(torch.randn(1, 2, 1, 4), None, *ik.rotary_cos_sin(2, 4), backend="cuda")


def test_unsupported_reason_moves_auto_along(device):
    def only_torch(backend):
        return None if backend == "torch" else "not for this call"

    assert backends.choose_backend("auto", device, "op", only_torch) == "torch"
    with pytest.raises(RuntimeError, match="not for this call"):
        backends.choose_backend("triton", device, "op", only_torch)


def test_auto_order_is_per_op():
    # Choosing reads only the extension's presence and the device type, so a CUDA device can
    # be named without a GPU.
    if backends.extension is None or not backends.available_backends()["triton"].available:
        pytest.skip("needs the compiled extension and triton")
    cuda = torch.device("cuda")
    # The decode kernel was measured faster in CUDA C++; the other ops stay with Triton.
    assert backends.choose_backend("auto", cuda, "flash_attention_with_kvcache") == "cuda"
    assert backends.choose_backend("auto", cuda, "flash_attention") == "triton"
    # A call the CUDA kernels refuse (a head dim they lack) goes on to Triton.
    assert backends.choose_backend("auto", cuda, "flash_attention_with_kvcache",
                                   lambda b: "head_dim 96" if b == "cuda" else None) == "triton"


def test_backward_orders(monkeypatch):
    # Without an entry of its own, a backward follows its forward.
    assert backends.auto_preference("flash_attention_with_kvcache.backward") == backends.CUDA_FIRST
    assert backends.auto_preference("rms_norm.backward") == backends.AUTO_PREFERENCE
    # With one, it takes its own.
    monkeypatch.setitem(backends.AUTO_PREFERENCE_BY_OP, "rms_norm.backward", backends.CUDA_FIRST)
    assert backends.auto_preference("rms_norm.backward") == backends.CUDA_FIRST
    assert backends.auto_preference("rms_norm") == backends.AUTO_PREFERENCE
    # torch last everywhere: a backward whose forward ran a kernel backend finds one too.
    for op, order in backends.AUTO_PREFERENCE_BY_OP.items():
        assert order[-1] == "torch" and sorted(order) == sorted(backends.BACKENDS), op


def test_backward_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setitem(backends.AUTO_PREFERENCE_BY_OP, "rms_norm.backward", backends.CUDA_FIRST)
    device_reason = backends._device_reason
    monkeypatch.setattr(backends, "_device_reason",
                        lambda backend, device: None if backend == "cuda" else device_reason(backend, device))
    leaf, constant = torch.ones(2, requires_grad=True), torch.ones(2)
    choose = backends.choose_backward_backend
    assert choose("auto", cpu, "rms_norm", "triton", (constant, leaf)) == "cuda"
    assert choose("auto", cpu, "rms_norm", "triton", (constant, leaf), lambda b: "no" if b == "cuda" else None) == \
        "triton"
    # No gradient to take: the forward's backend, nothing chosen.
    assert choose("auto", cpu, "rms_norm", "triton", (constant, None, 1e-6, "not a tensor")) == "triton"
    with torch.no_grad():
        assert choose("auto", cpu, "rms_norm", "triton", (leaf,)) == "triton"
    # A named backend, in the call or the environment, serves both directions.
    assert choose("triton", cpu, "rms_norm", "triton", (leaf,)) == "triton"
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert choose("auto", cpu, "rms_norm", "triton", (leaf,)) == "triton"


def test_device_capability_is_asked_once_per_device(monkeypatch):
    asked = []
    monkeypatch.setattr(backends, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or (8, index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert backends.device_capability(torch.device("cuda", 0)) == (8, 0)
    assert backends.device_capability(torch.device("cuda")) == (8, 1)  # no index: the current device
    assert backends.device_capability(torch.device("cuda", 0)) == (8, 0)
    assert backends.device_capability(torch.device("cuda", 1)) == (8, 1)
    assert asked == [0, 1]


@pytest.mark.parametrize("arch_list, capability, expected", [
    ("8.0;9.0a", (8, 0), True),
    ("8.0;9.0a", (8, 9), True),     # sm_80 machine code runs on later sm_8x
    ("8.0;9.0a", (9, 0), True),
    ("8.0;9.0a", (10, 0), False),   # a Blackwell GPU: no code for it
    ("8.0;9.0a", (7, 5), False),
    ("9.0a", (9, 1), False),        # "a" code: its own arch alone
    ("8.0 8.6+PTX", (12, 0), True),  # PTX: compiled by the driver for later GPUs
    ("9.0a+PTX", (10, 0), False),   # sm_90a PTX holds sm_90a-only instructions
    ("10.0f", (10, 3), True),       # family code: later GPUs of its major
    ("10.0f+PTX", (12, 0), False),
    ("8.0", (8, 7), False),         # Tegra (Orin): its own capability alone
    ("8.7", (8, 7), True),
    ("8.0,9.0", (9, 0), True),
    ("Hopper", (9, 0), None),       # a name: cannot tell, so the extension is tried
    ("", (9, 0), None),             # empty: torch built for the GPUs it saw
])
def test_arch_list_serves(arch_list, capability, expected):
    assert backends.arch_list_serves(arch_list, capability) is expected


def test_cuda_backend_refuses_a_gpu_its_build_holds_no_code_for(monkeypatch):
    # The driver would refuse every launch ("no kernel image"): "auto" takes Triton and an
    # explicit request says how to rebuild.
    monkeypatch.setattr(backends, "extension", object())  # built...
    monkeypatch.setattr(backends, "EXTENSION_ARCHS", "8.0;9.0a")  # ...for these
    monkeypatch.setitem(backends._STATUS, "cuda", backends.BackendStatus(True, "fake"))
    monkeypatch.setitem(backends._STATUS, "triton", backends.BackendStatus(True, "fake"))
    monkeypatch.setattr(backends, "_ARCH_REASONS", {})
    monkeypatch.setattr(backends, "_CAPABILITY", {0: (10, 0), 1: (9, 0)})
    blackwell, hopper = torch.device("cuda", 0), torch.device("cuda", 1)
    assert backends.choose_backend("auto", blackwell, "flash_attention_with_kvcache") == "triton"
    assert backends.choose_backend("auto", hopper, "flash_attention_with_kvcache") == "cuda"
    rebuild = r"built for archs 8.0;9.0a .*sm_100.*TORCH_CUDA_ARCH_LIST=\"8.0;9.0a;10.0\".*make clean build"
    with pytest.raises(RuntimeError, match=rebuild):
        backends.choose_backend("cuda", blackwell, "rms_norm")
    assert set(backends._ARCH_REASONS) == {0, 1}  # decided once per device


def test_arch_check_traces_without_graph_breaks(monkeypatch):
    # The first choice on a device can happen inside torch.compile: it asks nothing of the
    # extension (its archs were read at import) and fills its caches as a side effect.
    monkeypatch.setattr(backends, "extension", object())
    monkeypatch.setattr(backends, "EXTENSION_ARCHS", "8.0;9.0a")
    monkeypatch.setitem(backends._STATUS, "cuda", backends.BackendStatus(True, "fake"))
    monkeypatch.setitem(backends._STATUS, "triton", backends.BackendStatus(True, "fake"))
    monkeypatch.setattr(backends, "_ARCH_REASONS", {})
    monkeypatch.setattr(backends, "_CAPABILITY", {0: (10, 0)})  # what the driver would say, asked once

    def offset(x):
        chosen = backends.choose_backend("auto", torch.device("cuda", 0), "flash_attention_with_kvcache")
        return x + (1.0 if chosen == "cuda" else 2.0)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(offset, fullgraph=True)(torch.zeros(2)), torch.full((2,), 2.0))
    assert "sm_100" in backends._ARCH_REASONS[0]


def _run_python(code: str, cwd: str, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = cwd
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_does_not_import_triton():
    # Triton fixes interpreted-or-compiled at import; the package must leave that choice open.
    result = _run_python("import sys, internlm_kernels; print('triton' in sys.modules)", REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_broken_extension_falls_back_with_the_cause_and_rebuild_command(tmp_path):
    # A stale or foreign build (e.g. after a torch upgrade: "undefined symbol") must not break
    # the import; the cuda backend reports why and how to rebuild.
    package = tmp_path / "internlm_kernels"
    shutil.copytree(os.path.join(REPO, "internlm_kernels"), package,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not an ELF file")
    (package / "_C.abi3.so").write_bytes(b"not an ELF file")
    result = _run_python(
        "import internlm_kernels as ik, torch\n"
        "s = ik.available_backends()['cuda']\n"
        "print(s.available); print(s.reason)\n"
        "print(ik.rms_norm(torch.randn(2, 8), torch.ones(8)).shape)\n", str(tmp_path))
    assert result.returncode == 0, result.stderr
    available, reason, shape = result.stdout.strip().splitlines()
    assert available == "False"
    assert "failed to load" in reason and "pip install --no-build-isolation" in reason
    assert shape == "torch.Size([2, 8])"


def test_check_command_lists_backends():
    result = _run_python("from internlm_kernels.__main__ import main; main(['check'])", REPO)
    assert result.returncode == 0, result.stderr
    for name in ("cuda", "triton", "torch"):
        assert f"  {name}" in result.stdout
