"""Build script: the Python package, plus the CUDA extension ``internlm_kernels._C`` when it can be built.

The extension is built whenever torch is a CUDA build and a CUDA toolkit is found; otherwise
the pure-Python/Triton package installs and this script says once why there are no CUDA
kernels. Install against the torch already in the environment:

    pip install --no-build-isolation -e .

Environment:
  CUDA_HOME               toolkit root (else /usr/local/cuda, else the folder above nvcc on PATH)
  TORCH_CUDA_ARCH_LIST    target GPUs, default "8.0;9.0a" (A100, H100/H200)
  MAX_JOBS                parallel compile jobs for ninja (default: CPU count)
  INTERNLM_KERNELS_NO_CUDA=1   skip the extension
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0a"
# Keep whatever the compiler links in from static archives private to the extension. Some
# toolchains link libstdc++ statically into every shared object (the GPU machines' /opt/gcc
# does). Exported, those copies clash with the libstdc++.so that torch loaded first: with
# torch's -Bsymbolic-functions our functions bind to our copy while its data (the locale's
# facet ids) binds to torch's, and the first integer streamed into an error message crashed
# the process. A no-op where libstdc++ is linked dynamically.
LINK_FLAGS = ["-Wl,--exclude-libs,ALL"]


def _say(message: str) -> None:
    print(f"internlm_kernels setup: {message}", file=sys.stderr)


def find_cuda_home():
    """CUDA_HOME, else /usr/local/cuda, else the folder above nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.isdir(os.path.join(home, "include")):
            return home
    return None


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with the reason printed."""
    if os.environ.get("INTERNLM_KERNELS_NO_CUDA") == "1":
        _say("INTERNLM_KERNELS_NO_CUDA=1: installing without CUDA kernels (Triton and torch backends only)")
        return [], {}
    try:
        import torch
    except ImportError:
        _say("torch is not importable (install it first, then use --no-build-isolation): no CUDA kernels")
        return [], {}
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU-only build: installing without CUDA kernels")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        _say("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH): installing without CUDA kernels")
        return [], {}
    # torch.utils.cpp_extension picks its CUDA_HOME at import time; set ours first.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension
    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    _say(f"building internlm_kernels._C with CUDA at {cuda_home} for archs {arch_list} "
         f"against torch {torch.__version__} (MAX_JOBS={os.environ.get('MAX_JOBS', 'all CPUs')})")

    sources = sorted(glob.glob(os.path.join("csrc", "torch", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "instantiations", "*.cu")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    defines = [f'-DIK_TORCH_VERSION="{torch.__version__}"', f'-DIK_CUDA_ARCHS="{arch_list}"']
    nvcc_flags = [
        # No -std flag: torch's cpp_extension picks the standard its headers need (C++20 for
        # torch >= 2.13, C++17 before); the sources compile as either.
        "-O3", "--expt-relaxed-constexpr",
        "-lineinfo",
        # ptxas resource report (registers, spills) in the build log: read it before any GPU time.
        "-Xptxas=-v",
        *defines,
    ]
    extension = cpp_extension.CUDAExtension(
        name="internlm_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", *defines], "nvcc": nvcc_flags},
        extra_link_args=LINK_FLAGS,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
