"""The main job on a machine without a GPU: every op, every backend here, errors and timings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the full benchmark runs in scripts/gpu_check.sh")
def test_bench_runs_every_op_and_labels_cpu_timings(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CLI turns the interpreter on by itself
    result = subprocess.run([sys.executable, "-m", "internlm_kernels", "bench", "--quick", "--json", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert out.with_suffix(".csv").exists()
    assert {"gpu", "date", "versions", "ceilings", "results"} <= set(document)
    rows = document["results"]
    ops = {row["op"] for row in rows}
    assert ops == {"rms_norm_fwd", "rms_norm_bwd", "fused_add_rms_norm_fwd", "fused_add_rms_norm_bwd",
                   "rotary_fwd", "rotary_bwd", "attention_fwd", "attention_bwd", "attention_decode",
                   "model_prefill", "model_decode", "model_train_step"}
    cuda = {"cuda"} if torch.cuda.is_available() else set()
    for op in ops:
        providers = {row["provider"] for row in rows if row["op"] == op}
        extra = {"sdpa_math"} if op.startswith("attention") else set() if op.startswith("model") else cuda
        # The model's kernels row is "auto" (its KV-cache decode is CUDA's under auto on a GPU).
        ours = "auto" if op.startswith("model") else "triton"
        assert {"eager", ours} | extra <= providers, (op, providers)
    for row in rows:
        assert row["ms"] > 0
        if row["op"].startswith("model"):
            assert row["tokens_per_s"] > 0
        else:  # bf16 against the fp32 oracle: small but (for rounding reasons) not zero
            assert 0 <= row["max_err"] < 0.5, row
    if not torch.cuda.is_available():
        assert "NOT kernel speed" in result.stdout


def test_compiled_references_stay_compiled_past_dynamo_recompile_limit():
    """Every case compiles the same reference function, one shape each; dynamo's default limit
    of 8 recompiles would run the later cases eagerly under the torch_compile name."""
    from internlm_kernels import reference
    from internlm_kernels.bench import cases

    config = torch._dynamo.config
    # Restored by hand: monkeypatch's undo deletes such settings from torch's config module.
    names = [cases._dynamo_setting("recompile_limit", "cache_size_limit"),
             cases._dynamo_setting("accumulated_recompile_limit", "accumulated_cache_size_limit"),
             "fail_on_recompile_limit_hit"]
    saved = {name: getattr(config, name) for name in names if name is not None and hasattr(config, name)}
    torch._dynamo.reset()
    try:
        compiled = [cases._compiled(reference.rms_norm, backend="eager") for _ in range(12)]
        assert config.fail_on_recompile_limit_hit
        for width, fn in enumerate(compiled, 1):  # 12 shapes: past the default limit
            x, weight = torch.randn(3, 8 * width), torch.randn(8 * width)
            torch.testing.assert_close(fn(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
        torch._dynamo.reset()


def test_max_error_keeps_nan_and_checks_every_output():
    from internlm_kernels.bench.cases import max_error

    expected = (torch.zeros(3), torch.zeros(2))
    assert max_error((torch.tensor([0.1, 0.0, 0.0]), torch.tensor([0.0, 0.25])), expected) == 0.25
    assert math.isnan(max_error((torch.tensor([0.1, 0.0, 0.0]), torch.tensor([float("nan"), 0.0])), expected))
    with pytest.raises(ValueError, match="1 outputs against 2 expected"):
        max_error(torch.zeros(3), expected)


def test_graph_replays_only_rows_that_outgrow_the_l2(monkeypatch):
    from internlm_kernels.bench import harness

    class Properties:
        L2_cache_size = 50 * 2**20

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    gpu = torch.device("cuda", 0)
    assert harness.outgrows_l2(None, gpu)  # attention rows, counted in FLOPs
    assert harness.outgrows_l2(134 * 2**20, gpu)  # decode, B = 1, 32K cache
    assert not harness.outgrows_l2(16 * 2**20, gpu)  # decode, B = 1, 4K cache: replays from L2


def test_backward_rows_run_their_forward_inside_the_providers_guard():
    """A backward runner runs its forward at the first call, not when the case is built: on the
    GPU, SDPA's memory-efficient backend refusing a shape took every attention_bwd row with it."""
    from internlm_kernels.bench import cases

    x = torch.randn(5, requires_grad=True)
    forwards = []

    def forward():
        forwards.append(1)
        return x * 3

    run = cases._backward_runner(forward, (x,), (torch.ones(5),))
    assert forwards == []
    first, second = run()[0], run()[0]
    assert forwards == [1]
    assert torch.equal(first, torch.full((5,), 3.0)) and torch.equal(second, first)

    def refusing_forward():
        raise RuntimeError("No available kernel")

    refusing = cases._backward_runner(refusing_forward, (x,), (torch.ones(5),))
    with pytest.raises(RuntimeError, match="No available kernel"):
        refusing()


