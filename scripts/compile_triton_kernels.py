"""Compile every Triton kernel ahead of time for real GPUs, without a GPU.

    python scripts/compile_triton_kernels.py [--arch 90] [--arch 80] [--report]

The CPU test suite runs the Triton kernels under the interpreter, which never goes through
Triton's NVIDIA backend. This script does: each kernel is lowered to PTX and cubin (ptxas)
for the given architectures with the launch configurations the launchers use (autotune
candidates included), so type errors, unsupported constructs and register spills show up
on a machine with no GPU. It must run without TRITON_INTERPRET (it sets it to 0).

Each kernel is specialised as Triton's launcher specialises a typical call, since that
decides vectorisation and so registers: pointers 16-byte aligned, strides multiples of 16
elements (LSE's unit stride a constant 1), and the sizes each case names. Without it every
load would be element-wise (the RMSNorm kernels' 16-byte loads became 2-byte ones).

Exit status 1 if any kernel fails to compile (with --strict, also if any spills registers).
Spills are always listed: they are expected for some attention tiles on sm_90 (Triton keeps
wgmma accumulators in registers), and the autotuner picks among the candidates on the GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from internlm_kernels.triton import attention, rms_norm, rotary  # noqa: E402

FLOATS = {"eps", "qk_scale", "sm_scale"}
SIZES = {"M", "N"}  # upper-case names that are not pointers
UNIT_STRIDES = {"stride_ls"}  # innermost strides of contiguous buffers: 1 in every launch
# Sizes of the benchmark's calls (InternLM2-7B shapes: 32 / 8 heads of 128, 4096 positions;
# decode: one new token, 16-row tiles, 64-key splits), as the launcher specialises them.
ROTARY_SIZES = {"head_dim": 128, "rotary_half": 64, "table_len": 4096, "heads_q": 32, "heads_k": 8}
ATTENTION_SIZES = {"seqlen_q": 8192, "seqlen_k": 8192, "length_bucket": 8192}
# Triton's fp8 types: (mantissa bits, smallest normal exponent, largest finite), as the
# KV-cache launchers pass them for torch.float8_e4m3fn and torch.float8_e5m2
FP8_FORMATS = {"fp8e4nv": attention._fp8_format(torch.float8_e4m3fn),
               "fp8e5": attention._fp8_format(torch.float8_e5m2)}
DECODE_SIZES = {"seqlen_q": 1, "new_tokens": 1, "capacity": 4096, "heads_kv": 8, "heads": 8, "rows": 4,
                "rows_padded": 16, "table_len": 4096, "rotary_half": 64}


def signature(kernel, constexprs: dict, pointers: dict, default_pointer: str) -> dict:
    """Argument types by the kernels' naming convention: UPPERCASE names are pointers (dtype
    from ``pointers`` or the default; a type there may also be a ``tensordesc<...>``), FLOATS
    are fp32, the rest int32 (strides, sizes), as Triton types integer arguments that fit
    (the kernels widen to int64 where offsets can exceed 2^31)."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name[0].isupper() and name not in SIZES:
            types[name] = pointers.get(name, default_pointer)
        elif name in FLOATS:
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def specialise(kernel, constexprs: dict, types: dict, sizes: dict):
    """(types, constexprs, attrs) as the launcher specialises a typical call: integers equal
    to 1 become constants, pointers and integers divisible by 16 carry tt.divisibility = 16.
    Strides are taken as multiples of 16 (unit strides as 1); other integers are left
    unspecialised unless ``sizes`` gives a value."""
    types, constexprs, attrs = dict(types), dict(constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        value = sizes.get(name, 1 if name in UNIT_STRIDES else 16 if name.startswith("stride") else None)
        if types[name] == "i32" and value == 1:
            types[name], constexprs[name] = "constexpr", 1
        elif types[name].startswith("*") or (types[name] == "i32" and value is not None and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return types, constexprs, attrs


def cases(quick: bool = False):
    """(label, kernel, constexprs, pointer dtypes, default pointer dtype, num_warps, num_stages,
    sizes): sizes gives integer arguments of a typical call beyond the stride defaults of
    ``specialise``. quick: every kernel and code path, but attention only in bf16 with its
    first tile shape."""
    rows = 16384  # the benchmark's M: one (1, M, N) view
    for dtype in ("bf16", "fp16", "fp32"):
        for fused in (False, True):
            for n_cols in (128, 2048, 4096, 8192, 20000):
                # rows_per_program: 16384 rows over 4 programs per SM of a 132-SM GPU
                sizes = {"M": rows, "N": n_cols, "rows_inner": rows, "rows_per_program": 32}
                block_m, block_n, single_pass, warps = rms_norm.rms_norm_block_config(n_cols)
                meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "SINGLE_PASS": single_pass}
                yield (f"rms_norm_fwd {dtype} fused={fused} N={n_cols}", rms_norm._rms_norm_fwd_kernel,
                       {"HAS_RESIDUAL": fused, **meta}, {"RSTD": "fp32"}, f"*{dtype}", warps, 1, sizes)
                block_m, block_n, single_pass, warps = rms_norm.rms_norm_block_config(n_cols, backward=True)
                meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "SINGLE_PASS": single_pass}
                flags = {"HAS_DRESIDUAL_OUT": fused, "STORE_DRESIDUAL": fused, "COMPUTE_DW": True}
                yield (f"rms_norm_bwd {dtype} fused={fused} N={n_cols}", rms_norm._rms_norm_bwd_kernel,
                       {**flags, **meta}, {"RSTD": "fp32", "DW_PARTIAL": "fp32"}, f"*{dtype}", warps, 1, sizes)
                step_bytes = block_m * block_n * _bytes(dtype)
                if single_pass and step_bytes <= rms_norm.TMA_BWD_MAX_ROW_BYTES:
                    inputs = 3 if fused else 2
                    stages = 3 if 2 * inputs * step_bytes <= rms_norm.TMA_BWD_PREFETCH_BYTES else 2
                    descriptor = f"tensordesc<{dtype}[1, {block_m}, {block_n}]>"
                    yield (f"rms_norm_bwd_tma {dtype} fused={fused} N={n_cols} stages={stages}",
                           rms_norm._rms_norm_bwd_tma_kernel,
                           {**flags, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages},
                           {"RSTD": "fp32", "DW_PARTIAL": "fp32", "DY": descriptor, "X": descriptor,
                            "DRESIDUAL_OUT": descriptor}, f"*{dtype}", warps, stages, sizes)
        for interleaved in (False, True):
            block_h, block_r, block_rest, warps = rotary.rotary_block_config(32, 8, 128, 128)
            yield (f"rotary {dtype} interleaved={interleaved}", rotary._rotary_kernel,
                   {"HAS_POSITION_IDS": False, "HAS_OFFSETS_TENSOR": True, "IS_VARLEN": True,
                    "INTERLEAVED": interleaved, "CONJUGATE": False, "COPY_REST": True, "BLOCK_H": block_h,
                    "BLOCK_R": block_r, "BLOCK_REST": block_rest, "BLOCK_SEQS": rotary.SEQUENCE_SEARCH_BLOCK},
                   {"COS": "fp32", "SIN": "fp32", "POSITION_IDS": "i64", "SEQLEN_OFFSETS": "i64",
                    "CU_SEQLENS": "i32"}, f"*{dtype}", warps, 1, ROTARY_SIZES)
    stats = {"LSE": "*fp32", "DELTA": "*fp32", "CU_SEQLENS_Q": "*i32", "CU_SEQLENS_K": "*i32"}
    for dtype in ("bf16",) if quick else ("bf16", "fp16"):
        for head_dim in (64, 128, 256):
            for causal, varlen in ((True, False), (False, True)):
                flags = {"GROUP": 4, "HEAD_DIM": head_dim, "BLOCK_D": head_dim, "IS_VARLEN": varlen,
                         "HAS_LEFT": not causal, "HAS_RIGHT": causal, "WIDE_ROWS": False}
                shapes_fwd = attention._shapes(head_dim, "fwd")
                shapes_bwd = {"dkdv": attention._shapes(head_dim, "dkdv"), "dq": attention._shapes(head_dim, "dq")}
                if quick:
                    shapes_fwd, shapes_bwd = shapes_fwd[:1], {name: s[:1] for name, s in shapes_bwd.items()}
                for block_m, block_n, warps, stages in shapes_fwd:
                    yield (f"attention_fwd {dtype} d={head_dim} causal={causal} varlen={varlen} "
                           f"{block_m}x{block_n}w{warps}s{stages}", attention._attn_fwd_kernel,
                           {**flags, "BLOCK_M": block_m, "BLOCK_N": block_n}, stats, f"*{dtype}", warps, stages,
                           ATTENTION_SIZES)
                for label, kernel in (("dkdv", attention._attn_bwd_dkdv_kernel),
                                      ("dq", attention._attn_bwd_dq_kernel)):
                    for block_m, block_n, warps, stages in shapes_bwd[label]:
                        yield (f"attention_bwd_{label} {dtype} d={head_dim} causal={causal} varlen={varlen} "
                               f"{block_m}x{block_n}w{warps}s{stages}", kernel,
                               {**flags, "BLOCK_M": block_m, "BLOCK_N": block_n}, stats, f"*{dtype}", warps, stages,
                           ATTENTION_SIZES)
            yield (f"attention_delta {dtype} d={head_dim}", attention._attn_bwd_delta_kernel,
                   {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_S": max(16, 4096 // head_dim)},
                   {"DELTA": "*fp32"}, f"*{dtype}", 4, 1, {})
            tables = {"CACHE_SEQLENS": "*i32", "COS": "*fp32", "SIN": "*fp32", "BLOCK_TABLE": "*i32",
                      "K_SCALE": "*fp32", "V_SCALE": "*fp32"}
            block_n, warps = (64, 4) if head_dim <= 64 else (64, 8) if head_dim <= 128 else (32, 8)
            # contiguous caches with and without rotary; pages of 16 positions (vLLM's default);
            # fp8 caches: e4m3 contiguous (the benchmark's triton_fp8 rows) and paged with rotary,
            # e5m2 (the fp8 that GPUs before sm_89 take)
            for rotary_in_kernel, page_size, cache in ((False, 0, None), (True, 0, None), (False, 16, None),
                                                       (False, 0, "fp8e4nv"), (True, 16, "fp8e4nv"),
                                                       (True, 0, "fp8e5")):
                rope = {"ROTARY": rotary_in_kernel, "INTERLEAVED": False, "PAGE_SIZE": page_size}
                mantissa_bits, min_exponent, largest = FP8_FORMATS.get(cache, (0, 0, 0.0))
                fp8 = {"FP8_MANTISSA_BITS": mantissa_bits, "FP8_MIN_EXPONENT": min_exponent, "FP8_LARGEST": largest}
                caches = {name: f"*{cache}" for name in ("K_CACHE", "V_CACHE")} if cache else {}
                label = f"{dtype} d={head_dim} rotary={rotary_in_kernel} pages={page_size}" + (f" {cache}" if cache
                                                                                                 else "")
                yield (f"kvcache_append {label}", attention._kvcache_append_kernel,
                       {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, **rope, **fp8}, {**tables, **caches},
                       f"*{dtype}", 4, 1, DECODE_SIZES)
                yield (f"decode_split {label}", attention._attn_decode_split_kernel,
                       {"GROUP": 4, "HEAD_DIM": head_dim, "BLOCK_D": head_dim, "HAS_LEFT": False, "HAS_RIGHT": True,
                        "BLOCK_M": 16, "BLOCK_N": block_n, **rope, "WIDE_ROWS": False,
                        "SCALED_CACHE": cache is not None},
                       {"PART_O": "*fp32", "PART_LSE": "*fp32", **tables,
                        **({"K": f"*{cache}", "V": f"*{cache}"} if cache else {})},
                       f"*{dtype}", warps, 1, DECODE_SIZES)
            yield (f"decode_combine {dtype} d={head_dim}", attention._attn_decode_combine_kernel,
                   {"GROUP": 4, "HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_SPLITS": 16},
                   {"PART_O": "*fp32", "PART_LSE": "*fp32", "CACHE_SEQLENS": "*i32"}, f"*{dtype}", 4, 1,
                   DECODE_SIZES)


def _bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def resource_usage(cubin: bytes) -> str:
    """Registers / spills of a cubin, from Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90 and 80)")
    parser.add_argument("--report", action="store_true", help="print registers per kernel")
    parser.add_argument("--filter", default="", help="only kernels whose label contains this")
    parser.add_argument("--quick", action="store_true", help="attention in bf16 with one tile shape only")
    parser.add_argument("--strict", action="store_true", help="fail on register spills too")
    args = parser.parse_args()
    failures, spills = [], []
    # sm_80 first: triton 3.6 failed to generate PTX for the sm_80 e5m2 KV-cache kernels when
    # the sm_90 e4m3 ones had compiled before them in the same process (3.8 does not).
    for arch in sorted(args.arch or [80, 90]):
        target = GPUTarget("cuda", arch, 32)
        for label, kernel, constexprs, pointers, default_pointer, warps, stages, sizes in cases(args.quick):
            # TMA: sm_90 and newer; Triton's float8_e4m3fn (fp8e4nv): sm_89 and newer
            if args.filter not in label or (arch < 90 and "_tma" in label) or (arch < 89 and "fp8e4nv" in label):
                continue
            fn = kernel
            pointer_types = {k: (v if v.startswith(("*", "tensordesc")) else f"*{v}") for k, v in pointers.items()}
            types, constants, attrs = specialise(fn, constexprs, signature(fn, constexprs, pointer_types,
                                                                           default_pointer), sizes)
            try:
                compiled = triton.compile(ASTSource(fn, types, constants, attrs),
                                          target=target, options={"num_warps": warps, "num_stages": stages})
            except Exception as error:  # report every failure, not only the first
                failures.append(f"sm_{arch} {label}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
                continue
            usage = resource_usage(compiled.asm["cubin"])
            registers = re.search(r"REG:(\d+)", usage)
            stack_match = re.search(r"STACK:(\d+)", usage)
            stack = int(stack_match.group(1)) if stack_match else 0
            if stack > 0:
                spills.append(f"sm_{arch} {label}: {stack} bytes of stack (register spills)")
            if args.report:
                print(f"sm_{arch} {label}: {registers.group(1) if registers else '?'} registers, stack {stack}")
    for spill in spills:
        print("SPILL", spill)
    for failure in failures:
        print("FAIL", failure)
    print(f"{'all kernels compiled' if not failures else f'{len(failures)} failed to compile'}; "
          f"{len(spills)} with register spills")
    return 1 if failures or (args.strict and spills) else 0


if __name__ == "__main__":
    sys.exit(main())
