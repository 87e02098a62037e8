"""Which backends this machine has, and which one serves a given call.

Backends:
  "cuda"   hand-written CUDA C++ in the compiled extension ``internlm_kernels._C``;
  "triton" Triton kernels: on CUDA tensors, or on CPU tensors when Triton's
           interpreter is on (``TRITON_INTERPRET=1`` set before this package is imported);
  "torch"  the eager references in ``reference.py``: every device, every dtype.

``backend="auto"`` (the default of every public op) takes the first backend in
``auto_preference(op)`` that can serve the call (an op's backward is chosen with its
forward call, by the backward's own order where it has one, so the two directions can run
different backends); ``INTERNLM_KERNELS_BACKEND`` replaces
"auto" with a fixed choice for a whole process (an explicit ``backend=`` in code still
wins). An explicitly requested backend that cannot serve a call raises and says why.

Availability is probed once at import, so choosing a backend inside a
``torch.compile``-d function reads only module state and never breaks the graph.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import warnings
from typing import Callable, Dict, Optional, Sequence

import torch

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "INTERNLM_KERNELS_BACKEND"
REBUILD_COMMAND = "pip install --no-build-isolation --no-deps -e .  (or: make build)"
# After a change of TORCH_CUDA_ARCH_LIST: make's stamp does not see the environment.
ARCH_REBUILD_COMMAND = "pip install --no-build-isolation --no-deps -e .  (or: make clean build)"

# "auto" prefers Triton on CUDA tensors, except for the ops (or directions) whose CUDA C++
# kernels have passed the tests on a GPU and been measured faster there (benchmarks/results/).
AUTO_PREFERENCE = ("triton", "cuda", "torch")
CUDA_FIRST = ("cuda", "triton", "torch")
# An op's backward can have its own entry, "<op>.backward", where the two directions'
# measurements part ways (the forward's order otherwise serves both): the ops choose the
# backward's backend with the forward call (choose_backward_backend). Every order ends with
# torch, so a backward whose forward ran a kernel backend runs a kernel backend too: the
# limits a call passes are the same both ways. The GPU summary (scripts/gpu_summary.py) sets
# each benchmark case's cuda row against its triton row beside the order used here.
#
# Measured, not yet entered: the CUDA RMSNorm backward read and wrote at 0.76 of the copy
# bandwidth on an H200 (2026-11-28, bf16, M = 16384, N = 8192), 2.1x Triton's 0.36, and the
# fused one at 0.90 against 0.74, while the forwards led on Triton (0.94 against 0.83). At
# N = 4096 that backward failed to launch there (a shared-memory opt-in, fixed since and
# tested under the emulation only), so "rms_norm.backward" and "fused_add_rms_norm.backward"
# wait for a GPU run whose tests pass it (test_backward_launches_first_at_48_kib_of_shared_memory)
# and whose benchmark still has it ahead of Triton's TMA backward.
BACKWARD_SUFFIX = ".backward"
AUTO_PREFERENCE_BY_OP: Dict[str, tuple] = {
    # H200, 2026-11-28 (nvidia-h200-20261128.json), bf16, d = 128, GQA 32/8: 3.65x the Triton
    # kernel at batch 1 and 32K cached positions, where Triton's launches cost more than the
    # GPU's work, and 1.12x at batch 64 and 4K (0.94 of the copy bandwidth).
    "flash_attention_with_kvcache": CUDA_FIRST,
}


def auto_preference(op: str) -> tuple:
    """The order in which "auto" tries the backends for ``op`` ("<op>.backward": for its
    backward, the forward's order unless the backward has its own)."""
    if op not in AUTO_PREFERENCE_BY_OP and op.endswith(BACKWARD_SUFFIX):
        op = op[: -len(BACKWARD_SUFFIX)]
    return AUTO_PREFERENCE_BY_OP.get(op, AUTO_PREFERENCE)


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on this machine; ``reason`` says why not, or what it runs on."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_triton() -> BackendStatus:
    # Looked up without importing triton: Triton decides at import time whether its own
    # helpers are interpreted, so importing it here would fix that choice for the process.
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed")
    version = importlib.metadata.version("triton")
    if torch.cuda.is_available():
        # (No device query here: initialising CUDA at import would break fork-based workers.)
        return BackendStatus(True, f"triton {version} on CUDA GPUs")
    if TRITON_INTERPRETER:
        return BackendStatus(True, f"triton {version} interpreter on CPU tensors (TRITON_INTERPRET=1)")
    return BackendStatus(False, "no CUDA GPU, and TRITON_INTERPRET=1 was not set before import "
                                "(set it to run the Triton kernels on CPU tensors, slowly)")


def _load_extension():
    """Import ``_C``; return (module or None, status). Never raises."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    built_files = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    try:
        from internlm_kernels import _C
    except ImportError as error:
        if built_files:
            # Typically "undefined symbol" after torch was upgraded under an existing build.
            message = (f"internlm_kernels._C exists but failed to load ({error}); it was probably built "
                       f"against another torch than {torch.__version__}. Rebuild with: {REBUILD_COMMAND}")
            if torch.cuda.is_available():
                warnings.warn(message + ". Falling back to the Triton backend.", RuntimeWarning, stacklevel=3)
            return None, BackendStatus(False, message)
        if torch.version.cuda is None:
            return None, BackendStatus(False, "torch is a CPU-only build, so the CUDA extension was not built")
        message = f"the CUDA extension internlm_kernels._C is not built. Build it with: {REBUILD_COMMAND}"
        if torch.cuda.is_available():
            warnings.warn(message + ". Falling back to the Triton backend.", RuntimeWarning, stacklevel=3)
        return None, BackendStatus(False, message)
    info = _C.build_info()
    if info["torch_version"] != torch.__version__:
        message = (f"internlm_kernels._C was built against torch {info['torch_version']} but torch "
                   f"{torch.__version__} is running. Rebuild with: {REBUILD_COMMAND}")
        warnings.warn(message + ". Falling back to the Triton backend.", RuntimeWarning, stacklevel=3)
        return None, BackendStatus(False, message)
    if not torch.cuda.is_available():
        return _C, BackendStatus(False, f"extension built (CUDA {info['cuda_version']}, archs "
                                        f"{info['cuda_archs']}) but no CUDA GPU is visible")
    return _C, BackendStatus(True, f"CUDA {info['cuda_version']} extension for archs {info['cuda_archs']}")


extension, _extension_status = _load_extension()
# The archs the extension holds machine code for (TORCH_CUDA_ARCH_LIST at its build), read
# once: a call into the extension inside a torch.compile'd function would break the graph.
EXTENSION_ARCHS = extension.build_info()["cuda_archs"] if extension is not None else ""
_STATUS: Dict[str, BackendStatus] = {
    "cuda": _extension_status,
    "triton": _probe_triton(),
    "torch": BackendStatus(True, "eager PyTorch reference, any device"),
}


def available_backends() -> Dict[str, BackendStatus]:
    """Per backend: whether it is usable here, and the reason when it is not."""
    return dict(_STATUS)


# Compute capability per CUDA device index, asked of the driver once: ops whose backend
# choice depends on it (Triton's float8_e4m3fn needs sm_89) ask on every call. A plain dict,
# not functools.lru_cache, which torch.compile reports and traces through.
_CAPABILITY: Dict[int, tuple] = {}


def device_capability(device: torch.device) -> tuple:
    """(major, minor) of a CUDA ``device`` (the current device when it has no index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _CAPABILITY.get(index)
    if capability is None:
        capability = _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return capability


# Tegra (Jetson) GPUs: machine code runs on the compute capability it was built for alone.
TEGRA_CAPABILITIES = {(5, 3), (6, 2), (7, 2), (8, 7), (10, 1), (11, 0)}


def arch_list_serves(arch_list: str, capability: tuple) -> Optional[bool]:
    """Whether a build for ``arch_list`` (TORCH_CUDA_ARCH_LIST, as build_info() reports it:
    "8.0;9.0a", "8.6+PTX", ...) holds code a GPU of ``capability`` (major, minor) runs; None
    when that cannot be told: an entry that is not a number ("Hopper", "native"), or no entry
    (an empty list, which torch builds for the GPUs it sees). On desktop GPUs machine code
    for sm_XY runs on sm_XZ with Z >= Y; "a" code on sm_XY alone, its PTX included; "f"
    code on its family (same major); other PTX ("+PTX") on any GPU from sm_XY on. On Tegra,
    machine code runs on its own capability alone."""
    capability = tuple(capability)
    entries = [entry for entry in re.split(r"[;,\s]+", arch_list.strip()) if entry]
    if not entries:
        return None
    serves = False
    for entry in entries:
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry, flags=re.IGNORECASE)
        if match is None:
            return None
        built, kind, ptx = (int(match.group(1)), int(match.group(2))), match.group(3).lower(), bool(match.group(4))
        if kind == "a":
            serves |= capability == built
        elif kind == "f":
            serves |= capability[0] == built[0] and capability[1] >= built[1]
        elif ptx:
            serves |= capability >= built
        elif capability in TEGRA_CAPABILITIES or built in TEGRA_CAPABILITIES:
            serves |= capability == built
        else:
            serves |= capability[0] == built[0] and capability[1] >= built[1]
    return serves


# Per CUDA device index: why the extension's machine code cannot run there (None: it can).
_ARCH_REASONS: Dict[int, Optional[str]] = {}


def _arch_reason(device: torch.device) -> Optional[str]:
    """Why the extension cannot launch on the CUDA ``device``: built for other archs (the
    driver would refuse every launch with "no kernel image"). Decided once per device."""
    if not _STATUS["cuda"].available:  # no GPU visible: nothing launches, nothing to compare
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH_REASONS:
        major, minor = device_capability(torch.device("cuda", index))
        reason = None
        if arch_list_serves(EXTENSION_ARCHS, (major, minor)) is False:
            reason = (f"the CUDA extension was built for archs {EXTENSION_ARCHS} (TORCH_CUDA_ARCH_LIST), none "
                      f"of which runs on this GPU (sm_{major}{minor}); rebuild with "
                      f"TORCH_CUDA_ARCH_LIST=\"{EXTENSION_ARCHS};{major}.{minor}\": {ARCH_REBUILD_COMMAND}")
        _ARCH_REASONS[index] = reason
    return _ARCH_REASONS[index]


def _device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    status = _STATUS[backend]
    if backend == "torch":
        return None
    if backend == "cuda":
        if extension is None:
            return status.reason
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got tensors on {device}"
        return _arch_reason(device)
    # triton
    if device.type == "cuda":
        return None if status.available else status.reason
    if device.type == "cpu" and TRITON_INTERPRETER:
        return None
    if device.type == "cpu":
        return ("the triton backend runs on CPU tensors only under its interpreter: set "
                "TRITON_INTERPRET=1 before importing internlm_kernels")
    return f"the triton backend cannot run on {device} tensors"


def choose_backward_backend(
    requested: str,
    device: torch.device,
    op: str,
    forward_backend: str,
    inputs: Sequence[object],
    unsupported: Optional[Callable[[str], Optional[str]]] = None,
) -> str:
    """The backend for the backward of an ``op`` call whose forward runs the kernel backend
    ``forward_backend``: ``choose_backend`` by the order of "<op>.backward" (an explicit
    request, or INTERNLM_KERNELS_BACKEND, names the same backend both ways); the forward's
    when none of ``inputs`` takes a gradient (no backward will run, so no choice is paid for)."""
    if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)):
        return forward_backend
    return choose_backend(requested, device, op + BACKWARD_SUFFIX, unsupported)


