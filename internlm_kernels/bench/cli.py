"""``python -m internlm_kernels bench``: every op, every provider available here, one table.

On a GPU: InternLM2-7B shapes, ceilings measured in the same run, JSON + CSV written to
``benchmarks/results/<gpu>-<date>.json``. On a CPU: tiny shapes through the eager and
interpreted paths, clearly labelled; those timings are not kernel speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

import torch

from internlm_kernels.bench import cases as bench_cases
from internlm_kernels.bench.harness import (
    Row, environment, fill_ceiling_fractions, fill_speedups, format_table, measure_ceilings, outgrows_l2, time_call,
    time_graph_replay, write_results,
)

DEFAULT_PROVIDERS = ("cuda", "triton", "eager", "torch_compile", "torch_rms_norm", "liger", "sdpa_flash",
                     "sdpa_cudnn", "sdpa_efficient", "sdpa_math")
# Not timed from a CUDA graph: the eager references read sequence lengths on the host; the
# model rows are end to end (their host time is part of what they measure); and autograd's
# backward, whose capture failed on the GPU and left the CUDA generator in capture mode, so that
# every later case failed to draw its inputs. Backward rows of our RMSNorm and rotary kernels
# replay the backward ops alone instead (case.backward_kernels: no autograd, no generator).
HOST_SYNCING_PROVIDERS = ("eager", "sdpa_math")
GRAPH_TIMING_BELOW_MS = 2.0
REPO_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "benchmarks", "results")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", default=",".join(bench_cases.OPS),
                        help=f"comma-separated subset of {','.join(bench_cases.OPS)}")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated subset of {','.join(DEFAULT_PROVIDERS)} (default: all that run "
                             f"here; torch_compile only on a GPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (for scripts/gpu_check.sh)")
    parser.add_argument("--json", default=None, help="results path (default: benchmarks/results/<gpu>-<date>.json "
                                                      "on a GPU, benchmarks/results/local/ on a CPU)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows (and ceilings) already in the --json file when it comes from this GPU, "
                             "day, commit and --quick setting (a run a time limit cut short), and measure only the "
                             "rest")


def _default_json_path(env, on_gpu: bool) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(env["gpu"]).lower()).strip("-")
    day = datetime.date.today().strftime("%Y%m%d")
    folder = REPO_RESULTS if on_gpu else os.path.join(REPO_RESULTS, "local")
    return os.path.join(folder, f"{slug}-{day}.json")


def _kept_results(path: str, env) -> tuple:
    """(rows, ceilings) of an earlier run into ``path`` on this GPU, today, at this commit, with
    the same --quick; ([], None) when there is none or it comes from elsewhere."""
    if not os.path.exists(path):
        return [], None
    try:
        with open(path) as f:
            document = json.load(f)
    except ValueError as exc:
        print(f"--resume: {path} is not a results file ({exc}): measuring everything", flush=True)
        return [], None
    # --quick counts too: its rows take fewer samples, so the two kinds do not mix in one file.
    here = (env["gpu"], env["date"], env["versions"]["commit"], env["quick"])
    there = (document.get("gpu"), document.get("date"), document.get("versions", {}).get("commit"),
             document.get("quick"))
    if here[2] == "unknown":
        print("--resume: no git commit to tell the code apart by: measuring everything", flush=True)
        return [], None
    if there != here:
        print(f"--resume: {path} holds a run of {there}, not of {here}: measuring everything", flush=True)
        return [], None
    rows = [Row(**{**row, "speedup_vs": {}}) for row in document.get("results", [])]
    print(f"--resume: keeping {len(rows)} rows of {path} and the ceilings measured with them", flush=True)
    return rows, document.get("ceilings")


def _row_key(op: str, provider: str, dtype: str, shape) -> tuple:
    return op, provider, dtype, tuple(sorted(shape.items()))


def run(args: argparse.Namespace) -> int:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        from internlm_kernels import backends
        backends.enable_triton_interpreter()
        print("NOTE: no CUDA GPU here. Running tiny shapes on the CPU: the eager reference and the Triton kernels "
              "under the Triton interpreter. These timings are CPU/interpreter timings, NOT kernel speed; "
              "the error column is meaningful.", flush=True)
    providers = args.providers.split(",") if args.providers else [
        p for p in DEFAULT_PROVIDERS if on_gpu or p != "torch_compile"]
    unknown = set(providers) - set(DEFAULT_PROVIDERS)
    if unknown:
        print(f"unknown providers {sorted(unknown)}; expected some of {DEFAULT_PROVIDERS}", file=sys.stderr)
        return 2
    ops = args.ops.split(",")
    dtype = getattr(torch, args.dtype)

    env = {**environment(device), "quick": bool(args.quick)}
    print(f"device: {env['gpu']}; torch {torch.__version__}; triton {env['versions']['triton']}; "
          f"commit {env['versions']['commit']}", flush=True)
    path = args.json or _default_json_path(env, on_gpu)
    rows, ceilings = _kept_results(path, env) if getattr(args, "resume", False) else ([], None)
    measured = {_row_key(row.op, row.provider, row.dtype, row.shape) for row in rows}
    ceilings = ceilings or measure_ceilings(device, quick=args.quick)
    if on_gpu:
        print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 GEMM {ceilings['gemm_bf16_tflops']:.0f} TFLOP/s",
              flush=True)

    started = time.monotonic()
    factories = bench_cases.build_cases(ops, device, dtype, providers, small=not on_gpu, quick=args.quick)
    for index, factory in enumerate(factories, 1):
        try:
            case = factory()
        except Exception as exc:  # e.g. out of memory for one shape: report, go on
            print(f"[case {index}/{len(factories)}] could not be built: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            continue
        for provider, fn in case.providers.items():
            if _row_key(case.op, provider, str(dtype).replace("torch.", ""), case.shape) in measured:
                continue
            # Seconds since the start: where a time-limited run spends its time (compiles, mostly).
            print(f"[case {index}/{len(factories)} +{time.monotonic() - started:.0f}s] {case.op} {provider} "
                  f"{case.shape}", file=sys.stderr, flush=True)
            try:
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()
                    allocated_before = torch.cuda.memory_allocated()
                error = case.error_by_provider.get(provider, case.error)(fn())
                timing = time_call(fn, device, quick=args.quick)
            except Exception as exc:  # one failing provider must not hide the others' numbers
                print(f"    {provider} failed: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr, flush=True)
                continue
            row = Row(case.op, provider, str(dtype).replace("torch.", ""), case.shape, timing.median_ms,
                      timing.p20_ms, timing.p80_ms, max_err=error)
            # The host's launch cost (tens of microseconds) can only hide the GPU time of short calls.
            # Backward rows replay their backward kernels alone (case.backward_kernels).
            graphed = case.backward_kernels.get(provider) if case.op.endswith("_bwd") else fn
            if on_gpu and graphed is not None and provider not in HOST_SYNCING_PROVIDERS and \
                    not case.op.startswith("model_") and timing.median_ms < GRAPH_TIMING_BELOW_MS and \
                    outgrows_l2(case.bytes_moved, device):
                row.ms_graph = time_graph_replay(graphed, quick=args.quick)
            bytes_moved = case.bytes_by_provider.get(provider, case.bytes_moved)
            if bytes_moved is not None:
                row.gbps = bytes_moved / timing.median_ms / 1e6
            if case.flops is not None:
                row.tflops = case.flops / timing.median_ms / 1e9
            if case.tokens is not None:
                row.tokens_per_s = case.tokens / timing.median_ms * 1e3
                if on_gpu:
                    row.peak_memory_gib = (torch.cuda.max_memory_allocated() - allocated_before) / 2**30
            rows.append(row)
        del case
        if on_gpu:
            torch.cuda.empty_cache()
        # Written after every case, so a run stopped by a time limit keeps what it measured.
        fill_ceiling_fractions(rows, ceilings)
        fill_speedups(rows)
        write_results(path, env, ceilings, rows)
    fill_ceiling_fractions(rows, ceilings)
    fill_speedups(rows)
    write_results(path, env, ceilings, rows)
    print()
    print(format_table(rows))
    print(f"\nresults: {path} (+ .csv)")
    from internlm_kernels.bench.report import plot_results

    plots = plot_results(path)
    if plots:
        print(f"plots: {', '.join(plots)}")
    if not on_gpu:
        print("(CPU run: ms are CPU/interpreter timings, not kernel speed)")
    return 0
