"""Benchmark harness: timing, in-run ceilings, environment record, result rows and files.

Method (see GPU.md): on a GPU, ``triton.testing.do_bench`` (CUDA events, warm-up, L2
flushed between runs, median and quartiles); on a CPU, wall-clock medians, which measure
the eager or interpreted code path and say nothing about kernel speed. Every row records
the max error against the fp32 reference, so a fast wrong kernel cannot look good.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

COPY_BYTES = 1 << 30          # 1 GiB copied per timing: far beyond any L2
GEMM_SIZE = 8192              # bf16 8192^3 matmul: the GEMM ceiling of GPU.md


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


# do_bench repeats a call for ``rep`` ms by its own estimate, so a call longer than rep got a
# single sample (the quick runs' attention backward rows of 2026-11-28: p20 = p80 = median).
MIN_SAMPLES = (5, 10)  # quick, full
MAX_REP_MS = 3000.0


def time_call(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> Timing:
    """Median time of ``fn()`` and its 20/80% quantiles, in ms."""
    if device.type == "cuda":
        import triton.testing

        rep, warmup = (25, 10) if quick else (100, 25)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        rep = min(max(rep, MIN_SAMPLES[0 if quick else 1] * start.elapsed_time(end)), MAX_REP_MS)
        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)
    fn()  # warm-up (compiles Triton/inductor code on first call)
    samples: List[float] = []
    budget_s = 0.5 if quick else 2.0
    start = time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < budget_s and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return Timing(statistics.median(samples), samples[len(samples) // 5], samples[(4 * len(samples)) // 5])


def time_graph_replay(fn: Callable[[], object], *, quick: bool = False) -> Optional[float]:
    """Median ms of ``fn()`` replayed from a CUDA graph: the GPU time without the host's launch
    cost (and without an L2 flush: the caller graph-times only rows whose traffic outgrows
    the L2, ``outgrows_l2``). Next to
    ``time_call``'s time it shows which rows are bound by the host: small kernels whose
    Python dispatch and launches take longer than the GPU work. None when ``fn`` cannot be
    captured (a host synchronisation inside it)."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=10 if quick else 50, return_mode="median")
    except Exception as exc:  # capture refused: report the row without it
        print(f"    no CUDA graph timing: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr, flush=True)
        torch.cuda.synchronize()
        return None


def outgrows_l2(bytes_moved: Optional[int], device: torch.device) -> bool:
    """Whether a row's traffic is at least twice the device's L2, so that replays without an
    L2 flush read it from memory again (a streaming pass evicts its own start). Rows counted
    in FLOPs (bytes_moved None) are bound by compute."""
    if bytes_moved is None:
        return True
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return bytes_moved >= 2 * l2_bytes


def measure_ceilings(device: torch.device, *, quick: bool = False) -> Dict[str, Optional[float]]:
    """Device-to-device copy bandwidth (GB/s) and bf16 GEMM rate (TFLOP/s), measured now."""
    if device.type != "cuda":
        return {"copy_gbps": None, "gemm_bf16_tflops": None}
    src = torch.randn(COPY_BYTES // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = time_call(lambda: dst.copy_(src), device, quick=quick)
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, dtype=torch.bfloat16)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, dtype=torch.bfloat16)
    gemm = time_call(lambda: a @ b, device, quick=quick)
    del src, dst, a, b
    return {
        "copy_gbps": 2 * COPY_BYTES / copy.median_ms / 1e6,
        "gemm_bf16_tflops": 2 * GEMM_SIZE ** 3 / gemm.median_ms / 1e9,
    }


def _git_commit() -> str:
    """The short commit hash, with "+dirty.<hash of the diff>" when tracked files differ from
    it (the numbers then belong to that diff, not to the commit); "unknown" without git."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10).stdout

        commit = git("rev-parse", "--short", "HEAD").strip()
        if not commit:
            return "unknown"
        diff = git("diff", "HEAD")
        return f"{commit}+dirty.{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else commit
    except Exception:
        return "unknown"


def environment(device: torch.device) -> Dict[str, object]:
    """GPU name, versions, commit and date for the results file."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
                     "python": platform.python_version(), "commit": _git_commit()},
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