def leaves_choice_to_auto(requested: str) -> bool:
    """Whether a call's ``backend`` leaves the choice to "auto" (no INTERNLM_KERNELS_BACKEND
    naming a backend either): ops can keep a path out of auto's choice without refusing it
    to an explicit request."""
    return requested == "auto" and (os.environ.get(ENV_VAR, "auto") or "auto") == "auto"


def choose_backend(
    requested: str,
    device: torch.device,
    op: str,
    unsupported: Optional[Callable[[str], Optional[str]]] = None,
) -> str:
    """Resolve ``requested`` ("auto" or a backend name) to the backend that serves this call.

    ``unsupported(backend)`` lets an op refuse arguments a backend cannot handle (returning
    the reason); "auto" then moves on to the next backend, an explicit request raises.
    """
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
        if requested not in BACKENDS + ("auto",):
            raise ValueError(f"{ENV_VAR}={requested!r} is not a backend; expected one of {('auto',) + BACKENDS}")
    if requested == "auto":
        for backend in auto_preference(op):
            if _device_reason(backend, device) is None and (unsupported is None or unsupported(backend) is None):
                return backend
        raise AssertionError("unreachable: the torch backend serves every call")
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    reason = _device_reason(requested, device)
    if reason is None and unsupported is not None:
        reason = unsupported(requested)
    if reason is not None:
        raise RuntimeError(f"{op}: backend={requested!r} cannot serve this call: {reason}")
    return requested


def enable_triton_interpreter() -> None:
    """Run the Triton kernels on CPU tensors through Triton's interpreter (slow; for tests,
    the CPU benchmark and debugging). Must come before triton is first imported, since
    Triton reads ``TRITON_INTERPRET`` when its modules are imported."""
    global TRITON_INTERPRETER
    if TRITON_INTERPRETER:
        return
    import sys

    if "triton" in sys.modules:
        raise RuntimeError("enable_triton_interpreter() must run before triton is imported (Triton fixes "
                           "interpreted or compiled mode at import); set TRITON_INTERPRET=1 in the "
                           "environment instead")
    os.environ["TRITON_INTERPRET"] = "1"
    TRITON_INTERPRETER = True
    _STATUS["triton"] = _probe_triton()
