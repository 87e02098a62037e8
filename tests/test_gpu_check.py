"""scripts/gpu_check.sh and its summary: they run only on a lent GPU, so their logic is
checked here on CPU (the shell script's syntax, and the summary of complete and cut runs)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", os.path.join(REPO, "scripts", "gpu_summary.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="9">
<testcase classname="tests.test_rms_norm" name="test_a"/>
<testcase classname="tests.test_rms_norm" name="test_b"><failure message="AssertionError: off by 3"/></testcase>
</testsuite></testsuites>"""


def test_gpu_check_script_parses_and_rejects_unknown_phases(tmp_path):
    script = os.path.join(REPO, "scripts", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    result = subprocess.run(["bash", script, str(tmp_path), "everything"], capture_output=True, text=True)
    assert result.returncode == 2 and "phase must be all, tests or bench" in result.stderr


def test_summary_reports_steps_cut_by_their_time_limit(tmp_path, capsys):
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "tests.log").write_text("...\npytest exit code: 1\n")
    (tmp_path / "tests-attention.log").write_text("....\npytest exit code: 124\n")  # killed: no junit written
    (tmp_path / "bench.log").write_text("[case 1/9] ...\nbench exit code: 124\n")
    rows = [{"op": "rms_norm_fwd", "provider": "cuda", "ms": 0.05, "gbps": 2900.0, "frac_of_ceiling": 0.91,
             "max_err": 0.0, "speedup_vs": {"triton": 1.1}}]
    (tmp_path / "nvidia-h100-20261127.json").write_text(json.dumps(
        {"gpu": "NVIDIA H100", "date": "2026-11-27", "versions": {}, "ceilings": {}, "results": rows}))
    _summary_module().main(str(tmp_path), "all")
    text = capsys.readouterr().out
    assert "tests (junit.xml): 9 run, 1 failed, 0 errors, 2 skipped" in text
    assert "FAIL tests.test_rms_norm::test_b: AssertionError: off by 3" in text
    assert ("tests (junit-attention.xml): did not finish: exit code 124 (cut by its time limit), "
            "see tests-attention.log") in text
    assert "rms_norm_fwd" in text and "triton=1.10" in text
    assert "bench: cut by its time limit" in text


def test_summary_of_a_bench_only_run_skips_the_tests(tmp_path, capsys):
    (tmp_path / "bench.log").write_text("Traceback ...\nbench exit code: 1\n")
    _summary_module().main(str(tmp_path), "bench")
    text = capsys.readouterr().out
    assert "tests (" not in text
    assert "bench: no results json; did not finish: exit code 1, see bench.log" in text
