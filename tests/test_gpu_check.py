"""scripts/gpu_check.sh and its summary: they run only on a lent GPU, so their logic is
checked here on CPU (the shell script's syntax, and the summary of complete and cut runs)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", os.path.join(REPO, "scripts", "gpu_summary.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_parses_and_rejects_unknown_phases(tmp_path):
    script = os.path.join(REPO, "scripts", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    result = subprocess.run(["bash", script, str(tmp_path), "everything"], capture_output=True, text=True)
    assert result.returncode == 2 and "phase must be all, tests, bench, sanitize or profile" in result.stderr


def test_summary_reports_crashes_and_steps_cut_by_their_time_limit(tmp_path, capsys):
    (tmp_path / "tests-status.json").write_text(json.dumps(
        {"exit_codes": [1], "crashed": [], "cut_during": None, "deselected_after_crash": 0,
         "counts": {"passed": 6, "failed": 1, "error": 0, "skipped": 2},
         "failed": [{"id": "tests/test_rms_norm.py::test_b", "outcome": "failed",
                     "message": "AssertionError: off by 3\nassert 3 == 0"}]}))
    # The attention step: round 1 crashed after 5 tests, round 2 was cut by the time limit.
    (tmp_path / "attention-status.json").write_text(json.dumps(
        {"exit_codes": [-11, 124], "crashed": ["tests/test_attention.py::test_x[cuda]"],
         "cut_during": "tests/test_attention.py::test_y[cuda]", "deselected_after_crash": 12,
         "counts": {"passed": 5, "failed": 0, "error": 0, "skipped": 0}, "failed": []}))
    (tmp_path / "exception-probe.txt").write_text("extension error, CUDA tensors   killed by SIGSEGV\n")
    (tmp_path / "bench.log").write_text("[case 1/9] ...\nbench exit code: 124\n")
    (tmp_path / "dispatch.log").write_text("Name (time in us)          Median   Rounds\n"
                                           "test_rms_norm_call_overhead[cuda]   21.5 (1.0)   4000\n")
    norm = {"M": 16384, "N": 4096}
    rows = [{"op": "rms_norm_fwd", "provider": "cuda", "dtype": "bfloat16", "shape": norm, "ms": 0.05,
             "gbps": 2900.0, "frac_of_ceiling": 0.91, "max_err": 0.0, "speedup_vs": {"triton": 1.1}},
            {"op": "rms_norm_fwd", "provider": "triton", "dtype": "bfloat16", "shape": norm, "ms": 0.055,
             "gbps": 2636.0, "frac_of_ceiling": 0.83, "max_err": 0.0, "speedup_vs": {}}]
    (tmp_path / "nvidia-h100-20261127.json").write_text(json.dumps(
        {"gpu": "NVIDIA H100", "date": "2026-11-27", "versions": {}, "ceilings": {}, "results": rows}))
    _summary_module().main(str(tmp_path), "all")
    text = capsys.readouterr().out
    assert "extension error, CUDA tensors   killed by SIGSEGV" in text
    assert "tests (tests): 9 run, 1 failed, 0 errors, 2 skipped; pytest exit codes [1]" in text
    assert "FAIL tests/test_rms_norm.py::test_b: AssertionError: off by 3" in text
    assert "tests (attention): 5 run" in text and "exit codes [-11, 124]" in text
    assert "CRASHED" in text and "tests/test_attention.py::test_x[cuda]" in text
    assert "CUT by the time limit during tests/test_attention.py::test_y[cuda]" in text
    assert "rms_norm_fwd" in text and "triton=1.10" in text and "NVIDIA H100 2026-11-27" in text
    assert "rms_norm_fwd [M=16384] >= 0.9 of copy bandwidth: cuda [N=4096]: 0.91 met" in text  # targets
    # cuda against triton, with the order "auto" keeps for the op (Triton first for this forward)
    assert "cuda against triton, and auto's first choice:" in text
    assert "rms_norm [M=16384,N=4096] bfloat16: cuda 0.0500 ms, triton 0.0550 ms: cuda 1.10x; " \
        "auto: triton (the run differs)" in text
    assert text.rstrip().splitlines()[-1].startswith("bench: cut by its time limit")  # last
    assert text.index("dispatch overhead") < text.index("cuda against triton")
    assert "dispatch overhead (host time per call, median; time in us):" in text
    assert "test_rms_norm_call_overhead[cuda]   21.5" in text


def test_cuda_fault_only_for_crashes_and_sticky_cuda_errors(tmp_path):
    # The benchmark leaves the cuda provider out only after a fault that would poison its
    # process: on 2026-11-28 one graph break under torch.compile had cost the whole cuda column.
    script = os.path.join(REPO, "scripts", "cuda_fault.py")

    def verdict(*statuses):
        paths = []
        for index, status in enumerate(statuses):
            path = tmp_path / f"status{index}.json"
            path.write_text(json.dumps(status))
            paths.append(str(path))
        result = subprocess.run(["python3", script, str(tmp_path / "missing.json"), *paths],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def failed(test_id, message):
        return {"crashed": [], "failed": [{"id": test_id, "outcome": "failed", "message": message}]}

    ordinary = failed("tests/test_attention.py::test_compiles[cuda]",
                      "torch._dynamo.exc.Unsupported: torch.* op returned non-Tensor")
    launch_error = failed("tests/test_rms_norm.py::test_bwd[cuda]", "RuntimeError: rms_norm_bwd (cuda): CUDA error: "
                                                                    "invalid argument")
    assert verdict(ordinary, launch_error) == ""
    sticky = failed("tests/test_attention.py::test_fwd[cuda]",
                    "RuntimeError: CUDA error: an illegal memory access was encountered\nmore")
    assert verdict(ordinary, sticky) == ("tests/test_attention.py::test_fwd[cuda]: RuntimeError: CUDA error: "
                                         "an illegal memory access was encountered")
    crashed = {"crashed": ["tests/test_attention.py::test_x[cuda]"], "failed": []}
    assert verdict(crashed) == "tests/test_attention.py::test_x[cuda] crashed the interpreter"
    assert verdict() == ""


def test_summary_of_a_bench_only_run_skips_the_tests(tmp_path, capsys):
    (tmp_path / "bench.log").write_text("Traceback ...\nbench exit code: 1\n")
    _summary_module().main(str(tmp_path), "bench")
    text = capsys.readouterr().out
    assert "tests (" not in text
    assert "bench: no results json; did not finish: exit code 1, see bench.log" in text


CRASHING_TESTS = """
import os
import signal