@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm", "rotary"])
def test_backward_kernels_alone_give_the_backward_gradients(op):
    """case.backward_kernels (what the benchmark replays from a CUDA graph for backward rows)
    computes what autograd's backward computes, on the same inputs."""
    from internlm_kernels.bench import cases

    cpu = torch.device("cpu")
    if op == "rotary":
        case = cases.rotary_case(cpu, torch.float32, 1, 8, 4, 2, 32, ["triton"], backward=True)
    else:
        case = cases.rms_norm_cases(cpu, torch.float32, 6, 40, ["triton"], fused=op != "rms_norm", backward=True)
    assert set(case.backward_kernels) == {"triton"}
    through_autograd = case.providers["triton"]()
    alone = case.backward_kernels["triton"]()
    assert case.error(alone) < 1e-4  # against the reference's fp32 gradients (fp32 inputs)
    # autograd gives (dx, dweight) / (dx, dresidual, dweight) / (dq, dk); the op the same, with
    # dweight in the weight's dtype.
    assert len(alone) == len(through_autograd)
    for ours, expected in zip(alone, through_autograd):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_oracle_by_row_chunks_equals_whole_gradients(causal):
    """The benchmark's backward oracle takes query rows a chunk at a time (a 16K sequence's
    scores never whole); its sum over chunks must be the whole problem's gradients, the
    causal chunks' bottom-right alignment included."""
    from internlm_kernels import reference
    from internlm_kernels.bench.cases import _attention_grads_by_row_chunks

    q, k, v = (torch.randn(2, 13, heads, 8, dtype=torch.float64) for heads in (4, 2, 2))
    grad = torch.randn(2, 13, 4, 8, dtype=torch.float64)
    whole = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expected = torch.autograd.grad(reference.attention(*whole, causal=causal), whole, grad)
    chunked = _attention_grads_by_row_chunks(q, k, v, grad, causal, rows=5)
    for got, want in zip(chunked, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backward", [False, True])
def test_attention_rows_error_reads_the_last_batch_row(backward):
    """The attention rows' max error covers the last batch row (a nonzero batch offset) and,
    for the backward, a KV head's gradients: corrupting them there shows in the error."""
    from internlm_kernels.bench import cases

    case = cases.attention_case(torch.device("cpu"), torch.bfloat16, 3, 24, 4, 2, 16, True, ["triton"],
                                backward=backward)
    result = case.providers["triton"]()
    assert case.error(result) < 0.1
    outputs = [t.detach().clone() for t in cases._as_tuple(result)]
    outputs[-1][-1, -1, -1, 0] += 4.0  # out (forward) or dv (backward): last batch row, last head
    assert case.error(tuple(outputs) if backward else outputs[0]) >= 3


def test_bench_resume_keeps_rows_of_the_same_run_and_measures_the_rest(tmp_path, monkeypatch):
    """--resume (gpu_check's bench phase after a cut) keeps the rows and ceilings already in
    the results file when they come from this GPU, day, commit and --quick setting, and calls
    only the providers not measured yet; a file from another commit is measured again in full."""
    import argparse

    from internlm_kernels.bench import cases, cli, harness, report

    calls = []
    ceilings_measured = []

    def factory(shape):
        def provider(name):
            return lambda: calls.append((name, shape["N"])) or torch.ones(2)
        return lambda: cases.Case("rms_norm_fwd", torch.bfloat16, dict(shape), 4, None,
                                  {name: provider(name) for name in ("triton", "eager")}, lambda out: 0.0)

    shapes = [{"M": 2, "N": 8}, {"M": 2, "N": 16}]
    monkeypatch.setattr(cases, "build_cases", lambda *a, **k: [factory(s) for s in shapes])
    monkeypatch.setattr(cli, "measure_ceilings",
                        lambda *a, **k: ceilings_measured.append(1) or {"copy_gbps": 1.0, "gemm_bf16_tflops": 1.0})
    monkeypatch.setattr(cli, "time_call", lambda fn, *a, **k: (fn(), harness.Timing(1.0, 0.9, 1.1))[1])
    monkeypatch.setattr(report, "plot_results", lambda *a, **k: [])
    monkeypatch.setattr(harness, "_git_commit", lambda: "abc1234")
    path = tmp_path / "run.json"
    args = argparse.Namespace(ops="rms_norm_fwd", providers="triton,eager", dtype="bfloat16", quick=True,
                              json=str(path), resume=False)
    cli.run(args)
    first = json.loads(path.read_text())
    assert len(first["results"]) == 4

    # A run cut after the first case: the resumed run measures only the second case again.
    first["results"] = [row for row in first["results"] if row["shape"]["N"] == 8]
    first["ceilings"] = {"copy_gbps": 7.0, "gemm_bf16_tflops": 7.0}
    path.write_text(json.dumps(first))
    calls.clear(), ceilings_measured.clear()
    cli.run(argparse.Namespace(**{**vars(args), "resume": True}))
    resumed = json.loads(path.read_text())
    assert {name for name, _ in calls} == {"triton", "eager"} and {n for _, n in calls} == {16}
    assert not ceilings_measured and resumed["ceilings"]["copy_gbps"] == 7.0
    assert sorted((row["provider"], row["shape"]["N"]) for row in resumed["results"]) == [
        ("eager", 8), ("eager", 16), ("triton", 8), ("triton", 16)]

    # Another commit's file, a file cut mid-write, no commit to compare, or a full run's rows
    # under a --quick one: everything again.
    assert resumed["quick"] is True
    for case in ("other_commit", "truncated", "no_git", "not_quick"):
        monkeypatch.setattr(harness, "_git_commit", lambda: "unknown" if case == "no_git" else "abc1234")
        resumed["versions"]["commit"] = {"other_commit": "0000000", "no_git": "unknown"}.get(case, "abc1234")
        resumed["quick"] = case != "not_quick"
        text = json.dumps(resumed)
        path.write_text(text[:len(text) // 2] if case == "truncated" else text)
        calls.clear(), ceilings_measured.clear()
        cli.run(argparse.Namespace(**{**vars(args), "resume": True}))
        assert {n for _, n in calls} == {8, 16} and ceilings_measured, case
        assert len(json.loads(path.read_text())["results"]) == 4, case


def test_check_says_which_gpus_the_extension_has_code_for(monkeypatch, capsys):
    import types

    from internlm_kernels import __main__ as cli
    from internlm_kernels import backends

    gpus = [types.SimpleNamespace(name="NVIDIA H100", major=9, minor=0, total_memory=80 * 2**30,
                                  multi_processor_count=132),
            types.SimpleNamespace(name="NVIDIA B200", major=10, minor=0, total_memory=180 * 2**30,
                                  multi_processor_count=148)]
    extension = types.SimpleNamespace(build_info=lambda: {"torch_version": torch.__version__, "cuda_version": "13.0",
                                                          "cuda_archs": "8.0;9.0a"})
    monkeypatch.setattr(backends, "extension", extension)
    monkeypatch.setattr(backends, "EXTENSION_ARCHS", "8.0;9.0a")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpus[index])
    assert cli.check() == 0
    lines = capsys.readouterr().out.splitlines()
    assert "cuda:0: NVIDIA H100, sm_90, 80 GiB, 132 SMs" in lines
    assert ("cuda:1: NVIDIA B200, sm_100, 180 GiB, 148 SMs; no extension code for it (archs 8.0;9.0a): "
            "auto passes over cuda") in lines
    # A list that names no arch (torch then builds for the GPUs it sees): no verdict.
    monkeypatch.setattr(backends, "EXTENSION_ARCHS", "")
    assert cli.check() == 0
    assert ("cuda:1: NVIDIA B200, sm_100, 180 GiB, 148 SMs; extension archs (none named): cannot tell whether they "
            "run here") in capsys.readouterr().out.splitlines()
