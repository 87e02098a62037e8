"""The extension's machine code, read without a GPU: register spills and the instructions the
kernels are built around.

The build compiles SASS for every arch of TORCH_CUDA_ARCH_LIST; ``cuobjdump`` (shipped in
Triton's package) reads it back from the built ``_C`` library. A spill or a lost tensor-core
path shows here first, long before a GPU times it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

import pytest

from internlm_kernels import backends

pytestmark = pytest.mark.skipif(
    backends.extension is None, reason=f"extension not built here: {backends.available_backends()['cuda'].reason}")

# Kernels allowed a stack frame (spilled registers), as (arch, pattern on the demangled name,
# largest frame in bytes); docs/performance.md ("ptxas") gives the reasons. Nothing else may
# spill: in particular nothing on sm_90a, the arch the performance targets are set on.
KNOWN_SPILLS = [
    # The default forward at d = 128 (4 warps of 32 rows, TileTraits<T, 128, 128, 64, 4, 1>):
    # 255 registers on sm_80; measured faster than the spill-free 16-row layout on an H200.
    ("sm_80", r"attention_fwd_kernel<[^<>]*TileTraits<[^<>]*, 128, 128, 64, 4, 1, false>", 64),
    # The optional shared-scores dK/dV kernel with atomic dQ (8 warps, 128 keys).
    ("sm_80", r"attention_bwd_dkdv_kernel<[^<>]*TileTraits<[^<>]*, 128, 128, 64, 8, 1, true>, (true|false), true>", 16),
]

ATTENTION_KERNELS = ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")
NORM_AND_ROTARY_KERNELS = ("rms_norm_fwd_kernel", "rms_norm_fwd_looped_kernel", "rms_norm_bwd_kernel",
                           "rms_norm_bwd_aligned_kernel", "rms_norm_bwd_looped_kernel", "rotary_kernel")


def _cuobjdump() -> str:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton
        candidates.insert(0, os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for tool in candidates:
        if os.path.exists(tool):
            return tool
    pytest.skip("no cuobjdump here (neither Triton's nor the CUDA toolkit's) to read the extension's SASS")


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        pytest.skip("no c++filt (binutils) here to demangle the kernels' names")
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _by_arch_and_kernel(text: str, function_line: str) -> dict[tuple[str, str], list[str]]:
    """cuobjdump output -> {(arch, demangled kernel name): its lines}."""
    sections: dict[tuple[str, str], list[str]] = {}
    arch, current = None, None
    for line in text.splitlines():
        if (match := re.match(r"\s*arch = (sm_\w+)", line)):
            arch, current = match.group(1), None
        elif (match := re.match(function_line, line)):
            current = (arch, match.group(1))
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    names = _demangle(sorted({name for _, name in sections}))
    return {(arch, names[name]): lines for (arch, name), lines in sections.items()}


@functools.lru_cache(maxsize=None)
def _resource_usage() -> dict[tuple[str, str], dict[str, int]]:
    text = subprocess.run([_cuobjdump(), "--dump-resource-usage", backends.extension.__file__],
                          capture_output=True, text=True, check=True).stdout
    usage = {}
    for key, lines in _by_arch_and_kernel(text, r"\s*Function (\S+):").items():
        fields = re.findall(r"([A-Z]+):(\d+)", " ".join(lines))
        usage[key] = {name: int(value) for name, value in fields}
    assert usage, f"cuobjdump listed no kernels in {backends.extension.__file__}"
    return usage


@functools.lru_cache(maxsize=None)
def _sass() -> dict[tuple[str, str], str]:
    text = subprocess.run([_cuobjdump(), "-sass", backends.extension.__file__],
                          capture_output=True, text=True, check=True).stdout
    return {key: "\n".join(lines) for key, lines in _by_arch_and_kernel(text, r"\s*Function : (\S+)").items()}


def _kernels(sections: dict, names: tuple[str, ...]) -> dict:
    found = {key: value for key, value in sections.items() if re.search(rf"\b({'|'.join(names)})<", key[1])}
    assert found, f"no kernel named {names} in the extension"
    return found


def test_every_arch_of_the_build_has_sass():
    archs = {arch for arch, _ in _resource_usage()}
    built = backends.extension.build_info()["cuda_archs"]
    expected = {"sm_" + entry.strip().replace(".", "") for entry in re.split(r"[;\s]+", built)
                if entry.strip() and "PTX" not in entry}
    assert expected <= archs, f"build names archs {built!r}; SASS found for {sorted(archs)}"


def test_no_kernel_spills_registers_except_the_documented_ones():
    unexpected = []
    for (arch, kernel), usage in sorted(_resource_usage().items()):
        frame = usage.get("STACK", 0) + usage.get("LOCAL", 0)
        if frame == 0:
            continue
        allowed = [limit for known_arch, pattern, limit in KNOWN_SPILLS if arch == known_arch and re.search(pattern, kernel)]
        if not allowed or frame > allowed[0]:
            unexpected.append(f"{arch} {kernel}: {usage.get('REG')} registers, {frame} B of stack frame"
                              + (f" (allowed {allowed[0]})" if allowed else ""))
    assert not unexpected, "kernels spill registers:\n" + "\n".join(unexpected)


def test_attention_kernels_run_on_tensor_cores_fed_by_ldmatrix_and_16_byte_cp_async():
    for (arch, kernel), sass in _kernels(_sass(), ATTENTION_KERNELS).items():
        for instruction in ("HMMA.16816.F32", "LDSM.16.M88.4", "LDGSTS.E.BYPASS.128"):
            assert instruction in sass, f"{arch} {kernel}: no {instruction} in its SASS"


def test_norm_and_rotary_kernels_load_and_store_16_bytes_per_access():
    for (arch, kernel), sass in _kernels(_sass(), NORM_AND_ROTARY_KERNELS).items():
        assert "LDG.E.128" in sass or "LDGSTS.E.BYPASS.128" in sass, f"{arch} {kernel}: no 16-byte global load"
        assert "STG.E.128" in sass, f"{arch} {kernel}: no 16-byte global store"