@dataclasses.dataclass
class Row:
    """One (op, provider, shape) measurement in the GPU.md results format."""

    op: str
    provider: str
    dtype: str
    shape: Dict[str, int]
    ms: float
    ms_p20: float
    ms_p80: float
    ms_graph: Optional[float] = None  # replayed from a CUDA graph: no host launch cost
    gbps: Optional[float] = None
    tflops: Optional[float] = None
    frac_of_ceiling: Optional[float] = None
    max_err: Optional[float] = None
    speedup_vs: Dict[str, float] = dataclasses.field(default_factory=dict)
    tokens_per_s: Optional[float] = None  # end-to-end rows
    # End-to-end rows: the most memory the call held at once beyond what was allocated before
    # its first call (the other providers' models included there), so this provider's own.
    peak_memory_gib: Optional[float] = None

    def to_json(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


def fill_ceiling_fractions(rows: List[Row], ceilings: Dict[str, Optional[float]]) -> None:
    for row in rows:
        if row.gbps is not None and ceilings.get("copy_gbps"):
            row.frac_of_ceiling = row.gbps / ceilings["copy_gbps"]
        elif row.tflops is not None and ceilings.get("gemm_bf16_tflops"):
            row.frac_of_ceiling = row.tflops / ceilings["gemm_bf16_tflops"]


def fill_speedups(rows: List[Row]) -> None:
    """speedup_vs[other] = time(other) / time(this), for every other provider of the same case."""
    cases: Dict[tuple, List[Row]] = {}
    for row in rows:
        cases.setdefault((row.op, row.dtype, json.dumps(row.shape, sort_keys=True)), []).append(row)
    for same_case in cases.values():
        for row in same_case:
            row.speedup_vs = {other.provider: other.ms / row.ms for other in same_case
                              if other is not row and row.ms > 0}


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: List[Row]) -> str:
    header = f"{'op':<24} {'provider':<14} {'dtype':<9} {'shape':<36} {'ms':>9} {'graph ms':>9} {'GB/s':>8} " \
             f"{'TFLOP/s':>8} {'of ceil':>7} {'max err':>9} {'tok/s':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        shape = ",".join(f"{k}={v}" for k, v in row.shape.items())
        lines.append(f"{row.op:<24} {row.provider:<14} {row.dtype:<9} {shape:<36} {row.ms:>9.4f} "
                     f"{_fmt(row.ms_graph, '9.4f')} {_fmt(row.gbps, '8.1f')} {_fmt(row.tflops, '8.1f')} "
                     f"{_fmt(row.frac_of_ceiling, '7.2f')} "
                     f"{_fmt(row.max_err, '9.2e')} {_fmt(row.tokens_per_s, '9.0f')}")
    return "\n".join(lines)


def write_results(path: str, env: Dict[str, object], ceilings: Dict[str, Optional[float]], rows: List[Row]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    document = dict(env)
    document["ceilings"] = ceilings
    document["results"] = [row.to_json() for row in rows]
    # Written beside and moved into place: a run killed by its time limit mid-write keeps the
    # previous file whole (what --resume reads).
    with open(path + ".partial", "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    os.replace(path + ".partial", path)
    csv_path = os.path.splitext(path)[0] + ".csv"
    with open(csv_path, "w") as f:
        f.write("op,provider,dtype,shape,ms,ms_graph,gbps,tflops,frac_of_ceiling,max_err,tokens_per_s\n")
        for row in rows:
            shape = ";".join(f"{k}={v}" for k, v in row.shape.items())
            f.write(f"{row.op},{row.provider},{row.dtype},{shape},{row.ms:.6f},{_fmt(row.ms_graph, '.6f')},"
                    f"{_fmt(row.gbps, '.2f')},"
                    f"{_fmt(row.tflops, '.2f')},{_fmt(row.frac_of_ceiling, '.4f')},{_fmt(row.max_err, '.3e')},"
                    f"{_fmt(row.tokens_per_s, '.1f')}\n")