def test_before():
    assert sum(range(4)) == 6


def test_crashes():
    os.kill(os.getpid(), signal.SIGSEGV)


def test_after_passes():
    assert "a" * 3 == "aaa"


def test_after_fails():
    assert 2 + 2 == 5
"""


def _run_resilient(tmp_path, tests: str, seconds: int):
    """scripts/pytest_resilient.py over one test file written from ``tests``: (process, out dir, status)."""
    (tmp_path / "test_demo.py").write_text(tests)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(["python", os.path.join(REPO, "scripts", "pytest_resilient.py"), "demo", str(out),
                             str(seconds), "-q", "-p", "no:cacheprovider", "test_demo.py"], cwd=tmp_path,
                            capture_output=True, text=True)
    status_path = out / "demo-status.json"
    return result, out, json.loads(status_path.read_text()) if status_path.exists() else None


def test_resilient_pytest_runs_the_tests_after_a_crash(tmp_path):
    result, out, status = _run_resilient(tmp_path, CRASHING_TESTS, 120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert status["crashed"] == ["test_demo.py::test_crashes"]
    assert status["exit_codes"][0] == -11 and status["exit_codes"][1] == 1
    assert status["cut_during"] is None
    # Outcomes are counted test by test, so the crashed round's test_before is kept; round 2
    # skips the two tests of round 1 (test_before would otherwise count twice).
    assert status["counts"] == {"passed": 2, "failed": 1, "error": 0, "skipped": 0}
    assert [(r["id"], r["outcome"]) for r in status["failed"]] == [("test_demo.py::test_after_fails", "failed")]
    assert "assert (2 + 2) == 5" in status["failed"][0]["message"]
    log = (out / "demo.log").read_text()
    assert "=== round 2: 2 tests deselected (ran earlier)" in log
    assert "Fatal Python error: Segmentation fault" in log


def test_summary_of_a_sanitize_run_gives_each_tools_verdict(tmp_path, capsys):
    (tmp_path / "sanitize-memcheck.log").write_text(
        "....\n========= ERROR SUMMARY: 0 errors\ncompute-sanitizer memcheck exit code: 0\n")
    (tmp_path / "sanitize-racecheck.log").write_text(
        "========= Error: Race reported between Write access ...\n========= RACECHECK SUMMARY ...\n"
        "========= ERROR SUMMARY: 2 errors\ncompute-sanitizer racecheck exit code: 99\n")
    _summary_module().main(str(tmp_path), "sanitize")
    text = capsys.readouterr().out
    assert "sanitize-memcheck.log: ========= ERROR SUMMARY: 0 errors; compute-sanitizer memcheck exit code: 0" in text
    assert "sanitize-racecheck.log: ========= ERROR SUMMARY: 2 errors; compute-sanitizer racecheck exit code: 99" in text
    assert "tests (" not in text and "bench:" not in text


def test_profile_cases_run_with_the_torch_backend():
    """scripts/profile_kernels.py's calls, at tiny shapes on the eager backend: they run
    only under Nsight Compute on a GPU, so their arguments are checked here."""
    spec = importlib.util.spec_from_file_location("profile_kernels", os.path.join(REPO, "scripts",
                                                                                   "profile_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases = module.build_cases(torch.device("cpu"), backend="torch", small=True)
    assert sorted(cases) == sorted(module.CASES)
    for name, call in cases.items():
        assert call() is not None, name


NCU_DETAILS = """==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3","host","void internlm_kernels::rms_norm_detail::rms_norm_fwd_kernel<__nv_bfloat16, false>(internlm_kernels::RmsNormFwdParams, internlm_kernels::rms_norm_detail::Vectorized)","1","7","(256, 1, 1)","(16384, 1, 1)","0","9.0","GPU Speed Of Light Throughput","DRAM Throughput","%","91.2"
"0","4242","python3","host","void internlm_kernels::rms_norm_detail::rms_norm_fwd_kernel<__nv_bfloat16, false>(internlm_kernels::RmsNormFwdParams, internlm_kernels::rms_norm_detail::Vectorized)","1","7","(256, 1, 1)","(16384, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","us","70.5"
"0","4242","python3","host","void internlm_kernels::rms_norm_detail::rms_norm_fwd_kernel<__nv_bfloat16, false>(internlm_kernels::RmsNormFwdParams, internlm_kernels::rms_norm_detail::Vectorized)","1","7","(256, 1, 1)","(16384, 1, 1)","0","9.0","Occupancy","Achieved Occupancy","%","47.9"
"""


def test_summary_of_a_profile_run_lists_each_kernels_counters(tmp_path, capsys):
    (tmp_path / "profile-details.csv").write_text(NCU_DETAILS)
    _summary_module().main(str(tmp_path), "profile")
    text = capsys.readouterr().out
    assert "profile: 1 kernels (ncu)" in text
    assert "[0] rms_norm_fwd_kernel<__nv_bfloat16, false>: time 70.5 us, DRAM 91.2 %, occupancy 47.9 %" in text


SLOW_TESTS = """
import time


def test_quick():
    assert len("abc") == 3


def test_slow():
    time.sleep(60)
"""


def test_resilient_pytest_exits_124_when_cut_with_every_test_passed(tmp_path):
    """gpu_check benchmarks the cuda provider after attention tests that were only cut short."""
    result, _, status = _run_resilient(tmp_path, SLOW_TESTS, 10)
    assert result.returncode == 124, result.stdout + result.stderr
    assert status["cut_during"] == "test_demo.py::test_slow"
    assert status["counts"]["passed"] == 1 and status["failed"] == []
